"""Copy detection with the pixel descriptor: precision and recall of copy groups on three sets.

    .venv/bin/python -m benchmarks.copy_descriptor --n 3000 --out copy_descriptor.json
    .venv/bin/python -m benchmarks.copy_descriptor --demo /tmp/demo_pool   # an existing demo pool
    .venv/bin/python -m benchmarks.copy_descriptor --export-demo-standin /tmp/standin.pt
    .venv/bin/python -m benchmarks.copy_descriptor --demo /tmp/demo_pool --torchscript /tmp/standin.pt

* ``demo``: the demo pool's files (`pipelines.demo.pool`), decoded as ingest decodes them; the truth's
  ``dup_group`` marks the injected near-duplicates (re-encoded, resized, cropped ≤ 5 %, re-formatted)
  and exact copies. Distinct instances of one concept are distinct images.
* ``variants``: 300 distinct demo images, each with copies mirrored, cropped ≤ 6 % a side, colour
  jittered ±20 %, re-encoded at JPEG quality 45-75, resized ×0.6-1.4, and all of those at once
  (`curation.synthetic_images.copy_variants`).
* ``glyphs``: look-alike glyphs (case pairs such as w/W, digits, coins differing in their value) at
  32, 48 and 64 px, each with the same variants; also split into ``letters+digits`` and ``coins``.

Each set runs `curation.dedup.copy_dedup` (k = 64, exact search) and is scored on pairs: precision
= pairs put in one component that are truly copies / all pairs put in one component; recall = true
copy pairs put in one component / all true copy pairs. Rows: the descriptor as shipped (mirrored
search, candidates above its ``COPY_THRESHOLD`` confirmed by `curation.copy_verify`), the descriptor
alone at 0.88 (before the check) and the 16×16 thumbnail before it (cos > 0.95), for reference;
with ``--torchscript PATH``, also that model as ``dedup.descriptor=torchscript:PATH`` runs it (SSCD's
input conventions, threshold calibrated on the stage's default set, the demo pool's injected groups).
``--export-demo-standin OUT`` writes a TorchScript stand-in with SSCD's conventions (320×320
ImageNet-normalised in, one vector out): the shipped demo backbone, fed at its 64 px, cls+mean.
``seconds``: the graph and the check (descriptors and thumbnails are made beforehand, as ingest and
the dedup stage's reads do).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from benchmarks.common import report
from catalog.decode import DecodeError, decode_rgb
from curation import copy_descriptor as cd
from curation import copy_verify as cv
from curation import torchscript_descriptor as tsd
from curation.dedup import copy_dedup
from curation.index import build_index
from curation.synthetic_images import copy_variants, look_alike_glyphs
from pipelines.dedup_model import demo_copy_groups
from pipelines.stages.dedup import DedupConfig

Item = tuple[Image.Image, int]  # image, copy group (-1: no copy of anything)


def thumbnail16(img: Image.Image) -> np.ndarray:
    """The descriptor before this one: 16×16 RGB, per-channel mean removed, unit norm."""
    a = np.asarray(img.convert("RGB").resize((16, 16), Image.Resampling.BOX), np.float32).reshape(-1, 3)
    v = (a - a.mean(axis=0)).ravel()
    return v / max(float(np.linalg.norm(v)), 1e-12)


def demo_items(root: Path) -> list[Item]:
    items = []
    for row in pq.read_table(root / "truth" / "pool.parquet").to_pylist():
        try:
            data = (root / "pool" / row["relpath"]).read_bytes()
            items.append((decode_rgb(data, min_side=2 * cd.SIDE), row["dup_group"]))
        except (DecodeError, OSError):
            continue  # broken files never reach the descriptor
    return items


def variant_items(demo: list[Item], n: int, seed: int) -> list[Item]:
    rng = np.random.default_rng(seed)
    singles = [img for img, group in demo if group < 0]
    out: list[Item] = []
    for g, i in enumerate(rng.choice(len(singles), min(n, len(singles)), replace=False)):
        out.append((singles[i], g))
        out += [(v, g) for _, v in copy_variants(singles[i], rng)]
    return out


def glyph_items(seed: int) -> dict[str, list[Item]]:
    rng = np.random.default_rng(seed)
    groups: dict[str, int] = {}
    sets: dict[str, list[Item]] = {"glyphs": [], "letters+digits": [], "coins": []}
    for side in (32, 48, 64):
        for name, img in look_alike_glyphs(side):
            g = groups.setdefault(name, len(groups))
            copies = [(img, g)] + [(v, g) for _, v in copy_variants(img, rng)]
            sets["glyphs"] += copies
            sets["coins" if name.startswith("coin") else "letters+digits"] += copies
    return sets


def _pairs(labels: np.ndarray) -> set[tuple[int, int]]:
    out = set()
    for lab in np.unique(labels[labels >= 0]):
        members = np.flatnonzero(labels == lab)
        out |= {(int(a), int(b)) for i, a in enumerate(members) for b in members[i + 1 :]}
    return out


def score(items: list[Item], describe: Callable[[Image.Image], np.ndarray], threshold: float,
          mirror: Callable[[np.ndarray], np.ndarray] | None, check: bool) -> dict:
    x = np.stack([describe(img) for img, _ in items]).astype(np.float32)
    groups = np.array([g for _, g in items])
    n = len(items)
    verify = None
    if check:
        thumbs = np.stack([cv.thumbnail(img) for img, _ in items])
        sides = np.array([min(img.size) for img, _ in items])
        verify = cv.edge_check(x, lambda rows: (thumbs[rows], sides[rows]))
    start = time.perf_counter()
    result = copy_dedup(x, np.arange(n), np.zeros(n), threshold=threshold,
                        index=build_index(x, exact_max=max(n, 1)), mirror=mirror, verify=verify)
    seconds = time.perf_counter() - start
    merged = np.where(np.bincount(result.labels)[result.labels] > 1, result.labels, -1)
    found, truth = _pairs(merged), _pairs(groups)
    hits = len(found & truth)
    return {"images": n, "true_pairs": len(truth), "found_pairs": len(found),
            "precision": hits / len(found) if found else 1.0, "recall": hits / len(truth) if truth else 1.0,
            "removed": len(result.removed_rows), "seconds": round(seconds, 2)}


def export_demo_standin(out: str) -> None:
    """The demo backbone as a TorchScript copy descriptor taking SSCD's input (a stand-in: no SSCD here)."""
    import torch

    from pipelines.demo.backbone import DEMO_BACKBONE
    from training.models.checkpoints import load_backbone

    vit, _ = load_backbone(f"curate:{DEMO_BACKBONE}", None)

    class StandIn(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vit = vit

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", antialias=True)
            return self.vit.embed(x, "cls+mean", normalize=False)

    with torch.no_grad():
        torch.jit.trace(StandIn().eval(), torch.zeros(2, 3, 320, 320)).save(out)
    print(f"wrote {out}")


def model_row(path: str) -> tuple:
    model = tsd.load_scripted(Path(path).read_bytes(), dim=_output_dim(path))
    images, labels = demo_copy_groups(DedupConfig.calibration_groups, DedupConfig.seed)  # the stage's default
    cal = tsd.calibrate(tsd.describe(model, images), labels)
    print(f"calibrated on {cal.images} images: threshold {cal.threshold:.3f}, P {cal.precision:.3f}, R {cal.recall:.3f}")
    return (f"torchscript {Path(path).name}", lambda img: tsd.describe(model, [img])[0], cal.threshold, None, False)


def _output_dim(path: str) -> int:
    import torch

    return int(torch.jit.load(path)(torch.zeros(1, 3, 320, 320)).shape[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", help="an existing demo pool (default: generate one of --n files)")
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--variants", type=int, default=300, help="demo images that get copy variants")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="")
    p.add_argument("--torchscript", default="", help="also score this TorchScript copy-detection model")
    p.add_argument("--export-demo-standin", default="", help="write the demo backbone as TorchScript and exit")
    a = p.parse_args()
    if a.export_demo_standin:
        export_demo_standin(a.export_demo_standin)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.demo) if a.demo else Path(tmp) / "demo"
        if not a.demo:
            from pipelines.demo.pool import generate_demo_pool

            generate_demo_pool(str(root), n=a.n, seed=a.seed, workers=os.cpu_count())
        demo = demo_items(root)
    sets = {"demo": demo, "variants": variant_items(demo, a.variants, a.seed), **glyph_items(a.seed)}
    descriptors = [
        (f"{cd.NAME}, mirrored search + pixel check", cd.copy_descriptor, cd.COPY_THRESHOLD, cd.mirror, True),
        (f"{cd.NAME}, mirrored search alone (before)", cd.copy_descriptor, 0.88, cd.mirror, False),
        ("thumbnail16 (before)", thumbnail16, 0.95, None, False),
    ] + ([model_row(a.torchscript)] if a.torchscript else [])
    rows = []
    for name, describe, threshold, mirror, check in descriptors:
        for set_name, items in sets.items():
            rows.append({"descriptor": name, "threshold": threshold, "set": set_name,
                         **score(items, describe, threshold, mirror, check)})
            print(rows[-1], flush=True)
    report("copy detection: pair precision / recall per set", rows, a.out, {"args": vars(a)})


if __name__ == "__main__":
    main()
