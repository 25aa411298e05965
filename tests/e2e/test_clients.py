"""A finished demo catalog read by the tools our users already have, each used as its own users do.

``webdataset`` and Hugging Face ``datasets`` over the packed shards, ``datasets``, ``pyarrow.dataset``
and the DuckDB client over every table's Parquet files (no view of ours), Ray Data over the
embeddings; and the same catalog copied to another folder and to an S3 server, read from the copy.
"""

from __future__ import annotations

import glob
import os
import shutil

import numpy as np
import pyarrow.dataset as pads
import pytest

from catalog.decode import decode_rgb
from catalog.images import read_image_bytes
from catalog.shards import read_table
from catalog.sql import query
from catalog.tables import describe, list_tables
from pipelines.stages.pack import image_id_of_key
from tests.helpers import run_cli, s3_server
from training.data.dataset import PartDataset
from training.train.data import part_table

pytestmark = pytest.mark.slow  # the fixture retrieves and packs a copy of the demo catalog

LEVELS = [f"l{i}" for i in range(1, 6)]  # the demo job's five levels


def _seeds(demo_pool: str) -> str:
    return f"seeds.seeds={{demo: {{images: {os.path.join(demo_pool, 'seed')}}}}}"


@pytest.fixture(scope="module")
def packed(lvd_catalog, demo_pool, tmp_path_factory) -> str:
    """A copy of the demo catalog with the seed set retrieved and part ``lvd`` packed."""
    root = str(tmp_path_factory.mktemp("clients") / "cat")
    shutil.copytree(lvd_catalog, root, ignore=shutil.ignore_patterns("reports", "_checkpoints"))
    for args in (["retrieve", "--seed", "demo", "--mode", "knn", "--overwrite", "--set", _seeds(demo_pool)],
                 ["pack", "--part", "lvd", "--images-per-shard", "200", "--executor", "local"]):
        result = run_cli([*args, "--catalog", root])
        assert result.returncode == 0, result.stderr
    return root


def _shards(root: str) -> list[str]:
    return sorted(glob.glob(os.path.join(root, "packed", "lvd", "shards", "*.tar")))


def _curated(root: str) -> dict[int, dict]:
    return {r["image_id"]: r for r in read_table(root, "curated/lvd").to_pylist()}


def test_webdataset_decodes_every_packed_image_with_its_lineage(packed):
    import webdataset as wds

    curated = _curated(packed)
    samples = wds.WebDataset(_shards(packed), shardshuffle=False).decode("pil").to_tuple("__key__", "png", "json")
    seen = []
    for key, image, meta in samples:
        image_id = image_id_of_key(key)
        row = curated[image_id]
        assert meta == {"image_id": image_id, "uri": row["uri"], "part": "lvd", **{lv: row[lv] for lv in LEVELS}}
        # lossless, for every image (16-bit grey, alpha, palette): WebDataset's own decode gives the trainer's pixels
        assert np.array_equal(np.asarray(image), np.asarray(decode_rgb(read_image_bytes(row["uri"])))), row["uri"]
        seen.append(image_id)
    assert sorted(seen) == sorted(read_table(packed, "packed/lvd/index").column("image_id").to_pylist())
    assert len(seen) == len(curated)  # every curated image was readable


def test_hf_datasets_loads_every_table_and_the_shards(packed, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    cache = str(tmp_path / "hf")
    for table in list_tables(packed):
        files = sorted(glob.glob(os.path.join(packed, table, "*.parquet")))
        ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=cache)
        assert ds.num_rows == describe(packed, table).rows, table
    pool = datasets.load_dataset("parquet", data_files=os.path.join(packed, "pool", "*.parquet"), split="train",
                                 cache_dir=cache)
    assert set(pool["image_id"]) == set(read_table(packed, "pool", ["image_id"]).column("image_id").to_pylist())

    shards = datasets.load_dataset("webdataset", data_files=_shards(packed), split="train", cache_dir=cache)
    assert isinstance(shards.features["png"], datasets.Image) and shards.num_rows == len(_curated(packed))
    first = shards[0]
    row = _curated(packed)[first["json"]["image_id"]]
    assert image_id_of_key(first["__key__"]) == row["image_id"] and first["json"]["l5"] == row["l5"]
    assert first["png"].size == decode_rgb(read_image_bytes(row["uri"])).size


def test_pyarrow_dataset_reads_each_table_folder(packed):
    tables = list_tables(packed)
    assert {"pool", "embeddings", "clusters", "curated/lvd", "packed/lvd/index", "retrieved"} <= set(tables)
    for table in tables:
        ds = pads.dataset(os.path.join(packed, table), format="parquet")
        assert ds.count_rows() == describe(packed, table).rows, table


def test_duckdb_reads_the_parquet_files_without_our_views(packed):
    import duckdb

    con = duckdb.connect()
    glob_of = lambda table: os.path.join(packed, table, "*.parquet")
    got = con.execute(f"SELECT k.l5, count(*) FROM read_parquet('{glob_of('curated/lvd')}') c "
                      f"JOIN read_parquet('{glob_of('clusters')}') k USING (image_id) GROUP BY 1 ORDER BY 1").fetchall()
    want = query(packed, "SELECT k.l5, count(*) FROM curated_lvd c JOIN clusters k USING (image_id) "
                         "GROUP BY 1 ORDER BY 1").to_pylist()
    assert got == [tuple(r.values()) for r in want] and sum(n for _, n in got) == len(_curated(packed))


def test_ray_data_streams_embeddings_as_torch_batches(packed):
    import ray
    import torch

    from catalog.ray_runtime import ensure_ray

    ensure_ray(None)
    embeddings = read_table(packed, "embeddings")
    dim = embeddings.schema.field("embedding").type.list_size
    ds = ray.data.read_parquet(os.path.join(packed, "embeddings"), override_num_blocks=1)  # 1,500 rows: one read
    rows = 0
    for batch in ds.iter_torch_batches(batch_size=256):
        tensor = batch["embedding"]
        assert isinstance(tensor, torch.Tensor) and tensor.ndim == 2 and tensor.shape[1] == dim
        rows += tensor.shape[0]
    assert rows == embeddings.num_rows


def _reads_from(copy: str, original: str, demo_pool: str) -> None:
    """Packed images, SQL and retrieval, read from ``copy`` only."""
    table = part_table(copy, "lvd")
    assert table.num_rows == len(_curated(original))
    assert all(u.startswith(copy.rstrip("/") + "/packed/lvd/shards/") for u in table.column("uri").to_pylist())
    dataset = PartDataset("lvd", table)
    for i in range(0, len(dataset), 97):
        assert dataset.load(i).size == PartDataset("lvd", part_table(original, "lvd")).load(i).size
    shown = query(copy, "SELECT uri FROM packed_lvd_index ORDER BY image_id LIMIT 3").column("uri").to_pylist()
    assert [read_image_bytes(u) for u in shown] == [read_image_bytes(u) for u in table.sort_by("image_id")
                                                   .column("uri").to_pylist()[:3]]
    result = run_cli(["retrieve", "--catalog", copy, "--seed", "demo", "--mode", "knn", "--overwrite",
                      "--set", _seeds(demo_pool)])
    assert result.returncode == 0, result.stderr
    sql = "SELECT image_id, seed_image_id FROM retrieved WHERE seed = 'demo' ORDER BY 1, 2"
    assert query(copy, sql).to_pylist() == query(original, sql).to_pylist() != []


def test_a_copied_catalog_reads_from_another_folder(packed, demo_pool, tmp_path):
    moved = str(tmp_path / "moved")
    shutil.copytree(packed, moved)
    _reads_from(moved, packed, demo_pool)


def test_a_catalog_uploaded_to_s3_reads_from_the_bucket(packed, demo_pool):
    with s3_server("clients") as fs:
        fs.put(packed + "/", "clients/cat", recursive=True)
        _reads_from("s3://clients/cat", packed, demo_pool)
