"""MIP pictures: coronal maximum-intensity projections (MIPs), the way PET is looked at, drawn by matplotlib.

One figure (:func:`mip_figure`) serves the epoch previews of training, ``ldt infer``'s previews and the
study's Figure 2: a row of MIPs on one intensity window (0 to the 98th percentile of the reference
panel's MIP, or of the last one's: organs readable, the hottest (bladder) saturating) in inverted grey
(dark = active, as nuclear-medicine viewers show MIPs) with a colour bar in the image's units, each
panel titled with its whole-volume PSNR/SSIM against the reference where there is one; as in the
paper's Figure 2, a box on every panel around the region where the panels differ most, shown magnified
in a row of zoomed insets; and a row of difference maps (each panel's MIP minus the reference's, blue
below, red above).
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Colour-bar labels: what the values of a picture are.
BQML = "activity concentration (Bq/mL)"
SUV = "SUV (body weight)"
INPUT_UNITS = "activity (the input file's units)"
_DICOM_UNITS = {"BQML": BQML, "GML": "SUV (g/mL)", "CNTS": "counts", "PROPCNTS": "proportional counts",
                "NONE": "no units (DICOM Units NONE)"}
ZOOM_COLOUR = "tab:orange"
ZOOM_MIN = 32  # pixels: a smaller MIP is shown whole, without an inset
ZOOM_FRACTION = 0.3  # side of the zoomed square, of the MIP's shorter side
WINDOW_PERCENTILE = 98.0  # the window's top, of the reference MIP: organs readable, the bladder saturates


@dataclass(frozen=True)
class Panel:
    """One picture of a MIP figure: its label, its 2D MIP (rows head to feet) and, where there is a
    reference, its whole-volume PSNR (dB) and SSIM against it."""

    label: str
    image: np.ndarray
    psnr: float | None = None
    ssim: float | None = None


def mip(volume: torch.Tensor, axis: int = 1) -> np.ndarray:
    """Coronal MIP of a ``[X, Y, Z]`` (RAS) volume: max over Y, returned as rows=Z (head up), cols=X."""
    projected = volume.detach().float().amax(dim=axis).cpu().numpy()  # [X, Z]
    return np.flipud(projected.T)


def ras_mip(volume: torch.Tensor, affine: np.ndarray) -> np.ndarray:
    """Coronal MIP of a ``[I, J, K]`` (or ``[1, I, J, K]``) volume in any voxel order, read through ``affine``.

    The voxel axes are permuted and flipped to RAS+ first (views, no copy), so the MIP is coronal with
    the head up whatever order the file stores (LPS DICOM, oblique or transposed NIfTI).
    """
    import nibabel as nib

    data = volume.detach().float().cpu().numpy()
    if data.ndim == 4:
        data = data[0]
    ras = nib.orientations.apply_orientation(data, nib.orientations.io_orientation(affine))
    return np.flipud(ras.max(axis=1).T)


def subject_units(subject: Mapping[str, Any]) -> tuple[float, str]:
    """For a normalised training subject: the factor back to its data's units, and their label.

    Data normalised as SUV are shown in SUV; otherwise the normalisation is undone and the values are the
    source's activity in Bq/mL (what sources provide, ``lowdose_toolkit.records``).
    """
    if subject.get("norm_method") == "suv":
        return 1.0, SUV
    return float(subject.get("scale", 1.0)), BQML


def input_units(path: str | Path) -> str:
    """The colour-bar label of an input file's values: a DICOM series' ``Units``, a NIfTI's ``aux_file``
    (``ldt simulate`` writes ``Bq/mL`` there), else :data:`INPUT_UNITS`."""
    path = Path(path)
    try:
        if path.is_dir():
            import pydicom

            from lowdose_toolkit.data.io import dicom_files
            from lowdose_toolkit.errors import DataError

            try:  # the series' own files, not a DICOMDIR or notes beside them
                files = [Path(f) for f in dicom_files(path)]
            except DataError:
                files = sorted(p for p in path.iterdir() if p.is_file())
            for file in files:
                try:
                    ds = pydicom.dcmread(file, stop_before_pixels=True, specific_tags=["Units", "Modality"])
                except Exception:  # noqa: BLE001 - not a DICOM file: try the next one
                    continue
                if "Units" not in ds and ds.get("Modality") != "PT":  # a DICOMDIR
                    continue
                units = str(getattr(ds, "Units", "")).strip().upper()
                return _DICOM_UNITS.get(units, f"DICOM Units {units}" if units else INPUT_UNITS)
            return INPUT_UNITS
        import nibabel as nib

        aux = nib.load(path).header.get("aux_file")
        text = aux.item().decode(errors="replace").strip() if aux is not None else ""
        return BQML if text.lower() == "bq/ml" else (f"activity ({text})" if text else INPUT_UNITS)
    except Exception:  # noqa: BLE001 - a label is never worth failing a preview for
        return INPUT_UNITS


def volume_panels(volumes: Sequence[tuple[str, torch.Tensor]], reference: int | None = None, factor: float = 1.0,
                  ssim_range: str = "challenge", known: Mapping[str, Mapping[str, float]] | None = None
                  ) -> list[Panel]:
    """Panels of ``[X, Y, Z]`` (RAS) volumes: MIPs times ``factor`` (to the display units) and, against
    ``volumes[reference]``, each one's whole-volume PSNR/SSIM (``known`` gives those already computed)."""
    from lowdose_toolkit.evaluation.metrics import compute_all

    known = known or {}
    ref = volumes[reference][1] if reference is not None else None
    panels = []
    for i, (label, volume) in enumerate(volumes):
        psnr = ssim = None
        if ref is not None and i != reference:
            m = known.get(label) or compute_all(ref, volume, ssim_range=ssim_range)  # type: ignore[arg-type]
            psnr, ssim = float(m["psnr"]), float(m["ssim"])
        panels.append(Panel(label, mip(volume) * factor, psnr, ssim))
    return panels


def zoom_box(score: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left ``(row, col)`` of the ``size`` x ``size`` window of ``score`` with the largest sum."""
    h, w = score.shape
    size = max(1, min(size, h, w))
    integral = np.pad(np.nan_to_num(score, nan=0.0).astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = (integral[size:, size:] - integral[:-size, size:] - integral[size:, :-size] + integral[:-size, :-size])
    row, col = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(row), int(col)


def _wrap(text: str, width: int) -> str:
    return textwrap.fill(text, width, break_on_hyphens=False, break_long_words=False)


def _title(panel: Panel, reference: bool) -> str:
    label = _wrap(panel.label, 22)
    if reference:
        return f"{label}\n(reference)"
    if panel.psnr is not None and panel.ssim is not None:
        return f"{label}\nPSNR {panel.psnr:.2f} dB\nSSIM {panel.ssim:.4f}"
    return label


def mip_figure(panels: Sequence[Panel], title: str = "", units: str = INPUT_UNITS, reference: int | None = None,
               difference_to: int | None = None, difference_label: str = "", zoom: bool = True) -> Figure:
    """The MIP figure of ``panels`` (see the module docstring); returned, not saved (:func:`save_mips_png`).

    Args:
        panels: The pictures, left to right.
        title: The figure's title.
        units: Colour-bar label of the values (:data:`BQML`, :data:`SUV`, ...).
        reference: Index of the reference panel (the full-dose image); it sets the window.
        difference_to: Index of the panel the difference row subtracts (default: ``reference``); None
            and no reference: no difference row.
        difference_label: Colour-bar label of the difference row (default ``panel − <its label>``).
        zoom: Mark the region where the panels differ most as shown (or the most active one) on every
            panel and show it magnified in a row of insets (MIPs of at least :data:`ZOOM_MIN` pixels).
    """
    from matplotlib.patches import Rectangle

    from lowdose_toolkit.core.figures import new_figure, plain, styled

    if not panels:
        raise ValueError("mip_figure: no panels")
    base = reference if difference_to is None else difference_to
    window = panels[reference if reference is not None else -1].image
    vmax = float(np.percentile(window, WINDOW_PERCENTILE)) or float(window.max()) or 1.0
    h, w = window.shape
    same = all(p.image.shape == (h, w) for p in panels)
    differences: dict[int, np.ndarray] = {}
    if base is not None and same:
        differences = {i: p.image - panels[base].image for i, p in enumerate(panels) if i != base}
    box = None
    if zoom and same and min(h, w) >= ZOOM_MIN:
        side = max(4, round(ZOOM_FRACTION * min(h, w)))
        shown = [np.clip(p.image, 0.0, vmax) for p in panels]  # where the panels differ as displayed
        score = sum((np.abs(s - shown[base]) for s in shown), np.zeros((h, w))) if differences else shown[-1]
        box = (*zoom_box(score, side), side)

    aspect = h / w
    n = len(panels)
    heights = [aspect, *([1.0] if box else []), *([aspect] if differences else [])]
    panel_w = float(np.clip(3.6 / aspect, 1.3, 2.3))
    title_h = 0.55 if reference is not None else 0.3
    size = (n * panel_w + 1.4, sum(panel_w * r + title_h for r in heights) + 0.8)
    with styled():
        figure = new_figure(*size)
        grid = figure.subplots(len(heights), n, squeeze=False, gridspec_kw={"height_ratios": heights})
        for ax in grid.flat:
            ax.set_axis_off()
        image = None
        for i, panel in enumerate(panels):
            image = grid[0, i].imshow(panel.image, cmap="gray_r", vmin=0.0, vmax=vmax, interpolation="nearest")
            grid[0, i].set_title(plain(_title(panel, i == reference)))
        figure.colorbar(image, ax=list(grid[0]), shrink=0.85, label=plain(units), pad=0.01)
        if box is not None:
            r0, c0, side = box
            for i, panel in enumerate(panels):
                grid[0, i].add_patch(Rectangle((c0 - 0.5, r0 - 0.5), side, side, fill=False, edgecolor=ZOOM_COLOUR,
                                               lw=1.2))
                inset: Axes = grid[1, i]
                inset.set_axis_on()
                image = inset.imshow(panel.image[r0:r0 + side, c0:c0 + side], cmap="gray_r", vmin=0.0, vmax=vmax,
                                     interpolation="nearest")
                inset.set_xticks([])
                inset.set_yticks([])
                for spine in inset.spines.values():
                    spine.set_edgecolor(ZOOM_COLOUR)
                    spine.set_linewidth(1.5)
                inset.set_title(f"zoomed inset (×{w / side:.1f})", fontsize=8)
            figure.colorbar(image, ax=list(grid[1]), shrink=0.85, pad=0.01, label=plain(_unit_symbol(units)))
        if differences:
            row = grid[-1]
            limit = max(float(np.percentile(np.abs(d), 99.5)) for d in differences.values())
            limit = limit or max(float(np.abs(d).max()) for d in differences.values()) or 1.0
            for i, difference in differences.items():
                image = row[i].imshow(difference, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
                row[i].set_title(plain(_wrap(f"{panels[i].label} − {panels[base].label}", 24)))
            label = difference_label or f"panel − {panels[base].label}"
            figure.colorbar(image, ax=list(row), shrink=0.85, pad=0.01, label=plain(f"{label} ({_unit_symbol(units)})"))
        if title:
            figure.suptitle(plain(title), fontsize=10, fontweight="bold")
        top = f"{vmax:,.0f}" if vmax >= 100 else f"{vmax:.3g}"
        note = f"coronal MIPs, window 0–{top} {_unit_symbol(units)} (hotter voxels saturate)"
        if reference is not None:
            note += f"; PSNR/SSIM: whole volume against {panels[reference].label}"
        if box is not None:
            note += "; orange box: the zoomed region, where the panels differ most"
        figure.supxlabel(plain(_wrap(note, max(40, int(size[0] * 15)))), fontsize=7.5)
    return figure


def _unit_symbol(units: str) -> str:
    """``Bq/mL`` from ``activity concentration (Bq/mL)``; the label itself when it has no parenthesis."""
    if units == SUV:
        return "SUV"
    if units.endswith(")") and "(" in units:
        return units[units.rindex("(") + 1:-1]
    return units


def save_mips_png(panels: Sequence[Panel], path: str | Path, **options: Any) -> Path:
    """Draw :func:`mip_figure` (``options`` are its keyword arguments) and write it as a PNG atomically."""
    from lowdose_toolkit.core.figures import save_png

    return save_png(mip_figure(panels, **options), path)
