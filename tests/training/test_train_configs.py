"""Every shipped training config loads, names real models, and passes its stage's start-up checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from training.data.mixing import choose_option
from training.train.config import load_train_config, vit_config
from training.train.data import multicrop_options
from training.train.schedules import Schedules, schedule_value
from training.train.stages import gram_weight

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "training" / "configs").glob("*.yaml"))
SET_AT_LAUNCH = ["distill.teacher_checkpoint=runs/teacher"]  # the tiny distill config leaves it to the command


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_loads_with_known_models_and_whole_patch_grids(path):
    config = load_train_config(str(path), SET_AT_LAUNCH)
    models = [s.model for s in config.distill.students] if config.stage == "distill" else [config.model]
    for model in models:
        patch = vit_config(model).patch_size  # raises on an unknown size
        for crops in multicrop_options(config)[0]:
            # global and Gram crops carry iBOT masks / Gram grids; local crops may floor (168 px at patch 16)
            assert crops.global_size % patch == 0 and (crops.gram_size or 0) % patch == 0, model.size
            assert crops.local_size >= patch


def test_the_7b_recipe_has_every_stage():
    stages = {load_train_config(str(p), SET_AT_LAUNCH).stage for p in CONFIGS if p.stem.startswith("vit7b16")}
    assert stages == {"pretrain", "gram", "highres", "distill"}


def _load(name: str):
    return load_train_config(str(CONFIGS[0].parent / name), SET_AT_LAUNCH)


def test_7b_gram_stage_ramps_its_weight_and_the_local_dino_weight_over_its_first_1000_iterations():
    config = _load("vit7b16_gram.yaml")
    total = config.optim.iterations
    # Both ramps are half-cosines over iterations 0..999 with both ends included (reference: cosine_epochs 1).
    assert gram_weight(config.gram, 0, total) == 0.0
    assert gram_weight(config.gram, 500, total) == pytest.approx(1.0 - np.cos(np.pi * 500 / 999))
    assert [gram_weight(config.gram, it, total) for it in (999, 1000, 150_000, total - 1)] == [2.0] * 4
    schedules = Schedules(config.optim, 4096, config.loss)
    assert schedules.at(0).dino_local_weight == 1.0
    assert schedules.at(500).dino_local_weight == pytest.approx(0.75 + 0.25 * np.cos(np.pi * 500 / 999))
    assert [schedules.at(it).dino_local_weight for it in (999, 1000, 1001, total // 2, total - 1)] == [0.5] * 5


def test_7b_high_res_lr_ramps_on_a_half_cosine_over_10k_iterations():
    config = _load("vit7b16_highres.yaml")
    lr = config.optim.lr  # before the batch-size scaling, as the reference's config states it
    expected_1000 = 1.25e-5 * (1 - np.cos(np.pi * 1000 / 9999)) / 2
    assert schedule_value(lr, 1000, config.optim.iterations) == pytest.approx(expected_1000, rel=1e-12)
    assert expected_1000 == pytest.approx(3.06e-7, rel=1e-3)
    assert schedule_value(lr, 0, config.optim.iterations) == 0.0
    assert [schedule_value(lr, it, config.optim.iterations) for it in (9999, 10_000, 29_999)] == [1.25e-5] * 3
    assert Schedules(config.optim, 2048).at(20_000).lr == pytest.approx(1.25e-5 * 4 * np.sqrt(2))


def test_stage_configs_include_their_pretrain_config():
    for stage, base in (("vit7b16_gram", "vit7b16_pretrain"), ("vit7b16_highres", "vit7b16_pretrain"),
                        ("vit7b16_distill", "vit7b16_pretrain"), ("tiny_cpu_gram", "tiny_cpu"),
                        ("tiny_cpu_highres", "tiny_cpu"), ("tiny_cpu_distill", "tiny_cpu")):
        raw = yaml.safe_load((CONFIGS[0].parent / f"{stage}.yaml").read_text())
        assert raw["base"] == f"{base}.yaml", stage
        pretrain = _load(f"{base}.yaml")
        # What the stage does not state comes from the pretrain config, e.g. the crops and the data mix.
        assert _load(f"{stage}.yaml").data == pretrain.data and "data" not in raw, stage


def test_7b_high_res_stage_draws_the_recipe_sizes():
    config = load_train_config(str(CONFIGS[0].parent / "vit7b16_highres.yaml"))
    options, probabilities = multicrop_options(config)
    draws = [choose_option(0, step, probabilities) for step in range(4000)]
    sizes = {(o.global_size, o.local_size, o.gram_size) for o in options}
    assert sizes == {(512, 112, 768), (768, 112, 1152), (768, 168, 1152), (768, 224, 1152), (768, 336, 1152)}
    assert abs(draws.count(0) / 4000 - 0.3) < 0.03 and abs(draws.count(4) / 4000 - 0.05) < 0.015


def test_distill_students_must_predict_the_teachers_prototypes(tmp_path):
    raw = yaml.safe_load((CONFIGS[0].parent / "tiny_cpu_distill.yaml").read_text())
    raw["distill"]["students"][0]["model"]["dino_head"]["n_prototypes"] = 64
    raw["base"] = str(CONFIGS[0].parent / raw["base"])  # the copy lives elsewhere: its base by absolute path
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="'small': dino_head.n_prototypes is 64, the teacher's is 128"):
        load_train_config(str(tmp_path / "bad.yaml"), SET_AT_LAUNCH)
