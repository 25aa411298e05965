"""AdamW with DINOv3 parameter groups, per-step hyper-parameters, per-module clipping and the EMA update."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from training.train.config import OptimConfig
from training.train.schedules import StepHyperParams

# Backbone parameters that sit before the first block (layer 0 of the layer-wise decay).
_EMBEDDING_PREFIXES = ("patch_embed.", "cls_token", "storage_tokens", "register_tokens", "mask_token", "pos_embed")


@dataclass(frozen=True)
class ParamRule:
    """How one parameter is optimised: multipliers on the scheduled lr and wd, and last-layer freezing."""

    lr_mult: float
    wd_mult: float
    is_last_layer: bool


def backbone_layer_id(name: str, depth: int) -> int:
    """0 for the patch embedding and tokens, i+1 for block i, depth+1 for the final norms."""
    if name.startswith(_EMBEDDING_PREFIXES):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def no_weight_decay(name: str) -> bool:
    """Biases, norms and LayerScale gammas get no weight decay (tokens and patch-embed weights do)."""
    return name.endswith("bias") or "norm" in name or "gamma" in name


def param_rule(module: str, name: str, depth: int, optim: OptimConfig) -> ParamRule:
    """The rule of parameter ``name`` of ``module`` ('backbone', 'dino_head' or 'ibot_head')."""
    wd_mult = 0.0 if no_weight_decay(name) else 1.0
    if module != "backbone":
        return ParamRule(1.0, wd_mult, "last_layer" in name)
    lr_mult = optim.layerwise_decay ** (depth + 1 - backbone_layer_id(name, depth))
    if name.startswith("patch_embed."):
        lr_mult *= optim.patch_embed_lr_mult
    return ParamRule(lr_mult, wd_mult, False)


def param_groups(model: nn.Module, depth: int, optim: OptimConfig) -> list[dict]:
    """AdamW groups of ``model`` (an ``SSLModel``), one per distinct rule, in first-seen order."""
    groups: dict[ParamRule, dict] = {}
    for module in ("backbone", "dino_head", "ibot_head"):
        for name, p in getattr(model, module).named_parameters():
            if not p.requires_grad:
                continue
            rule = param_rule(module, name, depth, optim)
            group = groups.setdefault(
                rule,
                {"params": [], "names": [], "lr_mult": rule.lr_mult, "wd_mult": rule.wd_mult,
                 "is_last_layer": rule.is_last_layer},
            )
            group["params"].append(p)
            group["names"].append(f"{module}.{name}")
    return list(groups.values())


def build_optimizer(model: nn.Module, depth: int, optim: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    fused = device.type == "cuda"
    return torch.optim.AdamW(
        param_groups(model, depth, optim), lr=0.0, betas=optim.betas, weight_decay=0.0,
        fused=fused, foreach=None if fused else True,
    )


def apply_hyper_params(optimizer: torch.optim.Optimizer, hp: StepHyperParams) -> None:
    """Set every group's lr and weight decay for this iteration (last layers use the frozen-aware lr)."""
    for group in optimizer.param_groups:
        base = hp.last_layer_lr if group["is_last_layer"] else hp.lr
        group["lr"] = base * group["lr_mult"]
        group["weight_decay"] = hp.weight_decay * group["wd_mult"]


def _full(norm: Tensor) -> Tensor:
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def clip_gradients(model: nn.Module, max_norm: float | None) -> dict[str, Tensor]:
    """Clip backbone, DINO head and iBOT head separately; returns their pre-clip gradient norms.

    The norms stay on the device (0-dim tensors) so the caller reads them with the step's other
    values in one host sync.
    """
    norms = {}
    for module in ("backbone", "dino_head", "ibot_head"):
        params = [p for p in getattr(model, module).parameters() if p.grad is not None]
        if not params:
            continue
        limit = max_norm if max_norm is not None else float("inf")
        norms[module] = _full(torch.nn.utils.clip_grad_norm_(params, limit, foreach=True))
    return norms


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """theta_t <- m·theta_t + (1-m)·theta_s on the (local shards of the) parameters, in place."""
    t_params = [_local(p) for p in teacher.parameters()]
    s_params = [_local(p.detach()) for p in student.parameters()]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)
