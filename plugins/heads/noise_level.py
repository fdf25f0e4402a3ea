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
  on them alone is soft on whole volumes (measured: top probability about 0.6 on the phantom);
* a continuous dose level for whole volumes (:meth:`volume_estimate`): ``ln DRF`` as a linear function of
  the five noise statistics, fitted by least squares in :meth:`calibrate` on the same training volumes.
  Unlike the classes it goes below the smallest training DRF for a cleaner scan (a full-dose one, the
  challenge's DRF 2, a more sensitive scanner), which is what the model's fitted strength
  (:mod:`lowdose_toolkit.models.strength`) needs to leave such a scan nearly as it is.

On the phantom the full-resolution Laplacian's statistic alone orders every whole volume by DRF
without overlap between subjects (docs/RESULTS.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
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


def responses(x: torch.Tensor, filters: int = 4) -> torch.Tensor:
    """``[B, filters, D-2, H-2, W-2]``: the first ``filters`` of :func:`filter_bank` applied to ``x`` (valid), by
    shifted differences: the same sums as ``F.conv3d(x, filter_bank())`` at a quarter of its cost."""
    c = x[:, :, 1:-1, 1:-1, 1:-1]
    up = (x[:, :, 2:, 1:-1, 1:-1], x[:, :, 1:-1, 2:, 1:-1], x[:, :, 1:-1, 1:-1, 2:])
    down = (x[:, :, :-2, 1:-1, 1:-1], x[:, :, 1:-1, :-2, 1:-1], x[:, :, 1:-1, 1:-1, :-2])
    laplacian = (up[0] + down[0]) + (up[1] + down[1]) + (up[2] + down[2]) - 6.0 * c
    if filters == 1:
        return laplacian
    return torch.cat([laplacian, *(u - c for u in up)][:filters], dim=1)


def local_mean(x: torch.Tensor) -> torch.Tensor:
    """The 5³ local mean of the non-negative activity (same size as ``x``; near the borders over the voxels
    inside), as three 5-point means along the axes: the box mean of ``F.avg_pool3d(x, 5, 1, 2,
    count_include_pad=False)`` at a fifth of its cost."""
    x = x.clamp(min=0)
    for kernel in ((5, 1, 1), (1, 5, 1), (1, 1, 5)):
        x = F.avg_pool3d(x, kernel, stride=1, padding=tuple(k // 2 for k in kernel), count_include_pad=False)
    return x


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
        drfs: The DRF of each class (context argument: ``data.drfs``), for the continuous dose level.

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
                 lr_scale: float = 10.0, calibration_l2: float = 1e-4, drfs: list[int] | None = None) -> None:
        super().__init__()
        if in_channels != 1:
            raise UserError(f"noise_level: reads the image (input: image, 1 channel), got a feature of {in_channels}")
        if num_classes < 2:
            raise UserError(f"noise_level: num_classes={num_classes}; list at least two DRFs in data.drfs")
        if hidden < 1:
            raise UserError(f"noise_level: hidden={hidden} must be positive")
        if not lr_scale > 0:
            raise UserError(f"noise_level: lr_scale={lr_scale} must be positive")
        if drfs is not None and (len(drfs) != num_classes or min(drfs) < 1):
            raise UserError(f"noise_level: drfs={list(drfs)} must be {num_classes} DRFs >= 1, one per class")
        self.drfs = None if drfs is None else [int(d) for d in drfs]
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.hidden = hidden
        self.body_threshold = body_threshold
        self.lr_scale = lr_scale
        self.calibration_l2 = calibration_l2
        features = len(FILTERS) + 2
        self.norm = nn.BatchNorm1d(features, affine=False)  # standardises the statistics of patches
        self.mlp = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
        set_lr_scale(self, lr_scale)
        # The whole-volume classifier (fitted by calibrate; saved with the model).
        self.register_buffer("volume_mean", torch.zeros(features))
        self.register_buffer("volume_std", torch.ones(features))
        self.register_buffer("volume_weight", torch.zeros(num_classes, features))
        self.register_buffer("volume_bias", torch.zeros(num_classes))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        # The continuous dose level: ln DRF = level_weight . z[:5] + level_bias (fitted by calibrate with drfs).
        self.register_buffer("level_weight", torch.zeros(len(FILTERS)))
        self.register_buffer("level_bias", torch.zeros(()))
        self.register_buffer("level_fitted", torch.zeros((), dtype=torch.bool))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        for name in ("level_weight", "level_bias", "level_fitted"):  # saved before the dose level existed: unfitted
            state_dict.setdefault(prefix + name, getattr(self, name).clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _noise_medians(self, x: torch.Tensor, filters: int, local: torch.Tensor) -> torch.Tensor:
        """``[B, filters]`` medians over body voxels of log(response² / local mean) for the first ``filters``."""
        response = responses(x, filters)
        local = local[:, :, 1:-1, 1:-1, 1:-1]
        body = local > self.body_threshold
        ratio = torch.log(response.square() + EPS) - torch.log(local + EPS)
        exporting = getattr(torch.compiler, "is_exporting", lambda: False)()  # not in every torch >= 2.6
        if torch.jit.is_tracing() or exporting:  # ldt export: no exporter knows nanmedian
            return masked_median(ratio.flatten(2), body.flatten(2))
        ratio = ratio.masked_fill(~body, float("nan")).flatten(2)
        return ratio.nanmedian(dim=2).values.nan_to_num(0.0)  # a window without body says nothing: 0

    def statistics(self, image: torch.Tensor) -> torch.Tensor:
        """``[B, 7]``: per filter the median log noise energy per unit activity over the body voxels
        (Laplacian, Laplacian at half resolution, differences along x, y, z), the body fraction and the
        log mean activity of the window. Fixed (no trained weights), so they can be cached. Computed in float32
        under any autocast: the zero-sum filters subtract nearly equal activities, which bf16's 8-bit mantissa
        would round to noise of its own."""
        if image.ndim != 5 or image.shape[1] != 1:
            raise ValueError(f"NoiseLevelHead expects [B, 1, D, H, W], got {tuple(image.shape)}")
        if min(image.shape[2:]) < 10:
            raise ValueError(f"NoiseLevelHead needs windows of at least 10 voxels per side, got {tuple(image.shape)}")
        with _no_autocast(image.device):
            return self._statistics(image.float())  # fixed filters on raw activity: float32 always

    def _statistics(self, x: torch.Tensor) -> torch.Tensor:
        local = local_mean(x)
        full = self._noise_medians(x, 4, local)
        half_x = F.avg_pool3d(x, 2)
        half = self._noise_medians(half_x, 1, local_mean(half_x))  # the Laplacian only
        fraction = (local > self.body_threshold).flatten(1).float().mean(dim=1, keepdim=True)
        log_activity = torch.log(x.clamp(min=0).mean(dim=(2, 3, 4)) + EPS)
        return torch.cat([full[:, :1], half, full[:, 1:], fraction, log_activity], dim=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Map an image ``[B, 1, D, H, W]`` (at least 10³) to DRF class logits ``[B, num_classes]``."""
        stats = self.statistics(image)
        if not self.training:
            return self._eval_logits(stats).to(image.dtype)
        return self._patch_logits(stats).to(image.dtype)

    def _eval_logits(self, stats: torch.Tensor) -> torch.Tensor:
        """The calibrated whole-volume classifier once calibrated, else the patch MLP (both computed and
        chosen by the flag: no data-dependent branch, for torch.compile and export)."""
        z = (stats - self.volume_mean) / self.volume_std
        volume = z @ self.volume_weight.T + self.volume_bias
        return torch.where(self.calibrated, volume, self._patch_logits(stats))

    @torch.no_grad()
    def volume_logits(self, volume: torch.Tensor) -> torch.Tensor:
        """DRF class logits ``[1, num_classes]`` of a whole volume ``[1, 1, X, Y, Z]`` of any size, in eval mode:
        the calibrated classifier on :meth:`volume_statistics`. The Predictor conditions every sliding
        window of a guided model on it: a window smaller than the body sees too few voxels, and a body
        fraction and mean activity unlike the whole training volumes the classifier was calibrated on."""
        return self.volume_estimate(volume)[0]

    @torch.no_grad()
    def volume_estimate(self, volume: torch.Tensor) -> tuple[torch.Tensor, float | None]:
        """``(logits [1, num_classes], dose level)`` of a whole volume ``[1, 1, X, Y, Z]``, from one pass of
        :meth:`volume_statistics`: :meth:`volume_logits`, and the DRF its noise corresponds to on the training
        data's scale, continuous (None until calibrated with ``drfs``)."""
        was_training = self.training
        self.eval()
        try:
            stats = self.volume_statistics(volume)
            return self._eval_logits(stats), self._level(stats)
        finally:
            self.train(was_training)

    def _level(self, stats: torch.Tensor) -> float | None:
        """The continuous dose level of the first row of ``stats`` (None unless fitted)."""
        if not bool(self.level_fitted):
            return None
        n = len(FILTERS)
        z = (stats[0, :n].float() - self.volume_mean[:n]) / self.volume_std[:n]
        return float(torch.exp(z @ self.level_weight + self.level_bias))

    def volume_statistics(self, volume: torch.Tensor, max_voxels: int = 2**24,
                          slab: int | None = None) -> torch.Tensor:
        """:meth:`statistics` ``[1, 7]`` of a whole volume ``[1, 1, X, Y, Z]`` in bounded memory.

        Up to ``max_voxels`` voxels the volume goes through :meth:`statistics` at once (on this head's
        device). A larger one (a whole-body scan) is read in slabs of ``slab`` planes along its last axis
        (default: about 4 million voxels a slab, 32 planes of 360×360), each moved to the head's device with
        the margin its filters need, in one pass: each filter's values go into a fine histogram
        (:data:`HISTOGRAM`) whose median is within a bin width (0.0006, about a thousandth of a DRF step) of
        the exact one; the body fraction and mean activity are exact.
        Float32 whatever the autocast, as :meth:`statistics`."""
        if volume.ndim != 5 or volume.shape[:2] != (1, 1):
            raise ValueError(f"volume_statistics expects [1, 1, X, Y, Z], got {tuple(volume.shape)}")
        if min(volume.shape[2:]) < 10:
            raise ValueError(f"NoiseLevelHead needs volumes of at least 10 voxels per side, got {tuple(volume.shape)}")
        device = self.volume_mean.device
        if volume.numel() <= max_voxels:
            return self.statistics(volume.to(device))
        if slab is None:
            slab = max(3, 2**22 // (volume.shape[2] * volume.shape[3]))
        with _no_autocast(device):
            x = volume.float()
            full, body, activity = _histogram_medians(x, 4, self.body_threshold, slab, device)
            half, _, _ = _histogram_medians(F.avg_pool3d(x, 2), 1, self.body_threshold, slab, device)
            n = x[0, 0].numel()
            fraction = torch.tensor([[body / n]], device=device)
            log_activity = torch.log(torch.tensor([[activity / n]], device=device) + EPS)
            return torch.cat([full[:, :1], half, full[:, 1:], fraction, log_activity], dim=1)

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
        ``classes`` ``[N]``; returns its training accuracy. Deterministic (full-batch L-BFGS from zero). With
        ``drfs`` known, also fits the continuous dose level (ridge least squares of ln DRF, closed form)."""
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
            if self.drfs is not None:
                self._fit_level(z[:, :len(FILTERS)], torch.log(torch.tensor(self.drfs, dtype=torch.float32))[y])
            return float(((z @ weight.T + bias).argmax(dim=1) == y).float().mean())

    def _fit_level(self, z: torch.Tensor, log_drf: torch.Tensor) -> None:
        """Ridge least squares ``log_drf ≈ z @ w + b`` on standardised noise statistics (intercept free)."""
        zd, yd = z.double(), log_drf.double()
        zc, yc = zd - zd.mean(dim=0), yd - yd.mean()
        gram = zc.T @ zc + self.calibration_l2 * zd.shape[0] * torch.eye(zd.shape[1], dtype=torch.float64)
        w = torch.linalg.solve(gram, zc.T @ yc)
        b = yd.mean() - zd.mean(dim=0) @ w
        device = self.level_weight.device
        self.level_weight.copy_(w.float().to(device))
        self.level_bias.copy_(b.float().to(device))
        self.level_fitted.fill_(True)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, num_classes={self.num_classes}, hidden={self.hidden}, "
                f"body_threshold={self.body_threshold}, lr_scale={self.lr_scale}, "
                f"calibrated={bool(self.calibrated)}")


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Autocast switched off on ``device`` (the statistics are float32 always); the meta device of the
    engine's dry run has no autocast to switch off."""
    kind = device.type
    return torch.autocast(kind, enabled=False) if kind in ("cpu", "cuda") else contextlib.nullcontext()


def _partition(n: int, size: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` ranges of ``size`` (at least 3) covering ``0..n``; a last range under 3 joins the one before
    (a slab with the filters' 2-plane margin then still holds the 5 planes of the local mean)."""
    size = max(3, size)
    ranges = [(lo, min(n, lo + size)) for lo in range(0, n, size)]
    if len(ranges) > 1 and ranges[-1][1] - ranges[-1][0] < 3:
        ranges[-2:] = [(ranges[-2][0], n)]
    return ranges


#: Range and number of bins of the whole-volume histograms; values outside fall in the end bins.
HISTOGRAM = (-40.0, 40.0, 1 << 17)


def _slabs(x: torch.Tensor, filters: int, threshold: float, slab: int,
           device: torch.device) -> Iterator[tuple[torch.Tensor, int, float]]:
    """Per slab of ``x``'s last axis: the ratios ``[filters, n]`` of :meth:`NoiseLevelHead._noise_medians` at
    its interior body voxels, and the body voxels and summed activity of its planes (a partition of the
    volume), each computed as on the whole volume."""
    depth = x.shape[-1]
    for a, b in _partition(depth - 2, slab):
        a, b = a + 1, b + 1  # interior planes [a, b); the counted planes [c, d) take the border planes too
        c, d = (0 if a == 1 else a), (depth if b == depth - 1 else b)
        lo, hi = max(0, a - 2), min(depth, b + 2)
        part = x[..., lo:hi].to(device)
        local = local_mean(part)
        inner = local[:, :, 1:-1, 1:-1, a - lo:b - lo]
        body = (inner > threshold)[0, 0]
        response = responses(part, filters)[0][..., a - lo - 1:b - lo - 1][:, body]
        ratios = torch.log(response.square() + EPS) - torch.log(inner[0][:, body] + EPS)
        counted = (local[..., c - lo:d - lo] > threshold).sum()
        yield ratios, int(counted), float(part[..., c - lo:d - lo].clamp(min=0).double().sum())


def _histogram_medians(x: torch.Tensor, filters: int, threshold: float, slab: int,
                       device: torch.device) -> tuple[torch.Tensor, int, float]:
    """``[1, filters]`` medians of each filter's body ratios over the whole volume ``x`` (the lower median's
    value interpolated in its :data:`HISTOGRAM` bin; 0 without body), the body voxels and the activity sum."""
    lo, hi, bins = HISTOGRAM
    width = (hi - lo) / bins
    offsets = torch.arange(filters, device=device)[:, None] * bins
    counts = torch.zeros(filters * bins, dtype=torch.long, device=device)
    body = 0
    activity = 0.0
    for ratios, counted, summed in _slabs(x, filters, threshold, slab, device):
        index = ((ratios - lo) / width).floor().clamp(0, bins - 1).long() + offsets
        counts += torch.bincount(index.flatten(), minlength=filters * bins)
        body += counted
        activity += summed
    counts = counts.view(filters, bins)
    total = int(counts[0].sum())
    if total == 0:
        return torch.zeros(1, filters, device=device), body, activity
    rank = (total - 1) // 2  # the lower median, as torch.nanmedian
    cumulative = counts.cumsum(dim=1)
    at = torch.searchsorted(cumulative, torch.full((filters, 1), rank, device=device), right=True)
    below = torch.where(at > 0, cumulative.gather(1, (at - 1).clamp(min=0)), torch.zeros_like(at))
    inside = counts.gather(1, at).clamp(min=1)
    medians = lo + (at.double() + (rank - below + 0.5).double() / inside.double()) * width
    return medians.float().T, body, activity


def calibrate_head(head: nn.Module, volumes: Sequence[torch.Tensor], classes: Sequence[int]) -> float:
    """Compute a head's statistics on whole volumes ``[1, D, H, W]`` and calibrate it (a helper for tests)."""
    with torch.no_grad():
        stats = torch.cat([head.statistics(v[None].float()) for v in volumes])
    return head.calibrate(stats, torch.tensor(list(classes)))


@hookimpl
def ldt_register_heads(register: Register) -> None:
    register("noise_level", NoiseLevelHead)
