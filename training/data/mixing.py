"""The mixed homogeneous/heterogeneous batch sampler.

Every training step is either *homogeneous* (the whole batch, on every rank, from one designated part,
ImageNet-1k in the DINOv3 recipe, ~10 % of steps) or *heterogeneous* (each image drawn from the other
parts in proportion to their weights). All randomness is counter-based: the decision for step ``s``
and the per-image part choices are pure functions of ``(seed, s, rank)``, so every rank agrees
without communication and a resumed run replays exactly. Within a part, images come from an infinite,
seeded, rank-disjoint shuffle whose position is a plain integer, so the whole sampler state is a
tiny dict of counters that goes into the checkpoint.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

# Distinct Philox key words so that the different decisions never share a random stream.
PURPOSE_KIND = 1
PURPOSE_PARTS = 2
PURPOSE_AUGMENT = 3
PURPOSE_MASK = 4
PURPOSE_CROPS = 5

_MASK64 = (1 << 64) - 1
_FEISTEL_ROUNDS = 6


def counter_rng(seed: int, purpose: int, step: int, rank: int = 0, slot: int = 0) -> np.random.Generator:
    """A generator that is a pure function of its arguments (Philox keyed by seed and purpose).

    The counter's lowest word is left at 0 for the draws themselves, so streams of neighbouring
    steps/ranks/slots can never overlap.
    """
    return np.random.Generator(np.random.Philox(key=[seed, purpose], counter=[0, step, rank, slot]))


def step_kind(seed: int, step: int, p: float) -> bool:
    """True when step ``step`` is a homogeneous step (probability ``p``), identical on every rank."""
    return bool(counter_rng(seed, PURPOSE_KIND, step).random() < p)


def choose_option(seed: int, step: int, probabilities: Sequence[float]) -> int:
    """Index of the option used at step ``step`` (drawn with ``probabilities``), identical on every rank."""
    u = counter_rng(seed, PURPOSE_CROPS, step).random()
    return min(int(np.searchsorted(np.cumsum(probabilities), u, side="right")), len(probabilities) - 1)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@lru_cache(maxsize=1024)
def _name_key(name: str) -> int:
    """A stable 64-bit key for a part name (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


@lru_cache(maxsize=4096)
def _round_keys(seed: int, part_key: int, epoch: int) -> np.ndarray:
    words = np.array([seed & _MASK64, part_key, epoch & _MASK64], dtype=np.uint64)
    h = np.zeros(1, dtype=np.uint64)
    for w in words:
        h = _splitmix64(h ^ w)
    keys = []
    for _ in range(_FEISTEL_ROUNDS):
        h = _splitmix64(h)
        keys.append(h[0])
    return np.array(keys, dtype=np.uint64)


def feistel_permute(x: np.ndarray, n: int, round_keys: np.ndarray) -> np.ndarray:
    """Image of ``x`` (values in ``[0, n)``) under a keyed pseudo-random permutation of ``[0, n)``.

    A balanced Feistel network on the smallest even bit width covering ``n``, cycle-walked back
    into range. O(1) memory per index, so parts of billions of images need no permutation table.
    """
    if n == 1:
        return np.zeros_like(x, dtype=np.int64)
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    low_mask = np.uint64((1 << half) - 1)
    shift = np.uint64(half)

    def encrypt(v: np.ndarray) -> np.ndarray:
        left, right = v >> shift, v & low_mask
        for key in round_keys:
            left, right = right, left ^ (_splitmix64(right ^ key) & low_mask)
        return (left << shift) | right

    out = encrypt(np.asarray(x, dtype=np.uint64))
    outside = out >= np.uint64(n)
    while outside.any():
        out[outside] = encrypt(out[outside])
        outside = out >= np.uint64(n)
    return out.astype(np.int64)


@dataclass(frozen=True)
class PartStream:
    """Rank ``rank``'s infinite shuffled stream over one part.

    The global stream is the concatenation of epochs, epoch ``e`` being a permutation of the part
    seeded by ``(seed, part, e)``; rank ``r`` takes global positions ``r, r+W, r+2W, ...``, so within
    an epoch the ranks' draws are disjoint and together cover it.
    """

    name: str
    size: int
    seed: int
    rank: int
    world_size: int

    def indices(self, positions: np.ndarray) -> np.ndarray:
        """Indices within the part for this rank's stream positions ``positions`` (0, 1, 2, ...)."""
        global_pos = np.asarray(positions, dtype=np.int64) * self.world_size + self.rank
        epochs, offsets = np.divmod(global_pos, self.size)
        out = np.empty_like(global_pos)
        part_key = _name_key(self.name)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            keys = _round_keys(self.seed, part_key, int(epoch))
            out[sel] = feistel_permute(offsets[sel], self.size, keys)
        return out


@dataclass(frozen=True)
class MixConfig:
    """Which parts exist (name -> number of images) and how steps mix them.

    ``weights`` gives the heterogeneous proportion of each non-homogeneous part (any positive scale;
    parts left out get weight 0); ``None`` weights them by size. ``homogeneous_part=None`` makes every
    step heterogeneous over all parts.
    """

    parts: Mapping[str, int]
    weights: Mapping[str, float] | None = None
    homogeneous_part: str | None = "imagenet1k"
    p_homogeneous: float = 0.1
    seed: int = 0
    _normalised: Mapping[str, float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "parts", dict(self.parts))
        if any(size <= 0 for size in self.parts.values()):
            raise ValueError(f"every part needs at least one image: {dict(self.parts)}")
        if not 0.0 <= self.p_homogeneous <= 1.0:
            raise ValueError(f"p_homogeneous must be in [0, 1], got {self.p_homogeneous}")
        if self.homogeneous_part is not None and self.homogeneous_part not in self.parts:
            raise ValueError(f"homogeneous part {self.homogeneous_part!r} is not among {list(self.parts)}")
        if not 0 <= self.seed <= _MASK64:
            raise ValueError("seed must be a non-negative 64-bit integer")
        hetero = [p for p in self.parts if p != self.homogeneous_part]
        raw = {p: float(self.parts[p]) for p in hetero} if self.weights is None else dict(self.weights)
        unknown = set(raw) - set(hetero)
        if unknown:
            raise ValueError(f"weights for parts that are not heterogeneous parts: {sorted(unknown)}")
        bad = any(w < 0 for w in raw.values()) or sum(raw.values()) <= 0
        if bad and self.p_homogeneous < 1:
            raise ValueError(f"heterogeneous weights must be non-negative with a positive sum: {raw}")
        total = sum(raw.values())
        normalised = {p: raw.get(p, 0.0) / total for p in hetero} if total > 0 else {}
        object.__setattr__(self, "_normalised", normalised)

    @property
    def heterogeneous_weights(self) -> Mapping[str, float]:
        """Normalised weights (summing to 1) of the parts that heterogeneous batches draw from."""
        return dict(self._normalised)


@dataclass(frozen=True)
class StepDraw:
    """One rank's draw for one step: for every batch slot, its part, stream position and index."""

    step: int
    homogeneous: bool
    parts: tuple[str, ...]
    positions: tuple[int, ...]
    indices: tuple[int, ...]

    def items(self) -> list[tuple[str, int]]:
        return list(zip(self.parts, self.indices))


class MixedBatchSampler:
    """Infinite per-rank sampler: each step a list of ``(part, index_within_part)``.

    State is ``{"step": s, "positions": {part: draws so far on this rank}}`` plus the identity fields
    checked on load; resuming from it replays exactly what an uninterrupted run would draw.
    """

    def __init__(self, config: MixConfig, batch_size: int, rank: int, world_size: int) -> None:
        if batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size/rank/world_size: {batch_size}, {rank}, {world_size}")
        self.config = config
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.streams = {
            name: PartStream(name, size, config.seed, rank, world_size) for name, size in config.parts.items()
        }
        hetero = config.heterogeneous_weights
        self._hetero_names = [p for p, w in hetero.items() if w > 0]
        self._hetero_p = np.array([hetero[p] for p in self._hetero_names])
        self._hetero_p /= self._hetero_p.sum() if len(self._hetero_p) else 1.0
        self.step = 0
        self.positions = {name: 0 for name in config.parts}

    def draw_parts(self, step: int) -> tuple[bool, list[str]]:
        """The kind of ``step`` and the part of each slot: a pure function of (seed, step, rank)."""
        cfg = self.config
        homogeneous = cfg.homogeneous_part is not None and step_kind(cfg.seed, step, cfg.p_homogeneous)
        if homogeneous:
            return True, [cfg.homogeneous_part] * self.batch_size
        rng = counter_rng(cfg.seed, PURPOSE_PARTS, step, self.rank)
        choice = rng.choice(len(self._hetero_names), size=self.batch_size, p=self._hetero_p)
        return False, [self._hetero_names[c] for c in choice]

    def next_step(self) -> StepDraw:
        """Draw the current step and advance the counters."""
        homogeneous, parts = self.draw_parts(self.step)
        positions: list[int] = []
        for part in parts:
            positions.append(self.positions[part])
            self.positions[part] += 1
        indices = np.empty(len(parts), dtype=np.int64)
        names = np.array(parts)
        pos = np.array(positions, dtype=np.int64)
        for part in set(parts):
            sel = names == part
            indices[sel] = self.streams[part].indices(pos[sel])
        draw = StepDraw(self.step, homogeneous, tuple(parts), tuple(positions), tuple(int(i) for i in indices))
        self.step += 1
        return draw

    def __iter__(self) -> Iterator[list[tuple[str, int]]]:
        while True:
            yield self.next_step().items()

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "positions": dict(self.positions),
            "seed": self.config.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: Mapping) -> None:
        mine = self.state_dict()
        for key in ("seed", "rank", "world_size", "batch_size"):
            if state[key] != mine[key]:
                raise ValueError(f"sampler state is for {key}={state[key]}, this sampler has {mine[key]}")
        if set(state["positions"]) != set(self.positions):
            raise ValueError(f"sampler state parts {sorted(state['positions'])} != {sorted(self.positions)}")
        self.step = int(state["step"])
        self.positions = {name: int(k) for name, k in state["positions"].items()}
