"""The SSL trainer, single process: a tiny real run on a JPEG catalog, optimiser groups, schedules, NaN guard."""

from __future__ import annotations

import copy
import hashlib
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from catalog.config import to_dict
from catalog.manifest import list_manifests
from tests.helpers import free_ports
from tests.train_helpers import CONFIGS, PARTS, TINY, make_catalog
from training.data.masking import collate
from training.models import MODEL_SIZES, load_backbone
from training.train.config import (
    LossConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    load_train_config,
)
from training.train.data import build_loader
from training.train.distributed import DistInfo, prepare_model
from training.train.export import export_from_checkpoint
from training.train.knn_eval import knn_accuracy, knn_predict
from training.train.loop import TrainingDiverged, train
from training.train.meta_arch import build_student_teacher, ssl_losses
from training.train.optim import apply_hyper_params, build_optimizer, param_groups
from training.train.run_state import TEACHER_FILE, read_metrics, step_generator
from training.train.schedules import Schedules, lr_scale, schedule_value


def tiny_config(catalog: str, output_dir: Path, *overrides: str) -> TrainConfig:
    return load_train_config(TINY, [f"data.catalog_root={catalog}", f"output_dir={output_dir}", *overrides])


def _checkpoint_models(config: TrainConfig, path: Path) -> tuple[dict, dict]:
    student, teacher = build_student_teacher(config.model, config.seed)
    state = {"student": student.state_dict(), "teacher": teacher.state_dict()}
    dcp.load(state, checkpoint_id=str(path))
    return state["student"], state["teacher"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    catalog = make_catalog(root)
    config = tiny_config(catalog, root / "run", "optim.iterations=4", "checkpoint.period=1", "checkpoint.keep_last=10")
    result = train(config)
    return config, result


def test_tiny_run_trains_and_teacher_is_the_exact_ema(tiny_run):
    config, result = tiny_run
    assert result.steps_done == 4 and result.resumed_from == 0
    metrics = read_metrics(result.output_dir)
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    assert all(math.isfinite(m[k]) for m in metrics for k in ("total", "dino_local", "dino_global", "koleo", "ibot"))
    assert metrics[-1]["total"] < metrics[0]["total"]
    assert metrics[-1]["images_seen"] == 4 * config.optim.batch_size_per_rank

    init_student, _ = build_student_teacher(config.model, config.seed)
    init = init_student.state_dict()
    ckpts = [Path(result.output_dir) / "ckpt" / f"{s:08d}" for s in range(1, 5)]
    states = [_checkpoint_models(config, c) for c in ckpts]
    student, teacher = states[-1]
    assert not torch.equal(student["backbone.blocks.0.attn.qkv.weight"], init["backbone.blocks.0.attn.qkv.weight"])
    assert not torch.equal(student["backbone.blocks.0.attn.qkv.weight"], teacher["backbone.blocks.0.attn.qkv.weight"])

    # The DINO head's last layer is frozen (lr 0) for the first iteration, then trains.
    key = "dino_head.last_layer.weight"
    assert torch.equal(states[0][0][key], init[key]) and not torch.equal(states[1][0][key], init[key])

    # One EMA update by hand: teacher_3 = m * teacher_2 + (1 - m) * student_3.
    m = config.optim.momentum.peak
    (_, teacher_2), (student_3, teacher_3) = states[1], states[2]
    for name, value in teacher_3.items():
        if value.is_floating_point() and "periods" not in name and "bias_mask" not in name:
            expected = teacher_2[name] * m + student_3[name] * (1 - m)
            torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7, msg=name)


def test_export_is_readable_by_embed_and_equals_the_teacher(tiny_run, tmp_path):
    config, result = tiny_run
    model, info = load_backbone(f"curate:{result.teacher_path}", None)
    _, teacher = _checkpoint_models(config, Path(result.output_dir) / "ckpt" / "00000004")
    for name, value in model.state_dict().items():
        assert torch.equal(value, teacher["backbone." + name]), name
    assert info.config.embed_dim == MODEL_SIZES["vit_test"].embed_dim
    again = export_from_checkpoint(f"{result.output_dir}/ckpt/00000004", config, str(tmp_path / "t.safetensors"))
    assert again == info.sha256


def test_param_groups_follow_the_recipe():
    optim = OptimConfig(layerwise_decay=0.9, patch_embed_lr_mult=0.2, freeze_last_layer_iterations=3)
    student, _ = build_student_teacher(tiny_config("x", Path("y")).model, seed=0)
    depth = MODEL_SIZES["vit_test"].depth
    rules = {}
    for group in param_groups(student, depth, optim):
        for name in group["names"]:
            rules[name] = (group["lr_mult"], group["wd_mult"], group["is_last_layer"])
    assert set(rules) == {n for n, _ in student.named_parameters()}
    for name, (lr_mult, wd_mult, last) in rules.items():
        short = name.split(".", 1)[1]
        no_wd = short.endswith("bias") or "norm" in short or "gamma" in short
        assert wd_mult == (0.0 if no_wd else 1.0), name
        assert last == name.endswith("last_layer.weight"), name
        if not name.startswith("backbone."):
            assert lr_mult == 1.0, name
    assert rules["backbone.cls_token"] == (pytest.approx(0.9**3), 1.0, False)
    assert rules["backbone.storage_tokens"][1] == 1.0 and rules["backbone.mask_token"][1] == 1.0
    assert rules["backbone.patch_embed.proj.weight"] == (pytest.approx(0.9**3 * 0.2), 1.0, False)
    assert rules["backbone.patch_embed.proj.bias"][:2] == (pytest.approx(0.9**3 * 0.2), 0.0)
    assert rules["backbone.blocks.0.attn.qkv.weight"][0] == pytest.approx(0.9**2)
    assert rules["backbone.blocks.1.mlp.fc1.weight"][0] == pytest.approx(0.9)
    assert rules["backbone.blocks.1.ls1.gamma"][1] == 0.0
    assert rules["backbone.norm.weight"][:2] == (1.0, 0.0)

    opt = build_optimizer(student, depth, optim, torch.device("cpu"))
    schedules = Schedules(optim, global_batch_size=1024)
    for iteration, frozen in ((0, True), (2, True), (3, False)):
        hp = schedules.at(iteration)
        apply_hyper_params(opt, hp)
        for group in opt.param_groups:
            base = 0.0 if (group["is_last_layer"] and frozen) else hp.lr
            assert group["lr"] == pytest.approx(base * group["lr_mult"])
            assert group["weight_decay"] == pytest.approx(hp.weight_decay * group["wd_mult"])
    assert opt.defaults["betas"] == (0.9, 0.99)


def _v2_schedule(
    start: float, peak: float, end: float, warmup: int, total: int, cosine: int | None = None
) -> np.ndarray:
    """DINOv3's v2 schedule from its formula: linear warmup without endpoint, cos(linspace(0, pi, C)), then end."""
    cosine = total - warmup if cosine is None else cosine
    ramp = (peak - end) * (np.cos(np.linspace(0, np.pi, cosine)) + 1) / 2 + end
    warm = np.linspace(start, peak, warmup, endpoint=False)
    return np.concatenate([warm, ramp, np.full(total - warmup - cosine, end)])


def test_cosine_schedule_reaches_its_end_value_exactly():
    # The example: peak 1e-3, end 1e-6, warmup 10, 50 iterations (the old progress stopped at 2.54e-6).
    lr = ScheduleConfig("cosine", 0.0, 1e-3, 1e-6, 10)
    ours = [schedule_value(lr, it, 50) for it in range(50)]
    assert ours[-1] == 1e-6 and schedule_value(lr, 500, 50) == 1e-6
    assert ours == pytest.approx(_v2_schedule(0.0, 1e-3, 1e-6, 10, 50), rel=1e-12, abs=1e-18)
    # A cosine part shorter than the run, then constant: the high-res lr shape (peak 0 -> end).
    ramp = ScheduleConfig("cosine", 0.0, 0.0, 2.0, 5, cosine_iterations=20)
    assert [schedule_value(ramp, it, 40) for it in range(40)] == pytest.approx(_v2_schedule(0.0, 0.0, 2.0, 5, 40, 20))
    assert schedule_value(ramp, 24, 40) == 2.0 and schedule_value(ramp, 4, 40) == 0.0
    warm = ScheduleConfig("constant", 0.04, 0.07, 0.07, 30)
    assert [schedule_value(warm, it, 100) for it in range(30)] == pytest.approx(np.linspace(0.04, 0.07, 30, endpoint=False))
    assert [schedule_value(warm, it, 100) for it in (30, 99, 500)] == pytest.approx([0.07] * 3)


def test_dinov2_cosine_scheduler():
    # DINOv2's CosineScheduler: warmup linspace with its endpoint, cosine progress j / len, end past the schedule.
    sched = ScheduleConfig("dinov2_cosine", 0.0, 1e-3, 1e-6, 10)
    cos_part = 1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + np.cos(np.pi * np.arange(40) / 40))
    expected = np.concatenate([np.linspace(0.0, 1e-3, 10), cos_part])
    assert [schedule_value(sched, it, 50) for it in range(50)] == pytest.approx(expected, rel=1e-12)
    assert schedule_value(sched, 49, 50) > 1e-6 and schedule_value(sched, 50, 50) == 1e-6
    # Its teacher temperature: total = warmup, i.e. a warmup to 0.07 (reached on its last step), then constant.
    temp = ScheduleConfig("dinov2_cosine", 0.04, 0.07, 0.07, 30, cosine_iterations=0)
    assert [schedule_value(temp, it, 100) for it in (0, 29, 30, 99)] == pytest.approx([0.04, 0.07, 0.07, 0.07])
    # v1 scales the lr, not min_lr; v2 scales both.
    optim = OptimConfig(lr=sched)
    assert Schedules(optim, 4096).lr.peak == pytest.approx(8e-3) and Schedules(optim, 4096).lr.end == 1e-6
    assert Schedules(OptimConfig(lr=ScheduleConfig("cosine", 0.0, 1e-3, 1e-6, 10)), 4096).lr.end == pytest.approx(8e-6)


def test_schedule_values():
    assert lr_scale("sqrt_wrt_1024", 1024) == 4.0 and lr_scale("sqrt_wrt_1024", 4096) == 8.0
    assert lr_scale("linear_wrt_256", 512) == 2.0 and lr_scale("none", 7) == 1.0
    optim = OptimConfig(iterations=1000, freeze_last_layer_iterations=5)
    hp = Schedules(optim, global_batch_size=4096).at(200_000)
    assert hp.lr == pytest.approx(4e-4) and hp.last_layer_lr == hp.lr  # the 7B recipe's 5e-5 x 8
    assert Schedules(optim, 4096).at(4).last_layer_lr == 0.0
    reweight = LossConfig(dino_local_weight=ScheduleConfig("cosine", 1.0, 1.0, 0.5, 0))  # 1 -> 0.5 over the run
    assert [Schedules(optim, 4096, reweight).at(it).dino_local_weight for it in (0, 500, 999)] == pytest.approx(
        [1.0, 0.75 + 0.25 * np.cos(np.pi * 500 / 999), 0.5])
    assert Schedules(optim, 4096).at(500).dino_local_weight == 1.0


def test_a_cosine_part_longer_than_the_run_is_refused(tmp_path):
    with pytest.raises(ValueError, match="optim.lr: warmup 2 \\+ cosine 10 iterations must fit in optim.iterations=8"):
        tiny_config("x", tmp_path, "optim.lr={kind: cosine, peak: 1.0e-3, end: 0.0, warmup_iterations: 2, "
                                   "cosine_iterations: 10}")


# A learning rate no weights survive: the loss is NaN/inf within a few steps, for real.
DIVERGE = ("optim.lr.peak=1.0e+30", "optim.lr.warmup_iterations=0", "optim.clip_grad=null",
           "optim.freeze_last_layer_iterations=0", "optim.iterations=20", "checkpoint.period=100", "nan_patience=2")
HEAD = "{n_prototypes: 128, bottleneck_dim: 32, hidden_dim: 64, n_layers: 3}"
ONE_STUDENT = f"distill.students=[{{name: small, ranks: 1, model: {{size: vit_test, dino_head: {HEAD}, ibot_head: {HEAD}}}}}]"


def _distill_config(catalog: str, teacher_run: str, output_dir: Path, *overrides: str) -> TrainConfig:
    """The tiny distillation recipe with one student, so one process is the whole world."""
    return load_train_config(str(CONFIGS / "tiny_cpu_distill.yaml"), [
        f"data.catalog_root={catalog}", f"output_dir={output_dir}", f"distill.teacher_checkpoint={teacher_run}",
        ONE_STUDENT, *overrides])


def _assert_stopped_on_divergence(run: Path, loss_key: str) -> None:
    metrics = read_metrics(run)
    assert len(metrics) < 20 and [m["skipped_optimizer_step"] for m in metrics[-2:]] == [True, True]
    assert not math.isfinite(metrics[-1][loss_key])
    [manifest] = list_manifests(str(run))
    assert manifest["status"].startswith("failed: TrainingDiverged")


def test_nan_guard_stops_the_run(tmp_path):
    catalog = make_catalog(tmp_path, per_part=4)
    config = tiny_config(catalog, tmp_path / "run", *DIVERGE)
    with pytest.raises(TrainingDiverged, match="NaN/inf on 2 consecutive steps"):
        train(config)
    _assert_stopped_on_divergence(tmp_path / "run", "total")


def test_distillation_stops_on_divergence_like_pretraining(tiny_run, tmp_path):
    config, teacher_run = tiny_run
    sane = train(_distill_config(config.data.catalog_root, teacher_run.output_dir, tmp_path / "sane",
                                 "optim.iterations=3", "checkpoint.period=3"))
    metrics = read_metrics(sane.output_dir)
    assert [m["skipped_optimizer_step"] for m in metrics] == [False, False, False]
    assert all(math.isfinite(m["small/total"]) for m in metrics) and metrics[-1]["images_seen"] == 12
    assert sane.teacher_path == f"{tmp_path / 'sane'}/students/small/{TEACHER_FILE}"

    diverging = _distill_config(config.data.catalog_root, teacher_run.output_dir, tmp_path / "run", *DIVERGE)
    with pytest.raises(TrainingDiverged, match="NaN/inf on 2 consecutive steps"):
        train(diverging)
    _assert_stopped_on_divergence(tmp_path / "run", "small/total")


def test_a_run_writes_a_manifest_of_its_config_inputs_and_images_drawn(tiny_run):
    config, result = tiny_run
    [manifest] = list_manifests(result.output_dir)
    assert manifest["stage"] == "train" and manifest["status"] == "ok" and manifest["wall_seconds"] > 0
    assert manifest["config"] == to_dict(config) and "git_commit" in manifest["code"]
    batch = config.optim.batch_size_per_rank
    assert manifest["rows"] == {"images_seen": 4 * batch, "images_this_run": 4 * batch, "skipped_optimizer_steps": 0}
    notes = manifest["notes"]
    assert notes["steps_done"] == 4 and notes["resumed_from"] == 0 and notes["teacher_path"] == result.teacher_path
    assert notes["teacher_sha256"] == hashlib.sha256(Path(result.teacher_path).read_bytes()).hexdigest()
    # The images drawn per part are the loader's: a fresh loader of the same config draws the same 4 steps.
    loader = build_loader(config, 0, 1, MODEL_SIZES["vit_test"].patch_size)
    drawn = Counter(part for _ in range(4) for part in loader.sampler.next_step().parts)
    assert notes["images_by_part"] == {part: drawn[part] for part in PARTS} and sum(drawn.values()) == 4 * batch
    assert notes["bad_images_replaced"] == {part: 0 for part in PARTS}
    catalog = Path(config.data.catalog_root)
    for part in PARTS:
        [shard] = (catalog / "curated" / part).glob("*.parquet")
        recorded = manifest["inputs"]["parts"][part]
        assert (recorded["table"], recorded["shards"], recorded["bytes"], recorded["images"]) == (
            f"curated/{part}", 1, shard.stat().st_size, 12)
    assert manifest["inputs"]["mix"] is None and manifest["inputs"]["plan"]["parts"] == list(PARTS)


def test_knn_accuracy_matches_a_direct_vote():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16))
    labels = rng.integers(0, 3, 90)
    feats = centres[labels] + 0.8 * rng.normal(size=(90, 16))
    queries = centres[[0, 1, 2, 1]] + 0.8 * rng.normal(size=(4, 16))
    predicted = knn_predict(feats, labels, queries, k=20, temperature=0.07)
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    for q, p in zip(queries, predicted):
        sim = unit @ (q / np.linalg.norm(q))
        top = np.argsort(-sim)[:20]
        votes = np.bincount(labels[top], weights=np.exp(sim[top] / 0.07), minlength=3)
        assert p == votes.argmax()
    assert knn_accuracy(feats, labels) > 0.9
    assert knn_accuracy(feats, labels, queries, np.array([0, 1, 2, 1])) == 1.0


def test_activation_checkpointing_replays_stochastic_depth_exactly():
    config = tiny_config("x", Path("y"), "model.drop_path_rate=0.5")
    plain, teacher = build_student_teacher(config.model, seed=0)
    checkpointed = copy.deepcopy(plain)
    info = DistInfo(0, 1, 0, torch.device("cpu"), False)
    prepare_model(checkpointed, info, activation_checkpointing=True)
    gen = torch.Generator().manual_seed(3)
    samples = [{"global_crops": torch.randn(2, 3, 32, 32, generator=gen), "local_crops": torch.randn(2, 3, 16, 16, generator=gen)}
               for _ in range(4)]
    batch = collate(samples, patch_size=16, rng=np.random.default_rng(0))
    batch["image_ids"] = torch.arange(4)
    grads = []
    for student in (plain, checkpointed):
        student.train()
        losses = ssl_losses(student, teacher, batch, 0.05, config.loss, False, generator=step_generator(0, 5, 0))
        losses.total.backward()
        grads.append({n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_bf16_precision_trains_without_a_process_group(tmp_path):
    catalog = make_catalog(tmp_path, per_part=4)
    config = tiny_config(catalog, tmp_path / "run", "precision=bf16", "optim.iterations=2", "checkpoint.period=2")
    result = train(config)
    metrics = read_metrics(result.output_dir)
    assert [m["step"] for m in metrics] == [0, 1] and all(math.isfinite(m["total"]) for m in metrics)
    assert all(math.isfinite(m["grad_norm_backbone"]) and m["grad_norm_backbone"] > 0 for m in metrics)


def test_a_one_rank_group_is_not_sharded_and_trains(tmp_path, monkeypatch):
    """torchrun with one process (or Ray Train with one worker): a process group, nothing to shard."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from training.train.distributed import build_models, init_distributed

    port = free_ports()[0]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    config = tiny_config(str(make_catalog(tmp_path, per_part=4)), tmp_path / "run", "optim.iterations=2",
                         "checkpoint.period=2", "dist_timeout_s=60")
    info = init_distributed("cpu", 60)
    try:
        student, teacher = build_models(config.model, config.seed, info)
        assert not any(isinstance(p, DTensor) for p in [*student.parameters(), *teacher.parameters()])
        reference, _ = build_student_teacher(config.model, config.seed)
        for name, value in reference.state_dict().items():
            assert torch.equal(student.state_dict()[name], value), name
    finally:
        dist.destroy_process_group()
    result = train(config)  # creates and destroys its own 1-rank group
    assert [m["step"] for m in read_metrics(result.output_dir)] == [0, 1]
    assert (Path(result.output_dir) / "ckpt" / "00000002").is_dir() and Path(result.teacher_path).is_file()


def _losses(output_dir) -> list[dict]:
    keys = ("step", "total", "dino_local", "dino_global", "koleo", "ibot", "grad_norm_backbone")
    return [{k: m[k] for k in keys} for m in read_metrics(output_dir)]


@pytest.mark.slow
def test_prefetching_the_next_batch_changes_no_step_and_resumes_exactly(tmp_path):
    """``data.device_prefetch`` (on by default on CUDA) takes each next batch during the step, except
    before a checkpoint: a run killed after one resumes on the batches an uninterrupted run gets."""
    catalog = make_catalog(tmp_path, per_part=4)
    common = ("optim.iterations=5", "checkpoint.period=2", "checkpoint.keep_last=5")
    plain = train(tiny_config(catalog, tmp_path / "plain", *common, "data.device_prefetch=false"))
    ahead = train(tiny_config(catalog, tmp_path / "ahead", *common, "data.device_prefetch=true"))
    assert _losses(ahead.output_dir) == _losses(plain.output_dir) and len(_losses(plain.output_dir)) == 5
    first = train(tiny_config(catalog, tmp_path / "resumed", *common, "data.device_prefetch=true", "max_steps=3"))
    assert first.steps_done == 3
    resumed = train(tiny_config(catalog, tmp_path / "resumed", *common, "data.device_prefetch=true"))
    assert resumed.resumed_from == 3 and _losses(resumed.output_dir) == _losses(plain.output_dir)
    for a, b in zip(_checkpoint_models(tiny_config(catalog, tmp_path), Path(plain.output_dir) / "ckpt" / "00000005"),
                    _checkpoint_models(tiny_config(catalog, tmp_path), Path(resumed.output_dir) / "ckpt" / "00000005")):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
