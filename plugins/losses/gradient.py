"""Gradient-difference loss (Mathieu et al. 2016): L1 between the image gradients of a prediction and its target.

A voxel-wise loss lets a network blur: on the phantom, the activity a denoiser takes from a lesion or a thin
organ lands within 12 mm of it (docs/RESULTS.md, "Organs"). Comparing finite differences penalises flattened
edges directly, whatever the voxel errors.
"""

import torch
from torch import nn

from lowdose_toolkit import hookimpl
from lowdose_toolkit.hookspecs import Register


class GradientLoss(nn.Module):
    """``mean over the three spatial axes of mean(|Δ pred - Δ target|)``, Δ the forward difference along the axis.

    On ``[B, C, X, Y, Z]`` tensors; each axis needs at least two voxels. Like ``l1``, a mean (not a norm), so the
    weight does not depend on the patch size.

    Example:
        >>> ramp = torch.arange(4.0).view(1, 1, 4, 1, 1).expand(1, 1, 4, 2, 2)
        >>> GradientLoss()(torch.zeros(1, 1, 4, 2, 2), ramp)  # the ramp's steps of 1 along one axis of three
        tensor(0.3333)
    """

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the scalar mean absolute difference of the two images' finite differences."""
        if pred.shape != target.shape:
            raise ValueError(f"GradientLoss: pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        if pred.dim() != 5 or min(pred.shape[2:]) < 2:
            raise ValueError(f"GradientLoss: expected [B, C, X, Y, Z] with 2+ voxels per axis, got {tuple(pred.shape)}")
        error = pred - target
        return sum(error.diff(dim=axis).abs().mean() for axis in (2, 3, 4)) / 3


@hookimpl
def ldt_register_losses(register: Register) -> None:
    register("gradient", GradientLoss)
