"""What a training run keeps between invocations: its output files, metrics log and RNG states.

Shared by the pretraining loop and the distillation loop, so both resume the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

TEACHER_FILE = "teacher_backbone.safetensors"
METRICS_FILE = "metrics.jsonl"  # one row per step
EVALS_FILE = "evals.jsonl"  # one row per checkpoint (``eval`` in the config)


@dataclass(frozen=True)
class TrainResult:
    steps_done: int  # completed iterations (global step count) at the end of this invocation
    resumed_from: int  # step the run resumed from (0 for a fresh run)
    output_dir: Path
    teacher_path: Path | None


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The CPU generator of a step's train-mode randomness (RoPE augmentation, stochastic depth).

    A pure function of (seed, step, rank), so a resumed run draws exactly what the original would.
    """
    word = np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(word))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def truncate_metrics(path: Path, before_step: int) -> None:
    """Drop records of steps >= ``before_step`` (written after the checkpoint a resume starts from)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] < before_step]
    path.write_text("".join(line + "\n" for line in keep))


def resume_logs(output_dir: Path, start: int, is_main: bool) -> tuple[Path, Path]:
    """The run's metrics and evals logs, without the rows written after checkpoint ``start`` (rank 0 trims)."""
    metrics, evals = output_dir / METRICS_FILE, output_dir / EVALS_FILE
    if is_main:
        truncate_metrics(metrics, start)
        truncate_metrics(evals, start + 1)
    return metrics, evals


def append_record(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(output_dir: str | Path, name: str = METRICS_FILE) -> list[dict]:
    path = Path(output_dir) / name
    return [json.loads(line) for line in path.read_text().splitlines() if line]
