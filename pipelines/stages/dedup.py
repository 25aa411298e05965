"""``curate dedup``: exact duplicates (sha256), copy detection, and relative dedup vs evaluation sets.

Every removed image gets a ``duplicates`` row with the image kept in its place, the similarity and
the reason (``exact``, ``copy``, ``eval:<name>``). Later stages leave these images out. Each step is a
unit of the run, done in order (a step reads what the earlier ones removed), so a killed run redoes at
most the step it was in. The copy step keeps its graph for the next run (`pipelines.dedup_graph`): on a
grown pool it searches only the new images and the copy groups that lost one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from catalog import schemas
from catalog.array_store import CatalogArrayStore
from catalog.config import ConfigError, above, at_least
from catalog.decode import DecodeError, decode_rgb
from catalog.embeddings import RowStream, embedding_metadata, row_stream
from catalog.errors import MissingInputError, UserError
from catalog.id_lookup import lookup
from catalog.images import UnreadableItem, read_item, resolve_uris
from catalog.lineage import listing_fingerprint
from catalog.manifest import fingerprint
from catalog.paths import Produce, read_bytes, resolve, retry, with_protocol
from catalog.schemas import (
    COPY_DESCRIPTORS_TABLE,
    DUPLICATES_TABLE,
    EMBEDDINGS_TABLE,
    MODEL_COPY_DESCRIPTORS_TABLE,
    POOL_TABLE,
    metadata_of,
)
from catalog.shards import check_shards, table_exists
from catalog.sql import query
from curation.copy_descriptor import COPY_THRESHOLD as PIXEL_COPY_THRESHOLD
from curation.copy_descriptor import NAME as COPY_DESCRIPTOR_NAME
from curation.copy_descriptor import RELATIVE_THRESHOLD as PIXEL_RELATIVE_THRESHOLD
from curation.copy_descriptor import copy_descriptor, mirror
from curation.copy_verify import FIXED_SETTINGS as CHECK_FIXED_SETTINGS
from curation.copy_verify import RESIDUAL_THRESHOLD as CHECK_THRESHOLD
from curation.copy_verify import SIDE as CHECK_SIDE
from curation.copy_verify import edge_check, thumbnail
from curation.dedup import (
    COPY_K,
    COPY_THRESHOLD,
    GRAPH_BATCH,
    RELATIVE_THRESHOLD,
    EdgeSearch,
    copy_dedup,
    local_edges,
    relative_dedup,
)
from curation.torchscript_descriptor import IMAGENET_MEAN, IMAGENET_STD, SSCD_DIM, SSCD_SIZE
from pipelines import dedup_model
from pipelines.dedup_graph import CONTENT_HASH, graph_files, graph_start, graph_summary
from pipelines.reports import write_dedup_report
from pipelines.stage import Output, Stage, StageContext, Totals, Unit

log = logging.getLogger("curate.pipelines")


@dataclass(frozen=True)
class DedupConfig:
    """``descriptor``: ``pixels`` (built in, see curation.copy_descriptor), ``embeddings`` (the
    catalog's embeddings table) or ``torchscript:PATH``, a copy-detection model such as SSCD as DINOv2
    used (`curation.torchscript_descriptor`): fed ``model_size``² images normalised by ``model_mean`` /
    ``model_std``, returning ``model_dim`` values (SSCD's defaults); its threshold, unless given, is
    calibrated on labelled copies (reports/dedup/calibration.json): the ``<group>/<image>`` folders of
    ``calibration_copies`` (your own copies; a demo pool's ``eval/instances`` holds its groups), or else
    ``calibration_groups`` of the near-duplicate groups the demo pool injects, made in memory.

    ``check_threshold``: the largest local residual of a copy in the pixel check of each candidate pair
    (`curation.copy_verify`, which also compares the pair's colour fields; pixels only; null: no check,
    the descriptor alone decides). ``threshold`` is then the candidates' descriptor cosine.

    ``max_removed_share``: a run that would remove more of the pool than this fails instead (real pools
    hold a few percent of copies; more means a threshold or descriptor that merges distinct images).

    ``workers > 1``: the k-NN graph's query blocks (``query_block`` rows each) are searched on that many
    Ray actors of ``worker_cpus`` CPUs (`pipelines.distributed_search`); the result is the same as with one."""

    descriptor: str = "pixels"
    k: int = COPY_K
    threshold: float | None = None
    eval_sets: dict[str, str] = field(default_factory=dict)
    relative_threshold: float | None = None
    seed: int = 0
    max_removed_share: float = 0.20
    workers: int = 1
    worker_cpus: float = 1.0
    query_block: int = GRAPH_BATCH
    check_threshold: float | None = CHECK_THRESHOLD
    model_size: int = SSCD_SIZE
    model_dim: int = SSCD_DIM
    model_mean: tuple[float, float, float] = IMAGENET_MEAN
    model_std: tuple[float, float, float] = IMAGENET_STD
    calibration_groups: int = 40
    calibration_copies: str = ""

    def __post_init__(self) -> None:
        at_least(self, 1, "k", "workers", "query_block", "model_dim")
        at_least(self, 8, "model_size")
        at_least(self, 2, "calibration_groups")
        above(self, 0, "worker_cpus")
        if self.descriptor not in ("pixels", "embeddings") and not dedup_model.model_path(self.descriptor):
            raise ConfigError(f"descriptor is pixels, embeddings or torchscript:PATH, got {self.descriptor!r}")
        if not 0.0 < self.max_removed_share <= 1.0:
            raise ConfigError(f"max_removed_share is a share of the pool in (0, 1], got {self.max_removed_share}")
        if self.check_threshold is not None and not self.check_threshold > 0:
            raise ConfigError(f"check_threshold is a residual in grey standard deviations (> 0) or null, "
                              f"got {self.check_threshold}")
        for name in ("threshold", "relative_threshold"):
            value = getattr(self, name)
            if value is not None and not -1.0 <= value <= 1.0:
                raise ConfigError(f"{name} is a cosine similarity in [-1, 1], got {value}")
        if self.eval_sets and self.descriptor != "pixels":
            raise ConfigError("relative dedup against image folders (eval_sets) needs descriptor=pixels")

    def copy_threshold(self) -> float:
        if self.threshold is not None:
            return self.threshold
        if self.model() is not None:
            return self.calibration().threshold
        return PIXEL_COPY_THRESHOLD if self.descriptor == "pixels" else COPY_THRESHOLD

    def model(self) -> dedup_model.ScriptedDescriptor | None:
        path = dedup_model.model_path(self.descriptor)
        if path is None:
            return None
        return dedup_model.load_model(path, self.model_size, self.model_dim, tuple(self.model_mean),
                                      tuple(self.model_std))

    def calibration(self) -> dedup_model.Calibration:
        return dedup_model.calibration(self.model(), self.descriptor, self.calibration_groups, self.seed,
                                       self.calibration_copies)

    def eval_threshold(self) -> float:
        default = PIXEL_RELATIVE_THRESHOLD if self.descriptor == "pixels" else RELATIVE_THRESHOLD
        return self.relative_threshold if self.relative_threshold is not None else default


def _rows(image_id, kept_id, similarity, reason: str) -> pa.Table:
    n = len(image_id)
    return pa.table({"image_id": pa.array(np.asarray(image_id, np.int64)),
                     "kept_id": pa.array(np.asarray(kept_id, np.int64)),
                     "similarity": pa.array(np.asarray(similarity, np.float32)),
                     "reason": pa.array([reason] * n, pa.string())},
                    schema=schemas.stamp(schemas.DUPLICATES, DUPLICATES_TABLE))


def exact_step(root: str) -> pa.Table:
    """Byte-identical files (same sha256): the smallest image_id of each group is kept."""
    t = query(root, "SELECT image_id, kept_id FROM (SELECT image_id, min(image_id) OVER (PARTITION BY sha256) "
                    "AS kept_id FROM pool WHERE status = 'ok') WHERE image_id <> kept_id ORDER BY image_id")
    ids = t.column("image_id").to_numpy()
    return _rows(ids, t.column("kept_id").to_numpy(), np.ones(len(ids)), "exact")


def descriptor_table(config: DedupConfig) -> str:
    """The table copy detection reads, by ``descriptor`` (the model's is written by this stage)."""
    if config.descriptor == "pixels":
        return COPY_DESCRIPTORS_TABLE
    return EMBEDDINGS_TABLE if config.descriptor == "embeddings" else MODEL_COPY_DESCRIPTORS_TABLE


def _descriptors(root: str, config: DedupConfig, step: str) -> RowStream:
    """The descriptors (in their storage dtype, by sorted id) of the images the steps before ``step`` kept,
    read from their table when asked for (the copy step's index can hold them in place of a copy)."""
    if config.descriptor == "pixels":
        check_pixel_descriptors(root)
    return row_stream(root, descriptor_table(config), exclude_ids=_removed_by(root, _reasons_before(config, step)))


def check_pixel_descriptors(root: str) -> None:
    """Refuse ingest's copy descriptors when a shard was made by another version of the pixel descriptor
    (an older curate): its cosines would be read against this version's thresholds."""
    made_by = {metadata_of(schema).get("descriptor", "unrecorded")
               for schema in check_shards(root, COPY_DESCRIPTORS_TABLE).values()}
    if made_by - {COPY_DESCRIPTOR_NAME}:
        raise UserError(f"{root}/{COPY_DESCRIPTORS_TABLE} holds descriptors made by {sorted(made_by)}, and this "
                        f"curate computes {COPY_DESCRIPTOR_NAME!r}: ingest again with `curate ingest SOURCE --catalog "
                        f"{root} --overwrite` (the later stages then follow), or set descriptor=embeddings")


def _pixel_counts(root: str, ids: np.ndarray) -> np.ndarray:
    """width × height of each image (0 where unknown), aligned with the sorted ``ids``."""
    sizes = query(root, "SELECT image_id, coalesce(width * height, 0) AS px FROM pool "
                        "WHERE status = 'ok' ORDER BY image_id")
    return lookup(sizes.column("image_id").to_numpy(), sizes.column("px").to_numpy().astype(np.float64), ids, 0.0)


def _removed_by(root: str, reasons: list[str]) -> np.ndarray:
    """Images removed by earlier steps only, so redoing a step after a kill sees the same input."""
    if not table_exists(root, DUPLICATES_TABLE) or not reasons:
        return np.empty(0, np.int64)
    listed = ", ".join(f"'{r}'" for r in reasons)
    return query(root, f"SELECT image_id FROM duplicates WHERE reason IN ({listed})").column(0).to_numpy()


def steps(config: DedupConfig) -> list[str]:
    """The run's units, in the order they run: each one sees what the earlier ones removed."""
    describe = ["describe"] if config.model() is not None else []
    return ["exact", *describe, "copy"] + [f"eval-{name}" for name in sorted(config.eval_sets)]


def _reasons_before(config: DedupConfig, step: str) -> list[str]:
    """The ``duplicates.reason`` values written by the steps before ``step``."""
    earlier = steps(config)[:steps(config).index(step)]
    return [s.replace("eval-", "eval:", 1) for s in earlier if s != "describe"]


def check_removed_share(root: str, config: DedupConfig, step: str, table: pa.Table) -> None:
    """Fail when the steps so far would remove more than ``max_removed_share`` of the usable pool."""
    pool = query(root, "SELECT count(*) FROM pool WHERE status = 'ok'").column(0)[0].as_py()
    removed = len(_removed_by(root, _reasons_before(config, step))) + table.num_rows
    if not pool or removed / pool <= config.max_removed_share:
        return
    threshold = config.eval_threshold() if step.startswith("eval-") else config.copy_threshold()
    examples = table.sort_by("similarity").slice(0, 3).to_pylist()
    uris = _uris(root, [r["image_id"] for r in examples] + [r["kept_id"] for r in examples if r["kept_id"] != -1])
    lines = [f"  {uris[r['image_id']]}  ~  {uris.get(r['kept_id'], 'an evaluation-set image')}"
             f"  (similarity {r['similarity']:.3f})" for r in examples]
    raise UserError(
        f"dedup would remove {removed:,} of {pool:,} usable images ({removed / pool:.1%}; step {step}), more than "
        f"max_removed_share={config.max_removed_share:g}. Real pools hold a few percent of copies: check the "
        f"descriptor ({config.descriptor}) and threshold ({threshold:g}). Pairs it would merge:\n"
        + "\n".join(lines) + "\nIf these are copies, raise the share: --set max_removed_share=0.5 "
        "(dedup.max_removed_share=0.5 for build-lvd).")


def _uris(root: str, image_ids: list[int]) -> dict[int, str]:
    listed = ", ".join(str(int(i)) for i in image_ids) or "NULL"
    t = query(root, f"SELECT image_id, uri FROM pool WHERE image_id IN ({listed})")
    return dict(zip(t.column("image_id").to_pylist(), t.column("uri").to_pylist()))


def edge_search(config: DedupConfig, address: str | None = None) -> EdgeSearch:
    """Where the copy graph's blocks are searched: in this process, or on ``workers`` Ray actors."""
    if config.workers == 1:
        return local_edges
    from pipelines.distributed_search import RaySearch  # Ray, imported only for workers > 1

    return RaySearch(config.workers, config.worker_cpus, address).edge_search


def _content_hashes(root: str, ids: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each image's bytes (its sha256), aligned with the sorted ``ids``: an image rewritten
    under its id has another one, so the kept copy graph searches it again."""
    t = query(root, f"SELECT image_id, {CONTENT_HASH} AS h FROM pool WHERE status = 'ok' ORDER BY image_id")
    return lookup(t.column("image_id").to_numpy(), t.column("h").to_numpy(), ids, 0)


def graph_key(root: str, config: DedupConfig) -> str:
    """What a kept copy graph was searched with: the descriptor (and the model behind it) and the settings
    that decide its edges."""
    model = config.model()
    identity = (embedding_metadata(root) if config.descriptor == "embeddings" else
                model.model_id if model is not None else COPY_DESCRIPTOR_NAME)
    check = (config.check_threshold, *CHECK_FIXED_SETTINGS) if config.descriptor == "pixels" else None
    return fingerprint(identity, config.k, config.copy_threshold(), check, config.seed)


def copy_step(root: str, config: DedupConfig,
              search: EdgeSearch = local_edges) -> tuple[pa.Table, dict[str, bytes | Produce]]:
    """Near copies: k-NN graph above the threshold, connected components, keep the largest image; the
    graph kept for the next run (`pipelines.dedup_graph`), which then searches only what is new."""
    descriptors = _descriptors(root, config, "copy")
    ids = descriptors.ids
    content, key = _content_hashes(root, ids), graph_key(root, config)
    start = graph_start(root, key, ids, content, descriptors, config.seed)
    x = start.rows
    pixels = config.descriptor == "pixels"
    thumbnails = PoolThumbnails(root, ids)
    checked = pixels and config.check_threshold is not None
    result = copy_dedup(x, ids, _pixel_counts(root, ids), config.k, config.copy_threshold(), index=start.index,
                        known=start.known, mirror=mirror if pixels else None, batch_size=config.query_block,
                        search=search, verify=edge_check(x, thumbnails, config.check_threshold) if checked else None)
    if thumbnails.unreadable:
        log.warning("dedup: %d image(s) with a near copy candidate could not be read again to check it (kept "
                    "apart), e.g. %s", len(thumbnails.unreadable), "; ".join(thumbnails.unreadable[:3]))
    table = _rows(ids[result.removed_rows], ids[result.keeper_of_removed], result.removed_similarity, "copy")
    return table, graph_files(key, ids, content, result.labels, start)


class PoolThumbnails:
    """The verification thumbnails (`curation.copy_verify`) of pool images, read from their URIs when a
    candidate pair first needs them (only images with a near neighbour are ever read) and kept."""

    def __init__(self, root: str, ids: np.ndarray) -> None:
        self.root, self.ids = root, ids
        self.cache: dict[int, tuple[np.ndarray, int]] = {}
        self.unreadable: list[str] = []

    def __call__(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        missing = [int(self.ids[r]) for r in rows if int(self.ids[r]) not in self.cache]
        if missing:
            t = query(self.root, "SELECT image_id, uri, coalesce(least(width, height), 0) AS side FROM pool "
                                 f"WHERE image_id IN ({', '.join(map(str, missing))})")
            uris = resolve_uris(self.root, t.column("uri")).to_pylist()
            for iid, uri, side in zip(t.column("image_id").to_pylist(), uris, t.column("side").to_pylist()):
                self.cache[iid] = self._read(uri, side)
        got = [self.cache[int(self.ids[r])] for r in rows]
        return np.stack([g[0] for g in got]), np.array([g[1] for g in got])

    def _read(self, uri: str, side: int) -> tuple[np.ndarray, int]:
        """(thumbnail, shorter side as ingested); side 0 for an image unreadable since ingest (its pairs
        stay apart)."""
        try:
            img = decode_rgb(read_item(uri), min_side=2 * CHECK_SIDE)
        except (UnreadableItem, DecodeError) as e:
            self.unreadable.append(f"{uri} ({e})")
            return np.zeros((CHECK_SIDE, CHECK_SIDE, 3), np.uint8), 0
        return thumbnail(img), side


def folder_images(folder: str) -> dict[str, int]:
    """``{url: bytes}`` of every file under a folder anywhere fsspec reaches (what does not decode is
    skipped by the caller: extensions say nothing about content)."""
    fs, path = resolve(folder)
    found = retry(lambda: fs.find(path, detail=True))
    return {with_protocol(fs, p): int(info["size"]) for p, info in sorted(found.items())}


def eval_descriptors(folder: str) -> np.ndarray:
    """Pixel descriptors of every readable image in an evaluation-set folder."""
    out = []
    for url in folder_images(folder):
        try:
            out.append(copy_descriptor(decode_rgb(read_bytes(url))))
        except (DecodeError, OSError):
            continue
    if not out:
        raise MissingInputError(f"evaluation set {folder} holds no readable image")
    return np.stack(out)


def eval_step(root: str, config: DedupConfig, name: str, folder: str, search: EdgeSearch = local_edges) -> pa.Table:
    """Remove every pool image whose copy component touches an image of the evaluation set."""
    descriptors = _descriptors(root, config, f"eval-{name}")
    ids, x = descriptors.ids, descriptors.load()
    rows = relative_dedup(x, eval_descriptors(folder), config.k, config.eval_threshold(), seed=config.seed,
                          mirror=mirror, batch_size=config.query_block, search=search)
    return _rows(ids[rows], np.full(len(rows), -1), np.full(len(rows), np.nan), f"eval:{name}")


class DedupStage(Stage):
    name = "dedup"
    config_class = DedupConfig
    writes = (DUPLICATES_TABLE,)
    runtime_keys = frozenset({"workers", "worker_cpus"})  # the same duplicates with any worker count
    state_checks_inputs = True  # the kept copy graph is checked image by image, so a grown pool keeps it
    empty_schemas = {DUPLICATES_TABLE: schemas.stamp(schemas.DUPLICATES, DUPLICATES_TABLE)}

    def tables_read(self, config: DedupConfig) -> tuple[str, ...]:
        own = descriptor_table(config) == MODEL_COPY_DESCRIPTORS_TABLE
        return (POOL_TABLE,) if own else (POOL_TABLE, descriptor_table(config))

    def tables_written(self, config: DedupConfig) -> tuple[str, ...]:
        return self.writes + ((MODEL_COPY_DESCRIPTORS_TABLE,) if config.model() is not None else ())

    def extra_inputs(self, ctx: StageContext) -> dict[str, str]:
        model = ctx.config.model()
        return ({f"eval_set:{name}": listing_fingerprint(folder_images(folder))
                 for name, folder in sorted(ctx.config.eval_sets.items())}
                | ({"descriptor_model": model.model_id} if model is not None else {}))

    def plan(self, ctx: StageContext) -> list[Unit]:
        return [Unit(step, {}, 1, fingerprint(step)) for step in steps(ctx.config)]

    def process(self, ctx: StageContext, unit: Unit, state: Any, loaded: dict[str, Any] | None) -> Output:
        config: DedupConfig = ctx.config
        if unit.name == "describe":
            table, files = dedup_model.describe_step(ctx.root, config.model(), config.descriptor)
            return Output({MODEL_COPY_DESCRIPTORS_TABLE: table}, files)
        files: dict[str, bytes | Produce] = {}
        if unit.name == "exact":
            table = exact_step(ctx.root)
        elif unit.name == "copy":
            table, files = copy_step(ctx.root, config, edge_search(config, ctx.address))
        else:
            name = unit.name[len("eval-"):]
            table = eval_step(ctx.root, config, name, config.eval_sets[name], edge_search(config, ctx.address))
        check_removed_share(ctx.root, config, unit.name, table)
        return Output({DUPLICATES_TABLE: table}, files)

    def clear(self, ctx: StageContext) -> None:
        """``--overwrite`` forgets the kept copy graph (and its IVF index, trained again)."""
        CatalogArrayStore(ctx.root, self.name).clear()

    def finish(self, ctx: StageContext, totals: Totals) -> dict[str, Any]:
        removed = {unit: rows.get(DUPLICATES_TABLE, 0) for unit, rows in totals.units.items()}
        total = query(ctx.root, "SELECT count(*) FROM pool WHERE status = 'ok'").column(0)[0].as_py()
        removed.pop("describe", None)
        if removed.get("copy"):
            write_dedup_report(ctx.root)
        summary = {"in": total, "out": total - sum(removed.values()), "errored": 0, "removed": removed}
        graph = graph_summary(ctx.root) if "copy" in totals.units else None
        if graph is not None:
            summary["copy_graph"] = graph
        model = ctx.config.model()
        if model is not None:
            summary["descriptors"] = dedup_model.described_summary(ctx.root)
            cal = ctx.config.calibration()
            set_name = (ctx.config.calibration_copies
                        or dedup_model.demo_set_name(ctx.config.calibration_groups, ctx.config.seed))
            dedup_model.write_calibration_report(ctx.root, model, cal, ctx.config.copy_threshold(), set_name)
            summary["calibration"] = {"threshold": round(cal.threshold, 4), "precision": round(cal.precision, 4),
                                      "recall": round(cal.recall, 4)}
        return summary


STAGE = DedupStage()
