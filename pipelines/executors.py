"""Which executor runs a stage's units: names and the ``auto`` rule (kept light: the CLI imports it).

``auto`` runs in this process when the stage's units are whole-table steps, or when there is no cluster
address and the pending work is small (below the stage's ``in_process_below`` items): there a Ray
start-up costs more than the work. Otherwise Ray Data. Both give identical tables.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from pipelines.stage import Stage, StageContext, Unit

Executor = Literal["auto", "ray", "local"]
EXECUTORS: tuple[str, ...] = ("auto", "ray", "local")


def cluster_address(address: str | None) -> str | None:
    return address or os.environ.get("CURATE_RAY_ADDRESS") or os.environ.get("RAY_ADDRESS")


def choose_executor(stage: Stage, ctx: StageContext, todo: list[Unit], executor: Executor) -> str:
    """``local`` for whole-table stages and (``auto``) for small work without a cluster, else ``ray``."""
    if not stage.distributable or not todo:
        return "local"
    if executor != "auto":
        return executor
    small = sum(u.size for u in todo) <= stage.in_process_below
    return "local" if small and not cluster_address(ctx.address) else "ray"
