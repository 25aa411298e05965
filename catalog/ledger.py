"""The stage ledger: which input units a stage has finished.

One small marker object per finished unit (``_ledger/<stage>/<unit>.json``) rather than one shared
file, so concurrent workers never contend and object stores need no append or rename. A plan
fingerprint guards against resuming with a different split into units, which could write rows twice.
"""

from __future__ import annotations

import json
import posixpath

from catalog.paths import exists, join, ls, read_bytes, resolve, retry, write_bytes_atomic

PLAN_FILE = "_plan.json"
COMPLETE_FILE = "_complete.json"


class LedgerPlanError(RuntimeError):
    """A rerun split its input into different units than the run it would resume."""


class Ledger:
    def __init__(self, root: str, stage: str):
        self.root = root
        self.stage = stage
        self.dir = join(root, "_ledger", stage)

    def _unit_url(self, unit: str) -> str:
        return join(self.dir, f"{unit}.json")

    def done(self) -> dict[str, dict]:
        """Finished units and what each recorded (row counts and the like), listed fresh: the markers
        are written by other processes."""
        out = {}
        for url in ls(self.dir):
            name = posixpath.basename(url)
            if name.endswith(".json") and not name.startswith("_"):
                out[name[: -len(".json")]] = json.loads(read_bytes(url))
        return out

    def mark(self, unit: str, info: dict | None = None) -> None:
        write_bytes_atomic(self._unit_url(unit), json.dumps(info or {}).encode())

    def check_plan(self, fingerprint: str) -> None:
        """Record the plan on the first run; on a rerun refuse a different plan."""
        url = join(self.dir, PLAN_FILE)
        if exists(url):
            old = json.loads(read_bytes(url))["fingerprint"]
            if old != fingerprint:
                raise LedgerPlanError(
                    f"stage {self.stage!r} in {self.root} was started with different inputs or "
                    f"settings (plan {old[:12]} vs {fingerprint[:12]}); rerun with --overwrite to "
                    "start it again from scratch"
                )
            return
        write_bytes_atomic(url, json.dumps({"fingerprint": fingerprint}).encode())

    def is_complete(self) -> bool:
        return exists(join(self.dir, COMPLETE_FILE))

    def mark_complete(self, info: dict | None = None) -> None:
        write_bytes_atomic(join(self.dir, COMPLETE_FILE), json.dumps(info or {}).encode())

    def reset(self) -> None:
        fs, path = resolve(self.dir, fresh=True)
        if retry(lambda: fs.exists(path)):
            retry(lambda: fs.rm(path, recursive=True))
            fs.invalidate_cache(path)
