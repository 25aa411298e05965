"""A disk that fills mid-write: the user sees one clear line (not a worker's traceback), what was
committed stays readable, no temporary file is left behind, and once there is space the same command
resumes to exactly the tables of an uninterrupted run.

The full disk is a small tmpfs mounted for the test, which needs root (this suite's CI runs as root);
without it the test fails saying so, never skips.
"""

from __future__ import annotations

import glob
import os
import subprocess

import pytest

from catalog.ledger import Ledger
from catalog.sql import query
from tests.helpers import run_cli

POOL_COLUMNS = "image_id, uri, bytes, width, height, format, sha256, status"


def _tmpfs(mount: str, size: int, *, remount: bool = False) -> None:
    if os.geteuid() != 0:
        pytest.fail("the disk-full test mounts a small tmpfs and must run as root")
    options = f"{'remount,' if remount else ''}size={size}"
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", mount], check=True)


def _used_bytes(root: str) -> int:
    """What the catalog takes on a tmpfs: whole pages per file."""
    sizes = (os.path.getsize(p) for p in glob.glob(os.path.join(root, "**", "*"), recursive=True) if os.path.isfile(p))
    return sum(-(-s // 4096) * 4096 for s in sizes)


@pytest.fixture()
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    yield str(mount)
    subprocess.run(["umount", str(mount)], check=False, stderr=subprocess.DEVNULL)  # not mounted if it failed early


@pytest.mark.parametrize("executor", ["local", pytest.param("ray", marks=pytest.mark.slow)])
def test_full_disk_is_one_line_and_resumes_exactly(fault_source, small_disk, tmp_path, executor):
    args = ["ingest", fault_source, "--set", "files_per_unit=20", "--executor", executor]
    reference = str(tmp_path / "reference")  # both executors write the same tables: the quicker one
    assert run_cli([*args[:-1], "local", "--catalog", reference]).returncode == 0
    _tmpfs(small_disk, _used_bytes(reference) // 2)
    root = os.path.join(small_disk, "cat")
    full = run_cli([*args, "--catalog", root])
    assert full.returncode == 2, full.stderr
    lines = [line for line in full.stderr.splitlines() if line.strip()]
    assert "Traceback" not in full.stderr and len([x for x in lines if "no space left" in x]) == 1, full.stderr
    assert "rerun the same command" in full.stderr
    done = len(Ledger(root, "ingest").done())
    assert 0 < done < 8  # it stopped part-way, with some units committed
    assert not glob.glob(os.path.join(root, "**", "*.tmp-*"), recursive=True)
    assert len(query(root, "SELECT * FROM pool")) == 20 * done  # what was committed reads back whole

    _tmpfs(small_disk, 64 * 2**20, remount=True)
    resumed = run_cli([*args, "--catalog", root])
    assert resumed.returncode == 0, resumed.stderr
    for sql in (f"SELECT {POOL_COLUMNS} FROM pool ORDER BY image_id",
                "SELECT image_id, uri, reason FROM errors ORDER BY image_id"):
        assert query(root, sql).to_pylist() == query(reference, sql).to_pylist()
