"""Images/s of `curate train`'s step as the trainer runs it, with a shipped recipe config.

The config is a shipped one (default ``training/configs/vits16_pretrain.yaml``: compile on, bf16 on
CUDA, 65,536 prototypes, 2x224 + 8x96 crops) with ``--size``, ``--batch`` and ``--set`` overrides. The
models, optimizer and step are the product's (``SSLRecipe`` and its ``step``: teacher targets, student
losses, backward, per-module clipping, AdamW, EMA), at the recipe's schedules. Each step's batch starts
in host memory, pinned when the loader would pin it, and reaches the device as in the trainer's loop
(`DeviceFeed`: the next batch's copy starts before the step when ``data.device_prefetch`` is on).
Crops are synthetic (decoding and augmentation are the loader's cost), and a few batches with their
own iBOT masks take turns so the masked-token count varies as in training. The model runs
as ``torchrun --nproc_per_node=1`` would run it: a 1-rank process group, nothing sharded.

References measured in the same run: the student backbone alone (forward and backward on the same
crops, no heads, losses or optimizer) and a bf16 (CUDA) or fp32 (CPU) matmul's FLOP rate, against which
the step's model FLOPs give an MFU. ``--profile`` prints the ops with the most device time of one step.

Model FLOPs per step (analytic, forward = 2 FLOPs per parameter per token, plus attention):
    fwd(P, tokens, seqs) = 2·P·tokens + depth·4·D·Σ_seq N²          (QKᵀ and AV)
    FLOPs = 3·[fwd_backbone(student crops) + 2·P_dino·#cls_student + 2·P_ibot·M]
          +    fwd_backbone(teacher globals) + 2·P_dino·#cls_teacher + 2·P_ibot·M
(×3 = forward + backward for the student; M = masked tokens; N = 1 + registers + patches.)

    python -m benchmarks.train_step --device cuda --batch 256 --target 2000 --profile --out vits.json
    python -m benchmarks.train_step --device cuda --size dinov3_vitl16 --batch 64 --target 350
    python -m benchmarks.train_step --device cpu --size vit_test --batch 4 --set compile=false \\
        crops.global_size=32 crops.local_size=16 model.dino_head.n_prototypes=1024 model.ibot_head.n_prototypes=1024
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from benchmarks.common import machine
from training.data.masking import collate
from training.train.config import TrainConfig, load_train_config
from training.train.data import pins_memory, prefetches
from training.train.distributed import init_distributed
from training.train.loop import DeviceFeed, to_device
from training.train.pretrain import SSLRecipe
from training.train.schedules import Schedules

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "training", "configs",
                       "vits16_pretrain.yaml")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_batches(config: TrainConfig, patch: int, count: int) -> list[dict]:
    """``count`` per-rank batches of random crops in host memory, each with its own iBOT masks (the
    collate's), pinned where the loader pins."""
    crops, batch = config.crops, config.optim.batch_size_per_rank
    out = []
    for seed in range(count):
        gen = torch.Generator().manual_seed(seed)
        samples = [{"global_crops": torch.randn(2, 3, crops.global_size, crops.global_size, generator=gen),
                    "local_crops": torch.randn(crops.n_local, 3, crops.local_size, crops.local_size, generator=gen)}
                   for _ in range(batch)]
        b = collate(samples, patch_size=patch, rng=np.random.default_rng(seed), mask_ratio_range=crops.mask_ratio_range,
                    mask_sample_probability=crops.mask_sample_probability)
        b["image_ids"] = torch.arange(batch)
        out.append({k: (v.pin_memory() if pins_memory(config) and isinstance(v, torch.Tensor) else v)
                    for k, v in b.items()})
    return out


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def step_flops(config: TrainConfig, vit, p_backbone: int, p_dino: int, p_ibot: int, n_masked: float) -> float:
    crops, b = config.crops, config.optim.batch_size_per_rank
    prefix = 1 + vit.n_registers
    n_g = prefix + (crops.global_size // vit.patch_size) ** 2
    n_l = prefix + (crops.local_size // vit.patch_size) ** 2

    def backbone(seqs: list[tuple[int, int]]) -> float:  # (count, length)
        tokens = sum(c * n for c, n in seqs)
        return 2.0 * p_backbone * tokens + vit.depth * 4.0 * vit.embed_dim * sum(c * n * n for c, n in seqs)

    student = backbone([(2 * b, n_g), (crops.n_local * b, n_l)]) + 2.0 * p_dino * (2 + crops.n_local) * b
    teacher = backbone([(2 * b, n_g)]) + 2.0 * p_dino * 2 * b
    ibot = 2.0 * p_ibot * n_masked
    return 3 * (student + ibot) + teacher + ibot


def timed(fn: Callable[[], object], sync: Callable[[], None], warmup: int, steps: int) -> list[float]:
    """Seconds of each of ``steps`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def matmul_rate(device: torch.device, sync: Callable[[], None]) -> float:
    """FLOP/s of a square matmul in the step's compute dtype (bf16 on CUDA, fp32 on CPU)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2.0 * n**3 / min(timed(lambda: a @ b, sync, 2, 5))


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
    ap.add_argument("--config", default=SHIPPED, help="a shipped recipe config (default: the ViT-S/16 recipe)")
    ap.add_argument("--size", help="model.size (default: the config's)")
    ap.add_argument("--batch", type=int, default=4, help="images per step (optim.batch_size_per_rank)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides")
    ap.add_argument("--steps", type=int, default=3, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    ap.add_argument("--batches", type=int, default=3, help="host batches (own masks) taking turns")
    ap.add_argument("--target", type=float, help="images/s the issue asks for, to print the ratio")
    ap.add_argument("--profile", action="store_true", help="print the costliest ops of one more step")
    ap.add_argument("--out")
    args = ap.parse_args()

    overrides = [f"device={args.device}", f"optim.batch_size_per_rank={args.batch}",
                 *([f"model.size={args.size}"] if args.size else []), *args.set]
    config = load_train_config(args.config, overrides)
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port())), ("RANK", "0"),
                       ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    info = init_distributed(config.device, config.dist_timeout_s, config.precision)
    recipe = SSLRecipe(config, info)
    student = recipe.student
    sizes = [_params(m) for m in (student.backbone, student.dino_head, student.ibot_head)]
    batches = host_batches(config, recipe.patch_size, args.batches)
    schedules = Schedules(config.optim, args.batch * info.world_size, config.loss)
    first = config.optim.freeze_last_layer_iterations  # a step of the run's bulk: every parameter trains
    sync = torch.cuda.synchronize if info.device.type == "cuda" else (lambda: None)
    state = {"step": first}
    losses: list[float] = []
    feed = DeviceFeed(itertools.cycle(batches), info.device)

    def one_step() -> None:  # the trainer's loop body: take the batch, start the next one's copy, step
        step = state["step"]
        batch = feed.take()
        if prefetches(config):
            feed.prefetch()
        losses.append(recipe.step(batch, schedules.at(step), step).loss)
        state["step"] = step + 1

    t0 = time.perf_counter()
    one_step()
    sync()
    first_step_s = time.perf_counter() - t0
    step_s = float(np.median(timed(one_step, sync, args.warmup, args.steps)))

    def backbone_only() -> None:
        b = to_device(batches[0], info.device)
        g = student.backbone(b["global_crops"], b["masks"])
        loc = student.backbone(b["local_crops"], is_local=True)
        (g["cls"].float().mean() + g["patches"].float().mean() + loc["cls"].float().mean()).backward()
        student.zero_grad(set_to_none=True)

    backbone_s = float(np.median(timed(backbone_only, sync, 1, args.steps)))
    peak = matmul_rate(info.device, sync)
    top_ops = profile_step(one_step) if args.profile else None
    n_masked = float(np.mean([int(b["n_masked_patches"].sum()) for b in batches]))
    flops = step_flops(config, recipe.vit, *sizes, n_masked)
    rate, backbone_rate = args.batch / step_s, args.batch / backbone_s
    result = {
        "config": os.path.relpath(args.config), "overrides": overrides, "size": config.model.size,
        "device": args.device, "dtype": "bf16 (autocast)" if info.bf16 else "fp32", "batch": args.batch,
        "crops": f"2x{config.crops.global_size} + {config.crops.n_local}x{config.crops.local_size}",
        "prototypes": config.model.dino_head.n_prototypes, "compile": config.compile,
        "pinned_batches": pins_memory(config), "device_prefetch": prefetches(config),
        "backbone_params": sizes[0], "dino_head_params": sizes[1], "ibot_head_params": sizes[2],
        "first_step_s": first_step_s, "step_s_median": step_s, "images_per_s": rate,
        "backbone_only_images_per_s": backbone_rate, "step_vs_backbone_only": rate / backbone_rate,
        "model_tflops_per_step": flops / 1e12, "achieved_tflops": flops / step_s / 1e12,
        "matmul_tflops_same_run": peak / 1e12, "mfu_vs_matmul": flops / step_s / peak,
        "target_images_per_s": args.target, "vs_target": rate / args.target if args.target else None,
        "losses": losses, "top_ops": top_ops,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if info.device.type == "cuda" else None,
        "machine": machine(),
    }
    rows = [("config", f"{result['config']} {' '.join(overrides)}"),
            ("device / dtype", f"{args.device} / {result['dtype']}"),
            ("crops", result["crops"]), ("compile", config.compile), ("first step", f"{first_step_s:.1f} s"),
            ("step time (median)", f"{step_s:.3f} s"), ("images/s", f"{rate:.1f}"),
            ("backbone only img/s", f"{backbone_rate:.1f} (step / backbone only {rate / backbone_rate:.2f})"),
            ("achieved TFLOP/s",
             f"{flops / step_s / 1e12:.2f} of {peak / 1e12:.1f} matmul: {flops / step_s / peak:.1%}"),
            ("vs target", f"{rate / args.target:.2f} of {args.target:g} img/s" if args.target else "n/a")]
    for k, v in rows:
        print(f"{k:<22} {v}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
