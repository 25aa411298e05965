"""``curate sample``: balanced hierarchical sampling of the clustered pool into ``curated/<part>``.

The target is water-filled over the top-level clusters, then down the hierarchy to level-1 clusters;
the selected rows keep their cluster ids at every level as lineage. The run ends with the part's
report (cluster-size histograms, contact sheets) under ``reports/<part>``, so the report always shows
the clusters the part was sampled from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from catalog.config import ConfigError, above, at_least
from catalog.manifest import fingerprint
from catalog.names import check_name
from catalog.schemas import CLUSTERS_TABLE, POOL_TABLE, curated_rows, curated_table
from catalog.shards import read_schema, read_table, shard_urls, table_exists
from catalog.sql import query
from curation.sampling import balanced_sample
from pipelines.reports import write_lvd_report
from pipelines.stage import Output, Stage, StageContext, Totals, Unit


@dataclass(frozen=True)
class SampleConfig:
    """``target_size`` is required (None until given); ``report`` writes the part's PNG report."""

    target_size: int | None = None
    strategy: Literal["random", "closest", "farthest"] = "random"
    multiplier: float = 1.0
    seed: int = 0
    part: str = "lvd"
    report: bool = True

    def __post_init__(self) -> None:
        at_least(self, 1, "target_size")
        above(self, 0, "multiplier")
        check_name(self.part, "sample part")


def level_columns(names: list[str]) -> list[str]:
    """The ``l1`` … ``lN`` columns of a clusters table."""
    return [c for c in names if c.startswith("l") and c[1:].isdigit()]


class SampleStage(Stage):
    name = "sample"
    config_class = SampleConfig
    reads = (CLUSTERS_TABLE, POOL_TABLE)
    runtime_keys = frozenset({"report"})

    def run_name(self, config: SampleConfig) -> str:
        return f"sample-{config.part}"

    def tables_written(self, config: SampleConfig) -> tuple[str, ...]:
        return (curated_table(config.part),)

    def plan(self, ctx: StageContext) -> list[Unit]:
        if ctx.config.target_size is None:
            raise ConfigError("sample needs a target size (--target-size N)")
        return [Unit("selection", {}, 1, fingerprint("selection"))]

    def process(self, ctx: StageContext, unit: Unit, state: Any, loaded: dict[str, Any] | None) -> Output:
        """Exactly ``target_size`` rows (fewer only if the pool is smaller), with their uri and lineage."""
        config: SampleConfig = ctx.config
        clusters = read_table(ctx.root, CLUSTERS_TABLE)
        labels = np.stack([clusters.column(c).to_numpy() for c in level_columns(clusters.column_names)], axis=1)
        rows = balanced_sample(labels, config.target_size, seed=config.seed, strategy=config.strategy,
                               distances=clusters.column("distance").to_numpy(), multiplier=config.multiplier)
        picked = clusters.take(pa.array(rows))
        uris: dict[int, str] = {}
        if table_exists(ctx.root, POOL_TABLE):
            pool = query(ctx.root, "SELECT image_id, uri FROM pool WHERE status = 'ok'")
            uris = dict(zip(pool.column("image_id").to_pylist(), pool.column("uri").to_pylist()))
        ids = picked.column("image_id")
        table = curated_rows(config.part, ids, [uris.get(i) for i in ids.to_pylist()],
                             picked.select(picked.column_names[1:]))
        return Output({curated_table(config.part): table})

    def finish(self, ctx: StageContext, totals: Totals) -> dict[str, Any]:
        config: SampleConfig = ctx.config
        n_in = query(ctx.root, "SELECT count(*) FROM clusters").column(0)[0].as_py()
        summary: dict[str, Any] = {"in": n_in, "out": totals.rows(curated_table(config.part)), "errored": 0}
        if config.report:
            n_levels = len(level_columns(read_schema(shard_urls(ctx.root, CLUSTERS_TABLE)[0]).names))
            summary["report"] = write_lvd_report(ctx.root, config.part, n_levels, seed=config.seed,
                                                 with_images=table_exists(ctx.root, POOL_TABLE))
        return summary


STAGE = SampleStage()
