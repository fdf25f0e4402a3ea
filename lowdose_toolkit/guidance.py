"""What a guidance part hands a generator, and how the generator applies it.

Guidance is the path by which a dose head's prediction reaches the synthesis (see :mod:`lowdose_toolkit.parts`):
the head reads a feature (the input ``image`` or an encoder feature), the guidance part turns its logits
into a code (class probabilities; the true DRF when teacher forcing) and the code into a
:class:`Conditioning`, which a generator that declares ``film_channels`` applies in its decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Conditioning:
    """FiLM parameters for each modulation point of a generator, and an optional residual gate.

    Attributes:
        film: One ``(gamma, beta)`` pair per entry of the generator's ``film_channels``, each ``[B, C]``;
            a feature map ``h`` becomes ``h * (1 + gamma) + beta`` (so zeros are the identity).
        gate: ``[B]`` factor on a residual generator's correction (``y = x + gate * r``), or None (1).
        probs: ``[B, num_classes]`` the class code the conditioning was made from (for the record).
    """

    film: list[tuple[torch.Tensor, torch.Tensor]]
    gate: torch.Tensor | None = None
    probs: torch.Tensor | None = None

    def modulate(self, index: int, h: torch.Tensor) -> torch.Tensor:
        """Apply modulation point ``index`` to ``h`` ``[B, C, D, H, W]``."""
        gamma, beta = self.film[index]
        shape = (*gamma.shape, *([1] * (h.ndim - 2)))
        return h * (1 + gamma.view(shape).to(h.dtype)) + beta.view(shape).to(h.dtype)

    def apply_gate(self, residual: torch.Tensor) -> torch.Tensor:
        """``gate * residual`` per sample (the residual itself when there is no gate)."""
        if self.gate is None:
            return residual
        return residual * self.gate.view(-1, *([1] * (residual.ndim - 1))).to(residual.dtype)
