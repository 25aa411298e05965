"""Where a run executes: in this process (also each ``torchrun`` process), or on Ray Train workers.

``run_training`` is the entry point of ``curate train``. With more than one worker, GPUs or a cluster
address it runs Ray Train's ``TorchTrainer`` (one worker per GPU or CPU slot); Ray Train creates the
process group (gloo without GPUs, NCCL with) and ``train`` detects and uses it. The resolved config
travels to the workers as plain data, so they run exactly the config the driver checked. Every worker
must see the catalog and ``output_dir`` at the same place (absolute paths on a shared file system, or
object-store URLs): workers do not run in the caller's working directory.
"""

from __future__ import annotations

import dataclasses
import os

from catalog.config import from_dict, to_dict
from catalog.manifest import list_manifests
from catalog.paths import join
from catalog.ray_runtime import ensure_ray
from catalog.threads import ensure_threads
from training.train.config import TrainConfig, check_stage
from training.train.run_state import MANIFEST_STAGE, TrainResult


def run_training(
    config: TrainConfig, num_workers: int = 1, gpus_per_worker: float = 0, address: str | None = None
) -> TrainResult:
    """Train ``config`` here (one worker, no GPU request, no address) or with Ray Train workers.

    Raises ``TrainingDiverged`` (in-process) or ``RuntimeError`` (a failed Ray run, with its cause).
    """
    if num_workers <= 1 and gpus_per_worker <= 0 and address is None:
        from training.train.loop import train

        return train(config)
    result = launch_on_ray(config, num_workers, gpus_per_worker, address)
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    return result_of_run(config.output_dir)


def _worker(loop_config: dict) -> None:
    from training.train.loop import train

    ensure_threads()  # a Ray Train worker: threads for the CPUs Ray gave it, not one per machine core
    config = from_dict(TrainConfig, loop_config["config"])
    check_stage(config)
    train(config)


def _check_shared(config: TrainConfig) -> None:
    """Local paths must be absolute: Ray workers run elsewhere than the caller's working directory."""
    for key, url in (("output_dir", config.output_dir), ("data.catalog_root", config.data.catalog_root)):
        if url and "://" not in url and not os.path.isabs(url):
            raise ValueError(f"{key} must be an absolute path or a URL for Ray workers, got {url!r}")


def launch_on_ray(config: TrainConfig, num_workers: int = 1, gpus_per_worker: float = 0, address: str | None = None):
    """Train with ``num_workers`` Ray workers; returns Ray Train's ``Result``.

    ``gpus_per_worker > 0`` asks each worker for that many GPUs and trains with ``device=cuda``;
    otherwise workers train on CPU with gloo.
    """
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = gpus_per_worker > 0
    config = dataclasses.replace(config, device="cuda" if use_gpu else "cpu")
    _check_shared(config)
    ensure_ray(address)  # the stages' own start-up: a cluster as configured, or Ray on loopback
    resources = {"GPU": gpus_per_worker} if use_gpu else {"CPU": 1}
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"config": to_dict(config)},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=config.dist_timeout_s),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name="curate-train", storage_path=join(config.output_dir, "ray")),
    )
    return trainer.fit()


def result_of_run(output_dir: str) -> TrainResult:
    """The outcome of a run's latest invocation, from the manifest its rank 0 wrote."""
    runs = [m for m in list_manifests(output_dir) if m["stage"] == MANIFEST_STAGE and m["status"] == "ok"]
    if not runs:
        raise RuntimeError(f"{output_dir} has no finished training manifest")
    notes = runs[-1]["notes"]
    return TrainResult(notes["steps_done"], notes["resumed_from"], output_dir, notes["teacher_path"])
