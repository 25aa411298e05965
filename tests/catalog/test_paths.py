import errno
import hashlib
import os

import fsspec
import pytest

from catalog.paths import (
    HashingReader,
    StoreUnavailableError,
    exists,
    is_transient,
    ls,
    read_bytes,
    read_stream,
    retry,
    write_bytes_atomic,
    write_stream_atomic,
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


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_an_object_written_in_pieces_is_whole_or_absent_and_hashed_as_written(kind, tmp_path):
    root = str(tmp_path / "root") if kind == "local" else f"memory://stream-test-{tmp_path.name}"
    url = f"{root}/deep/obj.bin"
    pieces = [bytes([i]) * (1000 + i) for i in range(50)]
    whole = b"".join(pieces)

    def produce(f) -> None:
        for piece in pieces:
            f.write(piece)

    assert write_stream_atomic(url, produce) == (len(whole), hashlib.sha256(whole).hexdigest())
    assert read_bytes(url) == whole and ls(f"{root}/deep") == [url]  # no temporary file left beside it

    def fails_halfway(f) -> None:
        f.write(pieces[0])
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_stream_atomic(url, fails_halfway)
    assert read_bytes(url) == whole and ls(f"{root}/deep") == [url]  # the earlier object stands, whole

    def first_piece_then_the_hash_of_all(f) -> tuple[bytes, str]:
        reader = HashingReader(f)
        return reader.read(len(pieces[0])), reader.sha256_of_all()

    assert read_stream(url, first_piece_then_the_hash_of_all) == (pieces[0], hashlib.sha256(whole).hexdigest())
    if kind == "memory":
        fsspec.filesystem("memory").rm(root.split("://", 1)[1], recursive=True)
