from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from training.data.dataset import PartDataset
from training.data.loader import TrainLoader
from training.data.mixing import MixConfig, MixedBatchSampler
from training.data.multicrop import MultiCropConfig

SIZES = {"imagenet1k": 10, "lvd": 24, "retrieval": 14}
CORRUPT = ("lvd", 5)  # bytes that are not an image
MISSING = ("retrieval", 3)  # uri whose file does not exist
CROPS = MultiCropConfig(global_size=16, local_size=8, n_local=2)
BATCH = 4


def _parts(root: Path) -> tuple[dict[str, PartDataset], dict[str, list[int]]]:
    rng = np.random.default_rng(0)
    parts, ids_by_part, next_id = {}, {}, 1000
    for name, size in SIZES.items():
        ids, uris = [], []
        for i in range(size):
            path = root / f"{name}_{i}.jpg"
            Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(path, quality=90)
            if (name, i) == CORRUPT:
                path.write_bytes(b"definitely not a jpeg")
            if (name, i) == MISSING:
                path.unlink()
            ids.append(next_id)
            uris.append(str(path))
            next_id += 1
        ids_by_part[name] = ids
        parts[name] = PartDataset(name, pa.table({"image_id": pa.array(ids, pa.int64()), "uri": uris}))
    return parts, ids_by_part


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return _parts(tmp_path_factory.mktemp("jpegs"))


MIX = MixConfig(SIZES, {"lvd": 2.0, "retrieval": 1.0}, p_homogeneous=0.25, seed=13)


def _loader(parts, rank: int, num_workers: int) -> TrainLoader:
    return TrainLoader(
        parts, MIX, CROPS, batch_size=BATCH, rank=rank, world_size=2, num_workers=num_workers, patch_size=4
    )


def _take(loader: TrainLoader, n: int) -> list[dict]:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def _same(a: dict, b: dict) -> bool:
    keys = ("image_ids", "global_crops", "local_crops", "masks", "masks_weight")
    return a["step"] == b["step"] and a["parts"] == b["parts"] and all(torch.equal(a[k], b[k]) for k in keys)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_yields_exactly_the_uninterrupted_batches(parts, tmp_path, num_workers):
    datasets, _ = parts
    stop = 7
    for rank in range(2):
        uninterrupted = _loader(datasets, rank, num_workers)
        reference = _take(uninterrupted, stop + 50)
        first = _loader(datasets, rank, num_workers)
        head = _take(first, stop)
        torch.save(first.state_dict(), tmp_path / f"state{rank}.pt")
        resumed = _loader(datasets, rank, num_workers)
        resumed.load_state_dict(torch.load(tmp_path / f"state{rank}.pt", weights_only=False))
        tail = _take(resumed, 50)
        assert [b["step"] for b in tail] == list(range(stop, stop + 50))
        assert all(_same(a, b) for a, b in zip(reference, head + tail))
        assert resumed.skipped == uninterrupted.skipped and sum(resumed.skipped.values()) > 0


def test_workers_do_not_change_batches(parts):
    datasets, _ = parts
    single = _take(_loader(datasets, 0, 0), 12)
    multi = _take(_loader(datasets, 0, 2), 12)
    assert all(_same(a, b) for a, b in zip(single, multi))


def test_batches_follow_the_sampler_and_bad_images_are_substituted(parts):
    datasets, ids_by_part = parts
    n_steps = 40
    sampler = MixedBatchSampler(MIX, BATCH, rank=1, world_size=2)
    draws = [sampler.next_step() for _ in range(n_steps)]
    loader = _loader(datasets, 1, 0)
    batches = _take(loader, n_steps)
    bad = {CORRUPT, MISSING}
    expected_skips: Counter = Counter()
    for draw, batch in zip(draws, batches):
        assert len(batch["image_ids"]) == BATCH and batch["global_crops"].shape[0] == 2 * BATCH
        assert batch["homogeneous"] == draw.homogeneous and batch["parts"] == list(draw.parts)
        if draw.homogeneous:
            assert set(batch["parts"]) == {"imagenet1k"}
        for slot, (part, position, index) in enumerate(zip(draw.parts, draw.positions, draw.indices)):
            stream = sampler.streams[part]
            k = position
            while (part, int(stream.indices(np.array([k]))[0])) in bad:  # next index of the same stream
                expected_skips[part] += 1
                k += 1
            expected_index = int(stream.indices(np.array([k]))[0])
            assert batch["image_ids"][slot] == ids_by_part[part][expected_index]
            if k == position:
                assert expected_index == index
    assert expected_skips["lvd"] > 0 and expected_skips["retrieval"] > 0
    assert loader.skipped == expected_skips
    bad_ids = {ids_by_part[p][i] for p, i in bad}
    assert not bad_ids & {int(i) for b in batches for i in b["image_ids"]}
    assert datasets["lvd"].skipped["text_file"] > 0 and datasets["retrieval"].skipped["missing"] > 0


def test_ranks_agree_on_kind_and_draw_different_images(parts):
    datasets, _ = parts
    r0, r1 = (_take(_loader(datasets, rank, 0), 30) for rank in range(2))
    assert [b["homogeneous"] for b in r0] == [b["homogeneous"] for b in r1]
    assert any(not torch.equal(a["image_ids"], b["image_ids"]) for a, b in zip(r0, r1))


def test_part_dataset_decodes_the_file(parts, tmp_path):
    datasets, ids_by_part = parts
    ds = datasets["imagenet1k"]
    assert len(ds) == SIZES["imagenet1k"] and ds.image_id(2) == ids_by_part["imagenet1k"][2]
    image = ds.load(2)
    with Image.open(ds.uris[2].as_py()) as ref:
        np.testing.assert_array_equal(np.asarray(image), np.asarray(ref.convert("RGB")))
    with pytest.raises(ValueError):
        TrainLoader(datasets, MixConfig({"imagenet1k": 10}), CROPS, batch_size=2)


def test_mixed_crop_sizes_are_rendered_per_step_and_agree_across_ranks(parts):
    datasets, _ = parts
    small = MultiCropConfig(global_size=16, local_size=8, n_local=2, gram_size=24)
    large = MultiCropConfig(global_size=24, local_size=12, n_local=2)
    options = {0: (16, 8, 24), 1: (24, 12, None)}
    by_rank = []
    for rank in range(2):
        loader = TrainLoader(datasets, MIX, [small, large], crop_probabilities=[0.3, 0.7], batch_size=BATCH,
                             rank=rank, world_size=2, patch_size=4)
        batches = _take(loader, 60)
        by_rank.append([b["crop_option"] for b in batches])
        for b in batches:
            global_size, local_size, gram_size = options[b["crop_option"]]
            assert b["global_crops"].shape[-2:] == (global_size, global_size)
            assert b["local_crops"].shape[-2:] == (local_size, local_size)
            assert b["masks"].shape[-1] == (global_size // 4) ** 2  # iBOT masks drawn on that step's grid
            assert ("gram_teacher_crops" in b) == (gram_size is not None)
            if gram_size is not None:
                assert b["gram_teacher_crops"].shape[-2:] == (gram_size, gram_size)
    assert by_rank[0] == by_rank[1]
    assert 0.1 < by_rank[0].count(0) / 60 < 0.5


def test_crop_probabilities_must_match_the_options(parts):
    datasets, _ = parts
    with pytest.raises(ValueError, match="one probability per crops option"):
        TrainLoader(datasets, MIX, [CROPS, CROPS], crop_probabilities=[1.0], batch_size=BATCH)
