"""Training-data throughput: multi-crop pipeline vs plain decode+resize, and the loader with workers.

Generates its own JPEGs in a temp dir. Per-worker numbers run in this process (one core's worth);
the loader number is the full ``TrainLoader`` (sampler, decode, multi-crop, masks, collate).

    .venv/bin/python benchmarks/loader.py --out loader.json
    .venv/bin/python benchmarks/loader.py --n-images 32 --steps 4 --batch-size 8   # small
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from catalog.decode import decode_rgb
from training.data.dataset import PartDataset
from training.data.loader import TrainLoader
from training.data.mixing import MixConfig
from training.data.multicrop import MultiCrop, MultiCropConfig


def make_jpegs(root: Path, n: int, size: int, seed: int) -> list[str]:
    """Smooth random colour fields plus noise: photo-like JPEG sizes and decode costs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    paths = []
    for i in range(n):
        coef = rng.normal(size=(3, 4))
        base = coef[:, :1, None] * np.sin(6 * xx * coef[:, 1:2, None] + 4 * yy * coef[:, 2:3, None]) + coef[:, 3:4, None]
        img = 127 + 60 * base.transpose(1, 2, 0) + rng.normal(0, 12, (size, size, 3))
        path = root / f"img_{i:05d}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


def per_worker_rate(paths: list[str], fn) -> tuple[float, float]:
    """Images per wall second and per CPU second (the latter is robust on a shared, busy host)."""
    wall, cpu = time.perf_counter(), time.process_time()
    for i, path in enumerate(paths):
        fn(Path(path).read_bytes(), i)
    return len(paths) / (time.perf_counter() - wall), len(paths) / (time.process_time() - cpu)


def loader_rate(parts: dict[str, PartDataset], crops: MultiCropConfig, args: argparse.Namespace) -> float:
    mix = MixConfig({k: len(v) for k, v in parts.items()}, seed=0)
    loader = TrainLoader(parts, mix, crops, batch_size=args.batch_size, num_workers=args.workers)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    start = time.perf_counter()
    for _ in range(args.steps):
        next(it)
    return args.steps * args.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--n-local", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    crops = MultiCropConfig(global_size=args.global_size, local_size=args.local_size, n_local=args.n_local)
    pipeline = MultiCrop(crops)
    torch.set_num_threads(1)  # as inside a DataLoader worker
    size = args.global_size
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), args.n_images, args.image_size, seed=0)
        plain = per_worker_rate(
            paths, lambda data, i: decode_rgb(data).resize((size, size), Image.Resampling.BICUBIC)
        )
        multicrop = per_worker_rate(paths, lambda data, i: pipeline(decode_rgb(data), np.random.default_rng(i)))
        half = len(paths) // 2
        parts = {
            name: PartDataset(name, pa.table({"image_id": pa.array(range(len(p)), pa.int64()), "uri": p}))
            for name, p in (("imagenet1k", paths[:half]), ("other", paths[half:]))
        }
        loader = loader_rate(parts, crops, args)

    results = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads_per_worker": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(),
            "load_average": os.getloadavg(),
        },
        "config": vars(args) | {"out": str(args.out) if args.out else None},
        "images_per_s": {
            "decode_resize_per_worker": plain[0],
            "multicrop_per_worker": multicrop[0],
            f"loader_{args.workers}_workers": loader,
        },
        "images_per_cpu_s": {"decode_resize_per_worker": plain[1], "multicrop_per_worker": multicrop[1]},
    }
    crops_desc = f"2x{args.global_size} + {args.n_local}x{args.local_size}"
    print(f"{'measure':<42}{'images/s':>10}{'images/cpu-s':>14}")
    print(f"{'decode+resize ' + str(size) + ' (1 worker)':<42}{plain[0]:>10.1f}{plain[1]:>14.1f}")
    print(f"{'decode+multicrop ' + crops_desc + ' (1 worker)':<42}{multicrop[0]:>10.1f}{multicrop[1]:>14.1f}")
    print(f"{'TrainLoader, ' + str(args.workers) + ' workers':<42}{loader:>10.1f}{'':>14}")
    print(f"machine: {results['machine']}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
