"""What a table holds, as a fingerprint: the basis for "done" depending on input content.

Every stage run names its shards ``<run>=<unit>-<i>.parquet`` and, when it finishes, records per table
it wrote a content fingerprint (the sha256s of the shard bytes, taken at write time while the bytes are
in memory) and a listing fingerprint (names and sizes). A table's fingerprint combines, per run that
wrote it, the recorded content fingerprint when that run's shards are still exactly as listed, and the
names and sizes of everything else (rows of an unfinished run, shards changed by hand, tables brought
from elsewhere). Reading it costs one listing and a few small JSON reads, never the data.
"""

from __future__ import annotations

from dataclasses import dataclass

from catalog.ledger import Ledger, runs
from catalog.manifest import fingerprint
from catalog.paths import resolve, retry
from catalog.shards import shard_sizes

ABSENT = "absent"


def run_prefix(run: str) -> str:
    """The file-name prefix of a run's shards (``=`` appears in no run name, so prefixes never overlap)."""
    return f"{run}="


def listing_fingerprint(sizes: dict[str, int]) -> str:
    return fingerprint(sorted(sizes.items()))


def run_shards(sizes: dict[str, int], run: str) -> dict[str, int]:
    prefix = run_prefix(run)
    return {name: size for name, size in sizes.items() if name.startswith(prefix)}


@dataclass(frozen=True)
class TableState:
    fingerprint: str
    unfinished_writers: list[str]  # runs that are writing this table and have not finished


def table_state(root: str, table: str) -> TableState:
    """The fingerprint of ``table`` as it is now, and which of its writers are still unfinished."""
    sizes = shard_sizes(root, table)
    if not sizes:
        return TableState(ABSENT, [])
    parts: list[object] = []
    claimed: set[str] = set()
    unfinished = []
    for run in runs(root):
        ledger = Ledger(root, run)
        record = ledger.completion()
        if record is None:
            plan = ledger.plan()
            if plan is not None and table in plan.outputs:
                unfinished.append(run)
            continue
        output = record.get("outputs", {}).get(table)
        if output is None:
            continue
        mine = run_shards(sizes, run)
        claimed |= set(mine)
        intact = listing_fingerprint(mine) == output["listing"]
        parts.append([run, output["content"] if intact else ["altered", listing_fingerprint(mine)]])
    parts.append(sorted((n, s) for n, s in sizes.items() if n not in claimed))
    return TableState(fingerprint(parts), unfinished)


def file_fingerprint(url: str) -> str:
    """A file brought from outside the catalog (``--embeddings X.npy``): fsspec's checksum of its
    metadata (size and modification time locally, the ETag on object stores)."""
    fs, path = resolve(url, fresh=True)
    return f"{retry(lambda: fs.checksum(path)):x}"
