"""SSL losses and the DINO head, each checked against a direct float64 computation written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.losses import (
    KoLeoDistributed,
    dino_cross_entropy,
    dino_loss,
    dino_term_weights,
    downsample_patch_tokens,
    gram_loss,
    ibot_loss,
    koleo_loss,
    masked_token_weights,
    sinkhorn_knopp,
)
from training.models.heads import DINOHead


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _log_softmax_direct(z: torch.Tensor) -> torch.Tensor:
    """log softmax of a 1-D float64 vector from its definition."""
    m = max(float(v) for v in z)
    log_norm = m + math.log(sum(math.exp(float(v) - m) for v in z))
    return torch.tensor([float(v) - log_norm for v in z], dtype=torch.float64)


def _sinkhorn_direct(logits: torch.Tensor, temperature: float, n_iterations: int = 3) -> torch.Tensor:
    """The multiplicative Sinkhorn-Knopp of the recipe (prototypes × samples), in float64."""
    q = torch.exp(logits.double() / temperature).T
    n_protos, n_samples = q.shape
    q = q / q.sum()
    for _ in range(n_iterations):
        q = q / q.sum(dim=1, keepdim=True)
        q = q / n_protos
        q = q / q.sum(dim=0, keepdim=True)
        q = q / n_samples
    return (q * n_samples).T


# ----------------------------------------------------------------------------- DINO head


def test_dino_head_layers_match_a_direct_forward() -> None:
    torch.manual_seed(0)
    head = DINOHead(in_dim=12, hidden_dim=20, bottleneck_dim=6, n_prototypes=30, n_layers=3).double()
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(12, 20), (20, 20), (20, 6)]
    assert sum(isinstance(m, torch.nn.GELU) for m in head.mlp) == 2
    assert head.last_layer.bias is None and head.last_layer.weight.shape == (30, 6)
    assert not hasattr(head.last_layer, "parametrizations")  # no weight norm
    assert all(torch.count_nonzero(m.bias) == 0 for m in linears)

    x = torch.randn(5, 12, dtype=torch.float64, generator=_gen(1))
    with torch.no_grad():
        for m in linears:  # non-zero biases so the check covers them
            m.bias.normal_(generator=_gen(2))
        h = x
        for i, m in enumerate(linears):
            h = h @ m.weight.T + m.bias
            if i < 2:
                h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        z = h / h.norm(dim=1, keepdim=True)
        expected_logits = z @ head.last_layer.weight.T
        bottleneck = head.forward_bottleneck(x)
        assert torch.allclose(bottleneck, z, atol=1e-12)
        assert torch.allclose(bottleneck.norm(dim=1), torch.ones(5, dtype=torch.float64))
        assert torch.allclose(head.forward_last_layer(bottleneck), expected_logits, atol=1e-12)
        assert torch.allclose(head(x), expected_logits, atol=1e-12)


def test_dino_head_init_and_depth() -> None:
    torch.manual_seed(0)
    head = DINOHead(in_dim=256, hidden_dim=512, bottleneck_dim=128, n_prototypes=1024, n_layers=2)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2
    for w in [m.weight for m in linears] + [head.last_layer.weight]:
        assert abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 0.001
    single = DINOHead(in_dim=8, bottleneck_dim=4, n_prototypes=16, n_layers=1)
    assert len(single.mlp) == 1 and isinstance(single.mlp[0], torch.nn.Linear)
    with pytest.raises(ValueError):
        DINOHead(in_dim=8, n_layers=0)


# ----------------------------------------------------------------------------- Sinkhorn-Knopp


def test_sinkhorn_matches_direct_multiplicative_algorithm(device: torch.device) -> None:
    logits = torch.randn(24, 10, generator=_gen(0)) * 2
    for temperature in (0.04, 0.07):
        expected = _sinkhorn_direct(logits, temperature)
        got = sinkhorn_knopp(logits.to(device), temperature).cpu()
        assert got.dtype == torch.float32 and got.shape == (24, 10)
        assert torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-7)
        got64 = sinkhorn_knopp(logits.double().to(device), temperature).cpu()
        assert torch.allclose(got64, expected, rtol=1e-10, atol=1e-14)
    expected5 = _sinkhorn_direct(logits, 0.1, n_iterations=5)
    assert torch.allclose(sinkhorn_knopp(logits.double(), 0.1, n_iterations=5), expected5, rtol=1e-10)


def test_sinkhorn_rows_sum_to_one_and_prototypes_balance() -> None:
    n, k = 64, 16
    # head-sized logits with a prototype skew that a plain softmax keeps
    logits = 0.1 * (torch.randn(n, k, generator=_gen(1)) + torch.linspace(-1, 1, k))
    q = sinkhorn_knopp(logits, 0.07)
    assert torch.allclose(q.sum(dim=1), torch.ones(n), atol=1e-5)
    assert bool((q >= 0).all())
    skewed = torch.softmax(logits / 0.07, dim=1).sum(dim=0)
    balanced = q.sum(dim=0)
    assert (balanced.max() - balanced.min()) < 0.05 * (skewed.max() - skewed.min())
    assert torch.allclose(balanced, torch.full((k,), n / k), rtol=0.05)
    converged = sinkhorn_knopp(logits, 0.07, n_iterations=50).sum(dim=0)
    assert torch.allclose(converged, torch.full((k,), n / k), rtol=1e-4)


def test_sinkhorn_is_shift_invariant_for_huge_offsets() -> None:
    logits = torch.randn(16, 8, generator=_gen(2), dtype=torch.float64)
    expected = _sinkhorn_direct(logits, 0.04)  # exp(t/τ) alone would overflow for the shifted input
    for offset in (3e3, -3e3, 1e4):
        got = sinkhorn_knopp(logits + offset, 0.04)
        assert torch.allclose(got, expected, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sinkhorn_finite_for_logits_up_to_1e4(dtype: torch.dtype, device: torch.device) -> None:
    n, k = 32, 64
    uniform = (torch.rand(n, k, generator=_gen(3)) * 2 - 1) * 1e4
    one_dead_prototype = torch.full((n, k), 1e4)
    one_dead_prototype[:, 5] = -1e4  # every sample puts this prototype ~5e5/τ below the max
    one_cold_sample = torch.randn(n, k, generator=_gen(4))
    one_cold_sample[7] -= 1e4  # a whole sample far below the global max
    for logits in (uniform, -uniform, one_dead_prototype, one_cold_sample):
        q = sinkhorn_knopp(logits.to(device, dtype), 0.04).cpu()
        assert bool(torch.isfinite(q).all())
        assert torch.allclose(q.sum(dim=1), torch.ones(n), atol=1e-4)
        assert bool(((q >= 0) & (q <= 1)).all())


def test_sinkhorn_output_carries_no_gradient() -> None:
    logits = torch.randn(6, 5, generator=_gen(5), requires_grad=True)
    q = sinkhorn_knopp(logits, 0.05)
    assert not q.requires_grad and q.grad_fn is None


# ----------------------------------------------------------------------------- DINO


def _dino_direct(student: torch.Tensor, teacher: torch.Tensor, temp: float, ignore_diagonal: bool) -> float:
    n_s, batch, _ = student.shape
    total, count = 0.0, 0
    for s in range(n_s):
        for t in range(teacher.shape[0]):
            if ignore_diagonal and s == t:
                continue
            for b in range(batch):
                log_p = _log_softmax_direct(student[s, b].double() / temp)
                total -= float((teacher[t, b].double() * log_p).sum())
                count += 1
    return total / count


def _random_probs(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.softmax(torch.randn(*shape, generator=_gen(seed)) * 3, dim=-1)


@pytest.mark.parametrize(("n_student", "n_teacher"), [(2, 2), (3, 2), (2, 3), (8, 2)])
@pytest.mark.parametrize("ignore_diagonal", [False, True])
def test_dino_cross_entropy_matches_pair_loop(n_student: int, n_teacher: int, ignore_diagonal: bool) -> None:
    student = torch.randn(n_student, 4, 7, generator=_gen(10)) * 2
    teacher = _random_probs((n_teacher, 4, 7), 11)
    got = dino_cross_entropy(student, teacher, 0.1, ignore_diagonal=ignore_diagonal)
    expected = _dino_direct(student, teacher, 0.1, ignore_diagonal)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_dino_term_weights_count_pairs() -> None:
    assert dino_term_weights(2, 8) == pytest.approx((16 / 18, 2 / 18))
    assert dino_term_weights(3, 5) == pytest.approx((15 / 21, 6 / 21))
    assert dino_term_weights(1, 4) == pytest.approx((1.0, 0.0))
    assert dino_term_weights(4, 0) == pytest.approx((0.0, 1.0))
    with pytest.raises(ValueError):
        dino_term_weights(1, 0)


@pytest.mark.parametrize(("n_global", "n_local"), [(2, 8), (3, 4)])
def test_dino_loss_combines_local_and_cross_view_global_terms(n_global: int, n_local: int) -> None:
    batch, k = 3, 9
    s_global = torch.randn(n_global, batch, k, generator=_gen(20), requires_grad=True)
    s_local = torch.randn(n_local, batch, k, generator=_gen(21), requires_grad=True)
    t_global = _random_probs((n_global, batch, k), 22).requires_grad_(True)
    out = dino_loss(s_global, s_local, t_global, student_temp=0.1, local_weight=0.5)

    local = _dino_direct(s_local.detach(), t_global.detach(), 0.1, ignore_diagonal=False)
    glob = _dino_direct(s_global.detach(), t_global.detach(), 0.1, ignore_diagonal=True)
    n_local_pairs, n_global_pairs = n_global * n_local, n_global * (n_global - 1)
    total_pairs = n_local_pairs + n_global_pairs
    expected = n_local_pairs / total_pairs * 0.5 * local + n_global_pairs / total_pairs * glob
    assert out.local.item() == pytest.approx(local, rel=1e-5)
    assert out.global_.item() == pytest.approx(glob, rel=1e-5)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)

    out.loss.backward()
    assert s_global.grad is not None and s_local.grad is not None
    assert bool(s_global.grad.abs().sum() > 0) and bool(s_local.grad.abs().sum() > 0)
    assert t_global.grad is None


# ----------------------------------------------------------------------------- iBOT


def test_ibot_loss_matches_per_token_loop() -> None:
    n_images, n_patches, k, temp = 4, 10, 6, 0.1
    masks = torch.rand(n_images, n_patches, generator=_gen(30)) < 0.4
    masks[2] = False  # an image with no masked patch contributes nothing
    masks[0, :3] = True
    n_masked = int(masks.sum())
    student = torch.randn(n_masked, k, generator=_gen(31), requires_grad=True)
    teacher = _random_probs((n_masked, k), 32).requires_grad_(True)
    weights = masked_token_weights(masks)

    expected, token = 0.0, 0
    for image in range(n_images):
        count = int(masks[image].sum())
        for patch in range(n_patches):
            if masks[image, patch]:
                assert weights[token].item() == pytest.approx(1 / count)
                log_p = _log_softmax_direct(student[token].detach().double() / temp)
                expected -= float((teacher[token].detach().double() * log_p).sum()) / count
                token += 1
    expected /= n_images
    assert token == n_masked == weights.numel()
    assert weights.sum().item() == pytest.approx(3.0)

    loss = ibot_loss(student, teacher, weights, n_global_crops=n_images, student_temp=temp)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert student.grad is not None and bool(student.grad.abs().sum() > 0)
    assert teacher.grad is None


# ----------------------------------------------------------------------------- KoLeo


def _koleo_direct(x: torch.Tensor, group_size: int | None, topk: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """Per-sample mean over its `topk` neighbours of −log(‖x̂_i − x̂_j + eps‖ + eps), by explicit loops (float64)."""
    n = x.shape[0]
    group_size = group_size or n
    unit = x / x.norm(dim=1, keepdim=True).clamp_min(eps)
    terms = []
    for i in range(n):
        group = range((i // group_size) * group_size, (i // group_size + 1) * group_size)
        ranked = sorted((j for j in group if j != i), key=lambda j: -float(unit[i].detach() @ unit[j].detach()))
        for j in ranked[:topk]:
            diff = unit[i] - unit[j] + eps  # torch.nn.PairwiseDistance(eps=eps)
            terms.append(-torch.log(torch.sqrt((diff * diff).sum()) + eps))
    return torch.stack(terms).reshape(n, topk).mean(dim=1)


@pytest.mark.parametrize("group_size", [None, 4, 6])
@pytest.mark.parametrize("topk", [1, 3])
def test_koleo_matches_nearest_neighbour_loop(group_size: int | None, topk: int) -> None:
    x = torch.randn(12, 5, generator=_gen(40), dtype=torch.float64) * 3
    x_direct = x.clone().requires_grad_(True)
    expected = _koleo_direct(x_direct, group_size, topk).mean()
    expected.backward()
    x_ours = x.clone().requires_grad_(True)
    got = koleo_loss(x_ours, group_size=group_size, topk=topk)
    got.backward()
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)
    assert torch.allclose(x_ours.grad, x_direct.grad, rtol=1e-8, atol=1e-12)
    module = KoLeoDistributed(group_size=group_size or 12, topk=topk)  # no process group: the local batch only
    assert module(x).item() == pytest.approx(expected.item(), rel=1e-12)
    if topk > 1:
        assert got.item() < koleo_loss(x, group_size=group_size).item()  # farther neighbours: a smaller −log


def test_koleo_exact_duplicates_sit_at_eps_sqrt_d() -> None:
    eps, dim = 1e-8, 32
    x = torch.randn(6, dim, generator=_gen(41), dtype=torch.float64)
    x[3] = x[1]  # an exact duplicate row, as an uncurated pool has them
    duplicate_term = -math.log(eps * math.sqrt(dim) + eps)  # ‖0 + eps·1‖ = eps·√D, then + eps
    others = _koleo_direct(x, None)[[0, 2, 4, 5]]
    expected = (2 * duplicate_term + others.sum().item()) / 6
    x.requires_grad_(True)
    loss = koleo_loss(x)
    loss.backward()
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert duplicate_term == pytest.approx(-math.log(eps) - math.log(1 + math.sqrt(dim)))  # ln(1 + √D) below −log(eps)
    assert bool(torch.isfinite(x.grad).all())


def test_koleo_rejects_groups_that_do_not_split_the_batch() -> None:
    with pytest.raises(ValueError, match="do not split a batch of 5"):
        koleo_loss(torch.randn(5, 3, generator=_gen(42)), group_size=4)
    with pytest.raises(ValueError, match="topk must be between 1 and group size - 1 = 3"):
        koleo_loss(torch.randn(8, 3, generator=_gen(42)), group_size=4, topk=4)


# ----------------------------------------------------------------------------- Gram


def _gram_direct(
    student: torch.Tensor, teacher: torch.Tensor, img_level: bool, reduction: str, remove_neg: bool,
    normalized: bool = True, remove_only_teacher_neg: bool = False,
) -> float:
    def unit(v: torch.Tensor) -> torch.Tensor:
        v = v.double()
        return v / math.sqrt(float((v**2).sum())) if normalized else v

    n, p, _ = student.shape
    all_tokens = [(i, a) for i in range(n) for a in range(p)]
    sets = [[(i, a) for a in range(p)] for i in range(n)] if img_level else [all_tokens]
    per_gram = []
    for tokens in sets:
        squared = 0.0
        for i, a in tokens:
            for j, b in tokens:
                gs = float(unit(student[i, a]) @ unit(student[j, b]))
                gt = float(unit(teacher[i, a]) @ unit(teacher[j, b]))
                if remove_neg:
                    gs, gt = max(gs, 0.0), max(gt, 0.0)
                if remove_only_teacher_neg:
                    gs = 0.0 if (gs < 0 and gt < 0) else gs
                    gt = max(gt, 0.0)
                squared += (gs - gt) ** 2
        per_gram.append(squared / len(tokens) ** 2 if reduction == "mean" else squared)
    return sum(per_gram) / len(per_gram)


@pytest.mark.parametrize("img_level", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "frobenius"])
@pytest.mark.parametrize("remove_neg", [False, True])
def test_gram_loss_matches_direct_gram(img_level: bool, reduction: str, remove_neg: bool) -> None:
    student = torch.randn(3, 5, 4, generator=_gen(50), requires_grad=True)
    teacher = torch.randn(3, 5, 4, generator=_gen(51), requires_grad=True)
    got = gram_loss(student, teacher, img_level=img_level, reduction=reduction, remove_neg=remove_neg)
    expected = _gram_direct(student.detach(), teacher.detach(), img_level, reduction, remove_neg)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    got.backward()
    assert student.grad is not None and bool(student.grad.abs().sum() > 0)
    assert teacher.grad is None


@pytest.mark.parametrize("img_level", [True, False])
def test_gram_loss_without_normalisation_and_with_only_teacher_negatives_removed(img_level: bool) -> None:
    student = torch.randn(2, 6, 4, generator=_gen(53), requires_grad=True)
    teacher = torch.randn(2, 6, 4, generator=_gen(54))
    raw = gram_loss(student, teacher, img_level, normalized=False)
    assert raw.item() == pytest.approx(_gram_direct(student.detach(), teacher, img_level, "mean", False, False),
                                       rel=1e-5)
    only_teacher = gram_loss(student, teacher, img_level, remove_only_teacher_neg=True)
    expected = _gram_direct(student.detach(), teacher, img_level, "mean", False, remove_only_teacher_neg=True)
    assert only_teacher.item() == pytest.approx(expected, rel=1e-5)
    both = _gram_direct(student.detach(), teacher, img_level, "mean", True)
    assert abs(only_teacher.item() - both) > 1e-4  # student negatives facing a positive target still count
    only_teacher.backward()
    assert student.grad is not None and bool(student.grad.abs().sum() > 0)
    with pytest.raises(ValueError, match="exclude each other"):
        gram_loss(student, teacher, remove_neg=True, remove_only_teacher_neg=True)


def test_gram_loss_is_zero_for_scaled_copies_and_rejects_bad_input() -> None:
    student = torch.randn(2, 6, 3, generator=_gen(52))
    assert gram_loss(student, student * 4.0).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        gram_loss(student, student[:, :5])
    with pytest.raises(ValueError):
        gram_loss(student, student, reduction="sum")  # type: ignore[arg-type]


def _bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """Keys cubic-convolution resampling matrix (half-pixel centres, clamped borders)."""

    def kernel(d: float) -> float:
        d = abs(d)
        if d <= 1:
            return (a + 2) * d**3 - (a + 3) * d**2 + 1
        if d < 2:
            return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
        return 0.0

    matrix = np.zeros((n_out, n_in))
    for o in range(n_out):
        src = (o + 0.5) * n_in / n_out - 0.5
        base = math.floor(src)
        for tap in range(-1, 3):
            matrix[o, min(max(base + tap, 0), n_in - 1)] += kernel(src - (base + tap))
    return matrix


@pytest.mark.parametrize(
    ("teacher_grid", "student_grid"), [((8, 6), (4, 3)), ((7, 5), (4, 3)), ((4, 4), (4, 4))]
)
def test_downsample_patch_tokens_is_bicubic_on_the_grid(
    teacher_grid: tuple[int, int], student_grid: tuple[int, int]
) -> None:
    (h_t, w_t), (h_s, w_s) = teacher_grid, student_grid
    n, dim = 2, 3
    tokens = torch.randn(n, h_t * w_t, dim, generator=_gen(60), dtype=torch.float64)
    got = downsample_patch_tokens(tokens, teacher_grid, student_grid)
    assert got.shape == (n, h_s * w_s, dim)

    image = torch.zeros(n, dim, h_t, w_t, dtype=torch.float64)  # token r*w+c sits at row r, column c
    for b in range(n):
        for r in range(h_t):
            for c in range(w_t):
                image[b, :, r, c] = tokens[b, r * w_t + c]
    resized = F.interpolate(image, size=student_grid, mode="bicubic", align_corners=False, antialias=False)
    rows, cols = _bicubic_matrix(h_t, h_s), _bicubic_matrix(w_t, w_s)
    for b in range(n):
        for d in range(dim):
            keys = rows @ image[b, d].numpy() @ cols.T
            for r in range(h_s):
                for c in range(w_s):
                    value = got[b, r * w_s + c, d].item()
                    assert value == pytest.approx(resized[b, d, r, c].item(), abs=1e-12)
                    assert value == pytest.approx(keys[r, c], abs=1e-10)
    with pytest.raises(ValueError):
        downsample_patch_tokens(tokens, (h_t, w_t + 1), student_grid)
