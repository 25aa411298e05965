"""The data of each arm: its parts built in the catalog (by the mix stage's own units, run through the
stage runner) and the ``data.*`` overrides that make an ordinary training run read exactly them."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from catalog.config import ConfigError
from catalog.ledger import LedgerPlanError
from catalog.schemas import RETRIEVED_TABLE, curated_table
from catalog.shards import shard_rows, shard_urls, table_exists
from catalog.sql import query
from catalog.tables import describe
from pipelines.ablate.config import ArmSpec
from pipelines.stage import StageContext, Totals, run_stage
from pipelines.stages.mix import MixConfig, MixStage, PartSpec

log = logging.getLogger("curate.pipelines")


class ArmParts(MixStage):
    """The mix stage's parts without its ``_mix.json``: an ablation leaves the catalog's own mix alone
    (each arm names its parts and weights in its runs' ``data.*`` overrides)."""

    name = "ablate-parts"

    def finish(self, ctx: StageContext, totals: Totals) -> dict[str, Any]:
        sizes = {name: describe(ctx.root, curated_table(name)).rows for name in sorted(ctx.config.parts)}
        return {"in": len(sizes), "out": sum(sizes.values()), "errored": 0, "sizes": sizes}


ARM_PARTS = ArmParts()


def fill(text: str, root: str) -> str:
    """``{catalog}`` -> the catalog root's parent folder (where the demo keeps its pool)."""
    return text.replace("{catalog}", os.path.dirname(root.rstrip("/")))


def part_sources(arms: dict[str, ArmSpec], root: str) -> dict[str, str]:
    """Every part the arms train on -> its source; one name with two sources is an error."""
    sources: dict[str, str] = {}
    for arm, spec in arms.items():
        for name, part in spec.parts.items():
            source = fill(part.source, root)
            if sources.setdefault(name, source) != source:
                raise ConfigError(f"part {name!r} of arm {arm!r} has source {source!r}, another arm's has "
                                 f"{sources[name]!r}: give them different names")
    return sources


def _retrieved_count(root: str, seed: str) -> int:
    if not table_exists(root, RETRIEVED_TABLE):
        return 0
    return query(root, "SELECT count(*) FROM retrieved WHERE seed = ?", [seed]).column(0)[0].as_py()


def build_parts(root: str, sources: dict[str, str], address: str | None = None) -> dict[str, int]:
    """Materialise each part as ``curated/<name>``; a seed never retrieved is retrieved first. Returns sizes.

    One run (``ablate-parts``) holds every ablation's parts; an ablation with other parts than the
    last one's replaces them (the finished ablation keeps its trained runs and scores).
    """
    for source in sorted(set(sources.values())):
        seed = source.split(":", 1)[1] if source.startswith("retrieved:") else None
        if seed is not None and _retrieved_count(root, seed) == 0:
            print(f"== ablate: its parts need seed {seed!r} retrieved: curate retrieve --seed {seed} ==", flush=True)
            run_stage("retrieve", root, {"seed_set": seed}, address=address)
    config = MixConfig(parts={name: PartSpec(source) for name, source in sources.items()}, homogeneous_part=None)
    try:
        result = run_stage(ARM_PARTS, root, config, address=address)
    except LedgerPlanError:
        log.info("ablate: the catalog holds another ablation's parts: replacing them with %s", sorted(sources))
        result = run_stage(ARM_PARTS, root, config, overwrite=True, address=address)
    sizes = result.summary["sizes"]
    for name, source in sorted(sources.items()):
        if sizes[name] == 0:
            raise ConfigError(f"part {name!r} ({source}) is empty: an arm cannot train on it")
        print(f"part {name:>20}: {sizes[name]:>8} images ({source})", flush=True)
    return sizes


def parts_in_place(root: str, sizes: dict[str, int]) -> bool:
    """Whether every part of a plan is still ``curated/<name>`` with its planned size (an ablation with
    other parts replaces them; see `build_parts`)."""
    for name, size in sizes.items():
        urls = shard_urls(root, curated_table(name))
        if not urls or sum(shard_rows(u) for u in urls) != size:
            return False
    return True


def data_overrides(root: str, spec: ArmSpec, sizes: dict[str, int]) -> list[str]:
    """``data.*`` overrides of the arm's runs: its parts, weights (None in the spec: by size) and homogeneous part.

    Every key is set, so nothing of the training config's own data section (or, for a
    ``from_mix`` arm, anything but the catalog's mix) decides what an arm reads.
    """
    keys: dict[str, object] = {"catalog_root": root}
    if spec.from_mix:
        keys |= {"parts": [], "weights": None, "homogeneous_part": None, "p_homogeneous": None}
    else:
        hetero = [p for p in sorted(spec.parts) if p != spec.homogeneous_part]
        keys |= {"parts": sorted(spec.parts),
                 "weights": {p: float(sizes[p]) if spec.parts[p].weight is None else spec.parts[p].weight
                             for p in hetero},
                 "homogeneous_part": spec.homogeneous_part or "",
                 "p_homogeneous": spec.p_homogeneous if spec.homogeneous_part else 0.0}
    return [f"data.{key}={json.dumps(value)}" for key, value in keys.items()]
