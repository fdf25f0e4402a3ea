"""Simulated phantom data sets: the subjects, the data set writer and reader, and the calibration.

Calibration: the default ``counts_per_bq`` was chosen so that the low-dose images' PSNR against the
full-dose image (the challenge's ``20 log10(max(ref) / RMSE)`` on the whole volume) matches the
paper's "Low-Dose" row (Table I) within a few dB at every DRF; :func:`calibration_report` measures it.
With list-mode subsets the error variance grows like ``DRF - 1`` (a DRF-4 image shares a quarter of
its counts with the reference), which reproduces the paper's ~16 dB drop from DRF 4 to 100 better
than independent draws (``DRF + 1``, ~13 dB).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from lowdose_toolkit import __version__
from lowdose_toolkit.core.atomic import atomic_path, temp_dir_beside
from lowdose_toolkit.data.manifest import manifest_records, write_manifest
from lowdose_toolkit.data.naming import dose_filename, nifti_stem
from lowdose_toolkit.data.phantom import LABELS, Phantom, add_texture, make_phantom
from lowdose_toolkit.data.scans import simulate_scans
from lowdose_toolkit.data.simulation_config import SimulationConfig, check_drfs, make_config
from lowdose_toolkit.errors import DataError, UserError
from lowdose_toolkit.records import FULL, SubjectRecord

__all__ = [
    "DEFAULT_DRFS",
    "DEFAULT_SUBJECTS",
    "PAPER_LOW_DOSE_PSNR",
    "SIM_VERSION",
    "calibration_report",
    "check_subjects_seed",
    "dataset_report",
    "is_simulation_output",
    "print_calibration",
    "read_dataset",
    "write_dataset",
]

SIM_VERSION = "1"
"""Bumped whenever a change alters generated data; part of the phantom source's cache key."""
DEFAULT_SUBJECTS = 10
DEFAULT_DRFS: tuple[int, ...] = (4, 10, 20, 50, 100)
PAPER_LOW_DOSE_PSNR: dict[int, float] = {4: 58.718, 10: 54.421, 20: 51.698, 50: 47.490, 100: 42.490}
"""CG-3DSRGAN paper, Table I, "Low-Dose" row: PSNR (dB) of the low-dose input vs full dose."""
GENERATOR = "lowdose_toolkit.simulate"  # the data set format's name in simulation.json: never change it


def _subject_id(i: int) -> str:
    return f"phantom_{i:03d}"


def _simulate_subject(
    i: int, seed: int, drfs: tuple[int, ...], config: SimulationConfig
) -> tuple[Phantom, dict[str | int, torch.Tensor], dict]:
    """Phantom and reconstructions of subject ``i`` (its seeds depend on ``(seed, i)`` only)."""
    ss_phantom, ss_noise, ss_texture = np.random.SeedSequence([seed, i]).spawn(3)  # the first two as before
    ph = make_phantom(config.shape, config.spacing_mm, ss_phantom, config.supersample)
    if config.texture > 0:  # heterogeneous uptake, this subject's strength drawn in [0, texture]
        rng = np.random.default_rng(ss_texture)
        sigma = float(rng.uniform(0.0, config.texture))
        ph.activity = add_texture(ph.activity, sigma, config.texture_fwhm_mm, config.spacing_mm, rng)
        ph.info["texture_sigma"] = round(sigma, 4)
    stats: dict = {}
    images = simulate_scans(ph.activity, ph.mu, drfs, config, ss_noise, stats)
    return ph, images, stats


def check_subjects_seed(subjects: int, seed: int) -> None:
    """Raise :class:`UserError` unless ``subjects`` is a positive and ``seed`` a non-negative integer."""
    if isinstance(subjects, bool) or not isinstance(subjects, (int, np.integer)) or subjects < 1:
        raise UserError(f"subjects must be a positive integer, got {subjects!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")


class _Progress:
    """A rich progress bar over subjects on stderr, or nothing when disabled."""

    def __init__(self, enabled: bool, total: int, label: str) -> None:
        self._bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=Console(stderr=True),
            )
            self._task = self._bar.add_task(label, total=total)

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)


def is_simulation_output(folder: Path) -> bool:
    """Whether ``folder`` holds a data set written by :func:`write_dataset` (its simulation.json)."""
    meta = Path(folder) / "simulation.json"
    try:
        return json.loads(meta.read_text()).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        return False


def write_dataset(
    out: Path,
    subjects: int = DEFAULT_SUBJECTS,
    seed: int = 0,
    drfs: Iterable[int] = DEFAULT_DRFS,
    *,
    progress: bool = False,
    config: SimulationConfig | None = None,
    **params: object,
) -> Path:
    """Simulate ``subjects`` phantoms and write them as a NIfTI data set with a manifest.

    Layout: ``out/<subject>/full.nii.gz``, ``out/<subject>/drf_004.nii.gz``, ... (float32, Bq/mL,
    RAS+ affine, mm), ``out/<subject>/labels.nii.gz`` (organ labels, uint8), ``out/manifest.csv``
    (``subject,drf,path,suv_factor``) and ``out/simulation.json`` (all parameters and per-subject
    facts). Files are made in a temporary folder beside ``out`` and moved into place at the end, so
    ``out`` never holds a half data set. Subject ``i`` depends only on ``(seed, i)`` and the
    parameters: the same call gives bit-identical files.

    Args:
        out: Folder to create (or a previous output of this function, which is replaced).
        subjects: Number of subjects.
        seed: Non-negative seed.
        drfs: Dose reduction factors.
        progress: Show a rich progress bar over subjects (stderr).
        config: Base configuration (default :class:`SimulationConfig`).
        **params: :class:`SimulationConfig` fields to override (``shape=...``, ``counts_per_bq=...``).

    Returns:
        Path of the manifest.

    Raises:
        UserError: If ``out`` is a file or a non-empty folder that is not a previous simulation
            output, or on a bad parameter.
    """
    config = make_config(config, **params)
    levels = check_drfs(drfs)
    check_subjects_seed(subjects, seed)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not is_simulation_output(out):
        raise UserError(
            f"output folder {out} is not empty and is not a previous simulation output "
            "(no simulation.json); choose a new or empty folder"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(out)  # the data set's folder: mode per the umask, like the files in it
    try:
        records, facts = [], []
        with _Progress(progress, subjects, "Simulating phantoms") as bar:
            for i in range(subjects):
                ph, images, stats = _simulate_subject(i, seed, levels, config)
                sid = _subject_id(i)
                paths: dict[str | int, Path] = {}
                for key, vol in images.items():
                    p = tmp / sid / dose_filename(key)
                    _save_nifti(vol.numpy(), ph.affine, p, f"ldt phantom {sid} {nifti_stem(p)}")
                    paths[key] = p
                _save_nifti(ph.labels.numpy(), ph.affine, tmp / sid / "labels.nii.gz",
                            f"ldt phantom {sid} organ labels", unit="label")
                records.append(SubjectRecord(sid, paths[FULL], {d: paths[d] for d in levels},
                                             suv_factor=ph.suv_factor))
                facts.append({"subject": sid, "suv_factor": ph.suv_factor, **ph.info, "counts": stats})
                bar.advance()
        write_manifest(records, tmp / "manifest.csv")
        meta = {
            "generator": GENERATOR,
            "sim_version": SIM_VERSION,
            "toolkit_version": __version__,
            "subjects": subjects,
            "seed": seed,
            "drfs": list(levels),
            "units": "Bq/mL",
            "layout": "NIfTI arrays (x, y, z), RAS+ affine; tensor [D, H, W] = array.permute(2, 1, 0)",
            "config": config.as_dict(),
            "labels": {str(k): v for k, v in LABELS.items()},
            "subject_facts": facts,
        }
        with atomic_path(tmp / "simulation.json") as p:
            p.write_text(json.dumps(meta, indent=2) + "\n")
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "manifest.csv"


def _install(tmp: Path, out: Path) -> None:
    """Move the finished folder ``tmp`` to ``out``, replacing an old simulation output there."""
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / out.name)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _save_nifti(data: np.ndarray, affine: np.ndarray, path: Path, descrip: str, unit: str = "Bq/mL") -> None:
    """Write a ``[D, H, W]`` array as NIfTI ``(x, y, z)`` with qform/sform = ``affine``, mm units."""
    arr = np.ascontiguousarray(np.transpose(data, (2, 1, 0)))
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    hdr = img.header
    hdr.set_xyzt_units("mm", "sec")
    hdr["descrip"] = f"{descrip}; {unit}"[:79].encode()
    hdr["aux_file"] = unit[:23].encode()
    with atomic_path(path) as p:
        nib.save(img, p)


def read_dataset(folder: Path) -> list[SubjectRecord]:
    """Subject records of a data set written by :func:`write_dataset`, from its manifest.csv read strictly.

    Raises:
        DataError: If the manifest is missing or malformed, or a file it lists is missing.
    """
    folder = Path(folder)
    manifest = folder / "manifest.csv"
    if not manifest.is_file():
        raise DataError(f"{manifest} not found; write the data set with `ldt simulate --out {folder}`")
    return manifest_records(manifest, strict=True, source="phantom")[0]


def _report_rows(psnrs: dict[int, list[float]]) -> list[dict]:
    rows = []
    for d in sorted(psnrs):
        v = np.asarray(psnrs[d], np.float64)
        paper = PAPER_LOW_DOSE_PSNR.get(d)
        mean = float(v.mean())
        rows.append({
            "drf": d,
            "psnr_mean": mean,
            "psnr_std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "subjects": int(v.size),
            "paper": paper,
            "difference": None if paper is None else mean - paper,
        })
    return rows


def calibration_report(
    subjects: int = DEFAULT_SUBJECTS,
    seed: int = 0,
    drfs: Iterable[int] = DEFAULT_DRFS,
    *,
    progress: bool = False,
    config: SimulationConfig | None = None,
    **params: object,
) -> list[dict]:
    """PSNR of the simulated low-dose images against the full-dose image, per DRF, vs the paper.

    Simulates in memory (no files), exactly as :func:`write_dataset` does for the same arguments.

    Returns:
        One dict per DRF: ``drf``, ``psnr_mean``, ``psnr_std`` (over subjects), ``subjects``,
        ``paper`` (Table I "Low-Dose" PSNR or None) and ``difference`` (mean - paper, dB).
    """
    from lowdose_toolkit.evaluation.metrics import psnr

    config = make_config(config, **params)
    levels = check_drfs(drfs)
    check_subjects_seed(subjects, seed)
    psnrs: dict[int, list[float]] = {d: [] for d in levels}
    with _Progress(progress, subjects, "Simulating phantoms") as bar:
        for i in range(subjects):
            _, images, _ = _simulate_subject(i, seed, levels, config)
            for d in levels:
                psnrs[d].append(psnr(images[FULL], images[d]))
            bar.advance()
    return _report_rows(psnrs)


def dataset_report(folder: Path) -> list[dict]:
    """:func:`calibration_report`'s table computed from the files of a written data set."""
    from lowdose_toolkit.evaluation.metrics import psnr

    psnrs: dict[int, list[float]] = {}
    for rec in read_dataset(folder):
        ref = np.asarray(nib.load(rec.full).dataobj, dtype=np.float32)
        for d, p in rec.low.items():
            psnrs.setdefault(d, []).append(psnr(ref, np.asarray(nib.load(p).dataobj, dtype=np.float32)))
    return _report_rows(psnrs)


def print_calibration(rows: list[dict], console=None, title: str | None = None) -> None:
    """Print a calibration report (see :func:`calibration_report`) as a rich table."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    n = rows[0]["subjects"] if rows else 0
    table = Table(title=title or f"Low-dose PSNR vs full dose ({n} phantom subjects) against the paper")
    for col in ("DRF", "PSNR mean (dB)", "std (dB)", "paper (dB)", "difference (dB)"):
        table.add_column(col, justify="right")
    for r in rows:
        paper = "-" if r["paper"] is None else f"{r['paper']:.2f}"
        diff = "-" if r["difference"] is None else f"{r['difference']:+.2f}"
        table.add_row(str(r["drf"]), f"{r['psnr_mean']:.2f}", f"{r['psnr_std']:.2f}", paper, diff)
    console.print(table)
