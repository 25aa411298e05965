"""Run the trainer on a Ray cluster with Ray Train's ``TorchTrainer`` (one worker per GPU or CPU slot).

Ray Train creates the process group (gloo without GPUs, NCCL with); ``train`` detects it and uses it.
Every worker must see the catalog and ``output_dir`` at the same absolute paths (workers do not run in
the caller's working directory), e.g. a shared file system.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from catalog.ray_runtime import ensure_ray
from training.train.config import load_train_config


def _worker(loop_config: dict) -> None:
    from training.train.loop import train

    config = load_train_config(loop_config["config_path"], loop_config["overrides"])
    train(config)


def launch_on_ray(
    config_path: str,
    overrides: Sequence[str] = (),
    num_workers: int = 1,
    gpus_per_worker: float = 0,
    address: str | None = None,
):
    """Train with ``num_workers`` Ray workers; returns Ray Train's ``Result``.

    ``gpus_per_worker > 0`` asks each worker for that many GPUs and needs ``device=cuda`` in the
    config (it is set here); otherwise workers train on CPU with gloo.
    """
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    config_path = os.path.abspath(config_path)
    overrides = list(overrides)
    use_gpu = gpus_per_worker > 0
    overrides.append(f"device={'cuda' if use_gpu else 'cpu'}")
    config = load_train_config(config_path, overrides)  # fail fast on a bad config, before Ray starts
    if not os.path.isabs(config.output_dir):
        raise ValueError(f"output_dir must be an absolute path for Ray workers, got {config.output_dir!r}")
    ensure_ray(address)  # the stages' own start-up: a cluster as configured, or Ray on loopback
    resources = {"GPU": gpus_per_worker} if use_gpu else {"CPU": 1}
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"config_path": config_path, "overrides": overrides},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=config.dist_timeout_s),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name="curate-train", storage_path=os.path.join(config.output_dir, "ray")),
    )
    return trainer.fit()
