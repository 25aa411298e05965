"""Dedup on a grown pool searches only the new images (and the copy groups that lost one) and finds the
duplicates of a search of the whole pool: with the pixel descriptor and a flat index, and with embeddings
past the exact-search size, where the kept IVF index takes the new rows."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from catalog.ledger import Ledger
from catalog.paths import join, write_bytes_atomic, write_stream_atomic
from catalog.sql import query
from curation.index import EXACT_MAX, InMemoryRows, build_index, fingerprint
from curation.synthetic_images import combined, flip, random_scene
from pipelines.dedup_graph import GRAPH_FILE, INDEX_FILE, GraphStart, graph_files, graph_start
from pipelines.stage import run_stage
from tests.helpers import write_embedded_pool

DUPLICATES_SQL = "SELECT image_id, kept_id, reason, round(similarity, 4) AS s FROM duplicates ORDER BY ALL"


@pytest.fixture()
def searched(monkeypatch) -> list[int]:
    """How many rows the copy graph's search queries (the real search still runs)."""
    import pipelines.stages.dedup as dedup

    count, real = [0], dedup.local_edges

    def counted(index, blocks, query):
        def seen():
            for first, rows in blocks:
                count[0] += len(rows)
                yield first, rows

        return real(index, seen(), query)

    monkeypatch.setattr(dedup, "local_edges", counted)
    return count


def _scenes(folder, rng: np.random.Generator, names: range, copies: dict[str, int]) -> None:
    for i in names:
        random_scene(rng, 128, 104).save(folder / f"scene{i:02d}.png")
    for name, i in copies.items():
        from PIL import Image

        with Image.open(folder / f"scene{i:02d}.png") as img:
            variant = flip if name.startswith("flip") else combined
            variant(img.convert("RGB"), rng).convert("RGB").save(folder / f"{name}.jpg", quality=90)


def _dedup(root: str, source: str, config: dict | None = None, **kwargs):
    run_stage("ingest", root, {"source": source}, executor="local")
    return run_stage("dedup", root, config or {}, executor="local", **kwargs)


def test_pixel_dedup_of_a_grown_folder_searches_only_the_new_images(tmp_path, searched):
    folder = tmp_path / "src"
    folder.mkdir()
    rng = np.random.default_rng(4)
    _scenes(folder, rng, range(24), {"flip00": 0, "flip01": 1, "combined02": 2})
    root = str(tmp_path / "cat")
    first = _dedup(root, str(folder))
    assert searched[0] == 27 and first.summary["removed"]["copy"] == 3
    # 10 new images: 8 scenes, a copy of an old scene, a copy of a new one; scene00 (with a copy) leaves
    _scenes(folder, rng, range(24, 32), {"flip03": 3, "combined30": 30})
    os.remove(folder / "scene00.png")
    searched[0] = 0
    grown = _dedup(root, str(folder))
    assert searched[0] == 10 + 1  # the new images, and flip00 (its copy group lost scene00)
    assert grown.summary["copy_graph"] == {"images": 36, "searched": 11}
    scratch = str(tmp_path / "scratch")
    _dedup(scratch, str(folder))
    assert query(root, DUPLICATES_SQL).to_pylist() == query(scratch, DUPLICATES_SQL).to_pylist()
    assert grown.summary["removed"]["copy"] == 4  # flip01, combined02, flip03, combined30: flip00 is kept now
    searched[0] = 0
    assert run_stage("dedup", root, {}, executor="local").skipped and searched[0] == 0
    ledger = Ledger(root, "dedup")  # a kill after the copy unit's kept graph, before its marker: the same rows
    for name in ("copy", "_complete"):
        os.remove(os.path.join(ledger.dir, f"{name}.json"))
    assert run_stage("dedup", root, {}, executor="local").units_run == 1 and searched[0] == 0
    assert query(root, DUPLICATES_SQL).to_pylist() == query(scratch, DUPLICATES_SQL).to_pylist()
    run_stage("dedup", root, {}, executor="local", overwrite=True)  # forgets the kept graph: searches all
    assert searched[0] == 36 and query(root, DUPLICATES_SQL).to_pylist() == query(scratch, DUPLICATES_SQL).to_pylist()


def _copies_of(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
    y = x + rng.normal(0, 0.02, x.shape)
    return y / np.linalg.norm(y, axis=1, keepdims=True)


def test_embedding_dedup_past_exact_search_adds_the_new_rows_to_the_kept_ivf_index(tmp_path, searched):
    rng = np.random.default_rng(0)
    n, dim = EXACT_MAX + 2_000, 128  # random directions: no pair of them is near a copy (cosine 0.6)
    x = rng.normal(size=(n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[n - 300 :] = _copies_of(rng, x[:300])  # 300 copies among the first rows
    root = str(tmp_path / "cat")
    write_embedded_pool(root, "first", np.arange(n), x)
    config = {"descriptor": "embeddings"}
    first = run_stage("dedup", root, config, executor="local")
    assert first.summary["removed"]["copy"] == 300 and os.path.exists(os.path.join(root, INDEX_FILE))
    new = np.concatenate([_copies_of(rng, x[300:400]), rng.normal(size=(1_900, dim))])
    new /= np.linalg.norm(new, axis=1, keepdims=True)
    scratch = shutil.copytree(root, str(tmp_path / "scratch"))
    for catalog in (root, scratch):
        write_embedded_pool(catalog, "grown", np.arange(n, n + 2_000), new)
    searched[0] = 0
    grown = run_stage("dedup", root, config, executor="local")
    assert searched[0] == 2_000 and grown.summary["removed"]["copy"] == 400
    os.remove(os.path.join(scratch, GRAPH_FILE))  # a search of the whole grown pool, for comparison
    run_stage("dedup", scratch, config, executor="local")
    assert query(root, DUPLICATES_SQL).to_pylist() == query(scratch, DUPLICATES_SQL).to_pylist()


def test_a_kept_index_is_used_only_while_it_is_the_one_its_graph_names(tmp_path):
    rng = np.random.default_rng(1)
    n = EXACT_MAX + 1_000
    x = rng.normal(size=(n, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids, content, root = np.arange(n), np.arange(n) * 7, str(tmp_path / "cat")
    start = GraphStart(build_index(x, seed=0), None, ids, np.ones(n, bool), x)
    files = graph_files("key", ids, content, np.arange(n), start)
    write_bytes_atomic(join(root, GRAPH_FILE), files[GRAPH_FILE])
    write_stream_atomic(join(root, INDEX_FILE), files[INDEX_FILE])  # in pieces, as the unit's commit does
    kept = graph_start(root, "key", ids, content, InMemoryRows(x), seed=0)
    assert kept.index.fingerprint == "updated" and kept.index.ntotal == n  # the kept index, no row searched
    assert len(kept.known.search_rows()) == 0

    other = build_index(x[::-1].copy(), seed=0)  # a valid index, but not the one the graph was saved with
    for replaced in (other.to_bytes(), other.to_bytes()[:5_000], b"not an index"):
        write_bytes_atomic(join(root, INDEX_FILE), replaced)
        rebuilt = graph_start(root, "key", ids, content, InMemoryRows(x), seed=0)
        assert rebuilt.index.fingerprint == fingerprint(x) and rebuilt.index.ntotal == n
