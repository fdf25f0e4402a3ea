"""Results files: one writer and one reader for a run's test evaluation, a pair evaluation and the
classical references.

``results.json`` (format 1) holds everything; a per-case CSV beside it is for people and spreadsheets::

    {"format": 1, "kind": "run" | "pairs" | "classical",
     "settings": {"ssim_range": "challenge" | "standard", "mask": false[, "mask_threshold": 0.01]},
     "cases": [{"method", "subject", "drf", "psnr", "ssim", "nrmse", "ssim_range", "masked"
                [, "rmse", "ssim_data_range", "pred", "ref"]}, ...],
     "summary": [{"method", "drf", "n", "psnr_mean", "psnr_std", ...}, ...],
     ... the kind's own facts: a run's method, checkpoint, epoch, test_subjects[, dose_head];
         the classical references' gaussian_sigma_vox}

Non-finite numbers are written as the strings ``"inf"``/``"nan"`` (strict JSON that ``float`` reads).
Files without ``"format"`` are read too: ``ldt evaluate``'s ``{settings, cases, summary}`` and a run's or
the classical references' ``{method, ssim_range[, settings], summary}`` whose cases are in the
``results.csv`` beside it.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowdose_toolkit.core.atomic import TEXT, atomic_path
from lowdose_toolkit.errors import DataError, UserError

__all__ = ["FORMAT", "KINDS", "RESULTS_NAME", "Results", "load_results", "read_cases_csv", "read_results",
           "write_cases_csv", "write_results"]  # fmt: skip

FORMAT = 1
RESULTS_NAME = "results.json"
KINDS = ("run", "pairs", "classical")
CASES_CSV = {"run": "results.csv", "pairs": "cases.csv", "classical": "results.csv"}
METRICS = ("psnr", "ssim", "nrmse")
CASE_KEYS = ("method", "subject", "drf", *METRICS, "ssim_range", "masked")
CSV_COLUMNS = ("method", "subject", "drf", *METRICS, "rmse", "ssim_range", "ssim_data_range", "masked", "pred", "ref")
_OPTIONAL_FLOATS = ("rmse", "ssim_data_range")
_DOC_KEYS = ("format", "kind", "settings", "cases", "summary")


@dataclass(frozen=True)
class Results:
    """One results file, read.

    Attributes:
        kind: ``"run"``, ``"pairs"`` or ``"classical"``.
        settings: ``ssim_range``, ``mask`` (and ``mask_threshold`` when masked).
        cases: Per-case rows, typed (``drf`` an int or ``None``; metrics floats, NRMSE a fraction).
        summary: Per (method, DRF) means and standard deviations as written.
        extra: The kind's own facts (a run's ``checkpoint``, ``dose_head`` ...).
        format: The file's format; 0 for a file written before the ``"format"`` key.
    """

    kind: str
    settings: dict[str, Any]
    cases: list[dict[str, Any]]
    summary: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    format: int = FORMAT


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf", "nan": strict JSON that float() reads back
    return value


def write_cases_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Per-case rows as CSV, atomically: the columns of :data:`CSV_COLUMNS` that the rows have."""
    present = {k for row in rows for k in row} | set(CASE_KEYS)
    columns = [c for c in CSV_COLUMNS if c in present]
    with atomic_path(path) as tmp, tmp.open("w", newline="", **TEXT) as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})


def write_results(
    out_dir: str | Path,
    kind: str,
    cases: Sequence[Mapping[str, Any]],
    summary: Sequence[Mapping[str, Any]],
    settings: Mapping[str, Any],
    **extra: Any,
) -> Path:
    """Write ``results.json`` (format 1) and the kind's per-case CSV into ``out_dir``, atomically.

    Every case needs :data:`CASE_KEYS`; ``extra`` are the kind's own facts (JSON-serialisable).
    Returns the path of ``results.json``.
    """
    if kind not in KINDS:
        raise ValueError(f"results kind {kind!r}: use one of {', '.join(KINDS)}")
    clash = set(extra) & set(_DOC_KEYS)
    if clash:
        raise ValueError(f"results facts {sorted(clash)} clash with the file's own keys; rename them")
    for i, case in enumerate(cases):
        missing = [k for k in CASE_KEYS if k not in case]
        if missing:
            raise ValueError(f"results case {i} ({dict(case)}) lacks {missing}; every case needs {CASE_KEYS}")
    out_dir = Path(out_dir)
    doc = {"format": FORMAT, "kind": kind, "settings": dict(settings),
           "cases": [{k: _json_safe(v) for k, v in c.items()} for c in cases],
           "summary": [{k: _json_safe(v) for k, v in s.items()} for s in summary], **extra}
    path = out_dir / RESULTS_NAME
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", **TEXT)
    write_cases_csv(cases, out_dir / CASES_CSV[kind])  # last: its presence means the evaluation is complete
    return path


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "false", "1", "0"):
        raise ValueError(f"masked {value!r} is not true or false")
    return text in ("true", "1")


def _case(raw: Mapping[str, Any], source: Path) -> dict[str, Any]:
    """A case row with its types; every key of :data:`CASE_KEYS` is required."""
    try:
        missing = [k for k in CASE_KEYS if k not in raw or (raw[k] in (None, "") and k != "drf")]
        if missing:
            raise KeyError(", ".join(missing))
        drf = raw["drf"]
        row = {"method": str(raw["method"]), "subject": str(raw["subject"]),
               "drf": None if drf in (None, "", "None") else int(drf), **{k: float(raw[k]) for k in METRICS},
               "ssim_range": str(raw["ssim_range"]), "masked": _bool(raw["masked"])}
        row.update({k: float(raw[k]) for k in _OPTIONAL_FLOATS if raw.get(k) not in (None, "")})
        row.update({k: str(raw[k]) for k in ("pred", "ref") if raw.get(k) not in (None, "")})
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{source}: a result row is incomplete or malformed ({exc!r}): {dict(raw)}; "
                        "write it again with `ldt evaluate`") from None
    return row


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable results JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise DataError(f"{path}: not a results JSON (expected an object)")
    return doc


def _csv_rows(path: Path) -> list[dict[str, Any]]:
    try:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable per-case CSV ({exc})") from None
    if rows and "subject" not in rows[0]:
        raise DataError(f"{path}: not a per-case CSV (no 'subject' column); pass cases.csv or results.csv")
    return rows


def _filled(rows: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows of an older file or a hand-made CSV: an empty ``ssim_range``/``masked`` takes the file's setting."""
    fill = {"ssim_range": settings.get("ssim_range") or "challenge", "masked": bool(settings.get("mask", False))}
    return [{**row, **{k: v for k, v in fill.items() if row.get(k) in (None, "")}} for row in rows]


def _upgrade(doc: dict[str, Any], path: Path) -> dict[str, Any]:
    """A results.json written before the ``"format"`` key, in format 1's shape."""
    settings = dict(doc.get("settings") or {})
    settings.setdefault("ssim_range", doc.get("ssim_range") or "challenge")
    settings.setdefault("mask", False)
    extra = {k: v for k, v in doc.items() if k not in (*_DOC_KEYS, "ssim_range")}
    if isinstance(doc.get("cases"), list):
        kind, cases = "pairs", doc["cases"]
    else:
        beside = path.with_suffix(".csv")  # a run's (or the classical references') results.csv
        if not beside.is_file():
            raise DataError(f"{path}: no 'cases' list and no {beside.name} beside it; is this from `ldt evaluate`?")
        kind, cases = ("classical" if doc.get("method") == "classical" else "run"), _csv_rows(beside)
    return {**extra, "format": 0, "kind": kind, "settings": settings, "cases": _filled(cases, settings),
            "summary": doc.get("summary") or []}


def _summary_row(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: float(v) if isinstance(v, str) and k.endswith(("_mean", "_std")) else v for k, v in raw.items()}


def read_results(path: str | Path) -> Results:
    """Read a ``results.json`` of any kind, this format or an older shape.

    Raises:
        DataError: If the file is unreadable, of a newer format, or a case is incomplete.
    """
    path = Path(path)
    doc = _read_json(path)
    version = doc.get("format", 0)
    if version == 0:
        doc = _upgrade(doc, path)
    elif version != FORMAT:
        raise DataError(f"{path}: results format {version!r} is not one this ldt reads (up to {FORMAT}); "
                        "upgrade lowdose-toolkit")
    kind, settings, cases = doc.get("kind"), doc.get("settings"), doc.get("cases")
    if kind not in KINDS or not isinstance(settings, dict) or not isinstance(cases, list):
        raise DataError(f"{path}: format {version} needs kind (one of {', '.join(KINDS)}), settings and a cases "
                        f"list; got kind {kind!r}; write it again with `ldt evaluate`")
    extra = {k: v for k, v in doc.items() if k not in _DOC_KEYS}
    return Results(kind, settings, [_case(c, path) for c in cases],
                   [_summary_row(s) for s in doc.get("summary") or []], extra, version)


def read_cases_csv(path: str | Path) -> list[dict[str, Any]]:
    """Per-case rows of a CSV (``cases.csv``, a run's ``results.csv``, or one made by hand).

    Empty ``ssim_range``/``masked`` cells (older files) take the settings of the ``results.json``
    beside the CSV, or the defaults (challenge range, unmasked) when there is none.
    """
    path = Path(path)
    sibling = path.with_name(RESULTS_NAME)
    settings = read_results(sibling).settings if sibling.is_file() else {}
    return [_case(row, path) for row in _filled(_csv_rows(path), settings)]


def _result_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        if (path / RESULTS_NAME).is_file():  # one evaluation (a run dir; its body_mask/ is a separate one)
            return [path / RESULTS_NAME]
        found = sorted(p for p in path.glob(f"*/{RESULTS_NAME}"))  # a folder of runs, e.g. a study
        if not found:
            raise UserError(f"{path}: no {RESULTS_NAME} here or one level below; run `ldt evaluate` first")
        return found
    raise UserError(f"{path} does not exist; pass results JSON/CSV files or run directories")


def _cases_of(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return read_results(path).cases
    if suffix == ".csv":
        return read_cases_csv(path)
    raise UserError(f"{path}: unknown results file; pass results.json, cases.csv or a run directory")


def lesion_summaries(inputs: Sequence[str | Path], kind: str = "lesions") -> list[dict[str, Any]]:
    """The lesion summaries (``lesions.summary`` of each ``results.json``, :mod:`lowdose_toolkit.evaluation.lesions`)
    of the inputs :func:`load_results` takes, the Low-Dose input's once per DRF (the same test volumes in every
    evaluation); inputs without lesions add nothing. ``kind="organs"``: the organ summaries likewise (the input's
    once per DRF and organ)."""
    from lowdose_toolkit.evaluation.paper import LOW_DOSE

    if kind not in ("lesions", "organs"):
        raise ValueError(f"lesion_summaries: kind {kind!r} is neither 'lesions' nor 'organs'")
    rows: list[dict[str, Any]] = []
    seen: set[Any] = set()
    for item in inputs:
        for path in _result_files(Path(item)):
            if path.suffix.lower() != ".json":
                path = path.with_name(RESULTS_NAME)  # a cases.csv beside its results.json
                if not path.is_file():
                    continue
            for entry in (read_results(path).extra.get(kind) or {}).get("summary", []):
                if entry["method"] == LOW_DOSE:
                    key = (entry["drf"], entry.get("organ"))
                    if key in seen:
                        continue
                    seen.add(key)
                rows.append(dict(entry))
    return rows


def _same_case(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return all(
        (math.isinf(a[k]) and a[k] == b[k]) or math.isclose(a[k], b[k], rel_tol=1e-5, abs_tol=1e-9) for k in METRICS
    )


def load_results(inputs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Per-case rows from results files (``results.json``, ``cases.csv``, ``results.csv``) or folders of them.

    A folder is one evaluation (its ``results.json``) or a folder of them (``*/results.json``, e.g. a
    study). A case (method, subject, DRF) found in several inputs with the same metrics, e.g. the
    Low-Dose rows of several evaluations, is kept once.

    Raises:
        UserError: If an input is missing or of an unknown kind, or a case has two different results.
    """
    rows: dict[tuple[str, str, int | None], tuple[dict[str, Any], Path]] = {}
    for item in inputs:
        for path in _result_files(Path(item)):
            for row in _cases_of(path):
                key = (row["method"], row["subject"], row["drf"])
                if key in rows and not _same_case(rows[key][0], row):
                    raise UserError(
                        f"{row['method']} / {row['subject']} / DRF {row['drf']} is in both {rows[key][1]} and "
                        f"{path} with different results; rename one method (ldt evaluate --method)"
                    )
                rows.setdefault(key, (row, path))
    if not rows:
        raise UserError(f"no results found in {', '.join(map(str, inputs))}")
    return [row for row, _ in rows.values()]
