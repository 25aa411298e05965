"""Load backbones from local files (official DINOv2/DINOv3 releases, our own export) with clear errors.

Files are read without executing code: `torch.load(weights_only=True)` for pickled checkpoints,
safetensors otherwise. Every failure is a `CheckpointError` that names the file and what is wrong.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from catalog.paths import is_local, resolve, retry
from training.models.config import MODEL_SIZES, ViTConfig
from training.models.layers import k_bias_mask
from training.models.rope import rope_periods
from training.models.vit import VisionTransformer, n_params

CURATE_PREFIX = "curate:"
_FORMAT = "curate-vit/1"
# Prefixes of training checkpoints (DINOv2/v3 `teacher_checkpoint.pth`, `model_final.pth`, DDP),
# tried in this order: the EMA teacher is the model people evaluate.
_PREFIXES = ("", "teacher.backbone.", "backbone.", "module.backbone.", "model.", "module.", "student.backbone.")
_CONTAINER_KEYS = ("teacher", "model", "state_dict")
_SHOW = 5


class CheckpointError(Exception):
    """A checkpoint file cannot be read or does not fit the requested backbone."""


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    config: ViTConfig
    sha256: str | None
    n_params: int
    random_init: bool


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _first(names: list[str]) -> str:
    more = f" (+{len(names) - _SHOW} more)" if len(names) > _SHOW else ""
    return ", ".join(names[:_SHOW]) + more


def _unwrap(obj: object, path: Path) -> dict[str, Tensor]:
    """Find the backbone tensors inside a plain state dict or a DINO training/eval checkpoint."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    for key in _CONTAINER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, dict) and "patch_embed.proj.weight" not in obj:
            obj = inner
            break
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    for prefix in _PREFIXES:
        if prefix + "patch_embed.proj.weight" in tensors:
            sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            return _unchunk_blocks(sd)
    raise CheckpointError(
        f"{path}: not a ViT backbone state dict (no 'patch_embed.proj.weight'; "
        f"first keys: {_first(sorted(tensors)) or 'none'})"
    )


def _unchunk_blocks(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """DINOv2 FSDP training checkpoints nest blocks as `blocks.{chunk}.{i}.`; index i is global."""
    chunked = re.compile(r"^blocks\.\d+\.(\d+)\.(.+)$")
    if not any(chunked.match(k) for k in sd):
        return sd
    return {(f"blocks.{m.group(1)}.{m.group(2)}" if (m := chunked.match(k)) else k): v for k, v in sd.items()}


def describe_load_error(e: BaseException) -> str:
    """Why unpickling a file failed, in one line: a refused global (a file that would run code) or damage."""
    text = str(e).strip()
    refused = re.search(r"Unsupported global: (?:GLOBAL )?([\w.]+)", text)
    if refused:
        return (f"holds Python objects other than tensors and plain containers ({refused.group(1)}); "
                "refusing to unpickle")
    detail = text.splitlines()[0] if text else ""
    return f"truncated, corrupt or not a checkpoint ({type(e).__name__}{': ' + detail if detail else ''})"


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Backbone tensors of a checkpoint file, as float32 where floating, without unpickling objects."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file")
    if p.suffix == ".safetensors":
        try:
            obj: object = load_file(str(p))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{p}: truncated, corrupt or not a safetensors checkpoint ({e})") from e
    else:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
            raise CheckpointError(f"{p}: {describe_load_error(e)}") from e
    sd = _unwrap(obj, p)
    return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}


@dataclass(frozen=True)
class _Arch:
    """What a state dict says about the architecture identity of its ViT."""

    family: str
    embed_dim: int
    depth: int
    patch_size: int
    n_registers: int
    ffn: str

    @classmethod
    def of_config(cls, cfg: ViTConfig) -> _Arch:
        return cls(cfg.family, cfg.embed_dim, cfg.depth, cfg.patch_size, cfg.n_registers, cfg.ffn)

    @classmethod
    def of_state_dict(cls, sd: dict[str, Tensor]) -> _Arch:
        w = sd["patch_embed.proj.weight"]
        blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
        family = "dinov3" if "storage_tokens" in sd or "rope_embed.periods" in sd else "dinov2"
        regs = sd.get("storage_tokens", sd.get("register_tokens"))
        swiglu = any(re.match(r"blocks\.\d+\.mlp\.w(12|1)\.weight$", k) for k in sd)
        return cls(
            family=family,
            embed_dim=int(w.shape[0]),
            depth=max(blocks) + 1 if blocks else 0,
            patch_size=int(w.shape[-1]),
            n_registers=int(regs.shape[1]) if regs is not None and regs.dim() == 3 else 0,
            ffn="swiglu" if swiglu else "mlp",
        )

    def describe(self) -> str:
        return (
            f"embed_dim {self.embed_dim}, depth {self.depth}, patch {self.patch_size}, "
            f"{self.n_registers} registers, {self.ffn} FFN, {self.family} layout"
        )


def _check_name(sd: dict[str, Tensor], name: str, cfg: ViTConfig, path: Path) -> None:
    found = _Arch.of_state_dict(sd)
    if found == _Arch.of_config(cfg):
        return
    alike = [n for n, c in MODEL_SIZES.items() if _Arch.of_config(c) == found]
    hint = f"looks like {' or '.join(alike)}" if alike else "matches no registered size"
    raise CheckpointError(
        f"{path}: file holds a ViT with {found.describe()} ({hint}), not {name} "
        f"({_Arch.of_config(cfg).describe()})"
    )


def _fit_config(sd: dict[str, Tensor], cfg: ViTConfig) -> ViTConfig:
    """Adopt the optional parts that vary between releases of one size: local cls norm, pos grid."""
    changes: dict[str, object] = {"local_cls_norm": "local_cls_norm.weight" in sd}
    pos = sd.get("pos_embed")
    if cfg.pos_encoding == "learned" and pos is not None and pos.dim() == 3:
        grid = round((pos.shape[1] - 1) ** 0.5)
        if grid * grid == pos.shape[1] - 1:
            changes["pos_embed_grid"] = grid
    return dataclasses.replace(cfg, **changes)  # type: ignore[arg-type]


def _fill_constant_buffers(sd: dict[str, Tensor], cfg: ViTConfig) -> dict[str, Tensor]:
    """Add buffers that are fixed functions of the config when a file leaves them out."""
    sd = dict(sd)
    if cfg.pos_encoding == "rope":
        periods = rope_periods(cfg.head_dim, cfg.rope_base, cfg.rope_min_period, cfg.rope_max_period)
        sd.setdefault("rope_embed.periods", periods)
    if cfg.qkv_bias and cfg.mask_k_bias:
        for i in range(cfg.depth):
            sd.setdefault(f"blocks.{i}.attn.qkv.bias_mask", k_bias_mask(cfg.embed_dim))
    return sd


def _build_and_load(sd: dict[str, Tensor], cfg: ViTConfig, path: Path, device: str | torch.device) -> VisionTransformer:
    with torch.device("meta"):
        model = VisionTransformer(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_first(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_first(unexpected)}")
        raise CheckpointError(f"{path}: state dict does not fit the model; " + "; ".join(parts))
    wrong = [k for k in expected if tuple(sd[k].shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        more = f" (and {len(wrong) - 1} more: {_first(wrong[1:])})" if len(wrong) > 1 else ""
        raise CheckpointError(
            f"{path}: shape mismatch for '{k}': expected {tuple(expected[k].shape)}, "
            f"found {tuple(sd[k].shape)}{more}"
        )
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(device).eval()


def load_backbone(
    name: str, weights: str | Path | None, device: str | torch.device = "cpu"
) -> tuple[VisionTransformer, BackboneInfo]:
    """Build `name` and load `weights` into it; returns the model in eval mode and what was loaded.

    `name` is a key of MODEL_SIZES (official sizes and test sizes) or `curate:PATH` for a file
    written by `export_backbone` (then `weights` is ignored). `weights=None` with a registered name
    gives a seeded random initialisation (`random_init=True`).
    """
    if name.startswith(CURATE_PREFIX):
        path = Path(name[len(CURATE_PREFIX):])
        cfg, sd = _read_curate(path)
        model = _build_and_load(sd, cfg, path, device)
        return model, BackboneInfo(name, cfg, file_sha256(path), n_params(model), random_init=False)
    if name not in MODEL_SIZES:
        raise CheckpointError(f"unknown backbone {name!r}; known: {', '.join(MODEL_SIZES)} or curate:PATH")
    cfg = MODEL_SIZES[name]
    if weights is None:
        model = VisionTransformer(cfg).to(device).eval()
        return model, BackboneInfo(name, cfg, None, n_params(model), random_init=True)
    path = Path(weights)
    sd = read_state_dict(path)
    _check_name(sd, name, cfg, path)
    cfg = _fit_config(sd, cfg)
    model = _build_and_load(_fill_constant_buffers(sd, cfg), cfg, path, device)
    return model, BackboneInfo(name, cfg, file_sha256(path), n_params(model), random_init=False)


def export_backbone(model: VisionTransformer, path: str | Path) -> str:
    """Write the backbone as safetensors with its ViTConfig in the metadata; returns the file sha256.

    ``path`` may be an fsspec URL: the file is then written locally first and uploaded in one put.
    """
    url = str(path)
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    # One metadata key: safetensors stores the metadata map in arbitrary key order, and a second key
    # would make the bytes (and so the sha256 that identifies a model) differ between runs.
    metadata = {_FORMAT: model.config.to_json()}
    fs, target = resolve(url)
    if is_local(url):
        fs.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = target + ".tmp"
        save_file(sd, tmp, metadata=metadata)
        os.replace(tmp, target)
        return file_sha256(target)
    with tempfile.TemporaryDirectory() as folder:
        tmp = os.path.join(folder, "backbone.safetensors")
        save_file(sd, tmp, metadata=metadata)
        retry(lambda: fs.put_file(tmp, target))
        return file_sha256(tmp)


def _read_curate(path: Path) -> tuple[ViTConfig, dict[str, Tensor]]:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        sd = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: truncated, corrupt or not a safetensors checkpoint ({e})") from e
    if _FORMAT not in meta:
        raise CheckpointError(f"{path}: not a curate backbone export (no '{_FORMAT}' metadata)")
    try:
        cfg = ViTConfig.from_json(meta[_FORMAT])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable ViT config in metadata ({e})") from e
    return cfg, sd
