"""The SQL the docs show (``curate sql "…"`` lines of README.md and docs/*.md) and a small catalog it runs on."""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

import pyarrow as pa

from catalog.schemas import ERRORS
from catalog.shards import write_shards
from tests.helpers import REPO

_SQL_LINE = re.compile(r'curate sql "([^"]+)"')


def documented_queries() -> list[str]:
    """Every query a user is shown, from the README and the docs."""
    files = [os.path.join(REPO, "README.md"), *sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))]
    texts = [Path(path).read_text(encoding="utf-8") for path in files]
    found = [q for text in texts for q in _SQL_LINE.findall(text) if "…" not in q]  # "…": a placeholder
    assert found, "no `curate sql \"…\"` example found in README.md or docs/"
    return found


def write_doc_catalog(root: str) -> None:
    """The tables and columns the documented queries use (pool, errors, duplicates, clusters, curated/lvd)."""
    write_shards(root, "pool", "u", pa.table({"image_id": [1, 2, 3], "uri": ["a", "b", "c"],
                                              "status": ["ok", "ok", "error"]}))
    write_shards(root, "errors", "u", pa.table({"image_id": [3, 4], "uri": ["c", "d"], "stage": ["ingest", "filter"],
                                                "reason": ["truncated", "filtered:small"],
                                                "message": [None, "min_side 12 < 200"]}, schema=ERRORS))
    write_shards(root, "duplicates", "u", pa.table({"image_id": [2], "kept_id": [1], "similarity": [1.0],
                                                    "reason": ["exact"]}))
    write_shards(root, "clusters", "u", pa.table({"image_id": [1, 2], **{f"l{i}": [0, i] for i in range(1, 6)}}))
    write_shards(root, "curated/lvd", "u", pa.table({"image_id": [1, 2], "uri": ["a", "b"], "part": ["lvd"] * 2,
                                                     **{f"l{i}": [0, i] for i in range(1, 6)}}))
