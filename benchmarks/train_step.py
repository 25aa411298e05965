"""Images/s of one full SSL training step (and model FLOPs utilisation on CUDA).

A step is what the trainer runs: teacher (EMA) on the 2 global crops -> Sinkhorn targets; student on
2 masked global + n local crops; DINO + KoLeo + iBOT losses; backward; per-module clipping; AdamW; EMA.
Inputs are synthetic crops (decoding/augmentation is the loader's cost, not measured here). The model
runs as ``torchrun --nproc_per_node=1`` would run it: a 1-rank process group (gloo on CPU, NCCL on
CUDA), nothing sharded (FSDP2 shards over 2+ ranks), bf16 autocast on CUDA. ``--profile`` adds a
torch.profiler table of the costliest ops of one step (device time on CUDA).

Model FLOPs per step (analytic, forward = 2 FLOPs per parameter per token, plus attention):
    fwd(P, tokens, seqs) = 2·P·tokens + depth·4·D·Σ_seq N²          (QKᵀ and AV)
    FLOPs = 3·[fwd_backbone(student crops) + 2·P_dino·#cls_student + 2·P_ibot·M]
          +    fwd_backbone(teacher globals) + 2·P_dino·#cls_teacher + 2·P_ibot·M
(×3 = forward + backward for the student; M = masked tokens in the batch; N = 1 + registers + patches.)
MFU = FLOPs / step time / peak dense bf16 FLOP/s of the GPU (H100/H200 SXM: 989e12).

    .venv/bin/python benchmarks/train_step.py --size vit_test --global-size 32 --local-size 16 --batch 4
    .venv/bin/python benchmarks/train_step.py --device cuda --batch 64 --compile --out /tmp/ts.json
    .venv/bin/python benchmarks/train_step.py --device cuda --batch 256 --compile --profile
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from training.data.masking import collate
from training.train.config import HeadConfig, ModelConfig, TrainConfig, vit_config
from training.train.distributed import build_models, init_distributed
from training.train.optim import build_optimizer
from training.train.pretrain import train_step
from training.train.run_state import step_generator
from training.train.schedules import StepHyperParams

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def machine() -> dict:
    facts = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
             "python": platform.python_version()}
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
    return facts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def synthetic_batch(args: argparse.Namespace, patch: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    samples = [
        {"global_crops": torch.randn(2, 3, args.global_size, args.global_size, generator=gen),
         "local_crops": torch.randn(args.n_local, 3, args.local_size, args.local_size, generator=gen)}
        for _ in range(args.batch)
    ]
    batch = collate(samples, patch_size=patch, rng=np.random.default_rng(seed))
    batch["image_ids"] = torch.arange(args.batch)
    return batch


def _params(module: torch.nn.Module) -> int:
    """Unsharded parameter count (DTensor numel is the global size)."""
    return sum(p.numel() for p in module.parameters())


def step_flops(args: argparse.Namespace, cfg, p_backbone: int, p_dino: int, p_ibot: int, n_masked: int) -> float:
    prefix = 1 + cfg.n_registers
    n_g = prefix + (args.global_size // cfg.patch_size) ** 2
    n_l = prefix + (args.local_size // cfg.patch_size) ** 2
    b = args.batch

    def backbone(seqs: list[tuple[int, int]]) -> float:  # (count, length)
        tokens = sum(c * n for c, n in seqs)
        return 2.0 * p_backbone * tokens + cfg.depth * 4.0 * cfg.embed_dim * sum(c * n * n for c, n in seqs)

    student = backbone([(2 * b, n_g), (args.n_local * b, n_l)]) + 2.0 * p_dino * (2 + args.n_local) * b
    teacher = backbone([(2 * b, n_g)]) + 2.0 * p_dino * 2 * b
    ibot = 2.0 * p_ibot * n_masked
    return 3 * (student + ibot) + teacher + ibot


def profile_step(step: Callable[[], object], rows: int = 25) -> list[dict]:
    """Run one step under torch.profiler; print and return the ops with the most self time (device time on CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:rows]
    print(prof.key_averages().table(sort_by=key, row_limit=rows))
    return [{"op": e.key, "calls": e.count, "self_ms": getattr(e, key) / 1e3,
             "cpu_ms": e.cpu_time_total / 1e3} for e in events]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="dinov3_vits16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=4, help="images per step")
    ap.add_argument("--global-size", type=int, default=224)
    ap.add_argument("--local-size", type=int, default=96)
    ap.add_argument("--n-local", type=int, default=8)
    ap.add_argument("--prototypes", type=int, default=65536)
    ap.add_argument("--steps", type=int, default=3, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print the costliest ops of one more step")
    ap.add_argument("--out")
    args = ap.parse_args()

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    info = init_distributed(args.device, timeout_s=300)
    head = HeadConfig(n_prototypes=args.prototypes)
    config = TrainConfig(device=args.device, model=ModelConfig(size=args.size, dino_head=head, ibot_head=head),
                         compile=args.compile, activation_checkpointing=args.activation_checkpointing)
    cfg = vit_config(config.model)
    student, teacher = build_models(config.model, 0, info, compile=args.compile,
                                    activation_checkpointing=args.activation_checkpointing)
    p_backbone, p_dino, p_ibot = (_params(m) for m in (student.backbone, student.dino_head, student.ibot_head))
    optimizer = build_optimizer(student, cfg.depth, config.optim, info.device)
    hp = StepHyperParams(lr=1e-4, last_layer_lr=1e-4, weight_decay=0.04, momentum=0.994, teacher_temp=0.07)
    batch = synthetic_batch(args, cfg.patch_size, seed=0)
    batch = {k: (v.to(info.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    n_masked = int(batch["n_masked_patches"].sum())

    def sync() -> None:
        if info.device.type == "cuda":
            torch.cuda.synchronize()

    t_warm = time.perf_counter()
    for i in range(args.warmup):
        train_step(student, teacher, optimizer, batch, hp, config, step_generator(0, i, 0))
    sync()
    warmup_s = time.perf_counter() - t_warm
    times, losses = [], []
    for i in range(args.steps):
        t0 = time.perf_counter()
        out = train_step(student, teacher, optimizer, batch, hp, config, step_generator(0, args.warmup + i, 0))
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(out.losses[0])
    step_s = float(np.median(times))
    top_ops = profile_step(lambda: train_step(student, teacher, optimizer, batch, hp, config,
                                              step_generator(0, 10**6, 0))) if args.profile else None
    flops = step_flops(args, cfg, p_backbone, p_dino, p_ibot, n_masked)
    facts = machine()
    peak = next((v for k, v in PEAK_BF16.items() if k in facts.get("gpu", "")), None) if args.device == "cuda" else None
    result = {
        "size": args.size, "device": args.device,
        "dtype": "bf16 (autocast)" if info.bf16 else "fp32",
        "batch": args.batch, "global_size": args.global_size, "local_size": args.local_size, "n_local": args.n_local,
        "prototypes": args.prototypes, "compile": args.compile, "activation_checkpointing": args.activation_checkpointing,
        "backbone_params": p_backbone, "dino_head_params": p_dino, "ibot_head_params": p_ibot,
        "warmup_s": warmup_s, "step_s_median": step_s, "images_per_s": args.batch / step_s,
        "model_tflops_per_step": flops / 1e12, "achieved_tflops": flops / step_s / 1e12,
        "mfu": flops / step_s / peak if peak else None, "losses": losses,
        "top_ops": top_ops,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None,
        "machine": facts,
    }
    rows = [("size", args.size), ("device / dtype", f"{args.device} / {result['dtype']}"), ("batch", args.batch),
            ("crops", f"2x{args.global_size} + {args.n_local}x{args.local_size}"), ("compile", args.compile),
            ("step time (median)", f"{step_s:.3f} s"), ("images/s", f"{result['images_per_s']:.1f}"),
            ("model TFLOP/step", f"{result['model_tflops_per_step']:.3f}"),
            ("achieved TFLOP/s", f"{result['achieved_tflops']:.2f}"),
            ("MFU", f"{result['mfu']:.1%}" if result["mfu"] else "n/a")]
    for k, v in rows:
        print(f"{k:<22} {v}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
