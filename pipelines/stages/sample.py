"""``curate sample``: balanced hierarchical sampling of the clustered pool into ``curated/<part>``.

The target is water-filled over the top-level clusters, then down the hierarchy to level-1 clusters;
the selected rows keep their cluster ids at every level as lineage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import pyarrow as pa

from catalog import schemas
from catalog.ledger import Ledger
from catalog.manifest import RunManifest
from catalog.names import check_name
from catalog.shards import delete_table, read_table, table_exists, write_shards
from catalog.sql import query
from curation.sampling import balanced_sample


@dataclass(frozen=True)
class SampleConfig:
    target_size: int = 0
    strategy: Literal["random", "closest", "farthest"] = "random"
    multiplier: float = 1.0
    seed: int = 0
    part: str = "lvd"

    def __post_init__(self) -> None:
        check_name(self.part, "sample part")


def curated_table(clusters: pa.Table, rows: np.ndarray, uris: dict[int, str], part: str) -> pa.Table:
    """Selected rows with their uri and lineage (cluster id per level, distance to the l1 centroid)."""
    picked = clusters.take(pa.array(rows))
    ids = picked.column("image_id").to_pylist()
    base = pa.table({"image_id": pa.array(ids, pa.int64()),
                     "uri": pa.array([uris.get(i) for i in ids], pa.string()),
                     "part": pa.array([part] * len(ids), pa.string())})
    for name in picked.column_names[1:]:
        base = base.append_column(name, picked.column(name))
    return base.replace_schema_metadata(schemas.stamp(base.schema, f"curated/{part}").metadata)


def sample(root: str, config: SampleConfig) -> dict[str, int]:
    """Write ``curated/<part>`` with exactly ``target_size`` rows (fewer only if the pool is smaller)."""
    if config.target_size <= 0:
        raise ValueError("give a positive --target-size")
    clusters = read_table(root, "clusters")
    level_cols = [c for c in clusters.column_names if c.startswith("l") and c[1:].isdigit()]
    labels = np.stack([clusters.column(c).to_numpy() for c in level_cols], axis=1)
    uris = {}
    if table_exists(root, "pool"):
        pool = query(root, "SELECT image_id, uri FROM pool WHERE status = 'ok'")
        uris = dict(zip(pool.column("image_id").to_pylist(), pool.column("uri").to_pylist()))
    table_name = f"curated/{config.part}"
    with RunManifest(root, f"sample-{config.part}", asdict(config)) as manifest:
        rows = balanced_sample(labels, config.target_size, seed=config.seed, strategy=config.strategy,
                               distances=clusters.column("distance").to_numpy(), multiplier=config.multiplier)
        delete_table(root, table_name)
        write_shards(root, table_name, "selection", curated_table(clusters, rows, uris, config.part))
        manifest.rows = {"in": clusters.num_rows, "out": len(rows), "errored": 0}
    Ledger(root, f"sample-{config.part}").mark_complete(manifest.rows)
    return manifest.rows
