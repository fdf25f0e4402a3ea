"""Classic 3D U-Net (Çiçek et al. 2016), the "3D-UNet" baseline of the CG-3DSRGAN paper (Sec. III.C).

Per resolution level two 3×3×3 convolutions, each followed by a norm and ReLU; 2×2×2 max-pooling
(stride 2) between levels of the analysis path; 2×2×2 transposed convolutions (stride 2) up the
synthesis path, whose output is concatenated with the skip connection of the same level, then the
same two convolutions; a final 1×1×1 convolution.

Differences from the paper, as most PyTorch ports (e.g. pytorch-3dunet) make them:

* "same" padding (the paper used unpadded convolutions and an output smaller than the input);
* both convolutions of a level have the level's width (the paper's first convolution has half of
  it in the analysis path);
* the transposed convolution halves the channels (the paper keeps them), which saves parameters;
* linear output (PET is non-negative and unbounded), optionally residual (``x + ...``).

``norm`` defaults to the paper's BatchNorm. Every path to the output is then normalised, so in
training mode the absolute intensity level of PET must be relearnt through biases and affine
norm parameters: on a tiny CPU run (lr 1e-3, 48 steps) the L1 loss fell by ~20% with ``batch``
or ``instance`` and ~4× with ``norm: none``; BatchNorm catches up with longer training. ML-Net
avoids this by keeping its outermost blocks un-normalised, as pix2pix does.

Any input size works: it is padded by replicating border voxels to a multiple of
``2**(num_levels-1)`` and to at least twice that, so the coarsest level is at least 2×2×2 and its
norm never sees a single value per channel (batch 1 trains), and the output is cropped back.
"""

from typing import Any, ClassVar, Literal

import torch
from torch import nn

from lowdose_toolkit import hookimpl
from lowdose_toolkit.errors import UserError
from lowdose_toolkit.hookspecs import Register

from .shapes import level_widths, pad_to_multiple


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    return nn.Identity()


class DoubleConv(nn.Sequential):
    """(Conv 3³ → Norm → ReLU) × 2 (Çiçek et al. 2016, Fig. 1)."""

    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        bias = norm == "none"
        super().__init__(
            nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=bias),
            _norm(norm, out_channels),
            nn.ReLU(),
            nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=bias),
            _norm(norm, out_channels),
            nn.ReLU(),
        )


class UNet3D(nn.Module):
    """3D U-Net of Çiçek et al. (2016): double convs, max-pool down, transposed conv up, skips.

    Args:
        in_channels: Input channels (context argument, 1).
        out_channels: Output channels (context argument, 1).
        channels: Width of the finest level; doubles per level (the paper: 64 at the finest level).
        num_levels: Resolution levels, including the coarsest (the paper: 4, i.e. three poolings).
        max_channels: Cap on the width of any level.
        norm: ``batch`` (the paper), ``instance`` or ``none``.
        residual: Add the input to the output; needs ``in_channels == out_channels``.

    ``forward_features`` returns ``enc1``..``enc{num_levels}`` (outputs of each analysis level,
    on the padded input) and ``bottleneck`` (= the coarsest level).

    Example:
        >>> net = UNet3D(channels=4, num_levels=3)
        >>> net(torch.rand(1, 1, 17, 23, 30)).shape
        torch.Size([1, 1, 17, 23, 30])
    """

    #: Small arguments for conformance checks (lowdose_toolkit.testing).
    example_args: ClassVar[dict[str, Any]] = {"channels": 4, "num_levels": 2, "max_channels": 16}

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: int = 32,
        num_levels: int = 4,
        max_channels: int = 512,
        norm: Literal["batch", "instance", "none"] = "batch",
        residual: bool = False,
    ) -> None:
        super().__init__()
        if num_levels < 1:
            raise UserError(f"unet3d: num_levels={num_levels} must be at least 1 (Çiçek et al. use 4)")
        if channels < 1 or max_channels < channels:
            raise UserError(
                f"unet3d: need 1 <= channels <= max_channels, got channels={channels}, max_channels={max_channels}"
            )
        if norm not in ("batch", "instance", "none"):
            raise UserError(f"unet3d: norm={norm!r} must be one of 'batch', 'instance', 'none'")
        if residual and in_channels != out_channels:
            raise UserError(
                f"unet3d: residual=true needs in_channels == out_channels, got {in_channels} and "
                f"{out_channels}; set residual: false"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.channels = channels
        self.num_levels = num_levels
        self.max_channels = max_channels
        self.norm = norm
        self.residual = residual

        widths = level_widths(channels, num_levels, max_channels)
        self.encoder = nn.ModuleList(
            DoubleConv(in_channels if i == 0 else widths[i - 1], w, norm) for i, w in enumerate(widths)
        )
        self.pool = nn.MaxPool3d(kernel_size=2, stride=2)
        # up[i] / decoder[i] bring level i+1 back to level i.
        self.up = nn.ModuleList(
            nn.ConvTranspose3d(widths[i + 1], widths[i], kernel_size=2, stride=2) for i in range(num_levels - 1)
        )
        self.decoder = nn.ModuleList(DoubleConv(2 * widths[i], widths[i], norm) for i in range(num_levels - 1))
        self.project = nn.Conv3d(widths[0], out_channels, kernel_size=1)
        if residual:  # start as the identity, as ML-Net does with residual=true
            nn.init.zeros_(self.project.weight)
            nn.init.zeros_(self.project.bias)

        self.feature_channels: dict[str, int] = {f"enc{i + 1}": w for i, w in enumerate(widths)}
        self.feature_channels["bottleneck"] = widths[-1]

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Synthesise full-dose PET and return the analysis-path features.

        Args:
            x: Low-dose PET ``[B, in_channels, D, H, W]``, any spatial size.

        Returns:
            ``(y, features)`` with ``y`` of ``x``'s spatial size and ``features`` as
            :attr:`feature_channels` names them.
        """
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet3D expects [B, {self.in_channels}, D, H, W], got shape {tuple(x.shape)}")
        m = 2 ** (self.num_levels - 1)  # replicate-pad to a multiple of m, at least 2m per side
        h, crop = pad_to_multiple(x, m, minimum=2 * m)
        skips: list[torch.Tensor] = []
        for i, block in enumerate(self.encoder):
            h = block(h if i == 0 else self.pool(h))
            skips.append(h)
        features = {f"enc{i + 1}": s for i, s in enumerate(skips)}
        features["bottleneck"] = skips[-1]
        for i in reversed(range(self.num_levels - 1)):
            h = self.decoder[i](torch.cat([skips[i], self.up[i](h)], dim=1))
        y = self.project(h)[crop]
        if self.residual:
            y = y + x
        return y, features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Synthesise full-dose PET ``[B, out_channels, D, H, W]`` from low-dose ``x``."""
        return self.forward_features(x)[0]

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, channels={self.channels}, "
            f"num_levels={self.num_levels}, max_channels={self.max_channels}, norm={self.norm!r}, "
            f"residual={self.residual}"
        )


@hookimpl
def ldt_register_generators(register: Register) -> None:
    register("unet3d", UNet3D)
