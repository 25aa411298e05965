"""``curate mix``: assemble the training mix — curated parts and their sampling weights.

Parts come from the whole deduplicated pool (``pool``), from ``build-lvd`` (``lvd``), from retrieval
(``retrieved:<seed>``), or from a public labelled dataset given as images (``images:<folder or URL>``,
e.g. ImageNet-1k, the part the trainer draws its homogeneous batches from; ingested through the stage
runner into ``_parts/<name>``). Each part becomes ``curated/<name>``; the weights and the homogeneous
part are written to ``<catalog>/_mix.json`` for the trainer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from catalog.config import ConfigError
from catalog.errors import MissingInputError
from catalog.lineage import table_state
from catalog.manifest import fingerprint
from catalog.mix import TrainingMix, write_mix
from catalog.names import check_name
from catalog.paths import join
from catalog.schemas import (
    DUPLICATES_TABLE,
    PARTS_DIR,
    POOL_TABLE,
    RETRIEVED_TABLE,
    curated_rows,
    curated_table,
)
from catalog.shards import table_exists
from catalog.sql import query
from catalog.tables import describe
from pipelines.stage import Output, Stage, StageContext, Totals, Unit, run_stage

log = logging.getLogger("curate.pipelines")
SOURCES = "'pool', 'lvd', 'retrieved:<seed>' or 'images:<path>'"


@dataclass(frozen=True)
class PartSpec:
    source: str
    weight: float | None = None

    def __post_init__(self) -> None:
        if not (self.source in ("pool", "lvd") or self.source.startswith(("retrieved:", "images:"))):
            raise ConfigError(f"a part's source must be {SOURCES}, not {self.source!r}")
        if self.weight is not None and self.weight <= 0:
            raise ConfigError(f"a part's weight must be positive, got {self.weight}")
        if self.source.startswith("retrieved:"):
            check_name(self.source.split(":", 1)[1], f"mix source {self.source!r}: the seed")


@dataclass(frozen=True)
class MixConfig:
    """``weight`` None: proportional to the part's size. ``homogeneous_part`` None or absent: none."""

    parts: dict[str, PartSpec] = field(default_factory=lambda: {"lvd": PartSpec("lvd")})
    homogeneous_part: str | None = "imagenet1k"
    p_homogeneous: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.p_homogeneous <= 1.0:
            raise ConfigError(f"p_homogeneous is a probability in [0, 1], got {self.p_homogeneous}")
        for name in self.parts:
            check_name(name, "mix part")
        if self.homogeneous_part:
            check_name(self.homogeneous_part, "mix homogeneous_part")


def _removed_ids_sql(root: str) -> str:
    return "SELECT image_id FROM duplicates" if table_exists(root, DUPLICATES_TABLE) else \
        "SELECT NULL::BIGINT WHERE false"


def part_rows(root: str, name: str, source: str) -> pa.Table:
    """The ``image_id``/``uri`` rows of one part."""
    if source == "pool":  # every usable image that dedup kept
        return query(root, "SELECT image_id, uri FROM pool WHERE status = 'ok' AND image_id NOT IN "
                           f"({_removed_ids_sql(root)}) ORDER BY image_id")
    if source == "lvd":
        if not table_exists(root, curated_table("lvd")):
            raise MissingInputError("part 'lvd' needs curated/lvd: run `curate build-lvd` first")
        return query(root, "SELECT image_id, uri FROM curated_lvd ORDER BY image_id")
    if source.startswith("retrieved:"):
        seed = source.split(":", 1)[1]
        rows = query(root, "SELECT r.image_id, p.uri FROM retrieved r JOIN pool p USING (image_id) "
                           "WHERE r.seed = ? ORDER BY r.image_id", [seed])
        if rows.num_rows == 0:
            raise MissingInputError(f"no retrieved images for seed {seed!r}: run `curate retrieve --seed {seed}`")
        return rows
    return query(join(root, PARTS_DIR, name), "SELECT image_id, uri FROM pool WHERE status = 'ok' ORDER BY image_id")


class MixStage(Stage):
    """One unit per part; ``finish`` writes ``_mix.json`` once every part is in place."""

    name = "mix"
    config_class = MixConfig

    def tables_read(self, config: MixConfig) -> tuple[str, ...]:
        sources = {spec.source.split(":", 1)[0] for spec in config.parts.values()}
        tables = [POOL_TABLE, DUPLICATES_TABLE]
        tables += [curated_table("lvd")] if "lvd" in sources else []
        tables += [RETRIEVED_TABLE] if "retrieved" in sources else []
        return tuple(tables)

    def tables_written(self, config: MixConfig) -> tuple[str, ...]:
        # the part "lvd" taken from curated/lvd is sample's table, not written again
        return tuple(curated_table(n) for n, s in sorted(config.parts.items()) if (n, s.source) != ("lvd", "lvd"))

    def prepare(self, ctx: StageContext) -> None:
        """Ingest each ``images:`` part into its own small catalog."""
        for name, spec in sorted(ctx.config.parts.items()):
            if spec.source.startswith("images:"):
                run_stage("ingest", join(ctx.root, PARTS_DIR, name), {"source": spec.source.split(":", 1)[1]},
                          address=ctx.address)

    def extra_inputs(self, ctx: StageContext) -> dict[str, str]:
        return {f"part:{n}": table_state(join(ctx.root, PARTS_DIR, n), POOL_TABLE).fingerprint
                for n, s in sorted(ctx.config.parts.items()) if s.source.startswith("images:")}

    def plan(self, ctx: StageContext) -> list[Unit]:
        return [Unit(f"part-{name}", {"part": name, "source": spec.source}, 1, fingerprint(name, spec.source))
                for name, spec in sorted(ctx.config.parts.items())]

    def process(self, ctx: StageContext, unit: Unit, state: Any, loaded: dict[str, Any] | None) -> Output:
        name, source = unit.payload["part"], unit.payload["source"]
        if (name, source) == ("lvd", "lvd"):
            part_rows(ctx.root, name, source)  # only checks that the part exists
            return Output({})
        rows = part_rows(ctx.root, name, source)
        return Output({curated_table(name): curated_rows(name, rows.column("image_id"), rows.column("uri"))})

    def finish(self, ctx: StageContext, totals: Totals) -> dict[str, Any]:
        config: MixConfig = ctx.config
        sizes = {name: describe(ctx.root, curated_table(name)).rows for name in sorted(config.parts)}
        weights = {name: (spec.weight if spec.weight is not None else float(sizes[name]))
                   for name, spec in config.parts.items()}
        homogeneous = config.homogeneous_part if config.homogeneous_part in sizes else None
        if config.homogeneous_part and homogeneous is None:
            log.warning("mix: homogeneous_part %r is not among the parts %s: every training step will be "
                        "heterogeneous (add the part, or set homogeneous_part to '' to say so)",
                        config.homogeneous_part, sorted(sizes))
        recorded = TrainingMix(sizes, weights, homogeneous, config.p_homogeneous if homogeneous else 0.0)
        write_mix(ctx.root, recorded)
        doc = recorded.to_json()
        return {"in": len(sizes), "out": sum(sizes.values()), "errored": 0, **doc}


STAGE = MixStage()
