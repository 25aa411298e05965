"""A generated corpus of malformed images (``tests.faults.malformed``) through ``curate ingest``: every
file lands in ``pool`` exactly once, each bad one with an ``errors`` row and a reason, images the decoder
can read whole (intact, wrong extension, a harmless bit flip) are ``ok``, no truncation is ``ok`` unless
it still decodes, and a second run over the same corpus gives identical tables."""

from __future__ import annotations

import pytest

from catalog.decode import DECOMPRESSION_BOMB, EMPTY_FILE, HTML_PAGE, TEXT_FILE
from catalog.sql import query
from pipelines.stage import run_stage
from pipelines.stages.ingest import IngestConfig
from tests.faults.malformed import corpus, decodes


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    src = tmp_path_factory.mktemp("malformed")
    files = corpus(seed=0)
    for name, data in files.items():
        (src / name).write_bytes(data)
    roots = []
    for copy in ("a", "b"):
        root = str(tmp_path_factory.mktemp("malformed_cat") / copy)
        run_stage("ingest", root, IngestConfig(source=str(src), files_per_unit=16))
        roots.append(root)
    return src, files, roots


def _by_name(root: str) -> dict[str, dict]:
    rows = query(root, "SELECT p.uri, p.status, e.reason FROM pool p LEFT JOIN errors e USING (image_id)").to_pylist()
    return {r["uri"].rsplit("/", 1)[1]: r for r in rows}


def test_every_malformed_file_is_one_pool_row_with_a_reason(ingested):
    _, files, (root, _) = ingested
    rows = _by_name(root)
    assert sorted(rows) == sorted(files)
    for name, row in rows.items():
        assert (row["status"] == "ok") == (row["reason"] is None), row
        assert (row["status"] == "ok") == decodes(files[name]), (name, row)  # the decoder alone decides
    assert all(rows[n]["status"] == "ok" for n in rows if n.startswith(("intact-", "wrong_ext-")))
    assert all(rows[n]["reason"] == EMPTY_FILE for n in rows if n.startswith("truncated-empty-"))
    assert rows["oversized.png"]["reason"] == DECOMPRESSION_BOMB
    assert rows["text_as.jpg"]["reason"] == TEXT_FILE and rows["html_as.png"]["reason"] == HTML_PAGE
    assert sum(rows[n]["status"] == "error" for n in rows if n.startswith("truncated-")) >= 24


def test_a_second_run_over_the_corpus_gives_identical_tables(ingested):
    _, _, (a, b) = ingested
    for sql in ("SELECT * FROM pool ORDER BY image_id", "SELECT * FROM errors ORDER BY image_id"):
        assert query(a, sql).to_pylist() == query(b, sql).to_pylist()
