"""Least-squares adversarial loss (CG-3DSRGAN paper, Sec. II.C, eq. 4; Mao et al. 2017 LSGAN)."""

import torch
from torch import nn

from lowdose_toolkit import hookimpl
from lowdose_toolkit.hookspecs import Register


class LSGANLoss(nn.Module):
    """Least-squares GAN loss on raw patch logits, as pix2pix's ``GANLoss('lsgan')`` (paper eq. 4).

    ``forward(logits, real=True)`` is ``mean((D - 1)²)`` and ``forward(logits, real=False)`` is
    ``mean(D²)``. The discriminator step scores real pairs with ``real=True`` and synthesised pairs
    with ``real=False``; the generator step scores its synthesised pairs with ``real=True``.
    (pix2pix then halves the discriminator's sum of the two; that factor belongs to the scheme.)

    Example:
        >>> LSGANLoss()(torch.zeros(1, 1, 2, 2, 2), real=True)
        tensor(1.)
    """

    adversarial = True

    def forward(self, logits: torch.Tensor, real: bool) -> torch.Tensor:
        """Return the scalar least-squares loss of ``logits`` against the label 1 (real) or 0 (fake)."""
        if not isinstance(real, bool):
            raise TypeError(f"LSGANLoss: real must be a bool, got {type(real).__name__}")
        target = 1.0 if real else 0.0
        return (logits - target).pow(2).mean()


@hookimpl
def ldt_register_losses(register: Register) -> None:
    register("lsgan", LSGANLoss)
