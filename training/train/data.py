"""The training loader of a run: catalog parts ``curated/<part>`` -> ``TrainLoader`` for this rank."""

from __future__ import annotations

from catalog.ledger import Ledger
from catalog.shards import read_table
from training.data.dataset import PartDataset
from training.data.loader import TrainLoader
from training.data.mixing import MixConfig
from training.data.multicrop import MultiCropConfig
from training.train.config import TrainConfig
from training.train.stages import loader_crop_sizes


def part_datasets(config: TrainConfig) -> dict[str, PartDataset]:
    data = config.data
    if not data.catalog_root or not data.parts:
        raise ValueError("data.catalog_root and data.parts must name a catalog and at least one curated part")
    return {part: PartDataset(part, part_table(data.catalog_root, part), max_pixels=data.max_pixels)
            for part in data.parts}


def part_table(root: str, part: str):
    """A part's images: from its packed tar shards when `curate pack` finished them, else the pool URIs."""
    table = f"packed/{part}" if Ledger(root, f"pack-{part}").is_complete() else f"curated/{part}"
    return read_table(root, table, ["image_id", "uri"])


def crop_sizes(config: TrainConfig) -> tuple[int, int, int | None]:
    """(global, local, Gram-teacher) sizes the loader renders at.

    Gram stages add the Gram-teacher crop; the high-res stage renders at the largest configured
    sizes and the trainer resizes each step's batch down to that step's choice.
    """
    c = config.crops
    if config.stage == "highres":
        return loader_crop_sizes(config.highres.resolutions)
    gram = config.gram.teacher_size if config.stage == "gram" else None
    return c.global_size, c.local_size, gram


def multicrop_config(config: TrainConfig) -> MultiCropConfig:
    c = config.crops
    global_size, local_size, gram_size = crop_sizes(config)
    return MultiCropConfig(
        global_size=global_size, global_scale=c.global_scale, n_local=c.n_local, local_size=local_size,
        local_scale=c.local_scale, horizontal_flip=c.horizontal_flip, blur_probabilities=c.blur_probabilities,
        gram_size=gram_size,
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
