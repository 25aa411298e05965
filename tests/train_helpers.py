"""Training test helpers: a small JPEG catalog of two curated parts, and 2-process torchrun launches."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from catalog.shards import write_shards
from tests.helpers import REPO, cli_env

CONFIGS = Path(REPO) / "training" / "configs"
TINY = str(CONFIGS / "tiny_cpu.yaml")
PARTS = ("shapes_a", "shapes_b")


def make_catalog(root: Path, per_part: int = 12, seed: int = 0) -> str:
    """Real JPEGs of coloured shapes (ellipses in one part, rectangles in the other) as curated parts."""
    rng = np.random.default_rng(seed)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    catalog = str(root / "catalog")
    next_id = 1
    for part, shape in zip(PARTS, ("ellipse", "rectangle")):
        ids, uris = [], []
        for i in range(per_part):
            image = Image.new("RGB", (48, 40), tuple(int(c) for c in rng.integers(0, 256, 3)))
            x, y = (int(v) for v in rng.integers(0, 20, 2))
            getattr(ImageDraw.Draw(image), shape)([x, y, x + 20, y + 16], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
            path = images / f"{part}_{i}.jpg"
            image.save(path, quality=90)
            ids.append(next_id)
            uris.append(str(path))
            next_id += 1
        table = pa.table({"image_id": pa.array(ids, pa.int64()), "uri": uris, "part": [part] * per_part})
        write_shards(catalog, f"curated/{part}", "u0", table)
    return catalog


def torchrun_command(config: str, catalog: str, output_dir: Path, *overrides: str) -> list[str]:
    """``python -m training.train`` under torchrun with 2 CPU processes (gloo), short collective timeout."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "training.train", "--config", config, f"data.catalog_root={catalog}", f"output_dir={output_dir}",
        "dist_timeout_s=60", *overrides,
    ]


def torchrun_env() -> dict[str, str]:
    env = cli_env()
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_torchrun(command: list[str]) -> None:
    done = subprocess.run(command, env=torchrun_env(), capture_output=True, text=True, timeout=300)
    # torchrun's own traceback fills the end; a rank's error comes before it
    assert done.returncode == 0, done.stderr[-12_000:]
