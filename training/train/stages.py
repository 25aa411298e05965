"""What the later DINOv3 stages add to a run: starting from an earlier stage, the Gram teacher's life
cycle, and the high-resolution stage's per-step crop sizes.

Every decision is a pure function of the config and the step (never of run history), so a resumed run
makes exactly the choices an uninterrupted one makes, and all ranks agree without communicating.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from training.data.masking import collate
from training.data.mixing import PURPOSE_MASK, counter_rng
from training.models import VisionTransformer
from training.train.checkpoint import load_models, resolve_checkpoint
from training.train.config import CropsConfig, GramConfig, InitConfig, ModelConfig, Resolution
from training.train.distributed import DistInfo, prepare_frozen_backbone
from training.train.meta_arch import SSLModel, vit_config
from training.train.optim import _local
from training.train.schedules import schedule_value

# Philox key word of the resolution draw; distinct from the data pipeline's purposes (1-4).
PURPOSE_RESOLUTION = 101


def init_from_checkpoint(init: InitConfig, student: SSLModel, teacher: SSLModel) -> None:
    """Start a stage from a previous stage's checkpoint: student from its student or teacher, teacher from its teacher."""
    path = resolve_checkpoint(init.checkpoint)
    load_models(path, [(init.student_from, student), ("teacher", teacher)])


def gram_weight(gram: GramConfig, iteration: int, total_iterations: int) -> float:
    """0 before ``gram.start_iteration``, then the ``gram.weight`` schedule counted from there."""
    if iteration < gram.start_iteration:
        return 0.0
    return schedule_value(gram.weight, iteration - gram.start_iteration, total_iterations - gram.start_iteration)


def gram_updates_done(gram: GramConfig, completed: int) -> int:
    """Refreshes of the Gram teacher that happened within the first ``completed`` iterations."""
    if gram.max_updates <= 0 or completed < gram.first_update:
        return 0
    first = math.ceil(gram.first_update / gram.update_period)
    return min(gram.max_updates, max(0, completed // gram.update_period - first + 1))


def gram_refresh_due(gram: GramConfig, iteration: int) -> bool:
    """True when the Gram teacher is refreshed after iteration ``iteration`` (0-based) completed."""
    return gram_updates_done(gram, iteration + 1) > gram_updates_done(gram, iteration)


def build_gram_teacher(model: ModelConfig, info: DistInfo) -> VisionTransformer:
    """A frozen backbone of the student's architecture, sharded over the world (weights filled in later)."""
    with torch.device("meta"):
        backbone = VisionTransformer(vit_config(model))
    return prepare_frozen_backbone(backbone, info)


@torch.no_grad()
def copy_backbone(target: nn.Module, source: nn.Module) -> None:
    """Copy ``source``'s weights into ``target`` shard by shard (same architecture and sharding)."""
    source_state = source.state_dict()
    for name, value in target.state_dict().items():
        _local(value).copy_(_local(source_state[name]))


def init_gram_teacher(gram: GramConfig, gram_teacher: nn.Module, ema_teacher: SSLModel) -> None:
    """The EMA teacher backbone of ``gram.checkpoint``, or of the EMA teacher this stage starts from."""
    if gram.checkpoint:
        load_models(resolve_checkpoint(gram.checkpoint), [("teacher/backbone", gram_teacher)])
    else:
        copy_backbone(gram_teacher, ema_teacher.backbone)


def choose_resolution(seed: int, step: int, resolutions: list[Resolution]) -> Resolution:
    """The crop sizes of ``step``: drawn with the configured probabilities, identical on every rank."""
    u = counter_rng(seed, PURPOSE_RESOLUTION, step).random()
    cumulative = 0.0
    for resolution in resolutions:
        cumulative += resolution.probability
        if u < cumulative:
            return resolution
    return resolutions[-1]


def loader_crop_sizes(resolutions: list[Resolution]) -> tuple[int, int, int | None]:
    """(global, local, Gram) sizes the loader renders at: the largest of each, resized down per step."""
    grams = [r.gram_size for r in resolutions if r.gram_size is not None]
    return (
        max(r.global_size for r in resolutions),
        max(r.local_size for r in resolutions),
        max(grams) if grams else None,
    )


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=True)


def apply_resolution(
    batch: dict, resolution: Resolution, crops: CropsConfig, patch_size: int, seed: int, step: int, rank: int
) -> dict:
    """The batch at ``resolution``: crops resized (antialiased bicubic), iBOT masks redrawn for the new grid.

    The masks come from the data pipeline's own ``collate`` with the same per-(seed, step, rank)
    generator the loader uses, so they are what a loader rendering at this size would draw.
    """
    n_images = batch["image_ids"].shape[0]
    global_crops = _resize(batch["global_crops"], resolution.global_size).unflatten(0, (-1, n_images))
    local_crops = _resize(batch["local_crops"], resolution.local_size).unflatten(0, (-1, n_images))
    samples = [{"global_crops": global_crops[:, b], "local_crops": local_crops[:, b]} for b in range(n_images)]
    out = {k: v for k, v in batch.items() if k != "gram_teacher_crops"}
    out.update(collate(
        samples, patch_size=patch_size, rng=counter_rng(seed, PURPOSE_MASK, step, rank),
        mask_ratio_range=crops.mask_ratio_range, mask_sample_probability=crops.mask_sample_probability,
    ))
    if resolution.gram_size is not None and "gram_teacher_crops" in batch:
        out["gram_teacher_crops"] = _resize(batch["gram_teacher_crops"], resolution.gram_size)
    return out
