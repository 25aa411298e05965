"""Loading official-layout DINOv2/DINOv3 files and our own export, checked against plain tensor maths.

The state dicts are written key by key with the official names and shapes (not from our module),
and the expected outputs come from an independent forward pass written here with plain ops.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from training.models import CheckpointError, export_backbone, load_backbone

D, HEADS, DEPTH = 64, 2, 2
HD = D // HEADS
Sd = dict[str, torch.Tensor]


class _Rand:
    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, *shape: int, std: float = 0.15, mean: float = 0.0) -> torch.Tensor:
        return mean + std * torch.randn(*shape, generator=self.gen)


def _block_keys(r: _Rand, prefix: str, ffn: dict[str, tuple[int, ...]], k_mask: bool) -> Sd:
    sd = {
        prefix + "norm1.weight": r(D, mean=1.0), prefix + "norm1.bias": r(D),
        prefix + "attn.qkv.weight": r(3 * D, D, std=0.3), prefix + "attn.qkv.bias": r(3 * D),
        prefix + "attn.proj.weight": r(D, D), prefix + "attn.proj.bias": r(D),
        prefix + "ls1.gamma": r(D, std=0.3, mean=0.5),
        prefix + "norm2.weight": r(D, mean=1.0), prefix + "norm2.bias": r(D),
        prefix + "ls2.gamma": r(D, std=0.3, mean=0.5),
    }
    if k_mask:
        sd[prefix + "attn.qkv.bias_mask"] = torch.cat([torch.ones(D), torch.zeros(D), torch.ones(D)])
    for name, shape in ffn.items():
        sd[prefix + "mlp." + name] = r(*shape)
    return sd


def _mlp_shapes(hidden: int) -> dict[str, tuple[int, ...]]:
    return {"fc1.weight": (hidden, D), "fc1.bias": (hidden,), "fc2.weight": (D, hidden), "fc2.bias": (D,)}


def dinov2_state_dict(seed: int, registers: int, swiglu: bool, grid: int = 4) -> Sd:
    """DINOv2 hub layout. Fused SwiGLU width for D=64, ratio 4: (int(256*2/3)+7)//8*8 = 176."""
    r = _Rand(seed)
    sd = {
        "cls_token": r(1, 1, D), "pos_embed": r(1, 1 + grid * grid, D, std=0.5), "mask_token": r(1, D),
        "patch_embed.proj.weight": r(D, 3, 14, 14, std=0.05), "patch_embed.proj.bias": r(D),
    }
    if registers:
        sd["register_tokens"] = r(1, registers, D)
    ffn = (
        {"w12.weight": (2 * 176, D), "w12.bias": (2 * 176,), "w3.weight": (D, 176), "w3.bias": (D,)}
        if swiglu else _mlp_shapes(4 * D)
    )
    for i in range(DEPTH):
        sd.update(_block_keys(r, f"blocks.{i}.", ffn, k_mask=False))
    sd["norm.weight"], sd["norm.bias"] = r(D, mean=1.0), r(D)
    return sd


def dinov3_state_dict(seed: int) -> Sd:
    """DINOv3 layout with 4 storage tokens, split SwiGLU (ratio 3: int(192*2/3)=128), local cls norm."""
    r = _Rand(seed)
    sd = {
        "cls_token": r(1, 1, D), "storage_tokens": r(1, 4, D), "mask_token": r(1, D),
        "patch_embed.proj.weight": r(D, 3, 16, 16, std=0.05), "patch_embed.proj.bias": r(D),
        "rope_embed.periods": 100.0 ** (2 * torch.arange(HD // 4) / (HD // 2)),
    }
    ffn = {"w1.weight": (128, D), "w1.bias": (128,), "w2.weight": (128, D), "w2.bias": (128,),
           "w3.weight": (D, 128), "w3.bias": (D,)}
    for i in range(DEPTH):
        sd.update(_block_keys(r, f"blocks.{i}.", ffn, k_mask=True))
    sd["norm.weight"], sd["norm.bias"] = r(D, mean=1.0), r(D)
    sd["local_cls_norm.weight"], sd["local_cls_norm.bias"] = r(D, mean=1.0), r(D)
    return sd


# ---------------------------------------------------------------- independent reference forward


def _ln(x: torch.Tensor, sd: Sd, name: str, eps: float) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).square().mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * sd[name + ".weight"] + sd[name + ".bias"]


def _rope_tables(h: int, w: int, periods: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ys = torch.tensor([(2 * i + 1) / h - 1 for i in range(h)])
    xs = torch.tensor([(2 * j + 1) / w - 1 for j in range(w)])
    yx = torch.cartesian_prod(ys, xs)  # row-major [(y0,x0), (y0,x1), ...]
    ang = 2 * math.pi * torch.cat([yx[:, :1] / periods, yx[:, 1:] / periods], dim=1)
    ang = torch.cat([ang, ang], dim=1)
    return ang.sin(), ang.cos()


def _rotate(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def _ref_block(t: torch.Tensor, sd: Sd, p: str, eps: float, rope: tuple | None, n_prefix: int) -> torch.Tensor:
    b, n, _ = t.shape
    bias = sd[p + "attn.qkv.bias"].clone()
    if p + "attn.qkv.bias_mask" in sd:
        bias[D : 2 * D] = 0.0
    qkv = _ln(t, sd, p + "norm1", eps) @ sd[p + "attn.qkv.weight"].T + bias
    q, k, v = (z.reshape(b, n, HEADS, HD).transpose(1, 2) for z in qkv.split(D, dim=-1))
    if rope is not None:
        q = torch.cat([q[:, :, :n_prefix], _rotate(q[:, :, n_prefix:], *rope)], dim=2)
        k = torch.cat([k[:, :, :n_prefix], _rotate(k[:, :, n_prefix:], *rope)], dim=2)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(HD), dim=-1) @ v
    a = att.transpose(1, 2).reshape(b, n, D) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
    t = t + sd[p + "ls1.gamma"] * a
    y = _ln(t, sd, p + "norm2", eps)
    if p + "mlp.fc1.weight" in sd:
        hmid = y @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"]
        hmid = 0.5 * hmid * (1 + torch.erf(hmid / math.sqrt(2)))
        m = hmid @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
    elif p + "mlp.w12.weight" in sd:
        g, val = (y @ sd[p + "mlp.w12.weight"].T + sd[p + "mlp.w12.bias"]).split(176, dim=-1)
        m = (g * torch.sigmoid(g) * val) @ sd[p + "mlp.w3.weight"].T + sd[p + "mlp.w3.bias"]
    else:
        g = y @ sd[p + "mlp.w1.weight"].T + sd[p + "mlp.w1.bias"]
        val = y @ sd[p + "mlp.w2.weight"].T + sd[p + "mlp.w2.bias"]
        m = (g * torch.sigmoid(g) * val) @ sd[p + "mlp.w3.weight"].T + sd[p + "mlp.w3.bias"]
    return t + sd[p + "ls2.gamma"] * m


def _ref_patches(sd: Sd, x: torch.Tensor, patch: int, masks: torch.Tensor | None) -> tuple[torch.Tensor, int, int]:
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    h, w = t.shape[-2:]
    t = t.flatten(2).transpose(1, 2)
    if masks is not None:
        t = torch.where(masks[..., None], sd["mask_token"][0], t)
    return t, h, w


def ref_dinov2(
    sd: Sd, x: torch.Tensor, offset: float, antialias: bool, masks: torch.Tensor | None = None
) -> torch.Tensor:
    """Normalised tokens [B, 1+R+N, D] of a DINOv2 hub model (pos-embed bicubic, eps 1e-6)."""
    t, h, w = _ref_patches(sd, x, 14, masks)
    b = t.shape[0]
    pos = sd["pos_embed"]
    g = math.isqrt(pos.shape[1] - 1)
    if (h, w) != (g, g):
        grid = pos[:, 1:].reshape(1, g, g, D).permute(0, 3, 1, 2)
        if offset:
            scale = ((h + offset) / g, (w + offset) / g)
            grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=antialias)
        else:
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=antialias)
        pos = torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)
    t = torch.cat([sd["cls_token"].expand(b, 1, D), t], dim=1) + pos
    if "register_tokens" in sd:
        t = torch.cat([t[:, :1], sd["register_tokens"].expand(b, -1, D), t[:, 1:]], dim=1)
    for i in range(DEPTH):
        t = _ref_block(t, sd, f"blocks.{i}.", 1e-6, None, 0)
    return _ln(t, sd, "norm", 1e-6)


def ref_dinov3(
    sd: Sd, x: torch.Tensor, masks: torch.Tensor | None = None, local: bool = False
) -> torch.Tensor:
    """Normalised tokens [B, 1+R+N, D] of a DINOv3 model (RoPE on patches, eps 1e-5)."""
    t, h, w = _ref_patches(sd, x, 16, masks)
    b = t.shape[0]
    regs = sd["storage_tokens"]
    t = torch.cat([sd["cls_token"].expand(b, 1, D), regs.expand(b, -1, D), t], dim=1)
    n_prefix = 1 + regs.shape[1]
    rope = _rope_tables(h, w, sd["rope_embed.periods"])
    for i in range(DEPTH):
        t = _ref_block(t, sd, f"blocks.{i}.", 1e-5, rope, n_prefix)
    prefix = _ln(t[:, :n_prefix], sd, "local_cls_norm" if local else "norm", 1e-5)
    return torch.cat([prefix, _ln(t[:, n_prefix:], sd, "norm", 1e-5)], dim=1)


def _images(h: int, w: int, b: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _assert_outputs(out: dict[str, torch.Tensor], ref: torch.Tensor, n_reg: int) -> None:
    tol = dict(atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(out["cls"], ref[:, 0], **tol)
    torch.testing.assert_close(out["registers"], ref[:, 1 : 1 + n_reg], **tol)
    torch.testing.assert_close(out["patches"], ref[:, 1 + n_reg :], **tol)


# ---------------------------------------------------------------- loading official layouts


@pytest.mark.parametrize("size", [(70, 84), (56, 56)], ids=["interpolated", "native"])
def test_dinov2_layout_matches_reference(tmp_path: Path, size: tuple[int, int]) -> None:
    sd = dinov2_state_dict(seed=0, registers=0, swiglu=False)
    path = tmp_path / "dinov2_vittest14.pth"
    torch.save(sd, path)
    model, info = load_backbone("dinov2_vittest14", path)
    assert not info.random_init and info.name == "dinov2_vittest14"
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info.n_params == sum(v.numel() for v in sd.values())
    x = _images(*size)
    masks = torch.zeros(2, (size[0] // 14) * (size[1] // 14), dtype=torch.bool)
    masks[0, ::3] = True
    with torch.no_grad():
        out = model.forward_features(x, masks)
    assert out["patches"].shape == (2, masks.shape[1], D)
    _assert_outputs(out, ref_dinov2(sd, x, offset=0.1, antialias=False, masks=masks), 0)


def test_dinov2_reg_swiglu_in_teacher_container(tmp_path: Path) -> None:
    sd = dinov2_state_dict(seed=1, registers=4, swiglu=True)
    ckpt = {"teacher": {**{"backbone." + k: v for k, v in sd.items()},
                        "dino_head.mlp.0.weight": torch.zeros(8, D)}, "iteration": 10}
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save(ckpt, path)
    model, info = load_backbone("dinov2_vittest14_reg", path)
    assert info.config.n_registers == 4
    x = _images(70, 84)
    with torch.no_grad():
        out = model.forward_features(x)
    _assert_outputs(out, ref_dinov2(sd, x, offset=0.0, antialias=True), 4)


def test_dinov2_chunked_blocks_load(tmp_path: Path) -> None:
    sd = dinov2_state_dict(seed=2, registers=0, swiglu=False)
    # One chunk holding both blocks: `blocks.0.{i}.` as DINOv2's FSDP BlockChunk stores them.
    chunked = {("blocks.0." + k[len("blocks."):] if k.startswith("blocks.") else k): v for k, v in sd.items()}
    path = tmp_path / "chunked.pth"
    torch.save({"model": {"teacher.backbone." + k: v for k, v in chunked.items()}}, path)
    model, _ = load_backbone("dinov2_vittest14", path)
    loaded = model.state_dict()
    assert set(loaded) == set(sd)
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_dinov3_layout_matches_reference(tmp_path: Path) -> None:
    sd = dinov3_state_dict(seed=3)
    path = tmp_path / "dinov3_vittest16.safetensors"
    save_file(sd, str(path))
    model, info = load_backbone("dinov3_vittest16", path)
    assert info.config.local_cls_norm and info.config.pos_encoding == "rope"
    x = _images(64, 80)
    masks = torch.zeros(2, 20, dtype=torch.bool)
    masks[1, [0, 7, 19]] = True
    with torch.no_grad():
        out = model.forward_features(x, masks)
        local = model.forward_features(x, masks, is_local=True)
    _assert_outputs(out, ref_dinov3(sd, x, masks), 4)
    _assert_outputs(local, ref_dinov3(sd, x, masks, local=True), 4)
    assert out["prenorm"].shape == (2, 25, D)


def test_dinov3_training_checkpoint_uses_teacher(tmp_path: Path) -> None:
    teacher, student = dinov3_state_dict(seed=4), dinov3_state_dict(seed=5)
    ckpt = {"model": {**{"student.backbone." + k: v for k, v in student.items()},
                      **{"teacher.backbone." + k: v for k, v in teacher.items()}},
            "optimizer": {"state": {}}, "iteration": 3}
    path = tmp_path / "model_final.pth"
    torch.save(ckpt, path)
    model, _ = load_backbone("dinov3_vittest16", path)
    x = _images(48, 48)
    with torch.no_grad():
        out = model.forward_features(x)
    _assert_outputs(out, ref_dinov3(teacher, x), 4)


def test_dinov3_file_without_constant_buffers_loads(tmp_path: Path) -> None:
    sd = {k: v for k, v in dinov3_state_dict(seed=6).items()
          if not k.endswith("bias_mask") and k != "rope_embed.periods"}
    path = tmp_path / "lean.pth"
    torch.save(sd, path)
    model, _ = load_backbone("dinov3_vittest16", path)
    x = _images(32, 48)
    with torch.no_grad():
        out = model.forward_features(x)
    _assert_outputs(out, ref_dinov3(dinov3_state_dict(seed=6), x), 4)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file(tmp_path: Path, suffix: str) -> None:
    sd = dinov3_state_dict(seed=7)
    full = tmp_path / ("full" + suffix)
    torch.save(sd, full) if suffix == ".pth" else save_file(sd, str(full))
    cut = tmp_path / ("cut" + suffix)
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated") as err:
        load_backbone("dinov3_vittest16", cut)
    assert str(cut) in str(err.value)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "notes.pth"
    path.write_text("these are not weights\n" * 20)
    with pytest.raises(CheckpointError, match="not a checkpoint") as err:
        load_backbone("dinov2_vittest14", path)
    assert str(path) in str(err.value)


class _Payload:
    def __reduce__(self) -> tuple:
        return (print, ("unpickled!",))


def test_arbitrary_objects_are_not_unpickled(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"cls_token": _Payload()}, f, protocol=2)
    torch.save({"cls_token": torch.zeros(1), "x": _Payload()}, tmp_path / "evil2.pth")
    for p in (path, tmp_path / "evil2.pth"):
        with pytest.raises(CheckpointError, match="refusing to unpickle"):
            load_backbone("dinov2_vittest14", p)
    assert "unpickled!" not in capsys.readouterr().out


def test_shape_mismatch_names_key_and_shapes(tmp_path: Path) -> None:
    sd = dinov2_state_dict(seed=8, registers=0, swiglu=False)
    sd["blocks.1.mlp.fc1.weight"] = torch.zeros(128, D)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as err:
        load_backbone("dinov2_vittest14", path)
    msg = str(err.value)
    assert "shape mismatch" in msg and "'blocks.1.mlp.fc1.weight'" in msg
    assert "expected (256, 64)" in msg and "found (128, 64)" in msg


def test_missing_and_unexpected_keys_are_listed(tmp_path: Path) -> None:
    sd = dinov3_state_dict(seed=9)
    del sd["norm.bias"], sd["blocks.0.ls2.gamma"]
    sd["head.weight"] = torch.zeros(3, D)
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as err:
        load_backbone("dinov3_vittest16", path)
    msg = str(err.value)
    assert "missing keys: blocks.0.ls2.gamma, norm.bias" in msg
    assert "unexpected keys: head.weight" in msg


def test_name_mismatch_reports_the_size_found(tmp_path: Path) -> None:
    path = tmp_path / "small.pth"
    torch.save(dinov2_state_dict(seed=10, registers=0, swiglu=False), path)
    with pytest.raises(CheckpointError) as err:
        load_backbone("dinov2_vits14", path)
    msg = str(err.value)
    assert "file holds a ViT with embed_dim 64, depth 2, patch 14" in msg
    assert "looks like dinov2_vittest14" in msg and "not dinov2_vits14" in msg
    with pytest.raises(CheckpointError, match="patch 14.*not dinov3_vittest16"):
        load_backbone("dinov3_vittest16", path)


def test_unknown_name() -> None:
    with pytest.raises(CheckpointError, match="unknown backbone 'dinov9_vitz'"):
        load_backbone("dinov9_vitz", None)


# ---------------------------------------------------------------- random init and our own export


def test_random_init_without_weights() -> None:
    model, info = load_backbone("vit_test", None)
    assert info.random_init and info.sha256 is None
    assert info.n_params == sum(p.numel() for p in model.parameters())
    again, _ = load_backbone("vit_test", None)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize("name", ["dinov3_vittest16", "dinov2_vittest14_reg"])
def test_curate_export_round_trip(tmp_path: Path, name: str) -> None:
    sd = dinov3_state_dict(seed=11) if name.startswith("dinov3") else dinov2_state_dict(11, 4, True)
    src = tmp_path / "official.pth"
    torch.save(sd, src)
    model, info = load_backbone(name, src)
    out_path = tmp_path / "export.safetensors"
    digest = export_backbone(model, out_path)
    again, info2 = load_backbone(f"curate:{out_path}", None)
    assert info2.config == info.config and not info2.random_init
    assert info2.sha256 == digest == hashlib.sha256(out_path.read_bytes()).hexdigest()
    assert info2.n_params == info.n_params
    umask = os.umask(0)
    os.umask(umask)
    assert out_path.stat().st_mode & 0o777 == 0o666 & ~umask  # like any other file (safetensors writes 0600)
    x = _images(64, 80) if name.startswith("dinov3") else _images(70, 84)
    with torch.no_grad():
        a, b = model.forward_features(x), again.forward_features(x)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_curate_rejects_foreign_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file(dinov3_state_dict(seed=12), str(path))
    with pytest.raises(CheckpointError, match="not a curate backbone export"):
        load_backbone(f"curate:{path}", None)
