"""The trainer under Ray Train's TorchTrainer: 2 CPU workers, gloo group set up by Ray, same loop."""

from __future__ import annotations

import pytest

from tests.helpers import REPO
from tests.test_trainer import TINY, make_catalog
from training.train.run_state import read_metrics


@pytest.mark.slow
def test_launch_on_ray_trains_with_two_workers(tmp_path):
    import ray

    from training.train.ray_launch import launch_on_ray

    catalog = make_catalog(tmp_path, per_part=6)
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False,
                 runtime_env={"env_vars": {"PYTHONPATH": REPO, "CURATE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}})
    out = tmp_path / "run"
    result = launch_on_ray(TINY, [f"data.catalog_root={catalog}", f"output_dir={out}", "optim.iterations=3",
                                  "checkpoint.period=3", "dist_timeout_s=60"], num_workers=2)
    assert result.error is None
    assert [m["step"] for m in read_metrics(out)] == [0, 1, 2]
    assert {p.name for p in (out / "ckpt" / "00000003").iterdir()} >= {"rank0.pt", "rank1.pt"}
    assert (out / "teacher_backbone.safetensors").is_file()
