"""The dedup stage's learned descriptor (``descriptor=torchscript:PATH``, `curation.torchscript_descriptor`):
the model read from its file, its descriptors of the pool (table ``model_copy_descriptors``, float16,
the model's sha256 in the metadata) and its calibrated threshold, reported beside the copy groups."""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import asdict
from functools import lru_cache

import numpy as np
import pyarrow as pa

from catalog.array_store import CatalogArrayStore, checkpoint_path, npz_bytes
from catalog.decode import DecodeError, decode_rgb
from catalog.embeddings import embeddings_table
from catalog.errors import MissingInputError, UserError
from catalog.id_lookup import lookup, positions
from catalog.images import UnreadableItem, read_item, resolve_uris
from catalog.paths import join, read_bytes, resolve, retry, write_bytes_atomic
from catalog.schemas import MODEL_COPY_DESCRIPTORS_TABLE
from catalog.sql import query
from curation.torchscript_descriptor import (
    Calibration,
    ScriptedDescriptor,
    calibrate,
    describe,
    load_scripted,
)
from pipelines.dedup_graph import CONTENT_HASH, STAGE
from pipelines.demo.pool import injected_copy_groups

log = logging.getLogger("curate.pipelines")
PREFIX = "torchscript:"
DESCRIPTORS = "model_descriptors"  # the describe unit's file under the dedup stage's checkpoints
DESCRIPTORS_FILE = checkpoint_path(STAGE, DESCRIPTORS)
_READ_BATCH = 256


def model_path(descriptor: str) -> str | None:
    """PATH of ``torchscript:PATH``; None for the other descriptors."""
    return descriptor[len(PREFIX):] if descriptor.startswith(PREFIX) else None


@lru_cache(maxsize=2)
def load_model(path: str, size: int, dim: int, mean: tuple[float, ...], std: tuple[float, ...]) -> ScriptedDescriptor:
    try:
        data = read_bytes(path)
    except FileNotFoundError as e:
        raise MissingInputError(f"descriptor model {path} does not exist") from e
    try:
        return load_scripted(data, size, dim, mean, std)
    except ValueError as e:
        raise UserError(f"descriptor model {path}: {e}") from e


def _describe_checked(model: ScriptedDescriptor, images: list, path: str) -> np.ndarray:
    try:
        return describe(model, images)
    except ValueError as e:
        raise UserError(f"descriptor model {path}: {e}") from e


def describe_step(root: str, model: ScriptedDescriptor, path: str) -> tuple[pa.Table, dict[str, bytes]]:
    """The model's descriptors of every usable pool image, and the bundle that keeps them for the next run
    (the unit's file): an image the last run described with the same bytes and model is not decoded again,
    so a grown pool describes only its new or changed images. An image unreadable since ingest is left
    out, with a warning: it takes part in no copy pair."""
    t = query(root, f"SELECT image_id, uri, {CONTENT_HASH} AS h FROM pool WHERE status = 'ok' ORDER BY image_id")
    ids, content = t.column("image_id").to_numpy(), t.column("h").to_numpy()
    reused_ids, reused_x = _kept_descriptors(root, model, ids, content)
    todo = ~np.isin(ids, reused_ids)
    uris = resolve_uris(root, t.filter(pa.array(todo)).column("uri")).to_pylist()
    new_ids, new_x = _described(model, path, ids[todo], uris)
    if len(reused_ids):
        log.info("dedup: kept the descriptors of %d images; described %d new or changed", len(reused_ids),
                 len(new_ids))
    order = np.argsort(np.concatenate([reused_ids, new_ids]), kind="stable")
    kept, x = np.concatenate([reused_ids, new_ids])[order], np.concatenate([reused_x, new_x])[order]
    table = embeddings_table(kept, x, {"descriptor": model.model_id, "model_path": path,
                                       "input_size": str(model.size)}, MODEL_COPY_DESCRIPTORS_TABLE)
    bundle = {"model": np.array(model.model_id), "ids": kept, "content": lookup(ids, content, kept, 0), "x": x,
              "described": np.array(len(new_ids))}
    return table, {DESCRIPTORS_FILE: npz_bytes(bundle)}


def _kept_descriptors(root: str, model: ScriptedDescriptor, ids: np.ndarray,
                      content: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The last run's descriptors of these images (sorted ids) whose bytes are unchanged, by the same model."""
    saved = CatalogArrayStore(root, STAGE).get(DESCRIPTORS)
    if saved is None or str(saved["model"]) != model.model_id:
        return np.empty(0, np.int64), np.empty((0, model.dim), np.float16)
    at = positions(saved["ids"], ids)
    same = (at >= 0) & (lookup(saved["ids"], saved["content"], ids, 0) == content)
    return ids[same], saved["x"][at[same]]


def _described(model: ScriptedDescriptor, path: str, ids: np.ndarray, uris: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Decode and describe these images in batches: (ids described, their float16 descriptors)."""
    kept, parts, unreadable = [], [np.zeros((0, model.dim), np.float16)], []
    for start in range(0, len(ids), _READ_BATCH):
        images = []
        for iid, uri in zip(ids[start : start + _READ_BATCH], uris[start : start + _READ_BATCH]):
            try:
                images.append(decode_rgb(read_item(uri), min_side=model.size))
                kept.append(iid)
            except (UnreadableItem, DecodeError) as e:
                unreadable.append(f"{uri} ({e})")
        parts.append(_describe_checked(model, images, path))
    if unreadable:
        log.warning("dedup: %d pool image(s) could not be read for the descriptor model, e.g. %s",
                    len(unreadable), "; ".join(unreadable[:3]))
    return np.asarray(kept, np.int64), np.concatenate(parts).astype(np.float16)


def described_summary(root: str) -> dict[str, int] | None:
    """How many descriptors the describe step keeps and how many its run computed (None without any)."""
    saved = CatalogArrayStore(root, STAGE).get(DESCRIPTORS)
    return None if saved is None else {"images": len(saved["ids"]), "described": int(saved["described"])}


def demo_set_name(groups: int, seed: int) -> str:
    """How the calibration report names the default set."""
    return (f"pipelines.demo.pool.injected_copy_groups({groups}, seed={seed}): the near-duplicate groups a "
            "demo pool injects (re-encoded, re-formatted, resized, cropped)")


def demo_copy_groups(groups: int, seed: int) -> tuple[list, np.ndarray]:
    """(images, group of each) of the default calibration set: ``groups`` of the demo pool's injected
    near-duplicate groups, decoded as ingest decodes them."""
    files, labels = injected_copy_groups(groups, seed)
    return [decode_rgb(f) for f in files], labels


def copy_groups(folder: str) -> tuple[list, np.ndarray]:
    """(images, group of each) of a ``<group>/<image>`` folder of labelled copies, such as a demo pool's
    ``eval/instances`` (its injected near-duplicate groups); files that do not decode are left out."""
    fs, path = resolve(folder)
    images, labels, groups = [], [], {}
    for file in sorted(retry(lambda: fs.find(path))):
        try:
            image = decode_rgb(fs.cat_file(file))
        except DecodeError:
            continue
        images.append(image)
        labels.append(groups.setdefault(posixpath.basename(posixpath.dirname(file)), len(groups)))
    counts = np.bincount(labels) if labels else np.zeros(0, int)
    if len(counts) < 2 or counts.max() < 2:
        raise MissingInputError(f"calibration_copies {folder} needs <group>/<image> folders with at least two "
                                f"groups and one of two images or more; it has {len(counts)} groups of readable images")
    return images, np.asarray(labels)


@lru_cache(maxsize=2)
def calibration(model: ScriptedDescriptor, path: str, groups: int, seed: int, folder: str = "") -> Calibration:
    """The model's threshold calibrated on the copy groups in ``folder``, or else on ``groups`` of the demo
    pool's injected groups."""
    images, labels = copy_groups(folder) if folder else demo_copy_groups(groups, seed)
    return calibrate(_describe_checked(model, images, path), labels)


def write_calibration_report(root: str, model: ScriptedDescriptor, cal: Calibration, threshold: float,
                             set_name: str) -> str:
    """reports/dedup/calibration.json: the threshold used and the calibration's precision and recall on
    the set named ``set_name`` (a folder, or `demo_set_name`)."""
    url = join(root, "reports", "dedup", "calibration.json")
    body = {"model_id": model.model_id, "threshold_used": threshold, "calibration": asdict(cal),
            "calibration_set": set_name}
    write_bytes_atomic(url, json.dumps(body, indent=2).encode())
    return url
