"""`curate explore` on a synthetic catalog: build time, and the largest file (and page) the site loads.

    python -m benchmarks.explore --rows 1000000 --out docs/results/explore_1m_cpu.json

The catalog is written with the catalog's own writers: pool, embeddings, a 5-level hierarchy in the
``clusters`` / ``centroids`` tables (``default_levels`` sizes, long-tailed level-1 clusters; labels and
centroids drawn, not k-means, which would dominate the time), ``curated/lvd`` by the real ``sample``
stage, some duplicates and errors. Every pool row points at one of a few thousand rendered JPEGs, so
thumbnails decode real files without writing a million of them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import report
from catalog import schemas
from catalog.embeddings import embeddings_table
from catalog.manifest import RunManifest, list_manifests
from catalog.shards import write_shards
from catalog.sql import query
from curation.hierarchy import Hierarchy, default_levels
from pipelines.executors import EXECUTORS
from pipelines.explore.config import ExploreConfig
from pipelines.explore.site import build_site
from pipelines.stage import run_stage
from pipelines.stages.cluster import centroids_table, clusters_table
from pipelines.stages.sample import SampleConfig

SHARD_ROWS = 250_000


def render_images(folder: str, n: int, seed: int = 0) -> list[str]:
    """``n`` small JPEGs: a coloured background and a shape, different enough to tell apart."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        img = Image.new("RGB", (96, 96), tuple(int(c) for c in rng.integers(40, 230, 3)))
        draw = ImageDraw.Draw(img)
        x0, y0 = (int(v) for v in rng.integers(20, 76, 2))
        r = int(rng.integers(12, 30))
        fill = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if i % 2 else draw.rectangle)((x0 - r, y0 - r, x0 + r, y0 + r), fill=fill)
        path = os.path.join(folder, f"{i:05d}.jpg")
        img.save(path, quality=85)
        paths.append(path)
    return paths


def hierarchy(n: int, dim: int, rng: np.random.Generator) -> tuple[Hierarchy, np.ndarray]:
    """Labels and centroids of a 5-level tree sized like ``default_levels(n)``, and embeddings near them."""
    ks = [s.clusters for s in default_levels(n)]
    centroids = [None] * len(ks)
    parents = [rng.integers(0, ks[t + 1], ks[t]) for t in range(len(ks) - 1)]
    for t in range(len(ks) - 1):  # every upper cluster has at least one child
        parents[t][: ks[t + 1]] = rng.permutation(ks[t + 1])
    top = rng.standard_normal((ks[-1], dim)).astype(np.float32)
    centroids[-1] = top / np.linalg.norm(top, axis=1, keepdims=True)
    for t in range(len(ks) - 2, -1, -1):
        c = centroids[t + 1][parents[t]] + 0.5 * rng.standard_normal((ks[t], dim)).astype(np.float32) / np.sqrt(dim)
        centroids[t] = c / np.linalg.norm(c, axis=1, keepdims=True)
    weights = rng.pareto(1.5, ks[0]) + 1.0
    point = rng.choice(ks[0], size=n, p=weights / weights.sum())
    point[: ks[0]] = np.arange(ks[0])  # no empty level-1 cluster
    x = centroids[0][point] + 0.3 * rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    distances = 1.0 - np.einsum("ij,ij->i", x, centroids[0][point])
    return Hierarchy(centroids=centroids, labels=[point, *parents], distances=distances), x


def write_catalog(root: str, rows: int, n_images: int, dim: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    images = render_images(os.path.join(os.path.dirname(root), "images"), n_images, seed)
    n_dups = rows // 50
    n_errors = rows // 200
    total = rows + n_dups + n_errors
    ids = rng.permutation(np.arange(total, dtype=np.int64) * 2_654_435_761 - 2**62)
    uris = [images[i % n_images] for i in range(total)]
    status = np.array(["ok"] * (rows + n_dups) + ["error"] * n_errors)
    for start in range(0, total, SHARD_ROWS):
        sl = slice(start, start + SHARD_ROWS)
        n = len(ids[sl])
        pool = pa.table({"image_id": ids[sl], "uri": uris[sl], "bytes": np.full(n, 3000), "width": np.full(n, 96, np.int32),
                         "height": np.full(n, 96, np.int32), "format": ["JPEG"] * n,
                         "sha256": [f"{i:064x}" for i in range(start, start + n)], "status": status[sl]},
                        schema=schemas.stamp(schemas.POOL, "pool"))
        write_shards(root, "pool", f"u{start // SHARD_ROWS:05d}", pool)
    clustered = np.sort(ids[:rows])
    tree, x = hierarchy(rows, dim, rng)
    for start in range(0, rows, SHARD_ROWS):
        write_shards(root, "embeddings", f"u{start // SHARD_ROWS:05d}",
                     embeddings_table(clustered[start:start + SHARD_ROWS], x[start:start + SHARD_ROWS].astype(np.float16),
                                      {"model": "synthetic"}))
    write_shards(root, "clusters", "clusters", clusters_table(clustered, tree))
    write_shards(root, "centroids", "centroids", centroids_table(tree))
    kept = clustered[rng.integers(0, rows, n_dups)]
    write_shards(root, "duplicates", "copy", pa.table(
        {"image_id": ids[rows:rows + n_dups], "kept_id": kept, "similarity": rng.uniform(0.95, 1.0, n_dups).astype(np.float32),
         "reason": ["copy"] * n_dups}, schema=schemas.stamp(schemas.DUPLICATES, "duplicates")))
    err = slice(rows + n_dups, total)
    write_shards(root, "errors", "ingest", pa.table(
        {"image_id": ids[err], "uri": uris[err], "stage": ["ingest"] * n_errors,
         "reason": np.array(["truncated", "corrupt", "html_page"])[np.arange(n_errors) % 3],
         "message": ["synthetic"] * n_errors}, schema=schemas.stamp(schemas.ERRORS, "errors")))
    with RunManifest(root, "synthetic", {"rows": rows}) as manifest:
        manifest.rows = {"in": total, "out": rows, "errored": n_errors}
    run_stage("sample", root, SampleConfig(target_size=int(rows * 0.3)), executor="local")
    return {"levels": [len(c) for c in tree.centroids], "duplicates": n_dups, "errors": n_errors}


def page_loads(site: str) -> dict:
    """Largest data file, and the largest total a node page loads: its data file plus every sprite
    sheet it references (the app, the summary and the search shards come on top, once)."""
    sheet_size = {f[:-4]: os.path.getsize(os.path.join(site, "thumbs", f)) for f in os.listdir(os.path.join(site, "thumbs"))}
    largest_file = largest_page = 0
    worst = ""
    for dirpath, _, files in os.walk(os.path.join(site, "data")):
        for name in files:
            path = os.path.join(dirpath, name)
            size = os.path.getsize(path)
            largest_file = max(largest_file, size)
            if "/nodes/" not in path and "/dups/" not in path and "/retrieval/" not in path:
                continue
            with open(path) as f:
                sheets = set(re.findall(r'"s":"([^"]+)"', f.read()))
            page = size + sum(sheet_size[s] for s in sheets)
            if page > largest_page:
                largest_page, worst = page, os.path.relpath(path, site)
    largest_sheet = max(sheet_size.values()) if sheet_size else 0
    return {"largest_data_file": largest_file, "largest_sheet": largest_sheet, "largest_page_total": largest_page,
            "largest_page": worst, "sheets": len(sheet_size)}


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed_build(root: str, site: str, config: ExploreConfig, label: str, rows: int, executor: str) -> dict:
    """One build; CPU is this process's plus, when the thumbnails ran on Ray, its workers' unit CPU time
    (from the thumbnails stage's manifest; Ray's own daemons are not counted)."""
    cpu = cpu_seconds()
    out = build_site(root, site, config, executor=executor)
    thumbs = out["thumbnails"]
    run = list_manifests(site)[-1] if thumbs.units_run else {"notes": {"executor": "-"}, "worker_cpu_seconds": 0.0}
    ran_on = run["notes"]["executor"]
    workers_cpu = run["worker_cpu_seconds"] if ran_on == "ray" else 0.0
    return {"build": label, "rows": rows, "node_pages": out["node_pages"], "images_shown": out["images_shown"],
            "thumbnails_built": thumbs.items_run, "executor": ran_on,
            **{f"{k}_s": v for k, v in out["seconds"].items()}, "cpu_s": cpu_seconds() - cpu + workers_cpu}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000, help="clustered images in the synthetic catalog")
    p.add_argument("--images", type=int, default=3000, help="distinct rendered images the rows point at")
    p.add_argument("--dim", type=int, default=64, help="embedding dimension")
    p.add_argument("--executor", choices=EXECUTORS, default="auto",
                   help="where the thumbnails stage runs (auto: in-process below its in_process_below images)")
    p.add_argument("--work", help="folder for the catalog and site (default: a temporary one); a catalog "
                   "already written there by an earlier run is reused, the site is always built afresh")
    p.add_argument("--out")
    args = p.parse_args()
    os.environ.setdefault("CURATE_PROGRESS", "0")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or tmp
        root, site = os.path.join(work, "catalog"), os.path.join(work, "site")
        shutil.rmtree(site, ignore_errors=True)
        t0 = time.time()
        if not os.path.exists(os.path.join(root, "curated")):
            shutil.rmtree(root, ignore_errors=True)
            write_catalog(root, args.rows, args.images, args.dim)
        write_s = time.time() - t0
        levels = query(root, "SELECT count(*) FROM centroids GROUP BY level ORDER BY level").column(0).to_pylist()
        config = ExploreConfig()
        rows = [timed_build(root, site, config, "first (thumbnails made)", args.rows, args.executor),
                timed_build(root, site, config, "again (thumbnails reused)", args.rows, args.executor)]
        loads = page_loads(site)
    report(f"curate explore on a synthetic {args.rows:,}-row catalog (levels {levels})", rows, args.out,
           {"catalog": {"levels": levels, "write_seconds": write_s, "rendered_images": args.images, "dim": args.dim},
            "loads": loads, "load_average": os.getloadavg()})
    print(json.dumps(loads, indent=2))


if __name__ == "__main__":
    main()
