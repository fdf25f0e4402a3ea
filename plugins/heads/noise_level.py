"""A dose-level head that estimates the noise level of the low-dose image itself.

The paper's head (:mod:`.dose_classifier`) reads ML-Net's pooled bottleneck, which at CPU patch sizes is
a single voxel of features trained for synthesis; on the phantom it stays at chance. Every
Ultra-Low-Dose PET challenge entry that handled unknown doses with one network estimated the noise
level explicitly instead (SJTU's NLE-Net, the 2023 winner; KU Leuven's DRF predictor, a classifier on
a noise statistic of the whole scan). This head does both:

* statistics: a fixed bank of zero-sum filters (the 3D Laplacian at full and half resolution, and the
  first differences along each axis), each blind to the activity level. Per filter and body voxel,
  the log of the squared response over the 5³ local mean activity: for Poisson-like PET noise the
  variance grows with activity × DRF, so this is ``log(DRF) + const`` wherever the voxel lies. Its
  median over the body voxels of the window ignores the (sparse) organ edges. The body fraction and
  the log mean activity of the window are two further statistics;
* in training (patches), an MLP from the standardised statistics to DRF class logits, trained by the
  recipe's cross-entropy like any head;
* for whole volumes (eval mode, once calibrated), a multinomial logistic regression on the same
  statistics of whole *training* volumes, fitted by :meth:`calibrate` (the engine calls it before each
  validation). Patch statistics are noisier and biased by what a patch holds, so a classifier trained
  on them alone is soft on whole volumes (measured: top probability about 0.6 on the phantom).

On the phantom the full-resolution Laplacian's statistic alone orders every whole volume by DRF
without overlap between subjects (docs/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from lowdose_toolkit import hookimpl
from lowdose_toolkit.errors import UserError
from lowdose_toolkit.hookspecs import Register
from lowdose_toolkit.schemes import set_lr_scale

EPS = 1e-6
FILTERS = ("laplacian", "laplacian_half", "diff_x", "diff_y", "diff_z")


def filter_bank() -> torch.Tensor:
    """``[4, 1, 3, 3, 3]``: the 7-point Laplacian and the first differences along each axis (all zero-sum)."""
    bank = torch.zeros(4, 1, 3, 3, 3)
    bank[0, 0, 1, 1, 1] = -6.0
    for axis in range(3):
        for offset in (0, 2):
            index = [1, 1, 1]
            index[axis] = offset
            bank[0, 0, index[0], index[1], index[2]] = 1.0
        index = [1, 1, 1]
        bank[1 + axis, 0, 1, 1, 1] = -1.0
        index[axis] = 2
        bank[1 + axis, 0, index[0], index[1], index[2]] = 1.0
    return bank


def masked_median(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[..., N] -> [...]``: the lower median of ``values`` where ``mask`` (NaNs left out), 0 where none.

    The value ``values.masked_fill(~mask, nan).nanmedian(-1).values.nan_to_num(0)`` gives, with the sort
    and gather every exporter knows (ONNX TopK, GatherElements); traced graphs use it.
    """
    valid = mask & ~values.isnan()
    count = valid.long().sum(dim=-1, keepdim=True)
    ordered = values.masked_fill(~valid, float("inf")).sort(dim=-1).values
    median = ordered.gather(-1, torch.div(count - 1, 2, rounding_mode="floor").clamp(min=0)).squeeze(-1)
    return torch.where(count.squeeze(-1) > 0, median, torch.zeros_like(median))


class NoiseLevelHead(nn.Module):
    """Noise-energy statistics of fixed zero-sum filters → DRF class logits (see the module docstring).

    Args:
        in_channels: Channels of the feature it reads (context argument; the image: 1).
        num_classes: Number of DRF classes (context argument).
        hidden: Width of the patch MLP's hidden layer.
        body_threshold: Voxels whose 5³ local mean exceeds this (normalised units, where the body's mean
            activity is about 1) are the body; the noise statistics are medians over them.
        lr_scale: Factor on the learning rate of this head's parameters (a few hundred parameters beside
            a generator of millions; at the generator's rate it needs thousands of steps to leave chance).
        calibration_l2: L2 penalty of the whole-volume logistic regression (on standardised statistics).

    Example:
        >>> head = NoiseLevelHead(in_channels=1, num_classes=5)
        >>> head(torch.rand(2, 1, 16, 16, 16)).shape
        torch.Size([2, 5])
    """

    #: Small arguments for conformance checks (lowdose_toolkit.testing).
    example_args: ClassVar[dict[str, Any]] = {"hidden": 8}
    #: Reads the low-dose image (``input: image``), not a generator feature.
    reads_image: ClassVar[bool] = True

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 32, body_threshold: float = 0.3,
                 lr_scale: float = 10.0, calibration_l2: float = 1e-4) -> None:
        super().__init__()
        if in_channels != 1:
            raise UserError(f"noise_level: reads the image (input: image, 1 channel), got a feature of {in_channels}")
        if num_classes < 2:
            raise UserError(f"noise_level: num_classes={num_classes}; list at least two DRFs in data.drfs")
        if hidden < 1:
            raise UserError(f"noise_level: hidden={hidden} must be positive")
        if not lr_scale > 0:
            raise UserError(f"noise_level: lr_scale={lr_scale} must be positive")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.hidden = hidden
        self.body_threshold = body_threshold
        self.lr_scale = lr_scale
        self.calibration_l2 = calibration_l2
        features = len(FILTERS) + 2
        self.register_buffer("bank", filter_bank(), persistent=False)
        self.norm = nn.BatchNorm1d(features, affine=False)  # standardises the statistics of patches
        self.mlp = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
        set_lr_scale(self, lr_scale)
        # The whole-volume classifier (fitted by calibrate; saved with the model).
        self.register_buffer("volume_mean", torch.zeros(features))
        self.register_buffer("volume_std", torch.ones(features))
        self.register_buffer("volume_weight", torch.zeros(num_classes, features))
        self.register_buffer("volume_bias", torch.zeros(num_classes))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))

    def _noise_medians(self, x: torch.Tensor, bank: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """``[B, filters]`` medians over body voxels of log(response² / local mean) for the filters ``bank``."""
        response = F.conv3d(x, bank.to(x.dtype))  # valid: [B, filters, D-2, H-2, W-2]
        local = local[:, :, 1:-1, 1:-1, 1:-1]
        body = local > self.body_threshold
        ratio = torch.log(response.square() + EPS) - torch.log(local + EPS)
        exporting = getattr(torch.compiler, "is_exporting", lambda: False)()  # not in every torch >= 2.6
        if torch.jit.is_tracing() or exporting:  # ldt export: no exporter knows nanmedian
            return masked_median(ratio.flatten(2), body.flatten(2))
        ratio = ratio.masked_fill(~body, float("nan")).flatten(2)
        return ratio.nanmedian(dim=2).values.nan_to_num(0.0)  # a window without body says nothing: 0

    @staticmethod
    def _local_mean(x: torch.Tensor) -> torch.Tensor:
        """The 5³ local mean of the non-negative activity (same size as ``x``)."""
        return F.avg_pool3d(x.clamp(min=0), 5, stride=1, padding=2, count_include_pad=False)

    def statistics(self, image: torch.Tensor) -> torch.Tensor:
        """``[B, 7]``: per filter the median log noise energy per unit activity over the body voxels
        (Laplacian, Laplacian at half resolution, differences along x, y, z), the body fraction and the
        log mean activity of the window. Fixed (no trained weights), so they can be cached."""
        if image.ndim != 5 or image.shape[1] != 1:
            raise ValueError(f"NoiseLevelHead expects [B, 1, D, H, W], got {tuple(image.shape)}")
        if min(image.shape[2:]) < 10:
            raise ValueError(f"NoiseLevelHead needs windows of at least 10 voxels per side, got {tuple(image.shape)}")
        x = image.float()
        local = self._local_mean(x)
        full = self._noise_medians(x, self.bank, local)
        half_x = F.avg_pool3d(x, 2)
        half = self._noise_medians(half_x, self.bank[:1], self._local_mean(half_x))  # the Laplacian only
        fraction = (local > self.body_threshold).flatten(1).float().mean(dim=1, keepdim=True)
        log_activity = torch.log(x.clamp(min=0).mean(dim=(2, 3, 4)) + EPS)
        return torch.cat([full[:, :1], half, full[:, 1:], fraction, log_activity], dim=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Map an image ``[B, 1, D, H, W]`` (at least 10³) to DRF class logits ``[B, num_classes]``."""
        stats = self.statistics(image)
        if not self.training:  # both branches, chosen by the flag: no data-dependent branch (torch.compile, export)
            z = (stats - self.volume_mean) / self.volume_std
            volume = z @ self.volume_weight.T + self.volume_bias
            return torch.where(self.calibrated, volume, self._patch_logits(stats)).to(image.dtype)
        return self._patch_logits(stats).to(image.dtype)

    def _patch_logits(self, stats: torch.Tensor) -> torch.Tensor:
        """The MLP trained on patches (by the recipe's cross-entropy) on the statistics ``[B, F]``."""
        if self.training and stats.shape[0] == 1:  # BatchNorm cannot train on one sample: use its running stats
            stats = F.batch_norm(stats, self.norm.running_mean, self.norm.running_var, training=False)
        elif not self.training and torch.jit.is_tracing():  # ldt export: the ONNX BatchNorm wants a known width
            stats = (stats - self.norm.running_mean) / torch.sqrt(self.norm.running_var + self.norm.eps)
        else:
            stats = self.norm(stats)
        return self.mlp(stats)

    @torch.enable_grad()
    def calibrate(self, statistics: torch.Tensor, classes: torch.Tensor, steps: int = 500) -> float:
        """Fit the whole-volume classifier on ``statistics`` ``[N, 7]`` of whole training volumes and their
        ``classes`` ``[N]``; returns its training accuracy. Deterministic (full-batch L-BFGS from zero)."""
        if statistics.ndim != 2 or statistics.shape[0] != classes.shape[0] or statistics.shape[0] < 2:
            raise ValueError(f"calibrate: expected [N, {self.volume_mean.numel()}] statistics and N classes, "
                             f"got {tuple(statistics.shape)} and {tuple(classes.shape)}")
        x = statistics.detach().float().cpu()
        y = classes.detach().long().cpu()
        mean, std = x.mean(dim=0), x.std(dim=0, correction=0).clamp(min=1e-3)
        z = (x - mean) / std
        weight = torch.zeros(self.num_classes, x.shape[1], requires_grad=True)
        bias = torch.zeros(self.num_classes, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(z @ weight.T + bias, y) + self.calibration_l2 * weight.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            device = self.volume_weight.device
            self.volume_mean.copy_(mean.to(device))
            self.volume_std.copy_(std.to(device))
            self.volume_weight.copy_(weight.detach().to(device))
            self.volume_bias.copy_(bias.detach().to(device))
            self.calibrated.fill_(True)
            return float(((z @ weight.T + bias).argmax(dim=1) == y).float().mean())

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, num_classes={self.num_classes}, hidden={self.hidden}, "
                f"body_threshold={self.body_threshold}, lr_scale={self.lr_scale}, "
                f"calibrated={bool(self.calibrated)}")


def calibrate_head(head: nn.Module, volumes: Sequence[torch.Tensor], classes: Sequence[int]) -> float:
    """Compute a head's statistics on whole volumes ``[1, D, H, W]`` and calibrate it (a helper for tests)."""
    with torch.no_grad():
        stats = torch.cat([head.statistics(v[None].float()) for v in volumes])
    return head.calibrate(stats, torch.tensor(list(classes)))


@hookimpl
def ldt_register_heads(register: Register) -> None:
    register("noise_level", NoiseLevelHead)
