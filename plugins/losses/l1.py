"""Voxel-wise L1 reconstruction loss (CG-3DSRGAN paper, Sec. II.A, eq. 1), optionally balanced over DRFs."""

from typing import Literal

import torch
from torch import nn

from lowdose_toolkit import hookimpl
from lowdose_toolkit.errors import UserError
from lowdose_toolkit.hookspecs import Register

EPS = 1e-8


class L1Loss(nn.Module):
    """Mean absolute error ``mean(|pred - target|)`` (paper eq. 1, ``L_re``).

    The paper writes a norm; we average over voxels (and batch) so the weight λ₁ does not depend on
    the patch size, as pix2pix's ``nn.L1Loss()`` does.

    Args:
        balance: ``none`` (the paper) or ``input``: each sample's error is weighted by the inverse of
            its low-dose input's own error ``mean|low - target|`` (weights normalised to mean 1 over the
            batch, so λ keeps its scale). A batch mixing DRF 4 and DRF 100 patches is otherwise
            dominated by the DRF 100 ones, whose errors are ~5x larger: the network then learns one
            strong smoothing that makes DRF 4 worse. Balanced, every sample counts by how much it
            improves on its own input.
        emphasis: ``γ >= 0``; each voxel's error is weighted by ``(target / mean target)^γ`` (per sample,
            the weights' mean over the patch 1): 0 is the paper's plain mean; at 1 a voxel counts by its
            full-dose activity, so the few voxels of small hot lesions, which the plain mean lets a network
            flatten towards their background (docs/RESULTS.md, "Lesions"), count as much as their uptake.

    Example:
        >>> L1Loss()(torch.zeros(1, 1, 2, 2, 2), torch.ones(1, 1, 2, 2, 2))
        tensor(1.)
    """

    def __init__(self, balance: Literal["none", "input"] = "none", emphasis: float = 0.0) -> None:
        super().__init__()
        if balance not in ("none", "input"):
            raise UserError(f"l1: balance={balance!r} must be 'none' or 'input'")
        if not 0 <= emphasis <= 4:
            raise UserError(f"l1: emphasis={emphasis} must be in [0, 4] (0: the paper's plain mean; 1: by activity)")
        self.balance = balance
        self.emphasis = float(emphasis)
        #: The scheme passes the low-dose input (``low=``) to losses that say they use it.
        self.uses_input = balance == "input"

    def forward(self, pred: torch.Tensor, target: torch.Tensor, low: torch.Tensor | None = None) -> torch.Tensor:
        """Return the scalar (weighted) mean absolute error between same-shaped ``pred`` and ``target``."""
        if pred.shape != target.shape:
            raise ValueError(f"L1Loss: pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        voxels = (pred - target).abs()
        if self.emphasis:
            weight = target.detach().float().clamp(min=0).flatten(1).pow(self.emphasis)
            weight = weight / (weight.mean(dim=1, keepdim=True) + EPS)
            voxels = voxels.flatten(1) * weight.to(voxels.dtype)
        if self.balance == "none":
            return voxels.mean()
        if low is None or low.shape != target.shape:
            raise ValueError("L1Loss(balance='input') needs the low-dose input of the target's shape (low=...)")
        error = voxels.flatten(1).mean(dim=1)
        inverse = 1.0 / ((low.float() - target).abs().flatten(1).mean(dim=1) + EPS)
        weights = (inverse / inverse.mean()).detach()
        return (weights * error).mean()

    def extra_repr(self) -> str:
        return f"balance={self.balance!r}, emphasis={self.emphasis}"


@hookimpl
def ldt_register_losses(register: Register) -> None:
    register("l1", L1Loss)
