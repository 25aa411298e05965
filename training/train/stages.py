"""What the later DINOv3 stages add to a run: starting from an earlier stage and the Gram teacher's life
cycle (the high-resolution stage's per-step crop sizes are drawn by the loader, ``multicrop_options``).

Every decision is a pure function of the config and the step (never of run history), so a resumed run
makes exactly the choices an uninterrupted one makes, and all ranks agree without communicating.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from training.models import VisionTransformer
from training.train.checkpoint import load_models, resolve_checkpoint
from training.train.config import GramConfig, InitConfig, ModelConfig, vit_config
from training.train.distributed import DistInfo, prepare_frozen_backbone
from training.train.meta_arch import SSLModel
from training.train.optim import _local
from training.train.schedules import schedule_value


def init_from_checkpoint(init: InitConfig, student: SSLModel, teacher: SSLModel) -> None:
    """Start a stage from a previous stage's checkpoint: student from its student or teacher, teacher from its teacher."""
    path = resolve_checkpoint(init.checkpoint)
    load_models(path, [(init.student_from, student), ("teacher", teacher)])


def gram_weight(gram: GramConfig, iteration: int, total_iterations: int) -> float:
    """The Gram-loss weight at ``iteration`` of the stage (the recipe: 0 -> 2 on a half-cosine over 1000)."""
    return schedule_value(gram.weight, iteration, total_iterations)


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
