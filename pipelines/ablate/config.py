"""What an ablation compares: its arms (the data each trains on), its seeds, its schedule and its evaluations.

Defaults are the DINOv3 data ablation (its Table 1) on the demo catalog: ``raw`` (the deduplicated
pool), ``clustering`` (``curated/lvd``), ``retrieval`` (the pool images retrieved for the ``demo``
seed) and ``mix`` (both, plus the labelled seed images as the homogeneous part on 10 % of steps).
``{catalog}`` in a path is the catalog root's parent folder, as in the seeds config.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from catalog.config import ConfigError
from catalog.names import check_name
from pipelines.stages.mix import PartSpec
from training.evals.suite import EvalSuiteConfig

DEMO_POOL = "{catalog}/demo_pool"
UNTRAINED = "untrained"  # the reference row: the recipe's teacher before its first step


@dataclass(frozen=True)
class ArmSpec:
    """One arm: the parts it trains on (sources as in ``curate mix``) and its homogeneous batches.

    ``from_mix``: train on the catalog's ``_mix.json`` instead (its parts, weights and homogeneous
    part, as ``curate train`` with only ``data.catalog_root``); ``parts`` must then be empty.
    """

    parts: dict[str, PartSpec] = field(default_factory=dict)
    homogeneous_part: str | None = None
    p_homogeneous: float = 0.1
    from_mix: bool = False

    def __post_init__(self) -> None:
        if self.from_mix == bool(self.parts):
            raise ConfigError("an arm names its parts or sets from_mix: true (one of the two)")
        for name in self.parts:
            check_name(name, "arm part")
        if self.homogeneous_part is not None and self.homogeneous_part not in self.parts:
            raise ConfigError(f"homogeneous_part {self.homogeneous_part!r} is not one of the arm's parts "
                             f"{sorted(self.parts)}")
        if not 0.0 <= self.p_homogeneous < 1.0:
            raise ConfigError(f"p_homogeneous must be in [0, 1), got {self.p_homogeneous}")


def default_arms() -> dict[str, ArmSpec]:
    retrieved = PartSpec("retrieved:demo")
    return {
        "raw": ArmSpec({"pool": PartSpec("pool")}),
        "clustering": ArmSpec({"lvd": PartSpec("lvd")}),
        "retrieval": ArmSpec({"retrieved-demo": retrieved}),
        "mix": ArmSpec({"lvd": PartSpec("lvd"), "retrieved-demo": retrieved,
                        "labelled": PartSpec(f"images:{DEMO_POOL}/seed")},
                       homogeneous_part="labelled", p_homogeneous=0.1),
    }


@dataclass(frozen=True)
class AblationConfig:
    """``steps``: every arm's schedule compressed to this many iterations (None: the training config's).

    ``train``: overrides applied to the training config of every arm (``key.sub=value``).
    ``demo_pool``: a demo pool whose evaluation sets (``pipelines.demo.eval_sets``) fill every
    ``evals`` path left empty; ``""`` for a user's pool, whose sets are given in ``evals``.
    ``image_size``: side of the k-NN, probe and retrieval images (0: the training config's
    ``eval.image_size``, else its global crop size).
    ``untrained``: also score, seed by seed, the teacher every arm starts from (row ``untrained``):
    what training added to each score, so a table of arms within noise of it reads as "too little
    training to tell", not as "the data does not matter".
    """

    name: str = "default"
    arms: dict[str, ArmSpec] = field(default_factory=default_arms)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int | None = None
    train: list[str] = field(default_factory=list)
    demo_pool: str = DEMO_POOL
    evals: EvalSuiteConfig = field(default_factory=EvalSuiteConfig)
    image_size: int = 0
    untrained: bool = True

    def __post_init__(self) -> None:
        check_name(self.name, "ablation name")
        if not self.arms:
            raise ConfigError("an ablation needs at least one arm")
        if self.untrained and UNTRAINED in self.arms:
            raise ConfigError(f"arm name {UNTRAINED!r} is the reference row's: rename the arm or set untrained=false")
        for arm in self.arms:
            check_name(arm, "arm name")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ConfigError(f"seeds must be distinct non-negative integers, got {self.seeds}")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")


# `--quick`: the whole ablation in miniature (CI, a first look): one seed, a few steps, same arms.
QUICK = ["seeds=[0]", "steps=6"]
