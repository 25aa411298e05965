"""Every shipped training config loads, names real models, and passes its stage's start-up checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from training.data.mixing import choose_option
from training.train.config import load_train_config, vit_config
from training.train.data import multicrop_options

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


def test_7b_gram_stage_ramps_its_weight_on_a_cosine_and_reweights_local_dino():
    from training.train.schedules import Schedules
    from training.train.stages import gram_weight

    config = load_train_config(str(CONFIGS[0].parent / "vit7b16_gram.yaml"))
    total = config.optim.iterations
    assert [gram_weight(config.gram, it, total) for it in (0, 500, 1000, 150_000)] == pytest.approx([0, 1.0, 2.0, 2.0])
    schedules = Schedules(config.optim, 4096, config.loss)
    assert [schedules.at(it).dino_local_weight for it in (0, total // 2, total)] == pytest.approx([1.0, 0.75, 0.5])


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
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="'small': dino_head.n_prototypes is 64, the teacher's is 128"):
        load_train_config(str(tmp_path / "bad.yaml"), SET_AT_LAUNCH)
