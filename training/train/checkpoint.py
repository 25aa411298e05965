"""Atomic, resumable training checkpoints with ``torch.distributed.checkpoint``, on any fsspec store.

Layout: ``<output_dir>/ckpt/<step:08d>/`` holds the DCP shards of {student, teacher, optimizer, step}
(plus ``gram_teacher`` in the Gram stages; a distillation run writes one such set per student into
``<step>/<student name>/``, each saved by its own process group) and ``rank<r>.pt`` per rank
(data-loader + sampler state, RNG states, run counters). Only the newest ``keep_last`` are kept.

A checkpoint is complete or invisible. On a local disk everything is written into ``.tmp-<step>``
and renamed by rank 0 after all ranks finished, so a directory with an integer name is always
complete. Object stores (``s3://``, ``gs://``, ``memory://``) cannot rename a folder atomically, so
there the shards go straight to ``<step>/`` and rank 0 writes a ``COMPLETE`` marker last; a step
folder without it is ignored (and rewritten by the next save of that step).
Reading is data only (``dcp_reader``): a checkpoint handed over by someone else cannot run code.
"""

from __future__ import annotations

import io
import posixpath
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from catalog.paths import exists, is_local, join, ls, read_bytes, resolve, write_bytes_atomic
from training.models.checkpoints import CheckpointError, describe_load_error
from training.train.dcp_reader import load_state, one_process_is_intended
from training.train.distributed import DistInfo, barrier

COMPLETE = "COMPLETE"  # object stores: the marker rank 0 writes once every rank's shards are in


def _step_of(url: str) -> str:
    return posixpath.basename(url.rstrip("/"))


def _is_complete(url: str) -> bool:
    """A step folder that a save finished (see the module docstring)."""
    if is_local(url):
        fs, path = resolve(url, fresh=True)
        return fs.isdir(path)
    return exists(join(url, COMPLETE))


def checkpoint_dirs(root: str | Path) -> list[str]:
    """Complete checkpoints under ``root``, oldest first."""
    steps = [url for url in ls(str(root)) if _step_of(url).isdigit() and _is_complete(url)]
    return sorted(steps, key=lambda url: int(_step_of(url)))


def latest_checkpoint(root: str | Path) -> str | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def resolve_checkpoint(path: str | Path) -> str:
    """A checkpoint dir as given, or the latest checkpoint of a run dir (``<run>/ckpt/<step>``)."""
    path = str(path).rstrip("/")
    if _step_of(path).isdigit() and _is_complete(path):
        return path
    latest = latest_checkpoint(join(path, "ckpt"))
    if latest is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint dir nor a run dir with checkpoints")
    return latest


def _remove(url: str) -> None:
    fs, path = resolve(url, fresh=True)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _model_states(
    student: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, nn.Module]
) -> dict:
    return {
        "student": get_model_state_dict(student),
        "teacher": get_model_state_dict(teacher),
        "optimizer": get_optimizer_state_dict(student, optimizer),
        **{name: get_model_state_dict(model) for name, model in extra.items()},
    }


def _write_models(
    url: str,
    step: int,
    student: nn.Module,
    teacher: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, nn.Module],
    group: dist.ProcessGroup | None,
) -> None:
    state = _model_states(student, teacher, optimizer, extra)
    state["step"] = step
    with one_process_is_intended():
        dcp.save(state, checkpoint_id=url, process_group=group)


def save_checkpoint(
    root: str | Path,
    step: int,
    student: nn.Module,
    teacher: nn.Module,
    optimizer: torch.optim.Optimizer,
    rank_state: dict,
    info: DistInfo,
    keep_last: int,
    extra: dict[str, nn.Module] | None = None,
    subdir: str = "",
    group: dist.ProcessGroup | None = None,
) -> str:
    """Write the checkpoint taken after ``step`` completed steps; collective over all ranks.

    ``extra``: more models saved under their names (the Gram teacher). ``subdir``/``group``: this
    rank's models go to ``<step>/<subdir>`` with a DCP save over ``group`` (distillation students).
    """
    root = str(root)
    final = join(root, f"{step:08d}")
    local = is_local(root)
    target = join(root, f".tmp-{step:08d}") if local else final
    if info.is_main:
        _remove(target)
        fs, path = resolve(target)
        fs.makedirs(path, exist_ok=True)
    barrier()
    if subdir:
        fs, path = resolve(join(target, subdir))
        fs.makedirs(path, exist_ok=True)
    _write_models(join(target, subdir), step, student, teacher, optimizer, extra or {}, group)
    buffer = io.BytesIO()
    torch.save({**rank_state, "world_size": info.world_size}, buffer)
    write_bytes_atomic(join(target, f"rank{info.rank}.pt"), buffer.getvalue())
    barrier()
    if info.is_main:
        if local:
            _remove(final)
            fs, path = resolve(target)
            fs.mv(path, resolve(final)[1])
        else:
            write_bytes_atomic(join(final, COMPLETE), b"")
        for old in checkpoint_dirs(root)[:-keep_last] if keep_last > 0 else []:
            _remove(old)
    barrier()
    return final


def _read_rank_state(path: str) -> dict:
    """A rank's loader/RNG state, data only (tensors and plain containers)."""
    try:
        state = torch.load(io.BytesIO(read_bytes(path)), weights_only=True)
    except Exception as e:  # UnpicklingError for a refused global, RuntimeError/EOFError for damage
        raise CheckpointError(f"{path}: {describe_load_error(e)}") from e
    if not isinstance(state, dict) or "world_size" not in state:
        raise CheckpointError(f"{path}: not a rank state of a curate checkpoint")
    return state


def load_checkpoint(
    path: str,
    student: nn.Module,
    teacher: nn.Module,
    optimizer: torch.optim.Optimizer,
    info: DistInfo,
    extra: dict[str, nn.Module] | None = None,
    subdir: str = "",
    group: dist.ProcessGroup | None = None,
) -> tuple[int, dict]:
    """Restore models and optimizer in place; returns the completed step count and this rank's state."""
    rank_file = join(path, f"rank{info.rank}.pt")
    if not exists(rank_file):
        raise RuntimeError(f"{path}: no state for rank {info.rank}; was it written with another world size?")
    rank_state = _read_rank_state(rank_file)
    if rank_state["world_size"] != info.world_size:
        raise RuntimeError(
            f"{path}: written by {rank_state['world_size']} ranks, resuming with {info.world_size}; "
            "exact resume needs the same world size"
        )
    extra = extra or {}
    state = _model_states(student, teacher, optimizer, extra)
    state["step"] = -1
    load_state(state, join(path, subdir), group)
    set_model_state_dict(student, state["student"])
    set_model_state_dict(teacher, state["teacher"])
    set_optimizer_state_dict(student, optimizer, state["optimizer"])
    for name, model in extra.items():
        set_model_state_dict(model, state[name])
    return int(state["step"]), rank_state


def load_models(path: str, targets: list[tuple[str, nn.Module]], group: dist.ProcessGroup | None = None) -> None:
    """Fill each ``(source, model)`` of ``targets`` from a checkpoint's models; collective over ``group``.

    The name is a ``/``-path into the checkpoint: ``teacher`` (an ``SSLModel``), ``teacher/backbone``
    (a bare backbone from the teacher's ``backbone.*`` keys), ``student``, ... Used to start a stage from
    the previous stage's checkpoint; a partial read, so checkpoints of any stage work.
    """
    for source, model in targets:
        key, _, prefix = source.partition("/")
        local = get_model_state_dict(model)
        dotted = f"{prefix}." if prefix else ""
        state = {key: {dotted + k: v for k, v in local.items()}}
        load_state(state, path, group)
        set_model_state_dict(model, {k[len(dotted):]: v for k, v in state[key].items()})
