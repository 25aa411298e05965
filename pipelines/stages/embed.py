"""``curate embed``: the pool's usable images → ``embeddings`` (one vector per image).

Units of pool rows are decoded and centre-cropped to uint8 pixels by ``load`` (Ray CPU tasks), then
embedded by workers that each hold the backbone (``setup``: an actor pool, one actor per GPU or a CPU
actor; in-process: one). The driver never builds the model: it checks the checkpoint by its header and
key names, hashes the weights file once, and ships the resulting identity (architecture + weights hash
+ preprocessing) to the workers. Preprocessing comes with the backbone (a registry entry's default, or
what a ``curate:`` export records) unless ``image_size`` is given.

Where the driver sees CUDA (and torchvision), ``decode`` ``auto`` means ``device``: ``load`` only reads
plain JPEGs (decoding the rest on the CPU, with the same error reasons), and the GPU workers decode
them in batches with nvJPEG, resize and crop them there, and prepare the next batch while the model
runs (`curation.device_decode`), holding ``units_in_flight`` units at once so that one decodes while
another runs the model. On CUDA host-decoded pixels also go to the GPU as uint8 and are normalised
there. On CPU the default is the host path, unchanged; ``decode=device`` on a CPU worker runs the same
device path with PIL standing in for nvJPEG (what the tests check).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import threading
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalog.config import ConfigError, above, at_least
from catalog.decode import DecodeError, Preprocess, decode_crop, plain_jpeg
from catalog.embeddings import EmbeddingIdentity, embeddings_table
from catalog.images import UnreadableItem, read_item
from catalog.ledger_items import Item, Members, Retiring, live
from catalog.schemas import EMBEDDINGS_TABLE, ERRORS, ERRORS_TABLE, POOL_TABLE, stamp
from catalog.threads import machine_cpus
from pipelines.demo.backbone import DEMO_EMBED_SETTINGS
from pipelines.embed_items import pool_slices, still_usable, unit_images
from pipelines.stage import Output, Resources, Stage, StageContext, Totals, Unit

log = logging.getLogger("curate.pipelines")
REMEDY = "embeddings of two models are never mixed: use another catalog or --overwrite"


@dataclass(frozen=True)
class EmbedConfig:
    """``image_size`` None: the backbone's own resolution (registry entry or export metadata).
    ``random_init``: embed with a seeded random backbone when no weights are given (tests, ablations);
    without it a registry name needs ``weights`` (see ``require_weights``).

    ``decode``: ``host`` decodes every image in the CPU decode tasks; ``device`` leaves plain JPEGs to
    the model workers (nvJPEG on CUDA, PIL's decoder on a CPU worker); ``auto`` is ``device`` when the
    driver sees CUDA and torchvision, else ``host`` (set ``device`` for GPU workers of a CPU driver).
    Like the device's precision, the decoder is how the work runs: on the demo pool's JPEGs both give
    pixels within a few levels of each other (``tests/curation/test_device_decode.py``).
    ``units_in_flight``: units a worker holds at once on the device path.
    """

    model: str = "dinov3_vits16"
    weights: str | None = None
    image_size: int | None = None
    pooling: Literal["cls", "mean", "cls+mean"] = "cls"
    normalize: bool = True
    storage_dtype: Literal["float16", "float32"] = "float16"
    images_per_unit: int = 256
    batch_size: int = 64
    actors: int = 1
    decode_cpus: float = 0.5
    actor_cpus: float = 1.0
    max_pixels: int = 64_000_000
    torch_threads: int | None = None  # CPU workers: None = every CPU the process may use, not Ray's one
    decode: Literal["auto", "host", "device"] = "auto"
    units_in_flight: int = 2
    seed: int = 0
    random_init: bool = False

    def __post_init__(self) -> None:
        at_least(self, 2, "image_size")
        at_least(self, 1, "images_per_unit", "batch_size", "actors", "max_pixels", "torch_threads",
                 "units_in_flight")
        above(self, 0, "decode_cpus", "actor_cpus")


def require_weights(config: EmbedConfig, prefix: str = "") -> None:
    """Refuse to embed with a random backbone nobody asked for, naming the two ways out.

    A registry name without ``weights`` builds a randomly initialised ViT, whose embeddings group images
    by colour and layout only; a run that "succeeds" with it is a silently wrong result. ``prefix`` is how
    the caller's ``--set`` keys start (``embed.`` for build-lvd).
    """
    has_weights = config.weights is not None or config.model.startswith("curate:")
    if has_weights and config.random_init:
        raise ConfigError(f"{prefix}random_init=true contradicts the weights given ({config.weights or config.model})")
    if has_weights or config.random_init:
        return
    demo = " ".join(prefix + s for s in DEMO_EMBED_SETTINGS)
    raise ConfigError(
        f"{prefix}weights is not set, so {config.model} would embed with random weights. Either give a local "
        f"file of an official release's weights (--set {prefix}model=dinov3_vitl16 "
        f"{prefix}weights=/models/dinov3_vitl16_pretrain.pth; DINOv2/DINOv3 checkpoints by name), or, for a "
        f"trial run, the shipped demo backbone (trained on the synthetic demo pool only): --set {demo} "
        f"(or --set {prefix}random_init=true for random weights on purpose)")


@dataclass(frozen=True)
class EmbedFacts:
    """What the driver established: the identity every shard records, and how to preprocess."""

    identity: EmbeddingIdentity
    preprocess: Preprocess
    embed_config: str  # the resolved config (image size filled in), JSON, for seeds embedded alike
    decode: Literal["host", "device"] = "host"  # ``auto`` resolved where the driver runs


@dataclass
class EmbedWorker:
    """What ``setup`` makes once per worker: the backbone, where it runs, and (device path) the JPEG decoder."""

    model: Any
    device: Any  # torch.device
    decoder: Any = None  # curation.device_decode.JpegDecoder on the device path
    lock: threading.Lock = field(default_factory=threading.Lock)  # one model batch at a time


class EmbedStage(Stage):
    name = "embed"
    config_class = EmbedConfig
    reads = (POOL_TABLE,)
    writes = (EMBEDDINGS_TABLE, ERRORS_TABLE)
    retires_in_place = True  # its items are the pool's shards
    runtime_keys = frozenset({"batch_size", "actors", "decode_cpus", "actor_cpus", "torch_threads", "decode",
                              "units_in_flight"})
    distributable = True
    in_process_below = 600
    empty_schemas = {ERRORS_TABLE: stamp(ERRORS, ERRORS_TABLE)}

    def prepare(self, ctx: StageContext) -> EmbedFacts:
        """Check the checkpoint by its header, hash the weights once, and refuse a table of another model."""
        from training.models.checkpoints import file_sha256, inspect_backbone

        config: EmbedConfig = ctx.config
        require_weights(config)
        spec = inspect_backbone(config.model, config.weights)
        size = config.image_size or spec.input.size
        if size < spec.config.patch_size:
            raise ConfigError(f"image_size {size} is smaller than the backbone's patch size {spec.config.patch_size}")
        pre = Preprocess(size=size, mean=spec.input.mean, std=spec.input.std)
        sha = file_sha256(spec.weights) if spec.weights else f"random-init-seed{config.seed}"
        identity = EmbeddingIdentity(spec.architecture, sha, pre.fingerprint(), config.pooling, str(config.normalize))
        identity.check(EmbeddingIdentity.of_table(ctx.root), f"{ctx.root}/{EMBEDDINGS_TABLE}", REMEDY)
        if spec.random_init:
            log.warning("%s is randomly initialised (random_init=true): embeddings reflect colour and layout "
                        "statistics only, not learned semantics", config.model)
        return EmbedFacts(identity, pre, json.dumps(asdict(replace(config, image_size=size))), _decode_mode(config))

    def settings(self, ctx: StageContext) -> dict[str, Any]:
        config: EmbedConfig = ctx.config
        return {**ctx.facts.identity.metadata(), "storage_dtype": config.storage_dtype,
                "max_pixels": config.max_pixels, "images_per_unit": config.images_per_unit}

    def items(self, ctx: StageContext) -> list[Item]:
        """The pool by shard slices of ``images_per_unit`` rows (`pipelines.embed_items`): a rerun on a grown
        pool embeds only the images of new or rewritten shards it has not embedded, and drops the vectors of
        images gone from the pool; the plan holds shards, not images."""
        return pool_slices(ctx.root, ctx.config.images_per_unit)

    def unit_prefix(self, ctx: StageContext) -> str:
        return "emb"

    def items_per_unit(self, ctx: StageContext) -> int:
        return 1

    def unit_payload(self, ctx: StageContext, items: list[Item], generation: int) -> dict[str, Any]:
        ids, uris = unit_images(ctx.root, ctx.run, [i.key for i in items], ctx.config.images_per_unit, generation)
        return {"ids": ids, "uris": uris}

    def unit_size(self, payload: dict[str, Any], items: list[Item]) -> int:
        return len(payload["ids"])

    def retire(self, ctx: StageContext, tables: dict[str, pa.Table], retiring: Retiring,
               members: Members) -> dict[str, pa.Table]:
        """A finished unit whose pool shard was rewritten keeps the rows of the images still usable there."""
        keep = still_usable(ctx.root, set(live(members)) | retiring.changed)
        return {t: rows.filter(pc.is_in(rows.column("image_id"), keep)) for t, rows in tables.items()}

    def resources(self, ctx: StageContext) -> Resources:
        import ray

        config: EmbedConfig = ctx.config
        gpus = ray.cluster_resources().get("GPU", 0)
        units = config.units_in_flight if ctx.facts.decode == "device" else 1
        if gpus >= 1:
            return Resources(config.actor_cpus, 1, max(1, min(int(gpus), config.actors)), config.decode_cpus, units)
        return Resources(config.actor_cpus, 0, config.actors, config.decode_cpus, units)

    def load(self, ctx: StageContext, unit: Unit) -> dict[str, Any]:
        """Decode and centre-crop every image of a unit to uint8; failures become error reasons. On the
        device path plain JPEGs are only read (``encoded``) and the other images' pixels are packed."""
        config: EmbedConfig = ctx.config
        pre: Preprocess = ctx.facts.preprocess
        keep_jpegs = ctx.facts.decode == "device"
        pixels = np.zeros((unit.size, pre.size, pre.size, 3), np.uint8)
        encoded = [b""] * unit.size
        reasons, messages = [], []
        for i, uri in enumerate(unit.payload["uris"]):
            reason, message = "", ""
            try:
                data = read_item(uri)
                if keep_jpegs and plain_jpeg(data, config.max_pixels):
                    encoded[i] = data
                else:
                    pixels[i] = decode_crop(data, pre, config.max_pixels)
            except UnreadableItem as e:
                reason, message = e.reason, f"unreadable after ingest: {e}"
            except DecodeError as e:
                reason, message = e.reason, str(e)
            reasons.append(reason)
            messages.append(message)
        if not keep_jpegs:
            return {"pixels": pixels, "reasons": reasons, "messages": messages}
        host = [i for i in range(unit.size) if not encoded[i] and not reasons[i]]
        return {"encoded": encoded, "host_pixels": pixels[host].tobytes(), "reasons": reasons, "messages": messages}

    def setup(self, ctx: StageContext) -> EmbedWorker:
        """The backbone, built and loaded once per worker (the weights hash comes from the driver), and on
        the device path its JPEG decoder."""
        import torch

        from training.models.checkpoints import load_backbone

        config: EmbedConfig = ctx.config
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cpu":  # decode tasks are light; the model should use the whole machine
            torch.set_num_threads(config.torch_threads or machine_cpus())
        model, _ = load_backbone(config.model, config.weights, device=device, hash_weights=False)
        return EmbedWorker(model, device, _decoder(device) if ctx.facts.decode == "device" else None)

    def process(self, ctx: StageContext, unit: Unit, state: EmbedWorker, loaded: dict[str, Any] | None) -> Output:
        config: EmbedConfig = ctx.config
        pre: Preprocess = ctx.facts.preprocess
        ids = np.asarray(unit.payload["ids"], np.int64)
        reasons = [str(r) for r in loaded["reasons"]]
        messages = [str(m) for m in loaded["messages"]]
        if "encoded" in loaded:
            encoded = [bytes(e) for e in loaded["encoded"]]
            host = np.frombuffer(bytes(loaded["host_pixels"]), np.uint8).reshape(-1, pre.size, pre.size, 3)
        else:
            encoded = [b""] * len(ids)
            host = np.asarray(loaded["pixels"])[np.asarray([r == "" for r in reasons], bool)]
        if state.device.type == "cuda" or "encoded" in loaded:
            x, failed = _embed_on_device(state, pre, config, encoded, host, reasons)
            for i, e in failed.items():
                reasons[i], messages[i] = e.reason, str(e)
        else:  # the CPU path: normalised on the host, bit-identical to what it always gave
            x = _embed(state, pre, config, host)
        ok = np.asarray([r == "" for r in reasons], bool)
        metadata = {**ctx.facts.identity.metadata(), "embed_config": ctx.facts.embed_config,
                    "model_source": config.weights or config.model}
        errors = [{"image_id": int(i), "uri": u, "stage": self.name, "reason": r, "message": m}
                  for i, u, r, m in zip(ids, unit.payload["uris"], reasons, messages) if r]
        return Output({EMBEDDINGS_TABLE: embeddings_table(ids[ok], x.astype(config.storage_dtype), metadata),
                       ERRORS_TABLE: pa.Table.from_pylist(errors, schema=stamp(ERRORS, ERRORS_TABLE))})

    def finish(self, ctx: StageContext, totals: Totals) -> dict[str, Any]:
        out, errored = totals.rows(EMBEDDINGS_TABLE), totals.rows(ERRORS_TABLE)
        return {"in": out + errored, "out": out, "errored": errored,
                **ctx.facts.identity.metadata()}


def _decode_mode(config: EmbedConfig) -> Literal["host", "device"]:
    """``auto``: the device path where this process sees CUDA and torchvision is installed."""
    if config.decode != "auto":
        return config.decode
    import torch

    return "device" if torch.cuda.is_available() and importlib.util.find_spec("torchvision") else "host"


def _decoder(device: Any) -> Any:
    from curation.device_decode import jpeg_decoder

    try:
        return jpeg_decoder(device)
    except ImportError as e:
        raise ConfigError(f"decode=device on {device} needs torchvision ({e}); install the torchvision that "
                          "matches torch, or --set decode=host") from e


def _embed(state: EmbedWorker, pre: Preprocess, config: EmbedConfig, pixels: np.ndarray) -> np.ndarray:
    import torch

    out = []
    with torch.inference_mode():
        for start in range(0, len(pixels), config.batch_size):
            x = torch.from_numpy(pre.normalize_batch(pixels[start : start + config.batch_size])).to(state.device)
            out.append(state.model.embed(x, pooling=config.pooling, normalize=config.normalize).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, state.model.embed_dim_for(config.pooling)), np.float32)


def _embed_on_device(state: EmbedWorker, pre: Preprocess, config: EmbedConfig, encoded: list[bytes],
                     host: np.ndarray, reasons: list[str]) -> tuple[np.ndarray, dict[int, DecodeError]]:
    """Vectors of the usable images in unit order, from JPEG bytes and host pixels, batches prepared
    one ahead; also the images no decoder could read (their reasons are the CPU path's)."""
    import torch

    from curation.device_decode import device_batches, jpeg_decoder, prefetched

    decoder = state.decoder or jpeg_decoder(state.device)  # host-decoded units carry no JPEG bytes
    batches = device_batches(encoded, host, [r == "" for r in reasons], pre, decoder,
                             lambda data: decode_crop(data, pre, config.max_pixels), state.device, config.batch_size)
    cuda = state.device.type == "cuda"
    out, failed, redecoded = [], {}, 0
    with torch.inference_mode():
        for batch in prefetched(batches, state.device):
            failed.update(batch.failed)
            redecoded += batch.redecoded
            if batch.positions:
                with state.lock, torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                    out.append(state.model.embed(batch.x, pooling=config.pooling, normalize=config.normalize).float())
    if redecoded or failed:
        log.warning("embed: the device decoder rejected %d JPEG(s) of a unit; the CPU decoder read %d of them",
                    redecoded + len(failed), redecoded)
    if not out:
        return np.zeros((0, state.model.embed_dim_for(config.pooling)), np.float32), failed
    return torch.cat(out).cpu().numpy(), failed


STAGE = EmbedStage()
