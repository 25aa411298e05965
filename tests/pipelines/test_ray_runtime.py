"""The in-process Ray of a real ``curate`` process: it listens on loopback only, and it dies with it.

One ``python -m pipelines.cli ingest`` is started; once two units are done, every socket its process
tree listens on is recorded, then only the ``curate`` process is SIGKILLed (as an OOM kill would) and
the processes it had started are watched for 10 s. Processes are found by parentage, never by name
across the machine, and never with ``ray stop`` (other Rays may run here).
"""

from __future__ import annotations

import ipaddress
import os

import psutil
import pytest

from catalog.ledger import Ledger
from tests.helpers import kill_when, still_alive

GRACE_S = 10.0


def _listening(proc: psutil.Process) -> list[tuple[str, str, int]]:
    """(process name, ip, port) of every TCP listener and bound UDP socket of ``proc``."""
    try:
        conns = proc.net_connections(kind="inet")
        name = proc.name()
    except psutil.Error:
        return []
    return [(name, c.laddr.ip, c.laddr.port) for c in conns
            if c.laddr and (c.status == psutil.CONN_LISTEN or (c.type == 2 and not c.raddr))]


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or bool(mapped and mapped.is_loopback)


@pytest.fixture(scope="module")
def killed_ingest(demo_pool, tmp_path_factory):
    """(sockets while running, processes at the kill, those still alive GRACE_S after it)."""
    root = str(tmp_path_factory.mktemp("ray") / "cat")
    sockets: list[tuple[str, str, int]] = []

    def ready() -> bool:
        if len(Ledger(root, "ingest").done()) < 2:
            return False
        driver = next(p for p in psutil.process_iter(["cmdline"]) if root in " ".join(p.info["cmdline"] or []))
        for proc in [driver, *driver.children(recursive=True)]:
            sockets.extend(_listening(proc))
        return True

    started = kill_when(["ingest", os.path.join(demo_pool, "pool"), "--catalog", root, "--set", "files_per_unit=20"],
                        ready, only_driver=True)
    alive = still_alive(started, GRACE_S)
    try:
        yield sockets, started, [(p.pid, p.name()) for p in alive]
    finally:
        for proc in alive:  # leave nothing behind, whatever the assertions say
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass


@pytest.mark.slow
def test_every_ray_listener_of_a_run_is_on_loopback(killed_ingest):
    sockets, _, _ = killed_ingest
    names = {name for name, _, _ in sockets}
    # the run's Ray really was inspected: GCS, raylet, agents, workers and the driver all listen
    assert {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names, names
    assert any(n.startswith("ray::") and "Agent" not in n for n in names), names
    assert any(n.startswith("python") for n in names), names
    outside = [s for s in sockets if not _is_loopback(s[1])]
    assert not outside, f"listening beyond loopback: {outside}"


@pytest.mark.slow
def test_no_ray_process_outlives_a_killed_driver(killed_ingest):
    _, started, alive = killed_ingest
    assert len(started) >= 5  # gcs, raylet, agents, workers, the reaper
    assert not alive, f"still running {GRACE_S:.0f} s after the driver's SIGKILL: {alive}"
