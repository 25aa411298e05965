"""One Stage contract and one runner: every stage of the catalog is run, resumed and recorded the same way.

A stage (`Stage`) says what it is and what it does, nothing about how it is run:

- ``name``, ``config_class``, the tables it ``reads`` and ``writes``;
- ``plan(ctx)``: its work as deterministic `Unit` s (a stable name, a JSON payload, a size for the
  progress bar, and a fingerprint of the unit's input content);
- ``setup(ctx)``: per-worker state made once (a backbone loaded once per actor); optional ``load``: CPU
  work on a unit's input that Ray runs in separate tasks so that the actors holding models only compute;
- ``process(ctx, unit, state, loaded)``: one unit → its rows (`Output`), free of side effects;
- ``finish(ctx, totals)``: the end (summaries, reports), returning the run's summary.

The runner (`run_stage`) owns what used to be copied into every stage: the run's writer lease
(`catalog.lease`: a second writer of the same run is refused, naming the holder; a stale lease is taken
over), ``--overwrite`` (reset the ledger
and delete the run's rows of every table it writes), the plan and its check against the recorded one
(`catalog.ledger.PlanChange`: changed settings are refused, changed inputs rerun the stage from scratch
with a loud line, so "done" depends on the content of the inputs), the run manifest, progress, Ray
start-up and the ledger. Commits go through one `CatalogSink` (Ray Data's ``Datasink`` splits the same
duties into on_write_start / write / on_write_complete): a unit's shards first, then its ledger marker, so
a kill between the two redoes the unit and overwrites the same shard names.

A stage may list its input as items instead of units (``items``): the runner then cuts them into units
and records each unit's members, so that a rerun on a grown input appends units for the new items and
retires the rows of vanished or changed ones (`pipelines.stage_append`, `catalog.ledger_items`).

Two executors run the units, with the same ``process`` and commit code: Ray Data (tasks, or an actor
pool for stages with ``setup``) and in-process. ``auto`` picks in-process for whole-table stages and
for small work without a cluster address, since a Ray start costs more than the work itself there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from catalog.config import ConfigError, from_dict, to_dict
from catalog.lease import Lease, hold
from catalog.ledger import Ledger, Plan, PlanChange
from catalog.ledger_items import Item, Members, Retiring, generation_of, live, unit_fingerprint
from catalog.lineage import listing_fingerprint, run_prefix, run_shards, table_state
from catalog.manifest import RunManifest, fingerprint
from catalog.paths import Produce, join, write_bytes_atomic, write_stream_atomic
from catalog.progress import progress
from catalog.schemas import stamp
from catalog.shards import delete_shards, shard_sizes, write_shards
from pipelines.executors import EXECUTORS, Executor, choose_executor

log = logging.getLogger("curate.pipelines")


@dataclass(frozen=True)
class Unit:
    """One unit of work: a stable name (used in shard and ledger names), a JSON payload, the number of
    items it holds (for the progress bar) and a fingerprint of its input content."""

    name: str
    payload: dict[str, Any]
    size: int
    fingerprint: str

    def row(self) -> dict[str, Any]:
        return {"name": self.name, "payload": json.dumps(self.payload), "size": self.size,
                "fingerprint": self.fingerprint}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Unit:
        return cls(str(row["name"]), json.loads(row["payload"]), int(row["size"]), str(row["fingerprint"]))


UNIT_FIELDS = ("name", "payload", "size", "fingerprint")


@dataclass
class Output:
    """What one unit produced: rows per table, and whole files (tar shards) committed before the rows."""

    tables: dict[str, pa.Table]
    #: catalog-relative path -> its bytes, or what writes them in pieces (an object too large to copy)
    files: dict[str, bytes | Produce] = field(default_factory=dict)


@dataclass(frozen=True)
class Resources:
    """What one Ray worker of a stage asks for."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    actors: int = 1  # size of the actor pool, for stages with setup()
    load_cpus: float = 0.5  # each load() task
    units_per_actor: int = 1  # units an actor processes at once, in threads (one computing while one loads)


@dataclass(frozen=True)
class StageContext:
    """Everything a worker needs: picklable, built on the driver."""

    root: str
    config: Any
    run: str  # the run's name: the stage's name, qualified for per-part/per-seed stages (sample-lvd)
    address: str | None = None
    facts: Any = None  # what prepare() established on the driver (a backbone's identity, a seed's catalog)


@dataclass(frozen=True)
class Totals:
    """Rows written per table by every finished unit (this run's and earlier ones')."""

    units: dict[str, dict[str, int]]
    items: int  # items planned
    items_run: int  # items processed by this run

    def rows(self, table: str) -> int:
        return sum(rows.get(table, 0) for rows in self.units.values())


@dataclass(frozen=True)
class StageResult:
    run: str
    summary: dict[str, Any]  # what finish() reported (a skipped run returns the recorded one)
    skipped: bool  # already done with these settings and inputs: nothing ran
    units_run: int
    items_run: int
    rows_run: dict[str, int]  # rows written per table by this run


class Stage(ABC):
    """The contract; see the module docstring. Subclasses set the class attributes and implement
    ``plan``, ``process`` and ``finish``."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()
    # keys of the config that change how the work runs but not what it writes (actors, cpus…)
    runtime_keys: ClassVar[frozenset[str]] = frozenset()
    # units are independent and worth fanning out over Ray; whole-table stages run on the driver
    distributable: ClassVar[bool] = False
    # auto executor: in-process when there is no cluster address and the pending items are at most this
    in_process_below: ClassVar[int] = 1000
    # outputs that exist (empty) once the stage ran, so a query over them never fails
    empty_schemas: ClassVar[dict[str, pa.Schema]] = {}

    def run_name(self, config: Any) -> str:
        return self.name

    def tables_read(self, config: Any) -> tuple[str, ...]:
        return self.reads

    def tables_written(self, config: Any) -> tuple[str, ...]:
        return self.writes

    def prepare(self, ctx: StageContext) -> Any:
        """Driver-side checks and facts shipped to every worker (default: none)."""
        return None

    def settings(self, ctx: StageContext) -> dict[str, Any]:
        """What the output depends on, besides the inputs: recorded in the plan, compared on reruns."""
        return {k: v for k, v in to_dict(ctx.config).items() if k not in self.runtime_keys}

    def extra_inputs(self, ctx: StageContext) -> dict[str, str]:
        """Fingerprints of inputs that are not tables of this catalog (a file, a seed's catalog)."""
        return {}

    def plan(self, ctx: StageContext) -> list[Unit]:
        """The stage's work as deterministic units, from its inputs (stages that list ``items`` need none)."""
        raise TypeError(f"stage {self.name} lists neither items() nor plan()")

    # Appending stages (`catalog.ledger_items`): the input as items, cut into units by the runner; a rerun on
    # a grown input runs units of the new items only, and retires the rows of vanished or changed ones.
    retires_in_place: ClassVar[bool] = False  # items are a table's shards (`ItemChange.between`)
    # the stage checks its own state (`clear`) against the content of its inputs, so a rerun on changed
    # inputs keeps it (dedup's copy graph); only --overwrite clears it
    state_checks_inputs: ClassVar[bool] = False

    def unit_prefix(self, ctx: StageContext) -> str:
        return "items"

    def items(self, ctx: StageContext) -> list[Item] | None:
        """The input as items in a deterministic order, or None where the stage plans whole units."""
        return None

    def items_per_unit(self, ctx: StageContext) -> int:
        return 1000

    def cut(self, ctx: StageContext, items: list[Item], generation: int) -> list[list[Item]]:
        """The items of one generation (0: the first run; later: an update's new items) cut into units."""
        n = self.items_per_unit(ctx)
        return [items[k : k + n] for k in range(0, len(items), n)]

    def unit_payload(self, ctx: StageContext, items: list[Item], generation: int) -> dict[str, Any]:
        return {"keys": [item.key for item in items]}

    def unit_size(self, payload: dict[str, Any], items: list[Item]) -> int:
        """How many things a unit works on (its progress and the executor's choice): its items by default."""
        return len(items)

    def restart_reason(self, ctx: StageContext, new: list[Item], generation: int) -> str | None:
        """Why a rerun with these new items (on a run ``generation`` updates old) should redo the run from
        scratch instead of appending (None: append)."""
        return None

    def retire(self, ctx: StageContext, tables: dict[str, pa.Table], retiring: Retiring,
               members: Members) -> dict[str, pa.Table]:
        """A finished unit's rows without those of the retiring items (default: rows keyed by ``image_id``;
        tables without that column are kept as they are); ``members``: the unit's members that stay."""
        ids = pa.array([int(k) for k in retiring.keys], pa.int64())
        return {t: rows.filter(pc.invert(pc.is_in(rows.column("image_id"), ids)))
                if "image_id" in rows.column_names else rows for t, rows in tables.items()}

    def resources(self, ctx: StageContext) -> Resources:
        return Resources()

    def setup(self, ctx: StageContext) -> Any:
        return None

    def load(self, ctx: StageContext, unit: Unit) -> dict[str, Any] | None:
        return None

    @abstractmethod
    def process(self, ctx: StageContext, unit: Unit, state: Any, loaded: dict[str, Any] | None) -> Output:
        """One unit's rows per table (``state`` from setup(), ``loaded`` from load()); no side effects."""

    def clear(self, ctx: StageContext) -> None:
        """Forget state kept outside the tables (checkpoints) when the run starts again from scratch."""

    def prepare_restart(self, ctx: StageContext, warm: bool) -> None:
        """Before the run starts over, while its outputs still exist: keep what the next run starts from
        (``warm``: the stage's own `restart_reason` on a grown run), else forget it. Default: nothing kept."""

    @abstractmethod
    def finish(self, ctx: StageContext, totals: Totals) -> dict[str, Any]:
        """The run's summary, with at least ``in``, ``out`` and ``errored`` row counts (and reports)."""

    @property
    def has_setup(self) -> bool:
        return type(self).setup is not Stage.setup

    @property
    def has_load(self) -> bool:
        return type(self).load is not Stage.load


@dataclass(frozen=True)
class CatalogSink:
    """Commits one run's units: files, then shards named ``<run>=<unit>-<i>``, then the ledger marker;
    each only while the run's lease is still this run's."""

    root: str
    run: str
    outputs: tuple[str, ...]
    lease: Lease | None = None

    def write(self, unit: Unit, output: Output, cpu_seconds: float) -> dict[str, Any]:
        """Commit one unit and return its marker (also written to the ledger, last)."""
        if self.lease is not None:
            self.lease.check()
        files = []
        for path, data in sorted(output.files.items()):
            if isinstance(data, bytes):
                write_bytes_atomic(join(self.root, path), data)
                files.append([path, len(data), hashlib.sha256(data).hexdigest()])
            else:
                files.append([path, *write_stream_atomic(join(self.root, path), data)])
        for table in output.tables:
            if table not in self.outputs:
                raise RuntimeError(f"{self.run} wrote {table!r}, which is not among its outputs {self.outputs}")
        shards: dict[str, list[list[Any]]] = {}
        rows = {table: data.num_rows for table, data in output.tables.items()}
        prefix = f"{run_prefix(self.run)}{unit.name}"
        try:
            for table, data in sorted(output.tables.items()):
                if data.num_rows:
                    data = data.replace_schema_metadata(stamp(data.schema, table).metadata)  # which table it is
                    written = write_shards(self.root, table, prefix, data)
                    shards[table] = [[s.name, s.size, s.sha256] for s in written]
            marker = {"fingerprint": unit.fingerprint, "rows": rows, "shards": shards, "files": files,
                      "cpu_seconds": round(cpu_seconds, 3), "worker": f"{os.uname().nodename}:{os.getpid()}"}
            Ledger(self.root, self.run).mark(unit.name, marker)
        except BaseException:
            # a shard without its marker would read as rows of a unit that never finished (a full disk
            # can refuse the marker after the shard): take them back, best effort, and fail the unit
            for table in output.tables:
                with contextlib.suppress(Exception):
                    delete_shards(self.root, table, f"{prefix}-")
            raise
        return marker

    def clear(self) -> None:
        """Delete this run's rows of every table it writes (no stale row survives a fresh start)."""
        for table in self.outputs:
            delete_shards(self.root, table, run_prefix(self.run))

    def write_empty(self, schemas: dict[str, pa.Schema], markers: dict[str, dict]) -> list[list[Any]]:
        """An empty shard for each output that no unit wrote rows to, so the table exists (and none where
        units of an appended run now write rows)."""
        written = {t for m in markers.values() for t in m.get("shards", {})}
        out = []
        for table, schema in sorted(schemas.items()):
            if table in written:
                delete_shards(self.root, table, f"{run_prefix(self.run)}empty-")
            elif table in self.outputs:
                shard = write_shards(self.root, table, f"{run_prefix(self.run)}empty", schema.empty_table())[0]
                out.append([table, shard.name, shard.size, shard.sha256])
        return out

    def fingerprints(self, markers: dict[str, dict], empties: list[list[Any]]) -> dict[str, dict[str, str]]:
        """Per output table: the content fingerprint (shard sha256s) and the listing fingerprint."""
        per_table: dict[str, list[list[Any]]] = {t: [] for t in self.outputs}
        for marker in markers.values():
            for table, shards in marker.get("shards", {}).items():
                per_table.setdefault(table, []).extend(shards)
        for table, name, size, sha in empties:
            per_table[table].append([name, size, sha])
        return {t: {"content": fingerprint(sorted([n, sha] for n, _, sha in shards)),
                    "listing": listing_fingerprint({n: size for n, size, _ in shards})}
                for t, shards in per_table.items()}

    def intact(self, recorded: dict[str, dict[str, str]]) -> list[str]:
        """Outputs whose shards are no longer those the finished run recorded (deleted, replaced)."""
        return [t for t in self.outputs if t in recorded and
                listing_fingerprint(run_shards(shard_sizes(self.root, t), self.run)) != recorded[t]["listing"]]


def get_stage(name: str | Stage) -> Stage:
    from pipelines.stages import get_stage as lookup

    return name if isinstance(name, Stage) else lookup(name)


def _as_config(stage: Stage, config: Any) -> Any:
    if config is None:
        return stage.config_class()
    if isinstance(config, Mapping):
        return from_dict(stage.config_class, config)
    if not isinstance(config, stage.config_class):
        raise ConfigError(f"{stage.name} takes a {stage.config_class.__name__}, not a {type(config).__name__}")
    return config


def _inputs(stage: Stage, ctx: StageContext) -> dict[str, str]:
    inputs = {}
    for table in stage.tables_read(ctx.config):
        state = table_state(ctx.root, table)
        for writer in state.unfinished_writers:
            log.warning("%s: its input %s is still being written by %s, which has not finished: the result "
                        "will cover only what is there now (finish %s first)", ctx.run, table, writer, writer)
        inputs[table] = state.fingerprint
    return {**inputs, **stage.extra_inputs(ctx)}


def _reconcile(ctx: StageContext, ledger: Ledger, sink: CatalogSink, plan: Plan, keeps_state: bool = False) -> str:
    """Compare with the recorded plan: ``fresh``, ``resume``, ``done``, or ``restart`` when inputs (or the
    finished run's outputs) changed; raise LedgerPlanError when settings or units differ."""
    old = ledger.plan()
    if old is None:
        return "fresh"
    change = PlanChange.between(old, plan)
    if change.settings:
        ledger.refuse(f"other settings ({change.describe_settings(old, plan)})")
    if change.inputs:
        how = "with the state it kept, checked against the new input" if keeps_state else "from scratch"
        log.warning("%s: input %s changed since it last ran: rerunning %s %s", ctx.run,
                    ", ".join(change.inputs), ctx.run, how)
        return "restart"
    if change.units_kind != "same":
        ledger.refuse(change.describe_units())
    record = ledger.completion()
    if record is None:
        return "resume"
    altered = sink.intact(record.get("outputs", {}))
    if altered:
        log.warning("%s: its output %s changed or vanished since it finished: rerunning %s from scratch",
                    ctx.run, ", ".join(altered), ctx.run)
        return "restart"
    return "done"


def start_over(stage: Stage, ctx: StageContext, ledger: Ledger, sink: CatalogSink, forget_state: bool,
               warm: bool = False) -> None:
    """Forget the run: its ledger, its rows of every table it writes now or wrote under its recorded plan
    (a mix with other parts), and (``forget_state``) its other state, but what a ``warm`` restart starts from.

    The ledger goes last: a run killed on the way still holds its plan, so the next one starts over again
    rather than taking leftover state for its own."""
    if forget_state:
        stage.prepare_restart(ctx, warm)
    recorded = ledger.plan()
    written = set(sink.outputs) | set(recorded.outputs if recorded else ())
    replace(sink, outputs=tuple(sorted(written))).clear()
    if forget_state:
        stage.clear(ctx)
    ledger.reset()


def run_stage(stage: str | Stage, root: str, config: Any = None, *, overwrite: bool = False,
              executor: Executor = "auto", address: str | None = None) -> StageResult:
    """Run (or resume, or skip) one stage on the catalog at ``root``."""
    if executor not in EXECUTORS:
        raise ConfigError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    stage = get_stage(stage)
    config = _as_config(stage, config)
    ctx = StageContext(root, config, stage.run_name(config), address)
    with hold(root, ctx.run) as lease:
        return _run_held(stage, ctx, CatalogSink(root, ctx.run, stage.tables_written(config), lease), overwrite,
                         executor)


def _run_held(stage: Stage, ctx: StageContext, sink: CatalogSink, overwrite: bool, executor: Executor) -> StageResult:
    """`run_stage` once the run's lease is held."""
    ledger = Ledger(ctx.root, ctx.run)
    if overwrite:
        start_over(stage, ctx, ledger, sink, forget_state=True)
    ctx = replace(ctx, facts=stage.prepare(ctx))
    inputs = _inputs(stage, ctx)
    items = stage.items(ctx)
    recorded = ledger.plan()
    if items is not None and recorded is not None and recorded.members is not None:
        from pipelines.stage_append import update

        return update(stage, ctx, ledger, sink, inputs, items, executor)
    units, members = (stage.plan(ctx), None) if items is None else item_units(stage, ctx, items, 0)
    plan = Plan(stage.settings(ctx), inputs, {u.name: u.fingerprint for u in units}, list(sink.outputs), members)
    decision = _reconcile(ctx, ledger, sink, plan, stage.state_checks_inputs)
    if decision == "done":
        return StageResult(ctx.run, ledger.completion().get("summary", {}), True, 0, 0, {})
    if decision in ("fresh", "restart"):
        start_over(stage, ctx, ledger, sink, forget_state=decision == "restart" and not stage.state_checks_inputs)
        ledger.write_plan(plan)
    return run_units(stage, ctx, ledger, sink, units, plan, executor)


def item_units(stage: Stage, ctx: StageContext, items: list[Item],
               generation: int) -> tuple[list[Unit], dict[str, Members]]:
    """Items cut into units (`Stage.cut`), named ``<prefix>-<k>`` (generation 0, the first run) or
    ``g<generation>-<prefix>-<k>`` (units an update appends), with their members."""
    units, members = [], {}
    for k, chunk in enumerate(stage.cut(ctx, items, generation)):
        name = f"{stage.unit_prefix(ctx)}-{k:06d}"
        name = f"g{generation:03d}-{name}" if generation else name
        members[name] = [[item.key, item.fingerprint] for item in chunk]
        payload = stage.unit_payload(ctx, chunk, generation)
        units.append(Unit(name, payload, stage.unit_size(payload, chunk), unit_fingerprint(members[name])))
    return units, members


def recorded_units(stage: Stage, ctx: StageContext, members: dict[str, Members], items: list[Item]) -> list[Unit]:
    """The recorded units, rebuilt from the current items (every live member is one of them); a unit whose
    members all vanished is finished and needs no payload."""
    current = {item.key: item for item in items}
    units = []
    for name, pairs in members.items():
        chunk = [current[k] for k in live(pairs)]
        payload = stage.unit_payload(ctx, chunk, generation_of(name)) if chunk else {}
        units.append(Unit(name, payload, stage.unit_size(payload, chunk) if chunk else 0, unit_fingerprint(pairs)))
    return units


def run_units(stage: Stage, ctx: StageContext, ledger: Ledger, sink: CatalogSink, units: list[Unit], plan: Plan,
              executor: Executor, notes: dict[str, Any] | None = None) -> StageResult:
    done = ledger.done()
    todo = [u for u in units if done.get(u.name, {}).get("fingerprint") != u.fingerprint]
    chosen = choose_executor(stage, ctx, todo, executor)
    with RunManifest(ctx.root, ctx.run, to_dict(ctx.config)) as manifest:
        manifest.inputs = dict(plan.inputs)
        total = sum(u.size for u in units)
        rows_run: dict[str, int] = {}
        # a one-unit stage shows its own progress (cluster's steps), not a bar of one
        bar = progress(total, ctx.run, initial=total - sum(u.size for u in todo), enabled=len(units) > 1)
        with bar:
            for unit, marker in _execute(chosen, stage, ctx, sink, todo):
                for table, n in marker["rows"].items():
                    rows_run[table] = rows_run.get(table, 0) + n
                bar.update(unit.size)
        markers = {name: m for name, m in ledger.done().items() if name in plan.units}
        empties = sink.write_empty(stage.empty_schemas, markers)
        totals = Totals({n: m["rows"] for n, m in markers.items()}, total, sum(u.size for u in todo))
        summary = stage.finish(ctx, totals)
        missing = {"in", "out", "errored"} - set(summary)
        if missing:
            raise RuntimeError(f"{stage.name}.finish() must report {sorted(missing)}")
        outputs = sink.fingerprints(markers, empties)
        manifest.rows = {k: summary[k] for k in ("in", "out", "errored")}
        manifest.notes = {k: v for k, v in summary.items() if k not in manifest.rows}
        manifest.outputs = {t: o["content"] for t, o in outputs.items()}
        manifest.worker_cpu_seconds = round(sum(m.get("cpu_seconds", 0.0) for m in markers.values()), 3)
        manifest.notes["executor"] = chosen
        manifest.notes.update(notes or {})
    ledger.mark_complete({"summary": summary, "outputs": outputs, "plan": fingerprint(dataclasses.asdict(plan))})
    return StageResult(ctx.run, summary, False, len(todo), totals.items_run, rows_run)


def _execute(chosen: str, stage: Stage, ctx: StageContext, sink: CatalogSink,
             todo: list[Unit]) -> Iterator[tuple[Unit, dict[str, Any]]]:
    if chosen == "local":
        yield from _run_in_process(stage, ctx, sink, todo)
    else:
        from pipelines.ray_executor import run_on_ray

        yield from run_on_ray(stage, ctx, sink, todo)


def _run_in_process(stage: Stage, ctx: StageContext, sink: CatalogSink,
                    todo: list[Unit]) -> Iterator[tuple[Unit, dict[str, Any]]]:
    state = stage.setup(ctx)
    for unit in todo:
        yield unit, process_and_commit(stage, ctx, sink, unit, state, stage.load(ctx, unit))


def process_and_commit(stage: Stage, ctx: StageContext, sink: CatalogSink, unit: Unit, state: Any,
                       loaded: dict[str, Any] | None) -> dict[str, Any]:
    """The one path from a unit to committed rows, shared by both executors."""
    cpu = time.process_time()
    output = stage.process(ctx, unit, state, loaded)
    return sink.write(unit, output, time.process_time() - cpu)
