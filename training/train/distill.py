"""Multi-student distillation: one frozen teacher trains several students of other sizes in one run.

The world is split into contiguous rank ranges, one process group per student (``distill.students``).
Every rank loads ``batch_size_per_rank`` images; the frozen teacher, sharded over the whole world, runs
once per global batch (each rank forwards its own slice) up to the heads' L2-normalised bottlenecks.
Crops, iBOT masks and those small bottleneck features are all-gathered over the world, and each rank
of a student group takes its contiguous share of the *full* global batch, so every student trains on
every image while adding a student costs only that student's compute. The teacher's prototype layers
then run on the rank's share and Sinkhorn-Knopp centres within the student's group. Students see the
unmasked global crops (iBOT still at the mask positions) and keep their own EMA, which is exported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from catalog.paths import join
from training.losses import sinkhorn_knopp
from training.train.checkpoint import load_models, resolve_checkpoint
from training.train.config import StudentConfig, TrainConfig, vit_config
from training.train.distributed import DistInfo, build_models, prepare_model
from training.train.evals import CheckpointEvals
from training.train.meta_arch import FIELDS, SSLModel, student_losses
from training.train.optim import apply_hyper_params, build_optimizer, clip_gradients, ema_update
from training.train.recipe import CheckpointModels, ExportTarget, StepOutcome
from training.train.run_state import TEACHER_FILE, step_generator
from training.train.schedules import StepHyperParams

STUDENTS_DIR = "students"


@dataclass(frozen=True)
class StudentSlot:
    """The student this rank trains and its process group."""

    index: int
    spec: StudentConfig
    group: dist.ProcessGroup | None
    group_rank: int
    group_size: int


def student_slot(config: TrainConfig, info: DistInfo) -> StudentSlot:
    """Create one process group per student (every rank creates all, in order) and return this rank's."""
    students = config.distill.students
    sizes = [s.ranks for s in students]
    if sum(sizes) != info.world_size:
        raise ValueError(f"distill.students ranks {sizes} must add up to the world size {info.world_size}")
    if any((config.optim.batch_size_per_rank * info.world_size) % n for n in sizes):
        raise ValueError(f"the global batch must split evenly over every student's ranks {sizes}")
    start, mine = 0, None
    for index, (spec, n) in enumerate(zip(students, sizes)):
        ranks = list(range(start, start + n))
        group = dist.new_group(ranks) if dist.is_initialized() else None
        if info.rank in ranks:
            mine = StudentSlot(index, spec, group, info.rank - start, n)
        start += n
    assert mine is not None
    return mine


def build_frozen_teacher(config: TrainConfig, info: DistInfo) -> SSLModel:
    """The distillation teacher (backbone + heads) from ``distill.teacher_checkpoint``, sharded over the world."""
    model = config.distill.teacher_model
    with torch.device("meta"):
        teacher = SSLModel(vit_config(model), model.dino_head, model.ibot_head, seed=0)
    teacher.requires_grad_(False)
    teacher = prepare_model(teacher.eval(), info)
    if any(p.is_meta for p in teacher.parameters()):
        teacher.to_empty(device=info.device)
    load_models(resolve_checkpoint(config.distill.teacher_checkpoint), [("teacher", teacher)])
    return teacher


class ForwardCounter:
    """Counts the calls and input crops of a module's forward (read back into the metrics)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.crops = 0
        module.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.calls += 1
        self.crops += int(args[0].shape[0])

    def take(self) -> list[int]:
        values = [self.calls, self.crops]
        self.calls = self.crops = 0
        return values


def gather_images(x: Tensor) -> Tensor:
    """``[S, B, ...]`` per rank -> ``[S, world·B, ...]`` (images in rank order) on every rank."""
    if not dist.is_initialized():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=1)


@torch.no_grad()
def teacher_bottlenecks(teacher: SSLModel, batch: dict) -> tuple[Tensor, Tensor]:
    """The teacher on this rank's global crops: DINO ``[S_g, B, d]`` and iBOT ``[S_g, B, N, d']`` bottlenecks."""
    n_images = batch["image_ids"].shape[0]
    out = teacher.backbone(batch["global_crops"])
    cls = teacher.dino_head.forward_bottleneck(out["cls"])
    patches = teacher.ibot_head.forward_bottleneck(out["patches"])
    return cls.unflatten(0, (-1, n_images)), patches.unflatten(0, (-1, n_images))


def student_share(batch: dict, teacher_cls: Tensor, teacher_patches: Tensor, slot: StudentSlot) -> tuple[dict, Tensor, Tensor]:
    """This rank's contiguous share of the all-gathered global batch, and the teacher bottlenecks of it."""
    n_images = batch["image_ids"].shape[0]
    gathered = {
        "global_crops": gather_images(batch["global_crops"].unflatten(0, (-1, n_images))),
        "local_crops": gather_images(batch["local_crops"].unflatten(0, (-1, n_images))),
        "masks": gather_images(batch["masks"].unflatten(0, (-1, n_images))),
        "image_ids": gather_images(batch["image_ids"][None])[0],
    }
    cls, patches = gather_images(teacher_cls), gather_images(teacher_patches)
    share = gathered["image_ids"].shape[0] // slot.group_size
    lo, hi = slot.group_rank * share, (slot.group_rank + 1) * share
    out = {k: (v[lo:hi] if k == "image_ids" else v[:, lo:hi].flatten(0, 1)) for k, v in gathered.items()}
    masks = out["masks"]
    per_crop = masks.sum(dim=1, keepdim=True).clamp(min=1).float()
    out["mask_indices"] = masks.flatten().nonzero().flatten()
    out["masks_weight"] = (1.0 / per_crop).expand_as(masks)[masks]
    return out, cls[:, lo:hi].flatten(0, 1), patches[:, lo:hi].flatten(0, 2)


@torch.no_grad()
def distill_targets(
    teacher: SSLModel, share: dict, cls: Tensor, patches: Tensor, temp: float, iterations: int, slot: StudentSlot
) -> tuple[Tensor, Tensor]:
    """Teacher prototypes on the share, Sinkhorn-centred over the student's group."""
    n_global = share["global_crops"].shape[0] // share["image_ids"].shape[0]
    dino = sinkhorn_knopp(teacher.dino_head.forward_last_layer(cls), temp, iterations, group=slot.group)
    masked = patches.index_select(0, share["mask_indices"])
    ibot = sinkhorn_knopp(teacher.ibot_head.forward_last_layer(masked), temp, iterations, group=slot.group)
    return dino.unflatten(0, (n_global, -1)), ibot


def _group_mean(values: Tensor, slot: StudentSlot) -> Tensor:
    if slot.group is not None:
        dist.all_reduce(values, group=slot.group)
        values /= slot.group_size
    return values


class DistillRecipe:
    """This rank's student (with its EMA and process group) and the frozen teacher shared by the world."""

    label = "distill"

    def __init__(self, config: TrainConfig, info: DistInfo) -> None:
        self.config, self.info = config, info
        self.slot = student_slot(config, info)
        self.names = [s.name for s in config.distill.students]
        self.teacher = build_frozen_teacher(config, info)
        self.counter = ForwardCounter(self.teacher.backbone)
        self.vit = vit_config(self.slot.spec.model)
        self.patch_size = vit_config(config.distill.teacher_model).patch_size
        self.student, self.ema = build_models(
            self.slot.spec.model, config.seed + self.slot.index, info, group=self.slot.group,
            activation_checkpointing=config.activation_checkpointing, compile=config.compile,
        )
        self.optimizer = build_optimizer(self.student, self.vit.depth, config.optim, info.device)

    def start_fresh(self) -> None:
        """Nothing to fill: the teacher was loaded when built, the students start from their seeds."""

    def checkpoint_models(self) -> CheckpointModels:
        return CheckpointModels(self.student, self.ema, self.optimizer, subdir=self.slot.spec.name,
                                group=self.slot.group)

    def step(self, batch: dict, hp: StepHyperParams, step: int) -> StepOutcome:
        """One teacher pass for the global batch, then each student's step on its share.

        A student whose group-mean loss is NaN/inf skips its AdamW and EMA update; the outcome is not
        finite when any student's loss is (the table is all-reduced, so every rank agrees).
        """
        config, slot = self.config, self.slot
        apply_hyper_params(self.optimizer, hp)
        cls, patches = teacher_bottlenecks(self.teacher, batch)
        share, cls, patches = student_share(batch, cls, patches, slot)
        dino_t, ibot_t = distill_targets(self.teacher, share, cls, patches, hp.teacher_temp,
                                         config.loss.sinkhorn_iterations, slot)
        losses = student_losses(self.student, share, dino_t, ibot_t, config.loss, mask_student=False,
                                generator=step_generator(config.seed, step, self.info.rank), koleo_group=slot.group,
                                local_weight=hp.dino_local_weight)
        losses.total.backward()
        grad_norms = clip_gradients(self.student, config.optim.clip_grad)
        values = _group_mean(losses.stacked(), slot)
        if math.isfinite(float(values[0])):
            self.optimizer.step()
            ema_update(self.ema, self.student, hp.momentum)
        self.optimizer.zero_grad(set_to_none=True)
        # One row per student (its group mean, counted once), plus the teacher's forward counters.
        table = torch.zeros(len(self.names), len(FIELDS) + 1, device=self.info.device)  # NCCL reduces device tensors
        if slot.group_rank == 0:
            table[slot.index, :-1] = values
            table[slot.index, -1] = grad_norms.get("backbone", 0.0)
        teacher_counts = torch.tensor(self.counter.take(), dtype=torch.float64, device=self.info.device)
        if dist.is_initialized():
            dist.all_reduce(table)
            dist.all_reduce(teacher_counts)
        record: dict[str, object] = {
            "teacher_forward_calls": int(teacher_counts[0]), "teacher_forward_crops": int(teacher_counts[1]),
            "global_batch": config.optim.batch_size_per_rank * self.info.world_size,
        }
        for i, name in enumerate(self.names):
            record.update({f"{name}/{f}": float(table[i, j]) for j, f in enumerate(FIELDS)})
            record[f"{name}/grad_norm_backbone"] = float(table[i, -1])
        totals = table[:, 0].tolist()
        return StepOutcome(record, sum(totals) / len(totals), all(math.isfinite(t) for t in totals))

    def evaluate(self, evals: CheckpointEvals) -> dict[str, float]:
        """Every student's EMA backbone scored, one field per ``<student>/<metric>``.

        Each group scores its own student (collective within the group); the group leaders' rows are
        summed over the world so rank 0 holds them all.
        """
        table = torch.zeros(len(self.names), len(evals.names), dtype=torch.float64, device=self.info.device)
        scores = evals(self.ema.backbone)
        if self.slot.group_rank == 0:
            table[self.slot.index] = torch.tensor([scores[k] for k in evals.names], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(table)
        return {f"{name}/{k}": float(table[i, j]) for i, name in enumerate(self.names) for j, k in enumerate(evals.names)}

    def export_target(self, output_dir: str) -> ExportTarget:
        path = join(output_dir, STUDENTS_DIR, self.slot.spec.name, TEACHER_FILE)
        return ExportTarget(self.ema.backbone, self.vit, path, self.slot.group_rank == 0, subgroup=True)
