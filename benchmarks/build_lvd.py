"""Benchmark of `curate build-lvd`'s core: synthetic pool → hierarchical k-means → balanced sample.

    .venv/bin/python benchmarks/build_lvd.py --n 200000 --d 384 --concepts 1000 --levels 4 --out r.json
    .venv/bin/python benchmarks/build_lvd.py --ks 5180,1000,300,100 --split 20 --n-iter 20 --out r.json
    .venv/bin/python benchmarks/build_lvd.py --lloyd-bench --n 8000000 --d 768 --k 65536 \
        --device cuda --out lloyd.json

The first mode runs the levels `curate cluster` would (its ``default_levels``, n_iter and metric)
unless ``--ks``/``--split``/``--n-iter``/... change them; the output names every changed knob. It
reports how flat the sample is over the generator's concepts (normalised entropy H/ln C, max/min
concept share, coverage) against the pool and a random subset, per-level cluster statistics, and
wall/CPU time and peak memory per stage. ``--lloyd-bench`` times one Lloyd iteration of `curate
cluster` at the stage's defaults (cosine; bf16 search on CUDA) and compares it with a plain
[N, d] × [d, k] matmul measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import torch

from curation.hierarchy import LevelSpec, default_levels, hierarchical_kmeans
from curation.kmeans import (
    compute_dtype,
    default_chunk_size,
    device_rows,
    fused_scoring,
    grid_exponent,
    normalize_rows,
    resolve_device,
    update_centroids,
)
from curation.sampling import balanced_sample
from curation.synthetic import concept_embeddings, normalised_entropy

#: The arguments at which this benchmark runs what `curate cluster` runs (ClusterConfig's defaults).
CLI_DEFAULTS = {"ks": "", "split": 0, "steps": 10, "n_iter": 30, "warm_start": False, "metric": "cosine"}


def machine(device: torch.device) -> dict:
    info = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "platform": platform.platform(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def stage(record: dict, name: str, device: torch.device) -> Iterator[None]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    w, c = time.perf_counter(), time.process_time()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    record[name] = {"wall_s": time.perf_counter() - w, "cpu_s": time.process_time() - c,
                    "peak_rss_mb": peak_rss_mb()}
    if device.type == "cuda":
        record[name]["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20


def concept_stats(concept: np.ndarray, n_concepts: int) -> dict:
    share = np.bincount(concept, minlength=n_concepts) / len(concept)
    return {"entropy": normalised_entropy(concept, n_concepts), "max_share": float(share.max()),
            "min_share": float(share.min()), "coverage": float((share > 0).mean())}


def build_levels(args: argparse.Namespace) -> list[LevelSpec]:
    """The CLI's default levels (`default_levels`, level 1 shaped by its cost) unless --ks/--split say otherwise."""
    if not args.ks and args.split == 0:
        return default_levels(args.n, args.levels, resampling_steps=args.steps, dim=args.d, n_iter=args.n_iter)
    ks = [int(k) for k in args.ks.split(",")] if args.ks else [s.clusters for s in default_levels(args.n, args.levels)]
    first = LevelSpec(k=max(1, ks[0] // args.split), n_splits=args.split) if args.split > 1 else LevelSpec(k=ks[0])
    return [first] + [LevelSpec(k=k, resampling_steps=args.steps) for k in ks[1:]]


def knobs(args: argparse.Namespace) -> str:
    """What this run changed from `curate cluster`'s defaults ('defaults' when nothing)."""
    changed = [f"--{name.replace('_', '-')} {getattr(args, name)}" for name, default in CLI_DEFAULTS.items()
               if getattr(args, name) != default]
    return " ".join(changed) or "defaults"


def run_curation(args: argparse.Namespace) -> dict:
    dev = resolve_device(args.device)
    out: dict = {"machine": machine(dev), "args": vars(args), "knobs": knobs(args), "stages": {}}
    with stage(out["stages"], "generate", dev):
        x, concept, _ = concept_embeddings(args.n, args.d, args.concepts, args.super, args.zipf, seed=args.seed)
    levels = build_levels(args)
    out["levels"] = [vars(s) for s in levels]
    level_wall: list[float] = []
    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        level_wall.append(time.perf_counter() - t0)
        print(f"  [{level_wall[-1]:7.1f}s] {msg}", flush=True)

    with stage(out["stages"], "hierarchy", dev):
        h = hierarchical_kmeans(x, levels, seed=args.seed, metric=args.metric, n_iter=args.n_iter,
                                warm_start=args.warm_start, device=dev, progress=progress)
    target = int(round(args.frac * args.n))
    with stage(out["stages"], "sample", dev):
        idx = balanced_sample(h.point_labels(), target, seed=args.seed, strategy=args.strategy,
                              distances=h.distances)
    rand = np.random.default_rng(args.seed + 1).choice(args.n, size=target, replace=False)
    out["pool"] = concept_stats(concept, args.concepts)
    out["random"] = concept_stats(concept[rand], args.concepts)
    out["ours"] = concept_stats(concept[idx], args.concepts)
    pl = h.point_labels()
    out["per_level"] = []
    for lvl in range(pl.shape[1]):
        sizes = np.bincount(pl[:, lvl])
        sub = balanced_sample(pl[:, : lvl + 1], target, seed=args.seed)  # sampling with levels 1..lvl+1
        out["per_level"].append({
            "level": lvl + 1, "k": int(len(sizes)), "inertia": h.inertia[lvl],
            "max_row_share": float(sizes.max() / args.n),  # a "hub" cluster shows up here
            "concepts_per_cluster": float(np.mean([len(np.unique(concept[pl[:, lvl] == j][:5000]))
                                                   for j in np.argsort(-sizes)[:20]])),
            "entropy_if_top": normalised_entropy(concept[sub], args.concepts),
        })
    return out


def print_curation(r: dict) -> None:
    print(f"knobs changed from `curate cluster`'s defaults: {r['knobs']}")
    print(f"\n{'set':8s} {'entropy':>8s} {'max_share':>10s} {'min_share':>10s} {'coverage':>9s}")
    for name in ("pool", "random", "ours"):
        s = r[name]
        print(f"{name:8s} {s['entropy']:8.4f} {s['max_share']:10.5f} {s['min_share']:10.6f} {s['coverage']:9.3f}")
    print(f"\n{'level':>5s} {'k':>6s} {'inertia':>10s} {'max_share':>10s} {'conc/cl(top20)':>15s} {'H if top':>9s}")
    for p in r["per_level"]:
        print(f"{p['level']:5d} {p['k']:6d} {p['inertia']:10.1f} {p['max_row_share']:10.4f} "
              f"{p['concepts_per_cluster']:15.1f} {p['entropy_if_top']:9.4f}")
    print(f"\n{'stage':10s} {'wall_s':>8s} {'cpu_s':>8s} {'peak_rss_mb':>12s}")
    for name, s in r["stages"].items():
        print(f"{name:10s} {s['wall_s']:8.1f} {s['cpu_s']:8.1f} {s['peak_rss_mb']:12.0f}")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run_lloyd(args: argparse.Namespace) -> dict:
    """One Lloyd iteration as `curate cluster` runs it at level 1 with the stage's defaults (metric,
    precision, chunk grid, rows moved to the device once: `curation.kmeans.device_rows`), against the
    plain [N, d] x [d, k] matmul in the search's dtype, measured in the same run."""
    from pipelines.stages.cluster import ClusterConfig

    config = ClusterConfig()
    dev = resolve_device(args.device)
    dtype = compute_dtype(args.precision or config.precision, dev)
    g = torch.Generator(device=dev).manual_seed(args.seed)
    x = torch.randn(args.n, args.d, device=dev, generator=g)  # float32 rows, as the stage holds them
    rows = device_rows(x, dev, dtype)
    c = normalize_rows(x[torch.randperm(args.n, device=dev, generator=g)[: args.k]]).cpu().numpy()
    grid = grid_exponent(1.0 if config.metric == "cosine" else rows.max_abs())
    flops = 2.0 * args.n * args.d * args.k
    block = max(256, (1 << 30 if dev.type == "cuda" else 1 << 24) // args.k)  # the baseline's own row blocks
    xb, cb = x.to(dtype), torch.from_numpy(c).to(dev, dtype)

    def matmul() -> None:
        for s in range(0, args.n, block):
            torch.mm(xb[s : s + block], cb.T)

    def lloyd() -> None:  # kmeans_rows' loop body
        update_centroids(rows.partial_sums(c, grid_exp=grid, metric=config.metric), c, metric=config.metric)

    def nearest() -> None:  # the search alone; lloyd − nearest = normalising, summing and counting
        rows.assign(c, metric=config.metric)

    def fused_with(tiles: str) -> Callable[[], None]:  # the fused kernel alone, with other tile shapes
        from curation.fused_nearest import Tiles, nearest_scores  # Triton: CUDA machines only

        shape, bias = Tiles(*map(int, tiles.split(","))), -0.5 * (cb.float() ** 2).sum(1)
        step = default_chunk_size(args.k, dev, dtype)
        return lambda: [nearest_scores(xb[s : s + step], cb, bias, shape) for s in range(0, args.n, step)]

    ops: list[tuple[str, Callable[[], None]]] = [
        ("matmul", matmul), ("assign_only", nearest), ("lloyd_iteration", lloyd)]
    if fused_scoring(dev, dtype):
        ops += [(f"fused_tiles_{t}", fused_with(t)) for t in args.tiles]
    out: dict = {"machine": machine(dev), "args": vars(args), "metric": config.metric, "dtype": str(dtype),
                 "rows_on_device": torch.as_tensor(rows.x).device.type == dev.type,
                 "fused_scoring": fused_scoring(dev, dtype)}
    for name, fn in ops:
        fn()  # warm-up
        _sync(dev)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            _sync(dev)
            times.append(time.perf_counter() - t)
        out[name] = {"s": min(times), "tflops": flops / min(times) / 1e12}
    out["fraction_of_matmul_rate"] = out["matmul"]["s"] / out["lloyd_iteration"]["s"]
    if dev.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--concepts", type=int, default=1000)
    p.add_argument("--super", type=int, default=50)
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--levels", type=int, default=4)
    p.add_argument("--ks", default="", help="comma-separated k per level (default: the CLI's default_levels)")
    p.add_argument("--split", type=int, default=0,
                   help="level-1 n_splits (0 = as the CLI's default_levels decides; 1 = plain k-means)")
    p.add_argument("--steps", type=int, default=10, help="resampling steps at levels > 1")
    p.add_argument("--n-iter", type=int, default=30)
    p.add_argument("--warm-start", action="store_true")
    p.add_argument("--metric", default="cosine", choices=["cosine", "l2"])
    p.add_argument("--strategy", default="random", choices=["random", "closest", "farthest"])
    p.add_argument("--frac", type=float, default=0.2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lloyd-bench", action="store_true")
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--precision", default=None, choices=["auto", "bf16", "fp32"],
                   help="of the nearest-centroid search (default: the cluster stage's)")
    p.add_argument("--chunk", type=int, default=0, help="rows per chunk (0 = default)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tiles", nargs="*", default=[], metavar="M,N,K,WARPS,STAGES",
                   help="also time the fused kernel alone with these tile shapes (CUDA, 16-bit)")
    p.add_argument("--out", default="")
    args = p.parse_args()
    if args.lloyd_bench:
        r = run_lloyd(args)
        print(f"{'op':30s} {'s':>8s} {'TFLOP/s':>8s}   (fused Triton scoring: {r['fused_scoring']})")
        for name, v in r.items():
            if isinstance(v, dict) and "tflops" in v:
                print(f"{name:30s} {v['s']:8.3f} {v['tflops']:8.2f}")
        print(f"lloyd / matmul rate: {r['fraction_of_matmul_rate']:.3f}")
    else:
        r = run_curation(args)
        print_curation(r)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
