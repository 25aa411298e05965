"""Running a stage as independent units of work on Ray Data, resumably.

A stage splits its input into deterministic units. Each unit is processed by one Ray task that
writes the unit's shards and then marks it in the ledger, so a killed run redoes at most the units
that were in flight, and their shards are overwritten rather than duplicated.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray

from catalog.ledger import Ledger
from catalog.progress import progress
from catalog.ray_runtime import ensure_ray


@dataclass(frozen=True)
class Unit:
    """One unit of work: a stable name (used in shard and ledger names) and a JSON payload."""

    name: str
    payload: dict[str, Any]
    size: int  # items in the unit, for the progress bar


def pending_units(units: list[Unit], ledger: Ledger) -> list[Unit]:
    done = ledger.done()
    return [u for u in units if u.name not in done]


def run_units(
    units: list[Unit],
    process: Callable[[str, dict[str, Any]], dict[str, int]],
    *,
    ledger: Ledger,
    desc: str,
    unit_label: str = "img",
    num_cpus: float = 1.0,
    address: str | None = None,
) -> dict[str, int]:
    """Process every unit not yet in the ledger; return the summed counts of this run.

    ``process(name, payload)`` runs inside a Ray task, commits its own output, marks the ledger and
    returns counts (e.g. ``{"items": 512, "ok": 510, "errors": 2}``).
    """
    todo = pending_units(units, ledger)
    already = sum(u.size for u in units) - sum(u.size for u in todo)
    totals: dict[str, int] = {}
    bar = progress(sum(u.size for u in units), desc, unit=unit_label, initial=already)
    if not todo:
        bar.close()
        return totals
    ensure_ray(address)
    rows = [{"name": u.name, "payload": json.dumps(u.payload)} for u in todo]

    def task(row: dict[str, Any]) -> dict[str, Any]:
        counts = process(row["name"], json.loads(row["payload"]))
        return {"counts": json.dumps(counts)}

    ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map(task, num_cpus=num_cpus)
    with bar:
        for out in ds.iter_rows():
            counts = json.loads(out["counts"])
            for key, value in counts.items():
                totals[key] = totals.get(key, 0) + int(value)
            bar.update(int(counts.get("items", 0)))
    return totals
