"""Per-iteration hyper-parameter schedules and the batch-size scaling of the learning rate."""

from __future__ import annotations

import dataclasses
import math

from training.train.config import LossConfig, OptimConfig, ScheduleConfig


def schedule_value(schedule: ScheduleConfig, iteration: int, total_iterations: int) -> float:
    """Value of ``schedule`` at ``iteration`` of a run of ``total_iterations`` (see ``ScheduleConfig``).

    Past the cosine part (and past ``total_iterations``) the value stays at ``end``.
    """
    warmup = schedule.warmup_iterations
    dinov2 = schedule.kind == "dinov2_cosine"
    if iteration < warmup:
        # DINOv2 includes the warmup's endpoint (its last warmup step is at ``peak``), DINOv3 does not.
        fraction = (iteration / (warmup - 1) if warmup > 1 else 1.0) if dinov2 else iteration / warmup
        return schedule.start + (schedule.peak - schedule.start) * fraction
    if schedule.kind == "constant":
        return schedule.peak
    cosine = schedule.cosine_iterations if schedule.cosine_iterations is not None else total_iterations - warmup
    step = iteration - warmup
    if step >= cosine:
        return schedule.end
    if dinov2:
        progress = step / cosine
    else:  # cos(linspace(0, pi, cosine)): both ends included
        progress = step / (cosine - 1) if cosine > 1 else 0.0
    return (schedule.peak - schedule.end) * (math.cos(math.pi * progress) + 1) / 2 + schedule.end


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
    """The lr schedule scaled for the global batch: peak and end (v2), only the peak (``dinov2_cosine``).

    The warmup start is never scaled.
    """
    s = lr_scale(optim.lr_scaling, global_batch_size)
    end = optim.lr.end if optim.lr.kind == "dinov2_cosine" else optim.lr.end * s
    return dataclasses.replace(optim.lr, peak=optim.lr.peak * s, end=end)


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
