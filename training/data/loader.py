"""The resumable training loader: mixed sampler -> decode -> multi-crop -> collate with iBOT masks.

The main process runs the (stateful, counter-only) ``MixedBatchSampler`` and hands each step's draw
to a worker as the *key* of a map-style dataset; the worker decodes, augments and collates the whole
per-rank batch with generators seeded by (seed, step, rank, slot), so a batch is a pure function of
its draw no matter which worker builds it. torchdata's ``StatefulDataLoader`` snapshots the sampler
state as of the last batch handed out (not the prefetched ones), so resuming at step ``s`` replays
exactly the batches an uninterrupted run yields from ``s`` on, with or without workers.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torchdata.stateful_dataloader import StatefulDataLoader

from training.data.dataset import PartDataset
from training.data.masking import collate
from training.data.mixing import (
    PURPOSE_AUGMENT,
    PURPOSE_MASK,
    MixConfig,
    MixedBatchSampler,
    PartStream,
    StepDraw,
    choose_option,
    counter_rng,
)
from training.data.multicrop import MultiCrop, MultiCropConfig


class _DrawSampler:
    """Infinite sampler of ``StepDraw`` keys whose state is the mixed sampler's counters."""

    def __init__(self, sampler: MixedBatchSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[StepDraw]:
        while True:
            yield self.sampler.next_step()

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: Mapping) -> None:
        self.sampler.load_state_dict(state)


class StepDataset(torch.utils.data.Dataset):
    """Map-style dataset whose item for a ``StepDraw`` is that step's collated per-rank batch.

    A bad image at stream position ``k`` of a part is replaced by the image at position ``k+1`` of
    the same rank's stream (then ``k+2``, ...), so batches are never short; the substitute also
    appears in its own turn later, a duplicate that keeps the sampler free of worker feedback.

    With several ``crops`` pipelines (the high-resolution stage's crop sizes), each step renders with
    the one ``choose_option`` draws for it, so crops and iBOT masks are made at that step's size.
    """

    def __init__(
        self,
        parts: Mapping[str, PartDataset],
        streams: Mapping[str, PartStream],
        crops: Sequence[MultiCrop],
        crop_probabilities: Sequence[float],
        *,
        seed: int,
        rank: int,
        patch_size: int,
        mask_ratio_range: tuple[float, float],
        mask_sample_probability: float,
        max_substitutions: int,
    ) -> None:
        self.parts = dict(parts)
        self.streams = dict(streams)
        self.crops = list(crops)
        self.crop_probabilities = list(crop_probabilities)
        self.seed = seed
        self.rank = rank
        self.patch_size = patch_size
        self.mask_ratio_range = mask_ratio_range
        self.mask_sample_probability = mask_sample_probability
        self.max_substitutions = max_substitutions

    def load_slot(self, part: str, position: int) -> tuple[Image.Image, int, int]:
        """Image, image id and number of bad images skipped for the slot at ``position`` of ``part``."""
        dataset, stream = self.parts[part], self.streams[part]
        for skipped in range(self.max_substitutions + 1):
            index = int(stream.indices(np.array([position + skipped]))[0])
            image = dataset.try_load(index)
            if image is not None:
                return image, dataset.image_id(index), skipped
        raise RuntimeError(
            f"{self.max_substitutions + 1} consecutive bad images in part {part!r} from stream position "
            f"{position} (reasons so far: {dict(dataset.skipped)})"
        )

    def __getitem__(self, draw: StepDraw) -> dict:
        samples, image_ids = [], []
        skipped: Counter[str] = Counter()
        option = choose_option(self.seed, draw.step, self.crop_probabilities) if len(self.crops) > 1 else 0
        crops = self.crops[option]
        for slot, (part, position) in enumerate(zip(draw.parts, draw.positions)):
            image, image_id, n_bad = self.load_slot(part, position)
            if n_bad:
                skipped[part] += n_bad
            samples.append(crops(image, counter_rng(self.seed, PURPOSE_AUGMENT, draw.step, self.rank, slot)))
            image_ids.append(image_id)
        batch = collate(
            samples,
            patch_size=self.patch_size,
            rng=counter_rng(self.seed, PURPOSE_MASK, draw.step, self.rank),
            mask_ratio_range=self.mask_ratio_range,
            mask_sample_probability=self.mask_sample_probability,
        )
        batch["step"] = draw.step
        batch["crop_option"] = option
        batch["homogeneous"] = draw.homogeneous
        batch["parts"] = list(draw.parts)
        batch["image_ids"] = torch.tensor(image_ids, dtype=torch.long)
        batch["skipped"] = dict(skipped)
        return batch


def _identity(batch: dict) -> dict:
    return batch


class TrainLoader:
    """Infinite iterator of per-rank training batches with exact ``state_dict``/``load_state_dict``.

    Each batch is ``collate``'s dict plus ``step``, ``crop_option`` (index into ``crops`` when several
    are given with ``crop_probabilities``), ``homogeneous``, ``parts`` (per image), ``image_ids`` and
    ``skipped`` (bad images substituted in this batch, by part). ``skipped`` on the loader accumulates
    those counts over the run and is checkpointed with it.
    """

    def __init__(
        self,
        parts: Mapping[str, PartDataset],
        mix: MixConfig,
        crops: MultiCropConfig | Sequence[MultiCropConfig],
        *,
        crop_probabilities: Sequence[float] | None = None,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        prefetch_factor: int | None = None,
        patch_size: int = 16,
        mask_ratio_range: tuple[float, float] = (0.1, 0.5),
        mask_sample_probability: float = 0.5,
        max_substitutions: int = 64,
        pin_memory: bool = False,
    ) -> None:
        sizes = {name: len(ds) for name, ds in parts.items()}
        if sizes != dict(mix.parts):
            raise ValueError(f"MixConfig parts {dict(mix.parts)} do not match the datasets {sizes}")
        options = [crops] if isinstance(crops, MultiCropConfig) else list(crops)
        probabilities = list(crop_probabilities) if crop_probabilities is not None else [1.0 / len(options)] * len(options)
        if len(probabilities) != len(options) or abs(sum(probabilities) - 1.0) > 1e-6:
            raise ValueError(f"crop_probabilities {probabilities} must give one probability per crops option, summing to 1")
        self.sampler = MixedBatchSampler(mix, batch_size, rank, world_size)
        dataset = StepDataset(
            parts,
            self.sampler.streams,
            [MultiCrop(option) for option in options],
            probabilities,
            seed=mix.seed,
            rank=rank,
            patch_size=patch_size,
            mask_ratio_range=mask_ratio_range,
            mask_sample_probability=mask_sample_probability,
            max_substitutions=max_substitutions,
        )
        with warnings.catch_warnings():  # torchdata 0.11 calls torch's deprecated set_vital on every loader
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
            self._loader = StatefulDataLoader(
                dataset,
                batch_size=None,
                sampler=_DrawSampler(self.sampler),
                num_workers=num_workers,
                collate_fn=_identity,
                prefetch_factor=prefetch_factor if num_workers > 0 else None,
                pin_memory=pin_memory,
            )
        self.skipped: Counter[str] = Counter()
        self.next_step = 0

    def __iter__(self) -> Iterator[dict]:
        for batch in self._loader:
            if batch["step"] != self.next_step:
                raise RuntimeError(f"loader yielded step {batch['step']}, expected {self.next_step}")
            self.skipped.update(batch["skipped"])
            self.next_step = batch["step"] + 1
            yield batch

    def state_dict(self) -> dict:
        return {"loader": self._loader.state_dict(), "skipped": dict(self.skipped), "next_step": self.next_step}

    def load_state_dict(self, state: Mapping) -> None:
        self._loader.load_state_dict(state["loader"])
        self.skipped = Counter(state["skipped"])
        self.next_step = int(state["next_step"])
