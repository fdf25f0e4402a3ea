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
empty and ``prepare.json`` says why.
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

from lowdose_toolkit.errors import DataError
from lowdose_toolkit.manifest import write_manifest
from lowdose_toolkit.naming import dose_filename
from lowdose_toolkit.records import FULL, SubjectRecord

TOOL = "ldt prepare uldp"
SUV_FORMULA = "SUV = activity[Bq/mL] * weight[g] / decay-corrected dose[Bq]; suv_factor = weight[g] / dose[Bq]"
DOSE_FOLDER_HINT = "'Full_dose', '1-4 dose', '... DRF_4', '... normal'"
LOW_HINT = "folders named like '1-4 dose' or '... DRF_4'"

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
    text = str(value or "").strip().replace(".", "").replace("-", "")
    if len(text) < 8 or not text[:8].isdigit():
        return None
    return datetime(int(text[:4]), int(text[4:6]), int(text[6:8]))


def _parse_time(value: object) -> timedelta | None:
    text = str(value or "").strip().replace(":", "")
    if not text:
        return None
    main, _, frac = text.partition(".")
    if not main.isdigit() or len(main) not in (2, 4, 6):
        return None
    main = main.ljust(6, "0")
    micro = int((frac + "000000")[:6]) if frac.isdigit() else 0
    return timedelta(hours=int(main[:2]), minutes=int(main[2:4]), seconds=int(main[4:6]), microseconds=micro)


def _parse_datetime(value: object) -> datetime | None:
    text = str(value or "").strip()
    text = re.sub(r"[+-]\d{4}$", "", text) if len(text) > 14 else text  # drop a UTC offset
    date, time = _parse_date(text[:8]), _parse_time(text[8:] or "00")
    return date + time if date and time is not None else None


def _first_dicom(folder: Path):
    import pydicom

    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            return path, pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # not a DICOM file (DICOMDIR, notes...): try the next one
            continue
    return None, None


def suv_from_dicom(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Body-weight SUV factor of a PET series from its first file's header.

    Returns:
        A provenance dict: ``factor`` (g/Bq, or ``None`` with a ``reason``) and the inputs used
        (weight, dose, half-life, injection and scan times, decay correction, units).
    """
    folder = Path(folder)
    try:
        import pydicom  # noqa: F401
    except ImportError:
        return {"factor": None, "reason": "pydicom is not installed (pip install pydicom)"}
    path, ds = _first_dicom(folder)
    if ds is None:
        return {"factor": None, "reason": f"no readable DICOM file in {folder}"}
    info: dict[str, Any] = {"factor": None, "file": path.name}

    def fail(reason: str) -> dict[str, Any]:
        info["reason"] = reason
        return info

    units = str(ds.get("Units", "")).upper()
    info["units"] = units
    if units != "BQML":
        return fail(f"Units is {units or 'missing'!r}, not BQML")
    weight = _float(ds.get("PatientWeight"))
    info["weight_kg"] = weight
    if not weight or weight <= 0:
        return fail("PatientWeight is missing or 0")
    seq = ds.get("RadiopharmaceuticalInformationSequence")
    if not seq:
        return fail("RadiopharmaceuticalInformationSequence is missing")
    rph = seq[0]
    dose, half_life = _float(rph.get("RadionuclideTotalDose")), _float(rph.get("RadionuclideHalfLife"))
    info.update(injected_dose_bq=dose, half_life_s=half_life)
    if not dose or dose <= 0 or not half_life or half_life <= 0:
        return fail("RadionuclideTotalDose or RadionuclideHalfLife is missing or 0")
    decay = str(ds.get("DecayCorrection", "") or "START").upper()
    info["decay_correction"] = decay if "DecayCorrection" in ds else "START (assumed: tag missing)"
    if decay == "ADMIN":
        decayed = dose
        info["elapsed_s"] = 0.0
    else:
        series_dt = _dt(ds, "SeriesDate", "SeriesTime")
        acq_dt = _dt(ds, "AcquisitionDate", "AcquisitionTime")
        if decay == "NONE":
            scan, scan_source = acq_dt, "AcquisitionDate/Time"
        elif series_dt is not None and (acq_dt is None or series_dt <= acq_dt):
            scan, scan_source = series_dt, "SeriesDate/Time"
        else:
            scan, scan_source = acq_dt, "AcquisitionDate/Time"
        if scan is None:
            return fail("SeriesTime and AcquisitionTime are missing")
        inj = _parse_datetime(rph.get("RadiopharmaceuticalStartDateTime"))
        inj_source = "RadiopharmaceuticalStartDateTime"
        if inj is None:
            t = _parse_time(rph.get("RadiopharmaceuticalStartTime"))
            if t is None:
                return fail("RadiopharmaceuticalStartTime is missing")
            inj = datetime(scan.year, scan.month, scan.day) + t
            inj_source = "RadiopharmaceuticalStartTime (date of scan)"
            if inj > scan:  # injected the day before the scan
                inj -= timedelta(days=1)
                inj_source += ", previous day"
        elapsed = (scan - inj).total_seconds()
        info.update(
            injection_time=inj.isoformat(),
            injection_time_source=inj_source,
            scan_time=scan.isoformat(),
            scan_time_source=scan_source,
            elapsed_s=elapsed,
        )
        if elapsed < 0:
            return fail(f"injection time {inj.isoformat()} is after the scan start {scan.isoformat()}")
        decayed = dose * math.pow(2.0, -elapsed / half_life)
    info["decayed_dose_bq"] = decayed
    info["factor"] = weight * 1000.0 / decayed
    return info


def _float(value: object) -> float | None:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _dt(ds: Any, date_tag: str, time_tag: str) -> datetime | None:
    date, time = _parse_date(ds.get(date_tag)), _parse_time(ds.get(time_tag))
    if date is None:
        date = _parse_date(ds.get("StudyDate"))
    return date + time if date is not None and time is not None else None


def _series_uid(folder: Path) -> str | None:
    try:
        _, ds = _first_dicom(folder)
    except ImportError:
        return None
    if ds is None:
        return None
    return str(ds.get("SeriesInstanceUID", "")) or None


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
    from lowdose_toolkit.atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def prepare_uldp(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    drfs: Sequence[int] | None = None,
    skip_bad: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    """Convert the challenge's DICOM release to the ``nifti`` source's layout, once.

    Every series is read (rescale slope/intercept applied, float32), checked (NaN/Inf, empty, low-
    and full-dose on the same grid) and written as ``OUT/<subject>/full.nii.gz`` and
    ``drf_XXX.nii.gz`` with its RAS affine; ``OUT/manifest.csv`` gets each subject's SUV factor.
    ``OUT`` must be new, empty, or an earlier output of this command from the same ``SRC``: then
    subjects whose source series are unchanged are kept and the rest converted (resume).

    Args:
        src: The release folder (one folder per subject).
        out: Output folder; never inside ``src``.
        drfs: DRFs to convert (default: every dose found).
        skip_bad: Leave out a bad subject with a warning instead of stopping.
        progress: Called as ``progress(subject, index, total)`` before each subject.

    Returns:
        The manifest path.

    Example:
        >>> prepare_uldp("ULDP/Quadra", "data/quadra")  # doctest: +SKIP
        PosixPath('data/quadra/manifest.csv')
    """
    from lowdose_toolkit import __version__
    from lowdose_toolkit.io import ImageInfo, check_same_geometry, read_dicom_series, save_nifti, validate_image

    src, out = Path(src).resolve(), Path(out).resolve()
    if not src.is_dir():
        raise DataError(f"{src}: SRC is not a folder; give the release folder (one folder per subject)")
    if _is_inside(out, src):
        raise DataError(f"{out}: OUT is inside SRC {src}; nothing is written into source folders, choose another")
    prev = _previous(out, src)
    subjects = find_uldp_subjects(src)
    state: dict[str, Any] = {
        "tool": TOOL,
        "version": __version__,
        "source": str(src),
        "drfs": sorted(drfs) if drfs else None,
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
            and all((out / f["output"]).is_file() for f in old.get("files", {}).values())
        ):
            state["subjects"][sub.subject] = old
            continue
        done_before.pop(sub.subject, None)  # its files are about to be rewritten
        written: list[Path] = []
        entry: dict[str, Any] = {"folder": str(sub.folder), "style": sub.style, "signature": signature}
        files: dict[str, Any] = {}
        try:
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
                target = out / sub.subject / dose_filename(dose)
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
        entry["suv"] = suv_from_dicom(sub.doses[FULL])
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
    state["status"] = "complete"
    state["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    _write_json(out / "prepare.json", state)
    return manifest
