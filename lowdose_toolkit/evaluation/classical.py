"""Classical (non-trained) reference methods for the comparison tables: Gaussian smoothing and BM4D.

These are what a PET physicist tries first on a low-dose image, and the rows a learned method must
beat. Volumes are tensors ``[1, X, Y, Z]`` (or ``[X, Y, Z]``) in any units; the output has the input's
shape, dtype and device.

* :func:`gaussian`: separable 3D Gaussian post-filter, the clinical default (scanner reconstructions
  usually end with one).
* :func:`tune_gaussian_sigma`: the filter width that maximises the mean PSNR, per dose reduction
  factor, on **validation** pairs (tuning on the test split would flatter the baseline).
* :func:`bm4d_denoise`: BM4D (Maggioni et al., IEEE TIP 2013) through the PyPI package ``bm4d``
  (``pip install 'lowdose-toolkit[bm4d]'``), after a square-root variance-stabilising transform, with
  the noise level estimated from the input (:func:`estimate_noise_sigma`).

Example:
    >>> vol = torch.full((1, 8, 8, 8), 5.0)
    >>> bool(torch.allclose(gaussian(vol, 1.5), vol))
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from lowdose_toolkit.errors import UserError
from lowdose_toolkit.evaluation.metrics import psnr

__all__ = [
    "DEFAULT_SIGMAS",
    "bm4d_denoise",
    "estimate_noise_sigma",
    "gaussian",
    "gaussian_sweep",
    "tune_gaussian_sigma",
]

#: Candidate filter widths (standard deviations, in voxels) that :func:`tune_gaussian_sigma` tries;
#: 0 is the unfiltered input. On 1.65-4 mm PET voxels this spans the clinical 2-10 mm FWHM filters.
DEFAULT_SIGMAS: tuple[float, ...] = (0.0, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0)
TRUNCATE = 4.0  # kernel radius in standard deviations, as scipy.ndimage.gaussian_filter

Pair = tuple[torch.Tensor, torch.Tensor]


def _as_3d(volume: torch.Tensor, name: str = "volume") -> torch.Tensor:
    """``volume`` as ``[X, Y, Z]`` floating point (a leading singleton channel axis dropped)."""
    if not isinstance(volume, torch.Tensor):
        volume = torch.as_tensor(np.asarray(volume))
    v = volume[0] if volume.ndim == 4 and volume.shape[0] == 1 else volume
    if v.ndim != 3:
        raise UserError(f"{name} must be [1, X, Y, Z] or [X, Y, Z], got shape {tuple(volume.shape)}")
    return v if v.is_floating_point() else v.float()


def _kernel(sigma: float, radius: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)


def gaussian(volume: torch.Tensor, sigma_vox: float | Sequence[float]) -> torch.Tensor:
    """Separable 3D Gaussian smoothing with reflect padding.

    The kernel is truncated at 4σ and normalised to sum 1, so a constant volume is unchanged and the
    mean is preserved away from the borders; borders are padded by reflection about the edge voxel
    (``d c b | a b c d``: torch's ``reflect``, scipy's ``mirror``). A kernel wider than the volume is
    truncated to the volume's extent (and renormalised).

    Args:
        volume: ``[1, X, Y, Z]`` or ``[X, Y, Z]``.
        sigma_vox: Standard deviation in voxels, one value or one per axis (anisotropic voxels);
            0 leaves an axis alone. FWHM = 2.355 σ.

    Returns:
        The smoothed volume, with the input's shape, dtype and device (integers become float32).
    """
    sigmas = [float(sigma_vox)] * 3 if isinstance(sigma_vox, (int, float)) else [float(s) for s in sigma_vox]
    if len(sigmas) != 3 or any(not math.isfinite(s) or s < 0 for s in sigmas):
        raise UserError(f"gaussian: sigma_vox must be one or three finite values >= 0 (voxels), got {sigma_vox!r}")
    v = _as_3d(volume)
    x = v if v.is_floating_point() else v.float()
    for axis, sigma in enumerate(sigmas):
        size = x.shape[axis]
        if sigma == 0 or size == 1:
            continue
        radius = min(int(TRUNCATE * sigma + 0.5), size - 1)
        if radius == 0:
            continue
        k = _kernel(sigma, radius, torch.float64, torch.device("cpu")).tolist()
        # Shifted, weighted sums of views along the axis, the `offset` planes at each end reflected about the edge
        # voxel: one new copy of the volume per axis, where a 1-D conv3d allocated many (a whole-body
        # 360x360x673 volume: 24 s and 19 copies; benchmarks/consistency.py).
        out = x * k[radius]
        for offset in range(1, radius + 1):
            w, inner = k[radius + offset], size - offset
            out.narrow(axis, offset, inner).add_(x.narrow(axis, 0, inner), alpha=w)  # x[i - offset]
            out.narrow(axis, 0, inner).add_(x.narrow(axis, offset, inner), alpha=w)  # x[i + offset]
            left = torch.arange(offset, 0, -1, device=x.device)  # i < offset: x[offset - i]
            right = torch.arange(size - 2, size - 2 - offset, -1, device=x.device)  # i >= inner, reflected
            out.narrow(axis, 0, offset).add_(x.index_select(axis, left), alpha=w)
            out.narrow(axis, inner, offset).add_(x.index_select(axis, right), alpha=w)
        x = out
    if x is v:
        x = x.clone()
    return x.reshape(volume.shape)


def gaussian_sweep(pairs: Sequence[Pair], sigmas: Sequence[float] = DEFAULT_SIGMAS) -> dict[float, float]:
    """Mean PSNR (:func:`lowdose_toolkit.evaluation.metrics.psnr`, dB) of ``gaussian(low, σ)`` against ``full``, per σ.

    Args:
        pairs: ``(low, full)`` volumes, e.g. the validation subjects at one DRF.
        sigmas: Candidate widths in voxels.
    """
    if not pairs:
        raise UserError("gaussian_sweep: no (low, full) pairs given; pass the validation volumes of a DRF")
    sigmas = [float(s) for s in sigmas]
    if not sigmas or any(not math.isfinite(s) or s < 0 for s in sigmas):
        raise UserError(f"gaussian_sweep: sigmas must be a non-empty list of finite values >= 0, got {sigmas}")
    totals = dict.fromkeys(sigmas, 0.0)
    for i, (low, full) in enumerate(pairs):
        lo, fu = _as_3d(low, f"pairs[{i}] low"), _as_3d(full, f"pairs[{i}] full")
        if lo.shape != fu.shape:
            raise UserError(f"pairs[{i}]: low {tuple(lo.shape)} and full {tuple(fu.shape)} differ in shape")
        for s in sigmas:
            totals[s] += psnr(fu, gaussian(lo, s) if s > 0 else lo)
    return {s: t / len(pairs) for s, t in totals.items()}


def tune_gaussian_sigma(
    pairs: Mapping[int, Sequence[Pair]], sigmas: Sequence[float] = DEFAULT_SIGMAS
) -> dict[int, float]:
    """The Gaussian width that maximises the mean PSNR, for each dose reduction factor.

    Noise grows with the DRF (counts fall as 1/DRF), so the best filter widens with it: one σ for all
    DRFs over-smooths DRF 4 and under-smooths DRF 100. Tune on the validation split, report on test.
    Ties go to the smaller σ.

    Args:
        pairs: DRF -> ``(low, full)`` volume pairs at that DRF (``[1, X, Y, Z]`` or ``[X, Y, Z]``).
        sigmas: Candidate widths in voxels (0 = no filtering).

    Returns:
        DRF -> best σ in voxels.

    Example:
        >>> full = torch.rand(1, 12, 12, 12) + 1
        >>> tune_gaussian_sigma({4: [(full, full)]}, sigmas=[0, 1])
        {4: 0.0}
    """
    if not pairs:
        raise UserError("tune_gaussian_sigma: no DRFs given; pass {drf: [(low, full), ...]} from the validation split")
    best: dict[int, float] = {}
    for drf, group in pairs.items():
        curve = gaussian_sweep(group, sigmas)
        top = max(curve.values())
        best[drf] = min(s for s, v in curve.items() if v == top)
    return best


# --------------------------------------------------------------------------------------------- BM4D


def estimate_noise_sigma(volume: torch.Tensor, window: int = 5, threshold: float = 0.1) -> float:
    """Robust noise standard deviation: the median local standard deviation inside the body.

    The standard deviation of every ``window``³ neighbourhood (unbiased, ``n - 1``) is taken, and the
    median over the neighbourhoods whose mean exceeds ``threshold`` × the volume's 99th percentile
    (the body; air would pull the estimate down). Edges and hot spots inflate a minority of the
    neighbourhoods, which the median ignores. Unlike the classic MAD of the finest wavelet detail
    (Donoho & Johnstone 1994), this measures the noise's *marginal* standard deviation also when it
    is spatially correlated, as reconstructed (post-smoothed) PET noise is: on such noise the wavelet
    estimate falls to a third of the truth or less. In the variance-stabilised domain of
    :func:`bm4d_denoise` the noise is homogeneous and the median is its level; on raw PET it is the
    level of typical (median-activity) tissue.

    Args:
        volume: ``[1, X, Y, Z]`` or ``[X, Y, Z]``, every side >= ``window``.
        window: Side of the neighbourhoods in voxels.
        threshold: Fraction of the 99th percentile above which a neighbourhood's mean counts as body.
    """
    v = _as_3d(volume).to(torch.float64)
    if window < 2 or min(v.shape) < window:
        raise UserError(
            f"estimate_noise_sigma: need window >= 2 and every side >= window={window}, got shape {tuple(v.shape)}"
        )
    x = v[None, None]
    mean = F.avg_pool3d(x, window, stride=1)
    var = (F.avg_pool3d(x * x, window, stride=1) - mean * mean).clamp(min=0) * (window**3 / (window**3 - 1))
    flat = v.flatten()
    sample = flat[:: max(1, flat.numel() // 2**20)]
    level = float(torch.quantile(sample, 0.99))
    body = mean > threshold * level
    values = var[body] if bool(body.any()) else var.flatten()
    return float(values.median().sqrt())


def bm4d_denoise(
    volume: torch.Tensor,
    sigma: float | None = None,
    stabilize: bool = True,
    stages: Literal["all", "hard"] = "all",
) -> torch.Tensor:
    """BM4D denoising (Maggioni et al. 2013) of a PET volume, noise level estimated from the input.

    PET noise is signal dependent (after reconstruction its variance grows roughly in proportion to
    the activity), while BM4D assumes additive noise of one σ. With ``stabilize`` (default) the volume
    goes through the square-root transform ``t = 2 √max(x, 0)``, which makes a variance ``a·mean``
    about constant (``a``) whatever the unknown count scale ``a`` (an Anscombe transform without the
    3/8 offset, since reconstructed images are not counts); BM4D denoises ``t`` with
    ``σ = estimate_noise_sigma(t)``, and the result comes back through the unbiased inverse
    ``x = (t̂² + σ²) / 4`` (``E[x] = (E t)²/4 + Var(t)/4``). Without ``stabilize`` BM4D runs on the
    volume itself with one global σ, which over-smooths cold and under-smooths hot regions.

    Cost: about 30 s per 64³ volume on two CPU cores (``stages="hard"``: about 10 s), so a whole-body
    volume (~330 × 64³) takes hours; BM4D is a table row, not a pre-processing step.

    Args:
        volume: ``[1, X, Y, Z]`` or ``[X, Y, Z]``, every side >= 5 voxels.
        sigma: Noise standard deviation in the domain BM4D sees: of ``2 √x`` with ``stabilize``, of
            ``x`` without. None estimates it (:func:`estimate_noise_sigma`, the marginal σ; BM4D is
            then run as for white noise of that σ, although reconstructed PET noise is correlated).
        stabilize: Apply the variance-stabilising transform (see above).
        stages: ``all`` (hard thresholding, then Wiener filtering: the full BM4D) or ``hard``.

    Returns:
        The denoised volume, with the input's shape, dtype and device.

    Raises:
        UserError: If the optional package ``bm4d`` is not installed, or the volume is too small.
    """
    try:
        import bm4d
    except ImportError:
        raise UserError(
            "bm4d_denoise needs the optional package 'bm4d': pip install 'lowdose-toolkit[bm4d]'"
        ) from None
    if stages not in ("all", "hard"):
        raise UserError(f"bm4d_denoise: stages must be 'all' or 'hard', got {stages!r}")
    v = _as_3d(volume)
    if min(v.shape) < 5:
        raise UserError(f"bm4d_denoise: every side must be >= 5 voxels (BM4D's blocks), got {tuple(v.shape)}")
    x = v.detach().cpu().to(torch.float64).numpy()
    if not np.isfinite(x).all():
        raise UserError("bm4d_denoise: the volume has NaN or infinite voxels; fix or mask them first")
    t = 2.0 * np.sqrt(np.maximum(x, 0.0)) if stabilize else x
    s = float(sigma) if sigma is not None else estimate_noise_sigma(torch.from_numpy(t))
    if not math.isfinite(s) or s < 0:
        raise UserError(f"bm4d_denoise: sigma must be a finite value >= 0, got {s}")
    if s == 0:  # no noise (or a piecewise-constant volume): nothing to remove
        return volume.clone() if volume.is_floating_point() else volume.float()
    stage = bm4d.BM4DStages.ALL_STAGES if stages == "all" else bm4d.BM4DStages.HARD_THRESHOLDING
    d = np.asarray(bm4d.bm4d(t, s, stage_arg=stage), dtype=np.float64)
    out = (np.maximum(d, 0.0) ** 2 + s**2) / 4.0 if stabilize else d
    dtype = volume.dtype if volume.is_floating_point() else torch.float32
    return torch.from_numpy(out).to(dtype=dtype, device=volume.device).reshape(volume.shape)
