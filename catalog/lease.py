"""A writer lease on one run of a catalog: two processes never write the same run's shards and ledger.

A lease is a small JSON object ``_leases/<run>/<generation>.json`` (owner, host, PID, start, heartbeat,
a random token). Taking one is a create-if-absent of the next generation (``catalog.paths.create_exclusive``:
a link of a complete file on local disks, S3's conditional put ``If-None-Match: *``), so of two processes
that try at once exactly one wins; the holder is whoever wrote the highest generation. The holder's
heartbeat thread rewrites its object every ``heartbeat_s`` seconds.

A second writer is refused with the holder named, unless the lease is stale: its process is gone (same
host: no process with that PID and start time), or its heartbeat is older than ``timeout_s`` (another
host; hosts' clocks are assumed to agree within that timeout, as NTP keeps them). A stale lease is taken
over by creating the next generation, which again only one taker can do. Every commit checks that its
lease is still the current one (`Lease.check`), so a writer that lost its lease (it stalled past the
timeout, or a worker outlived its driver) stops instead of writing beside the new holder.

On stores whose create-if-absent is not atomic (``catalog.paths.ATOMIC_CREATE``), the taker waits
``SETTLE_S`` and reads the lease back before trusting it: a racing writer's put lands within that time.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import posixpath
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import psutil

from catalog.errors import UserError
from catalog.paths import create_exclusive, create_is_atomic, join, ls, read_bytes, resolve, retry, write_bytes_atomic

log = logging.getLogger("curate.catalog")

LEASES_DIR = "_leases"
TIMEOUT_S = 300.0
HEARTBEAT_S = 30.0
SETTLE_S = 2.0
_TAKE_ATTEMPTS = 5


class LeaseHeldError(UserError):
    """Another live process holds the lease of this run."""


class LeaseLostError(UserError):
    """This process's lease was taken over: it must not write any more."""


@dataclass(frozen=True)
class Holder:
    """What a lease object records."""

    run: str
    host: str
    pid: int
    pid_started: float  # the process's start time, so a reused PID is not taken for the holder
    started: float
    heartbeat: float
    timeout_s: float
    token: str
    generation: int

    def describe(self, now: float) -> str:
        since = dt.datetime.fromtimestamp(self.started, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        return (f"pid {self.pid} on host {self.host} (since {since}, last heartbeat {now - self.heartbeat:.0f} s "
                "ago)")

    def stale(self, now: float) -> str | None:
        """Why this lease no longer protects anyone, or None while its holder may still be writing."""
        if self.host == _host() and not _process_alive(self.pid, self.pid_started):
            return f"its process {self.pid} on this host is gone"
        if now - self.heartbeat > self.timeout_s:
            return f"its heartbeat is {now - self.heartbeat:.0f} s old (timeout {self.timeout_s:.0f} s)"
        return None


def _host() -> str:
    return os.uname().nodename


def _process_alive(pid: int, started: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and abs(proc.create_time() - started) < 1.0
    except psutil.NoSuchProcess:
        return False


def _lease_dir(root: str, run: str) -> str:
    return join(root, LEASES_DIR, run)


def _generation_url(root: str, run: str, generation: int) -> str:
    return join(_lease_dir(root, run), f"{generation:010d}.json")


def _generations(root: str, run: str) -> list[int]:
    names = (posixpath.basename(u) for u in ls(_lease_dir(root, run)))
    return sorted(int(n[: -len(".json")]) for n in names if n.endswith(".json") and n[: -len(".json")].isdigit())


def current(root: str, run: str) -> Holder | None:
    """The holder of the run's lease (the highest generation), or None. An unreadable lease object
    counts as a holder whose heartbeat never came, so it is stale at once."""
    for _ in range(_TAKE_ATTEMPTS):
        generations = _generations(root, run)
        if not generations:
            return None
        top = generations[-1]
        try:
            return Holder(**{**json.loads(read_bytes(_generation_url(root, run, top))), "generation": top})
        except FileNotFoundError:  # released (or taken over and cleaned up) while we listed
            continue
        except (ValueError, TypeError):
            return Holder(run, "?", -1, 0.0, 0.0, 0.0, 0.0, "", top)
    return None


@dataclass(frozen=True)
class Lease:
    """A held lease: picklable, so Ray workers check it before each commit."""

    root: str
    run: str
    generation: int
    token: str

    def check(self) -> None:
        """Raise `LeaseLostError` unless this lease is still the run's current one."""
        holder = current(self.root, self.run)
        if holder is None or holder.token != self.token:
            who = f"now held by {holder.describe(time.time())}" if holder else "released"
            raise LeaseLostError(f"the lease on {self.run} in {self.root} was taken over ({who}): this run "
                                 "stops writing; rerun the command once the other writer is done")


def acquire(root: str, run: str, *, timeout_s: float = TIMEOUT_S) -> Lease:
    """Take the run's lease, taking over a stale one; `LeaseHeldError` names a live holder."""
    me = psutil.Process()
    for _ in range(_TAKE_ATTEMPTS):
        now = time.time()
        holder = current(root, run)
        stale = holder.stale(now) if holder else None
        if holder is not None and stale is None:
            raise LeaseHeldError(
                f"{run} in {root} is being written by {holder.describe(now)}: wait for it to finish (its lease "
                f"is taken over once its process is gone or its heartbeat is {holder.timeout_s:.0f} s old)")
        generation = holder.generation + 1 if holder else 0
        mine = Holder(run, _host(), me.pid, me.create_time(), now, now, timeout_s, secrets.token_hex(16), generation)
        url = _generation_url(root, run, generation)
        body = {k: v for k, v in asdict(mine).items() if k != "generation"}
        create_exclusive(url, json.dumps(body).encode())
        if not create_is_atomic(url):
            time.sleep(SETTLE_S)
        won = current(root, run)
        if won is not None and won.token == mine.token:
            if holder is not None:
                log.info("%s: took over the lease of %s: %s", run, holder.describe(now), stale)
            _forget_older(root, run, generation)
            return Lease(root, run, generation, mine.token)
    raise LeaseHeldError(f"{run} in {root}: other writers kept taking its lease; try again")


def _forget_older(root: str, run: str, generation: int) -> None:
    for older in _generations(root, run):
        if older < generation:
            _remove(_generation_url(root, run, older))


def _remove(url: str) -> None:
    fs, path = resolve(url)
    with contextlib.suppress(FileNotFoundError):
        retry(lambda: fs.rm(path))


def release(lease: Lease) -> None:
    """Give the lease up, if it is still ours."""
    holder = current(lease.root, lease.run)
    if holder is not None and holder.token == lease.token:
        _remove(_generation_url(lease.root, lease.run, lease.generation))


def heartbeat(lease: Lease) -> None:
    """Renew the lease's heartbeat (rewriting our own object only while it is still the current one)."""
    lease.check()
    url = _generation_url(lease.root, lease.run, lease.generation)
    doc = json.loads(read_bytes(url))
    write_bytes_atomic(url, json.dumps({**doc, "heartbeat": time.time()}).encode())


class _Heartbeat(threading.Thread):
    def __init__(self, lease: Lease, every_s: float):
        super().__init__(name=f"lease-heartbeat-{lease.run}", daemon=True)
        self.lease, self.every_s, self.stopped = lease, every_s, threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every_s):
            try:
                heartbeat(self.lease)
            except LeaseLostError as e:
                log.warning("%s", e)
                return
            except Exception as e:  # a store hiccup: the next beat tries again, well within the timeout
                log.warning("%s: could not renew its lease (%s: %s)", self.lease.run, type(e).__name__, e)


@contextlib.contextmanager
def hold(root: str, run: str, *, timeout_s: float = TIMEOUT_S, heartbeat_s: float = HEARTBEAT_S) -> Iterator[Lease]:
    """Hold the run's lease for the body of a ``with``: taken, renewed in the background, released."""
    lease = acquire(root, run, timeout_s=timeout_s)
    beat = _Heartbeat(lease, heartbeat_s)
    beat.start()
    try:
        yield lease
    finally:
        beat.stopped.set()
        beat.join()
        release(lease)

