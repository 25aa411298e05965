"""Cross-rank losses on 2 gloo processes equal the single-process computation on the whole batch."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import free_ports
from training.losses import KoLeoDistributed, sinkhorn_knopp

WORLD = 2
TEMPERATURE = 0.05
# global masked-token counts split unevenly, including a rank that has none
MASKED_SPLITS = {"uneven": (7, 3), "empty_rank": (6, 0)}
KOLEO_LOCAL_BATCH = 6
KOLEO_GROUP_SIZES = (2, 4, 12)  # within a rank, straddling the rank boundary, the whole world
KOLEO_TOPKS = (1, 2)


def _inputs() -> dict[str, torch.Tensor]:
    """The global batches, identical in every process (fixed seeds)."""
    g = torch.Generator().manual_seed(0)
    return {
        "dino": torch.randn(WORLD * 8, 32, generator=g, dtype=torch.float64) * 2,
        "dino_extreme": (torch.rand(WORLD * 8, 32, generator=g, dtype=torch.float64) * 2 - 1) * 1e4,
        "masked": torch.randn(10, 16, generator=g, dtype=torch.float64) * 2,
        "koleo": torch.randn(WORLD * KOLEO_LOCAL_BATCH, 5, generator=g, dtype=torch.float64),
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # two ranks share the cores
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    try:
        data = _inputs()
        pair_group = dist.new_group(list(range(WORLD)))
        results: dict[str, torch.Tensor] = {}
        for name in ("dino", "dino_extreme"):
            local = data[name].chunk(WORLD)[rank]
            results[f"{name}_flag"] = sinkhorn_knopp(local, TEMPERATURE, distributed=True)
            results[f"{name}_group"] = sinkhorn_knopp(local, TEMPERATURE, group=pair_group)
            results[f"{name}_local_only"] = sinkhorn_knopp(local, TEMPERATURE)
        for split_name, counts in MASKED_SPLITS.items():
            start = sum(counts[:rank])
            local = data["masked"][start : start + counts[rank]]
            results[f"masked_{split_name}"] = sinkhorn_knopp(local, TEMPERATURE, distributed=True)
        for group_size in KOLEO_GROUP_SIZES:
            for topk in KOLEO_TOPKS if group_size > 2 else (1,):
                x = data["koleo"].chunk(WORLD)[rank].clone().requires_grad_(True)
                loss = KoLeoDistributed(group_size=group_size, topk=topk)(x)
                loss.backward()
                results[f"koleo_{group_size}_{topk}_loss"] = loss.detach()
                results[f"koleo_{group_size}_{topk}_grad"] = x.grad
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, torch.Tensor]]:
    out_dir = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(free_ports()[0], str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


def _sinkhorn_direct(logits: torch.Tensor, temperature: float, n_iterations: int = 3) -> torch.Tensor:
    """The recipe's multiplicative Sinkhorn-Knopp on one process (prototypes × samples)."""
    q = torch.exp(logits / temperature).T
    n_protos, n_samples = q.shape
    q = q / q.sum()
    for _ in range(n_iterations):
        q = q / q.sum(dim=1, keepdim=True) / n_protos
        q = q / q.sum(dim=0, keepdim=True) / n_samples
    return (q * n_samples).T


def test_sinkhorn_split_over_ranks_equals_one_process(rank_results: list[dict[str, torch.Tensor]]) -> None:
    data = _inputs()
    expected = _sinkhorn_direct(data["dino"], TEMPERATURE)
    for key in ("dino_flag", "dino_group"):
        got = torch.cat([r[key] for r in rank_results])
        assert torch.allclose(got, expected, rtol=1e-10, atol=1e-14)
    local_only = torch.cat([r["dino_local_only"] for r in rank_results])
    assert not torch.allclose(local_only, expected, rtol=1e-3)  # the split really changes local statistics


def test_sinkhorn_extreme_logits_split_equals_one_process(
    rank_results: list[dict[str, torch.Tensor]],
) -> None:
    single = sinkhorn_knopp(_inputs()["dino_extreme"], TEMPERATURE)
    for key in ("dino_extreme_flag", "dino_extreme_group"):
        got = torch.cat([r[key] for r in rank_results])
        assert bool(torch.isfinite(got).all())
        assert torch.allclose(got.sum(dim=1), torch.ones(got.shape[0], dtype=got.dtype))
        assert torch.allclose(got, single, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("split_name", sorted(MASKED_SPLITS))
def test_masked_token_sinkhorn_uses_the_global_token_set(
    rank_results: list[dict[str, torch.Tensor]], split_name: str
) -> None:
    counts = MASKED_SPLITS[split_name]
    got = [r[f"masked_{split_name}"] for r in rank_results]
    assert [g.shape[0] for g in got] == list(counts)
    expected = _sinkhorn_direct(_inputs()["masked"][: sum(counts)], TEMPERATURE)
    assert torch.allclose(torch.cat(got), expected, rtol=1e-10, atol=1e-14)


def _koleo_rank_losses(x: torch.Tensor, group_size: int, topk: int, eps: float = 1e-8) -> list[torch.Tensor]:
    """Per-rank mean of −log(‖x̂_i − x̂_j + eps‖ + eps) over the `topk` neighbours j in consecutive groups."""
    unit = x / x.norm(dim=1, keepdim=True).clamp_min(eps)
    terms = []
    for i in range(x.shape[0]):
        group = range((i // group_size) * group_size, (i // group_size + 1) * group_size)
        ranked = sorted((j for j in group if j != i), key=lambda j: -float(unit[i].detach() @ unit[j].detach()))
        terms += [-torch.log((unit[i] - unit[j] + eps).norm() + eps) for j in ranked[:topk]]
    per_rank = torch.stack(terms).reshape(WORLD, -1)
    return [row.mean() for row in per_rank]


@pytest.mark.parametrize("group_size, topk", [(2, 1), (4, 1), (4, 2), (12, 1), (12, 2)])
def test_distributed_koleo_equals_grouped_single_process(
    rank_results: list[dict[str, torch.Tensor]], group_size: int, topk: int
) -> None:
    x = _inputs()["koleo"].clone().requires_grad_(True)
    rank_losses = _koleo_rank_losses(x, group_size, topk)
    torch.stack(rank_losses).sum().backward()  # what all ranks' backward passes add up to
    for rank, result in enumerate(rank_results):
        assert result[f"koleo_{group_size}_{topk}_loss"].item() == pytest.approx(rank_losses[rank].item(), rel=1e-12)
    grads = torch.cat([r[f"koleo_{group_size}_{topk}_grad"] for r in rank_results])
    assert torch.allclose(grads, x.grad, rtol=1e-10, atol=1e-12)
