"""The Ultra-Low-Dose PET challenge's DICOM release: find its series, compute SUV, convert to NIfTI.

Layout read (``SRC``): one folder per subject, inside it one folder per dose holding one DICOM series
(the dose folders may sit a few levels down). Dose folders are recognised by name, case-insensitively:

===========================  =====================================  ==========
style                        folder name contains                   dose
===========================  =====================================  ==========
Siemens Biograph Vision      ``Full_dose`` / ``full dose``          full dose
Quadra                       ``1-2 dose``, ``1-4 dose`` ... ``1-100 dose``  DRF 2 ... 100
United Imaging uEXPLORER     ``normal`` (or ``full`` as a word)     full dose
                             ``DRF_4``, ``DRF-10``, ``drf 100``      DRF 4 ... 100
===========================  =====================================  ==========

Other folders are ignored. ``prepare_uldp`` writes the ``nifti`` source's layout once
(``OUT/<subject>/full.nii.gz``, ``OUT/<subject>/drf_004.nii.gz`` ..., ``OUT/manifest.csv``) and a
``OUT/prepare.json`` with the provenance of every file and of every SUV factor.

SUV (body weight): ``SUV = activity[Bq/mL] * weight[g] / decay-corrected dose[Bq]``, so the
manifest's ``suv_factor`` is ``weight[g] / decayed dose[Bq]`` (g/Bq; 1 mL of tissue taken as 1 g).
The injected dose (``RadionuclideTotalDose``) is measured at the injection time
(``RadiopharmaceuticalStartDateTime``, else ``SeriesDate`` + ``RadiopharmaceuticalStartTime``):

* ``DecayCorrection = START`` (the usual case): the image is decay-corrected to the scan start, so the
  dose is decayed to it: ``dose * 2 ** (-(scan start - injection) / RadionuclideHalfLife)``. The scan
  start is ``SeriesDate/SeriesTime``, or ``AcquisitionDate/Time`` when that is earlier or the series
  time is missing (QIBA's vendor-neutral rule).
* ``ADMIN``: the image is already decay-corrected to the injection time; the dose is used as is.
* ``NONE``: the dose is decayed to ``AcquisitionDate/Time``.

Only ``Units = BQML`` images get a factor; otherwise (or with a header field missing) the factor is
empty and ``prepare.json`` says why. A header whose values cannot be true is an error for its subject
(``--skip-bad`` leaves it out, ``--no-suv`` converts without factors): an unparseable or zero date or
time, an injection after the scan start or more than ``MAX_DECAY_HALF_LIVES`` (5) half-lives before it,
a weight outside ``WEIGHT_RANGE_KG`` (0.01-500 kg), a dose outside ``DOSE_RANGE_BQ`` (1 MBq-20 GBq) or a
half-life outside ``HALF_LIFE_RANGE_S``.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from lowdose_toolkit.data.manifest import write_manifest
from lowdose_toolkit.data.naming import dose_filename
from lowdose_toolkit.errors import DataError
from lowdose_toolkit.records import FULL, SubjectRecord

TOOL = "ldt prepare uldp"
SUV_FORMULA = "SUV = activity[Bq/mL] * weight[g] / decay-corrected dose[Bq]; suv_factor = weight[g] / dose[Bq]"
DOSE_FOLDER_HINT = "'Full_dose', '1-4 dose', '... DRF_4', '... normal'"
LOW_HINT = "folders named like '1-4 dose' or '... DRF_4'"

# SUV plausibility: a header outside these bounds is an error for its series (each bound catches a unit slip).
MAX_DECAY_HALF_LIVES = 5.0  # scan start at most 5 half-lives after injection (F-18: 9.1 h; dose decayed to 1/32)
WEIGHT_RANGE_KG = (0.01, 500.0)  # a mouse to the heaviest patient; grams written as kg fall above
DOSE_RANGE_BQ = (1e6, 2e10)  # 1 MBq to 20 GBq; MBq, kBq or mCi written as Bq fall below
HALF_LIFE_RANGE_S = (60.0, 1e8)  # Rb-82 (76 s) to Ge-68 (271 days); hours written as s fall below
SUV_FIX = (
    "correct the DICOM header, or convert without SUV factors "
    "(`ldt prepare uldp --no-suv`; `suv: false` for the uldp source)"
)

_DRF_RE = re.compile(r"drf[\s_-]*0*(\d+)", re.IGNORECASE)
_QUADRA_RE = re.compile(r"(?<!\d)1\s*[-_/]\s*0*(\d+)\s*[-_]?\s*dose", re.IGNORECASE)
_FULL_RE = re.compile(r"full[\s_-]*dose|(?<![a-z])(?:normal|full)(?![a-z])", re.IGNORECASE)


def parse_dose_folder(name: str) -> int | str | None:
    """The dose a folder name stands for: a DRF (int), ``"full"``, or ``None`` if none.

    Example:
        >>> [parse_dose_folder(n) for n in ["1-20 dose", "Full_dose", "WB DRF_100", "Normal", "CT"]]
        [20, 'full', 100, 'full', None]
    """
    for pattern in (_DRF_RE, _QUADRA_RE):
        match = pattern.search(name)
        if match:
            drf = int(match.group(1))
            return drf if drf >= 1 else None
    return FULL if _FULL_RE.search(name) else None


def _dose_style(name: str) -> str:
    return "uexplorer" if _DRF_RE.search(name) or re.search("normal", name, re.I) else "quadra"


@dataclass
class UldpSubject:
    """One subject folder of the release.

    Attributes:
        subject: Subject name (its folder's name).
        folder: The subject folder.
        doses: ``"full"`` or DRF -> series folder.
        problems: One-line messages (two folders for one dose, no dose folder).
        style: ``"quadra"``, ``"uexplorer"`` or ``"mixed"``, from the folder names.
    """

    subject: str
    folder: Path
    doses: dict[int | str, Path] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    style: str = "unknown"

    def missing(self, drfs: Sequence[int] | None) -> str | None:
        """A one-line message if the full dose or a requested DRF is absent, else ``None``."""
        order = sorted(self.doses, key=lambda d: -1 if d == FULL else int(d))
        names = ", ".join(repr(self.doses[d].name) for d in order) or "none"
        if FULL not in self.doses:
            return (
                f"{self.folder}: subject {self.subject!r} has no full-dose series (dose folders: {names}); "
                "expected a folder named like 'Full_dose' or '... normal'"
            )
        for drf in drfs or []:
            if drf not in self.doses:
                return (
                    f"{self.folder}: subject {self.subject!r} has no DRF {drf} series (dose folders: {names}); "
                    f"expected a folder named like '1-{drf} dose' or '... DRF_{drf}', or drop {drf} from drfs"
                )
        return None


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _find_doses(subject: UldpSubject) -> None:
    for dirpath, dirnames, _ in os.walk(subject.folder):
        dirnames.sort()
        keep = []
        for name in dirnames:
            if name.startswith("."):
                continue
            dose = parse_dose_folder(name)
            if dose is None:
                keep.append(name)
                continue
            folder = Path(dirpath) / name
            if dose in subject.doses:
                what = "full dose" if dose == FULL else f"DRF {dose}"
                subject.problems.append(
                    f"{folder}: subject {subject.subject!r} has two {what} folders "
                    f"({subject.doses[dose]} and {folder}); keep one"
                )
            else:
                subject.doses[dose] = folder
        dirnames[:] = keep
    styles = {_dose_style(p.name) for d, p in subject.doses.items()}
    subject.style = styles.pop() if len(styles) == 1 else ("mixed" if styles else "unknown")
    if not subject.doses:
        subject.problems.append(
            f"{subject.folder}: subject {subject.subject!r} holds no dose folder; "
            f"expected folders named like {DOSE_FOLDER_HINT}"
        )


def find_uldp_subjects(root: str | os.PathLike[str]) -> list[UldpSubject]:
    """List the subjects of a release folder (or of one subject's folder), sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; give the folder holding one folder per subject")
    children = _subdirs(root)
    if any(parse_dose_folder(c.name) is not None for c in children):  # root is one subject
        subjects = [UldpSubject(root.name, root)]
    else:
        subjects = [UldpSubject(c.name, c) for c in children]
    if not subjects:
        raise DataError(
            f"{root}: empty; expected {root}/<subject>/<dose folder>/*.dcm with dose folders like {DOSE_FOLDER_HINT}"
        )
    for subject in subjects:
        _find_doses(subject)
    return subjects


# ------------------------------------------------------------------------------------------------ SUV


def _parse_date(value: object) -> datetime | None:
    """A DICOM date (``YYYYMMDD``, dots or dashes allowed), or ``None`` if it is no calendar date from 1900 on."""
    text = str(value or "").strip().replace(".", "").replace("-", "")
    if len(text) < 8 or not text[:8].isdigit():
        return None
    try:
        date = datetime(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:  # 00000000, month 13, day 32 ...
        return None
    return date if date.year >= 1900 else None


def _parse_time(value: object) -> timedelta | None:
    """A DICOM time (``HH[MM[SS[.ffffff]]]``, colons allowed), or ``None`` if it is not a time of day."""
    text = str(value or "").strip().replace(":", "")
    if not text:
        return None
    main, _, frac = text.partition(".")
    if not main.isdigit() or len(main) not in (2, 4, 6):
        return None
    main = main.ljust(6, "0")
    hours, minutes, seconds = int(main[:2]), int(main[2:4]), int(main[4:6])
    if hours > 23 or minutes > 59 or seconds > 60:  # 60: a leap second
        return None
    micro = int((frac + "000000")[:6]) if frac.isdigit() else 0
    return timedelta(hours=hours, minutes=minutes, seconds=seconds, microseconds=micro)


def _parse_datetime(value: object) -> datetime | None:
    text = str(value or "").strip()
    text = re.sub(r"[+-]\d{4}$", "", text) if len(text) > 14 else text  # drop a UTC offset
    date, time = _parse_date(text[:8]), _parse_time(text[8:] or "00")
    return date + time if date and time is not None else None


def _series_headers(folder: Path, rest: Sequence[str] = ()) -> list[tuple[Path, Any]]:
    """The headers of the files of ``folder``'s one DICOM series (the files the volume is read from, whatever
    else the folder holds: a DICOMDIR, notes): the first readable file's whole header, then only the tags
    ``rest`` of each other file (no other file read without them); ``[]`` when GDCM finds no one series."""
    import pydicom

    from lowdose_toolkit.data.io import dicom_files

    try:
        files = dicom_files(folder)
    except DataError:
        return []
    headers: list[tuple[Path, Any]] = []
    for name in files:
        if headers and not rest:
            break
        try:
            headers.append((Path(name), pydicom.dcmread(name, stop_before_pixels=True, force=True,
                                                         specific_tags=list(rest) if headers else None)))
        except Exception:  # noqa: BLE001 - a damaged file: the volume reader names it
            continue
    return headers


def _text(ds: Any, keyword: str) -> str:
    """An attribute's value as written (``""`` when absent or empty), even one pydicom cannot convert."""
    try:
        return str(ds.get(keyword) or "").strip()
    except Exception:  # noqa: BLE001 - pydicom raises converting a malformed value (e.g. DS 'abc')
        from pydicom.datadict import tag_for_keyword

        try:
            raw = ds.get_item(tag_for_keyword(keyword)).value
        except Exception:  # noqa: BLE001
            return "?"
        return (raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)).strip()


def _duration(seconds: float) -> str:
    seconds = abs(seconds)
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min"


class _Header:
    """Date, time and number attributes of one file: ``None`` when absent, a DataError when malformed."""

    def __init__(self, path: Path, ds: Any) -> None:
        self.path, self.ds = path, ds

    def bad(self, what: str) -> DataError:
        return DataError(f"{self.path}: {what}; {SUV_FIX}")

    def parsed(self, ds: Any, keyword: str, parse: Callable[[str], Any], kind: str) -> Any:
        raw = _text(ds, keyword)
        if not raw:
            return None
        value = parse(raw)
        if value is None:
            raise self.bad(f"{keyword} is {raw!r}, not a valid {kind}")
        return value

    def number(self, ds: Any, keyword: str, unit: str, bounds: tuple[float, float], hint: str) -> float | None:
        """A positive number within ``bounds``; ``None`` when absent or 0 (unknown, not an error)."""
        raw = _text(ds, keyword)
        value = _float(raw)
        if not raw or value == 0:
            return None
        if value is None or not math.isfinite(value):
            raise self.bad(f"{keyword} is {raw!r}, not a number ({unit})")
        if not bounds[0] <= value <= bounds[1]:
            raise self.bad(
                f"{keyword} is {raw!r} {unit}, outside the plausible {bounds[0]:g}-{bounds[1]:g} {unit}{hint}"
            )
        return value

    def when(self, date_tag: str, time_tag: str) -> datetime | None:
        date = self.parsed(self.ds, date_tag, _parse_date, "date (YYYYMMDD)")
        if date is None:
            date = self.parsed(self.ds, "StudyDate", _parse_date, "date (YYYYMMDD)")
        time = self.parsed(self.ds, time_tag, _parse_time, "time (HHMMSS)")
        return date + time if date is not None and time is not None else None


def suv_from_dicom(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Body-weight SUV factor of a PET series from its files' headers (the first's, and the earliest
    acquisition time over all of them).

    A header that lacks what SUV needs (``Units`` other than ``BQML``, no weight, dose, half-life
    or times) gives no factor, with a ``reason``. A header whose values cannot be true raises
    :class:`DataError` naming the file, the value and the fix: an unparseable or zero date or time,
    an injection after the scan start, a scan more than ``MAX_DECAY_HALF_LIVES`` half-lives after
    the injection, a weight outside ``WEIGHT_RANGE_KG`` or a dose outside ``DOSE_RANGE_BQ``.

    Returns:
        A provenance dict: ``factor`` (g/Bq, or ``None`` with a ``reason``) and the inputs used
        (weight, dose, half-life, injection and scan times, decay correction, units).
    """
    folder = Path(folder)
    try:
        import pydicom  # noqa: F401
    except ImportError:
        return {"factor": None, "reason": "pydicom is not installed (pip install pydicom)"}
    with warnings.catch_warnings():  # pydicom's "Invalid value for VR DA" lines: our error says more
        warnings.simplefilter("ignore", UserWarning)
        headers = _series_headers(folder, ["AcquisitionDate", "AcquisitionTime", "StudyDate"])
        if not headers:
            return {"factor": None, "reason": f"no readable DICOM series in {folder}"}
        return _suv(*headers[0], headers)


def _acquisitions(headers: Sequence[tuple[Path, Any]]) -> tuple[datetime, str] | None:
    """The earliest AcquisitionDate/Time over a series' files and the file that has it (a multi-bed scan's beds
    start at different times; QIBA's scan start is the first), ``None`` when no file has one."""
    times = [(when, path.name) for path, ds in headers
             if (when := _Header(path, ds).when("AcquisitionDate", "AcquisitionTime")) is not None]
    return min(times, key=lambda t: t[0]) if times else None  # the first in the series' order among equals


def _suv(path: Path, ds: Any, series: Sequence[tuple[Path, Any]] = ()) -> dict[str, Any]:
    """The SUV factor from ``path``'s header ``ds``, the scan start from the earliest acquisition time of the
    ``series``' headers (default: ``ds``'s own)."""
    info: dict[str, Any] = {"factor": None, "file": path.name}
    header = _Header(path, ds)

    def fail(reason: str) -> dict[str, Any]:
        info["reason"] = reason
        return info

    units = _text(ds, "Units").upper()
    info["units"] = units
    if units != "BQML":
        return fail(f"Units is {units or 'missing'!r}, not BQML")
    weight = header.number(ds, "PatientWeight", "kg", WEIGHT_RANGE_KG, " (grams written as kilograms?)")
    info["weight_kg"] = weight
    if weight is None:
        return fail("PatientWeight is missing or 0")
    seq = ds.get("RadiopharmaceuticalInformationSequence")
    if not seq:
        return fail("RadiopharmaceuticalInformationSequence is missing")
    rph = seq[0]
    dose = header.number(rph, "RadionuclideTotalDose", "Bq", DOSE_RANGE_BQ, " (MBq or mCi written as Bq?)")
    half_life = header.number(rph, "RadionuclideHalfLife", "s", HALF_LIFE_RANGE_S, "")
    info.update(injected_dose_bq=dose, half_life_s=half_life)
    if dose is None or half_life is None:
        return fail("RadionuclideTotalDose or RadionuclideHalfLife is missing or 0")
    decay = (_text(ds, "DecayCorrection") or "START").upper()
    info["decay_correction"] = decay if "DecayCorrection" in ds else "START (assumed: tag missing)"
    if decay == "ADMIN":
        decayed = dose
        info["elapsed_s"] = 0.0
    else:
        series_dt = header.when("SeriesDate", "SeriesTime")
        earliest = _acquisitions(series or [(path, ds)])
        acq_dt, acq_file = earliest if earliest is not None else (None, path.name)
        if decay == "NONE":
            scan, scan_source = acq_dt, f"AcquisitionDate/Time of {acq_file}"
        elif series_dt is not None and (acq_dt is None or series_dt <= acq_dt):
            scan, scan_source = series_dt, "SeriesDate/Time"
        else:
            scan, scan_source = acq_dt, f"AcquisitionDate/Time of {acq_file} (the series' earliest)"
        if scan is None:
            return fail("SeriesTime and AcquisitionTime are missing")
        inj = header.parsed(rph, "RadiopharmaceuticalStartDateTime", _parse_datetime, "date and time")
        inj_source = "RadiopharmaceuticalStartDateTime"
        if inj is None:
            t = header.parsed(rph, "RadiopharmaceuticalStartTime", _parse_time, "time (HHMMSS)")
            if t is None:
                return fail("RadiopharmaceuticalStartTime is missing")
            inj = datetime(scan.year, scan.month, scan.day) + t
            inj_source = "RadiopharmaceuticalStartTime on the scan's date"
            if inj > scan:  # injected the day before the scan
                inj -= timedelta(days=1)
                inj_source = "RadiopharmaceuticalStartTime, taken as the day before the scan (later than its time)"
        elapsed = (scan - inj).total_seconds()
        info.update(
            injection_time=inj.isoformat(),
            injection_time_source=inj_source,
            scan_time=scan.isoformat(),
            scan_time_source=scan_source,
            elapsed_s=elapsed,
        )
        when = f"the injection ({inj.isoformat()}, from {inj_source})"
        start = f"the scan start ({scan.isoformat()}, from {scan_source})"
        if elapsed < 0:
            raise header.bad(f"{when} is {_duration(elapsed)} after {start}")
        if elapsed > MAX_DECAY_HALF_LIVES * half_life:
            raise header.bad(
                f"{when} is {_duration(elapsed)} before {start}: {elapsed / half_life:.3g} half-lives of "
                f"{half_life:g} s, more than the {MAX_DECAY_HALF_LIVES:g} a PET scan allows"
            )
        decayed = dose * math.pow(2.0, -elapsed / half_life)
    info["decayed_dose_bq"] = decayed
    info["factor"] = weight * 1000.0 / decayed
    return info


def _float(value: object) -> float | None:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _series_uid(folder: Path) -> str | None:
    try:
        headers = _series_headers(folder)
    except ImportError:
        return None
    return str(headers[0][1].get("SeriesInstanceUID", "")) or None if headers else None


# --------------------------------------------------------------------------------------------- prepare


def _signature(folder: Path) -> dict[str, int]:
    stats = [p.stat() for p in folder.iterdir() if p.is_file()]
    return {
        "files": len(stats),
        "bytes": sum(s.st_size for s in stats),
        "mtime_ns": max((s.st_mtime_ns for s in stats), default=0),
    }


def _is_inside(child: Path, parent: Path) -> bool:
    return child == parent or child.is_relative_to(parent)


def _previous(out: Path, src: Path) -> dict[str, Any]:
    """Return the previous prepare.json of OUT, ``{}`` for an empty/new OUT; refuse anything else."""
    if not out.exists() or not any(out.iterdir()):
        return {}
    record = out / "prepare.json"
    fix = "choose an empty or new folder"
    try:
        prev = json.loads(record.read_text())
    except (OSError, ValueError):
        prev = None
    if not isinstance(prev, dict) or prev.get("tool") != TOOL:
        raise DataError(f"{out}: not empty and not an earlier `{TOOL}` output (no valid prepare.json); {fix}")
    if Path(prev.get("source", "")) != src:
        raise DataError(f"{out}: was prepared from {prev.get('source')!r}, not {str(src)!r}; {fix}")
    return prev


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from lowdose_toolkit.core.atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def prepare_uldp(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    drfs: Sequence[int] | None = None,
    skip_bad: bool = False,
    suv: bool = True,
    cache: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    """Convert the challenge's DICOM release to the ``nifti`` source's layout, once.

    Every series is checked (one PET series per folder, no missing or duplicate slices: see
    :func:`lowdose_toolkit.data.io.check_dicom_series`), read (rescale slope/intercept applied, float32),
    checked again (NaN/Inf, empty, low- and full-dose on the same grid) and written as
    ``OUT/<subject>/full.nii.gz`` and ``drf_XXX.nii.gz`` with its RAS affine; ``OUT/manifest.csv``
    gets each subject's SUV factor, whose header must be plausible (:func:`suv_from_dicom`).
    ``OUT`` must be new, empty, or an earlier output of this command from the same ``SRC``: then
    subjects whose source series are unchanged are kept and the rest converted (resume).

    Args:
        src: The release folder (one folder per subject).
        out: Output folder; never inside ``src``.
        drfs: DRFs to convert (default: every dose found).
        skip_bad: Leave out a bad subject (any problem with any of its series) with a warning
            instead of stopping.
        suv: Compute SUV factors; ``False`` leaves them empty (and the headers' dates unread).
        cache: Write uncompressed ``.nii`` files indexed as the cached layout (``OUT/.ldt-cache``,
            :mod:`lowdose_toolkit.data.cache`): training slices patches from them through memory maps.
        progress: Called as ``progress(subject, index, total)`` before each subject.

    Returns:
        The manifest path.

    Example:
        >>> prepare_uldp("ULDP/Quadra", "data/quadra")  # doctest: +SKIP
        PosixPath('data/quadra/manifest.csv')
    """
    from lowdose_toolkit import __version__
    from lowdose_toolkit.data.io import ImageInfo, check_same_geometry, read_dicom_series, save_nifti, validate_image

    src, out = Path(src).resolve(), Path(out).resolve()
    if not src.is_dir():
        raise DataError(f"{src}: SRC is not a folder; give the release folder (one folder per subject)")
    if _is_inside(out, src):
        raise DataError(f"{out}: OUT is inside SRC {src}; nothing is written into source folders, choose another")
    prev = _previous(out, src)
    subjects = find_uldp_subjects(src)
    suffix = ".nii" if cache else ".nii.gz"
    state: dict[str, Any] = {
        "tool": TOOL,
        "version": __version__,
        "source": str(src),
        "drfs": sorted(drfs) if drfs else None,
        "suv": suv,
        "cache": cache,
        "status": "incomplete",
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "suv_formula": SUV_FORMULA,
        "subjects": {},
        "skipped": {},
    }
    # Until the run completes, prepare.json keeps the earlier run's subjects too (for a resume).
    done_before: dict[str, Any] = dict(prev.get("subjects", {})) if prev else {}

    def persist() -> None:
        _write_json(out / "prepare.json", {**state, "subjects": {**done_before, **state["subjects"]}})

    out.mkdir(parents=True, exist_ok=True)
    persist()
    if prev.get("cache") and not cache:  # the index of the earlier run's .nii files (they are replaced)
        import shutil

        from lowdose_toolkit.data.cache import DEFAULT_DIR

        shutil.rmtree(out / DEFAULT_DIR, ignore_errors=True)

    def bad(subject: str, message: str) -> None:
        if not skip_bad:
            persist()
            raise DataError(message)
        warnings.warn(f"uldp: skipping subject {subject!r}: {message}", UserWarning, stacklevel=3)
        state["skipped"][subject] = message

    for index, sub in enumerate(subjects):
        if progress is not None:
            progress(sub.subject, index, len(subjects))
        problem = sub.problems[0] if sub.problems else sub.missing(drfs)
        if problem:
            bad(sub.subject, problem)
            continue
        doses = [FULL, *(sorted(drfs) if drfs else sorted(d for d in sub.doses if d != FULL))]
        if len(doses) == 1:
            bad(sub.subject, f"{sub.folder}: subject {sub.subject!r} has no low-dose series; expected {LOW_HINT}")
            continue
        signature = {str(d): _signature(sub.doses[d]) for d in doses}
        old = done_before.get(sub.subject)
        if (
            old
            and old.get("signature") == signature
            and old.get("suv_computed", True) == suv
            and all((out / f["output"]).is_file() and f["output"].endswith(suffix)
                    for f in old.get("files", {}).values())
        ):
            state["subjects"][sub.subject] = old
            continue
        done_before.pop(sub.subject, None)  # its files are about to be rewritten
        for f in (old or {}).get("files", {}).values():  # under another suffix (.nii vs .nii.gz) they would stay
            if not f["output"].endswith(suffix):
                (out / f["output"]).unlink(missing_ok=True)
        written: list[Path] = []
        entry: dict[str, Any] = {"folder": str(sub.folder), "style": sub.style, "signature": signature}
        files: dict[str, Any] = {}
        try:
            # The header first: a subject whose SUV header cannot be true is refused before any reading.
            entry["suv"] = suv_from_dicom(sub.doses[FULL]) if suv else {"factor": None, "reason": "--no-suv"}
            entry["suv_computed"] = suv
            full_info: ImageInfo | None = None
            for dose in doses:
                folder = sub.doses[dose]
                tensor, affine = read_dicom_series(folder)
                validate_image(folder, tensor)
                info = ImageInfo(folder, tuple(tensor.shape[1:]), 1, affine, "dicom", "float32")
                if full_info is None:
                    full_info = info
                else:
                    check_same_geometry(folder, info, sub.doses[FULL], full_info)
                target = out / sub.subject / dose_filename(dose, suffix)
                save_nifti(tensor, affine, target)
                written.append(target)
                del tensor
                files[str(dose)] = {
                    "source": str(folder.relative_to(src)),
                    "series_uid": _series_uid(folder),
                    "output": target.relative_to(out).as_posix(),
                    "shape": list(info.shape),
                    "spacing_mm": [round(s, 6) for s in info.spacing],
                }
        except DataError as exc:
            for p in written:
                p.unlink(missing_ok=True)
            bad(sub.subject, str(exc))
            continue
        entry["files"] = files
        entry["suv_factor"] = entry["suv"]["factor"]
        state["subjects"][sub.subject] = entry
        persist()

    records = []
    for name, entry in sorted(state["subjects"].items()):
        files = entry["files"]
        low = {int(d): out / f["output"] for d, f in files.items() if d != FULL}
        records.append(
            SubjectRecord(name, out / files[FULL]["output"], low, entry.get("suv_factor"), {"source": "uldp"})
        )
    if not records:
        persist()
        raise DataError(f"{src}: no subject could be converted ({len(state['skipped'])} skipped, see warnings)")
    manifest = out / "manifest.csv"
    write_manifest(records, manifest)
    if cache:
        from lowdose_toolkit.data.cache import DEFAULT_DIR, write_cache

        write_cache(records, out / DEFAULT_DIR, command=f"ldt cache {out}", manifest=False)
    state["status"] = "complete"
    state["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    _write_json(out / "prepare.json", state)
    return manifest
