"""``curate mix``: assemble the training mix — curated parts and their sampling weights.

Parts come from the whole deduplicated pool (``pool``), from ``build-lvd`` (``lvd``), from retrieval (``retrieved:<seed>``), or from a public
labelled dataset given as images (``images:<folder or URL>``, e.g. ImageNet-1k, the part the trainer
draws its homogeneous batches from). Each part becomes ``curated/<name>``; the weights and the
homogeneous part are written to ``<catalog>/_mix.json`` for the trainer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import pyarrow as pa

from catalog import schemas
from catalog.manifest import RunManifest
from catalog.mix import TrainingMix, write_mix
from catalog.names import check_name
from catalog.paths import join
from catalog.shards import delete_table, table_exists, write_shards
from catalog.sql import query
from catalog.tables import describe
from pipelines.stages.ingest import ingest


@dataclass(frozen=True)
class PartSpec:
    source: str
    weight: float | None = None

    def __post_init__(self) -> None:
        if self.source.startswith("retrieved:"):
            check_name(self.source.split(":", 1)[1], f"mix source {self.source!r}: the seed")


@dataclass(frozen=True)
class MixConfig:
    """``weight`` None: proportional to the part's size. ``homogeneous_part`` None or absent: none."""

    parts: dict[str, PartSpec] = field(default_factory=lambda: {"lvd": PartSpec("lvd")})
    homogeneous_part: str | None = "imagenet1k"
    p_homogeneous: float = 0.1

    def __post_init__(self) -> None:
        for name in self.parts:
            check_name(name, "mix part")
        if self.homogeneous_part is not None:
            check_name(self.homogeneous_part, "mix homogeneous_part")


def _curated(name: str, table: pa.Table) -> pa.Table:
    base = pa.table({"image_id": table.column("image_id"), "uri": table.column("uri"),
                     "part": pa.array([name] * table.num_rows, pa.string())})
    return base.replace_schema_metadata(schemas.stamp(base.schema, f"curated/{name}").metadata)


def _removed_ids_sql(root: str) -> str:
    return "SELECT image_id FROM duplicates" if table_exists(root, "duplicates") else "SELECT NULL::BIGINT WHERE false"


def build_part(root: str, name: str, source: str) -> int:
    """Materialise one part as ``curated/<name>``; returns its size."""
    if source == "pool":  # every usable image that dedup kept
        rows = query(root, "SELECT image_id, uri FROM pool WHERE status = 'ok' AND image_id NOT IN "
                           f"({_removed_ids_sql(root)}) ORDER BY image_id")
    elif source == "lvd":
        if not table_exists(root, "curated/lvd"):
            raise FileNotFoundError("part 'lvd' needs curated/lvd: run `curate build-lvd` first")
        return describe(root, "curated/lvd").rows
    elif source.startswith("retrieved:"):
        seed = source.split(":", 1)[1]
        rows = query(root, "SELECT r.image_id, p.uri FROM retrieved r JOIN pool p USING (image_id) "
                           f"WHERE r.seed = '{seed}' ORDER BY r.image_id")
        if rows.num_rows == 0:
            raise FileNotFoundError(f"no retrieved images for seed {seed!r}: run `curate retrieve --seed {seed}`")
    elif source.startswith("images:"):
        sub = join(root, "_parts", name)
        ingest(source.split(":", 1)[1], sub)
        rows = query(sub, "SELECT image_id, uri FROM pool WHERE status = 'ok' ORDER BY image_id")
    else:
        raise ValueError(f"part {name!r}: source must be 'pool', 'lvd', 'retrieved:<seed>' or 'images:<path>', "
                         f"not {source!r}")
    delete_table(root, f"curated/{name}")
    write_shards(root, f"curated/{name}", "part", _curated(name, rows))
    return rows.num_rows


def mix(root: str, config: MixConfig) -> dict[str, object]:
    """Build every part and record the mix; returns the recorded mix."""
    with RunManifest(root, "mix", asdict(config)) as manifest:
        sizes = {name: build_part(root, name, spec.source) for name, spec in sorted(config.parts.items())}
        weights = {name: (spec.weight if spec.weight is not None else float(sizes[name]))
                   for name, spec in config.parts.items()}
        homogeneous = config.homogeneous_part if config.homogeneous_part in sizes else None
        recorded = TrainingMix(sizes, weights, homogeneous, config.p_homogeneous if homogeneous else 0.0)
        write_mix(root, recorded)
        doc = recorded.to_json()
        manifest.rows = {"in": len(sizes), "out": sum(sizes.values()), "errored": 0}
        manifest.notes = doc
    return doc

