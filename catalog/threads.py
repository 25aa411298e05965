"""Thread counts from the CPUs this process actually has, for every library that runs a thread pool.

``os.cpu_count()`` counts the machine, not what the process may use: under a CPU affinity mask, a
container's CPU quota or a Ray worker's allotment, torch, OpenMP/BLAS and faiss then start a thread per
machine core each, and on a busy host they fight (a training step took ~5 CPU-s instead of ~1 CPU-s,
issue 15). ``configure_threads`` runs once at start-up of the CLI and of each Ray worker's task or actor:
it sets the count of the libraries already loaded (through their own calls) and the environment
variables that libraries loaded later read at load (with ``OMP_WAIT_POLICY=PASSIVE`` unless set: idle
OpenMP threads then sleep rather than spin on a busy host). ``CURATE_THREADS=N`` (``curate --threads N``)
overrides the count, and is inherited by Ray workers started from this process.

This module loads none of those libraries itself (``catalog`` never imports torch): it sets the ones
``sys.modules`` already holds.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from threadpoolctl import threadpool_limits

from catalog import ray_runtime
from catalog.config import ConfigError

OVERRIDE_ENV = "CURATE_THREADS"
# Read by OpenMP (libgomp, libiomp), MKL, OpenBLAS and numexpr when they load; torch reads OMP_NUM_THREADS.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")
# Idle OpenMP threads sleep instead of spinning (read when libgomp loads; a user's own setting wins). On a
# busy 2-core host, hierarchical k-means of 23 rows took 35-43 s with spinning threads and 0.1-0.9 s
# with sleeping ones (2 threads each; docs/benchmarks.md): a spinning thread holds a core that the thread
# it waits for needs.
WAIT_POLICY = ("OMP_WAIT_POLICY", "PASSIVE")
CGROUP_ROOT = Path("/sys/fs/cgroup")
_DEFAULT_PERIOD_US = 100_000


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs a container's quota allows (cgroup v2 ``cpu.max``, else v1 ``cfs_quota_us``); None: no quota."""
    v2 = root / "cpu.max"
    if v2.is_file():
        quota, *period = v2.read_text().split()
        return None if quota == "max" else int(quota) / int(period[0] if period else _DEFAULT_PERIOD_US)
    quota_file, period_file = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"
    if quota_file.is_file() and period_file.is_file():
        quota = int(quota_file.read_text())
        return None if quota <= 0 else quota / int(period_file.read_text())
    return None


def machine_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may run on: its affinity mask, capped by its container's quota (rounded up)."""
    cpus = len(os.sched_getaffinity(0))
    limit = cgroup_cpu_limit(cgroup_root)
    return max(1, min(cpus, math.ceil(limit))) if limit else cpus


def allotted_threads() -> int:
    """The thread count for this process: ``CURATE_THREADS`` if set, else its CPUs, capped inside a Ray
    worker by the CPUs Ray gave the running task or actor."""
    override = os.environ.get(OVERRIDE_ENV)
    if override:
        if not override.isdigit() or int(override) < 1:
            raise ConfigError(f"{OVERRIDE_ENV}={override!r} (or --threads): give a whole number of threads, at least 1")
        return int(override)
    cpus = machine_cpus()
    ray_cpus = ray_runtime.worker_cpus()
    return cpus if ray_cpus is None else max(1, min(cpus, math.floor(ray_cpus)))


@dataclass(frozen=True)
class ThreadCounts:
    """What was set: the count, and the loaded libraries whose pools were resized."""

    threads: int
    libraries: tuple[str, ...]


def configure_threads(threads: int | None = None) -> ThreadCounts:
    """Set every thread pool of this process to ``threads`` (default ``allotted_threads()``)."""
    n = threads or allotted_threads()
    for var in THREAD_ENV_VARS:
        os.environ[var] = str(n)
    os.environ.setdefault(*WAIT_POLICY)
    done = []
    if (torch := sys.modules.get("torch")) is not None:
        torch.set_num_threads(n)
        done.append("torch")
    if (faiss := sys.modules.get("faiss")) is not None:
        faiss.omp_set_num_threads(n)
        done.append("faiss")
    threadpool_limits(limits=n)  # OpenMP and BLAS runtimes already loaded (numpy's OpenBLAS, sklearn's OpenMP)
    global _configured
    _configured = n
    return ThreadCounts(n, (*done, "openmp/blas"))


_configured: int | None = None  # the count configure_threads last set in this process


def ensure_threads() -> int:
    """``configure_threads()`` unless this process already runs at its allotted count: cheap enough for
    every Ray task (a worker process runs tasks of different CPU allotments one after another)."""
    n = allotted_threads()
    if n != _configured:
        configure_threads(n)
    return n
