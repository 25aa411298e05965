"""The training loader of a run: catalog parts ``curated/<part>`` -> ``TrainLoader`` for this rank."""

from __future__ import annotations

from catalog.ledger import Ledger
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
    return {part: PartDataset(part, part_table(data.catalog_root, part), max_pixels=data.max_pixels)
            for part in data.parts}


def part_table(root: str, part: str):
    """A part's images: from its packed tar shards when `curate pack` finished them, else the pool URIs."""
    table = f"packed/{part}" if Ledger(root, f"pack-{part}").is_complete() else f"curated/{part}"
    return read_table(root, table, ["image_id", "uri"])


def multicrop_options(config: TrainConfig) -> tuple[list[MultiCropConfig], list[float]]:
    """The crop pipelines the loader draws from per step, with their probabilities.

    One pipeline at the configured sizes (plus the Gram-teacher crop in the Gram stage); the high-res
    stage has one per ``highres.resolutions`` entry, so each step is rendered at its own sizes.
    """
    c = config.crops
    if config.stage == "highres":
        sizes = [(r.global_size, r.local_size, r.gram_size) for r in config.highres.resolutions]
        probabilities = [r.probability for r in config.highres.resolutions]
    else:
        sizes = [(c.global_size, c.local_size, config.gram.teacher_size if config.stage == "gram" else None)]
        probabilities = [1.0]
    options = [
        MultiCropConfig(
            global_size=global_size, global_scale=c.global_scale, n_local=c.n_local, local_size=local_size,
            local_scale=c.local_scale, horizontal_flip=c.horizontal_flip, blur_probabilities=c.blur_probabilities,
            gram_size=gram_size,
        )
        for global_size, local_size, gram_size in sizes
    ]
    return options, probabilities


def build_loader(config: TrainConfig, rank: int, world_size: int, patch_size: int) -> TrainLoader:
    parts = part_datasets(config)
    data = config.data
    mix = MixConfig(
        {name: len(ds) for name, ds in parts.items()}, data.weights, data.homogeneous_part, data.p_homogeneous,
        seed=config.seed,
    )
    crops, probabilities = multicrop_options(config)
    return TrainLoader(
        parts, mix, crops, crop_probabilities=probabilities, batch_size=config.optim.batch_size_per_rank, rank=rank,
        world_size=world_size, num_workers=data.num_workers, patch_size=patch_size,
        mask_ratio_range=config.crops.mask_ratio_range,
        mask_sample_probability=config.crops.mask_sample_probability,
    )


def crop_sizes(batch: dict) -> list[int | None]:
    """(global, local, Gram-teacher) crop sides of a loader batch, for the metrics log."""
    gram = batch.get("gram_teacher_crops")
    return [batch["global_crops"].shape[-1], batch["local_crops"].shape[-1], None if gram is None else gram.shape[-1]]
