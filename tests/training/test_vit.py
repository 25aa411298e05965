"""Behaviour of the VisionTransformer: shapes, masking, RoPE augmentation, pooling, local cls norm."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from training.models import MODEL_SIZES, VisionTransformer
from training.models.layers import sample_drop_residual
from training.models.rope import patch_coords, rope_periods


def _images(b: int = 2, h: int = 64, w: int = 80, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _model(name: str, **changes: object) -> VisionTransformer:
    cfg = dataclasses.replace(MODEL_SIZES[name], **changes)  # type: ignore[arg-type]
    model = VisionTransformer(cfg, seed=1)
    with torch.no_grad():  # make blocks visible (LayerScale 1e-5) and attention peaked (init std 0.02)
        for block in model.blocks:
            block.ls1.gamma.fill_(0.5)
            block.ls2.gamma.fill_(0.5)
            block.attn.qkv.weight.mul_(20.0)
    return model.eval()


@pytest.mark.parametrize("name", ["vit_test", "vit_test14", "dinov2_vittest14_reg", "dinov3_vittest16"])
def test_forward_features_shapes(name: str) -> None:
    model = _model(name)
    cfg = model.config
    x = _images(h=4 * cfg.patch_size, w=5 * cfg.patch_size)
    out = model.forward_features(x)
    d, r = cfg.embed_dim, cfg.n_registers
    assert out["cls"].shape == (2, d)
    assert out["registers"].shape == (2, r, d)
    assert out["patches"].shape == (2, 20, d)
    assert out["prenorm"].shape == (2, 1 + r + 20, d)
    # Outputs are the final norm of the prenorm tokens.
    normed = F.layer_norm(out["prenorm"], (d,), model.norm.weight, model.norm.bias, cfg.norm_eps)
    torch.testing.assert_close(out["cls"], normed[:, 0])
    torch.testing.assert_close(out["registers"], normed[:, 1 : 1 + r])
    torch.testing.assert_close(out["patches"], normed[:, 1 + r :])


def test_release_sizes_follow_published_hidden_widths() -> None:
    # FFN widths of the releases: 4x for mlp, SwiGLU 2/3 of the ratio rounded up (7B aligned to 64).
    with torch.device("meta"):
        g14 = VisionTransformer(MODEL_SIZES["dinov2_vitg14"])
        b7 = VisionTransformer(MODEL_SIZES["dinov3_vit7b16"])
        l14 = VisionTransformer(MODEL_SIZES["dinov2_vitl14_reg"])
    assert g14.blocks[0].mlp.w12.weight.shape == (2 * 4096, 1536)
    assert b7.blocks[0].mlp.w1.weight.shape == (8192, 4096)
    assert b7.blocks[0].attn.qkv.bias is None
    assert l14.pos_embed.shape == (1, 1 + 37 * 37, 1024)
    assert l14.register_tokens.shape == (1, 4, 1024)
    assert {"dinov3_vits16", "dinov3_vits16plus", "dinov3_vitb16", "dinov3_vitl16", "dinov3_vitl16plus",
            "dinov3_vith16plus", "dinov3_vit7b16", "dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14",
            "dinov2_vitg14", "dinov2_vits14_reg", "dinov2_vitg14_reg", "vit_test", "vit_test14"} <= set(MODEL_SIZES)


@pytest.mark.parametrize("name", ["vit_test", "vit_test14"])
def test_masked_patches_enter_the_blocks_as_the_mask_token(name: str) -> None:
    model = _model(name)
    with torch.no_grad():
        model.mask_token.normal_(generator=torch.Generator().manual_seed(3))
    cfg = model.config
    x = _images(h=4 * cfg.patch_size, w=4 * cfg.patch_size)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [1, 5, 6]] = True
    masks[1, :] = True
    seen: list[torch.Tensor] = []
    model.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    model.forward_features(x, masks)
    model.forward_features(x)
    masked_in, plain_in = seen
    n = model.n_prefix_tokens
    pos = model.interpolated_pos_embed(4, 4)[0, 1:] if cfg.pos_encoding == "learned" else torch.zeros(16, 64)
    patch_tokens = masked_in[:, n:]
    expected_masked = (model.mask_token[0] + pos).expand(2, 16, 64)
    torch.testing.assert_close(patch_tokens[masks], expected_masked[masks])
    torch.testing.assert_close(patch_tokens[~masks], plain_in[:, n:][~masks])
    torch.testing.assert_close(masked_in[:, :n], plain_in[:, :n])
    # A fully masked image carries no trace of its pixels.
    other = _images(h=4 * cfg.patch_size, w=4 * cfg.patch_size, seed=9)
    full = torch.ones(2, 16, dtype=torch.bool)
    torch.testing.assert_close(
        model.forward_features(x, full)["cls"], model.forward_features(other, full)["cls"]
    )


@pytest.mark.parametrize(
    "aug", [{"rope_shift": 0.5}, {"rope_jitter": 1.5}, {"rope_rescale": 2.0}]
)
def test_rope_augmentation_only_in_train_mode(aug: dict[str, float]) -> None:
    plain = _model("vit_test", rope_shift=None, rope_jitter=None, rope_rescale=None)
    augmented = VisionTransformer(dataclasses.replace(plain.config, **aug))  # type: ignore[arg-type]
    augmented.load_state_dict(plain.state_dict())
    x = _images()
    augmented.eval()
    torch.testing.assert_close(augmented.forward_features(x)["cls"], plain.forward_features(x)["cls"])
    augmented.train()
    a = augmented.forward_features(x, generator=torch.Generator().manual_seed(0))["cls"]
    b = augmented.forward_features(x, generator=torch.Generator().manual_seed(0))["cls"]
    c = augmented.forward_features(x, generator=torch.Generator().manual_seed(1))["cls"]
    torch.testing.assert_close(a, b)  # reproducible from the generator
    assert (a - plain.forward_features(x)["cls"]).abs().max() > 1e-4
    assert (a - c).abs().max() > 1e-4


def test_rope_tables_match_the_axial_formula() -> None:
    model = _model("vit_test")
    sin, cos = model.rope_embed(3, 5)
    periods = rope_periods(32, 100.0)
    assert periods.shape == (8,)
    torch.testing.assert_close(model.rope_embed.periods, 100.0 ** (torch.arange(8) / 8.0))
    coords = patch_coords(3, 5)
    assert coords[:, 0].unique().tolist() == pytest.approx([-2 / 3, 0.0, 2 / 3])
    assert coords[:, 1].unique().tolist() == pytest.approx([-0.8, -0.4, 0.0, 0.4, 0.8])
    # Token 7 = row 1, col 2 (row-major); frequencies: 8 for rows then 8 for cols, tiled twice.
    ang = 2 * torch.pi * torch.cat([coords[7, 0] / periods, coords[7, 1] / periods])
    torch.testing.assert_close(sin[7], torch.cat([ang, ang]).sin())
    torch.testing.assert_close(cos[7], torch.cat([ang, ang]).cos())


def test_stochastic_depth_only_in_train_mode() -> None:
    model = _model("vit_test", drop_path_rate=0.5, rope_rescale=None)
    x = _images(b=8)
    ref = model.forward_features(x)["cls"]
    torch.testing.assert_close(model.forward_features(x)["cls"], ref)
    model.train()
    dropped = model.forward_features(x, generator=torch.Generator().manual_seed(0))["cls"]
    assert (dropped - ref).abs().max() > 1e-4


def _ropes_seen_by_blocks(model: VisionTransformer, x: torch.Tensor, **kwargs: object) -> list[torch.Tensor]:
    """The (sin) RoPE table each block received in one forward, captured by forward pre-hooks."""
    seen: list[torch.Tensor] = []
    hooks = [b.register_forward_pre_hook(lambda _m, args: seen.append(args[1][0].clone())) for b in model.blocks]
    try:
        model.forward_features(x, **kwargs)  # type: ignore[arg-type]
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_every_block_gets_its_own_rope_draw_in_training_and_the_same_table_in_eval() -> None:
    model = _model("dinov3_vittest16")  # rope_rescale 2, as the released models
    x = _images()
    model.train()
    train_tables = _ropes_seen_by_blocks(model, x, generator=torch.Generator().manual_seed(0))
    assert len(train_tables) == 2 and not torch.allclose(train_tables[0], train_tables[1])
    again = _ropes_seen_by_blocks(model, x, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(train_tables, again))  # reproducible from the generator
    model.eval()
    eval_tables = _ropes_seen_by_blocks(model, x)
    assert torch.equal(eval_tables[0], eval_tables[1])
    torch.testing.assert_close(eval_tables[0], model.rope_embed(4, 5)[0])


@pytest.mark.parametrize("normalize", ["min", "max"])
def test_rope_coordinates_normalised_by_the_shorter_or_longer_side(normalize: str) -> None:
    h, w = 3, 5
    side = min(h, w) if normalize == "min" else max(h, w)
    coords = patch_coords(h, w, normalize)  # type: ignore[arg-type]
    assert coords[:, 0].unique().tolist() == pytest.approx([2 * (r + 0.5) / side - 1 for r in range(h)])
    assert coords[:, 1].unique().tolist() == pytest.approx([2 * (c + 0.5) / side - 1 for c in range(w)])
    model = _model("vit_test", rope_normalize_coords=normalize)
    sin, _ = model.rope_embed(h, w)
    ang = 2 * torch.pi * torch.cat([coords[7, 0] / model.rope_embed.periods, coords[7, 1] / model.rope_embed.periods])
    torch.testing.assert_close(sin[7], torch.cat([ang, ang]).sin())


def test_rope_min_max_period_parametrisation() -> None:
    model = _model("vit_test", rope_base=None, rope_min_period=0.5, rope_max_period=40.0)
    t = torch.arange(8, dtype=torch.float64) / 7
    expected = 40.0 * (40.0 / 0.5) ** (t - 1)  # geometric from min to max period
    torch.testing.assert_close(model.rope_embed.periods, expected.float())
    assert model.rope_embed.periods[0].item() == pytest.approx(0.5) and model.rope_embed.periods[-1].item() == 40.0
    with pytest.raises(ValueError, match="either rope_base or both"):
        dataclasses.replace(MODEL_SIZES["vit_test"], rope_min_period=0.5, rope_max_period=40.0)
    from training.train.config import ModelConfig, vit_config

    cfg = vit_config(ModelConfig(size="vit_test", rope_min_period=0.5, rope_max_period=40.0,
                                 rope_normalize_coords="max"))
    assert (cfg.rope_base, cfg.rope_min_period, cfg.rope_normalize_coords) == (None, 0.5, "max")
    with pytest.raises(ValueError, match="set together"):
        vit_config(ModelConfig(size="vit_test", rope_min_period=0.5))


@pytest.mark.parametrize("batch, rate", [(10, 0.3), (8, 0.4), (3, 0.9), (16, 0.1)])
def test_stochastic_depth_runs_a_fixed_subset_and_rescales_it(batch: int, rate: float) -> None:
    x = torch.randn(batch, 5, 4, generator=torch.Generator().manual_seed(0))
    calls: list[int] = []

    def branch(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.shape[0])
        return torch.ones_like(t)

    out = sample_drop_residual(x, branch, rate, torch.Generator().manual_seed(1))
    kept = max(int(batch * (1 - rate)), 1)  # the reference's subset size
    changed = (out != x).flatten(1).any(1)
    assert calls == [kept] and int(changed.sum()) == kept
    torch.testing.assert_close(out[changed], x[changed] + batch / kept)
    assert torch.equal(out[~changed], x[~changed])


def test_block_draws_a_subset_per_branch() -> None:
    block = _model("vit_test", drop_path_rate=0.5).blocks[0].train()
    x = torch.randn(8, 6, 64, generator=torch.Generator().manual_seed(0))
    out = block(x, None, torch.Generator().manual_seed(2))
    # Independent: the same two draws (attention subset, then FFN subset), 4 of 8 each, residuals x 8/4.
    gen = torch.Generator().manual_seed(2)
    first, second = torch.randperm(8, generator=gen)[:4], torch.randperm(8, generator=gen)[:4]
    expected = x.clone()
    expected[first] += 2.0 * block.ls1(block.attn(block.norm1(x[first])))
    mid = expected.clone()
    expected[second] += 2.0 * block.ls2(block.mlp(block.norm2(mid[second])))
    torch.testing.assert_close(out, expected)
    assert not torch.equal(first.sort().values, second.sort().values)  # two draws, not one


@pytest.mark.parametrize("pooling", ["cls", "mean", "cls+mean"])
def test_embed_pooling(pooling: str) -> None:
    model = _model("vit_test")
    x = _images()
    emb = model.embed(x, pooling)  # type: ignore[arg-type]
    assert emb.shape == (2, model.embed_dim_for(pooling))  # type: ignore[arg-type]
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    out = model.forward_features(x)
    raw = {"cls": out["cls"], "mean": out["patches"].mean(1),
           "cls+mean": torch.cat([out["cls"], out["patches"].mean(1)], -1)}[pooling]
    torch.testing.assert_close(model.embed(x, pooling, normalize=False), raw)  # type: ignore[arg-type]
    torch.testing.assert_close(emb, raw / raw.norm(dim=-1, keepdim=True))


def test_local_cls_norm_changes_only_cls_and_registers() -> None:
    model = _model("dinov3_vittest16")
    with torch.no_grad():
        model.local_cls_norm.weight.fill_(2.0)
    x = _images()
    g, loc = model.forward_features(x), model.forward_features(x, is_local=True)
    torch.testing.assert_close(loc["patches"], g["patches"])
    torch.testing.assert_close(loc["cls"] - model.local_cls_norm.bias, 2 * (g["cls"] - model.norm.bias))
    torch.testing.assert_close(loc["registers"] - model.local_cls_norm.bias, 2 * (g["registers"] - model.norm.bias))


def test_bf16_autocast_close_to_fp32() -> None:
    model = _model("vit_test")
    x = _images()
    ref = model.embed(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.embed(x)
    assert low.dtype == torch.float32
    assert (low - ref).abs().max() < 0.05


def test_backward_reaches_all_trainable_parameters() -> None:
    model = _model("vit_test14").train()
    masks = torch.zeros(2, 20, dtype=torch.bool)
    masks[:, :3] = True
    out = model.forward_features(_images(h=56, w=70), masks)
    (out["cls"].sum() + out["patches"].square().mean()).backward()
    assert all(p.grad is not None for p in model.parameters())
