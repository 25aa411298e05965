"""Per-iteration hyper-parameter schedules and the batch-size scaling of the learning rate."""

from __future__ import annotations

import dataclasses
import math

from training.train.config import LossConfig, OptimConfig, ScheduleConfig


def schedule_value(schedule: ScheduleConfig, iteration: int, total_iterations: int) -> float:
    """Value at ``iteration``: ``start -> peak`` during warmup, then constant or cosine ``peak -> end``.

    The linear warmup is ``linspace(start, peak, warmup, endpoint=False)`` as in DINOv3, the cosine one
    the same points on a half-cosine; the cosine decay spans the iterations left after the warmup and
    stays at ``end`` beyond ``total_iterations``.
    """
    warmup = schedule.warmup_iterations
    if iteration < warmup:
        fraction = iteration / warmup
        if schedule.warmup_shape == "cosine":
            fraction = 0.5 * (1.0 - math.cos(math.pi * fraction))
        return schedule.start + (schedule.peak - schedule.start) * fraction
    if schedule.kind == "constant":
        return schedule.peak
    span = max(1, total_iterations - warmup)
    progress = min(1.0, (iteration - warmup) / span)
    return schedule.end + 0.5 * (schedule.peak - schedule.end) * (1.0 + math.cos(math.pi * progress))


def lr_scale(rule: str, global_batch_size: int) -> float:
    """DINOv3 ``sqrt_wrt_1024``: 4·sqrt(B/1024); DINOv2 ``linear_wrt_256``: B/256; ``none``: 1."""
    if rule == "sqrt_wrt_1024":
        return 4.0 * math.sqrt(global_batch_size / 1024)
    if rule == "linear_wrt_256":
        return global_batch_size / 256
    if rule == "none":
        return 1.0
    raise ValueError(f"unknown lr scaling rule {rule!r}")


def scaled_lr_schedule(optim: OptimConfig, global_batch_size: int) -> ScheduleConfig:
    """The lr schedule with its peak and end scaled for the global batch (the warmup start is kept)."""
    s = lr_scale(optim.lr_scaling, global_batch_size)
    return dataclasses.replace(optim.lr, peak=optim.lr.peak * s, end=optim.lr.end * s)


@dataclasses.dataclass(frozen=True)
class StepHyperParams:
    lr: float
    last_layer_lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float
    dino_local_weight: float = 1.0


class Schedules:
    """All per-iteration values of a run."""

    def __init__(self, optim: OptimConfig, global_batch_size: int, loss: LossConfig | None = None) -> None:
        self.optim = optim
        self.loss = loss or LossConfig()
        self.lr = scaled_lr_schedule(optim, global_batch_size)

    def at(self, iteration: int) -> StepHyperParams:
        o, total = self.optim, self.optim.iterations
        lr = schedule_value(self.lr, iteration, total)
        return StepHyperParams(
            lr=lr,
            last_layer_lr=0.0 if iteration < o.freeze_last_layer_iterations else lr,
            weight_decay=schedule_value(o.weight_decay, iteration, total),
            momentum=schedule_value(o.momentum, iteration, total),
            teacher_temp=schedule_value(o.teacher_temp, iteration, total),
            dino_local_weight=schedule_value(self.loss.dino_local_weight, iteration, total),
        )
