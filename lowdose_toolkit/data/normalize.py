"""Intensity normalisation computed from the low-dose input alone, recorded so it can be inverted.

The same scale is applied to the input and (in training) to its full-dose target, so the network
learns in a unit where the input's body activity is about 1; inference inverts it and writes
activity in the input's units. Every method is a single positive scale: ``normalised = x / scale``.

Methods:
    robust: ``scale`` = mean of the voxels above 5 % of the input's 99th percentile, i.e. the mean
        activity in the body (about SUV 1 for FDG); insensitive to hot lesions and to the empty
        background. The default (``auto``), because it needs nothing but the image. (Up to version
        0.1 the 99.9th percentile was used: on whole-body scans that is the bladder, 5 % of which
        leaves only hot organs, so the "body mean" ranged over SUV 1.1-6.0 between the phantom's
        subjects; checkpoints record the quantile they were trained with.)
    suv: ``scale`` = 1 / suv_factor (SUV units), for data with known weight and injected dose.
    none: ``scale`` = 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from lowdose_toolkit.errors import DataError

BODY_FRACTION = 0.05
QUANTILE = 0.99
LEGACY_QUANTILE = 0.999  # checkpoints without a recorded quantile were trained with this
_MAX_SAMPLES = 2_000_000


@dataclass(frozen=True)
class Normalization:
    """A recorded normalisation: ``normalised = x / scale``."""

    method: str
    scale: float
    quantile: float | None = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.scale

    def invert(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale

    def to_dict(self) -> dict[str, float | str]:
        return asdict(self)


def robust_scale(x: torch.Tensor, quantile: float = QUANTILE) -> float:
    """Mean of the voxels above 5 % of the 99th percentile (a subsample is used for big volumes)."""
    flat = x.detach().reshape(-1).float()
    if flat.numel() > _MAX_SAMPLES:
        step = flat.numel() // _MAX_SAMPLES + 1
        flat = flat[::step]
    top = torch.quantile(flat, quantile)
    if not torch.isfinite(top) or top <= 0:
        raise DataError(f"cannot normalise an image whose {quantile:.1%} quantile is {float(top)!r} "
                        "(empty or negative image)")
    body = flat[flat > BODY_FRACTION * top]
    return float(body.mean())


def fit_normalization(low: torch.Tensor, method: str = "auto", suv_factor: float | None = None,
                      where: str = "input", quantile: float | None = None) -> Normalization:
    """Compute the normalisation of a low-dose volume.

    Args:
        low: The low-dose volume (any shape).
        method: ``auto`` (= ``robust``), ``robust``, ``suv`` or ``none``.
        suv_factor: Bq/mL -> SUV factor, needed by ``suv``.
        where: Name of the image, for error messages.
        quantile: ``robust`` only: the upper quantile the body threshold is 5 % of (default
            :data:`QUANTILE`; a checkpoint's recorded value when inferring with it).
    """
    if method in ("auto", "robust"):
        q = QUANTILE if quantile is None else quantile
        return Normalization("robust", robust_scale(low, q), q)
    if method == "suv":
        if not suv_factor or suv_factor <= 0:
            raise DataError(f"{where}: normalization 'suv' needs the SUV factor (weight and dose), which is unknown; "
                            "use data.normalization: robust")
        return Normalization("suv", 1.0 / suv_factor)
    if method == "none":
        return Normalization("none", 1.0)
    raise DataError(f"unknown normalization {method!r}; use auto, robust, suv or none")
