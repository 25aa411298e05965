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
from training.models import MODEL_SIZES, ViTConfig


@dataclass
class HeadConfig:
    n_prototypes: int = 65536
    bottleneck_dim: int = 256
    hidden_dim: int = 2048
    n_layers: int = 3


@dataclass
class ModelConfig:
    size: str = "dinov3_vitl16"  # a key of training.models.MODEL_SIZES
    drop_path_rate: float = 0.0  # overrides the size's stochastic-depth rate (DINOv3: 0.3 default, 0.4 for 7B)
    dino_head: HeadConfig = field(default_factory=HeadConfig)
    ibot_head: HeadConfig = field(default_factory=HeadConfig)


def vit_config(model: ModelConfig) -> ViTConfig:
    """The architecture of ``model``: its named size with the configured stochastic-depth rate."""
    if model.size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {model.size!r}; known: {', '.join(MODEL_SIZES)}")
    return dataclasses.replace(MODEL_SIZES[model.size], drop_path_rate=model.drop_path_rate)


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
    """Warmup ``start -> peak`` over ``warmup_iterations``, then constant ``peak`` or cosine ``peak -> end``.

    The warmup is linear (DINOv3's lr, teacher temperature) or a half-cosine ramp (``warmup_shape:
    cosine``, the recipe's Gram-loss weight ramp).
    """

    kind: Literal["constant", "cosine"] = "constant"
    start: float = 0.0
    peak: float = 0.0
    end: float = 0.0
    warmup_iterations: int = 0
    warmup_shape: Literal["linear", "cosine"] = "linear"


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
    dino_weight: float = 1.0
    koleo_weight: float = 0.1  # per global crop, so the KoLeo term is weight x n_global x mean over crops
    ibot_weight: float = 1.0
    student_temp: float = 0.1
    sinkhorn_iterations: int = 3
    # Extra factor on the local DINO term, per iteration (recipe: cosine 1 -> 0.5 over the Gram stage, 0.5 in high-res).
    dino_local_weight: ScheduleConfig = field(default_factory=lambda: ScheduleConfig("constant", 1.0, 1.0, 1.0, 0))
    koleo_group_size: int | None = None  # set: distributed KoLeo over groups of this many global-batch samples


@dataclass
class GramConfig:
    """Gram anchoring (stages ``gram`` and ``highres``): a frozen Gram teacher anchors the student's patch Grams.

    The weight is 0 before ``start_iteration`` and follows ``weight`` (evaluated at ``it - start_iteration``)
    from there. The Gram teacher starts as the EMA teacher backbone of ``checkpoint`` (a checkpoint dir or a
    run dir, its latest; empty: the EMA teacher this stage starts from) and is replaced by a copy of the EMA
    teacher after iteration ``it`` when ``it+1 >= first_update`` and ``(it+1) % update_period == 0``, at most
    ``max_updates`` times (0: never refreshed).
    """

    weight: ScheduleConfig = field(default_factory=lambda: ScheduleConfig("constant", 0.0, 2.0, 2.0, 1000))
    start_iteration: int = 0
    checkpoint: str = ""
    update_period: int = 10_000
    first_update: int = 10_000
    max_updates: int = 3
    reduction: Literal["mean", "frobenius"] = "mean"  # mean: reference code; frobenius: paper (sum per Gram)
    img_level: bool = True  # one P x P Gram per image (7B recipe), else one Gram over the local batch
    remove_neg: bool = False
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


def check_stage(config: TrainConfig) -> None:
    """Fail at start-up when a stage lacks what it needs."""
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
