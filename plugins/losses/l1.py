"""Voxel-wise L1 reconstruction loss (CG-3DSRGAN paper, Sec. II.A, eq. 1)."""

import torch
from torch import nn

from lowdose_toolkit import hookimpl
from lowdose_toolkit.hookspecs import Register


class L1Loss(nn.Module):
    """Mean absolute error ``mean(|pred - target|)`` (paper eq. 1, ``L_re``).

    The paper writes a norm; we average over voxels (and batch) so the weight λ₁ does not depend on
    the patch size, as pix2pix's ``nn.L1Loss()`` does.

    Example:
        >>> L1Loss()(torch.zeros(1, 1, 2, 2, 2), torch.ones(1, 1, 2, 2, 2))
        tensor(1.)
    """

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the scalar mean absolute error between same-shaped ``pred`` and ``target``."""
        if pred.shape != target.shape:
            raise ValueError(f"L1Loss: pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        return (pred - target).abs().mean()


@hookimpl
def ldt_register_losses(register: Register) -> None:
    register("l1", L1Loss)
