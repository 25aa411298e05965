"""Kill what an in-process Ray leaves behind when its driver dies: ``python ray_reaper.py DRIVER_PID``.

Started by ``catalog.ray_runtime`` beside the driver. While the driver lives, it remembers the
driver's descendants (PID and start time, so a reused PID is never hit); once the driver is gone
(killed, crashed or finished) it SIGKILLs those still alive and their children, then exits. It
ignores SIGINT and SIGHUP, which reach the driver's whole process group (Ctrl-C, a closed terminal):
they are exactly the moments it must outlive the driver.
"""

from __future__ import annotations

import signal
import sys
import time

import psutil

POLL_S = 1.0


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _remember(driver: psutil.Process, seen: dict[int, float], me: int) -> None:
    try:
        children = driver.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for child in children:
        try:
            if child.pid != me:
                seen[child.pid] = child.create_time()
        except psutil.NoSuchProcess:
            continue


def _kill(seen: dict[int, float]) -> None:
    victims = []
    for pid, started in seen.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == started:
                victims += [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    for proc in victims:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(victims, timeout=5)


def watch(driver_pid: int, poll_s: float = POLL_S) -> None:
    """Block until ``driver_pid`` is gone, then kill the descendants it had."""
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return
    seen: dict[int, float] = {}
    me = psutil.Process().pid
    while _alive(driver):
        _remember(driver, seen, me)
        time.sleep(poll_s)
    _kill(seen)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
