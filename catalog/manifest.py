"""Run manifests: what a stage run did, written beside the catalog it changed.

A manifest records the config, the code version, fingerprints of the inputs and outputs, row counts
in / out / errored, wall and CPU time and peak memory. ``curate inspect`` lists them; a catalog without one is not done.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import resource
import subprocess
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from catalog.paths import join, ls, read_bytes, write_bytes_atomic


def code_version() -> dict[str, str | None]:
    """Package version and, when running from a git checkout, the commit."""
    try:
        version = metadata.version("curate")
    except metadata.PackageNotFoundError:
        version = None
    commit = None
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"package": version, "git_commit": commit}


def fingerprint(*parts: Any) -> str:
    """A stable sha256 over JSON-serialisable parts (configs, file lists, sizes)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


def peak_memory_mb() -> float:
    """Peak resident memory of this process and its finished children, in MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024.0


@dataclass
class RunManifest:
    """Collects a stage run's facts; use as a context manager around the run."""

    root: str
    stage: str
    config: dict[str, Any]
    inputs: dict[str, Any] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)  # fingerprint of each table written
    worker_cpu_seconds: float = 0.0  # CPU time of the units, wherever they ran
    _start: float = 0.0
    _cpu_start: float = 0.0

    def __enter__(self) -> RunManifest:
        self._start = time.time()
        self._cpu_start = time.process_time()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        status = "ok" if exc_type is None else f"failed: {exc_type.__name__}: {exc}"
        self.write(status)

    def write(self, status: str) -> str:
        started = dt.datetime.fromtimestamp(self._start, dt.timezone.utc)
        doc = {
            "stage": self.stage,
            "status": status,
            "started": started.isoformat(),
            "wall_seconds": round(time.time() - self._start, 3),
            "cpu_seconds": round(time.process_time() - self._cpu_start, 3),
            "worker_cpu_seconds": self.worker_cpu_seconds,
            "peak_memory_mb": round(peak_memory_mb(), 1),
            "code": code_version(),
            "config": self.config,
            "inputs": self.inputs,
            "rows": self.rows,
            "outputs": self.outputs,
            "notes": self.notes,
            "host": os.uname().nodename,
        }
        name = f"{started.strftime('%Y%m%dT%H%M%S%fZ')}-{self.stage}-{os.getpid()}.json"
        url = join(self.root, "_manifests", name)
        write_bytes_atomic(url, json.dumps(doc, indent=2, default=str).encode())
        return url


def list_manifests(root: str) -> list[dict[str, Any]]:
    """All manifests of a catalog, oldest first."""
    return [json.loads(read_bytes(url)) for url in ls(join(root, "_manifests")) if url.endswith(".json")]
