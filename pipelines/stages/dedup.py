"""``curate dedup``: exact duplicates (sha256), copy detection, and relative dedup vs evaluation sets.

Every removed image gets a ``duplicates`` row with the image kept in its place, the similarity and
the reason (``exact``, ``copy``, ``eval:<name>``). Later stages leave these images out. Each step is a
ledger unit, so a killed run redoes at most the step it was in.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa

from catalog import schemas
from catalog.embeddings import load_embeddings
from catalog.ledger import Ledger
from catalog.manifest import RunManifest, fingerprint
from catalog.shards import delete_table, table_exists, write_shards
from catalog.sql import query
from curation.copy_descriptor import COPY_THRESHOLD as PIXEL_COPY_THRESHOLD
from curation.copy_descriptor import RELATIVE_THRESHOLD as PIXEL_RELATIVE_THRESHOLD
from curation.copy_descriptor import copy_descriptor, mirror
from catalog.decode import DecodeError, decode_rgb
from curation.dedup import (
    COPY_K,
    COPY_THRESHOLD,
    RELATIVE_THRESHOLD,
    copy_dedup,
    relative_dedup,
)
from pipelines.stages.ingest import COPY_DESCRIPTORS, IMAGE_EXTENSIONS
from pipelines.reports import write_dedup_report

STAGE = "dedup"


@dataclass(frozen=True)
class DedupConfig:
    """``descriptor``: ``pixels`` (built in, see curation.copy_descriptor) or ``embeddings`` (the
    catalog's embeddings table, e.g. of a copy-detection model like SSCD, as DINOv2 used)."""

    descriptor: Literal["pixels", "embeddings"] = "pixels"
    k: int = COPY_K
    threshold: float | None = None
    eval_sets: dict[str, str] = field(default_factory=dict)
    relative_threshold: float | None = None
    seed: int = 0

    def copy_threshold(self) -> float:
        default = PIXEL_COPY_THRESHOLD if self.descriptor == "pixels" else COPY_THRESHOLD
        return self.threshold if self.threshold is not None else default

    def eval_threshold(self) -> float:
        default = PIXEL_RELATIVE_THRESHOLD if self.descriptor == "pixels" else RELATIVE_THRESHOLD
        return self.relative_threshold if self.relative_threshold is not None else default


def _rows(image_id, kept_id, similarity, reason: str) -> pa.Table:
    n = len(image_id)
    return pa.table({"image_id": pa.array(np.asarray(image_id, np.int64)),
                     "kept_id": pa.array(np.asarray(kept_id, np.int64)),
                     "similarity": pa.array(np.asarray(similarity, np.float32)),
                     "reason": pa.array([reason] * n, pa.string())},
                    schema=schemas.stamp(schemas.DUPLICATES, "duplicates"))


def exact_step(root: str) -> pa.Table:
    """Byte-identical files (same sha256): the smallest image_id of each group is kept."""
    t = query(root, "SELECT image_id, kept_id FROM (SELECT image_id, min(image_id) OVER (PARTITION BY sha256) "
                    "AS kept_id FROM pool WHERE status = 'ok') WHERE image_id <> kept_id ORDER BY image_id")
    ids = t.column("image_id").to_numpy()
    return _rows(ids, t.column("kept_id").to_numpy(), np.ones(len(ids)), "exact")


def _descriptors(root: str, config: DedupConfig) -> tuple[np.ndarray, np.ndarray]:
    return load_embeddings(root, COPY_DESCRIPTORS if config.descriptor == "pixels" else "embeddings")


def _removed_by(root: str, reasons: list[str]) -> np.ndarray:
    """Images removed by earlier steps only, so redoing a step after a kill sees the same input."""
    if not table_exists(root, "duplicates") or not reasons:
        return np.empty(0, np.int64)
    listed = ", ".join(f"'{r}'" for r in reasons)
    return query(root, f"SELECT image_id FROM duplicates WHERE reason IN ({listed})").column(0).to_numpy()


def copy_step(root: str, config: DedupConfig) -> pa.Table:
    """Near copies: k-NN graph above the threshold, connected components, keep the largest image."""
    ids, x = _descriptors(root, config)
    keep = ~np.isin(ids, _removed_by(root, ["exact"]))
    ids, x = ids[keep], x[keep]
    order = np.argsort(ids)
    ids, x = ids[order], np.ascontiguousarray(x[order])
    sizes = query(root, "SELECT image_id, coalesce(width * height, 0) AS px FROM pool WHERE status = 'ok'")
    px = dict(zip(sizes.column("image_id").to_pylist(), sizes.column("px").to_pylist()))
    priority = np.asarray([px.get(int(i), 0) for i in ids], np.float64)
    result = copy_dedup(x, ids, priority, config.k, config.copy_threshold(), seed=config.seed,
                        mirror=mirror if config.descriptor == "pixels" else None)
    return _rows(ids[result.removed_rows], ids[result.keeper_of_removed], result.removed_similarity, "copy")


def eval_descriptors(folder: str) -> np.ndarray:
    """Pixel descriptors of every readable image in an evaluation-set folder."""
    out = []
    for dirpath, _, files in os.walk(folder):
        for name in sorted(files):
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                try:
                    with open(os.path.join(dirpath, name), "rb") as f:
                        out.append(copy_descriptor(decode_rgb(f.read())))
                except (DecodeError, OSError):
                    continue
    if not out:
        raise FileNotFoundError(f"evaluation set {folder} holds no readable image")
    return np.stack(out)


def eval_step(root: str, config: DedupConfig, name: str, folder: str) -> pa.Table:
    """Remove every pool image whose copy component touches an image of the evaluation set."""
    if config.descriptor != "pixels":
        raise ValueError("relative dedup against image folders needs descriptor=pixels")
    ids, x = _descriptors(root, config)
    earlier = ["exact", "copy"] + [f"eval:{n}" for n in sorted(config.eval_sets) if n < name]
    keep = ~np.isin(ids, _removed_by(root, earlier))
    ids, x = ids[keep], x[keep]
    rows = relative_dedup(x, eval_descriptors(folder), config.k, config.eval_threshold(), seed=config.seed,
                          mirror=mirror)
    return _rows(ids[rows], np.full(len(rows), -1), np.full(len(rows), np.nan), f"eval:{name}")


def dedup(root: str, config: DedupConfig | None = None, *, overwrite: bool = False) -> dict[str, int]:
    """Run the dedup steps not yet done; returns how many images each step removed."""
    config = config or DedupConfig()
    ledger = Ledger(root, STAGE)
    if overwrite:
        ledger.reset()
        delete_table(root, "duplicates")
    ledger.check_plan(fingerprint(asdict(config)))
    steps = [("exact", lambda: exact_step(root)), ("copy", lambda: copy_step(root, config))]
    steps += [(f"eval-{name}", lambda n=name, f=folder: eval_step(root, config, n, f))
              for name, folder in sorted(config.eval_sets.items())]
    done = ledger.done()
    counts = {}
    with RunManifest(root, STAGE, asdict(config)) as manifest:
        for unit, run in steps:
            if unit in done:
                counts[unit] = done[unit]["removed"]
                continue
            table = run()
            write_shards(root, "duplicates", unit, table)
            ledger.mark(unit, {"removed": table.num_rows})
            counts[unit] = table.num_rows
        total = query(root, "SELECT count(*) FROM pool WHERE status = 'ok'").column(0)[0].as_py()
        manifest.rows = {"in": total, "out": total - sum(counts.values()), "errored": 0, **counts}
    ledger.mark_complete(counts)
    if counts.get("copy"):
        write_dedup_report(root)
    return counts
