"""Lesion and organ quantification: how a method changes each lesion's and organ's SUVmean and SUVmax against
the full dose.

Whole-volume PSNR is dominated by the body's background; a reader measures lesions, and reads them against
reference organs (PERCIST's liver and blood pool; the challenge also scores the liver, heart and kidneys). For
every lesion (a connected component of a lesion mask, 26-connected), every organ, and every image of it (the
low-dose input, a prediction) this module gives the relative bias of the region's mean and maximum activity
against the full-dose reference, in percent: ``100 * (image - reference) / reference``. The mean and the max are
ratios of activities, so they are the same in SUV and in Bq/mL. Noise raises a low-dose scan's SUVmax (a
positive bias that grows with the DRF); smoothing lowers it; a denoiser that is "never worse than its input" on
lesions has a mean ``|SUVmax bias|`` no larger than the input's.

Masks (:class:`LesionMasks`): the phantom's label maps (``labels.nii.gz`` beside each simulated
``full.nii.gz``: lesion label :data:`PHANTOM_LESION_LABEL`, organs :data:`PHANTOM_ORGANS`), or a folder of masks
of one's own (``<subject>.nii.gz``): every nonzero voxel lesion, or label maps named by the folder's
``labels.json``.

Example:
    >>> import numpy as np
    >>> ref = np.ones((8, 8, 8), np.float32); ref[2:4, 2:4, 2:4] = 5.0
    >>> mask = ref > 2
    >>> rows = lesion_rows(ref, {"Low-Dose": 1.1 * ref}, label_components(mask)[0], voxel_ml=0.216)
    >>> round(rows[0]["mean_bias_pct"], 1), round(rows[0]["max_bias_pct"], 1)
    (10.0, 10.0)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lowdose_toolkit.data.phantom import LABELS
from lowdose_toolkit.errors import DataError, UserError
from lowdose_toolkit.evaluation.paper import LOW_DOSE

PHANTOM_LESION_LABEL = next(k for k, name in LABELS.items() if name == "lesion")
PHANTOM = "phantom"
#: The phantom organs whose uptake is scored: the challenge's targeted organs (liver, heart, kidneys), PERCIST's
#: reference regions (liver, blood pool) and the brain and spleen.
PHANTOM_ORGANS = ("liver", "blood_pool", "myocardium", "kidney", "spleen", "brain")
LABELS_JSON = "labels.json"
#: Organs a labels.json may name (the organ map is uint8).
MAX_ORGANS = 255
#: The per-lesion measures summarised per method and DRF (their mean, and the mean of their absolute values).
MEASURES = ("mean_bias_pct", "max_bias_pct")
#: Summarised where every row has it: the lesions' SUVpeak (organs have none).
PEAK_MEASURE = "peak_bias_pct"


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """``(components, n)``: each 26-connected component of ``mask`` numbered 1..n (0 elsewhere)."""
    from scipy import ndimage

    components, n = ndimage.label(np.asarray(mask, bool), structure=np.ones((3, 3, 3), bool))
    return components.astype(np.int32, copy=False), int(n)


def lesion_rows(ref: np.ndarray, images: Mapping[str, np.ndarray], components: np.ndarray,
                voxel_ml: float, spacing: Sequence[float] | None = None) -> list[dict[str, Any]]:
    """One row per lesion and image: ``method, lesion, voxels, volume_ml, ref_mean, ref_max, mean, max,
    mean_bias_pct, max_bias_pct`` (activities in the arrays' units) and, given the voxel ``spacing`` (mm), the
    SUVpeak's ``ref_peak, peak, peak_bias_pct`` (:mod:`lowdose_toolkit.evaluation.peak`). A lesion whose
    reference mean is not positive has no relative bias and is left out."""
    from lowdose_toolkit.evaluation.peak import peak_kernel

    kernel = None if spacing is None else peak_kernel(spacing)
    return _region_rows(ref, images, components, voxel_ml, "lesion", None, kernel)


def organ_rows(ref: np.ndarray, images: Mapping[str, np.ndarray], organs: np.ndarray, names: list[str],
               voxel_ml: float) -> list[dict[str, Any]]:
    """As :func:`lesion_rows`, one row per organ and image (``organ`` its name): ``organs`` numbers the voxels
    of ``names[k - 1]`` ``k`` (0 elsewhere)."""
    return _region_rows(ref, images, organs, voxel_ml, "organ", names)


def _region_rows(ref: np.ndarray, images: Mapping[str, np.ndarray], regions: np.ndarray, voxel_ml: float,
                 key: str, names: list[str] | None, kernel: np.ndarray | None = None) -> list[dict[str, Any]]:
    ref = np.asarray(ref, np.float32)
    if regions.shape != ref.shape:
        raise DataError(f"{key} mask is {regions.shape} but the reference is {ref.shape}; masks must be on "
                        "the reference's grid")
    from scipy import ndimage

    # Each region read inside its bounding box: no pass over the whole volume per region or image (a whole-body
    # volume is 87 M voxels; a lesion's box a few hundred). A label absent from the volume (a crop) has no row.
    boxes = [(k, box, regions[box] == k) for k, box in enumerate(ndimage.find_objects(regions), start=1)
             if box is not None]
    from lowdose_toolkit.evaluation.peak import region_peak

    refs = [(float(v.mean(dtype=np.float64)), float(v.max())) for v in (ref[box][inside] for _, box, inside in boxes)]
    ref_peaks = [None if kernel is None else region_peak(ref, box, inside, kernel) for _, box, inside in boxes]
    rows: list[dict[str, Any]] = []
    for method, image in images.items():
        image = np.asarray(image, np.float32)
        if image.shape != ref.shape:
            raise DataError(f"{method}: image is {image.shape} but the reference is {ref.shape}")
        for (k, box, inside), (ref_mean, ref_max), ref_peak in zip(boxes, refs, ref_peaks, strict=True):
            if not ref_mean > 0:
                continue
            values = image[box][inside]
            mean, top, voxels = float(values.mean(dtype=np.float64)), float(values.max()), int(inside.sum())
            row = {"method": method, key: k if names is None else names[k - 1],
                   "voxels": voxels, "volume_ml": round(voxels * voxel_ml, 3),
                   "ref_mean": ref_mean, "ref_max": ref_max, "mean": mean, "max": top,
                   "mean_bias_pct": 100.0 * (mean - ref_mean) / ref_mean,
                   "max_bias_pct": 100.0 * (top - ref_max) / ref_max}
            if ref_peak is not None and ref_peak > 0:
                peak = region_peak(image, box, inside, kernel)
                row.update(ref_peak=ref_peak, peak=peak, peak_bias_pct=100.0 * (peak - ref_peak) / ref_peak)
            rows.append(row)
    return rows


def summarize(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per ``(method, drf)``: the number of lesions and, for each of :data:`MEASURES`, the mean (signed bias),
    its standard deviation and the mean absolute value (``abs_...``), ordered by DRF then method. Organ rows
    (:func:`organ_summary`) are left out."""
    return ordered(_summaries([r for r in rows if "organ" not in r], ("method", "drf"), "lesions"))


def organ_summary(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per ``(method, drf, organ)`` over the subjects: ``subjects`` and, as :func:`summarize`, each of
    :data:`MEASURES`' mean, standard deviation and mean absolute value; by DRF, the input first, method, organ."""
    return ordered_organs(_summaries([r for r in rows if "organ" in r], ("method", "drf", "organ"), "subjects"))


def ordered_organs(summary: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Organ summary rows as :func:`ordered`, then by organ."""
    return sorted((dict(s) for s in summary), key=lambda e: (*_order(e), e["organ"]))


def _summaries(rows: list[Mapping[str, Any]], keys: tuple[str, ...], count: str) -> list[dict[str, Any]]:
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in keys), []).append(row)
    out = []
    for values, members in groups.items():
        entry: dict[str, Any] = {**dict(zip(keys, values, strict=True)), count: len(members)}
        for measure in (*MEASURES, PEAK_MEASURE):
            if measure == PEAK_MEASURE and not all(measure in r for r in members):
                continue
            v = np.array([r[measure] for r in members], np.float64)
            entry[measure] = float(v.mean())
            entry[f"{measure}_std"] = float(v.std(ddof=1)) if v.size > 1 else 0.0
            entry[f"abs_{measure}"] = float(np.abs(v).mean())
        out.append(entry)
    return out


def ordered(summary: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Summary rows by DRF, the Low-Dose input first within each (the paper's layout), then by method."""
    return sorted((dict(s) for s in summary), key=_order)


def _order(e: Mapping[str, Any]) -> tuple[Any, ...]:
    return e["drf"] is None, e["drf"] or 0, e["method"] != LOW_DOSE, e["method"]


def _lesion_measures(summary: Iterable[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """``(measure, label)`` of the lesion columns: SUVmean, SUVmax and, where every row has it, SUVpeak."""
    peak = all(PEAK_MEASURE in s for s in summary)
    return [("mean_bias_pct", "SUVmean"), ("max_bias_pct", "SUVmax")] + ([(PEAK_MEASURE, "SUVpeak")] if peak else [])


def markdown(summary: list[Mapping[str, Any]]) -> str:
    """The lesion summary as a Markdown table (bias in percent of the full dose's value)."""
    measures = _lesion_measures(summary)
    lines = ["| DRF | Method | lesions | " + " | ".join(f"{label} bias (%) | mean abs (%)" for _, label in measures)
             + " |", "|---|---|---|" + "---|---|" * len(measures)]
    for s in summary:
        lines.append(f"| {s['drf'] if s['drf'] is not None else '—'} | {s['method']} | {s['lesions']} | " + " | ".join(
            f"{s[m]:+.1f} ± {s[f'{m}_std']:.1f} | {s[f'abs_{m}']:.1f}" for m, _ in measures) + " |")
    return "\n".join(lines) + "\n"


def uptake_tables(inputs: Iterable[str | Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Tables III and IV (ours) of the evaluations in ``inputs`` (run directories or results files): their lesion
    and organ summaries (:func:`lowdose_toolkit.evaluation.results.lesion_summaries`), ordered for
    :func:`markdown`, :func:`organ_markdown` and :func:`uptake_figure` (stably, so each evaluation's organs stay
    together); empty lists when none scored them."""
    from lowdose_toolkit.evaluation.results import lesion_summaries

    inputs = list(inputs)
    return ordered(lesion_summaries(inputs)), ordered(lesion_summaries(inputs, kind="organs"))


def print_summary(summary: list[Mapping[str, Any]], console: Any, title: str = "lesions") -> None:
    """The lesion summary as a rich table."""
    from rich.table import Table

    measures = _lesion_measures(summary)
    table = Table(title=title)
    for name in ("DRF", "Method", "lesions", *(f"{x}{label}{y}" for _, label in measures
                                                for x, y in (("", " bias %"), ("|", "| %")))):
        table.add_column(name, justify="left" if name == "Method" else "right")
    for s in summary:
        table.add_row(str(s["drf"] if s["drf"] is not None else "-"), s["method"], str(s["lesions"]),
                      *(cell for m, _ in measures for cell in (f"{s[m]:+.1f}", f"{s[f'abs_{m}']:.1f}")))
    console.print(table)


def organ_markdown(summary: list[Mapping[str, Any]]) -> str:
    """The organ summary as a Markdown table: a row per DRF and method, a column per organ, each cell the mean
    SUVmean bias over the subjects (± its standard deviation), in percent of the full dose's."""
    organs, rows = _organ_grid(summary)
    lines = ["| DRF | Method | " + " | ".join(organs) + " |", "|---|---|" + "---|" * len(organs)]
    for drf, method, cells in rows:
        lines.append(f"| {drf if drf is not None else '—'} | {method} | " + " | ".join(
            f"{cells[o]['mean_bias_pct']:+.1f} ± {cells[o]['mean_bias_pct_std']:.1f}" if o in cells else "—"
            for o in organs) + " |")
    return "\n".join(lines) + "\n"


ORGANS_HEADING = "### Organs: SUVmean bias against the full dose (%, mean ± SD over subjects)"


def organ_section(summary: list[Mapping[str, Any]]) -> str:
    """:func:`organ_markdown` under its heading, for a results.md; empty without organs."""
    return f"\n{ORGANS_HEADING}\n\n{organ_markdown(summary)}" if summary else ""


def print_organs(summary: list[Mapping[str, Any]], console: Any, title: str = "organs: SUVmean bias (%)") -> None:
    """The organ summary as a rich table (as :func:`organ_markdown`, the mean SUVmean bias per cell)."""
    from rich.table import Table

    organs, rows = _organ_grid(summary)
    table = Table(title=title)
    for name in ("DRF", "Method", *organs):
        table.add_column(name, justify="left" if name == "Method" else "right")
    for drf, method, cells in rows:
        table.add_row(str(drf if drf is not None else "-"), method,
                      *(f"{cells[o]['mean_bias_pct']:+.1f}" if o in cells else "-" for o in organs))
    console.print(table)


def _organ_grid(summary: list[Mapping[str, Any]]) -> tuple[list[str], list[tuple[Any, str, dict[str, Any]]]]:
    organs = list(dict.fromkeys(s["organ"] for s in summary))
    rows: list[tuple[Any, str, dict[str, Any]]] = []
    for s in summary:  # a row per (DRF, method) run of entries; a repeated organ starts another (two evaluations)
        if not rows or rows[-1][:2] != (s["drf"], s["method"]) or s["organ"] in rows[-1][2]:
            rows.append((s["drf"], s["method"], {}))
        rows[-1][2][s["organ"]] = s
    return organs, rows


UPTAKE_PNG = "uptake.png"


def uptake_figure(lesions: list[Mapping[str, Any]], organs: list[Mapping[str, Any]]) -> Any:
    """Uptake against the full dose as a chart: per panel (the lesions' SUVmean, SUVmax and SUVpeak bias, then
    each organ's SUVmean bias), the mean bias (%) of each method across the DRFs, the input's ± std band in grey,
    and 0."""
    from lowdose_toolkit.core.figures import new_figure, plain, styled

    panels = [(f"lesions: {label} bias (%)", list(lesions), measure)
              for measure, label in _lesion_measures(lesions)] if lesions else []
    for organ in dict.fromkeys(s["organ"] for s in organs):
        panels.append((f"{organ}: SUVmean bias (%)", [s for s in organs if s["organ"] == organ], "mean_bias_pct"))
    methods = list(dict.fromkeys(s["method"] for _, rows, _ in panels for s in rows))
    colours = {m: "0.35" if m == LOW_DOSE else f"C{i % 10}" for i, m in enumerate(x for x in methods if x != LOW_DOSE)}
    colours[LOW_DOSE] = "0.35"
    columns = min(4, max(1, len(panels)))
    grid_rows = -(-max(1, len(panels)) // columns)
    with styled():
        figure = new_figure(3.2 * columns, 2.8 * grid_rows + 0.6)
        axes = figure.subplots(grid_rows, columns, squeeze=False).ravel()
        for ax, (title, rows, measure) in zip(axes, panels, strict=False):
            drfs = sorted({s["drf"] for s in rows if s["drf"] is not None})
            for method in methods:
                mine = {s["drf"]: s for s in rows if s["method"] == method and s["drf"] is not None}
                x = [d for d in drfs if d in mine]
                if not x:
                    continue
                y = [mine[d][measure] for d in x]
                if method == LOW_DOSE:
                    spread = [mine[d][f"{measure}_std"] for d in x]
                    ax.fill_between(x, [a - b for a, b in zip(y, spread, strict=True)],
                                    [a + b for a, b in zip(y, spread, strict=True)], color="0.85", lw=0)
                ax.plot(x, y, "o-", ms=4, lw=1.2, color=colours[method], label=plain(method))
            ax.axhline(0, color="black", lw=0.7)
            ax.set_xscale("log")
            ax.set_xticks(drfs, [str(d) for d in drfs])
            ax.minorticks_off()
            ax.set_xlabel("DRF")
            ax.set_title(plain(title))
            ax.grid(alpha=0.3)
        for ax in axes[len(panels):]:
            ax.set_axis_off()
        handles, labels = axes[0].get_legend_handles_labels()
        figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 6), frameon=False)
        figure.suptitle("Uptake against the full dose (mean over lesions / subjects; grey: the input's ± std)",
                        fontsize=10, fontweight="bold")
    return figure


def write_uptake_chart(lesions: list[Mapping[str, Any]], organs: list[Mapping[str, Any]], path: Path) -> Path | None:
    """Write :func:`uptake_figure` as a PNG at ``path`` atomically; None (nothing written) without any row."""
    if not lesions and not organs:
        return None
    from lowdose_toolkit.core.figures import save_png

    return save_png(uptake_figure(lesions, organs), path)


class LesionMasks:
    """Where each subject's lesion mask (and organ labels) is: ``phantom`` (the simulator's ``labels.nii.gz``
    beside the subject's full-dose file: lesion label :data:`PHANTOM_LESION_LABEL`, organs
    :data:`PHANTOM_ORGANS`) or a folder of masks (``<subject>.nii.gz`` or ``.nii``): every nonzero voxel lesion,
    or, when the folder holds a ``labels.json`` naming label values (``{"lesion": 1, "liver": 5, "kidney": [2,
    3]}``), label maps whose ``lesion`` values are lesions and every other name an organ. Masks are read once
    per subject and checked against the reference's grid (shape and affine)."""

    def __init__(self, spec: str | Path) -> None:
        self.spec = str(spec)
        self.folder = None if self.spec == PHANTOM else Path(spec)
        if self.folder is not None and not self.folder.is_dir():
            raise UserError(f"--lesions {spec}: not a folder; give a folder of lesion masks (<subject>.nii.gz), "
                            f"or '{PHANTOM}' for the simulator's own label maps")
        if self.folder is None:
            self.labels: dict[str, list[int]] | None = {
                name: [k for k, n in LABELS.items() if n == name] for name in ("lesion", *PHANTOM_ORGANS)}
        else:
            self.labels = _label_names(self.folder / LABELS_JSON)
        # one subject's (lesion components, n, organ index) (pairs come by reference)
        self._last: tuple[str, tuple[np.ndarray, int], np.ndarray | None] | None = None

    def unfound(self, cases: Iterable[Mapping[str, Any]]) -> str | None:
        """A warning naming the regions a folder's ``labels.json`` names that no scored mask held (a label value
        mistyped, or another map's numbering), ``None`` when every one was found or there is no labels.json."""
        if self.folder is None or self.labels is None:
            return None
        found = {"lesion" if "lesion" in row else row.get("organ") for row in cases}
        missing = [f"{name!r} ({', '.join(map(str, values))})" for name, values in self.labels.items()
                   if name not in found]
        if not missing:
            return None
        return (f"{self.folder / LABELS_JSON}: no mask holds {' or '.join(missing)}; check those label values "
                "against the masks'")

    @property
    def organ_names(self) -> list[str]:
        """The organs scored (numbered 1.. in :meth:`organs`); none for a folder of plain lesion masks."""
        return [name for name in (self.labels or {}) if name != "lesion"]

    def path(self, subject: str, full: Path) -> Path:
        if self.folder is None:
            path = Path(full).parent / "labels.nii.gz"
            if not path.is_file():
                raise DataError(f"{path}: no phantom label map beside {full} (--lesions {PHANTOM} reads the label "
                                "maps `ldt simulate` writes); give a folder of lesion masks instead")
            return path
        for name in (f"{subject}.nii.gz", f"{subject}.nii"):
            if (self.folder / name).is_file():
                return self.folder / name
        from lowdose_toolkit.data.naming import is_nifti
        from lowdose_toolkit.evaluation.pairing import subject_of

        # A mask named as its scan's subject is ('sub-01.nii.gz' for the subject sub_01, 'pat01.NII.GZ')
        named = sorted(p for p in self.folder.iterdir() if p.is_file() and not p.name.startswith(".")
                       and is_nifti(p) and subject_of(p.name) == subject)
        if len(named) == 1:
            return named[0]
        if named:
            raise DataError(f"{self.folder}: {len(named)} lesion masks for subject {subject!r} "
                            f"({', '.join(p.name for p in named)}); keep one")
        raise DataError(f"{self.folder}: no lesion mask for subject {subject!r} (looked for {subject}.nii.gz, "
                        f"{subject}.nii or a name that reads as that subject, e.g. {subject.replace('_', '-')}.nii.gz)")

    def components(self, subject: str, full: Path, shape: tuple[int, ...], affine: np.ndarray | None = None
                   ) -> tuple[np.ndarray, int]:
        """``(components, n)`` of ``subject``'s lesions on the reference's grid (the last subject's kept)."""
        return self._read(subject, full, shape, affine)[0]

    def organs(self, subject: str, full: Path, shape: tuple[int, ...], affine: np.ndarray | None = None
               ) -> np.ndarray | None:
        """``subject``'s organs on the reference's grid, ``k`` where :attr:`organ_names` ``[k - 1]`` is (0
        elsewhere); ``None`` when the masks name no organ."""
        return self._read(subject, full, shape, affine)[1]

    def _read(self, subject: str, full: Path, shape: tuple[int, ...], affine: np.ndarray | None
              ) -> tuple[tuple[np.ndarray, int], np.ndarray | None]:
        if self._last is None or self._last[0] != subject:
            from lowdose_toolkit.data.io import load_array

            path = self.path(subject, full)
            tensor, mask_affine, _ = load_array(path, validate=False)
            data = tensor[0].numpy()
            if data.shape != tuple(shape):
                raise DataError(f"{path} is {data.shape} but {subject}'s reference is {tuple(shape)}; lesion masks "
                                "must be on the reference's grid")
            if affine is not None and not np.allclose(mask_affine, affine, atol=1e-3):
                raise DataError(f"{path} and {subject}'s reference {full} have different affines; resample the "
                                "mask onto the reference")
            organs = None
            if self.labels is None:
                lesion = data != 0
            else:
                lesion = np.isin(data, self.labels.get("lesion", []))
                if self.organ_names:
                    organs = np.zeros(data.shape, np.uint8)
                    for k, name in enumerate(self.organ_names, start=1):
                        organs[np.isin(data, self.labels[name])] = k
            del tensor, data  # the float32 map (4 bytes a voxel) before the components are labelled
            self._last = (subject, label_components(lesion), organs)
        return self._last[1], self._last[2]


def _label_names(path: Path) -> dict[str, list[int]] | None:
    """A masks folder's ``labels.json`` (name -> label value or values), checked; ``None`` when absent."""
    if not path.is_file():
        return None
    import json

    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable JSON file ({exc}); write it as {{\"lesion\": 1, \"liver\": 5}}"
                        ) from None
    if not isinstance(doc, dict) or not doc:
        raise UserError(f"{path}: expected an object naming label values, e.g. {{\"lesion\": 1, \"liver\": 5}}")
    labels: dict[str, list[int]] = {}
    owner: dict[int, str] = {}
    for name, value in doc.items():
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
            raise UserError(f"{path}: {name!r} is {value!r}; give a positive integer label value or a list of them")
        for v in values:
            if v in owner:
                raise UserError(f"{path}: label value {v} is named both {owner[v]!r} and {name!r}; give each value "
                                "one name")
            owner[v] = str(name)
        labels[str(name)] = [int(v) for v in values]
    organs = len(labels) - ("lesion" in labels)
    if organs > MAX_ORGANS:
        raise UserError(f"{path}: names {organs} organs; at most {MAX_ORGANS} are scored: merge or drop names")
    return labels


def auto_masks(recipe: Mapping[str, Any]) -> str | None:
    """The lesion masks a run's evaluation uses unless told: the phantom's own for a phantom-trained run."""
    return PHANTOM if recipe["data"]["source"].get("name") == "phantom" else None


def volume_cases(masks: LesionMasks, subject: str, drf: int | None, full: Path, ref: np.ndarray,
                 images: Mapping[str, np.ndarray], affine: np.ndarray, units: str | None = None
                 ) -> list[dict[str, Any]]:
    """:func:`lesion_rows` and :func:`organ_rows` of one volume (``subject``'s masks from ``masks``, checked
    against the reference ``full``'s grid), each row with its ``subject`` and ``drf``; volumes in mL from the
    affine in the spatial ``units`` (default: ``full``'s header's)."""
    components, _ = masks.components(subject, full, tuple(ref.shape), affine)
    from lowdose_toolkit.data.io import mm_per_unit, spatial_units, voxel_spacing

    units = units or spatial_units(full)  # a header in metres or microns
    mm = mm_per_unit(units)
    rows = lesion_rows(ref, images, components, voxel_ml(affine) * mm**3, voxel_spacing(affine, units))
    organs = masks.organs(subject, full, tuple(ref.shape), affine)
    if organs is not None:
        rows += organ_rows(ref, images, organs, masks.organ_names, voxel_ml(affine) * mm**3)
    return [{"subject": subject, "drf": drf, **row} for row in rows]


def region_facts(spec: str, cases: list[Mapping[str, Any]]) -> dict[str, Any]:
    """What an evaluation records of its lesion and organ rows: ``{"lesions": {masks, summary}}`` and, where
    organs were scored, ``"organs"`` likewise (:func:`organ_summary`)."""
    facts: dict[str, Any] = {"lesions": {"masks": spec, "summary": summarize(cases)}}
    organs = organ_summary(cases)
    if organs:
        facts["organs"] = {"masks": spec, "summary": organs}
    return facts


def region_report(facts: Mapping[str, Any]) -> str:
    """The lesion table and, where organs were scored, the organ section of :func:`region_facts`, as Markdown."""
    return markdown(facts["lesions"]["summary"]) + organ_section(facts.get("organs", {}).get("summary", []))


def write_region_files(cases: list[Mapping[str, Any]], facts: Mapping[str, Any], out: Path) -> list[Path]:
    """An evaluation's lesion and organ files in ``out``: :func:`write_cases` and the :func:`uptake_figure`
    chart; the files written."""
    written = write_cases(cases, out / CASES_CSV)
    chart = write_uptake_chart(facts["lesions"]["summary"], facts.get("organs", {}).get("summary", []),
                               out / UPTAKE_PNG)
    return written + ([chart] if chart else [])


def voxel_ml(affine: np.ndarray) -> float:
    """The volume of one voxel of ``affine`` (in mm) in mL."""
    return float(abs(np.linalg.det(np.asarray(affine, np.float64)[:3, :3]))) / 1000.0


CASES_CSV = "lesions.csv"
ORGANS_CSV = "organs.csv"
CASE_COLUMNS = ("method", "subject", "drf", "lesion", "voxels", "volume_ml", "ref_mean", "ref_max", "mean", "max",
                "mean_bias_pct", "max_bias_pct", "ref_peak", "peak", "peak_bias_pct")
ORGAN_COLUMNS = tuple("organ" if c == "lesion" else c for c in CASE_COLUMNS if "peak" not in c)


def write_cases(rows: Iterable[Mapping[str, Any]], path: Path) -> list[Path]:
    """Write the per-lesion rows as CSV at ``path`` and the per-organ rows, where there are any, as
    :data:`ORGANS_CSV` beside it, atomically; return the files written."""
    import csv

    from lowdose_toolkit.core.atomic import TEXT, atomic_path

    rows = list(rows)
    organs = [r for r in rows if "organ" in r]
    files = [(path, CASE_COLUMNS, [r for r in rows if "organ" not in r])]
    if organs:
        files.append((path.with_name(ORGANS_CSV), ORGAN_COLUMNS, organs))
    else:  # an earlier evaluation's organs do not belong beside these lesions
        path.with_name(ORGANS_CSV).unlink(missing_ok=True)
    for target, columns, members in files:
        with atomic_path(target) as tmp, tmp.open("w", newline="", **TEXT) as fh:
            writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            for row in members:
                writer.writerow({k: row.get(k, "") for k in columns})
    return [target for target, _, _ in files]
