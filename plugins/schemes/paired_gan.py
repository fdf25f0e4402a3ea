"""The ``paired_gan`` scheme: pix2pix-style alternating discriminator and generator steps.

Used by CG-3DGAN and CG-3DSRGAN (paper II.C, eq. 4-5) and the 3D-cGAN baseline. The discriminator
is conditional when it says so (``discriminator.conditional``): it sees the low-dose input
concatenated with a real full-dose or a synthesised image.

Order per batch, as pix2pix (``pix2pix_model.optimize_parameters``):
1. the generator synthesises ``pred`` (refined image when there is a refiner);
2. discriminator step on ``(low, full)`` labelled real and ``(low, pred.detach())`` labelled fake,
   the two halves averaged (pix2pix's 0.5 factor, which slows D relative to G);
3. generator step on its weighted losses plus the adversarial term with ``pred`` labelled real,
   the discriminator's parameters frozen meanwhile.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lowdose_toolkit import hookimpl
from lowdose_toolkit.errors import RecipeError
from lowdose_toolkit.schemes import Scheme


class PairedGAN(Scheme):
    """Alternating discriminator / generator steps with separate optimizers (pix2pix in 3D).

    Args:
        d_steps: Discriminator steps per generator step.
        d_loss_scale: Factor on the discriminator's loss (pix2pix: 0.5).
    """

    phases = ("generator", "discriminator")

    def __init__(self, d_steps: int = 1, d_loss_scale: float = 0.5, **context: object) -> None:
        super().__init__(**context)  # type: ignore[arg-type]
        if self.discriminator is None:
            raise RecipeError("train.scheme: 'paired_gan' needs model.discriminator (e.g. {name: patchgan3d})")
        adversarial = [t for t in self.losses if t.adversarial]
        if len(adversarial) != 1:
            raise RecipeError(
                f"losses: 'paired_gan' needs exactly one adversarial loss (e.g. lsgan), found {len(adversarial)}"
            )
        if d_steps < 1:
            raise RecipeError(f"train.scheme.d_steps: must be >= 1, got {d_steps}")
        self.adversarial = adversarial[0]
        self.d_steps = d_steps
        self.d_loss_scale = d_loss_scale
        self.d_net = self.wrap(self.discriminator)
        self.add_optimizer("generator", self.model.parameters())
        self.add_optimizer("discriminator", self.discriminator.parameters())

    def _condition(self, low: torch.Tensor) -> torch.Tensor | None:
        return low if getattr(self.discriminator, "conditional", False) else None

    def train_step(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        low, full = batch["low"], batch["full"]
        cond = self._condition(low)
        adv = self.adversarial.loss
        with self.autocast():
            out = self.net(low, use_refiner=self.use_refiner, drf_class=batch.get("drf_class"))
        fake = out["pred"]

        # Discriminator step(s); a stage that freezes the discriminator only scores (for the log).
        train_d = self.trains("discriminator")
        for _ in range(self.d_steps if train_d else 1):
            with self.autocast(), torch.set_grad_enabled(train_d):
                d_real = adv(self.d_net(full, cond).float(), True)
                d_fake = adv(self.d_net(fake.detach(), cond).float(), False)
                d_loss = self.d_loss_scale * (d_real + d_fake)
            self.backward_step("discriminator", d_loss)

        # Generator step: the discriminator is frozen and called unwrapped (no DDP gradient sync for it).
        with self.frozen(self.discriminator), self.autocast():
            g_adv = adv(self.discriminator(fake, cond).float(), True)
            total, values = self.synthesis_losses(out, batch)
            total = total + self.adversarial.weight * g_adv
        self.backward_step("generator", total)

        values[f"{self.adversarial.name}_g"] = float(g_adv.detach())
        values[f"{self.adversarial.name}_d"] = float(d_loss.detach())
        values["d_real"] = float(d_real.detach())
        values["d_fake"] = float(d_fake.detach())
        values["total"] = float(total.detach())
        return values


@hookimpl
def ldt_register_schemes(register) -> None:  # noqa: ANN001 - pluggy passes the callback
    register("paired_gan", PairedGAN)
