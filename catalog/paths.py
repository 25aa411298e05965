"""One way to open a path: every catalog, pool and checkpoint location goes through fsspec.

Local paths, ``file://``, ``memory://``, ``s3://`` and ``gs://`` all resolve here, so the rest of the
code never branches on where data lives.

Object stores, the three layers that keep a run going through throttling and dropped connections:

1. botocore retries each S3 request in ``adaptive`` mode (exponential backoff with jitter plus a
   client-side rate limiter that slows down on ``SlowDown``/503), up to 10 attempts; set below as the
   fsspec default for ``s3`` so every process that imports the catalog (Ray workers, DuckDB's reads)
   gets it. ``AWS_RETRY_MODE`` / ``AWS_MAX_ATTEMPTS`` in the environment, or ``config_kwargs.retries``
   in the fsspec config, take precedence. gcsfs retries 408/429/5xx itself the same way.
2. s3fs retries network errors and ``SlowDown`` a few more times on top (its ``retries``, 5).
3. ``retry`` here re-runs a whole catalog operation (a shard read or write, a ledger marker, a
   listing) on what still escapes as transient: connection resets, timeouts, ``EBUSY`` (s3fs's
   translation of 503/SlowDown/409) and ``EREMOTEIO`` (500), or an HTTP error carrying 408/429/5xx.

Credentials and endpoints come from the usual places (``AWS_*`` variables including
``AWS_ENDPOINT_URL``, ``~/.aws``, instance roles; ``GOOGLE_APPLICATION_CREDENTIALS``), never from curate.
Listings are read fresh (``resolve(url, fresh=True)``): s3fs caches directory listings per process,
and other processes (Ray workers, other hosts) add shards and ledger markers all the time.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import posixpath
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO, TypeVar

import fsspec
import fsspec.config
from fsspec.core import split_protocol, url_to_fs

from catalog.errors import UserError

T = TypeVar("T")

_TRANSIENT_ERRNOS = {errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED,
                     errno.ECONNREFUSED, errno.EPIPE, errno.EREMOTEIO}
_TRANSIENT_HTTP = {408, 429, 500, 502, 503, 504}
S3_RETRIES = {"mode": "adaptive", "total_max_attempts": 10}


def _default_s3_retries() -> None:
    """Make botocore's adaptive retries the fsspec default for ``s3``, unless configured otherwise."""
    retries = fsspec.config.conf.setdefault("s3", {}).setdefault("config_kwargs", {}).setdefault("retries", {})
    for key, env in (("mode", "AWS_RETRY_MODE"), ("total_max_attempts", "AWS_MAX_ATTEMPTS")):
        if env not in os.environ:
            retries.setdefault(key, S3_RETRIES[key])


_default_s3_retries()


def resolve(url: str, *, fresh: bool = False) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the filesystem and the protocol-less path for ``url``.

    ``fresh`` drops the filesystem's cached listings of the path and its parents first; use it before
    listing or testing existence of anything another process may have written.
    """
    fs, path = url_to_fs(url)
    if fresh:
        fs.invalidate_cache(path)
    return fs, path


def resolve_object(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of one object, taking ``url`` literally: unlike ``resolve`` it never
    parses an fsspec chain (``a::b``), so a ``::`` in a file name stays part of the name."""
    protocol, _ = split_protocol(url)
    fs = fsspec.filesystem(protocol or "file")
    return fs, fs._strip_protocol(url)


def join(root: str, *parts: str) -> str:
    """Join path components below ``root`` keeping any ``proto://`` prefix intact."""
    return posixpath.join(root.rstrip("/"), *(p.strip("/") for p in parts if p))


def is_local(url: str) -> bool:
    """True when ``url`` names the local filesystem (where rename is atomic)."""
    fs, _ = resolve(url)
    return "file" in _protocols(fs) or "local" in _protocols(fs)


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def with_protocol(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Turn a path returned by ``fs.ls``/``fs.find`` back into a URL another process can open."""
    proto = _protocols(fs)[0]
    if proto in ("file", "local"):
        return path
    return f"{proto}://{path.lstrip('/')}" if proto != "memory" else f"memory://{path.lstrip('/')}"


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: the store was busy or the network failed, not a missing object,
    a denied request or bad data."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    if getattr(exc, "code", None) in _TRANSIENT_HTTP:  # gcsfs HttpError and the like
        return True
    botocore = sys.modules.get("botocore.exceptions")  # only loaded when an S3 store is in use
    return botocore is not None and isinstance(exc, (botocore.HTTPClientError, botocore.ConnectionError))


class StoreUnavailableError(UserError, OSError):
    """The store kept failing (throttled, timing out, unreachable) through every retry: nothing is lost,
    and the same command resumes once it answers again."""


def retry(fn: Callable[[], T], *, attempts: int = 5, base_delay: float = 0.5, max_delay: float = 8.0) -> T:
    """Call ``fn``, retrying transient errors with exponential backoff (capped at ``max_delay``).

    ``fn`` must be safe to repeat: every catalog write is a whole-object put of the same bytes. A
    transient error that outlasts the retries becomes `StoreUnavailableError`.
    """
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as e:
            if not is_transient(e):
                raise
            if attempt == attempts - 1:
                raise StoreUnavailableError(f"the store still failed after {attempts} attempts "
                                            f"({type(e).__name__}: {e}); rerun the same command to resume") from e
            time.sleep(min(max_delay, base_delay * 2**attempt))
    raise AssertionError("unreachable")


def read_bytes(url: str) -> bytes:
    """Read a whole object, retrying transient errors."""
    fs, path = resolve(url)
    return retry(lambda: fs.cat_file(path))


def read_stream(url: str, consume: Callable[[BinaryIO], T]) -> T:
    """``consume`` an object read in pieces from an open file (again after a transient store error):
    for objects too large to hold twice, where `read_bytes` and a parse would."""
    fs, path = resolve(url)

    def once() -> T:
        with fs.open(path, "rb") as f:
            return consume(f)

    return retry(once)


class StorageFullError(UserError, OSError):
    """The disk (or quota) is full: what was committed before stays, and the same command resumes once
    there is space."""


@contextlib.contextmanager
def _local_write(url: str) -> Iterator[None]:
    """Turn a full disk or quota into `StorageFullError` (one line for the user, whatever wrote)."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFullError(f"no space left to write {url} ({os.strerror(e.errno)}): free some space and "
                                   "rerun the same command to resume") from None
        raise


#: Writes one object's bytes to a binary file object, in as many pieces as it likes.
Produce = Callable[[BinaryIO], object]


class HashingWriter:
    """A binary sink that counts and hashes what passes through it to ``target`` (None: hash only)."""

    def __init__(self, target: BinaryIO | None = None) -> None:
        self.target, self.size, self._sha = target, 0, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self._sha.update(data)
        self.size += len(data)
        if self.target is not None:
            self.target.write(data)
        return len(data)

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()


class HashingReader:
    """Reads ``source`` and hashes what was read, so an object read in pieces is checked without a copy."""

    def __init__(self, source: BinaryIO) -> None:
        self.source, self._sha = source, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.source.read(n)
        self._sha.update(data)
        return data

    def sha256_of_all(self) -> str:
        """The sha256 of the whole object: what is left is read (and hashed) first."""
        rest = self.source.read(1 << 20)
        while rest:
            self._sha.update(rest)
            rest = self.source.read(1 << 20)
        return self._sha.hexdigest()


def _write_beside(path: str, produce: Produce) -> str:
    """Write what ``produce`` gives to a new temporary file beside ``path`` (same folder: renames and
    links stay atomic)."""
    os.makedirs(posixpath.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{time.time_ns()}"
    try:
        with open(tmp, "wb") as f:
            produce(f)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp


def _replace_local(url: str, path: str, produce: Produce) -> None:
    with _local_write(url):
        tmp = _write_beside(path, produce)
        try:
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write an object so no reader ever sees it half-written.

    Local files are written beside the target and renamed (atomic on POSIX). Object stores make an
    object visible only when its upload completes, so a single put is already atomic there.
    """
    fs, path = resolve(url)
    if is_local(url):
        _replace_local(url, path, lambda f: f.write(data))
    else:
        retry(lambda: fs.pipe_file(path, data))


def write_stream_atomic(url: str, produce: Produce) -> tuple[int, str]:
    """`write_bytes_atomic` for an object too large to hold a second copy of (a faiss index): ``produce``
    writes it in pieces to a file beside the target, renamed when whole; for an object store, to a local
    temporary file then uploaded whole (a stream cut halfway would still commit its first part: fsspec
    files close on errors). Returns the object's size and sha256."""
    fs, path = resolve(url)
    hashing = HashingWriter()

    def into(f: BinaryIO) -> None:
        hashing.target = f
        produce(hashing)

    if is_local(url):
        _replace_local(url, path, into)
    else:
        with tempfile.TemporaryDirectory(prefix="curate-upload-") as tmp:
            local = os.path.join(tmp, posixpath.basename(path))
            _replace_local(local, local, into)
            retry(lambda: fs.put_file(local, path))
    return hashing.size, hashing.sha256


# Stores whose create-if-absent is atomic: a link on local disks, ``xb`` in memory, and S3's
# conditional put (``If-None-Match: *``, which s3fs sends for ``pipe_file(mode="create")``).
ATOMIC_CREATE = frozenset({"file", "local", "memory", "s3", "s3a"})


def create_is_atomic(url: str) -> bool:
    fs, _ = resolve(url)
    return bool(set(_protocols(fs)) & ATOMIC_CREATE)


def create_exclusive(url: str, data: bytes) -> bool:
    """Create the object with ``data`` only if there is none: True if this call created it.

    Atomic on the stores of ``ATOMIC_CREATE``; elsewhere fsspec checks and then writes, so two callers
    can both succeed and must read back to see who won. A conditional put retried after a lost reply
    reports False for an object it did create: callers read it back either way.
    """
    fs, path = resolve(url)
    if is_local(url):
        with _local_write(url):
            tmp = _write_beside(path, lambda f: f.write(data))
            try:
                os.link(tmp, path)  # fails if the name exists; the file appears complete or not at all
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        return True
    try:
        retry(lambda: fs.pipe_file(path, data, mode="create"))
    except FileExistsError:
        return False
    return True


def exists(url: str) -> bool:
    """Whether an object exists now (not per a listing cached before another process wrote it)."""
    fs, path = resolve(url, fresh=True)
    return retry(lambda: fs.exists(path))


def ls(url: str) -> list[str]:
    """URLs of what is directly under ``url``, sorted, listed fresh; empty if there is nothing."""
    fs, path = resolve(url, fresh=True)
    try:
        names = retry(lambda: fs.ls(path, detail=False))
    except FileNotFoundError:
        return []
    return sorted(with_protocol(fs, p) for p in names if p.rstrip("/") != path.rstrip("/"))
