"""Evaluation of predictions against references, aggregation and the paper's tables.

The flow: pair prediction files with full-dose references (:func:`pair_by_filename`), compute the
challenge's metrics per pair on the whole volume (:func:`evaluate_pairs`), aggregate per method and
DRF (:func:`aggregate`), write the results (:func:`write_results`) and lay them out like the paper's
Table I and Table II, with the paper's figures beside ours (:func:`build_table_i`,
:func:`build_table_ii`, :func:`write_table`, :func:`print_table`).

Pairing accepts, on either side, a folder of NIfTI files (searched recursively) or a manifest CSV
``subject,drf,path`` (paths relative to the CSV; ``drf`` is ``full`` for a full-dose row), read by
:mod:`lowdose_toolkit.data.manifest`. The DRF of a file is read from its relative path: ``drf_100``,
``DRF-100``, ``_DRF100``, ``drf100`` or the challenge's ``1-100 dose``.

Example:
    >>> pairs = pair_by_filename("preds/", "full_dose/", method="cg3dsrgan")  # doctest: +SKIP
    >>> rows = evaluate_pairs(pairs)  # doctest: +SKIP
    >>> write_results(rows, "eval/")  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lowdose_toolkit.core.atomic import atomic_path
from lowdose_toolkit.data.manifest import read_manifest
from lowdose_toolkit.data.naming import is_nifti, strip_nifti_suffix
from lowdose_toolkit.errors import DataError, UserError
from lowdose_toolkit.evaluation.paper import (
    LOW_DOSE,
    PAPER_DRFS,
    TABLE_I,
    TABLE_I_METHODS,
    TABLE_II,
    TABLE_II_DRF,
    TABLE_II_METHODS,
    Figures,
    canonical_method,
)
from lowdose_toolkit.evaluation.results import CASES_CSV, METRICS, RESULTS_NAME, load_results
from lowdose_toolkit.evaluation.results import write_results as write_results_json

__all__ = [
    "METRICS",
    "RESULTS_NAME",
    "Pair",
    "PaperTable",
    "aggregate",
    "build_table_i",
    "build_table_ii",
    "evaluate_pairs",
    "load_results",
    "pair_by_filename",
    "parse_drf",
    "print_summary",
    "print_table",
    "summary_markdown",
    "table_markdown",
    "write_results",
    "write_table",
]


_DRF_PATTERNS = (
    re.compile(r"(?<![a-z])drf[ _-]?(\d+)(?!\d)", re.IGNORECASE),
    re.compile(r"(?<!\d)1[ _-](\d+)[ _-]?dose", re.IGNORECASE),  # the challenge's "1-100 dose"
)
_FULL_PATTERN = re.compile(
    r"(?<![a-z0-9])(full[ _-]?dose|full|normal[ _-]?dose|normal|standard[ _-]?dose)(?![a-z0-9])", re.IGNORECASE
)


# ----------------------------------------------------------------------------------------------
# Pairing
# ----------------------------------------------------------------------------------------------


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


def _subject_of(name: str) -> str:
    """The name without extension, DRF and full-dose tokens; separators collapsed to ``_``."""
    stem = strip_nifti_suffix(name)
    for pattern in _DRF_PATTERNS:
        stem = pattern.sub(" ", stem)
    stem = _FULL_PATTERN.sub(" ", stem)
    return re.sub(r"[\W_]+", "_", stem).strip("_")


def _scan_folder(folder: Path) -> list[_Entry]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and is_nifti(p))
    if not files:
        raise DataError(f"{folder}: no NIfTI files (*.nii, *.nii.gz) found, searched recursively")
    entries = []
    for p in files:
        rel = p.relative_to(folder).as_posix()
        entries.append(_Entry(_subject_of(rel), parse_drf(rel), p, rel, bool(_FULL_PATTERN.search(rel))))
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


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


def _nifti_shape(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as exc:  # nibabel raises several types for unreadable files
        raise DataError(f"{path}: not a readable NIfTI file ({exc})") from None
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape, np.asarray(img.affine)


def _load(path: Path) -> np.ndarray:
    import nibabel as nib

    data = nib.load(str(path)).get_fdata(dtype=np.float32)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return data


def evaluate_pairs(
    pairs: Sequence[Pair],
    ssim_range: str = "challenge",
    mask: bool = False,
    mask_threshold: float = 0.01,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Compute PSNR, SSIM and NRMSE for every pair, on the whole volume as the challenge does.

    References are loaded once for all the pairs that share them.

    Args:
        pairs: Prediction/reference pairs.
        ssim_range: ``"challenge"`` (SSIM data range 2) or ``"standard"`` (1).
        mask: Restrict the metrics to a body mask of the reference
            (:func:`lowdose_toolkit.evaluation.metrics.body_mask` at ``mask_threshold``).
        mask_threshold: Fraction of the reference maximum for the body mask.
        progress: Show a rich progress bar.

    Returns:
        One dict per pair, in the pairs' order: ``method, subject, drf, psnr, ssim, nrmse`` (fraction),
        ``rmse, ssim_range, ssim_data_range, masked, pred, ref``.

    Raises:
        DataError: If a file is unreadable or a prediction's shape differs from its reference's.
    """
    import torch
    from rich.progress import Progress

    from lowdose_toolkit.evaluation.metrics import body_mask, check_ssim_range, compute_all

    check_ssim_range(ssim_range)
    shapes: dict[Path, tuple[tuple[int, ...], np.ndarray]] = {}
    for pair in pairs:
        for p in (pair.pred, pair.ref):
            if p not in shapes:
                shapes[p] = _nifti_shape(p)
        (ps, pa), (rs, ra) = shapes[pair.pred], shapes[pair.ref]
        if ps != rs:
            raise DataError(
                f"shape mismatch: prediction {pair.pred} is {ps} but reference {pair.ref} is {rs}; "
                "predictions must be on the reference's grid"
            )
        if not np.allclose(pa, ra, atol=1e-3):
            warnings.warn(f"{pair.pred} and {pair.ref} have different affines; are they aligned?", stacklevel=2)

    order = sorted(range(len(pairs)), key=lambda i: str(pairs[i].ref))
    rows: list[dict[str, Any] | None] = [None] * len(pairs)
    cached_ref: tuple[Path, torch.Tensor, torch.Tensor | None] | None = None
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("evaluating", total=len(pairs))
        for i in order:
            pair = pairs[i]
            bar.update(task, description=f"{pair.method} {pair.subject} DRF {pair.drf}")
            if cached_ref is None or cached_ref[0] != pair.ref:
                ref = torch.from_numpy(_load(pair.ref))
                cached_ref = (pair.ref, ref, body_mask(ref, mask_threshold) if mask else None)
            _, ref, ref_mask = cached_ref
            try:
                m = compute_all(ref, torch.from_numpy(_load(pair.pred)), ssim_range=ssim_range, mask=ref_mask)
            except DataError as exc:
                raise DataError(f"{pair.pred} vs {pair.ref}: {exc}") from None
            rows[i] = {
                "method": pair.method,
                "subject": pair.subject,
                "drf": pair.drf,
                **{k: m[k] for k in ("psnr", "ssim", "nrmse", "rmse", "ssim_range", "ssim_data_range", "masked")},
                "pred": str(pair.pred),
                "ref": str(pair.ref),
            }
            bar.advance(task)
    return [r for r in rows if r is not None]


# ----------------------------------------------------------------------------------------------
# Aggregation and the pair evaluation's files (results.json and its reader: lowdose_toolkit.evaluation.results)
# ----------------------------------------------------------------------------------------------


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    if np.isinf(a).any():
        return float(np.mean(a)), math.nan
    return float(np.mean(a)), float(np.std(a, ddof=1)) if len(a) > 1 else 0.0


def aggregate(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample standard deviation (ddof=1; 0 for one case) of each metric per (method, DRF).

    Returns:
        Dicts ``method, drf, n, psnr_mean, psnr_std, ssim_mean, ssim_std, nrmse_mean, nrmse_std``
        (NRMSE as a fraction), sorted by method then DRF.
    """
    groups: dict[tuple[str, int | None], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((str(row["method"]), row["drf"]), []).append(row)
    out = []
    for (method, drf), members in sorted(groups.items(), key=lambda kv: (kv[0][0], _drf_sort(kv[0][1]))):
        entry: dict[str, Any] = {"method": method, "drf": drf, "n": len(members)}
        for metric in METRICS:
            entry[f"{metric}_mean"], entry[f"{metric}_std"] = _mean_std([float(r[metric]) for r in members])
        out.append(entry)
    return out


def _drf_sort(drf: int | None) -> int:
    return drf if drf is not None else 1 << 30


def _fmt(value: float, digits: int) -> str:
    if math.isnan(value):
        return "—"
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    return f"{value:.{digits}f}"


def _mean_pm_std(mean: float, std: float, n: int, digits: int) -> str:
    if n < 2 or math.isnan(std):
        return _fmt(mean, digits)
    return f"{_fmt(mean, digits)} ± {_fmt(std, digits)}"


def summary_markdown(summary: Sequence[Mapping[str, Any]], settings: Mapping[str, Any] | None = None) -> str:
    """A Markdown table of aggregated results: method, DRF, n, PSNR, SSIM, NRMSE (%)."""
    lines = ["| Method | DRF | n | PSNR (dB) | SSIM | NRMSE (%) |", "|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(
            f"| {s['method']} | {_drf_label(s['drf'])} | {s['n']} "
            f"| {_mean_pm_std(s['psnr_mean'], s['psnr_std'], s['n'], 3)} "
            f"| {_mean_pm_std(s['ssim_mean'], s['ssim_std'], s['n'], 4)} "
            f"| {_mean_pm_std(100 * s['nrmse_mean'], 100 * s['nrmse_std'], s['n'], 3)} |"
        )
    if settings:
        lines += ["", _settings_note(settings)]
    return "\n".join(lines) + "\n"


def _settings_note(settings: Mapping[str, Any]) -> str:
    r = settings.get("ssim_range", "challenge")
    dr = {"challenge": 2, "standard": 1}.get(str(r), "?")
    region = "body mask" if settings.get("mask") else "whole volume"
    return f"Metrics on the {region}; SSIM with data range {dr} ({r}); mean ± std over subjects."


def write_results(
    rows: Sequence[Mapping[str, Any]], out_dir: str | Path, settings: Mapping[str, Any] | None = None
) -> dict[str, Path]:
    """Write ``results.json`` (:mod:`lowdose_toolkit.evaluation.results`, kind ``pairs``), ``cases.csv``,
    ``summary.csv`` and ``summary.md``.

    Every file is written atomically. Returns the paths by kind (``json``, ``cases``, ``summary``, ``md``).
    """
    out_dir = Path(out_dir)
    settings = dict(settings or {})
    if rows:
        settings.setdefault("ssim_range", rows[0]["ssim_range"])
        settings.setdefault("mask", bool(rows[0]["masked"]))
    summary = aggregate(rows)
    paths = {
        "json": write_results_json(out_dir, "pairs", rows, summary, settings),
        "cases": out_dir / CASES_CSV["pairs"],
        "summary": out_dir / "summary.csv",
        "md": out_dir / "summary.md",
    }
    summary_cols = ("method", "drf", "n", *(f"{m}_{s}" for m in METRICS for s in ("mean", "std")))
    _write_csv(paths["summary"], summary, summary_cols)
    with atomic_path(paths["md"]) as tmp:
        tmp.write_text(summary_markdown(summary, settings))
    return paths


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})


# ----------------------------------------------------------------------------------------------
# Paper tables
# ----------------------------------------------------------------------------------------------

# Display precision; "best" is decided on displayed values, so ties are all bold.
_DIGITS = {"psnr": 3, "ssim": 4, "nrmse": 3}
_HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "nrmse": False}
_HEADERS = {"psnr": "PSNR (dB)", "ssim": "SSIM", "nrmse": "NRMSE (%)"}


@dataclass
class TableRow:
    """One method at one DRF: our mean/std/n (``None`` if not evaluated) and the paper's figures."""

    drf: int | None
    method: str
    n: int = 0
    mean: dict[str, float] = field(default_factory=dict)  # psnr, ssim, nrmse in percent
    std: dict[str, float] = field(default_factory=dict)
    paper: Figures | None = None
    best: set[str] = field(default_factory=set)

    def paper_value(self, metric: str) -> float | None:
        if self.paper is None:
            return None
        return {"psnr": self.paper.psnr, "ssim": self.paper.ssim, "nrmse": self.paper.nrmse_pct}[metric]


@dataclass
class PaperTable:
    """A table laid out like one of the paper's, ours beside the paper's figures."""

    title: str
    rows: list[TableRow]
    notes: list[str]
    show_drf: bool = True

    def __repr__(self) -> str:
        return f"PaperTable({self.title!r}, rows={len(self.rows)})"


def _row(method: str, drf: int | None, summary: Mapping[tuple[str, int | None], Mapping[str, Any]],
         paper: Figures | None) -> TableRow:  # fmt: skip
    row = TableRow(drf=drf, method=method, paper=paper)
    s = summary.get((method, drf))
    if s is not None:
        row.n = int(s["n"])
        for metric in METRICS:
            scale = 100.0 if metric == "nrmse" else 1.0
            row.mean[metric] = scale * float(s[f"{metric}_mean"])
            row.std[metric] = scale * float(s[f"{metric}_std"])
    return row


def _mark_best(rows: Sequence[TableRow]) -> None:
    candidates = [r for r in rows if r.mean and r.method != LOW_DOSE]
    for metric in METRICS:
        values = [round(r.mean[metric], _DIGITS[metric]) for r in candidates if not math.isnan(r.mean[metric])]
        if not values:
            continue
        best = max(values) if _HIGHER_IS_BETTER[metric] else min(values)
        for r in candidates:
            if round(r.mean[metric], _DIGITS[metric]) == best:
                r.best.add(metric)


def _summary_index(rows: Iterable[Mapping[str, Any]]) -> tuple[dict[tuple[str, int | None], dict[str, Any]], dict]:
    rows = list(rows)
    ranges = {r["ssim_range"] for r in rows}
    masks = {bool(r["masked"]) for r in rows}
    if len(ranges) > 1 or len(masks) > 1:
        raise UserError(
            f"results mix SSIM ranges {sorted(ranges)} or masked/unmasked evaluations; "
            "re-evaluate with the same --ssim-range and --mask"
        )
    canonical = [{**r, "method": canonical_method(str(r["method"]))} for r in rows]
    index = {(s["method"], s["drf"]): s for s in aggregate(canonical)}
    settings = {"ssim_range": ranges.pop() if ranges else "challenge", "mask": masks.pop() if masks else False}
    return index, settings


def _notes(settings: Mapping[str, Any], extra: str) -> list[str]:
    return [
        _settings_note(settings) + " NRMSE in percent.",
        f"Bold: best of our methods per {extra} and metric (the Low-Dose input is not ranked, as in the paper).",
        "Paper: the CG-3DSRGAN paper's reported figures; — where the paper has none.",
    ]


#: Our ablation rows of Table II beside the paper's: the dose head's prediction conditioning ML-Net
#: (recipes/cg3dsrgan_guided.yaml) without and with Contextual-Net and the discriminator.
GUIDED_ABLATIONS = ("Baseline+CG (guided)", "CG-3DSRGAN (guided)")


def build_table_i(rows: Iterable[Mapping[str, Any]]) -> PaperTable:
    """Table I: methods x DRF with PSNR / SSIM / NRMSE (%), Low-Dose row first, paper's figures beside.

    Each DRF we evaluated gets the Low-Dose row and the paper's Table I methods (always, with the
    paper's figures), then our other methods evaluated at that DRF; Table II's ablation-only variants
    (Baseline, Baseline+CG, CG-3DGAN) are left to Table II.
    """
    index, settings = _summary_index(rows)
    drfs = sorted({drf for _, drf in index}, key=_drf_sort) or list(PAPER_DRFS)
    ours = {m for m, _ in index}
    ablation_only = (set(TABLE_II_METHODS) | set(GUIDED_ABLATIONS[:1])) - set(TABLE_I_METHODS)
    extra = sorted(ours - set(TABLE_I_METHODS) - ablation_only)
    table_rows: list[TableRow] = []
    for drf in drfs:
        methods = [*TABLE_I_METHODS, *(m for m in extra if (m, drf) in index)]
        group = [
            _row(method, drf, index, TABLE_I.get(drf, {}).get(method) if drf is not None else None)
            for method in methods
        ]
        _mark_best(group)
        table_rows += group
    return PaperTable("Table I: methods across dose reduction factors", table_rows, _notes(settings, "DRF"))


def build_table_ii(rows: Iterable[Mapping[str, Any]]) -> PaperTable:
    """Table II: the ablations at DRF 100 (Baseline, Baseline+CG, CG-3DGAN, CG-3DSRGAN), paper beside,
    then the guided rows (:data:`GUIDED_ABLATIONS`) where they were evaluated."""
    index, settings = _summary_index(rows)
    group = [_row(method, TABLE_II_DRF, index, TABLE_II[method]) for method in TABLE_II_METHODS]
    group += [_row(method, TABLE_II_DRF, index, None) for method in GUIDED_ABLATIONS
              if (method, TABLE_II_DRF) in index]
    _mark_best(group)
    return PaperTable(f"Table II: ablations at DRF {TABLE_II_DRF}", group, _notes(settings, "table"), show_drf=False)


def _drf_label(drf: int | None) -> str:
    return "—" if drf is None else str(drf)


def _cells(row: TableRow, bold: tuple[str, str]) -> list[str]:
    cells = [str(row.n) if row.mean else "—"]
    for metric in METRICS:
        if row.mean:
            text = _mean_pm_std(row.mean[metric], row.std[metric], row.n, _DIGITS[metric])
            if metric in row.best:
                text = f"{bold[0]}{text}{bold[1]}"
        else:
            text = "—"
        paper = row.paper_value(metric)
        cells += [text, "—" if paper is None else f"{paper:.3f}"]
    return cells


def _header(table: PaperTable) -> list[str]:
    head = (["DRF"] if table.show_drf else []) + ["Method", "n"]
    for metric in METRICS:
        head += [_HEADERS[metric], f"{_HEADERS[metric].split(' ')[0]} paper"]
    return head


def table_markdown(table: PaperTable) -> str:
    """The table as GitHub Markdown, best values in ``**bold**``."""
    head = _header(table)
    lines = [f"### {table.title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    previous: int | None | str = "start"
    for row in table.rows:
        lead = []
        if table.show_drf:
            lead = [_drf_label(row.drf) if row.drf != previous else ""]
            previous = row.drf
        lines.append("| " + " | ".join([*lead, row.method, *_cells(row, ("**", "**"))]) + " |")
    lines += ["", *(f"{note}  " for note in table.notes)]
    return "\n".join(lines).rstrip() + "\n"


def _csv_rows(table: PaperTable) -> list[dict[str, Any]]:
    out = []
    for row in table.rows:
        entry: dict[str, Any] = {"drf": row.drf, "method": row.method, "n": row.n}
        for metric in METRICS:
            name = "nrmse_pct" if metric == "nrmse" else metric
            entry[f"{name}_mean"] = row.mean.get(metric)
            entry[f"{name}_std"] = row.std.get(metric)
            entry[f"{name}_paper"] = row.paper_value(metric)
        entry["best"] = " ".join(m for m in METRICS if m in row.best)
        out.append(entry)
    return out


def write_table(table: PaperTable, path_stem: str | Path) -> tuple[Path, Path]:
    """Write ``<stem>.md`` and ``<stem>.csv`` atomically; returns both paths."""
    stem = Path(path_stem)
    md, csv_path = stem.with_name(stem.name + ".md"), stem.with_name(stem.name + ".csv")
    with atomic_path(md) as tmp:
        tmp.write_text(table_markdown(table))
    rows = _csv_rows(table)
    _write_csv(csv_path, rows, list(rows[0]) if rows else ["drf", "method", "n"])
    return md, csv_path


def print_table(table: PaperTable, console: Any = None) -> None:
    """Print the table with rich, best values in bold green."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    rt = Table(title=table.title, caption="\n".join(table.notes), caption_justify="left")
    for name in _header(table):
        justify = "left" if name in ("DRF", "Method") else "right"
        rt.add_column(name, justify=justify, style="dim" if "paper" in name else None)
    previous: int | None | str = "start"
    for row in table.rows:
        lead = []
        if table.show_drf:
            lead = [_drf_label(row.drf) if row.drf != previous else ""]
            if row.drf != previous and previous != "start":
                rt.add_section()
            previous = row.drf
        cells = [escape(c) for c in _cells(row, ("\x00", "\x01"))]
        cells = [c.replace("\x00", "[bold green]").replace("\x01", "[/]") for c in cells]
        rt.add_row(*lead, escape(row.method), *cells)
    console.print(rt)


def print_summary(summary: Sequence[Mapping[str, Any]], console: Any = None, title: str = "Evaluation") -> None:
    """Print aggregated results (method, DRF, n, PSNR, SSIM, NRMSE %) as a rich table."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    rt = Table(title=title)
    for name in ("Method", "DRF", "n", "PSNR (dB)", "SSIM", "NRMSE (%)"):
        rt.add_column(name, justify="left" if name == "Method" else "right")
    for s in summary:
        rt.add_row(
            escape(str(s["method"])),
            _drf_label(s["drf"]),
            str(s["n"]),
            _mean_pm_std(s["psnr_mean"], s["psnr_std"], s["n"], 3),
            _mean_pm_std(s["ssim_mean"], s["ssim_std"], s["n"], 4),
            _mean_pm_std(100 * s["nrmse_mean"], 100 * s["nrmse_std"], s["n"], 3),
        )
    console.print(rt)
