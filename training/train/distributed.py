"""Process group set-up and FSDP2 sharding of the student and teacher; device and backend are parameters."""

from __future__ import annotations

import datetime
import functools
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint

from training.models import VisionTransformer
from training.train.config import ModelConfig, vit_config
from training.train.meta_arch import SSLModel, build_student_teacher


@dataclass(frozen=True)
class DistInfo:
    """Where this process computes: its rank in the group, its device, and whether it computes in bf16."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized_here: bool  # this process created the group (and so destroys it at the end)
    bf16: bool = False  # bf16 compute, fp32 master weights (FSDP2 mixed precision, or autocast unsharded)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def backend_for(device: str) -> str:
    return "nccl" if device == "cuda" else "gloo"


def uses_bf16(precision: str, device: str) -> bool:
    """``precision`` 'auto' is bf16 on CUDA and fp32 on CPU; 'bf16' and 'fp32' force one."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    return precision == "bf16" or (precision == "auto" and device == "cuda")


def init_distributed(device: str, timeout_s: int, precision: str = "auto") -> DistInfo:
    """Use an existing process group (Ray Train), else one from the torchrun env, else a single process."""
    initialized_here = False
    if not dist.is_initialized() and "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend_for(device), timeout=datetime.timedelta(seconds=timeout_s))
        initialized_here = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    else:
        rank, world, local_rank = 0, 1, 0
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for but CUDA is not available")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    return DistInfo(rank, world, local_rank, dev, initialized_here, uses_bf16(precision, device))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _checkpointed_forward(forward):
    """Full activation checkpointing of a block that replays the block's generator draws on recompute."""

    @functools.wraps(forward)
    def run(x, rope=None, generator=None):
        state = generator.get_state() if generator is not None else None

        def body(x, rope):
            if state is not None:
                generator.set_state(state)
            return forward(x, rope, generator)

        return checkpoint(body, x, rope, use_reentrant=False)

    return run


def _autocast_forwards(module: nn.Module, device_type: str) -> None:
    """Run the module's forward methods (a head's two halves too) under bf16 autocast: an unsharded
    model's stand-in for FSDP2 mixed precision."""
    for name in ("forward", "forward_bottleneck", "forward_last_layer"):
        if hasattr(module, name):
            setattr(module, name, torch.autocast(device_type, dtype=torch.bfloat16)(getattr(module, name)))


def _group_size(group: dist.ProcessGroup | None) -> int:
    """Ranks of ``group`` (default: the world); 1 without a process group."""
    return dist.get_world_size(group) if dist.is_initialized() else 1


def _fsdp_kwargs(info: DistInfo, group: dist.ProcessGroup | None) -> dict:
    """FSDP2 arguments: a mesh over ``group`` (default: the world); with ``info.bf16``, bf16 compute / fp32 reduce."""
    if group is None:
        mesh = init_device_mesh(info.device.type, (dist.get_world_size(),))
    else:
        mesh = DeviceMesh.from_group(group, info.device.type)
    kwargs = {"mesh": mesh, "reshard_after_forward": True}
    if info.bf16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return kwargs


def _shard_backbone(backbone: nn.Module, kwargs: dict) -> None:
    """FSDP2 per block, then the backbone root, with block-to-block prefetch."""
    blocks = list(backbone.blocks)
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(backbone, **kwargs)
    for a, b in zip(blocks, blocks[1:]):
        a.set_modules_to_forward_prefetch([b])
        b.set_modules_to_backward_prefetch([a])


def prepare_model(
    model: SSLModel,
    info: DistInfo,
    *,
    activation_checkpointing: bool = False,
    compile: bool = False,
    group: dist.ProcessGroup | None = None,
) -> SSLModel:
    """Move to the device; AC and compile per block; FSDP2 per block, backbone root, then each head.

    Parameter names are unchanged (AC patches the block's forward instead of wrapping the module), so
    state dicts and exports keep the official key layout. A group of one rank (or none) is not
    sharded. With ``info.bf16`` the model computes in bf16 over fp32 weights: FSDP2 mixed precision
    (fp32 reduce) when sharded, autocast on the backbone's and heads' forwards when not.
    ``group``: shard over this process group (a distillation student) instead of the world. The heads' ``forward_bottleneck``/
    ``forward_last_layer`` are FSDP forward methods, so distillation can call them separately.
    """
    on_meta = any(p.is_meta for p in model.parameters())
    if not on_meta:
        model.to(info.device)
    blocks = list(model.backbone.blocks)
    if activation_checkpointing and model.training:
        for block in blocks:
            block.forward = _checkpointed_forward(block.forward)
    if compile:
        for module in [*blocks, model.dino_head, model.ibot_head]:
            module.compile()
    if _group_size(group) == 1:  # nothing to shard: FSDP2 over one rank would only add hooks and copies
        if info.bf16:
            for module in (model.backbone, model.dino_head, model.ibot_head):
                _autocast_forwards(module, info.device.type)
        if on_meta:
            model.to_empty(device=info.device)
        return model
    # The backbone returns views (cls = prefix[:, 0]); the losses use them out of place only.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    kwargs = _fsdp_kwargs(info, group)
    _shard_backbone(model.backbone, kwargs)
    for head in (model.dino_head, model.ibot_head):
        fully_shard(head, **kwargs)
        register_fsdp_forward_method(head, "forward_bottleneck")
        register_fsdp_forward_method(head, "forward_last_layer")
    if on_meta:
        model.to_empty(device=info.device)
    return model


def prepare_frozen_backbone(backbone: VisionTransformer, info: DistInfo) -> VisionTransformer:
    """A gradient-free, eval-mode backbone (the Gram teacher) on the device, sharded over a world of 2+ ranks."""
    backbone.requires_grad_(False)
    backbone.eval()
    on_meta = any(p.is_meta for p in backbone.parameters())
    if not on_meta:
        backbone.to(info.device)
    if _group_size(None) > 1:
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        _shard_backbone(backbone, _fsdp_kwargs(info, None))
    elif info.bf16:
        _autocast_forwards(backbone, info.device.type)
    if on_meta:
        backbone.to_empty(device=info.device)
    return backbone


def build_models(
    model: ModelConfig,
    seed: int,
    info: DistInfo,
    *,
    activation_checkpointing: bool = False,
    compile: bool = False,
    group: dist.ProcessGroup | None = None,
) -> tuple[SSLModel, SSLModel]:
    """Student (train mode) and EMA teacher (eval, no grad) on the device, FSDP2-sharded when a group is up.

    Distributed, only the group's first rank materialises the seeded full weights (on the CPU); every
    rank builds on the meta device, shards, allocates its shards and receives their values by
    broadcast. So a large model never exists in full on more than one process, and the weights equal
    the single-process init. ``group``: the student's process group (default: the world).
    """
    flags = {"activation_checkpointing": activation_checkpointing, "compile": compile}
    if not dist.is_initialized():
        student, teacher = build_student_teacher(model, seed)
        return prepare_model(student.train(), info, **flags), prepare_model(teacher, info, **flags)
    vit = vit_config(model)
    first = dist.get_rank(group) == 0 if group is not None else info.is_main
    full = SSLModel(vit, model.dino_head, model.ibot_head, seed).state_dict() if first else {}
    with torch.device("meta"):
        student = SSLModel(vit, model.dino_head, model.ibot_head, seed)
        teacher = SSLModel(vit, model.dino_head, model.ibot_head, seed)
    teacher.requires_grad_(False)
    pair = (
        prepare_model(student.train(), info, group=group, **flags),
        prepare_model(teacher.eval(), info, group=group, **flags),
    )
    for m in pair:
        _load_from_rank0(m, full, info, group)
    return pair


@torch.no_grad()
def _load_from_rank0(
    model: nn.Module, full: dict[str, Tensor], info: DistInfo, group: dist.ProcessGroup | None = None
) -> None:
    """Broadcast the group's first rank's full tensors one at a time; each rank keeps its own shard of each."""
    for name, target in model.state_dict().items():
        if full:
            value = full[name].to(info.device)
        else:
            value = torch.empty(target.shape, dtype=target.dtype, device=info.device)
        dist.broadcast(value, group=group, group_src=0)
        if isinstance(target, DTensor):
            shard = distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)
            target.to_local().copy_(shard.to_local())
        else:
            target.copy_(value)
