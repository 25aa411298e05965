"""What a recipe stage plugs into the one training loop (``training.train.loop.Trainer``).

The loop owns everything a run has in common: the output folder, resume, schedules, the divergence
guard, the metrics row, checkpoint and eval cadence, export and the run manifest. A recipe owns its
models and what one step does with a batch: self-distillation from the EMA teacher (``pretrain``,
``gram``, ``highres``: ``training.train.pretrain.SSLRecipe``) or students distilled from a frozen
teacher (``distill``: ``training.train.distill.DistillRecipe``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from training.models import ViTConfig
from training.train.evals import CheckpointEvals
from training.train.schedules import StepHyperParams


@dataclass(frozen=True)
class StepOutcome:
    """What one step reports back to the loop; identical on every rank."""

    record: dict[str, object]  # the recipe's fields of the step's metrics row (losses, grad norms, ...)
    loss: float  # the value the progress bar shows
    finite: bool  # False: some loss was NaN/inf and its optimizer step and EMA update were skipped


@dataclass(frozen=True)
class CheckpointModels:
    """The modules a checkpoint holds for this rank, where and over which process group."""

    student: nn.Module
    teacher: nn.Module  # the EMA teacher
    optimizer: torch.optim.Optimizer
    extra: dict[str, nn.Module] = field(default_factory=dict)  # saved under their names (the Gram teacher)
    subdir: str = ""  # ``<step>/<subdir>``: one folder per distillation student
    group: dist.ProcessGroup | None = None  # the DCP save/load group (default: the world)


@dataclass(frozen=True)
class ExportTarget:
    """The backbone this rank exports at the end of a run, and whether it writes the file."""

    backbone: nn.Module
    vit: ViTConfig
    path: str
    writer: bool
    subgroup: bool = False  # the backbone is sharded over a sub-group (see ``export_teacher``)


class Recipe(Protocol):
    """A recipe stage: built from the config (models, optimizer), then driven by the loop."""

    label: str  # the progress bar's name
    patch_size: int  # the patch grid the loader draws iBOT masks on

    def start_fresh(self) -> None:
        """Fill the models of a run that has no checkpoint yet (e.g. from an earlier stage's)."""

    def checkpoint_models(self) -> CheckpointModels:
        """The modules to save and restore."""

    def step(self, batch: dict, hp: StepHyperParams, step: int) -> StepOutcome:
        """One optimisation step on a device-resident batch; collective over all ranks."""

    def evaluate(self, evals: CheckpointEvals) -> dict[str, float]:
        """Score the EMA backbone(s) (collective); the evals row's fields, complete on rank 0."""

    def export_target(self, output_dir: str) -> ExportTarget:
        """What to export at the end of a finished run."""
