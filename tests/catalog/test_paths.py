import errno
import os

import fsspec
import pytest

from catalog.paths import (
    StoreUnavailableError,
    exists,
    is_transient,
    ls,
    read_bytes,
    retry,
    write_bytes_atomic,
)


class Flaky:
    """Fails with ``error`` the first ``failures`` calls, then returns ``value``; counts its calls."""

    def __init__(self, error: BaseException, failures: int, value: str = "ok"):
        self.error, self.failures, self.value, self.calls = error, failures, value, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return self.value


def test_retry_recovers_from_transient_errors():
    fn = Flaky(ConnectionError("connection reset by peer"), failures=2)
    assert retry(fn, attempts=5, base_delay=0.001) == "ok" and fn.calls == 3


def test_retry_treats_store_throttling_as_transient():
    # s3fs turns SlowDown / 503 into OSError(EBUSY), a 500 into OSError(EREMOTEIO)
    for error in (OSError(errno.EBUSY, "SlowDown"), OSError(errno.EREMOTEIO, "InternalError"), TimeoutError()):
        fn = Flaky(error, failures=1)
        assert retry(fn, attempts=3, base_delay=0.001) == "ok" and fn.calls == 2


def test_retry_gives_up_after_the_last_attempt_with_one_clear_error():
    fn = Flaky(ConnectionError("down"), failures=10**6)
    with pytest.raises(StoreUnavailableError, match="after 4 attempts .*rerun the same command") as e:
        retry(fn, attempts=4, base_delay=0.001)
    assert fn.calls == 4 and isinstance(e.value.__cause__, ConnectionError)


@pytest.mark.parametrize("error", [FileNotFoundError("gone"), PermissionError("denied"), ValueError("bad data"),
                                   OSError(errno.EINVAL, "invalid argument")])
def test_retry_does_not_repeat_permanent_errors(error):
    fn = Flaky(error, failures=1)
    with pytest.raises(type(error)):
        retry(fn, attempts=5, base_delay=0.001)
    assert fn.calls == 1


def test_is_transient_reads_http_status_codes():
    class HttpError(Exception):
        def __init__(self, code: int):
            super().__init__(code)
            self.code = code

    assert is_transient(HttpError(429)) and is_transient(HttpError(503))
    assert not is_transient(HttpError(404)) and not is_transient(HttpError(403))


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_write_bytes_atomic_commits_whole_objects(kind, tmp_path):
    root = str(tmp_path / "root") if kind == "local" else f"memory://paths-test-{tmp_path.name}"
    url = f"{root}/deep/er/obj.bin"
    write_bytes_atomic(url, b"first")
    assert read_bytes(url) == b"first" and exists(url)
    write_bytes_atomic(url, b"second, longer")
    assert read_bytes(url) == b"second, longer"
    # nothing but the object itself is left beside it (no temporary files)
    assert ls(f"{root}/deep/er") == [url]
    assert not exists(f"{root}/deep/er/other.bin") and ls(f"{root}/missing") == []
    if kind == "local":
        assert open(url, "rb").read() == b"second, longer" and sorted(os.listdir(tmp_path / "root" / "deep" / "er")) == ["obj.bin"]
    else:
        fs = fsspec.filesystem("memory")
        assert fs.cat_file(url.split("://", 1)[1]) == b"second, longer"
        fs.rm(root.split("://", 1)[1], recursive=True)
