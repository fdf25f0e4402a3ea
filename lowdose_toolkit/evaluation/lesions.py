"""Lesion quantification: how a method changes each lesion's SUVmean and SUVmax against the full dose.

Whole-volume PSNR is dominated by the body's background; a reader measures lesions. For every lesion (a
connected component of a lesion mask, 26-connected) and every image of it (the low-dose input, a
prediction) this module gives the relative bias of the lesion's mean and maximum activity against the
full-dose reference, in percent: ``100 * (image - reference) / reference``. The mean and the max are ratios of
activities, so they are the same in SUV and in Bq/mL. Noise raises a low-dose scan's SUVmax (a positive
bias that grows with the DRF); smoothing lowers it; a denoiser that is "never worse than its input" on lesions
has a mean ``|SUVmax bias|`` no larger than the input's.

Lesion masks: the phantom's organ label maps (``labels.nii.gz`` beside each simulated ``full.nii.gz``, lesion
label :data:`PHANTOM_LESION_LABEL`), or a folder of masks of one's own (``<subject>.nii.gz``, every
nonzero voxel lesion).

Example:
    >>> import numpy as np
    >>> ref = np.ones((8, 8, 8), np.float32); ref[2:4, 2:4, 2:4] = 5.0
    >>> mask = ref > 2
    >>> rows = lesion_rows(ref, {"Low-Dose": 1.1 * ref}, label_components(mask)[0], voxel_ml=0.216)
    >>> round(rows[0]["mean_bias_pct"], 1), round(rows[0]["max_bias_pct"], 1)
    (10.0, 10.0)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lowdose_toolkit.data.phantom import LABELS
from lowdose_toolkit.errors import DataError, UserError
from lowdose_toolkit.evaluation.paper import LOW_DOSE

PHANTOM_LESION_LABEL = next(k for k, name in LABELS.items() if name == "lesion")
PHANTOM = "phantom"
#: The per-lesion measures summarised per method and DRF (their mean, and the mean of their absolute values).
MEASURES = ("mean_bias_pct", "max_bias_pct")


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """``(components, n)``: each 26-connected component of ``mask`` numbered 1..n (0 elsewhere)."""
    from scipy import ndimage

    components, n = ndimage.label(np.asarray(mask, bool), structure=np.ones((3, 3, 3), bool))
    return components.astype(np.int32), int(n)


def lesion_rows(ref: np.ndarray, images: Mapping[str, np.ndarray], components: np.ndarray,
                voxel_ml: float) -> list[dict[str, Any]]:
    """One row per lesion and image: ``method, lesion, voxels, volume_ml, ref_mean, ref_max, mean, max,
    mean_bias_pct, max_bias_pct`` (activities in the arrays' units). A lesion whose reference mean is not
    positive has no relative bias and is left out."""
    ref = np.asarray(ref, np.float32)
    if components.shape != ref.shape:
        raise DataError(f"lesion mask is {components.shape} but the reference is {ref.shape}; masks must be on "
                        "the reference's grid")
    index = np.arange(1, int(components.max(initial=0)) + 1)
    if index.size == 0:
        return []
    from scipy import ndimage

    voxels = np.bincount(components.ravel(), minlength=index.size + 1)[1:]
    ref_mean = ndimage.mean(ref, components, index)
    ref_max = ndimage.maximum(ref, components, index)
    rows: list[dict[str, Any]] = []
    for method, image in images.items():
        image = np.asarray(image, np.float32)
        if image.shape != ref.shape:
            raise DataError(f"{method}: image is {image.shape} but the reference is {ref.shape}")
        means = ndimage.mean(image, components, index)
        maxes = ndimage.maximum(image, components, index)
        for k, lesion in enumerate(index):
            if not ref_mean[k] > 0:
                continue
            rows.append({"method": method, "lesion": int(lesion), "voxels": int(voxels[k]),
                         "volume_ml": round(float(voxels[k]) * voxel_ml, 3),
                         "ref_mean": float(ref_mean[k]), "ref_max": float(ref_max[k]),
                         "mean": float(means[k]), "max": float(maxes[k]),
                         "mean_bias_pct": 100.0 * (means[k] - ref_mean[k]) / ref_mean[k],
                         "max_bias_pct": 100.0 * (maxes[k] - ref_max[k]) / ref_max[k]})
    return rows


def summarize(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per ``(method, drf)``: the number of lesions and, for each of :data:`MEASURES`, the mean (signed bias),
    its standard deviation and the mean absolute value (``abs_...``), ordered by DRF then method."""
    groups: dict[tuple[str, int | None], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], row.get("drf")), []).append(row)
    out = []
    for (method, drf), members in groups.items():
        entry: dict[str, Any] = {"method": method, "drf": drf, "lesions": len(members)}
        for measure in MEASURES:
            v = np.array([r[measure] for r in members], np.float64)
            entry[measure] = float(v.mean())
            entry[f"{measure}_std"] = float(v.std(ddof=1)) if v.size > 1 else 0.0
            entry[f"abs_{measure}"] = float(np.abs(v).mean())
        out.append(entry)
    return ordered(out)


def ordered(summary: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Summary rows by DRF, the Low-Dose input first within each (the paper's layout), then by method."""
    return sorted((dict(s) for s in summary),
                  key=lambda e: (e["drf"] is None, e["drf"] or 0, e["method"] != LOW_DOSE, e["method"]))


def markdown(summary: list[Mapping[str, Any]]) -> str:
    """The lesion summary as a Markdown table (bias in percent of the full dose's value)."""
    lines = ["| DRF | Method | lesions | SUVmean bias (%) | mean abs (%) | SUVmax bias (%) | mean abs (%) |",
             "|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['drf'] if s['drf'] is not None else '—'} | {s['method']} | {s['lesions']} | "
                     f"{s['mean_bias_pct']:+.1f} ± {s['mean_bias_pct_std']:.1f} | {s['abs_mean_bias_pct']:.1f} | "
                     f"{s['max_bias_pct']:+.1f} ± {s['max_bias_pct_std']:.1f} | {s['abs_max_bias_pct']:.1f} |")
    return "\n".join(lines) + "\n"


def lesion_table(inputs: Iterable[str | Path]) -> str:
    """Table III (ours) as Markdown: the lesion summaries of the evaluations in ``inputs`` (run directories or
    results files; :func:`lowdose_toolkit.evaluation.results.lesion_summaries`); empty when none has lesions."""
    from lowdose_toolkit.evaluation.results import lesion_summaries

    rows = lesion_summaries(list(inputs))
    return markdown(ordered(rows)) if rows else ""


def print_summary(summary: list[Mapping[str, Any]], console: Any, title: str = "lesions") -> None:
    """The lesion summary as a rich table."""
    from rich.table import Table

    table = Table(title=title)
    for name in ("DRF", "Method", "lesions", "SUVmean bias %", "|SUVmean| %", "SUVmax bias %", "|SUVmax| %"):
        table.add_column(name, justify="left" if name == "Method" else "right")
    for s in summary:
        table.add_row(str(s["drf"] if s["drf"] is not None else "-"), s["method"], str(s["lesions"]),
                      f"{s['mean_bias_pct']:+.1f}", f"{s['abs_mean_bias_pct']:.1f}",
                      f"{s['max_bias_pct']:+.1f}", f"{s['abs_max_bias_pct']:.1f}")
    console.print(table)


class LesionMasks:
    """Where each subject's lesion mask is: ``phantom`` (the simulator's ``labels.nii.gz`` beside the subject's
    full-dose file, lesion label :data:`PHANTOM_LESION_LABEL`) or a folder of masks (``<subject>.nii.gz`` or
    ``.nii``, every nonzero voxel lesion). Masks are read once per subject and checked against the reference's
    grid (shape and affine)."""

    def __init__(self, spec: str | Path) -> None:
        self.spec = str(spec)
        self.folder = None if self.spec == PHANTOM else Path(spec)
        if self.folder is not None and not self.folder.is_dir():
            raise UserError(f"--lesions {spec}: not a folder; give a folder of lesion masks (<subject>.nii.gz), "
                            f"or '{PHANTOM}' for the simulator's own label maps")
        self._last: tuple[str, tuple[np.ndarray, int]] | None = None  # one subject's (pairs come by reference)

    def path(self, subject: str, full: Path) -> Path:
        if self.folder is None:
            path = Path(full).parent / "labels.nii.gz"
            if not path.is_file():
                raise DataError(f"{path}: no phantom label map beside {full} (--lesions {PHANTOM} reads the label "
                                "maps `ldt simulate` writes); give a folder of lesion masks instead")
            return path
        for name in (f"{subject}.nii.gz", f"{subject}.nii"):
            if (self.folder / name).is_file():
                return self.folder / name
        raise DataError(f"{self.folder}: no lesion mask for subject {subject!r} (looked for {subject}.nii.gz and "
                        f"{subject}.nii)")

    def components(self, subject: str, full: Path, shape: tuple[int, ...], affine: np.ndarray | None = None
                   ) -> tuple[np.ndarray, int]:
        """``(components, n)`` of ``subject``'s lesions on the reference's grid (the last subject's kept)."""
        if self._last is None or self._last[0] != subject:
            from lowdose_toolkit.data.io import load_array

            path = self.path(subject, full)
            tensor, mask_affine, _ = load_array(path, validate=False)
            data = tensor[0].numpy()
            if data.shape != tuple(shape):
                raise DataError(f"{path} is {data.shape} but {subject}'s reference is {tuple(shape)}; lesion masks "
                                "must be on the reference's grid")
            if affine is not None and not np.allclose(mask_affine, affine, atol=1e-3):
                raise DataError(f"{path} and {subject}'s reference {full} have different affines; resample the "
                                "mask onto the reference")
            mask = data == PHANTOM_LESION_LABEL if self.folder is None else data != 0
            self._last = (subject, label_components(mask))
        return self._last[1]


def auto_masks(recipe: Mapping[str, Any]) -> str | None:
    """The lesion masks a run's evaluation uses unless told: the phantom's own for a phantom-trained run."""
    return PHANTOM if recipe["data"]["source"].get("name") == "phantom" else None


def volume_cases(masks: LesionMasks, subject: str, drf: int | None, full: Path, ref: np.ndarray,
                 images: Mapping[str, np.ndarray], affine: np.ndarray) -> list[dict[str, Any]]:
    """:func:`lesion_rows` of one volume (``subject``'s lesions from ``masks``, checked against the reference
    ``full``'s grid), each row with its ``subject`` and ``drf``."""
    components, _ = masks.components(subject, full, tuple(ref.shape), affine)
    rows = lesion_rows(ref, images, components, voxel_ml(affine))
    return [{"subject": subject, "drf": drf, **row} for row in rows]


def voxel_ml(affine: np.ndarray) -> float:
    """The volume of one voxel of ``affine`` in mL."""
    return float(abs(np.linalg.det(np.asarray(affine, np.float64)[:3, :3]))) / 1000.0


CASES_CSV = "lesions.csv"
CASE_COLUMNS = ("method", "subject", "drf", "lesion", "voxels", "volume_ml", "ref_mean", "ref_max", "mean", "max",
                "mean_bias_pct", "max_bias_pct")


def write_cases(rows: Iterable[Mapping[str, Any]], path: Path) -> None:
    """Write the per-lesion rows as CSV, atomically."""
    import csv

    from lowdose_toolkit.core.atomic import atomic_path

    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(CASE_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in CASE_COLUMNS})
