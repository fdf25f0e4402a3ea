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

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lowdose_toolkit.errors import DataError

BODY_FRACTION = 0.05
QUANTILE = 0.99
LEGACY_QUANTILE = 0.999  # checkpoints without a recorded quantile were trained with this
_MAX_SAMPLES = 2_000_000
# Body weight (g) / injected activity (Bq): a mouse on 20 GBq to 500 kg on 1 MBq (ldt prepare's header bounds).
SUV_FACTOR_RANGE = (5e-10, 0.5)
SUV_HOW = ("give it with --suv-factor X (X = body weight in g / injected activity in Bq), a manifest's suv_factor "
           "column, or a JSON sidecar {sidecar} holding {{\"suv_factor\": X}}")


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


def check_suv_factor(value: object, where: str) -> float:
    """``value`` as a plausible SUV factor (g/Bq), else a DataError naming ``where`` and the expected size."""
    try:
        factor = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        factor = math.nan
    lo, hi = SUV_FACTOR_RANGE
    if isinstance(value, bool) or not lo <= factor <= hi:
        raise DataError(f"{where}: suv_factor {value!r} is not a plausible body weight (g) / injected activity (Bq) "
                        f"(about 2e-4 for 70 kg and 370 MBq; {lo:g} to {hi:g}); correct it")
    return factor


def sidecar(image: str | os.PathLike[str]) -> Path:
    """The JSON sidecar of an image: ``scan.json`` beside ``scan.nii.gz`` (or beside a DICOM folder ``scan``)."""
    from lowdose_toolkit.data.naming import nifti_stem

    image = Path(image)
    return image.with_name(f"{nifti_stem(image)}.json")


def suv_factor_of(image: str | os.PathLike[str], given: str | os.PathLike[str] | None = None
                  ) -> tuple[float | None, str]:
    """The SUV factor an image carries, and where it came from (or why there is none).

    Looked for in order: the JSON sidecar's ``suv_factor`` (:func:`sidecar`, beside the image as
    ``given`` first, then beside the file it links to), then a DICOM PET series' header
    (:func:`lowdose_toolkit.data.prepare.suv_from_dicom`). Returns ``(factor, source)`` or
    ``(None, reason)``. A sidecar that is not JSON or whose factor is implausible, and a DICOM header
    whose values cannot be true, are a DataError naming the file.
    """
    image = Path(image)
    places = [Path(given), image] if given is not None else [image]
    for place in dict.fromkeys(places):
        side = sidecar(place)
        if not side.is_file():
            continue
        try:
            meta = json.loads(side.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise DataError(f"{side}: not a readable JSON sidecar ({exc}); fix it or remove it") from exc
        if isinstance(meta, dict) and "suv_factor" in meta:
            return check_suv_factor(meta["suv_factor"], str(side)), f"sidecar {side}"
    if image.is_dir():
        from lowdose_toolkit.data.prepare import suv_from_dicom

        info = suv_from_dicom(image)
        if info.get("factor"):
            return check_suv_factor(info["factor"], f"{image / info['file']}"), f"DICOM header {info['file']}"
        return None, f"its DICOM header gives none: {info.get('reason', 'unknown reason')}"
    return None, f"no sidecar {sidecar(places[0]).name} with a suv_factor"
