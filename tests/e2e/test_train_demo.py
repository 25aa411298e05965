"""The trainer's acceptance on the demo pool: a few minutes of CPU training beat random initialisation."""

import os
import shutil

import pytest

from pipelines.demo.pool import DENSE_PROBE_FILE
from tests.helpers import run_cli
from training.models import load_backbone
from training.train.dense_probe import linear_dense_probe
from training.train.evals import knn_on_seed_set, load_dense_probe_set
from training.train.run_state import EVALS_FILE, TEACHER_FILE, read_metrics

SHORT_RUN = ["optim.iterations=60", "optim.lr.warmup_iterations=10", "optim.teacher_temp.warmup_iterations=20",
             "optim.freeze_last_layer_iterations=5", "checkpoint.period=60"]


@pytest.mark.slow
def test_short_training_raises_knn_accuracy_above_random_init(demo_pool, lvd_catalog, tmp_path):
    catalog = str(tmp_path / "cat")  # a copy: the mix adds curated/pool, and the session's catalog is shared
    shutil.copytree(lvd_catalog, catalog)
    result = run_cli(["mix", "--catalog", catalog, "--overwrite", "--set", "parts={pool: {source: pool}}",
                      "homogeneous_part="])
    assert result.returncode == 0, result.stderr
    run = str(tmp_path / "run")
    seeds, probe = os.path.join(demo_pool, "seed"), os.path.join(demo_pool, DENSE_PROBE_FILE)
    result = run_cli(["train", "--config", "training/configs/demo_cpu.yaml", "--set", f"data.catalog_root={catalog}",
                      f"output_dir={run}", f"eval.knn_folder={seeds}", f"eval.dense_probe={probe}", *SHORT_RUN])
    assert result.returncode == 0, result.stderr[-3000:]
    teacher = f"curate:{run}/{TEACHER_FILE}"
    trained = knn_on_seed_set(teacher, seeds)
    random_init = knn_on_seed_set("vit_demo", seeds)
    assert trained >= random_init + 0.2, (trained, random_init)

    # The run scored its EMA teacher at each checkpoint; the last row is the exported teacher's score.
    evals = read_metrics(run, EVALS_FILE)
    assert [e["step"] for e in evals] == [60]
    assert evals[-1]["knn_accuracy"] == pytest.approx(trained, abs=1e-9)
    images, masks = load_dense_probe_set(probe)
    half = len(images) // 2
    direct = linear_dense_probe(load_backbone(teacher, None)[0], images[:half], masks[:half], images[half:],
                                masks[half:], patch_size=8)
    assert evals[-1]["dense_miou"] == pytest.approx(direct["miou"], abs=1e-6)
    assert 0.0 < evals[-1]["dense_miou"] <= 1.0
