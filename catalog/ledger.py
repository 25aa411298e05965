"""The stage ledger: which units of a stage run are finished, and the plan they belong to.

One small marker object per finished unit (``_ledger/<run>/<unit>.json``) rather than one shared
file, so concurrent workers never contend and object stores need no append or rename. The plan
(``_plan.json``) records what the run's output depends on: its settings, the fingerprints of its inputs
and one fingerprint per unit. A rerun compares its own plan with the recorded one (`PlanChange`): the
same plan resumes; changed inputs restart the run; changed settings, or units that differ for the same
inputs, are refused, since resuming would mix two kinds of rows.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import asdict, dataclass, field
from typing import Any

from catalog.errors import UserError, short_repr
from catalog.paths import exists, join, ls, read_bytes, resolve, retry, write_bytes_atomic

PLAN_FILE = "_plan.json"
COMPLETE_FILE = "_complete.json"


class LedgerPlanError(UserError):
    """A rerun would resume a run that was started with other settings or other units."""


@dataclass(frozen=True)
class Plan:
    """What a stage run's output depends on: settings, input fingerprints, and its units' fingerprints."""

    settings: dict[str, Any]
    inputs: dict[str, str]
    units: dict[str, str]  # unit name -> fingerprint of that unit's input content
    outputs: list[str] = field(default_factory=list)  # tables the run writes (for readers' warnings)
    # appending stages (`catalog.ledger_items`): each unit's [key, item fingerprint] members, and how many
    # updates appended units (names of later generations start with g<generation>-)
    members: dict[str, list[list[str]]] | None = None
    generation: int = 0


@dataclass(frozen=True)
class PlanChange:
    """How a new plan differs from the recorded one."""

    settings: list[str]  # keys whose values differ
    inputs: list[str]  # inputs whose fingerprints differ
    added: list[str]  # units only in the new plan
    removed: list[str]  # units only in the recorded plan
    changed: list[str]  # units in both whose input content differs

    @classmethod
    def between(cls, old: Plan, new: Plan) -> PlanChange:
        keys = sorted(set(old.settings) | set(new.settings))
        names = sorted(set(old.inputs) | set(new.inputs))
        return cls(
            settings=[k for k in keys if old.settings.get(k) != new.settings.get(k)],
            inputs=[n for n in names if old.inputs.get(n) != new.inputs.get(n)],
            added=sorted(set(new.units) - set(old.units)),
            removed=sorted(set(old.units) - set(new.units)),
            changed=sorted(u for u in set(old.units) & set(new.units) if old.units[u] != new.units[u]),
        )

    @property
    def units_kind(self) -> str:
        """``same``; ``grown`` (every recorded unit unchanged, new ones added: an appending source);
        or ``different``."""
        if self.removed or self.changed:
            return "different"
        return "grown" if self.added else "same"

    def describe_settings(self, old: Plan, new: Plan) -> str:
        return "; ".join(f"{k}: {short_repr(old.settings.get(k))} -> {short_repr(new.settings.get(k))}"
                         for k in self.settings)

    def describe_units(self) -> str:
        if self.units_kind == "grown":
            return f"the input grew by {len(self.added)} unit(s) ({', '.join(self.added[:3])}…)"
        parts = [f"{len(v)} unit(s) {k}" for k, v in
                 (("changed", self.changed), ("vanished", self.removed), ("new", self.added)) if v]
        return "the input differs: " + ", ".join(parts)


class Ledger:
    def __init__(self, root: str, stage: str):
        self.root = root
        self.stage = stage
        self.dir = join(root, "_ledger", stage)

    def _unit_url(self, unit: str) -> str:
        return join(self.dir, f"{unit}.json")

    def done(self) -> dict[str, dict]:
        """Finished units and what each recorded (row counts, fingerprints), listed fresh: the markers
        are written by other processes."""
        out = {}
        for url in ls(self.dir):
            name = posixpath.basename(url)
            if name.endswith(".json") and not name.startswith("_"):
                out[name[: -len(".json")]] = json.loads(read_bytes(url))
        return out

    def mark(self, unit: str, info: dict | None = None) -> None:
        write_bytes_atomic(self._unit_url(unit), json.dumps(info or {}).encode())

    def plan(self) -> Plan | None:
        url = join(self.dir, PLAN_FILE)
        return Plan(**json.loads(read_bytes(url))) if exists(url) else None

    def write_plan(self, plan: Plan) -> None:
        write_bytes_atomic(join(self.dir, PLAN_FILE), json.dumps(asdict(plan), sort_keys=True).encode())

    def refuse(self, reason: str) -> None:
        raise LedgerPlanError(f"stage {self.stage!r} in {self.root} was started with {reason}; rerun with "
                              "--overwrite to start it again from scratch")

    def is_complete(self) -> bool:
        return exists(join(self.dir, COMPLETE_FILE))

    def completion(self) -> dict | None:
        """What the finished run recorded (summary, output fingerprints), or None if it is not finished."""
        url = join(self.dir, COMPLETE_FILE)
        return json.loads(read_bytes(url)) if exists(url) else None

    def mark_complete(self, info: dict | None = None) -> None:
        write_bytes_atomic(join(self.dir, COMPLETE_FILE), json.dumps(info or {}, default=str).encode())

    def reopen(self) -> None:
        """Forget that the run finished: an update appends units to it (written before anything changes)."""
        fs, path = resolve(join(self.dir, COMPLETE_FILE), fresh=True)
        if retry(lambda: fs.exists(path)):
            retry(lambda: fs.rm(path))

    def reset(self) -> None:
        """Forget the run: its finish and unit markers before its plan, so a kill on the way never leaves
        markers that a new plan would take for finished units."""
        self.reopen()
        for unit in self.done():
            fs, path = resolve(self._unit_url(unit), fresh=True)
            retry(lambda fs=fs, path=path: fs.rm(path))
        fs, path = resolve(self.dir, fresh=True)
        if retry(lambda: fs.exists(path)):
            retry(lambda: fs.rm(path, recursive=True))
            fs.invalidate_cache(path)


def runs(root: str) -> list[str]:
    """Names of every stage run with a ledger in this catalog."""
    return sorted(posixpath.basename(u.rstrip("/")) for u in ls(join(root, "_ledger")))
