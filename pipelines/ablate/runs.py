"""One run of an ablation: an arm's data, one seed, the shared recipe; trained (or resumed), then scored.

A run is an ordinary ``curate train`` output folder, ``<catalog>/ablations/<name>/<arm>/seed<k>/``.
Its ``scores.json``, written last, marks it finished: a rerun of the ablation skips it, and a run
killed part-way resumes from its latest checkpoint through the trainer's own resume.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

from catalog.config import to_dict
from catalog.manifest import list_manifests
from catalog.paths import exists, is_local, join, read_bytes, write_bytes_atomic
from training.evals.suite import EvalSuite
from training.models import load_backbone
from training.train.config import TrainConfig, load_train_config
from training.train.launch import run_training
from training.train.meta_arch import build_student_teacher
from training.train.run_state import MANIFEST_STAGE, TEACHER_FILE, read_metrics
from training.train.stages import init_from_checkpoint

ABLATIONS_DIR = "ablations"
SCORES_FILE = "scores.json"


def ablation_dir(root: str, name: str) -> str:
    return join(root, ABLATIONS_DIR, name)


def run_dir(root: str, name: str, arm: str, seed: int) -> str:
    return join(ablation_dir(root, name), arm, f"seed{seed}")


def shortened(config: TrainConfig, steps: int) -> list[str]:
    """Overrides that compress the config's schedule to ``steps`` iterations, every span scaled alike.

    Warmups, cosine spans, the frozen-last-layer span and the checkpoint period keep their share of
    the run, so a shortened schedule is the same recipe, only shorter (as the paper's ablations).
    """
    scale = steps / config.optim.iterations
    out = [f"optim.iterations={steps}",
           f"optim.freeze_last_layer_iterations={round(config.optim.freeze_last_layer_iterations * scale)}",
           f"checkpoint.period={max(1, round(config.checkpoint.period * scale))}"]
    schedules = {"optim.lr": config.optim.lr, "optim.weight_decay": config.optim.weight_decay,
                 "optim.momentum": config.optim.momentum, "optim.teacher_temp": config.optim.teacher_temp,
                 "loss.dino_local_weight": config.loss.dino_local_weight}
    for key, schedule in schedules.items():
        warmup = min(steps, round(schedule.warmup_iterations * scale))
        out.append(f"{key}.warmup_iterations={warmup}")
        if schedule.cosine_iterations is not None:
            out.append(f"{key}.cosine_iterations={min(steps - warmup, round(schedule.cosine_iterations * scale))}")
    return out


@dataclass(frozen=True)
class Run:
    arm: str
    seed: int
    out: str
    overrides: list[str]  # on top of the training config file: the ablation's, the schedule, data, seed, output_dir

    def config(self, config_file: str) -> TrainConfig:
        return load_train_config(config_file, self.overrides)

    @property
    def finished(self) -> bool:
        return exists(join(self.out, SCORES_FILE))


def _train_manifests(out: str) -> list[dict]:
    return [m for m in list_manifests(out) if m["stage"] == MANIFEST_STAGE] if exists(join(out, "_manifests")) else []


def trained(config: TrainConfig) -> dict | None:
    """The manifest of the invocation that finished ``config``'s schedule and exported its teacher, if any."""
    done = [m for m in _train_manifests(config.output_dir) if m["status"] == "ok"
            and m["notes"]["steps_done"] == config.optim.iterations and m["notes"]["teacher_path"]]
    return done[-1] if done else None


def train(config: TrainConfig, num_workers: int, gpus_per_worker: float, address: str | None) -> dict:
    """Train the run to the end of its schedule (resuming a killed one); returns its final manifest."""
    manifest = trained(config)
    if manifest is None:
        run_training(config, num_workers, gpus_per_worker, address)
        manifest = trained(config)
        if manifest is None:
            raise RuntimeError(f"{config.output_dir}: training returned without a finished manifest")
    return manifest


def _load_teacher(url: str):
    """The exported teacher backbone from any store (``load_backbone`` reads local files)."""
    if is_local(url):
        return load_backbone(f"curate:{url}", None)[0]
    with tempfile.TemporaryDirectory(prefix="curate-ablate-") as tmp:
        local = os.path.join(tmp, TEACHER_FILE)
        with open(local, "wb") as f:
            f.write(read_bytes(url))
        return load_backbone(f"curate:{local}", None)[0]


def homogeneous_steps(run: str, manifest: dict) -> int | None:
    """Homogeneous steps of the whole run: the loader's flag on each trained step's metrics row (a resume
    drops the rows after its checkpoint, so each step has one row). None without a homogeneous part."""
    if not manifest["inputs"]["plan"]["homogeneous_part"]:
        return None
    return sum(bool(row["homogeneous"]) for row in read_metrics(run))


def _write_scores(run: Run, backbone, suite: EvalSuite, facts: dict) -> dict:
    """Score ``backbone`` and write ``scores.json`` (which marks the run finished)."""
    doc = {"arm": run.arm, "seed": run.seed, "scores": suite(backbone, backbone.config.patch_size), **facts,
           "load_average_1m": round(os.getloadavg()[0], 2)}  # how shared the machine was as the run ended
    write_bytes_atomic(join(run.out, SCORES_FILE), json.dumps(doc, indent=2).encode())
    return doc


def score(run: Run, manifest: dict, suite: EvalSuite) -> dict:
    """Score the run's exported teacher."""
    notes = manifest["notes"]
    return _write_scores(run, _load_teacher(notes["teacher_path"]), suite, {
        "steps": notes["steps_done"], "images_seen": manifest["rows"]["images_seen"],
        "homogeneous_steps": homogeneous_steps(run.out, manifest),
        "plan": manifest["inputs"]["plan"], "teacher_sha256": notes["teacher_sha256"],
        "train_seconds": round(sum(m["wall_seconds"] for m in _train_manifests(run.out)), 1),
    })


def score_untrained(run: Run, config: TrainConfig, suite: EvalSuite) -> dict:
    """Score the teacher as the trainer builds it before step 0 for this seed (from ``init.checkpoint``
    when the recipe starts from one): the weights every arm of the seed starts from."""
    student, teacher = build_student_teacher(config.model, config.seed)
    if config.init.checkpoint:
        init_from_checkpoint(config.init, student, teacher)
    return _write_scores(run, teacher.backbone, suite, {
        "steps": 0, "images_seen": 0, "homogeneous_steps": None, "teacher_sha256": None, "train_seconds": 0.0,
        "plan": {"parts": [], "weights": {}, "homogeneous_part": None, "p_homogeneous": None},
    })


def read_scores(run: Run) -> dict:
    return json.loads(read_bytes(join(run.out, SCORES_FILE)))


def base_config(config: TrainConfig) -> dict:
    """The recipe every arm shares: the config without what differs per run (data, seed, output_dir)."""
    return {k: v for k, v in to_dict(config).items() if k not in ("data", "seed", "output_dir")}
