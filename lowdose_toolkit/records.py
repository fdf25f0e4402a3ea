"""Subject records: what a data source hands to the pipeline.

A source never loads voxels itself; it returns file records, so that validation, normalisation and
patch sampling are the same for every source (phantom, nifti, uldp, third-party).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FULL = "full"  # the `drf` value of a full-dose row in a manifest (lowdose_toolkit.data.manifest)


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


def __getattr__(name: str) -> Any:
    """``write_manifest`` moved to :mod:`lowdose_toolkit.data.manifest`; the old import keeps working."""
    if name == "write_manifest":
        from lowdose_toolkit.data.manifest import write_manifest

        return write_manifest
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
