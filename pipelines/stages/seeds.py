"""Seed datasets for retrieval (and evaluation sets): named in a config or given as a path.

A seed is ingested into its own small catalog under ``<catalog>/_seeds/<name>`` and embedded with
exactly the settings the pool's embeddings were made with, so seed and pool vectors are comparable.
Precomputed seed embeddings (a Parquet embeddings table written by curate) are accepted only when
their model id and preprocessing match the pool's.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace

import numpy as np

from catalog.embeddings import embedding_metadata, load_embeddings
from catalog.names import MAX_LENGTH, check_name, safe_name
from catalog.paths import join
from pipelines.stages.embed import EmbedConfig, ModelMismatchError, config_of_table, embed
from pipelines.stages.ingest import ingest

IDENTITY_KEYS = ("model", "weights_sha256", "preprocess", "pooling", "normalized")


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


def resolve_seed(name_or_path: str, root: str, config: SeedsConfig) -> tuple[str, SeedSpec]:
    """A (name, spec) for a configured name or a direct path/URL to images."""
    if name_or_path in config.seeds:
        spec = config.seeds[name_or_path]
        parent = os.path.dirname(root.rstrip("/"))
        fill = (lambda p: p.replace("{catalog}", parent) if p else p)
        return name_or_path, SeedSpec(images=fill(spec.images), embeddings=fill(spec.embeddings))
    if "://" in name_or_path or os.path.exists(name_or_path):
        # the folder name alone could collide with another seed's, so the path's hash is appended
        digest = hashlib.sha1(name_or_path.rstrip("/").encode()).hexdigest()[:8]
        base = safe_name(os.path.basename(name_or_path.rstrip("/")), "seed")[: MAX_LENGTH - len(digest) - 1]
        return f"{base}-{digest}", SeedSpec(images=name_or_path)
    known = ", ".join(sorted(config.seeds)) or "none"
    raise FileNotFoundError(f"unknown seed {name_or_path!r}: not in the seeds config ({known}) and not a path")


def seed_catalog(root: str, name: str) -> str:
    return join(root, "_seeds", name)


def check_identity(pool_meta: dict[str, str], seed_meta: dict[str, str], where: str) -> None:
    differing = [k for k in IDENTITY_KEYS if pool_meta.get(k) != seed_meta.get(k)]
    if differing:
        detail = "; ".join(f"{k}: pool {pool_meta.get(k)!r} vs seed {seed_meta.get(k)!r}" for k in differing)
        raise ModelMismatchError(f"seed embeddings {where} were made with another backbone or preprocessing "
                                 f"({detail}); seeds must be embedded exactly like the pool")


def seed_vectors(root: str, name: str, spec: SeedSpec, *, address: str | None = None
                 ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(seed image ids, vectors, uris)`` embedded like the pool (ingesting/embedding if needed)."""
    pool_meta = embedding_metadata(root)
    if spec.embeddings:
        check_identity(pool_meta, embedding_metadata(spec.embeddings), spec.embeddings)
        ids, x = load_embeddings(spec.embeddings)
        return ids, x, [""] * len(ids)
    if not spec.images:
        raise ValueError(f"seed {name!r} names neither images nor embeddings")
    sub = seed_catalog(root, name)
    ingest(spec.images, sub)
    config: EmbedConfig = replace(config_of_table(root), actors=1)
    embed(sub, config, address=address)
    check_identity(pool_meta, embedding_metadata(sub), sub)
    ids, x = load_embeddings(sub)
    from catalog.sql import query

    uris = dict(zip(*(query(sub, "SELECT image_id, uri FROM pool").column(c).to_pylist() for c in (0, 1))))
    return ids, x, [uris[i] for i in ids.tolist()]
