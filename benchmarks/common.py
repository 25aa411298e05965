"""Shared benchmark plumbing: machine facts, a table printer and the JSON writer."""

from __future__ import annotations

import json
import os
import platform
from typing import Any


def machine() -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                             "python": platform.python_version(), "torch": torch.__version__,
                             "processor": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
    return facts


def report(title: str, rows: list[dict[str, Any]], out: str | None, extra: dict[str, Any] | None = None) -> None:
    """Print ``rows`` as an aligned table and write everything as JSON to ``out``."""
    print(f"\n{title}")
    if rows:
        cols = list(rows[0])
        width = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
        print("  ".join(c.rjust(width[c]) for c in cols))
        for r in rows:
            print("  ".join(_fmt(r.get(c)).rjust(width[c]) for c in cols))
    doc = {"title": title, "machine": machine(), "rows": rows, **(extra or {})}
    if out:
        with open(out, "w") as f:
            json.dump(doc, f, indent=2, default=str)
        print(f"(written to {out})")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)
