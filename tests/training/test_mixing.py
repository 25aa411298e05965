import json
import math

import numpy as np
import pytest
from scipy.stats import chisquare

from training.data.mixing import (
    MixConfig,
    MixedBatchSampler,
    PartStream,
    feistel_permute,
    step_kind,
)

PARTS = {"imagenet1k": 1300, "lvd_balanced": 5000, "retrieval": 2000, "public": 700}
WEIGHTS = {"lvd_balanced": 0.6, "retrieval": 0.3, "public": 0.1}
N_STEPS = 20_000
BATCH = 16


def _run_parts(config: MixConfig, rank: int, world_size: int = 4) -> tuple[np.ndarray, list[list[str]]]:
    sampler = MixedBatchSampler(config, BATCH, rank, world_size)
    kinds, parts = [], []
    for step in range(N_STEPS):
        homogeneous, slot_parts = sampler.draw_parts(step)
        kinds.append(homogeneous)
        parts.append(slot_parts)
    return np.array(kinds), parts


@pytest.fixture(scope="module")
def weighted_runs() -> dict[int, tuple[np.ndarray, list[list[str]]]]:
    config = MixConfig(PARTS, WEIGHTS, seed=7)
    return {rank: _run_parts(config, rank) for rank in range(4)}


def test_homogeneous_fraction_within_binomial_bound(weighted_runs):
    kinds, parts = weighted_runs[0]
    p = 0.1
    sigma = math.sqrt(p * (1 - p) / N_STEPS)
    assert abs(kinds.mean() - p) < 4 * sigma
    for homogeneous, slot_parts in zip(kinds, parts):
        assert (set(slot_parts) == {"imagenet1k"}) == bool(homogeneous)


def test_all_ranks_agree_on_every_step_kind(weighted_runs):
    kinds0 = weighted_runs[0][0]
    for rank in (1, 2, 3):
        np.testing.assert_array_equal(weighted_runs[rank][0], kinds0)
    # the kinds are exactly the pure function of (seed, step)
    np.testing.assert_array_equal(kinds0, [step_kind(7, s, 0.1) for s in range(N_STEPS)])
    # ranks draw different images/parts on heterogeneous steps (independent per-rank streams)
    hetero = np.flatnonzero(~kinds0)[:200]
    assert any(weighted_runs[0][1][s] != weighted_runs[1][1][s] for s in hetero)


def _hetero_counts(kinds: np.ndarray, parts: list[list[str]], names: list[str]) -> np.ndarray:
    counts = dict.fromkeys(names, 0)
    for homogeneous, slot_parts in zip(kinds, parts):
        if not homogeneous:
            for part in slot_parts:
                counts[part] += 1
    return np.array([counts[n] for n in names])


def test_heterogeneous_batches_match_weights_and_chisquare_rejects_wrong_weight(weighted_runs):
    names = list(WEIGHTS)
    for rank in range(4):
        counts = _hetero_counts(*weighted_runs[rank], names)
        expected = np.array([WEIGHTS[n] for n in names]) * counts.sum()
        assert chisquare(counts, expected).pvalue > 1e-3
    counts = _hetero_counts(*weighted_runs[0], names)
    wrong = np.array([0.6, 0.3 * 1.05, 0.1])
    wrong_expected = wrong / wrong.sum() * counts.sum()
    assert chisquare(counts, wrong_expected).pvalue < 1e-6


def test_weights_default_to_part_sizes():
    config = MixConfig(PARTS, seed=3)
    others = {k: v for k, v in PARTS.items() if k != "imagenet1k"}
    total = sum(others.values())
    assert dict(config.heterogeneous_weights) == pytest.approx({k: v / total for k, v in others.items()})
    kinds, parts = _run_parts(config, rank=2)
    names = list(others)
    counts = _hetero_counts(kinds, parts, names)
    expected = np.array([others[n] / total for n in names]) * counts.sum()
    assert chisquare(counts, expected).pvalue > 1e-3


def test_rank_slices_disjoint_within_an_epoch_and_cover_it():
    size, world = 1003, 4
    for epoch in range(2):
        seen = []
        for rank in range(world):
            stream = PartStream("lvd_balanced", size, seed=11, rank=rank, world_size=world)
            # global positions epoch*size .. (epoch+1)*size-1 that belong to this rank
            global_pos = np.arange(epoch * size, (epoch + 1) * size)
            mine = global_pos[global_pos % world == rank]
            seen.append(stream.indices((mine - rank) // world))
        all_seen = np.concatenate(seen)
        assert len(all_seen) == size
        np.testing.assert_array_equal(np.sort(all_seen), np.arange(size))
    # epochs are different permutations
    stream = PartStream("lvd_balanced", size, seed=11, rank=0, world_size=1)
    assert not np.array_equal(stream.indices(np.arange(size)), stream.indices(np.arange(size, 2 * size)))


def test_sampler_ranks_cover_one_epoch_exactly():
    config = MixConfig({"only": 1000}, homogeneous_part=None, seed=5)
    drawn = []
    for rank in range(4):
        sampler = MixedBatchSampler(config, batch_size=10, rank=rank, world_size=4)
        it = iter(sampler)
        for _ in range(25):  # 4 ranks * 25 steps * 10 = 1000 = one epoch
            drawn.extend(index for part, index in next(it))
    np.testing.assert_array_equal(np.sort(drawn), np.arange(1000))


@pytest.mark.parametrize("n", [1, 2, 3, 17, 256, 1000, 4097])
def test_feistel_is_a_permutation(n):
    keys = np.arange(1, 7, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    out = feistel_permute(np.arange(n), n, keys)
    np.testing.assert_array_equal(np.sort(out), np.arange(n))


def test_state_dict_resumes_exactly_and_is_tiny():
    config = MixConfig(PARTS, WEIGHTS, seed=9)
    full = MixedBatchSampler(config, BATCH, rank=1, world_size=2)
    draws = [full.next_step() for _ in range(150)]
    interrupted = MixedBatchSampler(config, BATCH, rank=1, world_size=2)
    for _ in range(100):
        interrupted.next_step()
    state = json.loads(json.dumps(interrupted.state_dict()))
    resumed = MixedBatchSampler(config, BATCH, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert [resumed.next_step() for _ in range(50)] == draws[100:]
    assert set(state) == {"step", "positions", "seed", "rank", "world_size", "batch_size"}
    other_rank = MixedBatchSampler(config, BATCH, rank=0, world_size=2)
    with pytest.raises(ValueError):
        other_rank.load_state_dict(state)


def test_config_rejects_bad_weights():
    with pytest.raises(ValueError):
        MixConfig(PARTS, {"imagenet1k": 1.0, "public": 1.0})
    with pytest.raises(ValueError):
        MixConfig(PARTS, {"nope": 1.0})
    with pytest.raises(ValueError):
        MixConfig({"a": 10}, homogeneous_part="imagenet1k")
