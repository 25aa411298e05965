"""``curate sample``: balanced hierarchical sampling of the clustered pool into ``curated/<part>``.

The target is water-filled over the top-level clusters, then down the hierarchy to level-1 clusters;
the selected rows keep their cluster ids at every level as lineage. The run ends with the part's
report (cluster-size histograms, contact sheets) under ``reports/<part>``, so the report always shows
the clusters the part was sampled from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalog.array_store import CatalogArrayStore
from catalog.config import ConfigError, above, at_least
from catalog.ledger import Ledger
from catalog.manifest import fingerprint
from catalog.names import check_name
from catalog.paths import join, write_bytes_atomic
from catalog.schemas import CLUSTERS_TABLE, POOL_TABLE, curated_rows, curated_table
from catalog.shards import iter_batches, read_schema, read_table, shard_urls, table_exists
from catalog.sql import query
from curation.sampling import LeafPicker, LevelCounts, leaf_budgets
from pipelines.reports import write_lvd_report
from pipelines.stage import Output, Stage, StageContext, Totals, Unit


@dataclass(frozen=True)
class SampleConfig:
    """``target_size`` is required (None until given); ``report`` writes the part's PNG report;
    ``batch_rows``: rows of ``clusters`` and ``pool`` read at a time (memory, not the result).
    ``keep_previous``: when the part is sampled again because its clusters changed (the pool grew), the
    images it held go first in their level-1 cluster (kept while the cluster's budget covers them, then
    filled or trimmed per cluster), and the run writes ``reports/<part>/diff.json``."""

    target_size: int | None = None
    strategy: Literal["random", "closest", "farthest"] = "random"
    multiplier: float = 1.0
    seed: int = 0
    part: str = "lvd"
    report: bool = True
    batch_rows: int = 262_144
    keep_previous: bool = True

    def __post_init__(self) -> None:
        at_least(self, 1, "target_size")
        at_least(self, 1, "batch_rows")
        above(self, 0, "multiplier")
        check_name(self.part, "sample part")


def level_columns(names: list[str]) -> list[str]:
    """The ``l1`` … ``lN`` columns of a clusters table."""
    return [c for c in names if c.startswith("l") and c[1:].isdigit()]


def cluster_counts(root: str, levels: list[str]) -> list[LevelCounts]:
    """Every level's cluster sizes (and parents) from one DuckDB group-by per level over ``clusters``.

    Raises if a cluster has more than one parent: the table is then not a tree and water-filling
    down it would be wrong."""
    out = []
    for i, col in enumerate(levels):
        parent = levels[i + 1] if i + 1 < len(levels) else None
        of_parent = f", min({parent}) AS p, count(DISTINCT {parent}) AS np" if parent else ""
        select = f"{col} AS id, count(*) AS n{of_parent}"
        rows = query(root, f"SELECT {select} FROM clusters GROUP BY {col} ORDER BY {col}")
        if parent and (bad := pc.filter(rows, pc.greater(rows.column("np"), 1))).num_rows:
            raise ValueError(f"clusters: {bad.num_rows} cluster(s) of {col} have several {parent} parents "
                             f"(e.g. {bad.column('id')[0].as_py()}): the table is not a tree")
        out.append(LevelCounts(rows.column("id").to_numpy(), rows.column("n").to_numpy(),
                               rows.column("p").to_numpy() if parent else None))
    return out


def _take_rows(root: str, rows: np.ndarray, batch_rows: int) -> pa.Table:
    """The ``clusters`` rows at these sorted positions (repeats kept), read batch by batch."""
    pieces, start = [], 0
    for batch in iter_batches(root, CLUSTERS_TABLE, None, batch_rows):
        lo, hi = np.searchsorted(rows, [start, start + batch.num_rows])
        if hi > lo:
            pieces.append(pa.Table.from_batches([batch.take(pa.array(rows[lo:hi] - start))]))
        start += batch.num_rows
    if not pieces:
        return read_schema(shard_urls(root, CLUSTERS_TABLE)[0]).empty_table()
    return pa.concat_tables(pieces)


def _uris_of(root: str, ids: pa.ChunkedArray, batch_rows: int) -> dict[int, str]:
    """``{image_id: uri}`` of the picked ids that are ``ok`` in ``pool`` (none without a pool), streamed."""
    if not table_exists(root, POOL_TABLE):
        return {}
    wanted = pc.unique(ids)
    uris: dict[int, str] = {}
    for batch in iter_batches(root, POOL_TABLE, ["image_id", "uri", "status"], batch_rows):
        hit = pc.and_(pc.is_in(batch.column(0), wanted), pc.equal(batch.column(2), "ok"))
        sel = batch.filter(hit)
        uris.update(zip(sel.column(0).to_pylist(), sel.column(1).to_pylist()))
    return uris


PREVIOUS = "previous_selection"
CLUSTER_RUN = "cluster"  # the cluster stage's run, whose completion records an update's drift


@dataclass(frozen=True)
class Previous:
    """A part's selection before a rerun: its image ids and each one's top-level cluster then."""

    image_ids: np.ndarray
    top: np.ndarray


def write_diff(root: str, part: str, previous: Previous) -> dict[str, Any]:
    """What a resampled part kept, added and removed (distinct images), overall and per top cluster (added
    ones by their cluster now, removed ones by theirs then): ``reports/<part>/diff.json``."""
    now = read_table(root, curated_table(part))
    ids, first = np.unique(now.column("image_id").to_numpy(), return_index=True)
    top = now.column(level_columns(now.column_names)[-1]).to_numpy()[first]
    before, first_before = np.unique(previous.image_ids, return_index=True)
    top_before = previous.top[first_before]
    added, removed = ~np.isin(ids, before), ~np.isin(before, ids)
    per_top: dict[int, dict[str, int]] = {}
    for name, tops in (("added", top[added]), ("removed", top_before[removed])):
        for t, n in zip(*np.unique(tops, return_counts=True)):
            per_top.setdefault(int(t), {"added": 0, "removed": 0})[name] = int(n)
    kept = int(len(before) - removed.sum())
    diff = {"kept": kept, "added": int(added.sum()), "removed": int(removed.sum()),
            "kept_share": round(kept / max(1, len(before)), 4), "per_top_cluster": dict(sorted(per_top.items()))}
    write_bytes_atomic(join(root, "reports", part, "diff.json"), json.dumps(diff, indent=1).encode())
    return diff


def latest_drift(root: str) -> dict[str, Any] | None:
    """The drift report of the clustering as it stands, where its latest run was an update (assigned new
    images down the hierarchy); None after a clustering from scratch."""
    record = Ledger(root, CLUSTER_RUN).completion()
    return (record or {}).get("summary", {}).get("drift")


class SampleStage(Stage):
    name = "sample"
    config_class = SampleConfig
    reads = (CLUSTERS_TABLE, POOL_TABLE)
    runtime_keys = frozenset({"report", "batch_rows"})

    def run_name(self, config: SampleConfig) -> str:
        return f"sample-{config.part}"

    def tables_written(self, config: SampleConfig) -> tuple[str, ...]:
        return (curated_table(config.part),)

    def prepare(self, ctx: StageContext) -> Previous | None:
        """The part's finished selection, before a rerun replaces it; else the one a killed rerun kept under
        ``_checkpoints`` (`process`); None where there is none or it is not wanted."""
        config: SampleConfig = ctx.config
        table = curated_table(config.part)
        if not config.keep_previous:
            return None
        if Ledger(ctx.root, ctx.run).is_complete() and table_exists(ctx.root, table):
            rows = read_table(ctx.root, table)
            return Previous(rows.column("image_id").to_numpy(), rows.column(level_columns(rows.column_names)[-1])
                            .to_numpy())
        kept = CatalogArrayStore(ctx.root, ctx.run).get(PREVIOUS)
        return Previous(kept["image_ids"], kept["top"]) if kept else None

    def clear(self, ctx: StageContext) -> None:
        CatalogArrayStore(ctx.root, ctx.run).clear()

    def plan(self, ctx: StageContext) -> list[Unit]:
        if ctx.config.target_size is None:
            raise ConfigError("sample needs a target size (--target-size N)")
        return [Unit("selection", {}, 1, fingerprint("selection"))]

    def process(self, ctx: StageContext, unit: Unit, state: Any, loaded: dict[str, Any] | None) -> Output:
        """Exactly ``target_size`` rows (fewer only if the pool is smaller), with their uri and lineage.

        Never holds the whole table: cluster sizes come from group-bys, the picks from one streamed pass
        over ``l1`` (and ``distance``), the picked rows from a second pass, their URIs from a pass over
        ``pool``; memory is the picks plus a few counters per cluster.
        """
        config: SampleConfig = ctx.config
        levels = level_columns(read_schema(shard_urls(ctx.root, CLUSTERS_TABLE)[0]).names)
        rng = np.random.default_rng(config.seed)
        budget, sizes = leaf_budgets(cluster_counts(ctx.root, levels), config.target_size, rng, config.multiplier)
        picker = LeafPicker(budget, sizes, rng, config.strategy)
        previous = ctx.facts
        if previous is not None:  # a kill from here on resumes with the same previous selection
            CatalogArrayStore(ctx.root, ctx.run).put(PREVIOUS, {"image_ids": previous.image_ids, "top": previous.top})
        held = None if previous is None else pa.array(previous.image_ids, pa.int64())
        for batch in iter_batches(ctx.root, CLUSTERS_TABLE, [levels[0], "distance", "image_id"], config.batch_rows):
            preferred = None if held is None else pc.is_in(batch.column(2), held).to_numpy(zero_copy_only=False)
            picker.add(batch.column(0).to_numpy(), batch.column(1).to_numpy(zero_copy_only=False), preferred)
        picked = _take_rows(ctx.root, picker.rows(), config.batch_rows)
        ids = picked.column("image_id")
        uris = _uris_of(ctx.root, ids, config.batch_rows)
        table = curated_rows(config.part, ids, [uris.get(i) for i in ids.to_pylist()],
                             picked.select(picked.column_names[1:]))
        return Output({curated_table(config.part): table})

    def finish(self, ctx: StageContext, totals: Totals) -> dict[str, Any]:
        config: SampleConfig = ctx.config
        n_in = query(ctx.root, "SELECT count(*) FROM clusters").column(0)[0].as_py()
        summary: dict[str, Any] = {"in": n_in, "out": totals.rows(curated_table(config.part)), "errored": 0}
        if ctx.facts is not None and totals.items_run:
            summary["diff"] = write_diff(ctx.root, config.part, ctx.facts)
        if config.report:
            n_levels = len(level_columns(read_schema(shard_urls(ctx.root, CLUSTERS_TABLE)[0]).names))
            summary["report"] = write_lvd_report(ctx.root, config.part, n_levels, seed=config.seed,
                                                 with_images=table_exists(ctx.root, POOL_TABLE),
                                                 diff=summary.get("diff"), drift=latest_drift(ctx.root))
        return summary


STAGE = SampleStage()
