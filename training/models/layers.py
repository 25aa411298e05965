"""ViT building blocks; module/parameter names mirror the official DINOv2/DINOv3 state dicts."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.models.config import ViTConfig
from training.models.rope import apply_rope


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection; returns tokens [B, h*w, D] in row-major order and (h, w)."""

    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return x.flatten(2).transpose(1, 2), (h, w)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


def k_bias_mask(dim: int) -> Tensor:
    """DINOv3's qkv bias mask: keep the Q and V biases, zero the K bias (it cancels in softmax)."""
    return torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)])


class QKV(nn.Linear):
    """Fused qkv projection; with `mask_k_bias` the K third of the bias is multiplied by `bias_mask`."""

    def __init__(self, dim: int, bias: bool, mask_k_bias: bool) -> None:
        super().__init__(dim, 3 * dim, bias=bias)
        self.masked = bias and mask_k_bias
        if self.masked:
            self.register_buffer("bias_mask", torch.empty(3 * dim), persistent=True)
            if not self.bias_mask.is_meta:
                self.bias_mask.copy_(k_bias_mask(dim))

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias * self.bias_mask.to(self.bias.dtype) if self.masked else self.bias
        return F.linear(x, self.weight, bias)


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = QKV(cfg.embed_dim, cfg.qkv_bias, cfg.mask_k_bias)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """`rope` (sin, cos) [N_patch, head_dim] rotates the last N_patch tokens only."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            sin, cos = rope
            prefix = n - sin.shape[0]
            q = torch.cat([q[:, :, :prefix], apply_rope(q[:, :, prefix:], sin, cos)], dim=2)
            k = torch.cat([k[:, :, :prefix], apply_rope(k[:, :, prefix:], sin, cos)], dim=2)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLUFused(nn.Module):
    """DINOv2 layout: `w12` projects to [gate | value] in one matmul."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class SwiGLU(nn.Module):
    """DINOv3 layout: separate gate `w1` and value `w2` projections."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


def make_ffn(cfg: ViTConfig) -> nn.Module:
    if cfg.ffn == "mlp":
        return Mlp(cfg.embed_dim, cfg.ffn_hidden_dim)
    if cfg.swiglu_layout == "w12":
        return SwiGLUFused(cfg.embed_dim, cfg.ffn_hidden_dim)
    return SwiGLU(cfg.embed_dim, cfg.ffn_hidden_dim)


def sample_drop_residual(
    x: Tensor, branch: Callable[[Tensor], Tensor], rate: float, generator: torch.Generator | None
) -> Tensor:
    """DINOv3's stochastic depth ("sample drop") of one residual branch: ``x + branch(x)`` for a subset.

    A fixed ``max(int(B * (1 - rate)), 1)`` samples, drawn without replacement, run the branch; their
    outputs are added back scaled by ``B / kept`` and the other samples pass through unchanged. The
    branch only computes the kept samples, which is where the speed-up comes from.
    """
    b = x.shape[0]
    kept = max(int(b * (1 - rate)), 1)
    index = torch.randperm(b, generator=generator)[:kept].to(x.device)
    return torch.index_add(x, 0, index, branch(x[index]).to(x.dtype), alpha=b / kept)


class Block(nn.Module):
    """Pre-norm transformer block: x += ls1(attn(norm1 x)); x += ls2(mlp(norm2 x))."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ls1 = LayerScale(d, cfg.layerscale_init) if cfg.layerscale_init is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.mlp = make_ffn(cfg)
        self.ls2 = LayerScale(d, cfg.layerscale_init) if cfg.layerscale_init is not None else nn.Identity()
        self.drop_path_rate = cfg.drop_path_rate  # same rate in every block, as DINOv3

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        def attention(t: Tensor) -> Tensor:
            return self.ls1(self.attn(self.norm1(t), rope))

        def ffn(t: Tensor) -> Tensor:
            return self.ls2(self.mlp(self.norm2(t)))

        if self.training and self.drop_path_rate > 0:
            x = sample_drop_residual(x, attention, self.drop_path_rate, generator)
            return sample_drop_residual(x, ffn, self.drop_path_rate, generator)
        x = x + attention(x)
        return x + ffn(x)
