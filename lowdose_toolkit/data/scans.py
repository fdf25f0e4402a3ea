"""Count-based low-dose PET scans of one subject: projection, counts and reconstruction.

Model (per subject, 2D per axial slice, all slices and dose levels batched):

1. Truth: phantom activity (Bq/mL) blurred by the scanner's resolution, a 3D Gaussian PSF
   (``psf_fwhm_mm``, default 5 mm: uEXPLORER ~3 mm intrinsic [1] plus positron range and the
   reconstruction's effective resolution).
2. Projection: a precomputed sparse system matrix ``P`` (pixel-driven, linear interpolation onto
   ``n_angles`` parallel-beam views over 180 deg, radial bins of one pixel), giving line integrals
   in (Bq/mL) mm. Attenuation factors ``AF = exp(-P mu)`` from the 511 keV mu map.
3. Expected prompts ``ybar = c AF P x + s + r``: trues scaled by ``c = counts_per_bq x voxel depth``
   so that the unattenuated trues number ``counts_per_bq`` per Bq in the field of view; scatter ``s``
   a smooth (Gaussian, 100 mm radially, 50 mm axially) copy of the trues making
   ``scatter_fraction`` of trues + scatter (uEXPLORER ~36 % [1]); randoms ``r`` uniform, totalling
   ``randoms_fraction`` of the trues.
4. Counts: ``counts_model="listmode"`` (default) draws the full acquisition as nested Poisson
   increments so that the DRF-k data are the first 1/k of the full data's events, exactly as the
   Ultra-Low-Dose challenge made its low-dose images by rebinning list-mode data to shorter windows;
   ``"independent"`` draws every dose level from its own, independent Poisson realisation.
5. Reconstruction: OSEM [2] (``iterations`` x ``subsets`` of interleaved views) with exact
   attenuation, scatter and randoms modelling; the low-dose system model carries ``c / DRF`` so the
   image is in Bq/mL, unbiased; optional Gaussian post-filter. Full-dose and low-dose images go
   through the very same reconstruction.

References:
    [1] Spencer BA et al. Performance evaluation of the uEXPLORER total-body PET/CT scanner based on
        NEMA NU 2-2018. J Nucl Med 2021;62:861-870.
    [2] Hudson HM, Larkin RS. Accelerated image reconstruction using ordered subsets of projection
        data. IEEE Trans Med Imaging 1994;13:601-609.

Example:
    >>> from lowdose_toolkit.data.phantom import make_phantom
    >>> cfg = SimulationConfig(shape=(64, 40, 40), spacing_mm=(15.0, 12.0, 12.0), n_angles=48)
    >>> p = make_phantom(cfg.shape, cfg.spacing_mm, seed=0)
    >>> images = simulate_scans(p.activity, p.mu, [4, 100], cfg, seed=0)
    >>> list(images)
    ['full', 4, 100]
    >>> images["full"].shape
    torch.Size([64, 40, 40])
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from scipy import ndimage

from lowdose_toolkit.data.projector import projector_for
from lowdose_toolkit.data.reconstruction import _single_thread, osem
from lowdose_toolkit.data.simulation_config import SimulationConfig, check_drfs
from lowdose_toolkit.errors import UserError
from lowdose_toolkit.records import FULL

__all__ = ["simulate_scans"]

_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def _gauss(vol: np.ndarray, fwhm_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """3D Gaussian filter with the given FWHM (mm)."""
    if fwhm_mm <= 0:
        return vol
    sigma = [fwhm_mm / _FWHM_PER_SIGMA / s for s in spacing]
    return ndimage.gaussian_filter(vol, sigma, mode="constant", truncate=3.0)


def simulate_scans(
    activity: torch.Tensor,
    mu: torch.Tensor,
    drfs: Iterable[int],
    config: SimulationConfig | None = None,
    seed: int | np.random.SeedSequence | np.random.Generator = 0,
    stats: dict | None = None,
) -> dict[str | int, torch.Tensor]:
    """Simulate full-dose and low-dose acquisitions of one subject and reconstruct them.

    Args:
        activity: ``[D, H, W]`` activity, Bq/mL.
        mu: ``[D, H, W]`` attenuation map at 511 keV, 1/mm.
        drfs: Dose reduction factors to simulate (besides full dose).
        config: Geometry, counts and reconstruction; its ``shape`` must match ``activity``.
        seed: Seed, ``SeedSequence`` or ``Generator`` of the Poisson draws.
        stats: If given, filled with count totals (trues, scatter, randoms, prompts per level).

    Returns:
        ``{"full": image, drf: image, ...}``, float32 ``[D, H, W]`` in Bq/mL.

    Raises:
        UserError: If the volume shape does not match ``config.shape`` or a DRF is invalid.
    """
    with _single_thread():
        return _simulate_scans(activity, mu, drfs, config, seed, stats)


def _simulate_scans(
    activity: torch.Tensor,
    mu: torch.Tensor,
    drfs: Iterable[int],
    config: SimulationConfig | None,
    seed: int | np.random.SeedSequence | np.random.Generator,
    stats: dict | None,
) -> dict[str | int, torch.Tensor]:
    config = config or SimulationConfig()
    levels = check_drfs(drfs)
    if tuple(activity.shape) != config.shape or tuple(mu.shape) != config.shape:
        raise UserError(
            f"activity {tuple(activity.shape)} and mu {tuple(mu.shape)} must both have the "
            f"configured shape {config.shape}"
        )
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    proj = projector_for(config)
    sz = config.spacing_mm[0]
    truth = _gauss(np.asarray(activity, dtype=np.float32), config.psf_fwhm_mm, config.spacing_mm)
    x = proj.to_columns(torch.from_numpy(np.ascontiguousarray(truth, dtype=np.float32)))
    mucols = proj.to_columns(mu.float())
    # c turns line integrals (Bq/mL x mm) into counts: sum over one view of P x = sum(x) area / bin,
    # the activity in Bq is sum(x) area sz / 1000, and there are n_angles views.
    c = config.counts_per_bq * (sz / 1000.0) * proj.bin_mm / config.n_angles
    af = torch.exp(-proj.forward(mucols))
    trues = c * af * proj.forward(x)
    # Scatter: the trues smoothed (100 mm radially, 50 mm axially), scaled to the scatter fraction.
    t3 = trues.numpy().reshape(config.n_angles, proj.n_bins, -1)
    smooth = ndimage.gaussian_filter(t3, (0.0, 100.0 / proj.bin_mm, 50.0 / sz), mode="nearest")
    n_true = float(trues.sum(dtype=torch.float64))
    sf = config.scatter_fraction
    scatter = smooth * np.float32(sf / (1.0 - sf) * n_true / max(float(smooth.sum(dtype=np.float64)), 1e-30))
    randoms = config.randoms_fraction * n_true / trues.numel()
    background = torch.from_numpy(scatter.reshape(trues.shape)) + randoms
    background = background.clamp_min(1e-6 * max(n_true / trues.numel(), 1e-12))
    ybar = (trues + background).numpy().astype(np.float64)
    counts = _draw_counts(ybar, levels, config.counts_model, rng)
    if stats is not None:
        stats.update(
            trues=n_true,
            scatter=float(scatter.sum(dtype=np.float64)),
            randoms=float(randoms * trues.numel()),
            prompts={str(k): float(v.sum(dtype=torch.float64)) for k, v in counts.items()},
        )
    sens = [proj.back(af[proj.rows(k)], k) for k in range(proj.subsets)]
    out: dict[str | int, torch.Tensor] = {}
    for key, y in counts.items():
        frac = 1.0 if key == FULL else 1.0 / int(key)
        cols = osem(y, af, c * frac, background * frac, proj, config.iterations, sens)
        vol = proj.to_volume(cols).numpy()
        vol = _gauss(vol, config.postfilter_fwhm_mm, config.spacing_mm).astype(np.float32)
        out[key] = torch.from_numpy(np.ascontiguousarray(vol))
    return out


def _draw_counts(
    ybar: np.ndarray, drfs: tuple[int, ...], model: str, rng: np.random.Generator
) -> dict[str | int, torch.Tensor]:
    """Poisson prompts of the full acquisition and of every DRF (see ``counts_model``)."""
    out: dict[str | int, torch.Tensor] = {}
    if model == "independent":
        out[FULL] = torch.from_numpy(rng.poisson(ybar).astype(np.float32))
        for d in drfs:
            out[d] = torch.from_numpy(rng.poisson(ybar / d).astype(np.float32))
        return out
    # List mode: events of time window [0, T/d) for the largest d first, then the increments.
    total = np.zeros(ybar.shape, np.float64)
    done = 0.0
    for d in sorted(drfs, reverse=True):
        total += rng.poisson(ybar * (1.0 / d - done))
        done = 1.0 / d
        out[d] = torch.from_numpy(total.astype(np.float32))
    total += rng.poisson(ybar * (1.0 - done))
    out[FULL] = torch.from_numpy(total.astype(np.float32))
    return {FULL: out[FULL], **{d: out[d] for d in sorted(drfs)}}
