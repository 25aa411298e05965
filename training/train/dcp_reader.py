"""Read ``torch.distributed.checkpoint`` directories as data only: no checkpoint file can run code.

Stock DCP reads ``.metadata`` with plain ``pickle.load`` and non-tensor entries with
``torch.load(weights_only=False)``, so a handed-over checkpoint directory (a run to resume,
``init.checkpoint``, ``gram.checkpoint``, ``curate export-backbone``) could execute anything. Here the
metadata goes through an unpickler that only knows DCP's metadata classes, and every entry (tensor or
bytes) through ``torch.load(weights_only=True)``. Every refusal is a ``CheckpointError`` naming the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import pickle
import warnings
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from catalog.paths import join, read_bytes
from training.models.checkpoints import CheckpointError, describe_load_error

_METADATA_CLASSES = frozenset(
    [("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING",
    )]
    + [
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
    ]
)


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP ``Metadata`` (dataclasses, torch sizes, dtypes and layouts) and refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"Unsupported global: {module}.{name}")


def read_metadata_file(path: str) -> Metadata:
    """A ``.metadata`` file's ``Metadata`` (any fsspec URL), or a ``CheckpointError`` naming the file."""
    try:
        metadata = _MetadataUnpickler(io.BytesIO(read_bytes(path))).load()
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: no such file (not a complete checkpoint directory)") from e
    except Exception as e:  # UnpicklingError, EOFError, AttributeError, ... for crafted or broken files
        raise CheckpointError(f"{path}: {describe_load_error(e)}") from e
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: holds a {type(metadata).__name__}, not checkpoint metadata")
    return metadata


class DataOnlyReader(FsspecReader):
    """DCP's fsspec reader (local paths and object stores alike) with a restricted metadata unpickler and per-file error names.

    ``read_metadata`` takes no ``rank`` keyword, so DCP never falls back to rank-local
    ``__<rank>.metadata`` files (this house never writes them). DCP turns a failed metadata read into
    its own generic error, so the reader keeps what it refused in ``refusal`` for ``load_state`` to raise.
    """

    refusal: CheckpointError | None = None

    def read_metadata(self, *args: Any) -> Metadata:
        try:
            metadata = read_metadata_file(join(str(self.path), ".metadata"))
        except CheckpointError as e:
            self.refusal = e
            raise
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        by_file: dict[str, list[ReadItem]] = defaultdict(list)
        for item in plan.items:
            by_file[self.storage_data[item.storage_index].relative_path].append(item)
        for name, items in by_file.items():
            try:
                super().read_data(dataclasses.replace(plan, items=items), planner).wait()
            except Exception as e:
                self.refusal = CheckpointError(f"{join(str(self.path), name)}: {describe_load_error(e)}")
                raise self.refusal from e
        done: Future[None] = Future()
        done.set_result(None)
        return done


class DataOnlyPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` whose non-tensor entries (step, optimizer hyper-parameters) load with ``weights_only``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


@contextlib.contextmanager
def one_process_is_intended() -> Iterator[None]:
    """DCP warns on every save/load without a process group; one process is a supported run here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is .*assuming the intent is to (save|load)")
        yield


def load_state(state: dict, path: str, group: dist.ProcessGroup | None = None) -> None:
    """``dcp.load(state, path)`` in place, data only; a bad file on any rank is a ``CheckpointError``."""
    reader = DataOnlyReader(str(path))
    try:
        with one_process_is_intended():
            dcp.load(state, storage_reader=reader, planner=DataOnlyPlanner(), process_group=group)
    except CheckpointException as e:  # DCP gathers every rank's failure into one BaseException
        if reader.refusal is not None:
            raise reader.refusal from e
        other = next(iter(e.failures.items()), None)  # this rank read fine; another one did not
        detail = f"rank {other[0]}: {describe_load_error(other[1][0])}" if other else str(e)
        raise CheckpointError(f"{path}: {detail}") from e
