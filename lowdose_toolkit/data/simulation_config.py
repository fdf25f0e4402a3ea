"""Configuration of the simulated scans: geometry, count level, reconstruction; DRF validation."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from lowdose_toolkit.errors import UserError

__all__ = ["SimulationConfig", "check_drfs", "make_config"]

COUNTS_MODELS = ("listmode", "independent")


@dataclass(frozen=True)
class SimulationConfig:
    """Geometry, count level and reconstruction of the simulated scans.

    Attributes:
        shape: Volume ``(D, H, W)`` = (axial slices, y, x).
        spacing_mm: Voxel size ``(sz, sy, sx)``, mm.
        n_angles: Parallel-beam views over 180 degrees (a multiple of ``subsets``).
        psf_fwhm_mm: Resolution blur of the truth (3D Gaussian FWHM), mm; 0 turns it off.
        counts_per_bq: Full-dose unattenuated true counts per Bq in the field of view (the
            acquisition's sensitivity x duration). Sets the noise level; calibrated to the paper.
        scatter_fraction: Scatter / (trues + scatter).
        randoms_fraction: Randoms / trues.
        iterations: OSEM iterations.
        subsets: OSEM subsets (interleaved views).
        postfilter_fwhm_mm: 3D Gaussian post-filter FWHM of the reconstructions, mm; 0 = none.
        counts_model: ``"listmode"`` (low dose = first 1/DRF of the full events) or
            ``"independent"`` (every dose level its own Poisson draw).
        supersample: Phantom sub-voxels per axis (partial-volume edges).
        texture: Largest uptake heterogeneity: each subject's activity is multiplied by a smooth
            log-normal field whose relative spread is drawn uniformly in ``[0, texture]``
            (:func:`lowdose_toolkit.data.phantom.add_texture`); 0 (default): uniform organs.
        texture_fwhm_mm: The field's correlation FWHM, mm.
    """

    shape: tuple[int, int, int] = (160, 80, 80)
    spacing_mm: tuple[float, float, float] = (6.0, 6.0, 6.0)
    n_angles: int = 96
    psf_fwhm_mm: float = 5.0
    counts_per_bq: float = 32.0
    scatter_fraction: float = 0.35
    randoms_fraction: float = 0.25
    iterations: int = 3
    subsets: int = 8
    postfilter_fwhm_mm: float = 0.0
    counts_model: str = "listmode"
    supersample: int = 2
    texture: float = 0.0
    texture_fwhm_mm: float = 15.0

    def __post_init__(self) -> None:
        shape = tuple(int(v) for v in self.shape)
        spacing = tuple(float(v) for v in self.spacing_mm)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "spacing_mm", spacing)
        if len(shape) != 3 or min(shape) < 1:
            raise UserError(f"simulation shape must be three positive integers (D, H, W), got {shape}")
        if min(shape[1:]) < 8:
            raise UserError(f"simulation in-plane size must be at least 8 x 8 voxels, got {shape[1:]}")
        if len(spacing) != 3 or min(spacing) <= 0:
            raise UserError(f"simulation spacing_mm must be three positive values, got {spacing}")
        if self.subsets < 1 or self.n_angles < self.subsets or self.n_angles % self.subsets:
            raise UserError(
                f"n_angles ({self.n_angles}) must be a positive multiple of subsets ({self.subsets})"
            )
        if self.iterations < 1:
            raise UserError(f"iterations must be >= 1, got {self.iterations}")
        if not self.counts_per_bq > 0:
            raise UserError(f"counts_per_bq must be > 0, got {self.counts_per_bq}")
        if not 0 <= self.scatter_fraction < 1:
            raise UserError(f"scatter_fraction must be in [0, 1), got {self.scatter_fraction}")
        if self.randoms_fraction < 0:
            raise UserError(f"randoms_fraction must be >= 0, got {self.randoms_fraction}")
        if self.psf_fwhm_mm < 0 or self.postfilter_fwhm_mm < 0:
            raise UserError(
                f"psf_fwhm_mm ({self.psf_fwhm_mm}) and postfilter_fwhm_mm ({self.postfilter_fwhm_mm}) "
                "must be >= 0"
            )
        if self.counts_model not in COUNTS_MODELS:
            raise UserError(f"counts_model must be one of {COUNTS_MODELS}, got {self.counts_model!r}")
        if self.supersample < 1:
            raise UserError(f"supersample must be >= 1, got {self.supersample}")
        if not 0 <= self.texture <= 1:
            raise UserError(f"texture must be in [0, 1] (a relative spread of uptake), got {self.texture}")
        if not self.texture_fwhm_mm > 0:
            raise UserError(f"texture_fwhm_mm must be > 0, got {self.texture_fwhm_mm}")

    def as_dict(self) -> dict:
        """JSON-friendly dict of the fields (tuples as lists). Without texture the texture fields are left out, so
        a data set simulated before they existed keeps its cache key."""
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        if not self.texture:
            out.pop("texture")
            out.pop("texture_fwhm_mm")
        return out


def make_config(config: SimulationConfig | None = None, **params: object) -> SimulationConfig:
    """Return ``config`` (default: :class:`SimulationConfig()`) with ``params`` replaced.

    Raises:
        UserError: On an unknown parameter name (the message lists the valid ones) or a bad value.
    """
    config = config or SimulationConfig()
    names = [f.name for f in dataclasses.fields(SimulationConfig)]
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise UserError(f"unknown simulation parameter(s) {unknown}; valid: {', '.join(names)}")
    return dataclasses.replace(config, **params) if params else config


def check_drfs(drfs: Iterable[int]) -> tuple[int, ...]:
    """Validate dose reduction factors (integers > 1, no repeats) and return them sorted."""
    drfs = list(drfs)
    out = []
    for d in drfs:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 2:
            raise UserError(f"dose reduction factors must be integers >= 2, got {d!r} in {list(drfs)}")
        out.append(int(d))
    if not out or len(set(out)) != len(out):
        raise UserError(f"dose reduction factors must be a non-empty list without repeats, got {out}")
    return tuple(sorted(out))
