"""Subject records: what a data source hands to the pipeline.

A source never loads voxels itself; it returns file records, so that validation, normalisation and
patch sampling are the same for every source (phantom, nifti, uldp, third-party).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from lowdose_toolkit.atomic import atomic_path

FULL = "full"  # the `drf` value of a full-dose row in a manifest
MANIFEST_COLUMNS = ("subject", "drf", "path")


@dataclass(frozen=True)
class SubjectRecord:
    """One subject: a full-dose image and low-dose images keyed by dose reduction factor.

    Attributes:
        subject: Subject identifier, unique within a data set.
        full: Path of the full-dose (reference) image, activity in Bq/mL.
        low: Dose reduction factor -> path of the low-dose image of that DRF.
        suv_factor: Factor that turns Bq/mL into SUV (weight / decay-corrected dose), when known.
        meta: Free-form extra facts (scanner, source file), carried into reports.
    """

    subject: str
    full: Path
    low: dict[int, Path]
    suv_factor: float | None = None
    meta: dict[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"SubjectRecord({self.subject!r}, drfs={sorted(self.low)}, suv_factor={self.suv_factor})"


def write_manifest(records: list[SubjectRecord], path: Path) -> None:
    """Write records as a manifest CSV (`subject,drf,path[,suv_factor]`), paths relative to it, atomically."""
    path = Path(path)
    root = path.parent.resolve()
    rows: list[dict[str, str]] = []
    for rec in records:
        items = [(FULL, rec.full)] + [(str(d), p) for d, p in sorted(rec.low.items())]
        for drf, p in items:
            p = Path(p).resolve()
            rel = p.relative_to(root) if p.is_relative_to(root) else p
            row = {"subject": rec.subject, "drf": drf, "path": rel.as_posix()}
            row["suv_factor"] = "" if rec.suv_factor is None else repr(rec.suv_factor)
            rows.append(row)
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*MANIFEST_COLUMNS, "suv_factor"])
        writer.writeheader()
        writer.writerows(rows)
