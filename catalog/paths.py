"""One way to open a path: every catalog, pool and checkpoint location goes through fsspec.

Local paths, ``file://``, ``memory://``, ``s3://`` and ``gs://`` all resolve here, so the rest of the
code never branches on where data lives.
"""

from __future__ import annotations

import posixpath
import time
from collections.abc import Callable
from typing import TypeVar

import fsspec
from fsspec.core import url_to_fs

T = TypeVar("T")

# Errors an object store may raise transiently (throttling, a dropped connection); retried with backoff.
_TRANSIENT = (ConnectionError, TimeoutError)


def resolve(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the filesystem and the protocol-less path for ``url``."""
    fs, path = url_to_fs(url)
    return fs, path


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


def retry(fn: Callable[[], T], *, attempts: int = 5, base_delay: float = 0.2) -> T:
    """Call ``fn``, retrying transient I/O errors with exponential backoff."""
    for attempt in range(attempts):
        try:
            return fn()
        except _TRANSIENT:
            if attempt == attempts - 1:
                raise
            time.sleep(base_delay * 2**attempt)
    raise AssertionError("unreachable")


def read_bytes(url: str) -> bytes:
    """Read a whole object, retrying transient errors."""
    fs, path = resolve(url)
    return retry(lambda: fs.cat_file(path))


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write an object so no reader ever sees it half-written.

    Local files are written beside the target and renamed (atomic on POSIX). Object stores make an
    object visible only when its upload completes, so a single put is already atomic there.
    """
    fs, path = resolve(url)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    if is_local(url):
        tmp = f"{path}.tmp-{time.time_ns()}"
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    else:
        retry(lambda: fs.pipe_file(path, data))


def exists(url: str) -> bool:
    fs, path = resolve(url)
    return fs.exists(path)
