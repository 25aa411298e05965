"""ViT configuration and the registry of named sizes (official DINOv2/DINOv3 releases + test sizes)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Literal

from catalog.decode import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class ViTConfig:
    """Everything that fixes the architecture (and so the state-dict layout) of a VisionTransformer.

    `family` picks the parameter naming of the official releases: "dinov2" stores registers as
    `register_tokens`, "dinov3" as `storage_tokens`. The FFN hidden width follows the releases:
    `int(D * ffn_ratio)` for "mlp"; for "swiglu" `int(D * ffn_ratio * 2 / 3)` rounded up to a
    multiple of `ffn_align`. `swiglu_layout` "w12" is DINOv2's fused `w12`/`w3`, "w1w2" DINOv3's
    `w1`/`w2`/`w3`. RoPE periods come from `rope_base` or from `rope_min_period`/`rope_max_period`
    (exactly one of the two); `rope_normalize_coords` is DINOv3's `normalize_coords`.
    """

    patch_size: int = 16
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    family: Literal["dinov2", "dinov3"] = "dinov3"
    n_registers: int = 4
    ffn: Literal["mlp", "swiglu"] = "mlp"
    ffn_ratio: float = 4.0
    ffn_align: int = 8
    swiglu_layout: Literal["w12", "w1w2"] = "w1w2"
    layerscale_init: float | None = 1e-5
    qkv_bias: bool = True
    mask_k_bias: bool = True
    norm_eps: float = 1e-5
    pos_encoding: Literal["learned", "rope"] = "rope"
    pos_embed_grid: int = 37
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False
    rope_base: float | None = 100.0
    rope_min_period: float | None = None
    rope_max_period: float | None = None
    rope_normalize_coords: Literal["separate", "min", "max"] = "separate"
    rope_shift: float | None = None
    rope_jitter: float | None = None
    rope_rescale: float | None = 2.0
    local_cls_norm: bool = False
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.pos_encoding == "rope" and self.head_dim % 4:
            raise ValueError(f"RoPE needs a head dim divisible by 4, got {self.head_dim}")
        both_periods = self.rope_min_period is not None and self.rope_max_period is not None
        if self.pos_encoding == "rope" and (self.rope_base is None) != both_periods:
            raise ValueError("RoPE needs either rope_base or both rope_min_period and rope_max_period, not both")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def ffn_hidden_dim(self) -> int:
        hidden = int(self.embed_dim * self.ffn_ratio)
        if self.ffn == "mlp":
            return hidden
        d = int(hidden * 2 / 3)
        return d + (-d % self.ffn_align)

    @property
    def register_key(self) -> str:
        return "register_tokens" if self.family == "dinov2" else "storage_tokens"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ViTConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        data = json.loads(text)
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"unknown ViTConfig fields {sorted(unknown)}")
        return cls(**data)


def _dinov2(embed_dim: int, depth: int, heads: int, registers: bool = False, **kw: object) -> ViTConfig:
    # Hub models: img 518 -> 37x37 pos grid, LayerScale 1.0, LayerNorm eps 1e-6. The `_reg` models
    # interpolate with antialias and no offset, the others with offset 0.1 and no antialias.
    base = dict(
        patch_size=14, embed_dim=embed_dim, depth=depth, num_heads=heads, family="dinov2",
        n_registers=4 if registers else 0, layerscale_init=1.0, qkv_bias=True, mask_k_bias=False,
        norm_eps=1e-6, pos_encoding="learned", pos_embed_grid=37,
        interpolate_offset=0.0 if registers else 0.1, interpolate_antialias=registers,
        swiglu_layout="w12", rope_rescale=None,
    )
    base.update(kw)
    return ViTConfig(**base)  # type: ignore[arg-type]


def _dinov3(embed_dim: int, depth: int, heads: int, **kw: object) -> ViTConfig:
    # Released ViTs: patch 16, 4 storage tokens, LayerNorm eps 1e-5, LayerScale 1e-5,
    # RoPE base 100 with rescale 2 in training, qkv bias with the K part masked.
    base = dict(
        patch_size=16, embed_dim=embed_dim, depth=depth, num_heads=heads, family="dinov3",
        n_registers=4, layerscale_init=1e-5, qkv_bias=True, mask_k_bias=True, norm_eps=1e-5,
        pos_encoding="rope", rope_base=100.0, rope_rescale=2.0, swiglu_layout="w1w2",
    )
    base.update(kw)
    return ViTConfig(**base)  # type: ignore[arg-type]


_SWIGLU6 = dict(ffn="swiglu", ffn_ratio=6.0)

MODEL_SIZES: dict[str, ViTConfig] = {
    "dinov2_vits14": _dinov2(384, 12, 6),
    "dinov2_vitb14": _dinov2(768, 12, 12),
    "dinov2_vitl14": _dinov2(1024, 24, 16),
    "dinov2_vitg14": _dinov2(1536, 40, 24, ffn="swiglu"),
    "dinov2_vits14_reg": _dinov2(384, 12, 6, registers=True),
    "dinov2_vitb14_reg": _dinov2(768, 12, 12, registers=True),
    "dinov2_vitl14_reg": _dinov2(1024, 24, 16, registers=True),
    "dinov2_vitg14_reg": _dinov2(1536, 40, 24, registers=True, ffn="swiglu"),
    "dinov3_vits16": _dinov3(384, 12, 6),
    "dinov3_vits16plus": _dinov3(384, 12, 6, **_SWIGLU6),
    "dinov3_vitb16": _dinov3(768, 12, 12),
    "dinov3_vitl16": _dinov3(1024, 24, 16),
    "dinov3_vitl16plus": _dinov3(1024, 24, 16, **_SWIGLU6),
    "dinov3_vith16plus": _dinov3(1280, 32, 20, **_SWIGLU6),
    "dinov3_vit7b16": _dinov3(
        4096, 40, 32, ffn="swiglu", ffn_ratio=3.0, ffn_align=64, qkv_bias=False, local_cls_norm=True
    ),
    # Tiny sizes for tests: official key layouts at a size a 2-core CI machine can run.
    "dinov2_vittest14": _dinov2(64, 2, 2, pos_embed_grid=4),
    "dinov2_vittest14_reg": _dinov2(64, 2, 2, registers=True, pos_embed_grid=4, ffn="swiglu"),
    "dinov3_vittest16": _dinov3(64, 2, 2, ffn="swiglu", ffn_ratio=3.0, local_cls_norm=True),
    # Our own tiny sizes for trainer/pipeline tests.
    "vit_test": _dinov3(64, 2, 2),
    # The demo backbone: patch 8 so 64 px images still give an 8x8 grid; trains in minutes on CPU.
    "vit_demo": _dinov3(128, 4, 2, patch_size=8),
    "vit_test14": _dinov2(64, 2, 2, pos_embed_grid=16, layerscale_init=1e-5),
}


@dataclass(frozen=True)
class InputSpec:
    """The pixels a backbone expects: square side, and the mean/std it was trained with."""

    size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_json(self) -> dict[str, object]:
        return {"size": self.size, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> InputSpec:
        return cls(int(data["size"]), tuple(data["mean"]), tuple(data["std"]))  # type: ignore[arg-type]


# Each registry entry's default preprocessing (`curate embed` uses it unless image_size is given): the
# official releases are evaluated at 224 px with ImageNet statistics; the demo backbone at 64 px.
MODEL_INPUTS: dict[str, InputSpec] = {name: InputSpec() for name in MODEL_SIZES} | {"vit_demo": InputSpec(size=64)}
