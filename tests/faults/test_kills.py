"""SIGKILL at seeded points of ``ingest`` and ``embed`` (one part-way, one during the resume), then the
same command to the end: the final tables equal an uninterrupted run's, bit for bit, with no duplicate
row. (``cluster``'s kill-and-resume is in tests/e2e/test_build_lvd.py; ``benchmarks/faults.py`` runs
many more seeds.)"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from catalog.embeddings import load_embeddings
from catalog.sql import query
from tests.faults.kills import killed_and_resumed
from tests.helpers import run_cli

INGEST = ["--set", "files_per_unit=20", "--executor", "local"]
EMBED = ["embed", "--set", "model=vit_test", "random_init=true", "image_size=32", "images_per_unit=20", "batch_size=10",
         "--executor", "local"]
POOL_COLUMNS = "image_id, uri, bytes, width, height, format, sha256, status"


@pytest.fixture(scope="module")
def reference(fault_source, tmp_path_factory) -> str:
    """The uninterrupted ingest and embed."""
    root = str(tmp_path_factory.mktemp("kill_reference") / "cat")
    assert run_cli(["ingest", fault_source, *INGEST, "--catalog", root]).returncode == 0
    assert run_cli([*EMBED, "--catalog", root]).returncode == 0
    return root


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1])
def test_ingest_killed_twice_resumes_to_the_uninterrupted_tables(fault_source, reference, tmp_path, seed):
    root = str(tmp_path / "cat")
    killed_and_resumed(["ingest", fault_source, *INGEST], root, "ingest", seed, units=8)
    for sql in (f"SELECT {POOL_COLUMNS} FROM pool ORDER BY image_id",
                "SELECT image_id, uri, reason FROM errors ORDER BY image_id"):
        assert query(root, sql).to_pylist() == query(reference, sql).to_pylist()
    ids, x = load_embeddings(root, "copy_descriptors")
    ref_ids, ref_x = load_embeddings(reference, "copy_descriptors")
    assert len(set(ids.tolist())) == len(ids)
    assert np.array_equal(ids[np.argsort(ids)], ref_ids[np.argsort(ref_ids)])
    assert np.array_equal(x[np.argsort(ids)], ref_x[np.argsort(ref_ids)])


@pytest.mark.slow
@pytest.mark.parametrize("seed", [2])
def test_embed_killed_twice_resumes_to_the_uninterrupted_embeddings(reference, tmp_path, seed):
    root = shutil.copytree(reference, str(tmp_path / "cat"), ignore=shutil.ignore_patterns("embeddings", "_ledger"))
    shutil.copytree(os.path.join(reference, "_ledger", "ingest"), os.path.join(root, "_ledger", "ingest"))
    killed_and_resumed(EMBED, root, "embed", seed, units=7)
    ids, x = load_embeddings(root)
    ref_ids, ref_x = load_embeddings(reference)
    order, ref_order = np.argsort(ids), np.argsort(ref_ids)
    assert len(set(ids.tolist())) == len(ids)
    assert np.array_equal(ids[order], ref_ids[ref_order])
    assert np.array_equal(x[order].view(np.uint16), ref_x[ref_order].view(np.uint16))
