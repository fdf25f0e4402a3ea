"""The ``uldp`` source: the Ultra-Low-Dose PET challenge's DICOM release, read in place.

Each subject folder holds one folder per dose, named Siemens-Quadra style (``Full_dose``,
``1-2 dose`` ... ``1-100 dose``) or uEXPLORER style (``... normal``, ``... DRF_4`` ...
``... DRF_100``); see :mod:`lowdose_toolkit.data.prepare` for the exact rules. Records point at the
series folders, and every epoch reads DICOM again, which is slow: run
``ldt prepare uldp SRC OUT`` once and train with ``source: nifti`` on ``OUT`` instead.
The SUV factor comes from the full-dose series' header (body weight over decayed dose).
"""

from __future__ import annotations

from pathlib import Path

from lowdose_toolkit import hookimpl
from lowdose_toolkit.errors import DataError
from lowdose_toolkit.records import FULL, SubjectRecord


class UldpSource:
    """Challenge DICOM release (Siemens Quadra or uEXPLORER folder names), read in place.

    Args:
        root: Release folder: one folder per subject, each holding one folder per dose.
        drfs: DRFs the recipe trains on (passed by the engine); ``None`` takes every DRF found.
        skip_bad: Leave out a bad subject with one warning line instead of stopping.
        validate: Read every series once before training (one PET series per folder, no missing or
            duplicate slices, NaN/Inf, empty, low/full grid); cached.
        suv: Compute each subject's SUV factor from the full-dose DICOM header (needs pydicom); a
            header whose dates, dose or weight cannot be true makes the subject bad. ``False``
            leaves SUV out.

    Example:
        >>> UldpSource("ULDP/Quadra", drfs=[4, 10, 20, 50, 100]).records()[:1]  # doctest: +SKIP
        [SubjectRecord('Anonymous_0412', drfs=[4, 10, 20, 50, 100], suv_factor=0.000213)]
    """

    def __init__(
        self,
        root: str,
        drfs: list[int] | None = None,
        skip_bad: bool = False,
        validate: bool = True,
        suv: bool = True,
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"{self.root}: data folder not found; check the source's root")
        if drfs is not None and any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in drfs):
            raise DataError(f"drfs {list(drfs)!r}: each DRF must be a positive integer")
        self.drfs = sorted(set(drfs)) if drfs is not None else None
        self.skip_bad = skip_bad
        self.validate = validate
        self.suv = suv
        self._records: list[SubjectRecord] | None = None

    def records(self) -> list[SubjectRecord]:
        """The usable subjects, sorted by subject; validated on the first call."""
        if self._records is None:
            from lowdose_toolkit.data.io import screen_records
            from lowdose_toolkit.data.prepare import LOW_HINT, find_uldp_subjects, suv_from_dicom

            candidates, problems = [], {}
            for sub in find_uldp_subjects(self.root):
                problem = sub.problems[0] if sub.problems else sub.missing(self.drfs)
                if problem:
                    problems[sub.subject] = problem
                    continue
                found = sorted(d for d in sub.doses if d != FULL)
                wanted = self.drfs or found
                if not wanted:
                    problems[sub.subject] = (
                        f"{sub.folder}: subject {sub.subject!r} has no low-dose series; expected {LOW_HINT}"
                    )
                    continue
                try:
                    suv = suv_from_dicom(sub.doses[FULL]) if self.suv else {"factor": None}
                except DataError as exc:  # a header that cannot be true: this subject is bad
                    problems[sub.subject] = str(exc)
                    continue
                meta = {"source": "uldp", "style": sub.style, "folder": str(sub.folder)}
                if suv.get("reason"):
                    meta["suv"] = str(suv["reason"])
                candidates.append(
                    SubjectRecord(
                        sub.subject,
                        sub.doses[FULL],
                        {d: sub.doses[d] for d in wanted},
                        suv["factor"],
                        meta,
                    )
                )
            self._records = screen_records(
                candidates, problems, skip_bad=self.skip_bad, validate=self.validate, source="uldp"
            )
        return list(self._records)

    def __repr__(self) -> str:
        return f"UldpSource({str(self.root)!r}, drfs={self.drfs})"


@hookimpl
def ldt_register_sources(register):
    """Register the ``uldp`` source."""
    register("uldp", UldpSource)
