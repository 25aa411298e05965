"""``curate embed``: the pool's usable images → ``embeddings`` (one vector per image).

A Ray Data pipeline: units of pool rows → decode + centre-crop (CPU tasks, uint8 pixels) → the
backbone (an actor pool: one actor per GPU, or a CPU actor) → Parquet shards written by the actor,
which then marks the unit in the ledger. Rerunning a finished stage does nothing; a killed run
resumes at the first unfinished unit and produces bit-identical vectors.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import ray

from catalog.embeddings import EMBEDDINGS, embedding_metadata, embeddings_table
from catalog.images import read_image_bytes
from catalog.ledger import Ledger
from catalog.manifest import RunManifest, fingerprint
from catalog.progress import progress
from catalog.ray_runtime import ensure_ray
from catalog.schemas import ERRORS, stamp
from catalog.shards import write_shards
from catalog.sql import query
from catalog.decode import MISSING, DecodeError, Preprocess, decode_rgb

STAGE = "embed"


class ModelMismatchError(ValueError):
    """The catalog already holds embeddings of another model or preprocessing."""


@dataclass(frozen=True)
class EmbedConfig:
    model: str = "dinov3_vits16"
    weights: str | None = None
    image_size: int = 224
    pooling: Literal["cls", "mean", "cls+mean"] = "cls"
    normalize: bool = True
    storage_dtype: Literal["float16", "float32"] = "float16"
    images_per_unit: int = 256
    batch_size: int = 64
    actors: int = 1
    decode_cpus: float = 0.5
    actor_cpus: float = 1.0
    max_pixels: int = 64_000_000
    torch_threads: int | None = None  # CPU actors: None = every core (Ray would give them one thread)
    seed: int = 0


def preprocess_for(config: EmbedConfig) -> Preprocess:
    return Preprocess(size=config.image_size)


def model_identity(config: EmbedConfig, weights_sha256: str | None) -> dict[str, str]:
    """What makes two embedding tables comparable; stored in every shard's metadata."""
    return {
        "model": config.model,
        "weights_sha256": weights_sha256 or f"random-init-seed{config.seed}",
        "preprocess": preprocess_for(config).fingerprint(),
        "pooling": config.pooling,
        "normalized": str(config.normalize),
    }


def config_of_table(root: str, table: str = EMBEDDINGS) -> EmbedConfig:
    """The embed settings a table was made with, to embed a seed set exactly like the pool."""
    from catalog.config import from_dict

    meta = embedding_metadata(root, table)
    if "embed_config" not in meta:
        raise FileNotFoundError(f"{root}/{table} records no embed settings: embed the pool with `curate embed` first")
    return from_dict(EmbedConfig, json.loads(meta["embed_config"]))


def check_same_model(root: str, identity: dict[str, str], table: str = EMBEDDINGS) -> None:
    """Refuse to add vectors of a different model to an existing table."""
    existing = embedding_metadata(root, table)
    differing = [k for k in identity if k in existing and existing[k] != identity[k]]
    if differing:
        detail = "; ".join(f"{k}: table has {existing[k]!r}, this run {identity[k]!r}" for k in differing)
        raise ModelMismatchError(
            f"{root}/{table} already holds embeddings of another model or preprocessing ({detail}); "
            "embeddings of two models are never mixed: use another catalog or --overwrite"
        )


def plan_units(root: str, images_per_unit: int) -> list[dict[str, Any]]:
    """Usable pool rows in image_id order, cut into fixed-size units."""
    pool = query(root, "SELECT image_id, uri FROM pool WHERE status = 'ok' ORDER BY image_id")
    ids = pool.column("image_id").to_pylist()
    uris = pool.column("uri").to_pylist()
    return [
        {"name": f"emb-{i // images_per_unit:06d}", "ids": ids[i : i + images_per_unit],
         "uris": uris[i : i + images_per_unit]}
        for i in range(0, len(ids), images_per_unit)
    ]


def decode_unit(row: dict[str, Any], config: EmbedConfig) -> dict[str, Any]:
    """Decode and centre-crop every image of a unit to uint8; failures become error reasons."""
    pre = preprocess_for(config)
    size = config.image_size
    pixels = np.zeros((len(row["ids"]), size, size, 3), np.uint8)
    reasons: list[list[str] | None] = []
    for i, uri in enumerate(row["uris"]):
        try:
            img = decode_rgb(read_image_bytes(uri), max_pixels=config.max_pixels, min_side=pre.resize_size)
            pixels[i] = pre.crop(img)
            reasons.append(None)
        except FileNotFoundError:
            reasons.append([MISSING, "file vanished after ingest"])
        except DecodeError as e:
            reasons.append([e.reason, str(e)])
    return {"name": row["name"], "ids": np.asarray(row["ids"], np.int64), "uris": json.dumps(row["uris"]),
            "pixels": pixels, "reasons": json.dumps(reasons)}


class Embedder:
    """Ray actor: holds the backbone, embeds whole units and commits their shards."""

    def __init__(self, root: str, config: EmbedConfig):
        import torch

        from training.models.checkpoints import load_backbone

        self.torch = torch
        self.root, self.config = root, config
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu":  # decode tasks are light; the model should use the whole machine
            torch.set_num_threads(config.torch_threads or os.cpu_count() or 1)
        self.model, info = load_backbone(config.model, config.weights, device=self.device)
        self.metadata = {**model_identity(config, info.sha256), "embed_config": json.dumps(asdict(config))}
        self.pre = preprocess_for(config)

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        torch = self.torch
        out = []
        with torch.inference_mode():
            for start in range(0, len(pixels), self.config.batch_size):
                x = torch.from_numpy(self.pre.normalize_batch(pixels[start : start + self.config.batch_size]))
                x = x.to(self.device, non_blocking=True)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device == "cuda"):
                    emb = self.model.embed(x, pooling=self.config.pooling, normalize=self.config.normalize)
                out.append(emb.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.embed_dim_for(self.config.pooling)), np.float32)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        counts = [self.commit_unit(str(batch["name"][i]), batch["ids"][i], json.loads(batch["uris"][i]),
                                   batch["pixels"][i], json.loads(batch["reasons"][i]))
                  for i in range(len(batch["name"]))]
        return {"counts": np.asarray([json.dumps(c) for c in counts])}

    def commit_unit(self, name: str, ids: np.ndarray, uris: list[str], pixels: np.ndarray,
                    reasons: list[list[str] | None]) -> dict[str, int]:
        ok = np.asarray([r is None for r in reasons], bool)
        x = self.embed(pixels[ok]).astype(self.config.storage_dtype)
        write_shards(self.root, EMBEDDINGS, name, embeddings_table(ids[ok], x, self.metadata))
        failed = [{"image_id": int(i), "uri": u, "stage": STAGE, "reason": r[0], "message": r[1]}
                  for i, u, r in zip(ids, uris, reasons) if r is not None]
        if failed:
            write_shards(self.root, "errors", f"{STAGE}-{name}", pa.Table.from_pylist(failed, schema=stamp(ERRORS, "errors")))
        counts = {"items": len(ids), "ok": int(ok.sum()), "errors": len(failed)}
        Ledger(self.root, STAGE).mark(name, counts)
        return counts


def _resources(config: EmbedConfig) -> dict[str, Any]:
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus >= 1:
        return {"num_gpus": 1, "num_cpus": config.actor_cpus, "concurrency": max(1, min(int(gpus), config.actors))}
    return {"num_cpus": config.actor_cpus, "concurrency": config.actors}


def embed(root: str, config: EmbedConfig | None = None, *, address: str | None = None,
          overwrite: bool = False) -> dict[str, Any]:
    """Embed every usable pool image not yet embedded; returns row counts."""
    from training.models.checkpoints import file_sha256, load_backbone

    config = config or EmbedConfig()
    ledger = Ledger(root, STAGE)
    if overwrite:
        from catalog.shards import delete_table

        ledger.reset()
        delete_table(root, EMBEDDINGS)
    weights_sha = file_sha256(config.weights) if config.weights else None
    if config.model.startswith("curate:"):
        weights_sha = file_sha256(config.model.split(":", 1)[1])
    load_backbone(config.model, config.weights)  # fail fast on a bad checkpoint, before Ray starts
    identity = model_identity(config, weights_sha)
    check_same_model(root, identity)
    units = plan_units(root, config.images_per_unit)
    ledger.check_plan(fingerprint(identity, [(u["name"], u["ids"][0], len(u["ids"])) for u in units]))
    done = ledger.done()
    todo = [u for u in units if u["name"] not in done]
    if identity["weights_sha256"].startswith("random-init"):
        print(f"NOTE: {config.model} is randomly initialised (no --weights): embeddings reflect colour and "
              "layout statistics only, not learned semantics")
    with RunManifest(root, STAGE, asdict(config)) as manifest:
        manifest.inputs = {"pool_images": sum(len(u["ids"]) for u in units), **identity}
        totals = {"items": 0, "ok": 0, "errors": 0}
        bar = progress(sum(len(u["ids"]) for u in units), "embed", unit="img",
                       initial=sum(len(u["ids"]) for u in units if u["name"] in done))
        if todo:
            ensure_ray(address)
            ds = ray.data.from_items(todo, override_num_blocks=len(todo))
            ds = ds.map(decode_unit, fn_kwargs={"config": config}, num_cpus=config.decode_cpus)
            ds = ds.map_batches(Embedder, fn_constructor_kwargs={"root": root, "config": config},
                                batch_size=1, **_resources(config))
            with bar:
                for out in ds.iter_rows():
                    counts = json.loads(out["counts"])
                    for key in totals:
                        totals[key] += counts[key]
                    bar.update(counts["items"])
        else:
            bar.close()
        manifest.rows = {"in": totals["items"], "out": totals["ok"], "errored": totals["errors"]}
    ledger.mark_complete(identity)
    return manifest.rows
