"""The trainer's config: one dataclass tree, loaded with ``catalog.config.load_config``.

Defaults are the DINOv3 ViT-L/16-style recipe (DINO/iBOT heads 65536/256/2048, 2 global 224 + 8 local
96 crops, AdamW (0.9, 0.99), constant-after-warmup schedules, lr scaled by the sqrt rule wrt 1024).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from catalog.config import load_config
from catalog.names import check_name
from training.models import MODEL_SIZES, ViTConfig


@dataclass
class HeadConfig:
    n_prototypes: int = 65536
    bottleneck_dim: int = 256
    hidden_dim: int = 2048
    n_layers: int = 3


@dataclass
class ModelConfig:
    """The architecture: a named size, and the options the recipe sets on top of it.

    ``drop_path_rate`` overrides the size's stochastic-depth rate (DINOv3: 0.3 default, 0.4 for 7B,
    0 for distilled students). RoPE options (reference: ``student.pos_embed_rope_*``):
    ``rope_normalize_coords`` divides patch coordinates by each side (``separate``, the default) or by
    the shorter (``min``) or longer (``max``) side for both axes; ``rope_min_period`` and
    ``rope_max_period`` (both or neither) replace the size's ``base`` parametrisation by periods
    spaced geometrically from min to max.
    """

    size: str = "dinov3_vitl16"  # a key of training.models.MODEL_SIZES
    drop_path_rate: float = 0.0
    rope_normalize_coords: Literal["separate", "min", "max"] = "separate"
    rope_min_period: float | None = None
    rope_max_period: float | None = None
    dino_head: HeadConfig = field(default_factory=HeadConfig)
    ibot_head: HeadConfig = field(default_factory=HeadConfig)


def vit_config(model: ModelConfig) -> ViTConfig:
    """The architecture of ``model``: its named size with the configured stochastic depth and RoPE options."""
    if model.size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {model.size!r}; known: {', '.join(MODEL_SIZES)}")
    size = MODEL_SIZES[model.size]
    periods = (model.rope_min_period, model.rope_max_period)
    if (periods[0] is None) != (periods[1] is None):
        raise ValueError("model.rope_min_period and model.rope_max_period must be set together")
    rope: dict = {"rope_normalize_coords": model.rope_normalize_coords}
    if periods[0] is not None:
        rope |= {"rope_base": None, "rope_min_period": periods[0], "rope_max_period": periods[1]}
    return dataclasses.replace(size, drop_path_rate=model.drop_path_rate, **rope)


@dataclass
class CropsConfig:
    global_size: int = 224
    local_size: int = 96
    n_local: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    horizontal_flip: bool = True
    blur_probabilities: Literal["effective", "written"] = "effective"
    mask_ratio_range: tuple[float, float] = (0.1, 0.5)
    mask_sample_probability: float = 0.5


@dataclass
class ScheduleConfig:
    """One per-iteration value: a warmup ``start -> peak``, then ``peak -> end``, then ``end``.

    ``kind`` (all three follow the reference schedulers value for value):

    - ``cosine``: DINOv3's ``linear_warmup_cosine_decay`` (its "schedules v2"). Warmup
      ``linspace(start, peak, warmup_iterations, endpoint=False)``, then ``cosine_iterations`` points of a
      half-cosine ``peak -> end`` with both ends included (the value is ``end`` exactly at its last
      point), then ``end``. A ramp up is the same shape with ``peak < end`` (the Gram weight, the
      high-res lr).
    - ``constant``: the same warmup, then ``peak`` (v2 with ``end == peak``).
    - ``dinov2_cosine``: DINOv2's ``CosineScheduler`` (DINOv3's v1 schedules, for DINOv2 recipes).
      Warmup ``linspace(start, peak, warmup_iterations)`` *with* its endpoint, then a cosine whose
      progress is ``(i - W) / C``, so it stops one step short of ``end``; ``end`` from ``W + C`` on.
      An lr schedule of this kind has only its peak scaled by the batch rule (v1 scales ``lr``, not
      ``min_lr``).

    ``cosine_iterations`` (the reference's ``cosine_epochs`` in iterations): length of the cosine part;
    ``None``: every iteration after the warmup.
    """

    kind: Literal["constant", "cosine", "dinov2_cosine"] = "constant"
    start: float = 0.0
    peak: float = 0.0
    end: float = 0.0
    warmup_iterations: int = 0
    cosine_iterations: int | None = None


@dataclass
class OptimConfig:
    iterations: int = 100_000
    batch_size_per_rank: int = 32
    lr: ScheduleConfig = field(default_factory=lambda: ScheduleConfig("constant", 0.0, 5e-5, 5e-5, 100_000))
    lr_scaling: Literal["sqrt_wrt_1024", "linear_wrt_256", "none"] = "sqrt_wrt_1024"
    weight_decay: ScheduleConfig = field(default_factory=lambda: ScheduleConfig("constant", 0.04, 0.04, 0.04, 0))
    momentum: ScheduleConfig = field(default_factory=lambda: ScheduleConfig("constant", 0.994, 0.994, 0.994, 0))
    teacher_temp: ScheduleConfig = field(default_factory=lambda: ScheduleConfig("constant", 0.04, 0.07, 0.07, 100_000))
    betas: tuple[float, float] = (0.9, 0.99)
    layerwise_decay: float = 0.98
    patch_embed_lr_mult: float = 0.2
    freeze_last_layer_iterations: int = 5000
    clip_grad: float | None = 30.0  # per module (backbone, dino head, ibot head); None: no clipping


@dataclass
class LossConfig:
    """Weights and options of the loss terms (the reference's keys in brackets).

    ``dino_local_weight`` [``dino.local_loss_weight_schedule``]: extra factor on the local-crop DINO
    term per iteration; the Gram stage takes it 1 -> 0.5 on a half-cosine over its first 1000
    iterations, the high-res stage holds it at 0.5. ``koleo_group_size``
    [``dino.koleo_distributed_loss_group_size``]: set, KoLeo is the distributed variant whose
    neighbours come from consecutive groups of this many samples of the global batch.
    ``koleo_topk`` [``dino.koleo_topk``]: neighbours per sample (the loss averages over all of them).
    """

    dino_weight: float = 1.0
    koleo_weight: float = 0.1  # per global crop, so the KoLeo term is weight x n_global x mean over crops
    ibot_weight: float = 1.0
    student_temp: float = 0.1
    sinkhorn_iterations: int = 3
    dino_local_weight: ScheduleConfig = field(default_factory=lambda: ScheduleConfig("constant", 1.0, 1.0, 1.0, 0))
    koleo_group_size: int | None = None
    koleo_topk: int = 1


def _gram_ramp() -> ScheduleConfig:
    return ScheduleConfig("cosine", 0.0, 0.0, 2.0, 0, cosine_iterations=1000)


@dataclass
class GramConfig:
    """Gram anchoring (stages ``gram`` and ``highres``): a frozen Gram teacher anchors the student's patch Grams.

    ``weight`` [``gram.loss_weight_schedule``] is the weight per iteration of the stage (default: the
    7B recipe's half-cosine 0 -> 2 over 1000 iterations). The Gram teacher starts as the EMA teacher
    backbone of ``checkpoint`` (a checkpoint dir or a run dir, its latest; empty: the EMA teacher this
    stage starts from) and is replaced by a copy of the EMA teacher after iteration ``it`` when
    ``it+1 >= first_update`` and ``(it+1) % update_period == 0``, at most ``max_updates`` times (0:
    never refreshed). ``normalized``: L2-normalise patch tokens before the Grams (off: raw inner
    products). ``remove_neg``: clamp the negative similarities of both Grams to 0.
    ``remove_only_teacher_neg``: clamp the teacher's negatives to 0 and zero the student's entries where
    both are negative, so a pair both Grams find dissimilar costs nothing (the option's intent; the
    reference's code zeroes the teacher first, which leaves its student mask empty).
    """

    weight: ScheduleConfig = field(default_factory=_gram_ramp)
    checkpoint: str = ""
    update_period: int = 10_000
    first_update: int = 10_000
    max_updates: int = 3
    reduction: Literal["mean", "frobenius"] = "mean"  # mean: reference code; frobenius: paper (sum per Gram)
    img_level: bool = True  # one P x P Gram per image (7B recipe), else one Gram over the local batch
    normalized: bool = True
    remove_neg: bool = False
    remove_only_teacher_neg: bool = False
    teacher_size: int | None = None  # Gram-teacher crop side (recipe: 2x the global crop); None: the global crops


@dataclass
class Resolution:
    """One (global, local, Gram-teacher) crop-size choice of the high-resolution stage."""

    global_size: int
    local_size: int
    gram_size: int | None
    probability: float


@dataclass
class HighResConfig:
    """Per-step mixed resolutions; the choice is a pure function of (seed, step), so all ranks agree."""

    resolutions: list[Resolution] = field(default_factory=list)


@dataclass
class InitConfig:
    """Where a stage's weights come from when it has no checkpoint of its own yet.

    ``checkpoint``: a checkpoint dir, or a run dir (its latest checkpoint). ``student_from``: which
    model of it initialises the student (the recipe's high-res stage starts from the teacher); the
    EMA teacher always starts from the checkpoint's teacher. The optimizer starts fresh.
    """

    checkpoint: str = ""
    student_from: Literal["student", "teacher"] = "student"


@dataclass
class StudentConfig:
    name: str
    model: ModelConfig
    ranks: int  # size of this student's process group (contiguous ranks, in list order)


@dataclass
class DistillConfig:
    """Multi-student distillation: a frozen ``teacher`` trains every student on the full global batch.

    The teacher is FSDP-sharded over the whole world and runs once per global batch; each student has
    its own process group, EMA and checkpoint subfolder. ``teacher_checkpoint``: checkpoint or run dir
    whose EMA teacher (backbone + heads) is the frozen teacher.
    """

    teacher_model: ModelConfig = field(default_factory=ModelConfig)
    teacher_checkpoint: str = ""
    students: list[StudentConfig] = field(default_factory=list)


@dataclass
class CheckpointConfig:
    period: int = 1000  # save every `period` steps (and at the end)
    keep_last: int = 3
    resume: bool = True  # continue from the latest checkpoint in output_dir/ckpt if there is one


@dataclass
class DataConfig:
    """Where the images come from and how steps mix them.

    ``catalog_root`` is enough when ``curate mix`` wrote ``<catalog>/_mix.json``: the run trains on the
    mix's parts with its weights, homogeneous part and probability. Each of the four keys below, when
    set, replaces the mix's value (unset: empty list / null); with ``parts`` set, the mix's weights and
    homogeneous part are kept for the listed parts only. Without a mix: ``parts`` is required, weights
    default to the part sizes and there is no homogeneous part. ``homogeneous_part: ""`` means none.
    """

    catalog_root: str = ""
    parts: list[str] = field(default_factory=list)  # read from the catalog tables curated/<part>
    weights: dict[str, float] | None = None  # heterogeneous mix weights
    homogeneous_part: str | None = None
    p_homogeneous: float | None = None
    num_workers: int = 0
    max_pixels: int | None = None
    pin_memory: bool | None = None  # None: on CUDA (`training.train.data.pins_memory`)
    device_prefetch: bool | None = None  # copy the next batch during the step; None: on CUDA (`prefetches`)

    def __post_init__(self) -> None:
        for name in [*self.parts, *(self.weights or {}), *([self.homogeneous_part] if self.homogeneous_part else [])]:
            check_name(name, "data part")


@dataclass
class EvalConfig:
    """Checks of the EMA teacher at every checkpoint, one row per checkpoint in ``evals.jsonl``.

    ``knn_folder``: labelled images ``<folder>/<label>/<image>`` scored by leave-one-out k-NN accuracy
    (demo: ``<pool>/seed``). ``dense_probe``: an ``.npz`` of ``images`` [n,H,W,3] uint8 and ``masks``
    [n,H,W] class maps; a linear per-patch probe fits on the first half and is scored (mIoU) on the
    second (demo: ``<pool>/truth/dense_probe.npz``). Empty: off. ``image_size``: side of the k-NN
    images (0: ``crops.global_size``).
    """

    knn_folder: str = ""
    dense_probe: str = ""
    image_size: int = 0


@dataclass
class TrainConfig:
    stage: Literal["pretrain", "gram", "highres", "distill"] = "pretrain"  # `curate train --stage` sets it
    output_dir: str = "runs/train"
    device: Literal["cpu", "cuda"] = "cpu"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    data: DataConfig = field(default_factory=DataConfig)
    init: InitConfig = field(default_factory=InitConfig)
    gram: GramConfig = field(default_factory=GramConfig)
    highres: HighResConfig = field(default_factory=HighResConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 compute on CUDA, fp32 on CPU
    compile: bool = False
    activation_checkpointing: bool = False
    nan_patience: int = 2  # stop after this many consecutive steps with a NaN/inf loss
    dist_timeout_s: int = 1800
    export_teacher: bool = True  # write output_dir/teacher_backbone.safetensors at the end
    max_steps: int | None = None  # stop this invocation early (the schedules still span optim.iterations)


def load_train_config(path: str | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    config = load_config(TrainConfig, path, overrides)
    check_stage(config)
    return config


def check_schedules(config: TrainConfig) -> None:
    """A schedule whose cosine part outlasts the run would never reach its ``end``: refuse it at start-up."""
    named = {"optim.lr": config.optim.lr, "optim.weight_decay": config.optim.weight_decay,
             "optim.momentum": config.optim.momentum, "optim.teacher_temp": config.optim.teacher_temp,
             "loss.dino_local_weight": config.loss.dino_local_weight}
    if config.stage in ("gram", "highres"):
        named["gram.weight"] = config.gram.weight
    for name, schedule in named.items():
        if schedule.cosine_iterations is None or schedule.kind == "constant":
            continue
        span = schedule.warmup_iterations + schedule.cosine_iterations
        if schedule.cosine_iterations < 0 or span > config.optim.iterations:
            raise ValueError(f"{name}: warmup {schedule.warmup_iterations} + cosine {schedule.cosine_iterations} "
                             f"iterations must fit in optim.iterations={config.optim.iterations} (cosine >= 0)")
    if config.loss.koleo_topk < 1:
        raise ValueError(f"loss.koleo_topk must be >= 1, got {config.loss.koleo_topk}")


def check_stage(config: TrainConfig) -> None:
    """Fail at start-up when a stage lacks what it needs."""
    check_schedules(config)
    if config.stage == "highres":
        if not config.highres.resolutions:
            raise ValueError("stage 'highres' needs highres.resolutions")
        if abs(sum(r.probability for r in config.highres.resolutions) - 1.0) > 1e-6:
            raise ValueError("highres.resolutions probabilities must sum to 1")
    if config.stage == "distill":
        if not config.distill.students:
            raise ValueError("stage 'distill' needs distill.students")
        if not config.distill.teacher_checkpoint:
            raise ValueError("stage 'distill' needs distill.teacher_checkpoint")
        check_students(config.distill)


def check_students(distill: DistillConfig) -> None:
    """Every student must predict the teacher's prototypes on the teacher's patch grid."""
    teacher = distill.teacher_model
    patch = vit_config(teacher).patch_size
    for s in distill.students:
        for head in ("dino_head", "ibot_head"):
            ours, theirs = getattr(s.model, head).n_prototypes, getattr(teacher, head).n_prototypes
            if ours != theirs:
                raise ValueError(f"distill student {s.name!r}: {head}.n_prototypes is {ours}, the teacher's is "
                                 f"{theirs} (the targets are the teacher's prototypes)")
        if vit_config(s.model).patch_size != patch:
            raise ValueError(f"distill student {s.name!r}: patch size {vit_config(s.model).patch_size} differs "
                             f"from the teacher's {patch}")
        if s.ranks < 1:
            raise ValueError(f"distill student {s.name!r}: ranks must be >= 1")
