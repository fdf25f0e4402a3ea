"""The stage controller: which ``train.stages`` stage an epoch belongs to and what that stage trains.

Entering a stage sets ``requires_grad`` of every network by the part it belongs to and hands the
frozen parts and the refiner switch to the scheme as arguments (:meth:`Scheme.enter_stage`); the
engine reads them from here, never back from the scheme.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lowdose_toolkit.core.spec import STAGE_PARTS, StageSpec
from lowdose_toolkit.schemes import Scheme


class StageController:
    """The stages of a run and the one being trained."""

    def __init__(self, stages: Sequence[StageSpec], has_refiner: bool) -> None:
        self.stages = tuple(stages)
        self.has_refiner = has_refiner
        self.index: int | None = None  # the stage entered last

    @property
    def total_epochs(self) -> int:
        return sum(s.epochs for s in self.stages)

    def at(self, epoch: int) -> tuple[int, int]:
        """(stage index, first epoch of that stage) for a 0-based epoch."""
        start = 0
        for i, stage in enumerate(self.stages):
            if epoch < start + stage.epochs:
                return i, start
            start += stage.epochs
        return len(self.stages) - 1, start - self.stages[-1].epochs

    @property
    def current(self) -> StageSpec:
        return self.stages[self.index or 0]

    @property
    def frozen(self) -> frozenset[str]:
        """Parts the current stage freezes."""
        return frozenset(STAGE_PARTS) - set(self.current.trainable)

    @property
    def use_refiner(self) -> bool:
        return self.current.use_refiner and self.has_refiner

    def enter(self, index: int, modules: Sequence[tuple[str, nn.Module]], scheme: Scheme) -> StageSpec:
        """Freeze and unfreeze ``(part, module)`` pairs for stage ``index`` and tell the scheme."""
        self.index = index
        stage = self.stages[index]
        for part, module in modules:
            for p in module.parameters():  # a scheme module of no stage part ("") always trains
                p.requires_grad_(part in stage.trainable or not part)
        scheme.enter_stage(self.frozen, self.use_refiner)
        return stage

    def set_modes(self, modules: Sequence[tuple[str, nn.Module]]) -> None:
        """Train mode for trained parts, eval mode for frozen ones (their BatchNorm statistics are kept)."""
        for part, module in modules:
            module.train(part not in self.frozen)
