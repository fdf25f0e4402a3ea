"""Aggregation of scored pairs per method and DRF, the pair evaluation's files and the summary table.

The files are ``results.json`` (written and read by :mod:`lowdose_toolkit.evaluation.results`), ``cases.csv``,
``summary.csv`` and ``summary.md``.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lowdose_toolkit.core.atomic import TEXT, atomic_path
from lowdose_toolkit.evaluation.results import CASES_CSV, METRICS
from lowdose_toolkit.evaluation.results import write_results as write_results_json

__all__ = ["aggregate", "print_summary", "summary_markdown", "write_results"]


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
    rows: Sequence[Mapping[str, Any]], out_dir: str | Path, settings: Mapping[str, Any] | None = None,
    failures: Sequence[Mapping[str, str]] = (),
    **extra: Any,
) -> dict[str, Path]:
    """Write ``results.json`` (:mod:`lowdose_toolkit.evaluation.results`, kind ``pairs``), ``cases.csv``,
    ``summary.csv`` and ``summary.md``.

    Every file is written atomically; ``extra`` are further facts for ``results.json`` (e.g. ``lesions``).
    Returns the paths by kind (``json``, ``cases``, ``summary``, ``md``).
    """
    out_dir = Path(out_dir)
    settings = dict(settings or {})
    if rows:
        settings.setdefault("ssim_range", rows[0]["ssim_range"])
        settings.setdefault("mask", bool(rows[0]["masked"]))
    summary = aggregate(rows)
    paths = {
        "json": write_results_json(out_dir, "pairs", rows, summary, settings, failures=list(failures), **extra),
        "cases": out_dir / CASES_CSV["pairs"],
        "summary": out_dir / "summary.csv",
        "md": out_dir / "summary.md",
    }
    summary_cols = ("method", "drf", "n", *(f"{m}_{s}" for m in METRICS for s in ("mean", "std")))
    _write_csv(paths["summary"], summary, summary_cols)
    with atomic_path(paths["md"]) as tmp:
        tmp.write_text(summary_markdown(summary, settings), **TEXT)
    return paths


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="", **TEXT) as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})


def _drf_label(drf: int | None) -> str:
    return "—" if drf is None else str(drf)


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
