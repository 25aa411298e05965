"""The one Vision Transformer of the house: DINOv2 (learned pos-embed) and DINOv3 (RoPE) layouts."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.models.config import ViTConfig
from training.models.layers import QKV, Block, LayerScale, PatchEmbed, k_bias_mask
from training.models.rope import RopePositionEmbedding

Pooling = Literal["cls", "mean", "cls+mean"]


class VisionTransformer(nn.Module):
    """ViT whose state dict uses the official DINOv2/DINOv3 key names, so released files load strictly.

    Token order is [cls, registers, patches]. Built on the meta device it skips initialisation
    (checkpoint loading assigns every tensor); otherwise it is initialised from `seed`.
    """

    def __init__(self, config: ViTConfig, seed: int = 0) -> None:
        super().__init__()
        cfg = config
        self.config = cfg
        d = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, d)
        self.cls_token = nn.Parameter(torch.empty(1, 1, d))
        if cfg.n_registers:
            self.register_parameter(cfg.register_key, nn.Parameter(torch.empty(1, cfg.n_registers, d)))
        if cfg.pos_encoding == "learned":
            self.pos_embed = nn.Parameter(torch.empty(1, 1 + cfg.pos_embed_grid**2, d))
        else:
            self.rope_embed = RopePositionEmbedding(
                cfg.head_dim, cfg.rope_base, cfg.rope_shift, cfg.rope_jitter, cfg.rope_rescale,
                min_period=cfg.rope_min_period, max_period=cfg.rope_max_period,
                normalize_coords=cfg.rope_normalize_coords,
            )
        self.mask_token = nn.Parameter(torch.empty(1, d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        if cfg.local_cls_norm:
            self.local_cls_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        if not self.cls_token.is_meta:
            self.init_weights(seed)

    @property
    def registers(self) -> Tensor | None:
        return getattr(self, self.config.register_key) if self.config.n_registers else None

    @property
    def n_prefix_tokens(self) -> int:
        return 1 + self.config.n_registers

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """DINOv3-style init from a private generator (no global RNG)."""
        gen = torch.Generator().manual_seed(seed)
        cfg = self.config
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, generator=gen)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
                if isinstance(m, QKV) and m.masked:
                    m.bias_mask.copy_(k_bias_mask(cfg.embed_dim))
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, LayerScale):
                m.gamma.fill_(cfg.layerscale_init)
            elif isinstance(m, RopePositionEmbedding):
                m.reset_periods()
        bound = (3 * cfg.patch_size**2) ** -0.5
        nn.init.uniform_(self.patch_embed.proj.weight, -bound, bound, generator=gen)
        nn.init.uniform_(self.patch_embed.proj.bias, -bound, bound, generator=gen)
        nn.init.normal_(self.cls_token, std=0.02, generator=gen)
        if self.registers is not None:
            nn.init.normal_(self.registers, std=0.02, generator=gen)
        if cfg.pos_encoding == "learned":
            nn.init.trunc_normal_(self.pos_embed, std=0.02, generator=gen)
        nn.init.zeros_(self.mask_token)

    def interpolated_pos_embed(self, h: int, w: int) -> Tensor:
        """Learned pos-embed [1, 1+h*w, D] for an h x w grid, bicubic as DINOv2's hub models do.

        With an offset the interpolation is driven by scale factors (g + offset) / G, which shifts the
        sampling positions slightly; with offset 0 it is driven by the target size. The native grid
        is returned untouched.
        """
        cfg = self.config
        g, d = cfg.pos_embed_grid, cfg.embed_dim
        pos = self.pos_embed.float()
        if (h, w) == (g, g):
            return pos
        grid = pos[:, 1:].reshape(1, g, g, d).permute(0, 3, 1, 2)
        if cfg.interpolate_offset:
            scale = ((h + cfg.interpolate_offset) / g, (w + cfg.interpolate_offset) / g)
            grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=cfg.interpolate_antialias)
        else:
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=cfg.interpolate_antialias)
        if grid.shape[-2:] != (h, w):
            raise RuntimeError(f"pos-embed interpolation gave {tuple(grid.shape[-2:])}, wanted {(h, w)}")
        return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, d)], dim=1)

    def prepare_tokens(self, x: Tensor, masks: Tensor | None = None) -> tuple[Tensor, tuple[int, int]]:
        """Patch tokens (masked ones replaced by `mask_token`), cls, registers and pos-embed."""
        patches, (h, w) = self.patch_embed(x)
        # Keep the residual stream in the parameter dtype (fp32 under autocast, as DINOv2/v3 do).
        patches = patches.to(self.cls_token.dtype)
        b = patches.shape[0]
        if masks is not None:
            masks = masks.reshape(b, -1).bool()
            if masks.shape[1] != h * w:
                raise ValueError(f"masks have {masks.shape[1]} entries per image, the grid has {h * w} patches")
            patches = torch.where(masks.unsqueeze(-1), self.mask_token.to(patches.dtype), patches)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), patches], dim=1)
        if self.config.pos_encoding == "learned":
            tokens = tokens + self.interpolated_pos_embed(h, w).to(tokens.dtype)
        if self.registers is not None:
            tokens = torch.cat([tokens[:, :1], self.registers.expand(b, -1, -1), tokens[:, 1:]], dim=1)
        return tokens, (h, w)

    def forward_features(
        self,
        x: Tensor,
        masks: Tensor | None = None,
        *,
        is_local: bool = False,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Run the backbone on images [B, 3, H, W].

        `masks` [B, N] (or [B, h, w]) bool marks patches replaced by the mask token (iBOT).
        `is_local` normalises cls/registers with `local_cls_norm` when the model has one.
        `generator` drives the train-mode randomness (RoPE augmentation, drawn anew for every block,
        and stochastic depth).
        Returns `cls` [B, D], `registers` [B, R, D], `patches` [B, N, D] (after the final norm)
        and `prenorm` [B, 1+R+N, D].
        """
        tokens, (h, w) = self.prepare_tokens(x, masks)
        rope = self.rope_embed(h, w, generator) if self.config.pos_encoding == "rope" else None
        redraw = rope is not None and self.rope_embed.augments
        for i, block in enumerate(self.blocks):
            if redraw and i > 0:  # as DINOv3: every block gets its own RoPE augmentation draw
                rope = self.rope_embed(h, w, generator)
            tokens = block(tokens, rope, generator)
        n = self.n_prefix_tokens
        prefix_norm = self.local_cls_norm if is_local and self.config.local_cls_norm else self.norm
        prefix = prefix_norm(tokens[:, :n])
        return {
            "cls": prefix[:, 0],
            "registers": prefix[:, 1:],
            "patches": self.norm(tokens[:, n:]),
            "prenorm": tokens,
        }

    def forward(
        self,
        x: Tensor,
        masks: Tensor | None = None,
        *,
        is_local: bool = False,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        return self.forward_features(x, masks, is_local=is_local, generator=generator)

    def embed(self, x: Tensor, pooling: Pooling = "cls", normalize: bool = True) -> Tensor:
        """Image embeddings: cls token, mean of normalised patch tokens, or both concatenated [B, 2D]."""
        out = self.forward_features(x)
        if pooling == "cls":
            emb = out["cls"]
        elif pooling == "mean":
            emb = out["patches"].mean(dim=1)
        elif pooling == "cls+mean":
            emb = torch.cat([out["cls"], out["patches"].mean(dim=1)], dim=-1)
        else:
            raise ValueError(f"unknown pooling {pooling!r}; use 'cls', 'mean' or 'cls+mean'")
        return F.normalize(emb.float(), dim=-1) if normalize else emb

    def embed_dim_for(self, pooling: Pooling) -> int:
        """Width of `embed(..., pooling)`."""
        return 2 * self.config.embed_dim if pooling == "cls+mean" else self.config.embed_dim


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
