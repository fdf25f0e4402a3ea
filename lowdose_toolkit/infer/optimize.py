"""An inference-only copy of a model: BatchNorm folded into the convolution before it, and a memory format.

Folding is exact up to float rounding (a BatchNorm in eval mode is an affine map per channel, which the
preceding convolution's weights and bias absorb) and removes one pass over every activation it touched.
Only ``Sequential`` runs of ``Conv3d``/``ConvTranspose3d`` followed by ``BatchNorm3d`` are folded, the
pattern of the built-in networks; anything else is left as it is.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

CONVS = (nn.Conv3d, nn.ConvTranspose3d)


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every ``conv -> BatchNorm3d`` pair inside ``Sequential`` containers of an eval-mode model in place.

    Returns the number of pairs folded.
    """
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode (BatchNorm running statistics)")
    folded = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if isinstance(conv, CONVS) and isinstance(bn, nn.BatchNorm3d) and bn.track_running_stats:
                seq[i] = fuse_conv_bn_eval(conv, bn, transpose=isinstance(conv, nn.ConvTranspose3d))
                seq[i + 1] = nn.Identity()
                folded += 1
    return folded


def for_inference(model: nn.Module, fold: bool = True, channels_last: bool = False) -> nn.Module:
    """An eval-mode copy of ``model`` with BatchNorm folded and, optionally, channels_last_3d weights."""
    out = copy.deepcopy(model).eval()
    if fold:
        fold_batchnorm(out)
    if channels_last:
        out = out.to(memory_format=torch.channels_last_3d)
    for p in out.parameters():
        p.requires_grad_(False)
    return out
