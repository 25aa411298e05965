"""The training loader of a run: catalog parts ``curated/<part>`` -> ``TrainLoader`` for this rank."""

from __future__ import annotations

from catalog.shards import read_table
from training.data.dataset import PartDataset
from training.data.loader import TrainLoader
from training.data.mixing import MixConfig
from training.data.multicrop import MultiCropConfig
from training.train.config import TrainConfig


def part_datasets(config: TrainConfig) -> dict[str, PartDataset]:
    data = config.data
    if not data.catalog_root or not data.parts:
        raise ValueError("data.catalog_root and data.parts must name a catalog and at least one curated part")
    return {
        part: PartDataset(part, read_table(data.catalog_root, f"curated/{part}", ["image_id", "uri"]),
                          max_pixels=data.max_pixels)
        for part in data.parts
    }


def multicrop_config(config: TrainConfig) -> MultiCropConfig:
    c = config.crops
    return MultiCropConfig(
        global_size=c.global_size, global_scale=c.global_scale, n_local=c.n_local, local_size=c.local_size,
        local_scale=c.local_scale, horizontal_flip=c.horizontal_flip, blur_probabilities=c.blur_probabilities,
    )


def build_loader(config: TrainConfig, rank: int, world_size: int, patch_size: int) -> TrainLoader:
    parts = part_datasets(config)
    data = config.data
    mix = MixConfig(
        {name: len(ds) for name, ds in parts.items()}, data.weights, data.homogeneous_part, data.p_homogeneous,
        seed=config.seed,
    )
    return TrainLoader(
        parts, mix, multicrop_config(config), batch_size=config.optim.batch_size_per_rank, rank=rank,
        world_size=world_size, num_workers=data.num_workers, patch_size=patch_size,
        mask_ratio_range=config.crops.mask_ratio_range,
        mask_sample_probability=config.crops.mask_sample_probability,
    )
