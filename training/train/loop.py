"""The one training loop: every recipe stage runs through ``Trainer``.

The trainer owns what all stages share: the output folder (any fsspec URL) and its config dump,
resume from the latest checkpoint, the schedules, the divergence guard, the per-step metrics row,
checkpoint and eval cadence, the export of the trained backbone and the run manifest. A recipe
(``training.train.recipe.Recipe``) brings its models and its step. It runs single-process, under
``torchrun`` (it creates the process group) or inside an already initialised group (Ray Train).
Per-step metrics go to ``<output_dir>/metrics.jsonl``, checkpoint scores to ``evals.jsonl`` (rank 0).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist
import yaml

from catalog.config import to_dict
from catalog.manifest import RunManifest
from catalog.paths import join, write_bytes_atomic
from catalog.progress import progress
from training.data.loader import TrainLoader
from training.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from training.train.config import TrainConfig
from training.train.data import TrainingData, build_loader, prefetches, training_data
from training.train.distill import DistillRecipe
from training.train.distributed import DistInfo, barrier, init_distributed
from training.train.evals import CheckpointEvals, scores_missing
from training.train.export import export_teacher, input_spec_of
from training.train.pretrain import SSLRecipe
from training.train.recipe import Recipe, StepOutcome
from training.train.run_state import (
    MANIFEST_STAGE,
    RecordLog,
    TrainResult,
    resume_logs,
    rng_state,
    set_rng_state,
)
from training.train.schedules import Schedules, StepHyperParams

DEVICE_KEYS = ("global_crops", "local_crops", "masks", "mask_indices", "masks_weight", "image_ids",
               "gram_teacher_crops")

log = logging.getLogger("curate.training")


def to_device(batch: dict, device: torch.device) -> dict:
    """A loader batch with its tensors on ``device``; from pinned memory the copies do not block the host."""
    return {k: (v.to(device, non_blocking=True) if k in DEVICE_KEYS else v) for k, v in batch.items()}


class DeviceFeed:
    """The loader's batches on the device; ``prefetch`` starts the next one's copy (on a side stream on
    CUDA) so that it runs while the current step computes. The trainer prefetches only when no
    checkpoint comes first: a checkpoint stores the loader's state as of the last batch taken."""

    def __init__(self, batches: Iterator[dict], device: torch.device) -> None:
        self.batches, self.device = batches, device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.pending: dict | None = None

    def prefetch(self) -> None:
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            self.pending = to_device(next(self.batches), self.device)

    def take(self) -> dict:
        if self.pending is None:
            return to_device(next(self.batches), self.device)
        batch, self.pending = self.pending, None
        if self.stream is not None:  # the step's stream waits for the copies, then owns their memory
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            for value in batch.values():
                if isinstance(value, torch.Tensor) and value.device.type == "cuda":
                    value.record_stream(current)
        return batch


class TrainingDiverged(RuntimeError):
    """The loss was NaN/inf on too many consecutive steps."""


def build_recipe(config: TrainConfig, info: DistInfo) -> Recipe:
    """The recipe of ``config.stage``: distillation from a frozen teacher, or EMA self-distillation."""
    return DistillRecipe(config, info) if config.stage == "distill" else SSLRecipe(config, info)


def train(config: TrainConfig) -> TrainResult:
    """Train (or resume) the run described by ``config``; collective over all ranks of the group.

    ``config.stage`` picks the recipe stage: ``pretrain``, ``gram`` (Gram anchoring), ``highres``
    (mixed-resolution adaptation with Gram anchoring) or ``distill`` (students from a frozen teacher).
    """
    info = init_distributed(config.device, config.dist_timeout_s, config.precision)
    try:
        return Trainer(config, info).run()
    finally:
        if info.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


class Trainer:
    """One invocation of a run: build, resume, step until ``max_steps``/the end, checkpoint, export."""

    # Built by ``run`` (collectively, after the config dump):
    recipe: Recipe
    loader: TrainLoader
    evals: CheckpointEvals
    metrics: RecordLog
    evals_log: RecordLog

    def __init__(self, config: TrainConfig, info: DistInfo) -> None:
        self.config, self.info = config, info
        self.out = config.output_dir
        self.ckpt_root = join(self.out, "ckpt")
        self.global_batch = config.optim.batch_size_per_rank * info.world_size
        self.end = config.optim.iterations if config.max_steps is None else min(config.max_steps,
                                                                                 config.optim.iterations)
        self.counts = _Counts()

    def run(self) -> TrainResult:
        config, info = self.config, self.info
        if info.is_main:
            write_bytes_atomic(join(self.out, "config.yaml"), yaml.safe_dump(to_dict(config), sort_keys=False).encode())
        barrier()
        self.recipe = build_recipe(config, info)
        data = training_data(config.data)
        self.loader = build_loader(config, info.rank, info.world_size, self.recipe.patch_size, data)
        self.evals = CheckpointEvals(config.eval, config.crops.global_size, self.recipe.patch_size)
        manifest = RunManifest(self.out, MANIFEST_STAGE, to_dict(config)) if info.is_main else None
        with manifest or contextlib.nullcontext():
            start, nan_streak = self._resume()
            if manifest is not None:
                manifest.inputs = _inputs(data)
            self.metrics, self.evals_log = resume_logs(self.out, start, info.is_main)
            if self.evals.names and start > 0 and scores_missing(self.evals_log.url, start, info.is_main):
                self._score(start)
            step = self._loop(start, nan_streak)
            drawn = self._images_by_part()
            teacher_path, sha = self._export(step)
            if manifest is not None:
                manifest.rows = {"images_seen": step * self.global_batch,
                                 "images_this_run": (step - start) * self.global_batch,
                                 "skipped_optimizer_steps": self.counts.skipped}
                manifest.notes = {"stage": config.stage, "steps_done": step, "resumed_from": start,
                                  "world_size": info.world_size,
                                  "homogeneous_steps_this_run": self.counts.homogeneous,
                                  **drawn, "teacher_path": teacher_path, "teacher_sha256": sha}
        barrier()
        return TrainResult(step, start, self.out, teacher_path)

    def _resume(self) -> tuple[int, int]:
        """Restore the latest checkpoint (returns its step and NaN streak), or start the recipe fresh."""
        latest = latest_checkpoint(self.ckpt_root) if self.config.checkpoint.resume else None
        if latest is None:
            self.recipe.start_fresh()
            return 0, 0
        m = self.recipe.checkpoint_models()
        start, rank_state = load_checkpoint(latest, m.student, m.teacher, m.optimizer, self.info, extra=m.extra,
                                            subdir=m.subdir, group=m.group)
        self.loader.load_state_dict(rank_state["loader"])
        set_rng_state(rank_state["rng"])
        return start, int(rank_state["nan_streak"])

    def _loop(self, start: int, nan_streak: int) -> int:
        """Step from ``start`` to ``self.end``; returns the completed step count."""
        config, info = self.config, self.info
        schedules = Schedules(config.optim, self.global_batch, config.loss)
        bar = progress(self.end, self.recipe.label, unit="step", initial=start) if info.is_main else None
        step, feed = start, DeviceFeed(iter(self.loader), info.device)
        try:
            while step < self.end:
                t0 = time.perf_counter()
                batch = feed.take()
                if batch["step"] != step:
                    raise RuntimeError(f"loader is at step {batch['step']}, the trainer at {step}")
                if prefetches(config) and step + 1 < self.end and not self._checkpoint_due(step + 1):
                    feed.prefetch()
                hp = schedules.at(step)
                outcome = self.recipe.step(batch, hp, step)
                nan_streak = 0 if outcome.finite else nan_streak + 1
                self.counts.add(batch["homogeneous"], outcome.finite)
                step += 1
                if info.is_main:
                    self.metrics.append(self._record(step - 1, hp, outcome, batch["homogeneous"],
                                                     time.perf_counter() - t0))
                    bar.update(1)
                    bar.set_postfix(loss=f"{outcome.loss:.4f}", lr=f"{hp.lr:.2e}")
                if nan_streak >= config.nan_patience:
                    raise TrainingDiverged(
                        f"loss is NaN/inf on {nan_streak} consecutive steps (last: step {step - 1}); stopping. "
                        f"Last checkpoint: {latest_checkpoint(self.ckpt_root) or 'none'}. Lower optim.lr or check "
                        "the data."
                    )
                if self._checkpoint_due(step):
                    self._checkpoint(step, nan_streak)
        finally:
            if bar is not None:
                bar.close()
            if info.is_main:
                self.metrics.flush()
        return step

    def _checkpoint_due(self, steps_done: int) -> bool:
        return steps_done % self.config.checkpoint.period == 0 or steps_done == self.end

    def _record(self, step: int, hp: StepHyperParams, outcome: StepOutcome, homogeneous: bool,
                seconds: float) -> dict:
        """The step's metrics row: schedules, the recipe's fields, throughput and the guard's verdict."""
        return {
            "step": step, "lr": hp.lr, "last_layer_lr": hp.last_layer_lr, "weight_decay": hp.weight_decay,
            "momentum": hp.momentum, "teacher_temp": hp.teacher_temp, "dino_local_weight": hp.dino_local_weight,
            **outcome.record,
            "images_per_s": self.global_batch / seconds, "images_seen": (step + 1) * self.global_batch,
            "homogeneous": bool(homogeneous), "skipped_optimizer_step": not outcome.finite,
        }

    def _checkpoint(self, step: int, nan_streak: int) -> None:
        """Save after ``step`` steps (every metrics row before it is stored first), then score it."""
        if self.info.is_main:
            self.metrics.flush()
        m = self.recipe.checkpoint_models()
        rank_state = {"loader": self.loader.state_dict(), "rng": rng_state(), "nan_streak": nan_streak}
        save_checkpoint(self.ckpt_root, step, m.student, m.teacher, m.optimizer, rank_state, self.info,
                        self.config.checkpoint.keep_last, extra=m.extra, subdir=m.subdir, group=m.group)
        if self.evals.names:
            self._score(step)

    def _score(self, step: int) -> None:
        """Score checkpoint ``step`` (collective) and log the row on rank 0."""
        scores = self.recipe.evaluate(self.evals)
        if self.info.is_main:
            self.evals_log.append({"step": step, **scores})
            self.evals_log.flush()
            log.info("checkpoint %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))

    def _export(self, step: int) -> tuple[str | None, str | None]:
        """Export the trained backbone once the schedule is done; returns its path and (writer) sha256."""
        if not self.config.export_teacher or step < self.config.optim.iterations:
            return None, None
        target = self.recipe.export_target(self.out)
        sha = export_teacher(target.backbone, target.vit, target.path, target.writer, subgroup=target.subgroup,
                             input_spec=input_spec_of(self.config))
        return target.path, sha

    def _images_by_part(self) -> dict[str, dict[str, int]]:
        """Images the loaders of all ranks drew per part over the whole run, and bad images they replaced.

        Read from the samplers' counters (checkpointed with the run), summed over the world.
        """
        sampler, skipped = self.loader.sampler, self.loader.skipped
        parts = sorted(sampler.positions)
        local = [sampler.positions[p] for p in parts] + [skipped.get(p, 0) for p in parts]
        totals = torch.tensor(local, dtype=torch.float64, device=self.info.device)
        if dist.is_initialized():
            dist.all_reduce(totals)
        values = [int(v) for v in totals.tolist()]
        return {"images_by_part": dict(zip(parts, values[: len(parts)])),
                "bad_images_replaced": dict(zip(parts, values[len(parts):]))}


def _inputs(data: TrainingData) -> dict[str, object]:
    """What the manifest records of the data: the catalog, its mix, the merged plan, the parts' shards."""
    plan = data.plan
    return {"catalog": data.root, "mix": plan.recorded.to_json() if plan.recorded else None,
            "plan": {"parts": plan.parts, "weights": plan.weights, "homogeneous_part": plan.homogeneous_part,
                     "p_homogeneous": plan.p_homogeneous},
            "parts": data.fingerprints()}


class _Counts:
    """Steps of this invocation that were homogeneous or skipped, for the run manifest."""

    def __init__(self) -> None:
        self.homogeneous = 0
        self.skipped = 0

    def add(self, homogeneous: bool, finite: bool) -> None:
        self.homogeneous += bool(homogeneous)
        self.skipped += not finite
