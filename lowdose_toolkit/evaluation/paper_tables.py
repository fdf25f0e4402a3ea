"""The paper's Table I and Table II laid out with our results, the paper's figures beside ours."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowdose_toolkit.core.atomic import TEXT, atomic_path
from lowdose_toolkit.errors import UserError
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
from lowdose_toolkit.evaluation.results import METRICS
from lowdose_toolkit.evaluation.summary import (
    _drf_label,
    _drf_sort,
    _mean_pm_std,
    _settings_note,
    _write_csv,
    aggregate,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "PaperTable",
    "build_table_i",
    "build_table_ii",
    "print_table",
    "table_figure",
    "table_markdown",
    "write_table",
    "write_table_chart",
]


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
        tmp.write_text(table_markdown(table), **TEXT)
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


def table_figure(table: PaperTable) -> Figure:
    """The table as a chart: one panel per metric; per method (colour) our mean ± std (filled circle; a black
    edge where it is the best, the table's bold) beside the paper's figure (hollow diamond), at each DRF."""
    import numpy as np
    from matplotlib.lines import Line2D

    from lowdose_toolkit.core.figures import new_figure, plain, styled

    methods = list(dict.fromkeys(r.method for r in table.rows))
    colours = {m: "0.45" if m == LOW_DOSE else f"C{i % 10}" for i, m in enumerate(x for x in methods if x != LOW_DOSE)}
    colours[LOW_DOSE] = "0.45"
    groups = list(dict.fromkeys(r.drf for r in table.rows)) if table.show_drf else [None]
    slot = 0.8 / max(1, len(methods))
    with styled():
        figure = new_figure(4.3 * len(METRICS), 4.4)
        axes = figure.subplots(1, len(METRICS))
        for ax, metric in zip(axes, METRICS, strict=True):
            for row in table.rows:
                m = methods.index(row.method)
                x = (groups.index(row.drf) - 0.4 + slot * (m + 0.5)) if table.show_drf else float(m)
                colour = colours[row.method]
                if row.mean and not math.isnan(row.mean[metric]):
                    ax.errorbar(x, row.mean[metric], yerr=row.std[metric] if row.n > 1 else None, fmt="o", ms=6,
                                color=colour, ecolor=colour, capsize=2, zorder=3,
                                mec="black" if metric in row.best else colour, mew=1.6 if metric in row.best else 1)
                paper = row.paper_value(metric)
                if paper is not None:
                    ax.plot(x, paper, "D", ms=7, mfc="none", mec=colour, mew=1.3, zorder=2)
            ax.set_title(_HEADERS[metric])
            ax.grid(axis="y", alpha=0.3)
            if table.show_drf:
                ax.set_xticks(range(len(groups)), [f"DRF {_drf_label(g)}" for g in groups])
                for edge in np.arange(len(groups) - 1) + 0.5:
                    ax.axvline(edge, color="0.85", lw=0.8)
            else:
                ax.set_xticks(range(len(methods)), [plain(m) for m in methods], rotation=25, ha="right")
            ax.set_xlim(-0.5, (len(groups) if table.show_drf else len(methods)) - 0.5)
        handles = [Line2D([], [], ls="", marker="s", ms=8, color=colours[m], label=plain(m)) for m in methods]
        handles += [Line2D([], [], ls="", marker="o", color="0.3", label="ours: mean ± std (black edge: best)"),
                    Line2D([], [], ls="", marker="D", mfc="none", mec="0.3", label="paper")]
        figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), frameon=False)
        figure.suptitle(plain(table.title), fontsize=10, fontweight="bold")
    return figure


def write_table_chart(table: PaperTable, path_stem: str | Path) -> Path:
    """Write :func:`table_figure` as ``<stem>.png`` atomically; returns its path."""
    from lowdose_toolkit.core.figures import save_png

    stem = Path(path_stem)
    return save_png(table_figure(table), stem.with_name(stem.name + ".png"))
