"""A learned copy descriptor from a local TorchScript file, as DINOv2's pipeline used SSCD.

SSCD's releases are TorchScript files (sscd-copy-detection README, "Pretrained models"): the model
takes a float [N, 3, H, W] batch, ImageNet-normalised, and returns [N, 512] descriptors
(``sscd_disc_large``: 1024). Its README gives two inference resizes, the short side to 288
(``small_288``) or a 320×320 square (``skew_320``); the square one batches, so it is the default
here. Nothing is downloaded: the user points ``dedup.descriptor=torchscript:PATH`` at a file.

A copy threshold for such a model is not a constant of ours, so it is calibrated: the model
describes labelled copies (the caller's; the dedup stage defaults to the demo pool's injected groups),
and the threshold is the one with the best F1 over all pairs of that set (`calibrate`); its precision
and recall are reported.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

# torch is imported where a model runs, not here: the dedup stage reads this module's defaults on every
# run, and a run with the pixel descriptor never needs torch (~180 MB of RSS and ~1.2 s of import).

SSCD_SIZE = 320  # skew_320: a square resize
SSCD_DIM = 512
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BATCH = 32


@dataclass(frozen=True)
class ScriptedDescriptor:
    """A loaded model and how it is fed; ``model_id`` is the file's sha256 (not its path)."""

    module: torch.jit.ScriptModule
    model_id: str
    size: int = SSCD_SIZE
    dim: int = SSCD_DIM
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass(frozen=True)
class Calibration:
    threshold: float
    precision: float
    recall: float
    images: int
    copy_pairs: int


def load_scripted(data: bytes, size: int = SSCD_SIZE, dim: int = SSCD_DIM,
                  mean: tuple[float, float, float] = IMAGENET_MEAN,
                  std: tuple[float, float, float] = IMAGENET_STD) -> ScriptedDescriptor:
    """The model in ``data`` (a TorchScript file's bytes), on CPU in eval mode; a file that is not
    TorchScript raises ValueError with torch's reason."""
    import torch

    try:
        with warnings.catch_warnings():  # SSCD ships TorchScript: the format, not our choice
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=DeprecationWarning)
            module = torch.jit.load(io.BytesIO(data), map_location="cpu").eval()
    except RuntimeError as e:
        raise ValueError(f"not a TorchScript model: {str(e).splitlines()[0]}") from e
    return ScriptedDescriptor(module, "sha256:" + hashlib.sha256(data).hexdigest(), size, dim, tuple(mean), tuple(std))


def _batch(model: ScriptedDescriptor, images: list[Image.Image]) -> torch.Tensor:
    import torch

    pixels = np.stack([np.asarray(img.convert("RGB").resize((model.size, model.size), Image.Resampling.BILINEAR))
                       for img in images])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(model.mean).view(1, 3, 1, 1)) / torch.tensor(model.std).view(1, 3, 1, 1)


def describe(model: ScriptedDescriptor, images: list[Image.Image]) -> np.ndarray:
    """float16 [n, dim], unit norm; a model whose output is not [n, dim] raises ValueError."""
    import torch

    out = []
    for start in range(0, len(images), BATCH):
        chunk = images[start : start + BATCH]
        with torch.inference_mode():
            y = model.module(_batch(model, chunk))
        if not isinstance(y, torch.Tensor) or tuple(y.shape) != (len(chunk), model.dim):
            shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"the model returned {shape} for a batch of {len(chunk)} images, expected "
                             f"[{len(chunk)}, {model.dim}] (set model_dim to its descriptor size)")
        out.append(torch.nn.functional.normalize(y.float(), dim=1).numpy())
    return np.concatenate(out).astype(np.float16) if out else np.zeros((0, model.dim), np.float16)


def calibrate(x: np.ndarray, groups: np.ndarray) -> Calibration:
    """The cosine threshold with the best pair F1 on labelled copies (ties: the higher threshold),
    halfway to the next pair below it, with the precision and recall there."""
    x = np.asarray(x, np.float32)
    i, j = np.triu_indices(len(x), 1)
    sim = np.einsum("ij,ij->i", x[i], x[j])
    same = groups[i] == groups[j]
    order = np.argsort(-sim, kind="stable")
    sim, same = sim[order], same[order]
    hits = np.cumsum(same)
    precision = hits / np.arange(1, len(sim) + 1)
    recall = hits / max(int(same.sum()), 1)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1))
    below = sim[best + 1] if best + 1 < len(sim) else sim[best] - 1e-3
    return Calibration(float((sim[best] + below) / 2), float(precision[best]), float(recall[best]), len(x),
                       int(same.sum()))
