"""2-process FSDP2 training on CPU (gloo, torchrun): checkpoints, and exact resume after a SIGKILL."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import cli_env, kill_command_when
from tests.test_trainer import TINY, make_catalog
from training.train.run_state import TEACHER_FILE, read_metrics

STEPS = 8
LOSS_KEYS = ("total", "dino_local", "dino_global", "koleo", "ibot")


def _command(catalog: str, output_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "training.train", "--config", TINY, f"data.catalog_root={catalog}", f"output_dir={output_dir}",
        f"optim.iterations={STEPS}", "checkpoint.period=3", "checkpoint.keep_last=2", "dist_timeout_s=60",
    ]


def _env() -> dict[str, str]:
    env = cli_env()
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(catalog: str, output_dir: Path) -> None:
    done = subprocess.run(_command(catalog, output_dir), env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_fsdp_run_resumes_exactly_after_sigkill(tmp_path):
    catalog = make_catalog(tmp_path)
    full = tmp_path / "full"
    _run(catalog, full)
    reference = read_metrics(full)
    assert [m["step"] for m in reference] == list(range(STEPS))
    assert sorted(p.name for p in (full / "ckpt").iterdir()) == ["00000006", "00000008"]  # keep_last=2
    assert {p.name for p in (full / "ckpt" / "00000008").iterdir()} >= {"rank0.pt", "rank1.pt"}

    killed = tmp_path / "killed"
    kill_command_when(_command(catalog, killed), _env(), lambda: (killed / "ckpt" / "00000003").is_dir())
    before = read_metrics(killed)
    assert len(before) < STEPS and not (killed / TEACHER_FILE).exists()

    _run(catalog, killed)
    resumed = read_metrics(killed)
    assert [m["step"] for m in resumed] == list(range(STEPS))
    for ours, theirs in zip(resumed, reference):
        assert [ours[k] for k in LOSS_KEYS] == [theirs[k] for k in LOSS_KEYS], ours["step"]
    exported, expected = load_file(killed / TEACHER_FILE), load_file(full / TEACHER_FILE)
    assert exported.keys() == expected.keys()
    assert all(torch.equal(exported[k], expected[k]) for k in expected)
