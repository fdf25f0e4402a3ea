"""ML-Net's reconstruction network R (CG-3DSRGAN paper, Sec. II.A): a pix2pix-style 3D U-Net.

The paper gives the block order (encoder LeakyReLU → Conv 3³ stride 2 → BN; decoder ReLU →
ConvTranspose 3³ stride 2 → BN; five of each) and leaves the rest to the pix2pix generator it
builds on. Where it is silent we follow pix2pix's ``UnetSkipConnectionBlock`` (Isola et al. 2017):

* the outermost encoder block has neither activation nor norm (its input is the image);
* the innermost encoder block (the bottleneck) has no norm. This also makes training with batch 1
  work: the bottleneck is 1×1×1 for inputs of side ≤ 2**depth, and BatchNorm in train mode needs
  more than one value per channel. Every normalised tensor is at least 2×2×2 because inputs are
  padded to a multiple of 2**depth;
* the outermost decoder block has no norm: ReLU → ConvTranspose3d straight to ``out_channels``
  (with bias) is the output layer. This matters for PET, whose intensities are quantitative: a
  BatchNorm there would remove each batch's intensity level from the output, which then has to be
  relearnt from a bias. (We measured it: with a BN + 1×1×1 projection at the end, a tiny ML-Net
  barely lowered its L1 loss in 48 steps; without, the loss fell about three-fold.)
* dropout (pix2pix uses 0.5, here ``dropout``, default 0) follows the norm of the inner decoder blocks.

Departures from pix2pix, chosen for PET:

* no final Tanh: activity is non-negative and unbounded, so the output is linear.
  ``residual=True`` adds the input to it (the network then predicts full-dose minus low-dose).
* any input size: the input is padded to a multiple of 2**depth by *replicating* border voxels
  (zero padding would put an artificial edge next to hot tissue at patch borders) and the output
  is cropped back.
"""

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from lowdose_toolkit import hookimpl
from lowdose_toolkit.errors import UserError
from lowdose_toolkit.guidance import Conditioning
from lowdose_toolkit.hookspecs import Register

from .shapes import level_widths, pad_to_multiple


class MLNet(nn.Module):
    """ML-Net's reconstruction network R: a 3D U-Net with stride-2 3³ convolutions (paper Sec. II.A).

    Args:
        in_channels: Input channels (context argument, low-dose PET: 1).
        out_channels: Output channels (context argument, full-dose PET: 1).
        channels: Width of the first level; doubles per level (paper-like default 32).
        depth: Number of down-sampling (and up-sampling) blocks; the paper uses 5.
        max_channels: Cap on the width of any level.
        dropout: Dropout probability after the norm of the inner decoder blocks (pix2pix uses 0.5).
        residual: Add the input to the output (predict the residual); needs
            ``in_channels == out_channels``.

    Inputs of any spatial size work (padded to a multiple of ``2**depth``, cropped back).
    ``forward_features`` also returns the encoder outputs ``enc1``..``enc{depth}`` and
    ``bottleneck`` (= ``enc{depth}``), computed on the padded input, for auxiliary heads.

    Example:
        >>> net = MLNet(channels=4, depth=3)
        >>> net(torch.rand(1, 1, 17, 23, 30)).shape
        torch.Size([1, 1, 17, 23, 30])
    """

    #: Small arguments for conformance checks (lowdose_toolkit.testing).
    example_args: ClassVar[dict[str, Any]] = {"channels": 4, "depth": 2, "max_channels": 16}

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: int = 32,
        depth: int = 5,
        max_channels: int = 256,
        dropout: float = 0.0,
        residual: bool = False,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise UserError(f"mlnet: depth={depth} must be at least 1 (the paper uses 5)")
        if channels < 1 or max_channels < channels:
            raise UserError(
                f"mlnet: need 1 <= channels <= max_channels, got channels={channels}, max_channels={max_channels}"
            )
        if not 0.0 <= dropout < 1.0:
            raise UserError(f"mlnet: dropout={dropout} must be in [0, 1)")
        if residual and in_channels != out_channels:
            raise UserError(
                f"mlnet: residual=true needs in_channels == out_channels, got {in_channels} and "
                f"{out_channels}; set residual: false"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.channels = channels
        self.depth = depth
        self.max_channels = max_channels
        self.dropout = dropout
        self.residual = residual

        widths = level_widths(channels, depth, max_channels)
        self.encoder = nn.ModuleList()
        for i in range(depth):
            outermost, innermost = i == 0, i == depth - 1
            layers: list[nn.Module] = []
            if not outermost:
                layers.append(nn.LeakyReLU(0.2))
            # pix2pix: conv bias only where no norm follows.
            has_norm = not (outermost or innermost)
            layers.append(
                nn.Conv3d(
                    in_channels if outermost else widths[i - 1],
                    widths[i],
                    kernel_size=3,
                    stride=2,
                    padding=1,
                    bias=not has_norm,
                )
            )
            if has_norm:
                layers.append(nn.BatchNorm3d(widths[i]))
            self.encoder.append(nn.Sequential(*layers))

        # decoder[i] brings level i+1 back to level i's resolution; decoder[0] is the output layer.
        self.decoder = nn.ModuleList()
        for i in range(depth):
            outermost, innermost = i == 0, i == depth - 1
            in_ch = widths[i] if innermost else 2 * widths[i]  # skip concatenation except at the bottleneck
            out_ch = out_channels if outermost else widths[i - 1]
            layers = [
                nn.ReLU(),
                nn.ConvTranspose3d(in_ch, out_ch, 3, stride=2, padding=1, output_padding=1, bias=outermost),
            ]
            if not outermost:
                layers.append(nn.BatchNorm3d(out_ch))
                if dropout > 0:
                    layers.append(nn.Dropout(dropout))
            self.decoder.append(nn.Sequential(*layers))

        #: Widths of the modulation points a guidance part conditions: the normalised output of each inner
        #: decoder block, innermost first (the order forward_features applies them in).
        self.film_channels: list[int] = [widths[i - 1] for i in reversed(range(1, depth))]
        self.feature_channels: dict[str, int] = {f"enc{i + 1}": w for i, w in enumerate(widths)}
        self.feature_channels["bottleneck"] = widths[-1]
        if residual:  # start as the identity: the network first reproduces its input, then learns the residual
            nn.init.zeros_(self.output_layer.weight)
            if self.output_layer.bias is not None:
                nn.init.zeros_(self.output_layer.bias)

    @property
    def output_layer(self) -> nn.ConvTranspose3d:
        """The last layer (outermost transposed convolution); zeroing it makes ``residual`` the identity."""
        return self.decoder[0][-1]

    def forward_features(
        self, x: torch.Tensor, guide: Callable[[dict[str, torch.Tensor]], Conditioning] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Synthesise full-dose PET and return the encoder features.

        Args:
            x: Low-dose PET ``[B, in_channels, D, H, W]``, any spatial size.
            guide: Called with the encoder features once they exist; its :class:`Conditioning`
                modulates the inner decoder blocks (after their norm) and gates the residual.

        Returns:
            ``(y, features)``: ``y`` has ``x``'s spatial size; ``features`` maps ``enc1``..``encN`` and
            ``bottleneck`` to the encoder outputs (of the padded input).
        """
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"MLNet expects [B, {self.in_channels}, D, H, W], got shape {tuple(x.shape)}")
        h, crop = pad_to_multiple(x, 2**self.depth)
        skips: list[torch.Tensor] = []
        for block in self.encoder:
            h = block(h)
            skips.append(h)
        features = {f"enc{i + 1}": s for i, s in enumerate(skips)}
        features["bottleneck"] = skips[-1]
        cond = guide(features) if guide is not None else None
        point = 0
        for i in reversed(range(self.depth)):
            if i < self.depth - 1:
                h = torch.cat([h, skips[i]], dim=1)
            h = self.decoder[i](h)
            if cond is not None and i > 0:
                h = cond.modulate(point, h)
                point += 1
        y = h[crop]
        if self.residual:
            y = x + (cond.apply_gate(y) if cond is not None else y)
        return y, features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Synthesise full-dose PET ``[B, out_channels, D, H, W]`` from low-dose ``x``."""
        return self.forward_features(x)[0]

    def extra_repr(self) -> str:
        items: dict[str, Any] = {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "channels": self.channels,
            "depth": self.depth,
            "max_channels": self.max_channels,
            "dropout": self.dropout,
            "residual": self.residual,
        }
        return ", ".join(f"{k}={v}" for k, v in items.items())


@hookimpl
def ldt_register_generators(register: Register) -> None:
    register("mlnet", MLNet)
