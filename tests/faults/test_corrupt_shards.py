"""A shard that is not what it should be is named and refused, never read as data: a file of garbage
planted in a table's folder, a truncated copy, a shard of another table, and flipped bits in a data page
(every page carries a CRC). Stages refuse the table, ``curate sql`` names the bad file (and still answers
queries of the other tables), and a table whose shards record two preprocessings is refused too.
"""

from __future__ import annotations

import glob
import os
import shutil

import numpy as np
import pytest

from catalog.decode import Preprocess
from catalog.embeddings import EmbeddingIdentity, ModelMismatchError, embeddings_table, load_embeddings
from catalog.shards import CorruptShardError, write_shards
from catalog.sql import query
from tests.helpers import run_cli

TINY = ["model=vit_test", "random_init=true", "image_size=32", "images_per_unit=40", "batch_size=16"]


def _shards(root: str, table: str) -> list[str]:
    return sorted(glob.glob(os.path.join(root, table, "*.parquet")))


def _plant(root: str, kind: str) -> str:
    """Put one bad file into the ``pool`` table; return its path."""
    good = _shards(root, "pool")[0]
    planted = os.path.join(root, "pool", f"planted-{kind}.parquet")
    if kind == "garbage":
        with open(planted, "wb") as f:
            f.write(b"PAR1" + os.urandom(2000))
    elif kind == "truncated":
        with open(good, "rb") as f:
            data = f.read()
        with open(planted, "wb") as f:
            f.write(data[: len(data) * 2 // 3])
    elif kind == "other_table":
        shutil.copy(_shards(root, "errors")[0], planted)
    return planted


@pytest.fixture()
def catalog(demo_catalog, tmp_path) -> str:
    return shutil.copytree(demo_catalog, str(tmp_path / "cat"), ignore=shutil.ignore_patterns("embeddings"))


@pytest.mark.parametrize("kind", ["garbage", "truncated", "other_table"])
def test_a_planted_shard_is_named_by_the_stage_and_by_sql(catalog, kind):
    planted = _plant(catalog, kind)
    result = run_cli(["embed", "--catalog", catalog, "--set", *TINY])
    assert result.returncode == 2 and planted in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and [line for line in result.stderr.splitlines() if planted in line]
    assert not _shards(catalog, "embeddings")
    sql = run_cli(["sql", "SELECT count(*) AS n FROM pool", "--catalog", catalog])
    assert sql.returncode == 2 and planted in sql.stderr
    with pytest.raises(CorruptShardError, match=os.path.basename(planted)):
        query(catalog, "SELECT count(*) FROM pool")
    errors = query(catalog, "SELECT count(*) AS n FROM errors").column(0)[0].as_py()
    assert errors > 0  # the other tables still answer


def test_flipped_bits_in_a_data_page_are_caught_by_the_page_crc(tmp_path):
    import pyarrow.parquet as pq

    root = str(tmp_path / "cat")
    rng = np.random.default_rng(1)
    x, ids = rng.standard_normal((200, 16)).astype(np.float32), np.arange(200)
    write_shards(root, "embeddings", "embed=a", embeddings_table(ids, x, _identity(32).metadata()))
    shard = _shards(root, "embeddings")[0]
    column = pq.ParquetFile(shard).metadata.row_group(0).column(1)  # the embedding column
    end = (column.dictionary_page_offset or column.data_page_offset) + column.total_compressed_size
    at = (column.data_page_offset + end) // 2  # inside the data page, past its header
    with open(shard, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(CorruptShardError, match=os.path.basename(shard)):
        load_embeddings(root)


def _identity(size: int) -> EmbeddingIdentity:
    return EmbeddingIdentity("vit_test", "0" * 64, Preprocess(size=size).fingerprint(), "cls", "l2")


def test_shards_of_two_preprocessings_in_one_table_are_refused_naming_both(tmp_path):
    root = str(tmp_path / "cat")
    rng = np.random.default_rng(0)
    for unit, size in (("embed=a", 32), ("embed=b", 28)):
        x = rng.standard_normal((5, 8)).astype(np.float32)
        ids = rng.integers(-(2**62), 2**62, 5)
        write_shards(root, "embeddings", unit, embeddings_table(ids, x, _identity(size).metadata()))
    first, second = _shards(root, "embeddings")
    for load in (lambda: load_embeddings(root), lambda: EmbeddingIdentity.of_table(root)):
        with pytest.raises(ModelMismatchError, match="mixes embeddings of 2") as e:
            load()
        assert first in str(e.value) and second in str(e.value) and "preprocess" in str(e.value)
