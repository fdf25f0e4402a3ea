"""3D PatchGAN discriminator (CG-3DSRGAN paper, Sec. II.C; pix2pix's ``NLayerDiscriminator`` in 3D).

"The discriminator has a similar structure to that of pix2pix while the 2D convolutional layer is
replaced by 3D operations", and it "receives paired images": the low-dose input and a real or
refined full-dose volume. Layers, as pix2pix (Isola et al. 2017) with ``kernel 4, padding 1``:

    Conv(s2) → LReLU(0.2) → [Conv(s2) → Norm → LReLU] × (n_layers-1) → Conv(s1) → Norm → LReLU → Conv(s1, →1)

Widths ``channels · min(2**i, 8)``. The output is one raw logit per patch: no sigmoid, because the
paper's adversarial loss is least squares (eq. 4, LSGAN). Conv biases follow pix2pix: none before
BatchNorm, present otherwise.

Minimum input size: each stride-2 conv maps ``n → floor(n/2)`` and each stride-1 conv
``n → n - 1``, so every spatial side must be at least ``3 · 2**n_layers`` (24 for the default
``n_layers=3``, 12 for ``n_layers=2``) to leave one output voxel. Smaller inputs raise a
``UserError`` saying so. The receptive field is 70 voxels for ``n_layers=3`` (34 for 2).
"""

from typing import Any, ClassVar, Literal

import torch
from torch import nn

from lowdose_toolkit import hookimpl
from lowdose_toolkit.errors import UserError
from lowdose_toolkit.hookspecs import Register


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels)  # pix2pix: affine=False, no running stats
    return nn.Identity()


class PatchGAN3D(nn.Module):
    """pix2pix's PatchGAN in 3D, conditional on the low-dose volume (paper Sec. II.C).

    Args:
        in_channels: Image channels (context argument, 1).
        channels: Width of the first layer (pix2pix's ``ndf``, 64).
        n_layers: Number of stride-2 convolutions (pix2pix's default 3: 70³ receptive field).
        norm: ``batch`` (pix2pix's default), ``instance`` or ``none``.
        conditional: Concatenate the condition (low-dose input) with the image on channels, as
            pix2pix's ``cat(real_A, fake_B)``; the first convolution then has ``2 · in_channels``
            inputs.

    Example:
        >>> d = PatchGAN3D(channels=8)
        >>> x = torch.rand(1, 1, 32, 32, 32)
        >>> d(x, condition=x).shape
        torch.Size([1, 1, 2, 2, 2])
    """

    #: Small arguments for conformance checks (lowdose_toolkit.testing).
    example_args: ClassVar[dict[str, Any]] = {"channels": 4, "n_layers": 1}

    def __init__(
        self,
        in_channels: int = 1,
        channels: int = 64,
        n_layers: int = 3,
        norm: Literal["batch", "instance", "none"] = "batch",
        conditional: bool = True,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise UserError(f"patchgan3d: n_layers={n_layers} must be at least 1 (pix2pix uses 3)")
        if channels < 1:
            raise UserError(f"patchgan3d: channels={channels} must be positive")
        if norm not in ("batch", "instance", "none"):
            raise UserError(f"patchgan3d: norm={norm!r} must be one of 'batch', 'instance', 'none'")
        self.in_channels = in_channels
        self.channels = channels
        self.n_layers = n_layers
        self.norm = norm
        self.conditional = conditional
        bias = norm != "batch"

        first_in = 2 * in_channels if conditional else in_channels
        layers: list[nn.Module] = [
            nn.Conv3d(first_in, channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv3d(channels * prev, channels * mult, 4, stride=2, padding=1, bias=bias),
                _norm(norm, channels * mult),
                nn.LeakyReLU(0.2),
            ]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [
            nn.Conv3d(channels * prev, channels * mult, 4, stride=1, padding=1, bias=bias),
            _norm(norm, channels * mult),
            nn.LeakyReLU(0.2),
            nn.Conv3d(channels * mult, 1, 4, stride=1, padding=1),
        ]
        self.model = nn.Sequential(*layers)

    @property
    def min_size(self) -> int:
        """Smallest spatial side that leaves at least one output voxel: ``3 · 2**n_layers``."""
        return 3 * 2**self.n_layers

    def forward(self, image: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """Score ``image`` (paired with ``condition`` when conditional) patch by patch.

        Args:
            image: Real or synthesised full-dose PET ``[B, in_channels, D, H, W]``.
            condition: The low-dose input of the same shape; required iff ``conditional``.

        Returns:
            Patch logits ``[B, 1, d, h, w]``.
        """
        if self.conditional:
            if condition is None:
                raise ValueError("PatchGAN3D(conditional=True) needs the low-dose condition: call d(image, condition)")
            if condition.shape != image.shape:
                raise ValueError(
                    f"PatchGAN3D: condition shape {tuple(condition.shape)} != image shape {tuple(image.shape)}"
                )
            x = torch.cat([condition, image], dim=1)  # pix2pix order: (real_A, B)
        else:
            if condition is not None:
                raise ValueError(
                    "PatchGAN3D(conditional=False) got a condition; call d(image) or set conditional: true"
                )
            x = image
        if x.ndim != 5 or x.shape[1] != self.model[0].in_channels:
            raise ValueError(f"PatchGAN3D expects image [B, {self.in_channels}, D, H, W], got {tuple(image.shape)}")
        spatial = tuple(x.shape[2:])
        if min(spatial) < self.min_size:
            fits = max(0, (min(spatial) // 3).bit_length() - 1)  # largest n_layers with 3·2**n <= side
            hint = f" or model.discriminator.n_layers={fits}" if fits >= 1 else ""
            raise UserError(
                f"patchgan3d: input of spatial size {spatial} is too small for n_layers={self.n_layers}; "
                f"every side must be >= {self.min_size}: use a larger data.patch_size{hint}"
            )
        return self.model(x)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, channels={self.channels}, n_layers={self.n_layers}, "
            f"norm={self.norm!r}, conditional={self.conditional}, min_size={self.min_size}"
        )


@hookimpl
def ldt_register_discriminators(register: Register) -> None:
    register("patchgan3d", PatchGAN3D)
