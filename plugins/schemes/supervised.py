"""The ``supervised`` scheme: generator (± heads ± refiner) trained on its losses, no discriminator.

This is Table II's "Baseline" (L1 only) and "Baseline+CG" (L1 + cross-entropy on the dose head),
and the 3D-UNet baseline.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lowdose_toolkit import hookimpl
from lowdose_toolkit.errors import RecipeError
from lowdose_toolkit.schemes import Scheme


class Supervised(Scheme):
    """Supervised training of the synthesis model on its weighted losses (no adversary)."""

    phases = ("generator",)

    def __init__(self, **context: object) -> None:
        super().__init__(**context)  # type: ignore[arg-type]
        if any(term.adversarial for term in self.losses):
            raise RecipeError("train.scheme: 'supervised' has no discriminator step; use 'paired_gan' for lsgan")
        self.add_optimizer("generator", self.model.parameters())

    def train_step(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        with self.autocast():
            out = self.net(batch["low"], use_refiner=self.use_refiner, drf_class=batch.get("drf_class"))
            total, values = self.synthesis_losses(out, batch)
        self.backward_step("generator", total)
        values["total"] = float(total.detach())
        return values


@hookimpl
def ldt_register_schemes(register) -> None:  # noqa: ANN001 - pluggy passes the callback
    register("supervised", Supervised)
