"""The Ray Data executor of the stage runner: units as rows, ``load`` in CPU tasks, ``process`` and the
commit in tasks or (stages with ``setup``) an actor pool that holds the per-worker state.

What comes back to the driver is each unit's row counts as plain columns; the ledger markers the
workers wrote stay the record of what is done.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from catalog.config import ConfigError
from catalog.ray_runtime import ensure_ray
from pipelines.stage import UNIT_FIELDS, CatalogSink, Resources, Stage, StageContext, Unit, process_and_commit


def _loaded(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in UNIT_FIELDS}


def _result_row(unit: Unit, marker: dict[str, Any]) -> dict[str, Any]:
    tables = sorted(marker["rows"])
    return {"name": unit.name, "tables": tables, "rows": [marker["rows"][t] for t in tables]}


class _Load:
    """A Ray task function: a unit row, plus what the stage's load() read for it."""

    def __init__(self, stage: Stage, ctx: StageContext):
        self.stage, self.ctx = stage, ctx

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        return {**row, **(self.stage.load(self.ctx, Unit.from_row(row)) or {})}


class _Task:
    """A Ray task function for stages without per-worker state."""

    def __init__(self, stage: Stage, ctx: StageContext, sink: CatalogSink):
        self.stage, self.ctx, self.sink = stage, ctx, sink

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        unit = Unit.from_row(row)
        return _result_row(unit, process_and_commit(self.stage, self.ctx, self.sink, unit, None, _loaded(row)))


class _Actor:
    """A Ray actor: setup() once, then process and commit every unit it is given."""

    def __init__(self, stage: Stage, ctx: StageContext, sink: CatalogSink):
        self.stage, self.ctx, self.sink = stage, ctx, sink
        self.state = stage.setup(ctx)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        unit = Unit.from_row(row)
        marker = process_and_commit(self.stage, self.ctx, self.sink, unit, self.state, _loaded(row))
        return _result_row(unit, marker)


def check_fits(resources: Resources) -> None:
    """Refuse a request no node can grant: Ray would otherwise wait for it forever."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    cpus = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    gpus = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
    for what, need, have in (("num_cpus", resources.num_cpus, cpus), ("load_cpus", resources.load_cpus, cpus),
                             ("num_gpus", resources.num_gpus, gpus)):
        if need > have:
            raise ConfigError(f"a worker asks for {what}={need:g} but the largest Ray node has {have:g}: "
                              "lower the stage's cpu/gpu settings (e.g. --set actor_cpus=1)")


def _actor_pool(resources: Resources) -> Any:
    """A fixed pool of ``resources.actors``; with ``units_per_actor > 1`` each actor runs that many calls
    at once in threads (Ray Data otherwise runs one call at a time per actor)."""
    import ray

    threads = resources.units_per_actor
    return ray.data.ActorPoolStrategy(size=resources.actors, max_concurrent_calls_per_actor=threads,
                                      enable_true_multi_threading=threads > 1)


def run_on_ray(stage: Stage, ctx: StageContext, sink: CatalogSink,
               todo: list[Unit]) -> Iterator[tuple[Unit, dict[str, Any]]]:
    import ray

    ensure_ray(ctx.address)
    resources = stage.resources(ctx)
    check_fits(resources)
    by_name = {u.name: u for u in todo}
    ds = ray.data.from_items([u.row() for u in todo], override_num_blocks=len(todo))
    if stage.has_load:
        ds = ds.map(_Load(stage, ctx), num_cpus=resources.load_cpus)
    if stage.has_setup:
        ds = ds.map(_Actor, fn_constructor_args=(stage, ctx, sink), compute=_actor_pool(resources),
                    num_cpus=resources.num_cpus, num_gpus=resources.num_gpus or None)
    else:
        ds = ds.map(_Task(stage, ctx, sink), num_cpus=resources.num_cpus)
    for row in ds.iter_rows():
        yield by_name[row["name"]], {"rows": dict(zip(list(row["tables"]), (int(n) for n in row["rows"])))}
