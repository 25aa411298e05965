"""``curate build-lvd``: ingest → embed → dedup → cluster → sample → report, skipping finished stages.

Each stage is resumable on its own through the ledger, so rerunning ``build-lvd`` after a kill picks
up in the stage that was running.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from catalog.ledger import Ledger
from catalog.shards import table_exists
from pipelines.stages.cluster import ClusterConfig, cluster
from pipelines.stages.dedup import DedupConfig, dedup
from pipelines.stages.embed import EmbedConfig, embed
from pipelines.stages.ingest import IngestConfig, ingest
from pipelines.reports import write_lvd_report
from pipelines.stages.sample import SampleConfig, sample


@dataclass(frozen=True)
class BuildLVDConfig:
    ingest: IngestConfig = field(default_factory=IngestConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    run_dedup: bool = True
    report: bool = True


def _say(msg: str, root: str | None = None, stage: str | None = None) -> None:
    done = root is not None and stage is not None and Ledger(root, stage).is_complete()
    print(f"\n== build-lvd: {msg}{' (already done)' if done else ''} ==", flush=True)


def build_lvd(root: str, config: BuildLVDConfig, *, source: str | None = None,
              address: str | None = None) -> dict[str, object]:
    """Run every stage that is not finished yet; returns what each stage reported."""
    out: dict[str, object] = {}
    if source is not None:
        _say(f"ingest {source}")
        out["ingest"] = ingest(source, root, config.ingest, address=address)
    elif not table_exists(root, "pool"):
        raise FileNotFoundError(f"{root} has no pool table: give --source to ingest one first")
    _say(f"embed with {config.embed.model}", root, "embed")
    out["embed"] = embed(root, config.embed, address=address)
    if config.run_dedup:
        _say("dedup (exact sha256 + copy detection)", root, "dedup")
        out["dedup"] = dedup(root, config.dedup)
    _say("cluster", root, "cluster")
    out["cluster"] = cluster(root, config.cluster)
    _say(f"sample {config.sample.target_size} images into curated/{config.sample.part}")
    out["sample"] = sample(root, config.sample)
    if config.report:
        n_levels = len(out["cluster"]["levels"])  # type: ignore[index]
        out["report"] = write_lvd_report(root, config.sample.part, n_levels, seed=config.sample.seed)
    return out
