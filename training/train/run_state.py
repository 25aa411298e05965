"""What a training run keeps between invocations: its output files, metrics logs and RNG states.

Every file lives under ``output_dir``, which may be any fsspec URL (local, ``memory://``, ``s3://``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from catalog.paths import exists, is_local, join, read_bytes, resolve, write_bytes_atomic

TEACHER_FILE = "teacher_backbone.safetensors"
METRICS_FILE = "metrics.jsonl"  # one row per step
EVALS_FILE = "evals.jsonl"  # one row per checkpoint (``eval`` in the config)
MANIFEST_STAGE = "train"  # the stage name of a training run's manifest in <output_dir>/_manifests
REMOTE_FLUSH_S = 30.0  # object stores: append buffered log rows at most this often (and at every checkpoint)


@dataclass(frozen=True)
class TrainResult:
    steps_done: int  # completed iterations (global step count) at the end of this invocation
    resumed_from: int  # step the run resumed from (0 for a fresh run)
    output_dir: str
    teacher_path: str | None


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


class RecordLog:
    """A JSON-lines log (``metrics.jsonl``, ``evals.jsonl``) that rank 0 appends to, on any store.

    A local file gets every row as it comes. Object stores have no cheap append, so there rows are
    buffered and appended at most every ``REMOTE_FLUSH_S`` seconds and at every ``flush`` (each
    checkpoint): rows written after the last checkpoint are dropped on resume anyway.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.flush_s = 0.0 if is_local(url) else REMOTE_FLUSH_S
        self._pending: list[str] = []
        self._flushed_at = time.monotonic()

    def append(self, record: dict) -> None:
        self._pending.append(json.dumps(record) + "\n")
        if time.monotonic() - self._flushed_at >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            fs, path = resolve(self.url)
            with fs.open(path, "ab") as f:
                f.write("".join(self._pending).encode())
            self._pending.clear()
        self._flushed_at = time.monotonic()

    def truncate(self, before_step: int) -> None:
        """Drop rows of steps >= ``before_step`` (written after the checkpoint a resume starts from)."""
        if not exists(self.url):
            return
        keep = [line for line in read_bytes(self.url).decode().splitlines()
                if line and json.loads(line)["step"] < before_step]
        write_bytes_atomic(self.url, "".join(line + "\n" for line in keep).encode())


def resume_logs(output_dir: str, start: int, is_main: bool) -> tuple[RecordLog, RecordLog]:
    """The run's metrics and evals logs, without the rows written after checkpoint ``start`` (rank 0 trims)."""
    metrics, evals = RecordLog(join(output_dir, METRICS_FILE)), RecordLog(join(output_dir, EVALS_FILE))
    if is_main:
        metrics.truncate(start)
        evals.truncate(start + 1)
    return metrics, evals


def read_metrics(output_dir: str | Path, name: str = METRICS_FILE) -> list[dict]:
    """The rows of a run's log (``metrics.jsonl`` by default)."""
    text = read_bytes(join(str(output_dir), name)).decode()
    return [json.loads(line) for line in text.splitlines() if line]
