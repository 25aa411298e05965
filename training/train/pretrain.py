"""Self-distillation from the EMA teacher: the ``pretrain``, ``gram`` and ``highres`` recipe stages.

One step = teacher targets, student losses, backward, clip, AdamW, EMA. The Gram stages add a frozen
Gram teacher (``training.train.stages``) whose patch Grams anchor the student's; the high-res stage's
per-step crop sizes come from the loader.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from catalog.paths import join
from training.train.config import TrainConfig, vit_config
from training.train.data import crop_sizes
from training.train.distributed import DistInfo, build_models
from training.train.evals import CheckpointEvals
from training.train.meta_arch import FIELDS, GramTerm, ssl_losses
from training.train.optim import apply_hyper_params, build_optimizer, clip_gradients, ema_update
from training.train.recipe import CheckpointModels, ExportTarget, StepOutcome
from training.train.run_state import TEACHER_FILE, step_generator
from training.train.schedules import StepHyperParams
from training.train.stages import (
    build_gram_teacher,
    copy_backbone,
    gram_refresh_due,
    gram_weight,
    init_from_checkpoint,
    init_gram_teacher,
)

GRAM_STAGES = ("gram", "highres")


@dataclass(frozen=True)
class ReducedStep:
    losses: list[float]  # FIELDS order, averaged over ranks
    grad_norms: dict[str, float]  # pre-clip, per module
    finite: bool  # False: the optimizer step and EMA update were skipped


def train_step(
    student: nn.Module,
    teacher: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict,
    hp: StepHyperParams,
    config: TrainConfig,
    generator: torch.Generator | None,
    gram: GramTerm | None = None,
) -> ReducedStep:
    """One optimisation step on a device-resident batch; collective over all ranks.

    A step whose rank-averaged loss is NaN/inf changes nothing (no AdamW step, no EMA update); the
    reference still steps on such iterations, which lets one bad batch poison the weights.
    """
    distributed = dist.is_initialized()
    apply_hyper_params(optimizer, hp)
    losses = ssl_losses(student, teacher, batch, hp.teacher_temp, config.loss, distributed, generator=generator,
                        gram=gram, local_weight=hp.dino_local_weight)
    losses.total.backward()
    norms = clip_gradients(student, config.optim.clip_grad)
    values = losses.stacked()
    if distributed:
        dist.all_reduce(values)
        values /= dist.get_world_size()
    # The step's one host sync: losses and gradient norms together.
    read = torch.cat([values, *(n.float().reshape(1) for n in norms.values())]).tolist()
    reduced, grad_norms = read[: len(FIELDS)], dict(zip(norms, read[len(FIELDS) :]))
    finite = math.isfinite(reduced[0])
    if finite:
        optimizer.step()
        ema_update(teacher, student, hp.momentum)
    optimizer.zero_grad(set_to_none=True)
    return ReducedStep(reduced, grad_norms, finite)


class SSLRecipe:
    """Student and EMA teacher of one architecture, plus the frozen Gram teacher in the Gram stages."""

    label = "train"

    def __init__(self, config: TrainConfig, info: DistInfo) -> None:
        self.config, self.info = config, info
        self.vit = vit_config(config.model)
        self.patch_size = self.vit.patch_size
        self.student, self.teacher = build_models(
            config.model, config.seed, info,
            activation_checkpointing=config.activation_checkpointing, compile=config.compile,
        )
        self.optimizer = build_optimizer(self.student, self.vit.depth, config.optim, info.device)
        self.gram_teacher = build_gram_teacher(config.model, info) if config.stage in GRAM_STAGES else None

    def start_fresh(self) -> None:
        """Student and teacher from ``init.checkpoint`` (if set); the Gram teacher from its source."""
        if self.config.init.checkpoint:
            init_from_checkpoint(self.config.init, self.student, self.teacher)
        if self.gram_teacher is not None:
            init_gram_teacher(self.config.gram, self.gram_teacher, self.teacher)

    def checkpoint_models(self) -> CheckpointModels:
        extra = {"gram_teacher": self.gram_teacher} if self.gram_teacher is not None else {}
        return CheckpointModels(self.student, self.teacher, self.optimizer, extra)

    def step(self, batch: dict, hp: StepHyperParams, step: int) -> StepOutcome:
        config = self.config
        record: dict[str, object] = {}
        if config.stage == "highres":
            record["resolution"] = crop_sizes(batch)
        gram = None
        if self.gram_teacher is not None:
            gram = GramTerm(self.gram_teacher, gram_weight(config.gram, step, config.optim.iterations), config.gram)
            record["gram_weight"] = gram.weight
            record["gram_teacher_input"] = list(batch.get("gram_teacher_crops", batch["global_crops"]).shape[-2:])
        generator = step_generator(config.seed, step, self.info.rank)
        done = train_step(self.student, self.teacher, self.optimizer, batch, hp, config, generator, gram)
        if self.gram_teacher is not None and gram_refresh_due(config.gram, step):
            copy_backbone(self.gram_teacher, self.teacher.backbone)
            record["gram_teacher_refreshed"] = True
        record = {**dict(zip(FIELDS, done.losses)), **{f"grad_norm_{k}": v for k, v in done.grad_norms.items()},
                  **record}
        return StepOutcome(record, done.losses[0], done.finite)

    def evaluate(self, evals: CheckpointEvals) -> dict[str, float]:
        return evals(self.teacher.backbone)

    def export_target(self, output_dir: str) -> ExportTarget:
        return ExportTarget(self.teacher.backbone, self.vit, join(output_dir, TEACHER_FILE), self.info.is_main)
