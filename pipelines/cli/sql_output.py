"""Writing a query result as a table, CSV, JSON lines or Parquet (``curate sql --format``).

DuckDB and pyarrow are imported when a result is written, not when the CLI builds its parser.
"""

from __future__ import annotations

import io
import json
import sys
from typing import TYPE_CHECKING

from catalog.errors import UserError

if TYPE_CHECKING:
    import pyarrow as pa

FORMATS = ("table", "csv", "json", "parquet")


def render(table: pa.Table, fmt: str, out: str | None, max_rows: int = 40) -> None:
    """Write ``table`` in ``fmt`` to ``out`` (a path or URL) or stdout."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from catalog.paths import resolve

    if fmt == "parquet" and not out:
        raise UserError("--format parquet needs --out FILE")
    if fmt == "table":
        text = _as_text_table(table, max_rows)
        data = text.encode()
    elif fmt == "csv":
        sink = io.BytesIO()
        pacsv.write_csv(table, sink)
        data = sink.getvalue()
    elif fmt == "json":
        data = "".join(json.dumps(row, default=str) + "\n" for row in table.to_pylist()).encode()
    else:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue().to_pybytes()
    if out:
        fs, path = resolve(out)
        with fs.open(path, "wb") as f:
            f.write(data)
    else:
        sys.stdout.write(data.decode())


def _as_text_table(table: pa.Table, max_rows: int) -> str:
    """DuckDB's own box rendering, with a row-count footer."""
    import duckdb

    rel = duckdb.from_arrow(table.slice(0, max_rows))
    text = str(rel)
    if table.num_rows > max_rows:
        text += f"({table.num_rows} rows, first {max_rows} shown; use --format csv/json/parquet for all)\n"
    return text
