"""One Ray head (with dashboard and job server) on loopback for the whole test session.

Every port is our own and the processes are stopped by PID, never with ``ray stop``. The test process
and every ``curate`` subprocess join it through ``RAY_ADDRESS`` instead of starting a Ray of their own
(about 9 s each on 2 cores); the job tests submit to its dashboard.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psutil

from tests.helpers import REPO

RAY = os.path.join(os.path.dirname(sys.executable), "ray")


@dataclass(frozen=True)
class RayHead:
    address: str  # GCS address, for ray.init / RAY_ADDRESS
    dashboard: str  # http URL of the dashboard and job server


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _kill_tree(marks: list[str]) -> None:
    """Stop every process whose command line carries one of our marks, and their children."""
    roots = [p for p in psutil.process_iter(["cmdline"]) if any(m in " ".join(p.info["cmdline"] or []) for m in marks)]
    procs = {p.pid: p for p in roots}
    for p in roots:
        try:
            procs.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    procs.pop(os.getpid(), None)
    for p in procs.values():
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=3)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def _wait_for(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@contextmanager
def running_ray_head(num_cpus: int = 2, object_store_bytes: int = 512 * 1024**2) -> Iterator[RayHead]:
    temp_dir = tempfile.mkdtemp(prefix="curate-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    gcs, dash, client, agent, agent_grpc, metrics, runtime_env, node_mgr, obj_mgr = _free_ports(9)
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "CURATE_PROGRESS": "0",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    env.pop("CURATE_RAY_ADDRESS", None)
    cmd = [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
           "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
           "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
           "--runtime-env-agent-port", str(runtime_env), "--node-manager-port", str(node_mgr),
           "--object-manager-port", str(obj_mgr), "--num-cpus", str(num_cpus),
           "--object-store-memory", str(object_store_bytes), "--disable-usage-stats", "--temp-dir", temp_dir]
    marks = [temp_dir, f"127.0.0.1:{gcs}"]
    head = RayHead(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}")
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, f"ray start failed:\n{started.stdout}\n{started.stderr}"
        _wait_for(f"{head.dashboard}/api/version")
        yield head
    finally:
        _kill_tree(marks)
        shutil.rmtree(temp_dir, ignore_errors=True)
