"""Pool index + kNN-graph copy dedup on synthetic clustered embeddings.

Writes N x D float16 unit vectors (two-level mixture: random unit centres, sub-centres at cosine
0.7 to them, points at cosine 0.6 to a sub-centre, so neighbours have cosine ~0.36 within a
sub-cluster and ~0.18 across sub-clusters of a centre; plus injected near-duplicate groups at
cosine ~0.9) to a memory-mapped .npy in a temp
dir, then measures: the automatically chosen index, build time, recall@10 vs exact search on
fresh queries, queries/s, index bytes and peak RSS; and the k=64, cosine > 0.6 graph dedup:
edges/s, components, precision/recall of the injected groups, peak RSS.

    .venv/bin/python benchmarks/retrieve.py --n 100000 --out /tmp/retrieve.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import psutil
from faiss.contrib.evaluation import knn_intersection_measure
from faiss.contrib.exhaustive_search import knn_ground_truth

from curation.dedup import (
    COPY_K,
    COPY_THRESHOLD,
    connected_components,
    knn_graph,
    select_keepers,
)
from curation.index import build_index


class PeakRSS:
    """Max resident set size of this process while the block runs (sampled every 20 ms)."""

    def __enter__(self) -> PeakRSS:
        self._proc = psutil.Process()
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def _unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def _points(rng: np.random.Generator, centres: np.ndarray, n: int, cos_to_centre: float) -> np.ndarray:
    d = centres.shape[1]
    noise = rng.standard_normal((n, d)).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    x = cos_to_centre * centres[rng.integers(len(centres), size=n)] + np.sqrt(1 - cos_to_centre**2) * noise
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_pool(path: Path, args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Write the pool; return (memmap, centres, group id per row: -1 unless an injected copy group)."""
    rng = np.random.default_rng(args.seed)
    centres = _points(rng, _unit(rng.standard_normal((args.centres, args.dim))), args.centres * args.sub_centres, 0.7)
    x = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(args.n, args.dim))
    for start in range(0, args.n, 100_000):
        m = min(100_000, args.n - start)
        x[start : start + m] = _points(rng, centres, m, args.cos_to_centre)
    # Near-duplicate groups: an original and 1-3 perturbed copies scattered over the pool.
    group = np.full(args.n, -1, dtype=np.int64)
    n_groups = int(args.n * args.dup_frac)
    sizes = rng.integers(2, 5, size=n_groups)
    members = rng.permutation(args.n)[: sizes.sum()]
    gid = np.repeat(np.arange(n_groups), sizes)
    group[members] = gid
    first = np.r_[0, np.cumsum(sizes)[:-1]]
    orig = np.repeat(members[first], sizes)
    copies = np.ones(len(members), dtype=bool)
    copies[first] = False
    src = np.asarray(x[orig[copies]], dtype=np.float32)
    noisy = src + 0.45 * rng.standard_normal(src.shape).astype(np.float32) / np.sqrt(args.dim)
    x[members[copies]] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    x.flush()
    return np.load(path, mmap_mode="r"), centres, group


def pair_scores(labels: np.ndarray, group: np.ndarray) -> tuple[float, float]:
    """Pairwise precision/recall of 'same component' against 'same injected group'."""
    sizes = np.bincount(labels)
    in_multi = sizes[labels] > 1
    # Pairs predicted: sum C(size,2) over components; true positives: pairs sharing both.
    pred = int((sizes * (sizes - 1) // 2).sum())
    g = group >= 0
    g_sizes = np.bincount(group[g])
    truth = int((g_sizes * (g_sizes - 1) // 2).sum())
    both = g & in_multi
    _, joint = np.unique(np.stack([labels[both], group[both]]), axis=1, return_counts=True)
    tp = int((joint * (joint - 1) // 2).sum())
    return tp / max(pred, 1), tp / max(truth, 1)


def machine() -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "faiss_omp_threads": faiss.omp_get_max_threads(),
        "faiss_gpus": faiss.get_num_gpus(),
        "gpu": gpu,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "faiss": faiss.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--centres", type=int, default=1_000)
    ap.add_argument("--sub-centres", type=int, default=10, help="sub-cluster centres per centre")
    ap.add_argument("--cos-to-centre", type=float, default=0.6, help="of a point to its sub-centre")
    ap.add_argument("--dup-frac", type=float, default=0.01, help="near-duplicate groups per pool row")
    ap.add_argument("--queries", type=int, default=1_000, help="fresh queries for recall@10")
    ap.add_argument("--qps-queries", type=int, default=10_000)
    ap.add_argument("--recall-target", type=float, default=0.95)
    ap.add_argument("--dedup-k", type=int, default=COPY_K)
    ap.add_argument("--dedup-threshold", type=float, default=COPY_THRESHOLD)
    ap.add_argument("--skip-dedup", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    res: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    res["machine"] = machine()

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        x, centres, group = make_pool(Path(tmp) / "pool.npy", args)
        res["generate_s"] = time.perf_counter() - t

        with PeakRSS() as mem:
            t = time.perf_counter()
            index = build_index(x, recall_target=args.recall_target, seed=args.seed)
            res["build_s"] = time.perf_counter() - t
            res["index_params"] = index.params
            q = _points(np.random.default_rng(args.seed + 1), centres, args.queries, args.cos_to_centre)
            blocks = (np.ascontiguousarray(x[s : s + 65_536], dtype=np.float32) for s in range(0, len(x), 65_536))
            _, truth = knn_ground_truth(np.ascontiguousarray(q, dtype=np.float32), blocks, 10,
                                        metric_type=faiss.METRIC_INNER_PRODUCT)
            _, got = index.search(q, 10)
            res["recall_at_10_fresh_queries"] = knn_intersection_measure(got, truth)
            qq = _points(np.random.default_rng(args.seed + 2), centres, args.qps_queries, args.cos_to_centre)
            t = time.perf_counter()
            index.search(qq, 10)
            res["queries_per_s"] = args.qps_queries / (time.perf_counter() - t)
            t = time.perf_counter()
            res["index_bytes"] = len(index.to_bytes())
            res["serialise_s"] = time.perf_counter() - t
        res["index_peak_rss_bytes"] = mem.peak

        if not args.skip_dedup:
            with PeakRSS() as mem:
                t = time.perf_counter()
                src, dst, _ = knn_graph(index, args.dedup_k, args.dedup_threshold, x=x)
                res["graph_s"] = time.perf_counter() - t
                t = time.perf_counter()
                labels = connected_components(len(x), src, dst)
                keep, _ = select_keepers(labels, np.ones(len(x)))
                res["components_s"] = time.perf_counter() - t
            res["dedup_peak_rss_bytes"] = mem.peak
            res["edges"] = len(src)
            res["edges_per_s"] = len(src) / res["graph_s"]
            res["query_rows_per_s"] = len(x) / res["graph_s"]
            res["components"] = int(labels.max()) + 1
            res["removed"] = int((~keep).sum())
            res["injected_copies"] = int((group >= 0).sum() - len(np.unique(group[group >= 0])))
            res["pair_precision"], res["pair_recall"] = pair_scores(labels, group)
        del x, index

    gib = 2**30
    p = res["index_params"]
    rows = [
        ("pool", f"{args.n:,} x {args.dim} float16 (memmap)"),
        ("index", f"{p['kind']} nlist={p['nlist']} nprobe={p['nprobe']} m={p['m']}"),
        ("build", f"{res['build_s']:.1f} s"),
        ("recall@10 tuning / fresh", f"{p['recall_at_10']:.3f} / {res['recall_at_10_fresh_queries']:.3f}"),
        ("queries/s (k=10)", f"{res['queries_per_s']:,.0f}"),
        ("index bytes", f"{res['index_bytes'] / gib:.2f} GiB"),
        ("peak RSS (index)", f"{res['index_peak_rss_bytes'] / gib:.2f} GiB"),
    ]
    if not args.skip_dedup:
        rows += [
            (f"kNN graph k={args.dedup_k} cos>{args.dedup_threshold}", f"{res['graph_s']:.1f} s"),
            ("edges, edges/s", f"{res['edges']:,}, {res['edges_per_s']:,.0f}"),
            ("rows queried/s", f"{res['query_rows_per_s']:,.0f}"),
            ("components (removed)", f"{res['components']:,} ({res['removed']:,})"),
            ("injected copies", f"{res['injected_copies']:,}"),
            ("pair precision / recall", f"{res['pair_precision']:.3f} / {res['pair_recall']:.3f}"),
            ("peak RSS (dedup)", f"{res['dedup_peak_rss_bytes'] / gib:.2f} GiB"),
        ]
    w = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"{a:<{w}}  {b}")
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
