"""2-process FSDP2 training on CPU (gloo, torchrun): checkpoints, and exact resume after a SIGKILL."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import kill_command_when
from tests.train_helpers import TINY, run_torchrun, torchrun_command, torchrun_env
from training.train.run_state import TEACHER_FILE, read_metrics

LOSS_KEYS = ("total", "dino_local", "dino_global", "koleo", "ibot")


@pytest.mark.slow
def test_fsdp_run_resumes_exactly_after_sigkill(fsdp_pretrain, tmp_path):
    catalog, full, steps, overrides = fsdp_pretrain
    reference = read_metrics(full)
    assert [m["step"] for m in reference] == list(range(steps))
    assert sorted(p.name for p in (full / "ckpt").iterdir()) == ["00000006", "00000008"]  # keep_last=2
    assert {p.name for p in (full / "ckpt" / "00000008").iterdir()} >= {"rank0.pt", "rank1.pt"}

    killed = tmp_path / "killed"
    command = torchrun_command(TINY, catalog, killed, *overrides)
    kill_command_when(command, torchrun_env(), lambda: (killed / "ckpt" / "00000003").is_dir())
    before = read_metrics(killed)
    assert len(before) < steps and not (killed / TEACHER_FILE).exists()

    run_torchrun(command)
    resumed = read_metrics(killed)
    assert [m["step"] for m in resumed] == list(range(steps))
    for ours, theirs in zip(resumed, reference):
        assert [ours[k] for k in LOSS_KEYS] == [theirs[k] for k in LOSS_KEYS], ours["step"]
    exported, expected = load_file(killed / TEACHER_FILE), load_file(full / TEACHER_FILE)
    assert exported.keys() == expected.keys()
    assert all(torch.equal(exported[k], expected[k]) for k in expected)
