"""The runner's update of an appending run (`catalog.ledger_items`): a stage that lists its input as items
and ran before is not redone when its input grew or shrank; only what changed is worked on.

Order, so that a kill anywhere resumes to the same tables: the finished mark goes first (a half-updated
run is never "done"); then the finished units that hold vanished or changed items rewrite their own
shards without them (a rewrite is idempotent, so redoing it after a kill changes nothing) and their
markers; then the new plan (the recorded units with their new members, and the new units of the next
generation); then the new units run like any others. Until the new plan is written, a rerun works the
same change out again from the old one.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import pyarrow as pa

from catalog.ledger import Ledger, Plan, PlanChange
from catalog.ledger_items import Item, ItemChange, Members, Retiring, live, unit_fingerprint
from catalog.lineage import run_prefix
from catalog.paths import join
from catalog.shards import delete_shards, read_shard, shard_sizes, table_dir
from pipelines.executors import Executor
from pipelines.stage import (
    CatalogSink,
    Output,
    Stage,
    StageContext,
    StageResult,
    Unit,
    item_units,
    recorded_units,
    run_units,
    start_over,
)

log = logging.getLogger("curate.pipelines")


def update(stage: Stage, ctx: StageContext, ledger: Ledger, sink: CatalogSink, inputs: dict[str, str],
           items: list[Item], executor: Executor) -> StageResult:
    """Rerun an appending stage whose recorded plan lists its members: skip, resume, or append."""
    old = ledger.plan()
    settings = stage.settings(ctx)
    now = Plan(settings, old.inputs, old.units)
    settings_change = PlanChange.between(old, now)
    if settings_change.settings:
        ledger.refuse(f"other settings ({settings_change.describe_settings(old, now)})")
    change = ItemChange.between(old.members, items, set(ledger.done()), stage.retires_in_place)
    changed = _changed_inputs(stage, ctx, old, inputs)
    restart = changed or stage.restart_reason(ctx, change.new, old.generation)
    if restart:
        log.warning("%s: %s: rerunning %s from scratch", ctx.run, restart, ctx.run)
        return _from_scratch(stage, ctx, ledger, sink, inputs, items, executor, warm=not changed)
    if change.empty:
        record = ledger.completion()
        altered = sink.intact(record.get("outputs", {})) if record is not None else []
        if record is not None and not altered and old.inputs == inputs:
            return StageResult(ctx.run, record.get("summary", {}), True, 0, 0, {})
        if altered:
            log.warning("%s: its output %s changed or vanished since it finished: rerunning %s from scratch",
                        ctx.run, ", ".join(altered), ctx.run)
            return _from_scratch(stage, ctx, ledger, sink, inputs, items, executor)
        plan = replace(old, inputs=inputs, settings=settings)
        ledger.reopen()
        ledger.write_plan(plan)
        return run_units(stage, ctx, ledger, sink, recorded_units(stage, ctx, old.members, items), plan, executor)
    return _append(stage, ctx, ledger, sink, inputs, items, change, executor)


def _changed_inputs(stage: Stage, ctx: StageContext, old: Plan, inputs: dict[str, str]) -> str | None:
    """A grown or shrunk table appends; any other input that changed (a file, another run's rows, the
    model behind a table) redoes the run cold. The stage's own reason (a clustering that drifted) redoes it
    warm: from what the run had (`Stage.prepare_restart`)."""
    tables = set(stage.tables_read(ctx.config))
    changed = sorted(k for k in set(old.inputs) | set(inputs) if old.inputs.get(k) != inputs.get(k))
    return f"input {', '.join(changed)} changed since it last ran" if set(changed) - tables else None


def _from_scratch(stage: Stage, ctx: StageContext, ledger: Ledger, sink: CatalogSink, inputs: dict[str, str],
                  items: list[Item], executor: Executor, warm: bool = False) -> StageResult:
    start_over(stage, ctx, ledger, sink, forget_state=True, warm=warm)
    units, members = item_units(stage, ctx, items, 0)
    plan = Plan(stage.settings(ctx), inputs, {u.name: u.fingerprint for u in units}, list(sink.outputs), members)
    ledger.write_plan(plan)
    return run_units(stage, ctx, ledger, sink, units, plan, executor)


def _append(stage: Stage, ctx: StageContext, ledger: Ledger, sink: CatalogSink, inputs: dict[str, str],
            items: list[Item], change: ItemChange, executor: Executor) -> StageResult:
    old = ledger.plan()
    log_level = logging.WARNING if change.vanished or change.changed else logging.INFO
    log.log(log_level, "%s: its input changed since it last ran: %s; appending %s", ctx.run, change.describe(),
            ctx.run)
    ledger.reopen()
    for unit in change.dissolved:  # an unfinished unit may have committed shards before its kill
        for table in sink.outputs:
            delete_shards(ctx.root, table, f"{run_prefix(ctx.run)}{unit}-")
    done = ledger.done()
    for unit, retiring in change.retiring.items():
        retire_unit(stage, ctx, sink, unit, change.kept[unit], retiring, done[unit].get("cpu_seconds", 0.0))
    generation = old.generation + 1 if change.new else old.generation
    new_units, new_members = item_units(stage, ctx, change.new, generation)
    members = {**change.kept, **new_members}
    units = recorded_units(stage, ctx, change.kept, items) + new_units
    plan = Plan(stage.settings(ctx), inputs, {u.name: u.fingerprint for u in units}, list(sink.outputs), members,
                generation)
    ledger.write_plan(plan)
    notes: dict[str, Any] = {"update": {"generation": generation, "new_items": len(change.new),
                                        "vanished_items": change.vanished, "changed_items": change.changed,
                                        "units_appended": len(new_units), "units_retired": len(change.retiring)}}
    return run_units(stage, ctx, ledger, sink, units, plan, executor, notes)


def retire_unit(stage: Stage, ctx: StageContext, sink: CatalogSink, unit: str, members: Members,
                retiring: Retiring, cpu_seconds: float) -> None:
    """Rewrite one finished unit's shards without its retiring items, then its marker; shards it no longer
    needs (a table left without rows) go last, so a kill at any point leaves a state this redoes."""
    prefix = f"{run_prefix(ctx.run)}{unit}-"
    before: dict[str, list[str]] = {}
    tables: dict[str, pa.Table] = {}
    for table in sink.outputs:
        before[table] = sorted(n for n in shard_sizes(ctx.root, table) if n.startswith(prefix))
        if before[table]:
            tables[table] = pa.concat_tables([read_shard(join(table_dir(ctx.root, table), n), table=table)
                                              for n in before[table]])
    rows = stage.retire(ctx, tables, retiring, members)
    marker = sink.write(Unit(unit, {}, len(live(members)), unit_fingerprint(members)), Output(rows), cpu_seconds)
    for table, names in before.items():
        kept = {shard[0] for shard in marker["shards"].get(table, [])}
        for name in names:
            if name not in kept:
                delete_shards(ctx.root, table, name)
