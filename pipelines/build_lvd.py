"""``curate build-lvd``: ingest → embed → dedup → cluster → sample (with its report), as stages of the runner.

Each stage is skipped when it is done with the same settings and inputs, resumed after a kill, and rerun
from scratch when an input changed (a re-embedded pool reclusters and resamples). Ray starts at most once
for the whole command, and only if a stage has work large enough to need it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from catalog.config import ConfigError
from catalog.errors import MissingInputError
from catalog.schemas import POOL_TABLE
from catalog.shards import table_exists
from pipelines.executors import Executor
from pipelines.stage import StageResult, run_stage
from pipelines.stages.cluster import ClusterConfig
from pipelines.stages.dedup import DedupConfig
from pipelines.stages.embed import EmbedConfig, require_weights
from pipelines.stages.ingest import IngestConfig
from pipelines.stages.sample import SampleConfig

log = logging.getLogger("curate.pipelines")


@dataclass(frozen=True)
class BuildLVDConfig:
    ingest: IngestConfig = field(default_factory=IngestConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    run_dedup: bool = True


def build_lvd(root: str, config: BuildLVDConfig, *, source: str | None = None, address: str | None = None,
              executor: Executor = "auto") -> dict[str, StageResult]:
    """Run every stage that is not done yet; returns each stage's result."""
    if config.sample.target_size is None:
        raise ConfigError("build-lvd needs a target size (--target-size N)")
    require_weights(config.embed, "embed.")
    ingest = replace(config.ingest, source=source) if source else config.ingest
    if not ingest.source and not table_exists(root, POOL_TABLE):
        raise MissingInputError(f"{root} has no pool table: give --source to ingest one first")
    steps = [("ingest", ingest)] if ingest.source else []
    steps += [("embed", config.embed)] + ([("dedup", config.dedup)] if config.run_dedup else [])
    steps += [("cluster", config.cluster), ("sample", config.sample)]
    out = {}
    for name, stage_config in steps:
        log.info("== build-lvd: %s ==", name)
        out[name] = run_stage(name, root, stage_config, address=address, executor=executor)
        log.info("== build-lvd: %s %s ==", name, "(already done)" if out[name].skipped else "done")
    return out
