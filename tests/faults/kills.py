"""SIGKILL a stage at seeded points (once part-way, once more during the resume), then let it finish.
Shared by the fault tests and ``benchmarks/faults.py``."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from catalog.ledger import Ledger
from tests.helpers import kill_when, run_cli


def kill_points(seed: int, units: int) -> list[tuple[int, float]]:
    """Two kill points ``(units done, then seconds more)``: the second lies in the resume of the first.
    The extra seconds put the kill anywhere inside the next unit (reading, writing shards, the marker)."""
    rng = random.Random(seed)
    first = rng.randint(1, max(1, units // 3))
    second = rng.randint(first + 1, max(first + 1, units - 2))
    return [(first, rng.uniform(0.0, 0.5)), (second, rng.uniform(0.0, 0.5))]


def _after(done: Callable[[], int], units: int, delay: float) -> Callable[[], bool]:
    seen: list[float] = []

    def ready() -> bool:
        if not seen and done() >= units:
            seen.append(time.time())
        return bool(seen) and time.time() - seen[0] >= delay

    return ready


def killed_and_resumed(args: list[str], root: str, run: str, seed: int, units: int) -> list[int]:
    """Run ``curate ARGS --catalog ROOT`` killed at ``kill_points(seed, units)``, then to the end.
    Returns how many units were done at each kill."""
    ledger = Ledger(root, run)
    done_at = []
    for at, delay in kill_points(seed, units):
        kill_when([*args, "--catalog", root], _after(lambda: len(ledger.done()), at, delay))
        done_at.append(len(ledger.done()))
    result = run_cli([*args, "--catalog", root])
    if result.returncode != 0:
        raise AssertionError(f"the resume failed: {result.stderr[-3000:]}")
    return done_at
