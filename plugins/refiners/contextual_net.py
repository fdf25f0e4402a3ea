"""Contextual-Net, the super-resolution refiner (CG-3DSRGAN paper, Sec. II.B).

The paper: "a convolutional layer (Conv) with a kernel size of 3×3×3 and stride 1 and residual
blocks (RB) in the form of Conv-RB-RB-Conv-Conv. The residual block is constructed by the
Conv-ReLU-Conv structure and the final output is incorporated with the input."

Read literally the first and the last two convolutions have no activation, and two convolutions
in a row without one collapse into a single linear map. We add two ReLUs and say so:

* after the first Conv (as SRResNet does after its first conv), so the residual blocks start from
  non-negative features;
* between the last two Convs, so the tail is a real two-layer mapping, not one linear filter.

"Incorporated with the input" is read as a global residual: ``refined = coarse + body(coarse)``,
so the refiner starts near the identity and learns the missing detail. No normalisation layers
(as EDSR: BatchNorm hurts super-resolution and breaks with batch 1).
"""

from typing import Any, ClassVar

import torch
from torch import nn

from lowdose_toolkit import hookimpl
from lowdose_toolkit.errors import UserError
from lowdose_toolkit.guidance import Conditioning
from lowdose_toolkit.hookspecs import Register


class ResidualBlock(nn.Module):
    """Conv 3³ → ReLU → Conv 3³, plus the block's input (paper Sec. II.B)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv3d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ContextualNet(nn.Module):
    """Contextual-Net: Conv → RB × ``num_blocks`` → Conv → Conv, plus a global residual (Sec. II.B).

    All convolutions are 3×3×3, stride 1, padding 1, so the output has the input's shape.

    Args:
        in_channels: Image channels (context argument, 1).
        channels: Width of the internal features.
        num_blocks: Number of residual blocks (the paper uses 2).
        identity_init: Zero the last convolution, so the refiner starts as the identity (a second
            training stage on a trained ML-Net then starts from ML-Net's output, not from it plus noise).

    Example:
        >>> net = ContextualNet(channels=4)
        >>> net(torch.rand(1, 1, 9, 10, 11)).shape
        torch.Size([1, 1, 9, 10, 11])
    """

    #: Small arguments for conformance checks (lowdose_toolkit.testing).
    example_args: ClassVar[dict[str, Any]] = {"channels": 4, "num_blocks": 1}

    def __init__(self, in_channels: int = 1, channels: int = 32, num_blocks: int = 2,
                 identity_init: bool = False) -> None:
        super().__init__()
        if channels < 1:
            raise UserError(f"contextual_net: channels={channels} must be positive")
        if num_blocks < 0:
            raise UserError(f"contextual_net: num_blocks={num_blocks} must be >= 0 (the paper uses 2)")
        self.in_channels = in_channels
        self.channels = channels
        self.num_blocks = num_blocks
        self.head = nn.Sequential(nn.Conv3d(in_channels, channels, 3, padding=1), nn.ReLU())
        self.blocks = nn.Sequential(*(ResidualBlock(channels) for _ in range(num_blocks)))
        self.tail = nn.Sequential(
            nn.Conv3d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv3d(channels, in_channels, 3, padding=1),
        )
        self.identity_init = identity_init
        #: Modulation points for a guidance part: the output of each residual block.
        self.film_channels: list[int] = [channels] * num_blocks
        if identity_init:
            nn.init.zeros_(self.last_conv.weight)
            nn.init.zeros_(self.last_conv.bias)

    @property
    def last_conv(self) -> nn.Conv3d:
        """The final convolution; zeroing it makes the refiner the identity."""
        return self.tail[-1]

    def forward(self, coarse: torch.Tensor, cond: Conditioning | None = None) -> torch.Tensor:
        """Refine ``coarse`` ``[B, in_channels, D, H, W]``; the result has the same shape.

        ``cond`` (from a guidance part) modulates the output of each residual block and gates the
        global residual.
        """
        if coarse.ndim != 5 or coarse.shape[1] != self.in_channels:
            raise ValueError(f"ContextualNet expects [B, {self.in_channels}, D, H, W], got shape {tuple(coarse.shape)}")
        h = self.head(coarse)
        for i, block in enumerate(self.blocks):
            h = block(h)
            if cond is not None:
                h = cond.modulate(i, h)
        residual = self.tail(h)
        return coarse + (cond.apply_gate(residual) if cond is not None else residual)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, channels={self.channels}, num_blocks={self.num_blocks}, "
                f"identity_init={self.identity_init}")


@hookimpl
def ldt_register_refiners(register: Register) -> None:
    register("contextual_net", ContextualNet)
