"""The Ray Data executor of the stage runner: units as rows, ``load`` in CPU tasks, ``process`` and the
commit in tasks or (stages with ``setup``) an actor pool that holds the per-worker state.

What comes back to the driver is each unit's row counts as plain columns; the ledger markers the
workers wrote stay the record of what is done. An error a user can fix raised in a worker (a full disk,
a store that stays unavailable, a lost lease) reaches the driver as itself, so the CLI prints one line
instead of Ray's wrapped traceback.
"""

from __future__ import annotations

import importlib
import json
import warnings
from collections.abc import Iterator
from typing import Any

from catalog.config import ConfigError
from catalog.errors import UserError
from catalog.ray_runtime import ensure_ray
from catalog.threads import ensure_threads
from pipelines.stage import UNIT_FIELDS, CatalogSink, Resources, Stage, StageContext, Unit, process_and_commit

# No actor restarts: Ray Data hands every actor its constructor arguments as object-store references,
# which Ray says a restarted actor may not get back (ray-project/ray#53727, #57733: an "E" line per
# actor). A lost actor fails the run instead, and the ledger resumes it on the rerun with every
# finished unit kept. Passed as a remote-args keyword, the one way Ray 2.60 takes it.
_ACTOR_OPTIONS = {"max_restarts": 0}


def _loaded(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in UNIT_FIELDS}


def _result_row(unit: Unit, marker: dict[str, Any]) -> dict[str, Any]:
    tables = sorted(marker["rows"])
    return {"name": unit.name, "tables": tables, "rows": [marker["rows"][t] for t in tables], "error": ""}


def _committed(stage: Stage, ctx: StageContext, sink: CatalogSink, unit: Unit, state: Any,
               loaded: dict[str, Any] | None) -> dict[str, Any]:
    """A unit's result row; an error the user can fix comes back as data (its class and message), since
    Ray would wrap it into a many-line traceback on its way to the driver."""
    try:
        return _result_row(unit, process_and_commit(stage, ctx, sink, unit, state, loaded))
    except UserError as e:
        kind = type(e)
        return {"name": unit.name, "tables": [], "rows": [], "error": json.dumps([kind.__module__, kind.__qualname__,
                                                                                str(e)])}


def _rebuilt(error: str) -> UserError:
    """The worker's `UserError`, raised again on the driver (a plain one if its class cannot be made)."""
    module, name, message = json.loads(error)
    kind = getattr(importlib.import_module(module), name, None)
    if isinstance(kind, type) and issubclass(kind, UserError):
        try:
            return kind(message)
        except TypeError:
            pass
    return UserError(message)


class _Load:
    """A Ray task function: a unit row, plus what the stage's load() read for it."""

    def __init__(self, stage: Stage, ctx: StageContext):
        self.stage, self.ctx = stage, ctx

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        ensure_threads()
        return {**row, **(self.stage.load(self.ctx, Unit.from_row(row)) or {})}


class _Task:
    """A Ray task function for stages without per-worker state."""

    def __init__(self, stage: Stage, ctx: StageContext, sink: CatalogSink):
        self.stage, self.ctx, self.sink = stage, ctx, sink

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        ensure_threads()
        return _committed(self.stage, self.ctx, self.sink, Unit.from_row(row), None, _loaded(row))


class _Actor:
    """A Ray actor: setup() once, then process and commit every unit it is given."""

    def __init__(self, stage: Stage, ctx: StageContext, sink: CatalogSink):
        self.stage, self.ctx, self.sink = stage, ctx, sink
        ensure_threads()  # before setup, which may choose its own count (embed on CPU: the whole machine)
        self.state = stage.setup(ctx)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        return _committed(self.stage, self.ctx, self.sink, Unit.from_row(row), self.state, _loaded(row))


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
        with warnings.catch_warnings():  # see _ACTOR_OPTIONS: Ray 2.60 has no named parameter for it yet
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            ds = ds.map(_Actor, fn_constructor_args=(stage, ctx, sink), compute=_actor_pool(resources),
                        **_ACTOR_OPTIONS, num_cpus=resources.num_cpus, num_gpus=resources.num_gpus or None)
    else:
        ds = ds.map(_Task(stage, ctx, sink), num_cpus=resources.num_cpus)
    for row in ds.iter_rows():
        if row["error"]:
            raise _rebuilt(row["error"])
        yield by_name[row["name"]], {"rows": dict(zip(list(row["tables"]), (int(n) for n in row["rows"])))}
