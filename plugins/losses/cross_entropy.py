"""Cross-entropy loss of the dose-level classification head (CG-3DSRGAN paper, Sec. II.A, eq. 2)."""

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lowdose_toolkit import hookimpl
from lowdose_toolkit.errors import UserError
from lowdose_toolkit.hookspecs import Register


class CrossEntropyLoss(nn.Module):
    """Cross-entropy ``-y_c · log softmax(logits)`` averaged over the batch (paper eq. 2, ``L_class``).

    Args:
        label_smoothing: Mass spread uniformly over the classes (0 = the paper's plain cross-entropy).

    Example:
        >>> CrossEntropyLoss()(torch.tensor([[0.0, 0.0]]), torch.tensor([1]))
        tensor(0.6931)
    """

    #: Compares class logits ``[B, C]`` with class indices (for lowdose_toolkit.testing).
    classifies: ClassVar[bool] = True

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise UserError(f"cross_entropy: label_smoothing={label_smoothing} must be in [0, 1)")
        self.label_smoothing = label_smoothing

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the scalar loss of logits ``pred`` ``[B, K]`` against class indices ``target`` ``[B]``."""
        if pred.ndim != 2 or target.shape != pred.shape[:1]:
            raise ValueError(
                f"CrossEntropyLoss expects logits [B, K] and class indices [B], got {tuple(pred.shape)} "
                f"and {tuple(target.shape)}"
            )
        if target.is_floating_point():
            raise ValueError(f"CrossEntropyLoss expects integer class indices, got dtype {target.dtype}")
        return F.cross_entropy(pred, target.long(), label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}"


@hookimpl
def ldt_register_losses(register: Register) -> None:
    register("cross_entropy", CrossEntropyLoss)
