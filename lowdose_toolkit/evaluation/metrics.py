"""Image-quality metrics as the Ultra-Low-Dose PET challenge's evaluator computes them.

All metrics work on whole volumes (2D or 3D; leading singleton axes such as a channel axis are
dropped), in the reference's units, with ``ref`` the full-dose image and ``pred`` the estimate:

- RMSE  = sqrt(mean((ref - pred)^2))
- PSNR  = 20 log10(max(ref) / RMSE)
- NRMSE = RMSE / (max(ref) - min(ref)), a fraction (tables print it in percent)
- SSIM  on ref / max(ref) and pred / max(pred), 7-voxel uniform window, K1 = 0.01, K2 = 0.03,
  sample covariance, mean over the interior (the window radius cropped from every side) - exactly
  ``skimage.metrics.structural_similarity(ref_n, pred_n, data_range=R, win_size=7)``. The challenge's
  legacy ``compare_ssim`` call on float input took R = 2 (the float dtype range [-1, 1]):
  ``data_range="challenge"``; ``"standard"`` is R = 1, the range of the normalised images.

Volumes are processed in slabs along the first axis with float64 accumulation, so a whole-body
uEXPLORER volume (360 x 360 x 673) needs only a few hundred MiB beyond its own storage.

Every metric takes an optional boolean ``mask`` (e.g. from :func:`body_mask`). With a mask, RMSE, the
maximum and the minimum are taken over masked voxels, and SSIM averages its map over the masked
voxels of the interior (the normalisation by the maximum stays whole-volume, as unmasked).

Example:
    >>> import torch
    >>> ref = torch.rand(16, 16, 16) + 1
    >>> m = compute_all(ref, ref * 1.01)
    >>> sorted(m)
    ['masked', 'nrmse', 'psnr', 'rmse', 'ssim', 'ssim_data_range', 'ssim_range']
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal, TypeAlias

import numpy as np
import torch

from lowdose_toolkit.errors import DataError, UserError

__all__ = [
    "SSIM_DATA_RANGES",
    "check_ssim_range",
    "SsimRange",
    "body_mask",
    "compute_all",
    "nrmse",
    "psnr",
    "rmse",
    "ssim",
]

SsimRange = Literal["challenge", "standard"]
SSIM_DATA_RANGES: dict[str, float] = {"challenge": 2.0, "standard": 1.0}
WIN_SIZE = 7
K1 = 0.01
K2 = 0.03
# Voxels per slab (float64 working arrays are a small multiple of this); tests lower it to force
# many slabs.
SLAB_VOXELS = 4_000_000

ArrayLike: TypeAlias = torch.Tensor | np.ndarray


# ----------------------------------------------------------------------------------------------
# Input handling
# ----------------------------------------------------------------------------------------------


def _as_volume(x: ArrayLike, name: str) -> torch.Tensor:
    """Return ``x`` as a tensor without copying, leading singleton axes dropped down to 3D, and a single
    slice stored as a volume (``[X, Y, 1]``, as NIfTI holds 2-D images) as 2-D."""
    t = torch.as_tensor(x)
    while t.ndim > 3 and t.shape[0] == 1:
        t = t[0]
    if t.ndim == 3 and sum(n == 1 for n in t.shape) == 1:
        t = t.squeeze(list(t.shape).index(1))
    if t.ndim not in (2, 3):
        raise UserError(f"{name} must be a 2D or 3D volume, got shape {tuple(t.shape)}")
    if t.is_complex() or t.dtype == torch.bool:
        raise UserError(f"{name} must hold real numbers, got dtype {t.dtype}")
    return t


def _check_finite(t: torch.Tensor, name: str) -> None:
    if t.dtype.is_floating_point and not math.isfinite(float(t.sum(dtype=torch.float64))):
        bad = int((~torch.isfinite(t)).sum())
        raise DataError(f"{name} has {bad} NaN or infinite voxels; fix or mask them before evaluation")


def _prepare(
    ref: ArrayLike, pred: ArrayLike, mask: ArrayLike | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    r = _as_volume(ref, "ref")
    p = _as_volume(pred, "pred")
    if r.shape != p.shape:
        raise UserError(f"ref and pred shapes differ: {tuple(r.shape)} vs {tuple(p.shape)}")
    _check_finite(r, "ref")
    _check_finite(p, "pred")
    m = None
    if mask is not None:
        m = torch.as_tensor(mask)
        if m.ndim != r.ndim and [n for n in m.shape if n != 1] == [n for n in r.shape if n != 1]:
            m = m.reshape(r.shape)  # the volumes' singleton axes dropped (a channel axis, a 2-D image's slice)
        if m.dtype != torch.bool:
            raise UserError(f"mask must be boolean, got dtype {m.dtype}")
        if m.shape != r.shape:
            raise UserError(f"mask shape {tuple(m.shape)} differs from the volumes' {tuple(r.shape)}")
        if not bool(m.any()):
            raise DataError("mask selects no voxel; lower the body-mask threshold or check the reference")
    return r, p, m


def _slabs(t: torch.Tensor, halo: int = 0) -> Iterator[tuple[int, int]]:
    """Yield ``(start, stop)`` ranges along axis 0 of about SLAB_VOXELS voxels (plus ``halo`` planes)."""
    plane = max(1, math.prod(t.shape[1:]))
    step = max(1, SLAB_VOXELS // plane - halo)
    n = t.shape[0] - halo
    for start in range(0, n, step):
        yield start, min(start + step, n)


def _max_min(t: torch.Tensor, mask: torch.Tensor | None) -> tuple[float, float]:
    if mask is None:
        return float(t.max()), float(t.min())
    hi, lo = -math.inf, math.inf
    for a, b in _slabs(t):
        v = t[a:b][mask[a:b]]
        if v.numel():
            hi, lo = max(hi, float(v.max())), min(lo, float(v.min()))
    return hi, lo


def _check_ref_range(ref_max: float, ref_min: float, metric: str) -> None:
    if ref_max == ref_min:
        raise DataError(
            f"reference volume is constant (every voxel = {ref_max:g}): {metric} is undefined; "
            "check that the reference is the full-dose image"
        )
    if ref_max <= 0:
        raise DataError(
            f"reference maximum is {ref_max:g} (must be > 0 for {metric}); "
            "check that the reference holds activity, not a mask or a log image"
        )


# ----------------------------------------------------------------------------------------------
# Error metrics
# ----------------------------------------------------------------------------------------------


def _rmse(r: torch.Tensor, p: torch.Tensor, m: torch.Tensor | None) -> float:
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for a, b in _slabs(r):
        d = r[a:b].to(torch.float64) - p[a:b].to(torch.float64)
        if m is not None:
            d = d[m[a:b]]
        total += torch.sum(d * d)
        count += d.numel()
    return math.sqrt(float(total) / count)


def rmse(ref: ArrayLike, pred: ArrayLike, mask: ArrayLike | None = None) -> float:
    """Root-mean-square error, accumulated in float64.

    Args:
        ref: Reference (full-dose) volume.
        pred: Estimate, same shape.
        mask: Optional boolean mask; only its voxels count.
    """
    r, p, m = _prepare(ref, pred, mask)
    return _rmse(r, p, m)


def _psnr_from(ref_max: float, err: float) -> float:
    return math.inf if err == 0 else 20.0 * math.log10(ref_max / err)


def psnr(ref: ArrayLike, pred: ArrayLike, mask: ArrayLike | None = None) -> float:
    """Peak signal-to-noise ratio in dB: ``20 log10(max(ref) / RMSE)``.

    Unlike ``skimage.metrics.peak_signal_noise_ratio`` (which uses a data range), the peak is the
    reference's maximum, as in the challenge. Identical volumes give ``math.inf``.

    Raises:
        DataError: If the reference is constant or its maximum is not positive.
    """
    r, p, m = _prepare(ref, pred, mask)
    hi, lo = _max_min(r, m)
    _check_ref_range(hi, lo, "PSNR")
    return _psnr_from(hi, _rmse(r, p, m))


def nrmse(ref: ArrayLike, pred: ArrayLike, mask: ArrayLike | None = None) -> float:
    """RMSE normalised by the reference's range, ``RMSE / (max(ref) - min(ref))``, as a fraction.

    This is skimage's ``normalized_root_mse(ref, pred, normalization="min-max")``.

    Raises:
        DataError: If the reference is constant.
    """
    r, p, m = _prepare(ref, pred, mask)
    hi, lo = _max_min(r, m)
    _check_ref_range(hi, lo, "NRMSE")
    return _rmse(r, p, m) / (hi - lo)


# ----------------------------------------------------------------------------------------------
# SSIM
# ----------------------------------------------------------------------------------------------


def _box_valid(x: torch.Tensor, win: int) -> torch.Tensor:
    """Mean over every full ``win``-wide box (valid positions only), by cumulative sums per axis."""
    for dim in range(x.ndim):
        n = x.shape[dim]
        c = torch.cumsum(x, dim=dim)
        first = c.narrow(dim, win - 1, 1)
        rest = c.narrow(dim, win, n - win) - c.narrow(dim, 0, n - win)
        x = torch.cat([first, rest], dim=dim)
    return x / float(win**x.ndim)


def _ssim_slab(x: torch.Tensor, y: torch.Tensor, c1: float, c2: float, win: int) -> torch.Tensor:
    """SSIM map (valid interior only) of one float64 slab, skimage's formulas."""
    np_ = win**x.ndim
    cov_norm = np_ / (np_ - 1)
    ux = _box_valid(x, win)
    uy = _box_valid(y, win)
    uxx = _box_valid(x * x, win)
    uyy = _box_valid(y * y, win)
    uxy = _box_valid(x * y, win)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    a1 = 2 * ux * uy + c1
    a2 = 2 * vxy + c2
    b1 = ux * ux + uy * uy + c1
    b2 = vx + vy + c2
    return (a1 * a2) / (b1 * b2)


def _ssim(
    r: torch.Tensor,
    p: torch.Tensor,
    m: torch.Tensor | None,
    data_range: str,
    ref_max: float,
    pred_max: float,
) -> float:
    if data_range not in SSIM_DATA_RANGES:
        raise UserError(f"ssim data_range {data_range!r} is unknown; use one of {sorted(SSIM_DATA_RANGES)}")
    win = WIN_SIZE
    if min(r.shape) < win:
        raise UserError(f"SSIM needs every dimension >= {win} voxels, got shape {tuple(r.shape)}")
    if pred_max == 0:
        raise DataError("prediction maximum is 0, so pred / max(pred) is undefined; the prediction is empty")
    R = SSIM_DATA_RANGES[data_range]
    c1, c2 = (K1 * R) ** 2, (K2 * R) ** 2
    pad = (win - 1) // 2
    interior_rest = tuple(slice(pad, s - pad) for s in r.shape[1:])
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for a, b in _slabs(r, halo=win - 1):
        x = r[a : b + win - 1].to(torch.float64) / ref_max
        y = p[a : b + win - 1].to(torch.float64) / pred_max
        s = _ssim_slab(x, y, c1, c2, win)
        if m is not None:
            s = s[m[(slice(a + pad, b + pad), *interior_rest)]]
        total += s.sum()
        count += s.numel()
    if count == 0:
        raise DataError("mask selects no voxel inside the SSIM interior (window radius cropped from each side)")
    return float(total) / count


def ssim(
    ref: ArrayLike,
    pred: ArrayLike,
    data_range: SsimRange = "challenge",
    mask: ArrayLike | None = None,
) -> float:
    """Structural similarity of ``ref / max(ref)`` and ``pred / max(pred)``, as the challenge computes it.

    Equals ``skimage.metrics.structural_similarity(ref_n, pred_n, data_range=2 or 1, win_size=7)``
    on float64 input (uniform 7-voxel window, K1 = 0.01, K2 = 0.03, sample covariance, mean over the
    interior crop).

    Args:
        ref: Reference (full-dose) volume, 2D or 3D, every side >= 7 voxels.
        pred: Estimate, same shape.
        data_range: ``"challenge"`` (R = 2, the legacy skimage float default the challenge used) or
            ``"standard"`` (R = 1, the range of the normalised images).
        mask: Optional boolean mask; the SSIM map is averaged over its interior voxels.

    Raises:
        DataError: If the reference is constant, or either maximum makes the normalisation undefined.
    """
    r, p, m = _prepare(ref, pred, mask)
    hi, lo = float(r.max()), float(r.min())
    _check_ref_range(hi, lo, "SSIM")
    return _ssim(r, p, m, data_range, hi, float(p.max()))


# ----------------------------------------------------------------------------------------------
# Mask and bundle
# ----------------------------------------------------------------------------------------------


def check_ssim_range(ssim_range: str) -> None:
    """Raise a :class:`UserError` unless ``ssim_range`` names one of :data:`SSIM_DATA_RANGES`."""
    if ssim_range not in SSIM_DATA_RANGES:
        raise UserError(f"ssim_range {ssim_range!r} is unknown; use one of {sorted(SSIM_DATA_RANGES)}")


def body_mask(ref: ArrayLike, threshold_fraction: float = 0.01, fill_holes: bool = True) -> torch.Tensor:
    """Boolean body mask: voxels above ``threshold_fraction * max(ref)``, enclosed holes filled.

    Holes (e.g. low-uptake lungs inside the body) are filled by keeping as background only the
    sub-threshold regions connected to the volume's border.

    Args:
        ref: Reference volume (full dose).
        threshold_fraction: Fraction of the maximum, in (0, 1).
        fill_holes: Fill background regions that do not touch the border.

    Returns:
        A bool tensor with the volume's shape (leading singleton axes dropped).
    """
    if not 0 < threshold_fraction < 1:
        raise UserError(f"threshold_fraction must be in (0, 1), got {threshold_fraction}")
    r = _as_volume(ref, "ref")
    hi = float(r.max())
    if hi <= 0:
        raise DataError(f"reference maximum is {hi:g}; a body mask needs positive activity")
    mask = r > threshold_fraction * hi
    if fill_holes:
        from scipy import ndimage

        background, _ = ndimage.label(~mask.numpy())
        border = np.zeros_like(background, dtype=bool)
        for axis in range(background.ndim):
            for index in (0, -1):
                border[(slice(None),) * axis + (index,)] = True
        outside = np.unique(background[border & (background > 0)])
        mask = torch.from_numpy(~np.isin(background, outside))
    return mask


def compute_all(
    ref: ArrayLike,
    pred: ArrayLike,
    ssim_range: SsimRange = "challenge",
    mask: ArrayLike | None = None,
) -> dict[str, float | str | bool]:
    """PSNR, SSIM, NRMSE and RMSE in one pass over the maxima.

    Returns:
        ``{"psnr", "ssim", "nrmse" (fraction), "rmse", "ssim_range", "ssim_data_range", "masked"}``.

    Raises:
        DataError: If the reference is constant or not positive, or the prediction is all zero.
    """
    check_ssim_range(ssim_range)
    r, p, m = _prepare(ref, pred, mask)
    hi, lo = _max_min(r, m)
    _check_ref_range(hi, lo, "PSNR/NRMSE/SSIM")
    err = _rmse(r, p, m)
    full_hi = hi if m is None else float(r.max())
    return {
        "psnr": _psnr_from(hi, err),
        "ssim": _ssim(r, p, m, ssim_range, full_hi, float(p.max())),
        "nrmse": err / (hi - lo),
        "rmse": err,
        "ssim_range": ssim_range,
        "ssim_data_range": SSIM_DATA_RANGES[ssim_range],
        "masked": m is not None,
    }
