"""The catalog's tables: one pyarrow schema per table, versioned in the Parquet file metadata.

Every shard carries ``curate.schema_version`` and ``curate.table`` in its metadata so a reader can
refuse files written by a newer release instead of misreading them.
"""

from __future__ import annotations

import pyarrow as pa

from catalog.errors import UserError

SCHEMA_VERSION = 1
VERSION_KEY = b"curate.schema_version"
TABLE_KEY = b"curate.table"

# Table names (folders under a catalog root): stages name what they read and write with these, so no
# stage imports another for a name.
POOL_TABLE = "pool"
ERRORS_TABLE = "errors"
COPY_DESCRIPTORS_TABLE = "copy_descriptors"
MODEL_COPY_DESCRIPTORS_TABLE = "model_copy_descriptors"  # dedup's, from descriptor=torchscript:PATH
EMBEDDINGS_TABLE = "embeddings"
DUPLICATES_TABLE = "duplicates"
CLUSTERS_TABLE = "clusters"
CENTROIDS_TABLE = "centroids"
RETRIEVED_TABLE = "retrieved"
# The stage whose errors rows (reason ``filtered:<rule>``) are images removed for quality: cluster leaves them out.
FILTER_STAGE = "filter"
# Other catalog entries shared between stages (and the trainer).
MIX_FILE = "_mix.json"
SEEDS_DIR = "_seeds"  # small catalogs of seed sets, one per seed name
PARTS_DIR = "_parts"  # small catalogs of `images:` parts of a mix
# What ingest (and every folder walk) takes for an image, by extension.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"})


def curated_table(part: str) -> str:
    """The table of one training part: written by ``sample`` (part ``lvd``…) or ``mix``."""
    return f"curated/{part}"


def packed_table(part: str) -> str:
    """The byte-range index of a part's tar shards (``curate pack``), beside the shards' folder."""
    return f"packed/{part}/index"


def packed_shards_dir(part: str) -> str:
    """The folder of a part's WebDataset tar shards (``curate pack``), catalog-relative."""
    return f"packed/{part}/shards"


class CatalogVersionError(UserError):
    """A catalog file was written by a newer schema version than this code understands."""


POOL = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("bytes", pa.int64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("format", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        # quality signals (curation/quality.py), null for unusable files and in pools ingested before them
        pa.field("min_side", pa.int32()),
        pa.field("aspect", pa.float32()),
        pa.field("sharpness", pa.float32()),
        pa.field("dark_fraction", pa.float32()),
        pa.field("bright_fraction", pa.float32()),
        pa.field("colour_entropy", pa.float32()),
        pa.field("nearly_constant", pa.bool_()),
    ]
)
QUALITY_COLUMNS = ("min_side", "aspect", "sharpness", "dark_fraction", "bright_fraction", "colour_entropy",
                   "nearly_constant")

ERRORS = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("message", pa.string()),
    ]
)

DUPLICATES = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("kept_id", pa.int64(), nullable=False),
        pa.field("similarity", pa.float32()),
        pa.field("reason", pa.string(), nullable=False),
    ]
)

RETRIEVED = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("seed", pa.string(), nullable=False),
        pa.field("seed_image_id", pa.int64()),
        pa.field("rank", pa.int32()),
        pa.field("similarity", pa.float32()),
    ]
)

CURATED = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("uri", pa.string()),  # null when clustering embeddings brought without a pool
        pa.field("part", pa.string(), nullable=False),
    ]
)


def curated_rows(part: str, image_ids: pa.Array, uris: pa.Array, lineage: pa.Table | None = None) -> pa.Table:
    """Rows of ``curated/<part>``: the CURATED columns, then any lineage columns (cluster ids per level…)."""
    base = pa.table({"image_id": pa.array(image_ids, pa.int64()), "uri": pa.array(uris, pa.string()),
                     "part": pa.array([part] * len(image_ids), pa.string())}, schema=CURATED)
    for name in (lineage.column_names if lineage is not None else []):
        base = base.append_column(lineage.schema.field(name), lineage.column(name))
    return base.replace_schema_metadata(stamp(base.schema, curated_table(part)).metadata)


def embeddings(dim: int, dtype: pa.DataType = pa.float16()) -> pa.Schema:
    """Embeddings as a fixed-size list so a whole table maps onto one contiguous [N, dim] array."""
    return pa.schema(
        [
            pa.field("image_id", pa.int64(), nullable=False),
            pa.field("embedding", pa.list_(pa.field("item", dtype), dim), nullable=False),
        ]
    )


def clusters(n_levels: int) -> pa.Schema:
    """Cluster id of every image at each level (``l1`` finest) and its distance to its l1 centroid."""
    fields = [pa.field("image_id", pa.int64(), nullable=False)]
    fields += [pa.field(f"l{i}", pa.int64(), nullable=False) for i in range(1, n_levels + 1)]
    fields.append(pa.field("distance", pa.float32()))
    return pa.schema(fields)


def centroids(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("level", pa.int32(), nullable=False),
            pa.field("cluster_id", pa.int64(), nullable=False),
            pa.field("parent_id", pa.int64()),
            pa.field("size", pa.int64(), nullable=False),
            pa.field("centroid", pa.list_(pa.field("item", pa.float32()), dim), nullable=False),
        ]
    )


def stamp(schema: pa.Schema, table: str, extra: dict[str, str] | None = None) -> pa.Schema:
    """Attach the schema version, the table name and stage-specific metadata (e.g. model id)."""
    meta = dict(schema.metadata or {})
    meta[VERSION_KEY] = str(SCHEMA_VERSION).encode()
    meta[TABLE_KEY] = table.encode()
    for key, value in (extra or {}).items():
        meta[f"curate.{key}".encode()] = str(value).encode()
    return schema.with_metadata(meta)


def check_version(schema: pa.Schema, where: str) -> None:
    """Refuse a file written by a newer schema version, naming the file."""
    raw = (schema.metadata or {}).get(VERSION_KEY)
    if raw is None:
        return
    version = int(raw)
    if version > SCHEMA_VERSION:
        raise CatalogVersionError(
            f"{where} was written with catalog schema version {version}, but this curate "
            f"understands up to version {SCHEMA_VERSION}: upgrade curate to read it"
        )


def metadata_of(schema: pa.Schema) -> dict[str, str]:
    """The ``curate.*`` metadata of a schema as plain strings, without the prefix."""
    out = {}
    for key, value in (schema.metadata or {}).items():
        if key.startswith(b"curate."):
            out[key[len(b"curate.") :].decode()] = value.decode()
    return out
