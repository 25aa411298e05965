"""The trainer's config: one dataclass tree, loaded with ``catalog.config.load_config``.

Defaults are the DINOv3 ViT-L/16-style recipe (DINO/iBOT heads 65536/256/2048, 2 global 224 + 8 local
96 crops, AdamW (0.9, 0.99), constant-after-warmup schedules, lr scaled by the sqrt rule wrt 1024).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from catalog.config import load_config


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
    """Linear warmup ``start -> peak`` over ``warmup_iterations``, then constant ``peak`` or cosine ``peak -> end``."""

    kind: Literal["constant", "cosine"] = "constant"
    start: float = 0.0
    peak: float = 0.0
    end: float = 0.0
    warmup_iterations: int = 0


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


@dataclass
class CheckpointConfig:
    period: int = 1000  # save every `period` steps (and at the end)
    keep_last: int = 3
    resume: bool = True  # continue from the latest checkpoint in output_dir/ckpt if there is one


@dataclass
class DataConfig:
    catalog_root: str = ""
    parts: list[str] = field(default_factory=list)  # read from the catalog tables curated/<part>
    weights: dict[str, float] | None = None  # heterogeneous mix weights; None: by part size
    homogeneous_part: str | None = None
    p_homogeneous: float = 0.1
    num_workers: int = 0
    max_pixels: int | None = None


@dataclass
class TrainConfig:
    output_dir: str = "runs/train"
    device: Literal["cpu", "cuda"] = "cpu"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    data: DataConfig = field(default_factory=DataConfig)
    compile: bool = False
    activation_checkpointing: bool = False
    nan_patience: int = 2  # stop after this many consecutive steps with a NaN/inf loss
    dist_timeout_s: int = 1800
    export_teacher: bool = True  # write output_dir/teacher_backbone.safetensors at the end
    max_steps: int | None = None  # stop this invocation early (the schedules still span optim.iterations)


def load_train_config(path: str | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    return load_config(TrainConfig, path, overrides)
