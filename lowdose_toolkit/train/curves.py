"""``curves.png``: a run's training curves, redrawn after every epoch from its epoch records.

Three panels against the epoch: the training loss terms (log scale when they span a decade or more);
the validation PSNR per DRF, each beside its low-dose input's PSNR (dashed, same colour: the level the
model has to beat), with the best epoch marked; and the learning rate of each optimizer. Stage
boundaries of a multi-stage recipe are grey vertical lines.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _finite(value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


def _stages(ax: Axes, records: Sequence[Mapping[str, Any]]) -> None:
    """Grey vertical lines where the stage changes, labelled with the new stage's name."""
    for before, after in zip(records, records[1:], strict=False):
        if after.get("stage") != before.get("stage"):
            x = before["epoch"] + 0.5
            ax.axvline(x, color="0.6", lw=0.8, ls=":")
            ax.annotate(str(after.get("stage", "")), (x, 1.0), xycoords=("data", "axes fraction"), fontsize=7,
                        color="0.4", rotation=90, va="top", ha="right")


def curves_figure(records: Sequence[Mapping[str, Any]], title: str = "") -> Figure:
    """The curves of ``records`` (metrics.jsonl lines: ``epoch``, ``losses``, ``val``, ``lr``/``lrs``)."""
    from matplotlib.ticker import MaxNLocator

    from lowdose_toolkit.core.figures import new_figure, plain, styled

    records = sorted(records, key=lambda r: r["epoch"])
    epochs = [r["epoch"] for r in records]
    with styled():
        figure = new_figure(13.0, 3.9)
        loss_ax, psnr_ax, lr_ax = figure.subplots(1, 3, width_ratios=[1.0, 1.25, 0.75])

        terms = list(dict.fromkeys(k for r in records for k in r.get("losses", {})))
        seen: list[float] = []
        for term in terms:
            values = [_finite(r.get("losses", {}).get(term)) for r in records]
            total = term == "total"
            loss_ax.plot(epochs, values, marker="o", ms=3, lw=1.6 if total else 1.2, color="black" if total else None,
                         ls="--" if total else "-", label="total (weighted sum)" if total else plain(term))
            seen += [v for v in values if not math.isnan(v)]
        if seen and min(seen) > 0 and max(seen) / min(seen) >= 10:
            loss_ax.set_yscale("log")
        loss_ax.set_title("training losses (epoch means)")
        loss_ax.set_ylabel("loss")
        if terms:
            loss_ax.legend(loc="best")

        validated = [r for r in records if r.get("val")]
        drfs = sorted({int(d) for r in validated for d in r["val"].get("per_drf", {})})
        colours = [f"C{i % 10}" for i in range(len(drfs))]
        for drf, colour in zip(drfs, colours, strict=True):
            xs = [r["epoch"] for r in validated]
            model = [_finite(r["val"]["per_drf"].get(str(drf), {}).get("psnr")) for r in validated]
            low = [_finite(r["val"].get("low_dose", {}).get(str(drf), {}).get("psnr")) for r in validated]
            psnr_ax.plot(xs, model, marker="o", ms=3, color=colour, label=f"DRF {drf}: model")
            psnr_ax.plot(xs, low, ls="--", lw=1.0, color=colour, label=f"DRF {drf}: low-dose input")
        if validated and records[-1].get("best_epoch", -1) > 0:
            psnr_ax.axvline(records[-1]["best_epoch"], color="tab:green", lw=1.0, alpha=0.7,
                            label=f"best epoch ({records[-1]['best_epoch']})")
        psnr_ax.set_title("validation PSNR per DRF against the input's")
        psnr_ax.set_ylabel("PSNR (dB)")
        if drfs:
            psnr_ax.legend(loc="best", ncols=2 if len(drfs) > 2 else 1)
        else:
            psnr_ax.text(0.5, 0.5, "not validated yet", transform=psnr_ax.transAxes, ha="center", color="0.5")

        names = list(dict.fromkeys(k for r in records for k in (r.get("lrs") or {})))
        if names:
            for name in names:
                lr_ax.plot(epochs, [_finite((r.get("lrs") or {}).get(name)) for r in records], marker="o", ms=3,
                           label=plain(name))
            lr_ax.legend(loc="best")
        else:
            lr_ax.plot(epochs, [_finite(r.get("lr")) for r in records], marker="o", ms=3)
        if any(_finite(r.get("lr")) > 0 for r in records):
            lr_ax.set_yscale("log")
        lr_ax.set_title("learning rate")

        for ax in (loss_ax, psnr_ax, lr_ax):
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            _stages(ax, records)
        if title:
            figure.suptitle(plain(title), fontsize=10, fontweight="bold")
    return figure


def write_curves(path: str | Path, records: Sequence[Mapping[str, Any]], title: str = "") -> Path:
    """Draw :func:`curves_figure` and write it to ``path`` atomically."""
    from lowdose_toolkit.core.figures import save_png

    return save_png(curves_figure(records, title), path)
