"""Appending runs: a stage planned item by item, so that a grown input adds units instead of redoing all.

A stage that lists its input as items (ingest: the files or tar shards of a source; embed and cluster: the
shards of the catalog tables they read, `shard_items`, so that the plan grows with shards, not rows) has its
plan record each unit's members (``Plan.members``: unit -> ``[key, item fingerprint]``). A rerun compares
the current items with the recorded members (`ItemChange`):

- items not recorded (or recorded with another fingerprint: a file rewritten under the same URI) are
  new, and go to new units of the next generation; the finished units are never redone;
- a recorded item that vanished stays a member with the fingerprint ``removed``, and its unit's rows
  are retired (the stage decides how: ingest marks its pool row ``status = 'removed'``);
- a recorded item that changed leaves its old unit (whose rows of it are dropped) for a new one; a
  rewritten shard (``in_place``) stays in its unit, whose rows keep what is still valid, and is also new;
- an unfinished unit (a killed run) with any such change is dissolved: its items are planned anew.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from catalog.manifest import fingerprint
from catalog.paths import join, resolve, retry
from catalog.shards import read_shard, shard_sizes, table_dir

REMOVED = "removed"  # the recorded fingerprint of an item whose source vanished
Members = list[list[str]]  # [[key, item fingerprint], ...] of one unit


@dataclass(frozen=True)
class Item:
    """One item of a stage's input: a stable key, a fingerprint of its content, and what its unit's
    payload needs (a URI)."""

    key: str
    fingerprint: str
    data: Any = None


@dataclass(frozen=True)
class Retiring:
    """The items a finished unit must retire from its rows: vanished ones and changed (or reappeared) ones."""

    vanished: frozenset[str]
    changed: frozenset[str]

    @property
    def keys(self) -> frozenset[str]:
        return self.vanished | self.changed


def shard_items(root: str, table: str) -> list[Item]:
    """A catalog table's shards as items (key ``<table>/<shard>``, fingerprint its size and change stamp): a
    stage that reads a table lists it by shard, so its plan grows with the shards, not the rows, and works
    out which rows are new from the table itself."""
    fs, path = resolve(table_dir(root, table), fresh=True)
    try:
        infos = retry(lambda: fs.ls(path, detail=True))
    except FileNotFoundError:
        return []
    shards = [(posixpath.basename(i["name"]), i) for i in infos if i["name"].endswith(".parquet")]
    return [Item(f"{table}/{name}", f"{info['size']}:{info.get('mtime', info.get('ETag', ''))}")
            for name, info in sorted(shards, key=lambda pair: pair[0])]


def shard_key(key: str) -> tuple[str, str]:
    """``(table, shard file name)`` of a `shard_items` key."""
    table, name = key.split("/", 1)
    return table, name


def written_ids(root: str, table: str, run: str, generations: Callable[[int], bool]) -> np.ndarray:
    """The ``image_id`` values this run's units of the chosen generations wrote to ``table`` (a shard's name
    tells its unit): what an update unit leaves out, as earlier generations hold it (its own rows do not
    count, so a unit redone after a kill gets the same answer)."""
    prefix = f"{run}="
    names = [n for n in shard_sizes(root, table)
             if n.startswith(prefix) and generations(generation_of(n[len(prefix):]))]
    parts = [read_shard(join(table_dir(root, table), n), ["image_id"]).column("image_id").to_numpy()
             for n in sorted(names)]
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


def unit_fingerprint(members: Members) -> str:
    return fingerprint(members)


def generation_of(unit: str) -> int:
    """The update that appended a unit: ``g<generation>-…`` names, 0 for the first run's units."""
    head = unit.split("-", 1)[0]
    return int(head[1:]) if head[:1] == "g" and head[1:].isdigit() else 0


def live(members: Members) -> list[str]:
    """The keys of a unit's members that still exist."""
    return [key for key, fp in members if fp != REMOVED]


@dataclass(frozen=True)
class ItemChange:
    """How the current items differ from a run's recorded members."""

    kept: dict[str, Members]  # recorded units that stay, with their members after retiring
    retiring: dict[str, Retiring]  # finished units whose rows retire some items
    dissolved: list[str]  # unfinished units with a change: their items are planned again
    new: list[Item]  # items for new units, in the order the stage listed them

    @classmethod
    def between(cls, members: dict[str, Members], items: list[Item], finished: set[str],
                in_place: bool = False) -> ItemChange:
        """``in_place``: the items are shards of a catalog table (`shard_items`), and a rewritten one stays a
        member of its finished unit (whose rows keep what is still valid there) with its new fingerprint,
        as well as going to a new unit for whatever in it is not done yet."""
        current = {item.key: item for item in items}
        rewritten: set[str] = set()
        kept: dict[str, Members] = {}
        retiring: dict[str, Retiring] = {}
        dissolved: list[str] = []
        for unit, pairs in sorted(members.items()):
            vanished = frozenset(k for k, fp in pairs if fp != REMOVED and k not in current)
            changed = frozenset(k for k, fp in pairs if k in current and current[k].fingerprint != fp)
            if not vanished and not changed:
                kept[unit] = pairs
            elif unit not in finished:
                dissolved.append(unit)
            else:
                retiring[unit] = Retiring(vanished, changed)
                if in_place:
                    rewritten |= changed
                    kept[unit] = [[k, REMOVED if k in vanished else current[k].fingerprint if k in changed else fp]
                                  for k, fp in pairs]
                else:
                    kept[unit] = [[k, REMOVED if k in vanished else fp] for k, fp in pairs if k not in changed]
        recorded = {k: fp for pairs in kept.values() for k, fp in pairs if fp != REMOVED}
        new = [item for item in items if recorded.get(item.key) != item.fingerprint or item.key in rewritten]
        return cls(kept, retiring, dissolved, new)

    @property
    def vanished(self) -> int:
        return sum(len(r.vanished) for r in self.retiring.values())

    @property
    def changed(self) -> int:
        return sum(len(r.changed) for r in self.retiring.values())

    @property
    def empty(self) -> bool:
        return not (self.retiring or self.dissolved or self.new)

    def describe(self) -> str:
        return (f"{len(self.new)} new item(s) ({self.changed} of them changed under the same key), "
                f"{self.vanished} vanished")
