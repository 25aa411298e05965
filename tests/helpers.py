"""Test helpers: run `curate` in this process, or start it in its own process group and SIGKILL it part-way;
an S3-compatible test server."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable

import numpy as np
import psutil
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kill_marked(marks: list[str]) -> None:
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


def free_ports(n: int = 1) -> list[int]:
    """``n`` distinct loopback ports free right now (all held open together while they are picked)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["CURATE_PROGRESS"] = "0"
    return env


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    """``curate ARGS`` in this process (its Ray is started once and shared), output captured.

    Saves a Python + Ray start-up per call; an unexpected exception becomes exit status 1 with its
    traceback on stderr, as from the console script. Kill tests start a real process (`kill_when`).
    """
    from pipelines.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(args)
        except SystemExit as e:  # argparse errors and --help
            rc = e.code if isinstance(e.code, int) else 1
        except Exception:
            traceback.print_exc()
            rc = 1
    return subprocess.CompletedProcess(["curate", *args], rc, out.getvalue(), err.getvalue())


def kill_when(args: list[str], ready: Callable[[], bool], timeout: float = 300, *,
              only_driver: bool = False) -> list[psutil.Process]:
    """Start ``curate ARGS``, wait until ``ready()``, then SIGKILL it and every process it started.

    ``only_driver``: SIGKILL the ``curate`` process alone (what an OOM kill or a crash does) and leave
    its helpers to die with it. Returns the processes it had started, as they were at the kill.
    """
    return kill_command_when([sys.executable, "-m", "pipelines.cli", *args], cli_env(), ready, timeout,
                             only_driver=only_driver)


def kill_command_when(cmd: list[str], env: dict[str, str], ready: Callable[[], bool], timeout: float = 300, *,
                      only_driver: bool = False) -> list[psutil.Process]:
    """Start ``cmd`` in its own session, wait until ``ready()``, then SIGKILL its whole process tree
    (or, ``only_driver``, the process itself); returns its descendants as they were at the kill."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + timeout
    descendants: list[psutil.Process] = []
    try:
        while not ready():
            if proc.poll() is not None:
                raise AssertionError(f"command finished before the kill point: {proc.stderr.read().decode()[-3000:]}")
            if time.time() > deadline:
                raise AssertionError("kill point never reached")
            time.sleep(0.02)
        descendants = psutil.Process(proc.pid).children(recursive=True)
    finally:
        if only_driver and descendants:
            proc.kill()
        else:
            kill_tree(proc.pid)
        proc.wait(timeout=30)
    return descendants


def still_alive(procs: list[psutil.Process], grace_s: float) -> list[psutil.Process]:
    """Those of ``procs`` still running (zombies count as gone) after waiting up to ``grace_s`` for them."""
    deadline = time.time() + grace_s
    alive = procs
    while alive and time.time() < deadline:
        time.sleep(0.5)
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    return alive


def kill_tree(pid: int) -> None:
    """SIGKILL a process, its process group and all its descendants (Ray workers included)."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


@contextlib.contextmanager
def s3_server(bucket: str):
    """A moto S3 server on a free loopback port with ``bucket`` created; yields its s3fs filesystem.

    While inside, the standard ``AWS_*`` variables (``AWS_ENDPOINT_URL`` included) point at it, so
    every s3fs/botocore client in this process finds it as it would find a real object store.
    """
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_ports()[0]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            mp.delenv("AWS_PROFILE", raising=False)
            s3fs.S3FileSystem.clear_instance_cache()
            fs = s3fs.S3FileSystem()
            fs.mkdir(bucket)
            try:
                yield fs
            finally:
                s3fs.S3FileSystem.clear_instance_cache()
    finally:
        server.stop()


EMBEDDING_IDENTITY = {"model": "t", "weights_sha256": "0" * 64, "preprocess": "none", "pooling": "none",
                      "normalized": "true"}  # of the tables tests write without a backbone


def write_embedded_pool(root: str, name: str, ids: np.ndarray, x: np.ndarray, sha: list[str] | None = None) -> None:
    """Pool rows (no files behind them; ``sha``: each image's sha256, distinct by default) and float16
    embeddings (`EMBEDDING_IDENTITY`) of these images, a shard each."""
    import pyarrow as pa

    from catalog.embeddings import embeddings_table
    from catalog.schemas import EMBEDDINGS_TABLE, POOL, POOL_TABLE, stamp
    from catalog.shards import write_shards

    n = len(ids)
    given = ("image_id", "uri", "sha256", "status")
    nulls = {f.name: pa.nulls(n, f.type) for f in POOL if f.name not in given}
    pool = pa.table({"image_id": ids, "uri": [f"mem/{i}.jpg" for i in ids], **nulls,
                     "sha256": sha or [f"{int(i) & (2**64 - 1):064x}" for i in ids], "status": ["ok"] * n},
                    schema=stamp(POOL, POOL_TABLE))
    write_shards(root, POOL_TABLE, f"ingest={name}", pool)
    write_shards(root, EMBEDDINGS_TABLE, f"embed={name}", embeddings_table(ids, x.astype(np.float16), EMBEDDING_IDENTITY))
