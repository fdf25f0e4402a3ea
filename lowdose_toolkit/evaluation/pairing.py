"""Pairing of prediction files with the full-dose references they are scored against.

Either side is a folder of NIfTI files (searched recursively) or a manifest CSV ``subject,drf,path``
(paths relative to the CSV; ``drf`` is ``full`` for a full-dose row), read by
:mod:`lowdose_toolkit.data.manifest`. The DRF of a file is read from its relative path: ``drf_100``,
``DRF-100``, ``_DRF100``, ``drf100`` or the challenge's ``1-100 dose``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lowdose_toolkit.data.manifest import read_manifest
from lowdose_toolkit.data.naming import is_nifti, strip_nifti_suffix
from lowdose_toolkit.errors import DataError, UserError

__all__ = ["Pair", "pair_by_filename", "parse_drf"]


_DRF_PATTERNS = (
    re.compile(r"(?<![a-z])drf[ _-]?(\d+)(?!\d)", re.IGNORECASE),
    re.compile(r"(?<!\d)1[ _-](\d+)[ _-]?dose", re.IGNORECASE),  # the challenge's "1-100 dose"
)
_FULL_PATTERN = re.compile(
    r"(?<![a-z0-9])(full[ _-]?dose|full|normal[ _-]?dose|normal|standard[ _-]?dose)(?![a-z0-9])", re.IGNORECASE
)


@dataclass(frozen=True)
class Pair:
    """A prediction and the full-dose reference it is scored against.

    Attributes:
        subject: Subject identifier.
        drf: Dose reduction factor of the low-dose input, ``None`` if unknown.
        method: Method name (``"Low-Dose"`` for the low-dose input itself).
        pred: Prediction (or low-dose input) NIfTI file.
        ref: Full-dose reference NIfTI file.
    """

    subject: str
    drf: int | None
    method: str
    pred: Path
    ref: Path


@dataclass(frozen=True)
class _Entry:
    subject: str
    drf: int | None  # None: full dose (manifest) or no DRF in the name (folder)
    path: Path
    name: str  # relative path in its folder, or "" for a manifest row
    full: bool = False


def parse_drf(name: str) -> int | None:
    """DRF written in a file name or relative path (``sub01_drf_100.nii.gz`` -> 100), else ``None``."""
    for pattern in _DRF_PATTERNS:
        found = {int(m.group(1)) for m in pattern.finditer(name)}
        if len(found) > 1:
            raise DataError(f"{name}: several DRFs {sorted(found)} in one name; keep one")
        if found:
            return found.pop()
    return None


def subject_of(name: str) -> str:
    """The name without extension, DRF and full-dose tokens; separators collapsed to ``_``."""
    stem = strip_nifti_suffix(name)
    for pattern in _DRF_PATTERNS:
        stem = pattern.sub(" ", stem)
    stem = _FULL_PATTERN.sub(" ", stem)
    return re.sub(r"[\W_]+", "_", stem).strip("_")


def _scan_folder(folder: Path) -> list[_Entry]:
    # Hidden files and folders are skipped: a killed writer's temporary files (.name.xxxx.tmp.nii.gz) are
    # not predictions.
    files = sorted(p for p in folder.rglob("*") if p.is_file() and is_nifti(p)
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise DataError(f"{folder}: no NIfTI files (*.nii, *.nii.gz) found, searched recursively")
    entries = []
    for p in files:
        rel = p.relative_to(folder).as_posix()
        entries.append(_Entry(subject_of(rel), parse_drf(rel), p, rel, bool(_FULL_PATTERN.search(rel))))
    return entries


def _manifest_entries(path: Path) -> list[_Entry]:
    """A manifest's rows (:func:`lowdose_toolkit.data.manifest.read_manifest`, lenient) as pairing entries."""
    return [_Entry(r.subject, None if r.full else r.drf, r.path, "", full=r.full) for r in read_manifest(path)]


def _entries(source: Path, side: str) -> tuple[list[_Entry], bool]:
    source = Path(source)
    if source.is_dir():
        return _scan_folder(source), False
    if source.is_file() and source.suffix.lower() == ".csv":
        return _manifest_entries(source), True
    if source.exists():
        raise UserError(f"{side} {source} is neither a folder of NIfTI files nor a manifest .csv")
    raise UserError(f"{side} {source} does not exist")


def pair_by_filename(pred_dir: str | Path, ref_dir: str | Path, method: str = "model") -> list[Pair]:
    """Pair predictions with full-dose references by file name, or by manifest rows.

    A prediction pairs with the reference of the same relative path if there is one, otherwise with
    the reference whose name, without DRF and full-dose tokens (``full``, ``full_dose``, ``normal``),
    is the prediction's without its DRF token: ``sub01_drf_100.nii.gz`` pairs with ``sub01.nii.gz``
    or ``sub01_full.nii.gz``. With manifests, rows pair on ``subject``; the reference side uses its
    ``full`` rows (a data set's manifest serves as ``ref`` and as the low-dose ``pred`` side alike).

    Args:
        pred_dir: Folder of predictions (or low-dose inputs), or a manifest CSV.
        ref_dir: Folder of full-dose references, or a manifest CSV.
        method: Method name given to every pair.

    Raises:
        DataError: If a prediction has no reference, a reference is ambiguous, or two predictions
            share a subject and DRF.
    """
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    preds, pred_is_manifest = _entries(pred_dir, "--pred")
    refs, ref_is_manifest = _entries(ref_dir, "--ref")
    if pred_is_manifest:
        preds = [e for e in preds if not e.full]
        if not preds:
            raise DataError(f"{pred_dir}: no low-dose or prediction rows (every row has drf 'full')")
    if ref_is_manifest and any(e.full for e in refs):
        refs = [e for e in refs if e.full]
    by_name = {e.name: e for e in refs if e.name}
    by_subject: dict[str, list[_Entry]] = {}
    for e in refs:
        by_subject.setdefault(e.subject.lower(), []).append(e)

    pairs: list[Pair] = []
    seen: dict[tuple[str, int | None], Path] = {}
    for e in preds:
        match = by_name.get(e.name) if e.name else None
        if match is None:
            candidates = by_subject.get(e.subject.lower(), [])
            if len(candidates) > 1 and not ref_is_manifest:
                candidates = [c for c in candidates if c.drf is None] or candidates
            if not candidates:
                known = ", ".join(sorted({r.subject for r in refs})[:8]) or "none"
                raise DataError(
                    f"no reference for {e.path} (subject {e.subject!r}) in {ref_dir}: expected the same relative "
                    f"name or a name that is {e.subject!r} once DRF/full-dose tokens are dropped; "
                    f"references found: {known}"
                )
            if len(candidates) > 1:
                names = ", ".join(str(c.path) for c in candidates)
                raise DataError(f"subject {e.subject!r} of {e.path} matches several references: {names}")
            match = candidates[0]
        key = (e.subject.lower(), e.drf)
        if key in seen:
            raise DataError(
                f"{seen[key]} and {e.path} are both subject {e.subject!r} at DRF {e.drf}; keep one or rename"
            )
        seen[key] = e.path
        pairs.append(Pair(e.subject, e.drf, method, e.path, match.path))
    return pairs
