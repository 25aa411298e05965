"""Starting or joining Ray, the same way for every stage."""

from __future__ import annotations

import logging
import os

# Keep a local Ray on loopback, quiet, and without usage reporting; these must be set before init.
_ENV_DEFAULTS = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
}
LOCAL_OBJECT_STORE_BYTES = 512 * 1024**2
START_ATTEMPTS = 3
log = logging.getLogger("curate.pipelines")


def _start_local(ray, num_cpus: int | None) -> None:
    """Start the in-process Ray. Its raylet must register within a fixed 30 s, which a heavily loaded
    machine can miss (seen on a shared 2-core host at load 15): then Ray is stopped and started again."""
    for attempt in range(START_ATTEMPTS):
        try:
            ray.init(num_cpus=num_cpus or os.cpu_count(), object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                     include_dashboard=False, log_to_driver=True, logging_level="WARNING",
                     _node_ip_address="127.0.0.1")
            return
        except Exception as e:  # Ray raises a bare Exception for the timeout
            if "timed out during startup" not in str(e) or attempt == START_ATTEMPTS - 1:
                raise
            log.warning("Ray's node did not start in time (machine busy?): trying again")
            ray.shutdown()


def set_ray_environment() -> None:
    """Our defaults for Ray's environment, unless already set; before Ray is imported anywhere."""
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at ``address`` (or ``CURATE_RAY_ADDRESS``), or start Ray in-process.

    The in-process Ray gets a capped object store so it fits beside the stage's own memory. Ray is
    imported here, after its environment is set: it reads some of these variables at import.
    """
    set_ray_environment()
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("CURATE_RAY_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, logging_level="WARNING")
    else:
        _start_local(ray, num_cpus)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
