"""The manifest CSV: one reader and one writer for every data set, prediction list and inference batch.

Format (docs/DATA.md): a header ``subject,drf,path[,suv_factor]`` and one row per image; ``drf`` is a
positive integer or ``full`` (any case) for the full-dose image; ``path`` is relative to the manifest's
folder unless absolute; ``suv_factor`` (Bq/mL -> SUV, optional) is one positive number per subject.
Cells are stripped; blank lines are skipped.

Always errors, naming the file, line, column and fix: a missing required column, an empty required
cell, a ``drf`` or ``suv_factor`` that is not a valid value. ``strict=True`` adds: an unknown column, a
second row for one subject and DRF, a file that does not exist. Lenient reading (the default) leaves
those to the caller, as ``ldt evaluate`` and ``ldt infer`` do.

Example:
    >>> rows = read_manifest("data/manifest.csv", strict=True)  # doctest: +SKIP
    >>> records, problems = manifest_records("data/manifest.csv", drfs=[4, 100])  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lowdose_toolkit.core.atomic import TEXT, atomic_path
from lowdose_toolkit.errors import DataError
from lowdose_toolkit.records import FULL, SubjectRecord

__all__ = ["COLUMNS", "REQUIRED", "ManifestRow", "manifest_records", "read_manifest", "write_manifest"]

REQUIRED = ("subject", "drf", "path")
COLUMNS = (*REQUIRED, "suv_factor")
_HEADER = "subject,drf,path[,suv_factor]"


@dataclass(frozen=True)
class ManifestRow:
    """One row of a manifest.

    Attributes:
        line: Line number in the file (the header is line 1).
        subject: Subject identifier (``""`` where the column is absent and not required).
        drf: Dose reduction factor, ``"full"`` for a full-dose row, ``None`` where the cell is empty.
        path: The image, relative paths joined to the manifest's folder.
        suv_factor: Bq/mL -> SUV factor, ``None`` when not given.
    """

    line: int
    subject: str
    drf: int | str | None
    path: Path
    suv_factor: float | None = None

    @property
    def full(self) -> bool:
        """Whether this is a full-dose row."""
        return self.drf == FULL


def _header(path: Path, columns: list[str], require: Sequence[str], strict: bool) -> None:
    missing = sorted(c for c in require if c not in columns)
    if missing:
        raise DataError(f"{path}: manifest lacks column(s) {missing} (header line 1 is {columns}); "
                        f"the header must be {_HEADER}")
    unknown = [c for c in columns if c not in COLUMNS]
    if strict and unknown:
        raise DataError(f"{path} line 1: unknown column {unknown[0]!r}; the columns are {_HEADER}: "
                        "rename or remove it (or read the manifest leniently)")


def _drf(path: Path, line: int, text: str) -> int | str | None:
    if not text:
        return None
    if text.lower() == FULL:
        return FULL
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise DataError(f"{path} line {line}: drf {text!r} is neither a positive integer nor 'full'; "
                    "write the dose reduction factor (4, 10, ...) or full")


def _suv(path: Path, line: int, text: str) -> float | None:
    """The row's SUV factor: empty is None, else the plausibility check ``ldt infer`` applies to any factor."""
    if not text:
        return None
    from lowdose_toolkit.data.normalize import check_suv_factor

    return check_suv_factor(text, f"{path} line {line}")


def _row(path: Path, line: int, cells: dict[str, str], require: Sequence[str]) -> ManifestRow:
    for column in require:
        if not cells.get(column):
            raise DataError(f"{path} line {line}: empty {column}; fill in the row's {'/'.join(require)}")
    rel = Path(cells["path"])
    return ManifestRow(line, cells.get("subject", ""), _drf(path, line, cells.get("drf", "")),
                       rel if rel.is_absolute() else path.parent / rel, _suv(path, line, cells.get("suv_factor", "")))


def _dose(drf: int | str | None) -> str:
    return "full dose" if drf == FULL else f"DRF {drf}"


def _check_strict(path: Path, rows: list[ManifestRow]) -> None:
    first: dict[tuple[str, int | str | None], int] = {}
    for row in rows:
        key = (row.subject, row.drf)
        if key in first:
            raise DataError(f"{path} line {row.line}: second row for subject {row.subject!r} drf {row.drf} "
                            f"(first at line {first[key]}); keep one")
        first[key] = row.line
        if not row.path.exists():
            raise DataError(f"{row.path}: file not found ({path} line {row.line}, column path, subject "
                            f"{row.subject!r}, {_dose(row.drf)}); fix the path")


def read_manifest(
    path: str | os.PathLike[str], *, strict: bool = False, require: Sequence[str] = REQUIRED
) -> list[ManifestRow]:
    """The rows of a manifest CSV (see the module docstring for what ``strict`` adds).

    Args:
        path: The CSV file.
        strict: Also reject unknown columns, duplicate (subject, drf) rows and missing files.
        require: Columns that must exist and be filled in every row (``path`` is always required).

    Raises:
        DataError: Naming the file, the line, the column and the fix.
    """
    path = Path(path)
    require = tuple(dict.fromkeys([*require, "path"]))
    try:
        with path.open(newline="", **TEXT) as fh:  # a path that is not UTF-8 reads back as written
            reader = csv.DictReader(fh)
            columns = [(c or "").strip() for c in reader.fieldnames or []]
            _header(path, columns, require, strict)
            raw = []
            for row in reader:
                if None in row and strict:
                    raise DataError(f"{path} line {reader.line_num}: more cells than the header's "
                                    f"{len(columns)} columns; remove the extra cells or quote a comma")
                raw.append((reader.line_num, {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: unreadable manifest ({exc}); check the file") from None
    rows = [_row(path, line, cells, require) for line, cells in raw if any(cells.values())]
    if strict:
        _check_strict(path, rows)
    return rows


def manifest_records(
    path: str | os.PathLike[str], drfs: Sequence[int] | None = None, *, strict: bool = False, source: str = "nifti"
) -> tuple[list[SubjectRecord], dict[str, str]]:
    """A manifest's subjects as records, sorted by subject, plus per-subject problems.

    Format errors (and, with ``strict``, any problem) raise :class:`DataError`. Problems that concern one
    subject (a missing file, no full-dose row, a requested DRF without a row) come back as
    ``{subject: message}`` so that a source may skip that subject. ``drfs=None`` takes every DRF listed.
    Record paths are absolute; ``meta`` is ``{"source": source, "manifest": path}``.
    """
    path = Path(path)
    subjects: dict[str, dict[int | str, ManifestRow]] = {}
    suv: dict[str, ManifestRow] = {}
    for row in read_manifest(path, strict=strict):
        files = subjects.setdefault(row.subject, {})
        if row.drf in files:
            raise DataError(f"{path} line {row.line}: second row for subject {row.subject!r} drf {row.drf} "
                            f"(first at line {files[row.drf].line}); keep one")
        files[row.drf] = row  # drf is required: never None here
        if row.suv_factor is not None:
            if row.subject in suv and suv[row.subject].suv_factor != row.suv_factor:
                first = suv[row.subject]
                raise DataError(f"{path} line {row.line}: suv_factor {row.suv_factor} differs from "
                                f"{first.suv_factor} given for subject {row.subject!r} at line {first.line}; "
                                "use one value")
            suv.setdefault(row.subject, row)
    if not subjects:
        raise DataError(f"{path}: lists no subjects; add rows {_HEADER}")
    records, problems = [], {}
    for subject, files in sorted(subjects.items()):
        found = sorted(d for d in files if d != FULL)
        wanted = list(drfs) if drfs else found
        problem = _subject_problem(path, subject, files, found, wanted)
        if problem:
            problems[subject] = problem
            continue
        factor = suv[subject].suv_factor if subject in suv else None
        records.append(SubjectRecord(subject, files[FULL].path.absolute(),
                                     {d: files[d].path.absolute() for d in wanted}, factor,
                                     {"source": source, "manifest": str(path)}))
    if strict and problems:
        raise DataError(problems[sorted(problems)[0]])
    return records, problems


def _subject_problem(path: Path, subject: str, files: dict, found: list[int], wanted: list[int]) -> str | None:
    if FULL not in files:
        return f"{path}: subject {subject!r} has no full-dose row (drf=full); add one"
    if not wanted:
        return f"{path}: subject {subject!r} has no low-dose row; add rows with drf 4, 10, ..."
    absent = [d for d in wanted if d not in files]
    if absent:
        return (f"{path}: subject {subject!r} has no DRF {absent[0]} row (has DRFs {found}); "
                f"add it or drop {absent[0]} from drfs")
    for d in [FULL, *wanted]:
        row = files[d]
        if not row.path.exists():
            return (f"{row.path}: file not found ({path} line {row.line}, subject {subject!r}, {_dose(d)}); "
                    "fix the path")
    return None


def write_manifest(records: Sequence[SubjectRecord], path: str | os.PathLike[str]) -> None:
    """Write records as a manifest CSV (``subject,drf,path,suv_factor``), paths relative to it, atomically."""
    path = Path(path)
    root = path.parent.resolve()
    rows: list[dict[str, str]] = []
    for rec in records:
        for drf, p in [(FULL, rec.full), *((str(d), p) for d, p in sorted(rec.low.items()))]:
            p = Path(p).resolve()
            rel = p.relative_to(root) if p.is_relative_to(root) else p
            suv = "" if rec.suv_factor is None else repr(rec.suv_factor)
            rows.append({"subject": rec.subject, "drf": drf, "path": rel.as_posix(), "suv_factor": suv})
    with atomic_path(path) as tmp, tmp.open("w", newline="", **TEXT) as fh:
        writer = csv.DictWriter(fh, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
