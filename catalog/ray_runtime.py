"""Starting or joining Ray, the same way for every stage and for the trainer.

An in-process Ray is for this process only: every listener (GCS, raylet, object manager, workers,
dashboard and runtime-env agents, the driver) is bound to 127.0.0.1, and it dies with its driver. Ray
fate-shares its direct children with the driver, but the agents, reparented to init, wait up to a
minute on the dead GCS before they exit; ``catalog.ray_reaper`` kills what is left within a second.
A cluster is joined as it is configured (token authentication: docker/README.md).
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys

from catalog import ray_reaper

# Quiet, without usage reporting, whether local or joined; these must be set before init.
_ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    # Ray Data warns that a job "may hang forever" when its first operator waits 60 s for CPUs; on a busy
    # machine that is only its coordinator actor starting late. A request no node can grant is refused
    # up front instead (pipelines.ray_executor.check_fits), so the warning waits ten minutes.
    "RAY_DATA_STARVATION_WARNING_DELAY_S": "600",
}
# Only for the in-process Ray: it is reachable from this host's loopback alone.
_LOCAL_ENV_DEFAULTS = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
}
LOOPBACK = "127.0.0.1"
LOCAL_OBJECT_STORE_BYTES = 512 * 1024**2
START_ATTEMPTS = 3
log = logging.getLogger("curate.catalog")
# Ray Data's loggers that speak on every dataset, and the level that silences only that: the progress
# bars' says (WARNING) that they are off, which we choose; the executor's says (INFO) that each dataset
# finished, which our stage lines say already.
_RAY_DATA_CHATTY_LOGGERS = {"ray.data._internal.progress": logging.ERROR,
                            "ray.data._internal.execution.streaming_executor": logging.WARNING}


def _set_defaults(defaults: dict[str, str]) -> None:
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def set_ray_environment() -> None:
    """Our defaults for Ray's environment (local or joined), unless already set: before Ray is imported
    anywhere, since Ray reads some of them at import."""
    _set_defaults(_ENV_DEFAULTS)


def _start_local(ray, num_cpus: int | None) -> None:
    """Start the in-process Ray. Its raylet must register within a fixed 30 s, which a heavily loaded
    machine can miss (seen on a shared 2-core host at load 15): then Ray is stopped and started again."""
    for attempt in range(START_ATTEMPTS):
        try:
            ray.init(num_cpus=num_cpus or os.cpu_count(), object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                     include_dashboard=False, dashboard_host=LOOPBACK, log_to_driver=True,
                     logging_level="WARNING", _node_ip_address=LOOPBACK)
            return
        except Exception as e:  # Ray raises a bare Exception for the timeout
            if "timed out during startup" not in str(e) or attempt == START_ATTEMPTS - 1:
                raise
            log.warning("Ray's node did not start in time (machine busy?): trying again")
            ray.shutdown()


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at ``address`` (or ``CURATE_RAY_ADDRESS``), or start Ray in-process.

    The in-process Ray gets a capped object store so it fits beside the stage's own memory, listens
    on loopback only, and a reaper process that ends it if this process is killed.
    """
    set_ray_environment()
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("CURATE_RAY_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, logging_level="WARNING")
    else:
        _set_defaults(_LOCAL_ENV_DEFAULTS)
        _start_local(ray, num_cpus)
        _start_reaper()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # each stage draws its own bar (catalog/progress.py)
    for name, level in _RAY_DATA_CHATTY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    ctx.print_on_execution_start = False


def worker_cpus() -> float | None:
    """CPUs Ray gave the task or actor running in this process; None outside a Ray worker (or before Ray).

    Read from the already-imported Ray only: a process that never imported Ray is no Ray worker.
    """
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return None
    return ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)  # none asked: Ray's default of 1


@functools.cache
def _start_reaper() -> subprocess.Popen:
    """One reaper per driver (it rescans every second, so a later in-process Ray is covered too). It
    runs as a script by path: it needs only psutil, not this package on its path."""
    return subprocess.Popen([sys.executable, ray_reaper.__file__, str(os.getpid())], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True)
