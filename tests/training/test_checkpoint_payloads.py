"""A checkpoint directory handed over by someone else never runs code.

A payload (a pickle that creates a marker file when unpickled) is planted in each file of a real
training checkpoint in turn: the DCP ``.metadata`` (inside an otherwise valid ``Metadata``), the
``.distcp`` entries (all of them, or only the non-tensor ones), and the rank state. Every way the
house reads checkpoints (resume from ``output_dir``, ``init.checkpoint=``, ``gram.checkpoint=``,
``curate export-backbone``) must refuse it with an error naming the file, and the marker must never
appear.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from tests.helpers import run_cli
from tests.train_helpers import CONFIGS, TINY, make_catalog
from training.models import CheckpointError
from training.train.config import load_train_config
from training.train.loop import train


@dataclasses.dataclass
class _Payload:
    """Unpickling this object creates ``marker`` (stands for any code an attacker wants to run)."""

    marker: str

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def _poison_metadata(ckpt: Path, marker: str) -> Path:
    """A valid ``Metadata`` whose ``planner_data`` is the payload (the load would otherwise work)."""
    path = ckpt / ".metadata"
    metadata = pickle.loads(path.read_bytes())
    metadata.planner_data = _Payload(marker)
    path.write_bytes(pickle.dumps(metadata))
    return path


def _poison_entries(ckpt: Path, marker: str, only_bytes: bool) -> Path:
    """Rewrite the data file with each (or each non-tensor) entry a ``torch.save``d payload; offsets follow."""
    meta_path = ckpt / ".metadata"
    metadata = pickle.loads(meta_path.read_bytes())
    (data_name,) = {info.relative_path for info in metadata.storage_data.values()}
    original = (ckpt / data_name).read_bytes()
    evil = io.BytesIO()
    torch.save(_Payload(marker), evil)
    out = bytearray()
    for index, info in sorted(metadata.storage_data.items(), key=lambda kv: kv[1].offset):
        is_bytes = isinstance(metadata.state_dict_metadata[index.fqn], BytesStorageMetadata)
        blob = evil.getvalue() if is_bytes or not only_bytes else original[info.offset : info.offset + info.length]
        metadata.storage_data[index] = dataclasses.replace(info, offset=len(out), length=len(blob))
        out += blob
    (ckpt / data_name).write_bytes(bytes(out))
    meta_path.write_bytes(pickle.dumps(metadata))
    return ckpt / data_name


def _poison_rank_state(ckpt: Path, marker: str) -> Path:
    path = ckpt / "rank0.pt"
    state = torch.load(path, weights_only=True)
    state["loader"] = _Payload(marker)
    torch.save(state, path)
    return path


POISONS: dict[str, Callable[[Path, str], Path]] = {
    "metadata": _poison_metadata,
    "all_entries": lambda ckpt, marker: _poison_entries(ckpt, marker, only_bytes=False),
    "byte_entries": lambda ckpt, marker: _poison_entries(ckpt, marker, only_bytes=True),
    "rank_state": _poison_rank_state,
}
# Which files each reader opens: only a resume reads the rank state and the optimizer/step entries.
CASES = [
    ("resume", "metadata"), ("resume", "all_entries"), ("resume", "byte_entries"), ("resume", "rank_state"),
    ("init", "metadata"), ("init", "all_entries"),
    ("gram", "metadata"), ("gram", "all_entries"),
    ("export", "metadata"), ("export", "all_entries"),
]


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory) -> tuple[str, Path]:
    """A one-step tiny pretraining with one checkpoint: (catalog, run dir)."""
    root = tmp_path_factory.mktemp("payload")
    catalog = make_catalog(root, per_part=4)
    config = load_train_config(TINY, [f"data.catalog_root={catalog}", f"output_dir={root / 'run'}",
                                      "optim.iterations=1", "checkpoint.period=1"])
    train(config)
    return catalog, root / "run"


def _read(reader: str, catalog: str, run: Path, ckpt: Path, tmp_path: Path) -> str:
    """Open the (poisoned) checkpoint the way ``reader`` does; returns the error text it failed with."""
    common = [f"data.catalog_root={catalog}", "optim.iterations=3"]
    if reader == "export":
        done = run_cli(["export-backbone", str(ckpt), str(tmp_path / "out.safetensors")])
        assert done.returncode != 0 and not (tmp_path / "out.safetensors").exists()
        return done.stderr
    if reader == "resume":
        config = load_train_config(TINY, [*common, f"output_dir={run}"])
    elif reader == "init":
        config = load_train_config(TINY, [*common, f"output_dir={tmp_path / 'next'}", f"init.checkpoint={ckpt}"])
    else:
        config = load_train_config(str(CONFIGS / "tiny_cpu_gram.yaml"),
                                   [*common, f"output_dir={tmp_path / 'next'}", f"gram.checkpoint={ckpt}"])
    with pytest.raises(CheckpointError) as err:
        train(config)
    return str(err.value)


@pytest.mark.parametrize(("reader", "poison"), CASES, ids=[f"{r}-{p}" for r, p in CASES])
def test_a_planted_payload_never_runs(pretrain_run, tmp_path: Path, reader: str, poison: str) -> None:
    catalog, original = pretrain_run
    run = tmp_path / "run"
    shutil.copytree(original, run)
    ckpt = run / "ckpt" / "00000001"
    marker = tmp_path / "payload-ran"
    poisoned = POISONS[poison](ckpt, str(marker))

    message = _read(reader, catalog, run, ckpt, tmp_path)

    assert not marker.exists(), f"{reader} ran the payload planted in {poisoned.name}"
    assert str(poisoned) in message and "refusing to unpickle" in message, message


def test_an_untouched_checkpoint_still_resumes_and_exports(pretrain_run, tmp_path: Path) -> None:
    """The data-only reader reads everything a real checkpoint holds (optimizer groups, step, rank state)."""
    catalog, original = pretrain_run
    run = tmp_path / "run"
    shutil.copytree(original, run)
    result = train(load_train_config(TINY, [f"data.catalog_root={catalog}", f"output_dir={run}", "optim.iterations=2"]))
    assert (result.resumed_from, result.steps_done) == (1, 2)
    done = run_cli(["export-backbone", str(run), str(tmp_path / "teacher.safetensors")])
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "teacher.safetensors").stat().st_size > 0
