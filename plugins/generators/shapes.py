"""Shape helpers shared by the encoder-decoder generators (ML-Net, 3D U-Net)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def level_widths(channels: int, depth: int, max_channels: int) -> list[int]:
    """Channels of encoder level 1..depth: ``channels`` doubling per level, capped at ``max_channels``."""
    return [min(channels * 2**i, max_channels) for i in range(depth)]


def pad_to_multiple(
    x: torch.Tensor, multiple: int, mode: str = "replicate", minimum: int = 0
) -> tuple[torch.Tensor, tuple]:
    """Pad the three spatial dims of ``x`` ([B, C, D, H, W]) up to a multiple of ``multiple``.

    Padding is split as evenly as possible between both sides of each axis; every padded side is at
    least ``minimum``.

    Returns:
        The padded tensor and the slices that crop the result back to the input's size.
    """
    pads: list[int] = []  # F.pad order: last dim first, (before, after) per dim
    crop: list[slice] = []
    for size in reversed(x.shape[2:]):
        total = max(size + -size % multiple, minimum) - size
        before = total // 2
        pads += [before, total - before]
    for size, before in zip(x.shape[2:], reversed(pads[0::2]), strict=True):
        crop.append(slice(before, before + size))
    if any(pads):
        x = F.pad(x, pads, mode=mode)
    return x, (slice(None), slice(None), *crop)
