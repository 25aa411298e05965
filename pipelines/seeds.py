"""Seed datasets for retrieval (and evaluation sets): named in a config or given as a path.

A seed is ingested into its own small catalog under ``<catalog>/_seeds/<name>`` and embedded with
exactly the settings the pool's embeddings were made with (both through the stage runner), so seed and
pool vectors are comparable. Precomputed seed embeddings (a Parquet embeddings table written by curate)
are accepted only when their identity (model, weights, preprocessing) matches the pool's.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field

from catalog.config import ConfigError
from catalog.embeddings import EmbeddingIdentity, recorded_embed_config
from catalog.errors import MissingInputError
from catalog.lineage import table_state
from catalog.names import MAX_LENGTH, check_name, safe_name
from catalog.paths import join
from catalog.schemas import EMBEDDINGS_TABLE, SEEDS_DIR
from pipelines.stage import run_stage

log = logging.getLogger("curate.pipelines")
REMEDY = "seeds must be embedded exactly like the pool"


@dataclass(frozen=True)
class SeedSpec:
    """Where a seed's images live (a folder, tar glob or Parquet list), or its precomputed embeddings."""

    images: str | None = None
    embeddings: str | None = None


@dataclass(frozen=True)
class SeedsConfig:
    """Named seeds; ``{catalog}`` in a path is replaced by the catalog root's parent folder."""

    seeds: dict[str, SeedSpec] = field(default_factory=lambda: {
        "demo": SeedSpec(images="{catalog}/demo_pool/seed"),
    })

    def __post_init__(self) -> None:
        for name in self.seeds:
            check_name(name, "seed")


def seed_name(name_or_path: str, config: SeedsConfig) -> str:
    """A configured name as is; a path as ``<folder>-<hash of the path>`` (folder names can collide)."""
    if name_or_path in config.seeds:
        return name_or_path
    digest = hashlib.sha1(name_or_path.rstrip("/").encode()).hexdigest()[:8]
    folder = safe_name(os.path.basename(name_or_path.rstrip("/")), "seed")[: MAX_LENGTH - len(digest) - 1]
    return f"{folder}-{digest}"


def resolve_seed(name_or_path: str, root: str, config: SeedsConfig) -> tuple[str, SeedSpec]:
    """A (name, spec) for a configured name or a direct path/URL to images."""
    if name_or_path in config.seeds:
        spec = config.seeds[name_or_path]
        parent = os.path.dirname(root.rstrip("/"))
        images, embeddings = (p.replace("{catalog}", parent) if p else p for p in (spec.images, spec.embeddings))
        return name_or_path, SeedSpec(images=images, embeddings=embeddings)
    if "://" in name_or_path or os.path.exists(name_or_path):
        return seed_name(name_or_path, config), SeedSpec(images=name_or_path)
    known = ", ".join(sorted(config.seeds)) or "none"
    raise MissingInputError(f"unknown seed {name_or_path!r}: not in the seeds config ({known}) and not a path")


def seed_catalog(root: str, name: str) -> str:
    return join(root, SEEDS_DIR, name)


def prepare_seed(root: str, name: str, spec: SeedSpec, *, address: str | None = None) -> str:
    """The catalog (root and table) holding the seed's embeddings, made like the pool's if needed."""
    pool = EmbeddingIdentity.of_table(root)
    if pool is None:
        raise MissingInputError(f"{root} has no embeddings: run `curate embed` (or build-lvd) before retrieving")
    if spec.embeddings:
        pool.check(EmbeddingIdentity.of_table(spec.embeddings), f"seed embeddings {spec.embeddings}", REMEDY)
        return spec.embeddings
    if not spec.images:
        raise ConfigError(f"seed {name!r} names neither images nor embeddings")
    sub = seed_catalog(root, name)
    run_stage("ingest", sub, {"source": spec.images}, address=address)
    stale = EmbeddingIdentity.of_table(sub)
    if stale is not None and stale != pool:
        log.warning("seed %s was embedded with another backbone than the pool's now: embedding it again", name)
    run_stage("embed", sub, {**recorded_embed_config(root), "actors": 1}, overwrite=stale not in (None, pool),
              address=address)
    pool.check(EmbeddingIdentity.of_table(sub), f"seed catalog {sub}", REMEDY)
    return sub


def seed_fingerprint(seed_root: str) -> str:
    return table_state(seed_root, EMBEDDINGS_TABLE).fingerprint
