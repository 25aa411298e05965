"""``curate filter``: drop obviously bad images before clustering, by the quality signals ingest measured.

Every rule is off by default. A removed image gets an ``errors`` row (stage ``filter``, reason
``filtered:<rule>``, the value against the threshold in the message); ``cluster`` leaves these images out,
so ``sample`` never picks them, and the LVD report shows what each rule removed.

Why a stage of its own rather than a condition in cluster's input query: it needs only the pool, so it runs
right after ingest and its removals can be looked at (``curate sql``, the report) before anything is
embedded or clustered; its thresholds are its settings, so changing them is refused without ``--overwrite``
like any stage's, and a rerun with other thresholds replaces exactly its own ``errors`` rows; and cluster
stays an algorithm over vectors (it only learns *which* ids to leave out, and reruns when they change).

Thresholds, and where the figures come from (``docs/benchmarks.md`` has the demo pool's distributions):

- ``min_side``: DataComp's basic filter keeps images whose shorter side is at least 200 px;
- ``max_aspect``: DataComp's basic filter keeps aspect ratios up to 3;
- ``min_sharpness``: no published figure carries over (ours is measured on a 64 px thumbnail); on the demo
  pool the ordinary images score >= 9.7 and the planted blurred ones <= 2.4, so 6 separates them;
- ``drop_constant``: blank or single-colour images (grey std < 3 levels, `curation.quality.CONSTANT_STD`);
- ``max_dark_fraction`` / ``max_bright_fraction``, ``min_colour_entropy``: cleanvision's dark, over-exposed
  and low-information checks; set them from the report's histograms of your own pool.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from catalog.config import ConfigError, above, at_least
from catalog.errors import MissingInputError
from catalog.manifest import fingerprint
from catalog.schemas import ERRORS, ERRORS_TABLE, FILTER_STAGE, POOL_TABLE, QUALITY_COLUMNS, stamp
from catalog.sql import query
from curation.quality import RULES, Rule, first_failed_rule
from pipelines.stage import Output, Stage, StageContext, Totals, Unit

log = logging.getLogger("curate.pipelines")
FILTERED = "filtered:"  # prefix of the errors reasons this stage writes
# a filter that removes more than this share of the usable pool is probably mis-set: said loudly
LOUD_FRACTION = 0.5


@dataclass(frozen=True)
class FilterConfig:
    """One threshold per rule; None (``drop_constant``: False) leaves the rule off. See the module docstring."""

    drop_constant: bool = False
    min_side: int | None = None
    max_aspect: float | None = None
    min_sharpness: float | None = None
    max_dark_fraction: float | None = None
    max_bright_fraction: float | None = None
    min_colour_entropy: float | None = None

    def __post_init__(self) -> None:
        at_least(self, 1, "min_side", "max_aspect")
        at_least(self, 0, "min_sharpness", "min_colour_entropy")
        above(self, 0, "max_dark_fraction", "max_bright_fraction")
        for name in ("max_dark_fraction", "max_bright_fraction"):
            if (getattr(self, name) or 0) > 1:
                raise ConfigError(f"{name} is a fraction of the pixels, at most 1, got {getattr(self, name)}")

    def thresholds(self) -> dict[str, float | bool | None]:
        """Rule name (`curation.quality.RULES`) -> threshold."""
        return {"constant": self.drop_constant, "small": self.min_side, "aspect": self.max_aspect,
                "blurry": self.min_sharpness, "dark": self.max_dark_fraction,
                "bright": self.max_bright_fraction, "flat": self.min_colour_entropy}

    def any_rule(self) -> bool:
        return any(v is not None and v is not False for v in self.thresholds().values())


def _signals(root: str) -> pa.Table:
    """The usable pool images with their signals; refuses a pool ingested before the signals existed."""
    columns = query(root, "SELECT * FROM pool LIMIT 0").column_names
    missing = [c for c in QUALITY_COLUMNS if c not in columns]
    migrate = "rerun `curate ingest SOURCE --catalog ROOT --overwrite` to measure them"
    if missing:
        raise MissingInputError(f"{root}: the pool has no quality columns ({', '.join(missing)}): it was ingested "
                                f"before curate measured them; {migrate}")
    table = query(root, f"SELECT image_id, uri, {', '.join(QUALITY_COLUMNS)} FROM pool WHERE status = 'ok' "
                        "ORDER BY image_id")
    unmeasured = table.column("sharpness").null_count
    if unmeasured:
        raise MissingInputError(f"{root}: {unmeasured} of {table.num_rows} usable pool images have no quality "
                                f"signals (shards ingested before curate measured them); {migrate}")
    return table


def _message(rule: Rule, value: Any, threshold: Any) -> str:
    if rule.op == "is":
        return f"{rule.column} is true"
    return f"{rule.column} {value:.4g} {rule.op} {threshold:g}"


class FilterStage(Stage):
    """One unit: the whole pool's signals are a few columns, read in one query."""

    name = FILTER_STAGE
    config_class = FilterConfig
    reads = (POOL_TABLE,)
    writes = (ERRORS_TABLE,)
    empty_schemas = {ERRORS_TABLE: stamp(ERRORS, ERRORS_TABLE)}

    def plan(self, ctx: StageContext) -> list[Unit]:
        return [Unit("all", {}, 1, fingerprint("all"))]

    def process(self, ctx: StageContext, unit: Unit, state: Any, loaded: dict[str, Any] | None) -> Output:
        config: FilterConfig = ctx.config
        table = _signals(ctx.root)
        columns = {c: table.column(c).to_numpy(zero_copy_only=False) for c in QUALITY_COLUMNS}
        thresholds = config.thresholds()
        failed = first_failed_rule(columns, thresholds)
        rows = np.flatnonzero(failed >= 0)
        ids, uris = table.column("image_id").to_numpy(), table.column("uri").to_pylist()
        out = []
        for r in rows:
            rule = RULES[failed[r]]
            out.append({"image_id": int(ids[r]), "uri": uris[r], "stage": self.name, "reason": FILTERED + rule.name,
                        "message": _message(rule, columns[rule.column][r], thresholds[rule.name])})
        return Output({ERRORS_TABLE: pa.Table.from_pylist(out, schema=stamp(ERRORS, ERRORS_TABLE))})

    def finish(self, ctx: StageContext, totals: Totals) -> dict[str, Any]:
        n = query(ctx.root, "SELECT count(*) FROM pool WHERE status = 'ok'").column(0)[0].as_py()
        counts = query(ctx.root, "SELECT reason, count(*) AS n FROM errors WHERE stage = ? GROUP BY 1 ORDER BY 1",
                       [self.name]).to_pylist()
        removed = {r["reason"].removeprefix(FILTERED): r["n"] for r in counts}
        total = sum(removed.values())
        if n and total > LOUD_FRACTION * n:
            log.warning("filter removed %d of %d usable images (%s): check the thresholds against the report's "
                        "histograms", total, n, ", ".join(f"{k}={v}" for k, v in removed.items()))
        return {"in": n, "out": n - total, "errored": 0, "removed": removed}


STAGE = FilterStage()
