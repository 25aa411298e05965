"""Launching a run: the config travels to Ray workers as plain data, and comes back as the same config."""

from __future__ import annotations

import json

import pytest

from catalog.config import from_dict, to_dict
from tests.train_helpers import CONFIGS, TINY, make_catalog
from training.train.config import TrainConfig, load_train_config
from training.train.launch import _worker, launch_on_ray, result_of_run
from training.train.run_state import read_metrics


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_the_config_a_worker_receives_is_the_one_the_driver_checked(name):
    config = load_train_config(str(CONFIGS / name), ["distill.teacher_checkpoint=/runs/teacher"])
    shipped = json.loads(json.dumps(to_dict(config)))  # plain data, as it crosses to a Ray worker
    assert from_dict(TrainConfig, shipped) == config


def test_a_worker_trains_the_shipped_config(tmp_path):
    catalog = make_catalog(tmp_path, per_part=4)
    config = load_train_config(TINY, [f"data.catalog_root={catalog}", f"output_dir={tmp_path / 'run'}",
                                      "optim.iterations=2", "checkpoint.period=2"])
    _worker({"config": json.loads(json.dumps(to_dict(config)))})
    assert [m["step"] for m in read_metrics(config.output_dir)] == [0, 1]
    result = result_of_run(config.output_dir)
    assert (result.steps_done, result.resumed_from) == (2, 0) and result.teacher_path.endswith(".safetensors")


def test_ray_workers_need_paths_they_can_see(tmp_path):
    config = load_train_config(TINY, [f"data.catalog_root={tmp_path}", "output_dir=runs/relative"])
    with pytest.raises(ValueError, match="output_dir must be an absolute path or a URL"):
        launch_on_ray(config, num_workers=2)
