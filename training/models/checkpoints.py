"""Load backbones from files (official DINOv2/DINOv3 releases, our own export) with clear errors.

Files are read without executing code: `torch.load(weights_only=True)` for pickled checkpoints,
safetensors otherwise. Every failure is a `CheckpointError` that names the file and what is wrong.
`inspect_backbone` checks a file by its header and key names only (a safetensors header, or a
memory-mapped data-only unpickling that reads no tensor bytes), so a driver can refuse a bad checkpoint
without building the model; the workers then load it once each. Files may live anywhere fsspec reaches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file, save_file
from torch import Tensor

from catalog.errors import UserError
from catalog.paths import is_local, read_bytes, resolve, retry
from training.models.config import MODEL_INPUTS, MODEL_SIZES, InputSpec, ViTConfig
from training.models.layers import k_bias_mask
from training.models.rope import rope_periods
from training.models.vit import VisionTransformer, n_params

CURATE_PREFIX = "curate:"
# Our exports' one metadata key: "/2" holds {"vit": ViTConfig, "input": InputSpec}; "/1" (older files)
# only the ViTConfig, and such files are embedded at the default InputSpec (224 px, ImageNet mean/std).
_FORMAT = "curate-vit/2"
_FORMAT_V1 = "curate-vit/1"
_MAX_HEADER = 100 * 1024**2
# Prefixes of training checkpoints (DINOv2/v3 `teacher_checkpoint.pth`, `model_final.pth`, DDP),
# tried in this order: the EMA teacher is the model people evaluate.
_PREFIXES = ("", "teacher.backbone.", "backbone.", "module.backbone.", "model.", "module.", "student.backbone.")
_CONTAINER_KEYS = ("teacher", "model", "state_dict")
_SHOW = 5


class CheckpointError(UserError):
    """A checkpoint file cannot be read or does not fit the requested backbone."""


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    config: ViTConfig
    sha256: str | None
    n_params: int
    random_init: bool


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone is, established without building it: ``architecture`` (the registry size, or
    ``curate`` for our exports, whose file carries its config), its ViTConfig and input preprocessing."""

    architecture: str
    config: ViTConfig
    input: InputSpec
    weights: str | None  # the file as given (information only: identity is its sha256)

    @property
    def random_init(self) -> bool:
        return self.weights is None


def file_sha256(path: str | Path) -> str:
    """sha256 of a file anywhere fsspec reaches, streamed."""
    fs, p = resolve(str(path))
    h = hashlib.sha256()

    def read() -> None:
        with fs.open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)

    retry(read)
    return h.hexdigest()


def _must_exist(path: str) -> None:
    fs, p = resolve(path)
    if not retry(lambda: fs.isfile(p)):
        raise CheckpointError(f"{path}: no such checkpoint file")


def _safetensors_header(path: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Key names and shapes (as meta tensors) and the metadata of a safetensors file, from its header."""
    fs, p = resolve(path)
    try:
        with fs.open(p, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > _MAX_HEADER:
                raise ValueError(f"header of {n} bytes")
            header = json.loads(f.read(n))
        meta = header.pop("__metadata__", None) or {}
        tensors = {k: torch.empty(v["shape"], device="meta") for k, v in header.items()}
    except (struct.error, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: truncated, corrupt or not a safetensors checkpoint ({e})") from e
    return tensors, meta


def _first(names: list[str]) -> str:
    more = f" (+{len(names) - _SHOW} more)" if len(names) > _SHOW else ""
    return ", ".join(names[:_SHOW]) + more


def _unwrap(obj: object, path: Path) -> dict[str, Tensor]:
    """Find the backbone tensors inside a plain state dict or a DINO training/eval checkpoint."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    for key in _CONTAINER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, dict) and "patch_embed.proj.weight" not in obj:
            obj = inner
            break
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    for prefix in _PREFIXES:
        if prefix + "patch_embed.proj.weight" in tensors:
            sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            return _unchunk_blocks(sd)
    raise CheckpointError(
        f"{path}: not a ViT backbone state dict (no 'patch_embed.proj.weight'; "
        f"first keys: {_first(sorted(tensors)) or 'none'})"
    )


def _unchunk_blocks(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """DINOv2 FSDP training checkpoints nest blocks as `blocks.{chunk}.{i}.`; index i is global."""
    chunked = re.compile(r"^blocks\.\d+\.(\d+)\.(.+)$")
    if not any(chunked.match(k) for k in sd):
        return sd
    return {(f"blocks.{m.group(1)}.{m.group(2)}" if (m := chunked.match(k)) else k): v for k, v in sd.items()}


def _read_tensors(path: str, header_only: bool) -> object:
    """The file's objects, data-only; ``header_only`` reads no tensor bytes (meta tensors or a memory map)."""
    if path.endswith(".safetensors"):
        if header_only:
            return _safetensors_header(path)[0]
        try:
            return load_file(path) if is_local(path) else load_safetensors_bytes(read_bytes(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: truncated, corrupt or not a safetensors checkpoint ({e})") from e
    try:
        if is_local(path):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=header_only)
        return torch.load(io.BytesIO(read_bytes(path)), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        raise CheckpointError(f"{path}: {describe_load_error(e)}") from e


def describe_load_error(e: BaseException) -> str:
    """Why unpickling a file failed, in one line: a refused global (a file that would run code) or damage."""
    text = str(e).strip()
    refused = re.search(r"Unsupported global: (?:GLOBAL )?([\w.]+)", text)
    if refused:
        return (f"holds Python objects other than tensors and plain containers ({refused.group(1)}); "
                "refusing to unpickle")
    detail = text.splitlines()[0] if text else ""
    return f"truncated, corrupt or not a checkpoint ({type(e).__name__}{': ' + detail if detail else ''})"


def read_state_dict(path: str | Path, header_only: bool = False) -> dict[str, Tensor]:
    """Backbone tensors of a checkpoint file, as float32 where floating, without unpickling objects;
    ``header_only``: only their names and shapes (no tensor bytes read)."""
    path = str(path)
    _must_exist(path)
    sd = _unwrap(_read_tensors(path, header_only), Path(path))
    if header_only:
        return sd
    return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}


@dataclass(frozen=True)
class _Arch:
    """What a state dict says about the architecture identity of its ViT."""

    family: str
    embed_dim: int
    depth: int
    patch_size: int
    n_registers: int
    ffn: str

    @classmethod
    def of_config(cls, cfg: ViTConfig) -> _Arch:
        return cls(cfg.family, cfg.embed_dim, cfg.depth, cfg.patch_size, cfg.n_registers, cfg.ffn)

    @classmethod
    def of_state_dict(cls, sd: dict[str, Tensor]) -> _Arch:
        w = sd["patch_embed.proj.weight"]
        blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
        family = "dinov3" if "storage_tokens" in sd or "rope_embed.periods" in sd else "dinov2"
        regs = sd.get("storage_tokens", sd.get("register_tokens"))
        swiglu = any(re.match(r"blocks\.\d+\.mlp\.w(12|1)\.weight$", k) for k in sd)
        return cls(
            family=family,
            embed_dim=int(w.shape[0]),
            depth=max(blocks) + 1 if blocks else 0,
            patch_size=int(w.shape[-1]),
            n_registers=int(regs.shape[1]) if regs is not None and regs.dim() == 3 else 0,
            ffn="swiglu" if swiglu else "mlp",
        )

    def describe(self) -> str:
        return (
            f"embed_dim {self.embed_dim}, depth {self.depth}, patch {self.patch_size}, "
            f"{self.n_registers} registers, {self.ffn} FFN, {self.family} layout"
        )


def _check_name(sd: dict[str, Tensor], name: str, cfg: ViTConfig, path: Path) -> None:
    found = _Arch.of_state_dict(sd)
    if found == _Arch.of_config(cfg):
        return
    alike = [n for n, c in MODEL_SIZES.items() if _Arch.of_config(c) == found]
    hint = f"looks like {' or '.join(alike)}" if alike else "matches no registered size"
    raise CheckpointError(
        f"{path}: file holds a ViT with {found.describe()} ({hint}), not {name} "
        f"({_Arch.of_config(cfg).describe()})"
    )


def _fit_config(sd: dict[str, Tensor], cfg: ViTConfig) -> ViTConfig:
    """Adopt the optional parts that vary between releases of one size: local cls norm, pos grid."""
    changes: dict[str, object] = {"local_cls_norm": "local_cls_norm.weight" in sd}
    pos = sd.get("pos_embed")
    if cfg.pos_encoding == "learned" and pos is not None and pos.dim() == 3:
        grid = round((pos.shape[1] - 1) ** 0.5)
        if grid * grid == pos.shape[1] - 1:
            changes["pos_embed_grid"] = grid
    return dataclasses.replace(cfg, **changes)  # type: ignore[arg-type]


def _fill_constant_buffers(sd: dict[str, Tensor], cfg: ViTConfig) -> dict[str, Tensor]:
    """Add buffers that are fixed functions of the config when a file leaves them out."""
    sd = dict(sd)
    if cfg.pos_encoding == "rope":
        periods = rope_periods(cfg.head_dim, cfg.rope_base, cfg.rope_min_period, cfg.rope_max_period)
        sd.setdefault("rope_embed.periods", periods)
    if cfg.qkv_bias and cfg.mask_k_bias:
        for i in range(cfg.depth):
            sd.setdefault(f"blocks.{i}.attn.qkv.bias_mask", k_bias_mask(cfg.embed_dim))
    return sd


def _check_fits(sd: dict[str, Tensor], cfg: ViTConfig, path: Path) -> VisionTransformer:
    """The model on the meta device (no memory) after checking every key and shape of ``sd`` against it."""
    with torch.device("meta"):
        model = VisionTransformer(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_first(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_first(unexpected)}")
        raise CheckpointError(f"{path}: state dict does not fit the model; " + "; ".join(parts))
    wrong = [k for k in expected if tuple(sd[k].shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        more = f" (and {len(wrong) - 1} more: {_first(wrong[1:])})" if len(wrong) > 1 else ""
        raise CheckpointError(
            f"{path}: shape mismatch for '{k}': expected {tuple(expected[k].shape)}, "
            f"found {tuple(sd[k].shape)}{more}"
        )
    return model


def _build_and_load(sd: dict[str, Tensor], cfg: ViTConfig, path: Path, device: str | torch.device) -> VisionTransformer:
    model = _check_fits(sd, cfg, path)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(device).eval()


def inspect_backbone(name: str, weights: str | Path | None) -> BackboneSpec:
    """Check ``name``/``weights`` by the file's header and key names only, and say what the backbone is."""
    if name.startswith(CURATE_PREFIX):
        path = name[len(CURATE_PREFIX):]
        cfg, spec, sd = _read_curate(path, header_only=True)
        _check_fits(sd, cfg, Path(path))
        return BackboneSpec("curate", cfg, spec, path)
    cfg = _registered(name)
    if weights is None:
        return BackboneSpec(name, cfg, MODEL_INPUTS[name], None)
    path = str(weights)
    sd = read_state_dict(path, header_only=True)
    _check_name(sd, name, cfg, Path(path))
    cfg = _fit_config(sd, cfg)
    _check_fits(_fill_constant_buffers(sd, cfg), cfg, Path(path))
    return BackboneSpec(name, cfg, MODEL_INPUTS[name], path)


def _registered(name: str) -> ViTConfig:
    if name not in MODEL_SIZES:
        raise CheckpointError(f"unknown backbone {name!r}; known: {', '.join(MODEL_SIZES)} or curate:PATH")
    return MODEL_SIZES[name]


def load_backbone(
    name: str, weights: str | Path | None, device: str | torch.device = "cpu", *, hash_weights: bool = True
) -> tuple[VisionTransformer, BackboneInfo]:
    """Build `name` and load `weights` into it; returns the model in eval mode and what was loaded.

    `name` is a key of MODEL_SIZES (official sizes and test sizes) or `curate:PATH` for a file
    written by `export_backbone` (then `weights` is ignored). `weights=None` with a registered name
    gives a seeded random initialisation (`random_init=True`). `hash_weights=False` leaves `sha256`
    None for callers that hashed the file already (the embed stage hashes it once, on the driver).
    """
    if name.startswith(CURATE_PREFIX):
        path = name[len(CURATE_PREFIX):]
        cfg, _, sd = _read_curate(path, header_only=False)
        model = _build_and_load(sd, cfg, Path(path), device)
        sha = file_sha256(path) if hash_weights else None
        return model, BackboneInfo(name, cfg, sha, n_params(model), random_init=False)
    cfg = _registered(name)
    if weights is None:
        model = VisionTransformer(cfg).to(device).eval()
        return model, BackboneInfo(name, cfg, None, n_params(model), random_init=True)
    path = str(weights)
    sd = read_state_dict(path)
    _check_name(sd, name, cfg, Path(path))
    cfg = _fit_config(sd, cfg)
    model = _build_and_load(_fill_constant_buffers(sd, cfg), cfg, Path(path), device)
    sha = file_sha256(path) if hash_weights else None
    return model, BackboneInfo(name, cfg, sha, n_params(model), random_init=False)


def export_backbone(model: VisionTransformer, path: str | Path, input_spec: InputSpec | None = None) -> str:
    """Write the backbone as safetensors with its ViTConfig and input preprocessing in the metadata;
    returns the file sha256. ``path`` may be an fsspec URL: the file is then written locally first and
    uploaded in one put."""
    url = str(path)
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    # One metadata key: safetensors stores the metadata map in arbitrary key order, and a second key
    # would make the bytes (and so the sha256 that identifies a model) differ between runs.
    doc = {"vit": json.loads(model.config.to_json()), "input": (input_spec or InputSpec()).to_json()}
    metadata = {_FORMAT: json.dumps(doc, sort_keys=True)}
    fs, target = resolve(url)
    if is_local(url):
        fs.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = target + ".tmp"
        _save_readable(sd, tmp, metadata)
        os.replace(tmp, target)
        return file_sha256(target)
    with tempfile.TemporaryDirectory() as folder:
        tmp = os.path.join(folder, "backbone.safetensors")
        _save_readable(sd, tmp, metadata)
        retry(lambda: fs.put_file(tmp, target))
        return file_sha256(tmp)


def _save_readable(sd: dict[str, Tensor], path: str, metadata: dict[str, str]) -> None:
    """``save_file``, then the mode every other file gets (0666 less the umask): safetensors writes 0600,
    which other users of a shared model folder (or a container with another uid) cannot read."""
    save_file(sd, path, metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _read_curate(path: str, header_only: bool) -> tuple[ViTConfig, InputSpec, dict[str, Tensor]]:
    _must_exist(path)
    sd, meta = _safetensors_header(path)
    if _FORMAT not in meta and _FORMAT_V1 not in meta:
        raise CheckpointError(f"{path}: not a curate backbone export (no '{_FORMAT}' metadata)")
    try:
        if _FORMAT in meta:
            doc = json.loads(meta[_FORMAT])
            cfg, spec = ViTConfig.from_json(json.dumps(doc["vit"])), InputSpec.from_json(doc["input"])
        else:
            cfg, spec = ViTConfig.from_json(meta[_FORMAT_V1]), InputSpec()
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: unreadable ViT config in metadata ({e})") from e
    if not header_only:
        sd = _read_tensors(path, header_only=False)  # type: ignore[assignment]
    return cfg, spec, sd
