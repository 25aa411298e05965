"""The later DINOv3 stages: Gram anchoring (gradient, high-res teacher path), and a 2-process CPU chain
FSDP2 pretrain -> gram (SIGKILL + exact resume: same losses, same exported teacher) -> highres -> distill
with two students. The chain is also the suite's FSDP kill-and-resume test (each torchrun costs ~10 s)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from pipelines.demo.concepts import dense_probe_set
from tests.helpers import kill_command_when
from tests.train_helpers import CONFIGS, run_torchrun, torchrun_command, torchrun_env
from training.data.masking import collate
from training.data.mixing import choose_option
from training.models import load_backbone
from training.train.config import GramConfig, ScheduleConfig, load_train_config
from training.train.dense_probe import linear_dense_probe
from training.train.meta_arch import GramTerm, build_student_teacher, ssl_losses
from training.train.run_state import EVALS_FILE, TEACHER_FILE, read_metrics
from training.train.stages import (
    copy_backbone,
    gram_refresh_due,
    gram_updates_done,
    gram_weight,
)


def _batch(n_images: int, size: int, gram_size: int | None, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n_images):
        sample = {"global_crops": torch.randn(2, 3, size, size, generator=gen),
                  "local_crops": torch.randn(2, 3, 16, 16, generator=gen)}
        if gram_size is not None:
            sample["gram_teacher_crops"] = torch.randn(2, 3, gram_size, gram_size, generator=gen)
        samples.append(sample)
    batch = collate(samples, patch_size=16, rng=np.random.default_rng(seed))
    batch["image_ids"] = torch.arange(n_images)
    return batch


def _tiny_models():
    config = load_train_config(str(CONFIGS / "tiny_cpu_gram.yaml"))
    student, teacher = build_student_teacher(config.model, 0)
    gram_teacher = copy.deepcopy(teacher.backbone)
    with torch.no_grad():  # a Gram teacher that differs from the student, so the loss is non-trivial
        for p in gram_teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    gram_teacher.requires_grad_(False).eval()
    return config, student, teacher, gram_teacher


def test_gram_stage_gradient_reaches_only_the_student():
    config, student, teacher, gram_teacher = _tiny_models()
    before = {k: v.clone() for k, v in gram_teacher.state_dict().items()}
    batch = _batch(4, 32, 64)
    term = GramTerm(gram_teacher, 2.0, config.gram)
    losses = ssl_losses(student, teacher, batch, 0.05, config.loss, False, gram=term)
    assert losses.gram.item() > 0
    losses.gram.backward()
    assert all(p.grad is None for p in gram_teacher.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.backbone.parameters())
    after = gram_teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_high_res_gram_teacher_runs_at_2x_and_is_resampled_bicubically():
    config, student, teacher, gram_teacher = _tiny_models()
    student.eval()  # no RoPE/drop-path draws: both forwards below must see the same function
    batch = _batch(2, 32, 64)
    term = GramTerm(gram_teacher, 1.0, config.gram)
    ours = ssl_losses(student, teacher, batch, 0.05, config.loss, False, gram=term).gram

    # Independent computation: teacher on the 64 px crops (4x4 grid) -> bicubic to the 2x2 student grid.
    with torch.no_grad():
        t = gram_teacher(batch["gram_teacher_crops"])["patches"]
        t = F.interpolate(t.reshape(-1, 4, 4, t.shape[-1]).permute(0, 3, 1, 2), size=(2, 2), mode="bicubic",
                          align_corners=False).flatten(2).transpose(1, 2)
        s = student.backbone(batch["global_crops"], batch["masks"])["patches"]
    s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    expected = ((s @ s.transpose(1, 2) - t @ t.transpose(1, 2)) ** 2).mean()
    assert torch.allclose(ours, expected, rtol=1e-4, atol=1e-6)

    # Without the high-res crops the teacher sees the global crops themselves: a different value.
    low = {k: v for k, v in batch.items() if k != "gram_teacher_crops"}
    assert not torch.allclose(ssl_losses(student, teacher, low, 0.05, config.loss, False, gram=term).gram, ours)


def test_gram_schedule_and_refresh_rule():
    # The reference's continuation form: 0 through a 10-iteration warmup, then a 3-point half-cosine 0 -> 2.
    gram = GramConfig(weight=ScheduleConfig("cosine", 0.0, 0.0, 2.0, 10, cosine_iterations=3),
                      update_period=5, first_update=15, max_updates=2)
    assert [gram_weight(gram, i, 100) for i in (0, 9, 10, 11, 12, 50)] == pytest.approx([0.0, 0.0, 0.0, 1.0, 2.0, 2.0])
    due = [i for i in range(60) if gram_refresh_due(gram, i)]
    assert due == [14, 19]  # after iterations 15 and 20 completed, then max_updates reached
    assert [gram_updates_done(gram, n) for n in (14, 15, 19, 20, 100)] == [0, 1, 1, 2, 2]


def test_copy_backbone_refreshes_the_gram_teacher():
    _, student, teacher, gram_teacher = _tiny_models()
    copy_backbone(gram_teacher, teacher.backbone)
    ref = teacher.backbone.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in gram_teacher.state_dict().items())


def test_option_choice_is_a_pure_function_with_the_configured_frequencies():
    probabilities = [0.3, 0.6, 0.1]
    draws = [choose_option(3, s, probabilities) for s in range(3000)]
    assert draws == [choose_option(3, s, probabilities) for s in range(3000)]
    assert [abs(draws.count(i) / 3000 - p) < 0.03 for i, p in enumerate(probabilities)] == [True] * 3


# --- 2-process chain -------------------------------------------------------------------------------

STEPS = 4
LOSS_KEYS = ("total", "dino_local", "dino_global", "koleo", "ibot", "gram")


def _command(config: str, catalog: str, out: Path, *extra: str) -> list[str]:
    return torchrun_command(str(CONFIGS / config), catalog, out, f"optim.iterations={STEPS}", "checkpoint.period=2",
                            *extra)


@pytest.mark.slow
def test_two_process_stage_chain_with_gram_resume_and_shared_distillation_teacher(fsdp_pretrain, tmp_path):
    catalog, pre, steps = fsdp_pretrain  # a 2-process tiny pretraining
    assert [m["step"] for m in read_metrics(pre)] == list(range(steps))
    assert sorted(p.name for p in (pre / "ckpt").iterdir()) == ["00000006", "00000008"]  # keep_last=2
    assert {p.name for p in (pre / "ckpt" / "00000008").iterdir()} >= {"rank0.pt", "rank1.pt"}  # one shard per rank
    gram_ref, gram, highres, distill = (tmp_path / n for n in ("gram_ref", "gram", "highres", "distill"))
    images, masks = dense_probe_set(8, 64, seed=0)
    np.savez_compressed(tmp_path / "probe.npz", images=images, masks=masks)
    probe = f"eval.dense_probe={tmp_path / 'probe.npz'}"

    # Gram stage from the pretrain checkpoint; gram.update_period=2 so the refresh happens inside the run.
    # The dense probe runs on the FSDP-sharded EMA teacher at each checkpoint (both ranks, collectively).
    gram_args = (f"init.checkpoint={pre}", "gram.update_period=2", "gram.first_update=2", probe)
    run_torchrun(_command("tiny_cpu_gram.yaml", catalog, gram_ref, *gram_args))
    reference = read_metrics(gram_ref)
    assert [m["gram_teacher_input"] for m in reference] == [[64, 64]] * STEPS  # 2x crops for 32 px students
    assert [m["gram_weight"] for m in reference] == [0.0, 1.0, 2.0, 2.0]
    assert [bool(m.get("gram_teacher_refreshed")) for m in reference] == [False, True, False, True]

    kill_command_when(_command("tiny_cpu_gram.yaml", catalog, gram, *gram_args), torchrun_env(),
                      lambda: (gram / "ckpt" / "00000002").is_dir())
    assert not (gram / TEACHER_FILE).exists()
    run_torchrun(_command("tiny_cpu_gram.yaml", catalog, gram, *gram_args))
    resumed = read_metrics(gram)
    assert [m["step"] for m in resumed] == list(range(STEPS))
    for ours, theirs in zip(resumed, reference):
        assert [ours[k] for k in LOSS_KEYS] == [theirs[k] for k in LOSS_KEYS], ours["step"]
    exported, expected = load_file(gram / TEACHER_FILE), load_file(gram_ref / TEACHER_FILE)
    assert exported.keys() == expected.keys() and all(torch.equal(exported[k], expected[k]) for k in expected)
    reference_evals = read_metrics(gram_ref, EVALS_FILE)
    assert [e["step"] for e in reference_evals] == [2, 4] and all(0 < e["dense_miou"] <= 1 for e in reference_evals)
    assert read_metrics(gram, EVALS_FILE) == reference_evals
    half = len(images) // 2
    direct = linear_dense_probe(load_backbone(f"curate:{gram / TEACHER_FILE}", None)[0], images[:half], masks[:half],
                                images[half:], masks[half:], patch_size=16)
    assert reference_evals[-1]["dense_miou"] == pytest.approx(direct["miou"], abs=1e-6)

    # High-res stage: student and teacher from the Gram stage's EMA teacher; mixed sizes per step.
    run_torchrun(_command("tiny_cpu_highres.yaml", catalog, highres, f"init.checkpoint={gram}"))
    hr = read_metrics(highres)
    assert len(hr) == STEPS and all(m["gram"] > 0 and m["dino_local_weight"] == 0.5 for m in hr)
    resolutions = load_train_config(str(CONFIGS / "tiny_cpu_highres.yaml")).highres.resolutions
    expected = [resolutions[choose_option(0, s, [r.probability for r in resolutions])] for s in range(STEPS)]
    assert [m["resolution"] for m in hr] == [[r.global_size, r.local_size, r.gram_size] for r in expected]

    # Distillation of two students (one rank each) from the high-res teacher: one teacher pass per step.
    run_torchrun(_command("tiny_cpu_distill.yaml", catalog, distill, f"distill.teacher_checkpoint={highres}", probe))
    dm = read_metrics(distill)
    distill_evals = read_metrics(distill, EVALS_FILE)
    assert [e["step"] for e in distill_evals] == [2, 4]
    assert all(0 < e[f"{name}/dense_miou"] <= 1 for e in distill_evals for name in ("small", "swiglu"))
    global_batch = 2 * 4
    assert [m["teacher_forward_calls"] for m in dm] == [2] * STEPS  # one call per rank, not per student
    assert [m["teacher_forward_crops"] for m in dm] == [2 * global_batch] * STEPS  # 2 global crops per image
    for name in ("small", "swiglu"):
        assert (distill / "students" / name / TEACHER_FILE).is_file()
        assert all(m[f"{name}/total"] > 0 for m in dm)
    assert dm[0]["small/total"] != dm[0]["swiglu/total"]
