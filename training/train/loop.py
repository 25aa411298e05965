"""The training loop: one step = teacher targets, student losses, backward, clip, AdamW, EMA.

Runs single-process, under ``torchrun`` (it creates the process group) or inside an already
initialised group (Ray Train). Per-step metrics go to ``<output_dir>/metrics.jsonl`` (rank 0).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch import nn

from catalog.config import to_dict
from catalog.progress import progress
from training.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from training.train.config import TrainConfig, vit_config
from training.train.data import build_loader, crop_sizes
from training.train.distributed import DistInfo, barrier, build_models, init_distributed
from training.train.evals import CheckpointEvals, scores_missing
from training.train.export import export_teacher, input_spec_of
from training.train.meta_arch import FIELDS, GramTerm, ssl_losses
from training.train.optim import (
    apply_hyper_params,
    build_optimizer,
    clip_gradients,
    ema_update,
)
from training.train.run_state import (
    TEACHER_FILE,
    TrainResult,
    append_record,
    resume_logs,
    rng_state,
    set_rng_state,
    step_generator,
)
from training.train.schedules import Schedules, StepHyperParams
from training.train.stages import (
    build_gram_teacher,
    copy_backbone,
    gram_refresh_due,
    gram_weight,
    init_from_checkpoint,
    init_gram_teacher,
)

_DEVICE_KEYS = ("global_crops", "local_crops", "masks", "mask_indices", "masks_weight", "image_ids", "gram_teacher_crops")
class TrainingDiverged(RuntimeError):
    """The loss was NaN/inf on too many consecutive steps."""


@dataclass(frozen=True)
class StepOutcome:
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
) -> StepOutcome:
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
    return StepOutcome(reduced, grad_norms, finite)


def log_scores(evals: CheckpointEvals, backbone: nn.Module, step: int, path: Path, is_main: bool) -> None:
    """Score the EMA teacher of checkpoint ``step`` (collective) and log the row on rank 0."""
    scores = evals(backbone)
    if is_main:
        append_record(path, {"step": step, **scores})
        print(f"checkpoint {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()), flush=True)


def train(config: TrainConfig) -> TrainResult:
    """Train (or resume) the run described by ``config``; collective over all ranks of the group.

    ``config.stage`` picks the recipe stage: ``pretrain``, ``gram`` (Gram anchoring), ``highres``
    (mixed-resolution adaptation with Gram anchoring) or ``distill`` (``training.train.distill``).
    """
    info = init_distributed(config.device, config.dist_timeout_s, config.precision)
    try:
        if config.stage == "distill":
            from training.train.distill import train_distill

            return train_distill(config, info)
        return _train(config, info)
    finally:
        if info.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def _train(config: TrainConfig, info: DistInfo) -> TrainResult:
    out = Path(config.output_dir)
    ckpt_root = out / "ckpt"
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    barrier()

    vit = vit_config(config.model)
    student, teacher = build_models(
        config.model, config.seed, info,
        activation_checkpointing=config.activation_checkpointing, compile=config.compile,
    )
    optimizer = build_optimizer(student, vit.depth, config.optim, info.device)
    global_batch = config.optim.batch_size_per_rank * info.world_size
    schedules = Schedules(config.optim, global_batch, config.loss)
    loader = build_loader(config, info.rank, info.world_size, vit.patch_size)
    gram_teacher = build_gram_teacher(config.model, info) if config.stage in ("gram", "highres") else None
    extra = {"gram_teacher": gram_teacher} if gram_teacher is not None else {}

    start, nan_streak = 0, 0
    latest = latest_checkpoint(ckpt_root) if config.checkpoint.resume else None
    if latest is not None:
        start, rank_state = load_checkpoint(latest, student, teacher, optimizer, info, extra=extra)
        loader.load_state_dict(rank_state["loader"])
        set_rng_state(rank_state["rng"])
        nan_streak = int(rank_state["nan_streak"])
    else:
        if config.init.checkpoint:
            init_from_checkpoint(config.init, student, teacher)
        if gram_teacher is not None:
            init_gram_teacher(config.gram, gram_teacher, teacher)
    metrics_path, evals_path = resume_logs(out, start, info.is_main)
    evals = CheckpointEvals(config.eval, config.crops.global_size, vit.patch_size)
    if evals.names and start > 0 and scores_missing(evals_path, start, info.is_main):
        log_scores(evals, teacher.backbone, start, evals_path, info.is_main)
    end = config.optim.iterations if config.max_steps is None else min(config.max_steps, config.optim.iterations)
    bar = progress(end, "train", unit="step", initial=start) if info.is_main else None
    step = start
    batches = iter(loader)
    try:
        while step < end:
            t0 = time.perf_counter()
            batch = next(batches)
            if batch["step"] != step:
                raise RuntimeError(f"loader is at step {batch['step']}, the trainer at {step}")
            batch = {k: (batch[k].to(info.device, non_blocking=True) if k in _DEVICE_KEYS else batch[k]) for k in batch}
            hp = schedules.at(step)
            extra_record = {}
            if config.stage == "highres":
                extra_record["resolution"] = crop_sizes(batch)
            gram = None
            if gram_teacher is not None:
                gram = GramTerm(gram_teacher, gram_weight(config.gram, step, config.optim.iterations), config.gram)
                extra_record["gram_weight"] = gram.weight
                extra_record["gram_teacher_input"] = list(batch.get("gram_teacher_crops", batch["global_crops"]).shape[-2:])
            outcome = train_step(
                student, teacher, optimizer, batch, hp, config, step_generator(config.seed, step, info.rank), gram
            )
            if gram_teacher is not None and gram_refresh_due(config.gram, step):
                copy_backbone(gram_teacher, teacher.backbone)
                extra_record["gram_teacher_refreshed"] = True
            reduced, grad_norms, finite = outcome.losses, outcome.grad_norms, outcome.finite
            nan_streak = 0 if finite else nan_streak + 1
            step += 1
            seconds = time.perf_counter() - t0
            if info.is_main:
                record = {
                    "step": step - 1, **dict(zip(FIELDS, reduced)), "lr": hp.lr, "last_layer_lr": hp.last_layer_lr,
                    "weight_decay": hp.weight_decay, "momentum": hp.momentum, "teacher_temp": hp.teacher_temp,
                    "dino_local_weight": hp.dino_local_weight, **{f"grad_norm_{k}": v for k, v in grad_norms.items()},
                    "images_per_s": global_batch / seconds, "images_seen": step * global_batch,
                    "homogeneous": bool(batch["homogeneous"]), "skipped_optimizer_step": not finite,
                    **extra_record,
                }
                append_record(metrics_path, record)
                bar.update(1)
                bar.set_postfix(loss=f"{reduced[0]:.4f}", lr=f"{hp.lr:.2e}")
            if nan_streak >= config.nan_patience:
                raise TrainingDiverged(
                    f"loss is NaN/inf on {nan_streak} consecutive steps (last: step {step - 1}); stopping. "
                    f"Last checkpoint: {latest_checkpoint(ckpt_root) or 'none'}. Lower optim.lr or check the data."
                )
            if step % config.checkpoint.period == 0 or step == end:
                rank_state = {"loader": loader.state_dict(), "rng": rng_state(), "nan_streak": nan_streak}
                save_checkpoint(ckpt_root, step, student, teacher, optimizer, rank_state, info,
                                config.checkpoint.keep_last, extra=extra)
                if evals.names:
                    log_scores(evals, teacher.backbone, step, evals_path, info.is_main)
    finally:
        if bar is not None:
            bar.close()
    teacher_path = None
    if config.export_teacher and step >= config.optim.iterations:
        teacher_path = out / TEACHER_FILE
        export_teacher(teacher.backbone, vit, teacher_path, info.is_main, input_spec=input_spec_of(config))
    barrier()
    return TrainResult(step, start, out, teacher_path)
