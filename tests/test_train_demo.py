"""The trainer's acceptance on the demo pool: a few minutes of CPU training beat random initialisation."""

import os

import pytest

from tests.helpers import run_cli
from training.train.demo_eval import knn_on_seed_set

SHORT_RUN = ["optim.iterations=60", "optim.lr.warmup_iterations=10", "optim.teacher_temp.warmup_iterations=20",
             "optim.freeze_last_layer_iterations=5", "checkpoint.period=60"]


@pytest.mark.slow
def test_short_training_raises_knn_accuracy_above_random_init(demo_pool, lvd_catalog, tmp_path):
    result = run_cli(["mix", "--catalog", lvd_catalog, "--set", "parts={pool: {source: pool}}", "homogeneous_part="])
    assert result.returncode == 0, result.stderr
    run = str(tmp_path / "run")
    result = run_cli(["train", "--config", "training/configs/demo_cpu.yaml", f"data.catalog_root={lvd_catalog}",
                      f"output_dir={run}", *SHORT_RUN])
    assert result.returncode == 0, result.stderr[-3000:]
    seeds = os.path.join(demo_pool, "seed")
    trained = knn_on_seed_set(f"curate:{run}/teacher_backbone.safetensors", seeds)
    random_init = knn_on_seed_set("vit_demo", seeds)
    assert trained >= random_init + 0.2, (trained, random_init)
