"""``ldt infer``: batch denoising of whole volumes with a trained checkpoint or an exported model.

The checkpoint alone is enough: its recipe names the parts (their plugins must be installed), its
weights fill them, and its normalisation method is applied to each input and inverted on output. A file
written by ``ldt export`` (ONNX, TorchScript) carries the same in its metadata and runs through the same
Predictor (window, normalisation, summary).

Outputs take the input's format unless ``--output-format`` says otherwise: a NIfTI file per input, or for
a DICOM series a new series in its own subfolder of ``OUT`` (:mod:`lowdose_toolkit.data.dicom_out`).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import typer

from lowdose_toolkit.data.naming import is_nifti, nifti_stem
from lowdose_toolkit.errors import UserError

LOCK_NAME = ".ldt-infer.lock"
SUMMARY_FILES = ("summary.csv", "summary.json")
OUTPUT_FORMATS = ("dicom", "nifti")
RESERVED = ("previews", LOCK_NAME, *SUMMARY_FILES)  # names in OUT a series folder cannot take


@dataclass(frozen=True)
class Volume:
    """One input volume: ``path`` resolved (it is read from there), ``given`` as the user listed it (absolute,
    links not followed) and the SUV factor a manifest gives its subject."""

    path: Path
    given: Path
    suv_factor: float | None = None
    suv_source: str = ""
    subject: str = ""  # a manifest row's subject: its output is named after it


@dataclass(frozen=True)
class Inputs:
    """What the input arguments name: the volumes, and the folders listed (or holding a listed manifest)."""

    volumes: list[Volume]
    folders: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class Job:
    """One input volume and where its prediction goes (``skip``: it exists and ``--skip-existing`` was given).

    ``format``: ``nifti`` (``output`` is a file) or ``dicom`` (``output`` is a new series' folder).
    """

    source: Path
    output: Path
    given: Path | None = None
    suv_factor: float | None = None
    suv_source: str = ""
    skip: bool = False
    format: str = "nifti"


def _absolute(path: Path) -> Path:
    """Absolute without following links (``..`` removed lexically)."""
    return Path(os.path.abspath(path))


def _both(path: Path) -> set[Path]:
    """A path as given (absolute) and resolved (links followed)."""
    return {_absolute(path), path.resolve()}


def _from_manifest(path: Path) -> list[Volume]:
    """The manifest's low-dose volumes (rows whose drf is not ``full``); only its ``path`` column is required.

    A subject's ``suv_factor`` (on any of its rows) goes with each of its volumes, and its id with their output
    names (:func:`_output_name`).
    """
    from lowdose_toolkit.data.manifest import read_manifest

    rows = read_manifest(path, require=("path",))
    per_subject = {}
    for row in rows:
        if row.suv_factor is not None and row.subject:
            per_subject.setdefault(row.subject, row)
    volumes = []
    for row in rows:
        if row.full:
            continue
        source = row if row.suv_factor is not None else per_subject.get(row.subject)
        factor = None if source is None else source.suv_factor
        where = "" if source is None else f"{path} line {source.line}"
        volumes.append(Volume(row.path.resolve(), _absolute(row.path), factor, where, row.subject or ""))
    return volumes


def find_inputs(inputs: list[str]) -> Inputs:
    """Files, folders (NIfTI inside, or a DICOM series), globs and manifest CSVs -> volumes, in order, once each."""
    from lowdose_toolkit.data.io import is_dicom_folder

    found: list[Volume] = []
    folders: list[Path] = []
    for item in inputs:
        pattern = any(c in item for c in "*?[") and not Path(item).exists()  # 'PET [AC].nii.gz' is a name
        matches = [Path(m) for m in sorted(glob.glob(item))] if pattern else [Path(item)]
        if not matches:
            raise UserError(f"{item}: the pattern matches no file")
        for path in matches:
            if not path.exists():
                raise UserError(f"{path}: no such file or folder")
            if path.is_file() and path.suffix.lower() == ".csv":
                found.extend(_from_manifest(path))
                folders.append(_absolute(path.parent))
            elif path.is_file():
                if not is_nifti(path):
                    raise UserError(f"{path}: not a NIfTI file (.nii/.nii.gz), DICOM folder or manifest CSV")
                found.append(Volume(path.resolve(), _absolute(path)))
            elif is_dicom_folder(path):
                found.append(Volume(path.resolve(), _absolute(path)))
            else:
                folders.append(_absolute(path))
                # hidden entries are skipped: a killed writer's temporary files are not scans
                visible = [p for p in path.iterdir() if not p.name.startswith(".")]
                # a broken link to a scan is listed, so that it fails in the summary instead of vanishing
                niftis = sorted(p for p in visible if (p.is_file() or (p.is_symlink() and not p.exists()))
                                and is_nifti(p))
                dicoms = sorted(p for p in visible if p.is_dir() and is_dicom_folder(p))
                if not niftis and not dicoms:
                    raise UserError(f"{path}: the folder holds no NIfTI files or DICOM series")
                found.extend(Volume(p.resolve(), _absolute(p)) for p in niftis + dicoms)
    unique: dict[Path, Volume] = {}
    for volume in found:  # each file once (the first way it was named), in order
        unique.setdefault(volume.path, volume)
    if not unique:
        raise UserError("no input volumes given")
    return Inputs(list(unique.values()), folders)


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files, folders (NIfTI inside, or a DICOM series), globs and manifest CSVs -> volume paths (resolved)."""
    return [v.path for v in find_inputs(inputs).volumes]


def _never_written(volumes: Sequence[Volume], folders: Sequence[Path]) -> tuple[dict[Path, str], dict[Path, str]]:
    """The folders and the files ``ldt infer`` must not write into or over, each with why (for messages).

    Both the given and the resolved path of every input count, and of its folder: with a link to a
    file elsewhere, the folder the user listed is as much an input folder as the one the file is in.
    """
    protected_folders: dict[Path, str] = {}
    protected_files: dict[Path, str] = {}
    for folder in folders:
        for path in _both(folder):
            protected_folders.setdefault(path, "a folder listed as input")
    for v in volumes:
        link = f" (a link to {v.path})" if v.given != v.path else ""
        for path in (v.given, v.path):
            if v.path.is_dir():  # a DICOM series
                protected_folders.setdefault(path, f"the input series {v.given}{link}")
            else:
                protected_files.setdefault(path, f"the input {v.given}{link}")
                for parent in _both(path.parent):
                    protected_folders.setdefault(parent, f"it holds the input {path}")
    return protected_folders, protected_files


def check_output_format(output_format: str | None) -> str | None:
    """``--output-format``: ``dicom``, ``nifti`` or None (each input's own format), any case."""
    if output_format is None:
        return None
    fmt = output_format.strip().lower()
    if fmt not in OUTPUT_FORMATS:
        raise UserError(f"--output-format {output_format}: not a format ldt writes; choose dicom or nifti")
    return fmt


def _output_name(v: Volume, output_format: str | None) -> tuple[str, str]:
    """The output's format and name in OUT: ``<stem>.nii.gz``, or ``<series folder>`` for a DICOM series; a
    manifest row's name starts with its subject (``<subject>_<stem>``) unless it holds the subject already, so
    the subject folders of a data set (``sub01/drf_004.nii.gz``, ``sub02/drf_004.nii.gz``) give distinct
    outputs that ``ldt evaluate`` pairs by subject and DRF."""
    fmt = output_format or ("dicom" if v.path.is_dir() else "nifti")
    prefix = f"{v.subject}_" if v.subject and v.subject not in v.given.name else ""
    if fmt == "nifti":
        return fmt, f"{prefix}{nifti_stem(v.given)}.nii.gz"
    if not v.path.is_dir():
        raise UserError(f"{v.given}: --output-format dicom needs a DICOM series input (its headers are the new "
                        "series' template); pass --output-format nifti or leave the option out for NIfTI inputs")
    name = v.given.name and f"{prefix}{v.given.name}"
    if not name or name in RESERVED:
        raise UserError(f"{v.given}: its DICOM output would be the folder {name!r}, a name ldt infer uses in --out "
                        "for itself; rename the input folder (or link to it under another name)")
    return fmt, name


def plan_jobs(sources: Sequence[Path | Volume], out: Path, overwrite: bool = False, skip_existing: bool = False,
              folders: Sequence[Path] = (), output_format: str | None = None) -> list[Job]:
    """Output path per input; refuses input folders as output, name clashes and writing over any input.

    An output that exists is refused, replaced (``overwrite``) or left and its job marked ``skip``
    (``skip_existing``); an output that is an input, or a link to one, is always refused. Inputs are
    compared with the output folder and each output by their given and their resolved paths, and
    existing outputs by identity (device and inode), so symbolic and hard links cannot get around it.
    ``output_format`` (``dicom``, ``nifti``; None: each input's own) makes a DICOM series' output a
    folder ``OUT/<series folder>``; one that exists is replaced only if it holds nothing but ``.dcm``
    files (a series ldt wrote), and never if an input is in it.
    """
    if overwrite and skip_existing:
        raise UserError("--overwrite and --skip-existing contradict each other; pass one of them")
    output_format = check_output_format(output_format)
    volumes = [s if isinstance(s, Volume) else Volume(s.resolve(), _absolute(s)) for s in sources]
    protected_folders, protected_files = _never_written(volumes, folders)
    for path in [*_both(out), *_both(out / "previews")]:
        why = protected_folders.get(path) or protected_files.get(path)
        if why:
            raise UserError(f"--out {out}: {path} is an input folder ({why}); choose another folder "
                            "(inputs are never written to)")
    identities = {}
    for path in protected_files:
        if path.exists():
            st = path.stat()
            identities.setdefault((st.st_dev, st.st_ino), protected_files[path])
    root = out.resolve()

    def refuse_input(target: Path) -> None:
        """Refuse an output path that is an input, a link to one, or the same file (a hard link)."""
        if target.exists():
            st = target.stat()
            why = identities.get((st.st_dev, st.st_ino))
            if why:
                kind = "a link to" if target.is_symlink() else "the same file as"
                raise UserError(f"{target} is {kind} {why}; inputs are never replaced: remove {target.name} from "
                                f"{target.parent} or choose another --out")
        for path in _both(target):
            if path in protected_files:
                raise UserError(f"{target} would be written over {protected_files[path]}; choose another --out "
                                "(inputs are never written to)")

    def refuse_folder(target: Path) -> None:
        """Refuse a series folder that is, or holds, an input (replacing it would remove the input)."""
        for path in _both(target):
            for inside, why in [*protected_folders.items(), *protected_files.items()]:
                if inside == path or path in inside.parents:
                    subject = "it" if inside == path else f"{inside} in it"
                    verb = why[3:] if why.startswith("it ") else f"is {why}"
                    raise UserError(f"{target} would be the output series, but {subject} {verb}; choose another "
                                    "--out (inputs are never written to)")

    for name in SUMMARY_FILES:
        refuse_input(root / name)
    jobs: list[Job] = []
    names: dict[str, Path] = {}
    for v in volumes:
        fmt, name = _output_name(v, output_format)
        if name in names:
            raise UserError(f"{v.given} and {names[name]} would both be written as {root / name}; "
                            "run them separately or rename one")
        names[name] = v.given
        target = root / name
        refuse_input(target)
        if fmt == "dicom":
            refuse_folder(target)
        skip = False
        if target.exists():
            if skip_existing:
                skip = True
            elif not overwrite:
                raise UserError(f"{target} exists; pass --overwrite to replace it or --skip-existing to keep it "
                                "(and resume the batch)")
            elif fmt == "dicom" and target.is_dir() and not target.is_symlink():
                others = sorted(p.name for p in target.iterdir() if not (p.is_file() and p.suffix.lower() == ".dcm"))
                if others:
                    raise UserError(f"{target} exists and holds {others[0]!r}, not only the .dcm files of a series "
                                    "ldt wrote, so --overwrite does not replace it; remove it or choose another --out")
        jobs.append(Job(v.path, target, v.given, v.suv_factor, v.suv_source, skip, fmt))
    return jobs


def infer(checkpoint: Path, inputs: list[str], out: Path, patch_size: int | None, overlap: float | None,
          batch_size: int | None, blending: str | None, device: str, precision: str, overwrite: bool,
          previews: bool = True, prefetch: bool = True, drf: int | None = None, skip_existing: bool = False,
          suv_factor: float | None = None, output_format: str | None = None, trust_torchscript: bool = False,
          compile: bool = False, dose_estimate: str = "volume", consistency: bool | None = None) -> int:
    """Run the checkpoint's model over every input; returns the exit code (1 if any input failed).

    With ``previews``, ``OUT/previews/<name>.png`` shows coronal MIPs of each input and its output.
    With ``prefetch``, volume k+1 is read and volume k-1 written in threads while volume k is inferred.
    With ``drf``, a guided model is conditioned on that DRF instead of its dose head's prediction.
    ``precision``: auto (bf16 where the device runs it natively, else fp32), fp32, bf16 or fp16.
    With ``skip_existing``, inputs whose output exists are left (``skipped`` in the summary): a batch
    resumes where it stopped. ``suv_factor`` is every input's SUV factor, for a model trained on SUV.
    ``output_format`` (``dicom``, ``nifti``; None: each input's own) says what is written: a DICOM series
    input gives a new series in ``OUT/<series folder>`` (:func:`lowdose_toolkit.data.dicom_out.save_dicom_like`).
    ``OUT`` is locked for the run; ``OUT/summary.csv`` is written whatever happens, Ctrl-C included.
    With ``compile``, a checkpoint's model runs through ``torch.compile`` (:attr:`Predictor.compiled`).
    ``dose_estimate``: ``volume`` (the dose head classifies each whole volume, where it can) or ``window``
    (:attr:`Predictor.dose_estimate`). ``consistency``: None keeps the model's recipe setting
    (``eval.consistency``), True applies the guard (the recipe's settings, else the defaults), False leaves it off.
    """
    from rich.console import Console
    from rich.markup import escape

    from lowdose_toolkit.core.atomic import remove_stale_temps
    from lowdose_toolkit.core.checkpoint import find_checkpoint, load_checkpoint
    from lowdose_toolkit.core.device import resolve_device
    from lowdose_toolkit.core.lock import folder_lock
    from lowdose_toolkit.data.dicom_out import Derivation
    from lowdose_toolkit.data.normalize import check_suv_factor
    from lowdose_toolkit.errors import DataError
    from lowdose_toolkit.infer.export import is_exported
    from lowdose_toolkit.infer.pipeline import (
        FAILED,
        OK,
        SKIPPED,
        denoise_all,
        previous_rows,
        summary_row,
        write_summary,
    )
    from lowdose_toolkit.infer.predictor import DOSE_ESTIMATES, Predictor

    console = Console(stderr=True)
    exported = is_exported(checkpoint)
    ckpt = None if exported else load_checkpoint(checkpoint)
    if suv_factor is not None:
        try:
            suv_factor = check_suv_factor(suv_factor, "--suv-factor")
        except DataError as exc:
            raise UserError(str(exc)) from None
    output_format = check_output_format(output_format)
    found = find_inputs(inputs)
    plan_jobs(found.volumes, out, overwrite, skip_existing, found.folders, output_format)  # refused before anything
    dev = resolve_device(device)
    window = {"patch_size": patch_size, "overlap": None if overlap is None else (int(overlap) if overlap >= 1
                                                                                 else overlap),
              "batch_size": batch_size, "blending": blending}
    if dose_estimate not in DOSE_ESTIMATES:
        raise UserError(f"--dose-estimate {dose_estimate!r} is unknown; use {' or '.join(DOSE_ESTIMATES)}")
    if ckpt is None and compile:
        raise UserError(f"--compile: {checkpoint} is an exported model, which runs as it was exported; leave "
                        "--compile out, or give the checkpoint it was exported from")
    if ckpt is None:
        predictor = Predictor.from_exported(checkpoint, dev, precision.replace("none", "fp32"), trust_torchscript,
                                            **window)
        assert predictor.exported is not None
        meta = predictor.exported.meta
        derivation = Derivation(meta["recipe_name"], meta["recipe"]["model"]["generator"]["name"],
                                f"{checkpoint.name} ({meta['exported_as']} export of {meta['checkpoint']['file']}, "
                                f"epoch {meta['checkpoint']['epoch']})")
    else:
        predictor, recipe = Predictor.from_checkpoint(ckpt, dev, precision.replace("none", "fp32"), compile=compile,
                                                      **window)
        predictor.dose_estimate = dose_estimate
        derivation = Derivation(recipe["name"], recipe["model"]["generator"]["name"],
                                f"{find_checkpoint(checkpoint).name} (epoch {ckpt.epoch})")
    from lowdose_toolkit.infer.consistency import Consistency

    predictor.consistency = Consistency.override(predictor.consistency, consistency)
    runs_on = predictor.exported.runs_on if predictor.exported is not None else str(dev)
    drf_class = predictor.drf_class(drf)
    conditioned = None
    if predictor.guided and predictor.dose_head is not None:
        conditioned = f"DRF {drf} (--drf)" if drf is not None else \
            "dose head on the whole volume" if predictor.whole_volume_dose else "dose head per window"
    assert predictor.normalization is not None
    method = predictor.normalization.method
    if suv_factor is not None and method != "suv":
        console.print(f"[yellow]warning[/] --suv-factor is not used: this checkpoint normalises with {method!r}, "
                      "not SUV", soft_wrap=True)
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out, "ldt infer", "wait for it or choose another --out", LOCK_NAME):
        remove_stale_temps(out, out / "previews")  # left by a killed earlier run
        jobs = plan_jobs(found.volumes, out, overwrite, skip_existing, found.folders, output_format)  # as it is now
        rows = [summary_row(job) for job in jobs]
        earlier = previous_rows(out) if skip_existing else {}
        for job, row in zip(jobs, rows, strict=True):
            if job.skip:
                kept = earlier.get(str(job.output), {})
                row.update({k: kept[k] for k in ("shape", "predicted_drf", "drf_probability", "conditioned_on",
                                                 "dose_level", "strength", "consistency", "suv_factor") if k in kept})
                row.update(status=SKIPPED, error="output exists (--skip-existing)")
        todo = [(job, row) for job, row in zip(jobs, rows, strict=True) if not job.skip]
        meta = {"checkpoint": str(checkpoint), "model_format": predictor.exported.format
                if predictor.exported is not None else "checkpoint", "normalization": method,
                "precision": predictor.precision, "device": runs_on, "output_format": output_format or "input's",
                "compiled": predictor.compiled,
                "consistency": None if predictor.consistency is None else predictor.consistency.as_dict(),
                "dose_estimate": None if predictor.dose_head is None else
                "volume" if predictor.whole_volume_dose else "window"}
        try:
            denoise_all(predictor, [job for job, _ in todo], out, console, previews=previews, prefetch=prefetch,
                        drf_class=drf_class, conditioned_on=conditioned, rows=[row for _, row in todo],
                        suv_factor=suv_factor, derivation=derivation)
        except KeyboardInterrupt:
            console.print(f"{escape(str(out / 'summary.csv'))} lists what was done; the same command with "
                          "--skip-existing finishes the batch", soft_wrap=True)
            raise
        finally:  # also when interrupted: the summary of what was done, the rest "not done"
            write_summary(rows, out, meta)
    counts = {status: sum(row["status"] == status for row in rows) for status in (OK, SKIPPED, FAILED)}
    extra = "".join(f", {counts[s]} {s}" for s in (SKIPPED, FAILED) if counts[s])
    console.print(f"{counts[OK]}/{len(rows)} volumes written to {escape(str(out))}{extra} (summary.csv; "
                  f"{predictor.precision} on {runs_on})", soft_wrap=True)
    return 1 if counts[FAILED] else 0


def infer_cmd(
    checkpoint: Path = typer.Argument(..., help="Checkpoint (.pt), run directory, or a file from ldt export."),
    inputs: list[str] = typer.Argument(..., help="NIfTI files, folders, globs, DICOM folders or a manifest CSV."),
    out: Path = typer.Option(..., "--out", help="Output folder (never an input folder); locked while in use."),
    patch_size: int | None = typer.Option(None, "--patch-size", help="Sliding-window patch (default: recipe)."),
    overlap: float | None = typer.Option(None, "--overlap", help="Overlap: voxels, or a fraction < 1."),
    batch_size: int | None = typer.Option(None, "--batch-size"),
    blending: str | None = typer.Option(None, "--blending", help="hann | average | crop"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    precision: str = typer.Option(
        "auto", "--precision", "--amp", help="auto (bf16 where the device runs it natively, else fp32) | fp32 | bf16 "
                                             "| fp16, on CPU and CUDA"
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs (never an input)."),
    skip_existing: bool = typer.Option(
        False, "--skip-existing", help="Keep existing outputs and denoise the rest: resumes a stopped batch."
    ),
    previews: bool = typer.Option(True, "--previews/--no-previews", help="Coronal MIP PNGs in OUT/previews."),
    prefetch: bool = typer.Option(
        True, "--prefetch/--no-prefetch", help="Read the next and write the previous volume meanwhile (more memory)."
    ),
    drf: int | None = typer.Option(
        None, "--drf", help="Known dose reduction factor of every input: a guided model is conditioned on it "
                            "instead of its dose head's prediction (which is still reported)."
    ),
    trust_torchscript: bool = typer.Option(
        False, "--trust-torchscript", help="Run a TorchScript export (.ts): it is a program, so only from a source you "
                                           "trust (checkpoints and .onnx files are data)."
    ),
    suv_factor: float | None = typer.Option(
        None, "--suv-factor", help="SUV factor (body weight g / injected activity Bq) of every input, for a model "
                                   "trained on SUV; otherwise each input's manifest row, JSON sidecar or DICOM header."
    ),
    output_format: str | None = typer.Option(
        None, "--output-format", help="dicom | nifti (default: the input's format). dicom: a new series per DICOM "
                                      "input series, in OUT/<series folder>, with its geometry, patient and study."
    ),
    compile: bool = typer.Option(
        False, "--compile", help="torch.compile the model (a checkpoint's): seconds to compile, then 1.3x faster in "
                                 "fp32 on a 2-core CPU; slower in bf16 there (docs/BENCHMARKS.md). For long batches."
    ),
    dose_estimate: str = typer.Option(
        "volume", "--dose-estimate", help="volume: the dose head estimates the DRF once per whole volume, which "
                                          "conditions every window of a guided model; window: each window is "
                                          "conditioned on the head's reading of it (as an exported model does); "
                                          "the dose level the strength follows is the whole volume's either way."
    ),
    consistency: bool | None = typer.Option(
        None, "--consistency/--no-consistency", help="Give back the local means a prediction changed beyond the "
                                                     "input's noise (small hot lesions; default: as the model's "
                                                     "recipe says, eval.consistency)."
    ),
) -> None:
    """Denoise whole volumes with a trained model (sliding window, affine and header kept; NIfTI or DICOM out)."""
    raise typer.Exit(infer(checkpoint, inputs, out, patch_size, overlap, batch_size, blending, device, precision,
                           overwrite, previews, prefetch, drf, skip_existing, suv_factor, output_format,
                           trust_torchscript, compile, dose_estimate, consistency))
