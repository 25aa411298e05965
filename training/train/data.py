"""The training data of a run: the catalog's mix and the config -> curated parts -> ``TrainLoader`` per rank."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pyarrow as pa

from catalog.ledger import Ledger
from catalog.mix import TrainingMix, read_mix
from catalog.schemas import curated_table, packed_table
from catalog.shards import read_table
from catalog.tables import table_fingerprint
from training.data.dataset import PartDataset
from training.data.loader import TrainLoader
from training.data.mixing import MixConfig
from training.data.multicrop import MultiCropConfig
from training.train.config import DataConfig, TrainConfig

log = logging.getLogger("curate.training")
PART_COLUMNS = ["image_id", "uri"]  # what the loader reads of a part's table
DEFAULT_P_HOMOGENEOUS = 0.1  # the recipe's share of homogeneous steps, when a config names the part but no share


@dataclass(frozen=True)
class DataPlan:
    """Which parts a run reads and how its steps mix them, after merging ``_mix.json`` with the config.

    ``weights`` None: by part size. ``recorded`` is the catalog's mix (None without one).
    """

    parts: list[str]
    weights: dict[str, float] | None
    homogeneous_part: str | None
    p_homogeneous: float
    recorded: TrainingMix | None


def plan_data(data: DataConfig) -> DataPlan:
    """The run's parts and mixing: each ``data.*`` key that is set wins over ``<catalog>/_mix.json``."""
    if not data.catalog_root:
        raise ValueError("data.catalog_root must name a catalog")
    recorded = read_mix(data.catalog_root)
    if recorded is None and not data.parts:
        raise ValueError(f"{data.catalog_root} has no training mix (_mix.json): run `curate mix` or set data.parts")
    parts = list(data.parts) or list(recorded.parts)
    if data.homogeneous_part is not None:
        homogeneous = data.homogeneous_part or None
    else:
        homogeneous = recorded.homogeneous_part if recorded and recorded.homogeneous_part in parts else None
    weights = data.weights if data.weights is not None or recorded is None else _mix_weights(recorded, parts, homogeneous)
    if data.p_homogeneous is not None:
        p = data.p_homogeneous
    elif recorded is not None and homogeneous == recorded.homogeneous_part:
        p = recorded.p_homogeneous
    else:
        p = DEFAULT_P_HOMOGENEOUS
    return DataPlan(parts, weights, homogeneous, p if homogeneous else 0.0, recorded)


def _mix_weights(recorded: TrainingMix, parts: list[str], homogeneous: str | None) -> dict[str, float]:
    """The mix's weights of the run's heterogeneous parts; a part the mix does not weigh is an error."""
    hetero = [p for p in parts if p != homogeneous]
    missing = [p for p in hetero if p not in recorded.weights]
    if missing:
        raise ValueError(f"the catalog's mix has no weight for parts {missing} (its parts: {sorted(recorded.parts)}); "
                         "set data.weights or run `curate mix` with them")
    return {p: recorded.weights[p] for p in hetero}


@dataclass(frozen=True)
class TrainingData:
    """The parts a run reads, the table each came from and the mix its sampler follows."""

    root: str
    plan: DataPlan
    datasets: dict[str, PartDataset]
    tables: dict[str, str]  # part -> catalog table read (curated/<part> or packed/<part>/index)

    def mix(self, seed: int) -> MixConfig:
        plan = self.plan
        return MixConfig({name: len(ds) for name, ds in self.datasets.items()}, plan.weights,
                         plan.homogeneous_part, plan.p_homogeneous, seed=seed)

    def fingerprints(self) -> dict[str, dict[str, object]]:
        """Per part, the shards of the table read and its image count (for the run manifest)."""
        return {part: {**table_fingerprint(self.root, table), "images": len(self.datasets[part])}
                for part, table in self.tables.items()}


def training_data(data: DataConfig) -> TrainingData:
    """Read every part of the run's plan; warns when a part's size moved since ``curate mix`` recorded it."""
    plan = plan_data(data)
    tables = {part: part_table_name(data.catalog_root, part) for part in plan.parts}
    datasets = {part: PartDataset(part, read_table(data.catalog_root, table, PART_COLUMNS),
                                  max_pixels=data.max_pixels)
                for part, table in tables.items()}
    if plan.recorded is not None:
        for part, dataset in datasets.items():
            recorded = plan.recorded.parts.get(part)
            if recorded is not None and recorded != len(dataset):
                log.warning("part %r has %d images in %s, the mix recorded %d (rebuilt since `curate mix`, or "
                            "packed without its unreadable images)", part, len(dataset), tables[part], recorded)
    return TrainingData(data.catalog_root, plan, datasets, tables)


def part_table_name(root: str, part: str) -> str:
    """The table a part is read from: its packed tar shards when `curate pack` finished them, else the pool URIs."""
    return packed_table(part) if Ledger(root, f"pack-{part}").is_complete() else curated_table(part)


def part_table(root: str, part: str) -> pa.Table:
    """A part's ``image_id`` and ``uri`` columns, from the table ``part_table_name`` picks."""
    return read_table(root, part_table_name(root, part), PART_COLUMNS)


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


def build_loader(
    config: TrainConfig, rank: int, world_size: int, patch_size: int, data: TrainingData | None = None
) -> TrainLoader:
    """This rank's loader over ``data`` (default: the parts ``training_data`` reads for the config)."""
    data = data or training_data(config.data)
    crops, probabilities = multicrop_options(config)
    return TrainLoader(
        data.datasets, data.mix(config.seed), crops, crop_probabilities=probabilities,
        batch_size=config.optim.batch_size_per_rank, rank=rank, world_size=world_size,
        num_workers=config.data.num_workers, patch_size=patch_size,
        mask_ratio_range=config.crops.mask_ratio_range,
        mask_sample_probability=config.crops.mask_sample_probability,
        pin_memory=pins_memory(config),
    )


def prefetches(config: TrainConfig) -> bool:
    """``data.device_prefetch`` None: on CUDA, where the next batch's copy then overlaps the current step."""
    ahead = config.data.device_prefetch
    return config.device == "cuda" if ahead is None else ahead


def pins_memory(config: TrainConfig) -> bool:
    """``data.pin_memory`` None: pin on CUDA, where a copy from pinned memory runs without blocking the host
    (a full batch of float crops is about 0.5 GB at 256 images of 2x224 + 8x96)."""
    pin = config.data.pin_memory
    return config.device == "cuda" if pin is None else pin


def crop_sizes(batch: dict) -> list[int | None]:
    """(global, local, Gram-teacher) crop sides of a loader batch, for the metrics log."""
    gram = batch.get("gram_teacher_crops")
    return [batch["global_crops"].shape[-1], batch["local_crops"].shape[-1], None if gram is None else gram.shape[-1]]
