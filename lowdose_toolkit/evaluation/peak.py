"""SUVpeak: the largest mean of a 1 mL sphere centred in a lesion (PERCIST 1.0's peak, Wahl et al. 2009).

SUVmax is one voxel, so noise raises it with the dose reduction factor; SUVpeak averages a sphere of
1 cm³ (radius 6.2 mm), which is why PERCIST reads response on it. The sphere is centred on each voxel of the
lesion in turn (its centre inside the lesion, its extent wherever the sphere reaches) and the largest mean is the
peak. A voxel the sphere's surface cuts counts by the share of it inside (sampled on a sub-voxel grid), so the
kernel holds 1 mL on any voxel size, anisotropic ones included; a lesion at the volume's edge reads the edge
voxels repeated beyond it.

Example:
    >>> import numpy as np
    >>> kernel = peak_kernel((2.0, 2.0, 2.0))
    >>> round(float(kernel.sum()), 6), kernel.shape
    (1.0, (7, 7, 7))
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

PEAK_ML = 1.0  # PERCIST's sphere: 1 cm³
SUBSAMPLES = 9  # per voxel and axis, for the share of each voxel inside the sphere


def peak_kernel(spacing_mm: Sequence[float], volume_ml: float = PEAK_ML) -> np.ndarray:
    """The normalised weights of a ``volume_ml`` sphere centred on a voxel of size ``spacing_mm``: each voxel's
    :func:`sphere_shares`, summing to 1."""
    share = sphere_shares(spacing_mm, volume_ml)
    return share / share.sum()


def sphere_shares(spacing_mm: Sequence[float], volume_ml: float = PEAK_ML) -> np.ndarray:
    """The share of each voxel (of size ``spacing_mm``) inside a ``volume_ml`` sphere centred on the middle one."""
    spacing = np.asarray(spacing_mm, np.float64)
    if spacing.shape != (3,) or not (np.isfinite(spacing).all() and (spacing > 0).all()):
        raise ValueError(f"spacing {tuple(spacing_mm)} must be three positive voxel sizes in mm")
    radius = (3.0 * volume_ml * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)
    half = np.ceil(radius / spacing - 0.5).astype(int)  # voxels the sphere reaches from the centre one
    offsets = (np.arange(SUBSAMPLES) + 0.5) / SUBSAMPLES - 0.5
    axes = []
    for n, size in zip(half, spacing, strict=True):
        centres = np.arange(-n, n + 1, dtype=np.float64)
        axes.append((centres[:, None] + offsets[None, :]) * size)  # [voxel, sample] positions in mm
    x, y, z = axes
    inside = (x[:, None, None, :, None, None] ** 2 + y[None, :, None, None, :, None] ** 2
              + z[None, None, :, None, None, :] ** 2) <= radius**2
    return inside.mean(axis=(3, 4, 5), dtype=np.float64)


def region_peak(image: np.ndarray, box: tuple[slice, ...], inside: np.ndarray, kernel: np.ndarray) -> float:
    """The largest kernel-weighted mean of ``image`` centred on a voxel of a region (``inside``, the region's
    voxels within its bounding ``box``)."""
    from scipy import ndimage

    half = [k // 2 for k in kernel.shape]
    lo = [max(s.start - h, 0) for s, h in zip(box, half, strict=True)]
    hi = [min(s.stop + h, n) for s, h, n in zip(box, half, image.shape, strict=True)]
    region = np.asarray(image[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))], np.float64)
    means = ndimage.correlate(region, kernel, mode="nearest")
    inner = tuple(slice(s.start - a, s.stop - a) for s, a in zip(box, lo, strict=True))
    return float(means[inner][inside].max())
