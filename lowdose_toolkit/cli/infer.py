"""``ldt infer``: batch denoising of whole volumes with a trained checkpoint or an exported model.

The checkpoint alone is enough: its recipe names the parts (their plugins must be installed), its
weights fill them, and its normalisation method is applied to each input and inverted on output. A file
written by ``ldt export`` (ONNX, TorchScript) carries the same in its metadata and runs through the same
Predictor (window, normalisation, summary).
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

import typer

from lowdose_toolkit.data.naming import is_nifti, nifti_stem
from lowdose_toolkit.errors import UserError


@dataclass(frozen=True)
class Job:
    """One input volume and where its prediction goes."""

    source: Path
    output: Path


def _from_manifest(path: Path) -> list[Path]:
    """The manifest's low-dose volumes (rows whose drf is not ``full``); only its ``path`` column is required."""
    from lowdose_toolkit.data.manifest import read_manifest

    return [row.path.resolve() for row in read_manifest(path, require=("path",)) if not row.full]


def _has_dicom(folder: Path) -> bool:
    for child in folder.iterdir():
        if child.is_file() and (child.suffix.lower() in (".dcm", ".ima") or child.suffix == ""):
            with child.open("rb") as fh:
                head = fh.read(132)
            if head[128:132] == b"DICM":
                return True
    return False


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files, folders (NIfTI inside, or a DICOM series), globs and manifest CSVs -> volume paths."""
    found: list[Path] = []
    for item in inputs:
        matches = [Path(m) for m in sorted(glob.glob(item))] if any(c in item for c in "*?[") else [Path(item)]
        if not matches:
            raise UserError(f"{item}: the pattern matches no file")
        for path in matches:
            if not path.exists():
                raise UserError(f"{path}: no such file or folder")
            if path.is_file() and path.suffix.lower() == ".csv":
                found.extend(_from_manifest(path))
            elif path.is_file():
                if not is_nifti(path):
                    raise UserError(f"{path}: not a NIfTI file (.nii/.nii.gz), DICOM folder or manifest CSV")
                found.append(path.resolve())
            elif _has_dicom(path):
                found.append(path.resolve())
            else:
                niftis = sorted(p for p in path.iterdir() if p.is_file() and is_nifti(p))
                dicoms = sorted(p for p in path.iterdir() if p.is_dir() and _has_dicom(p))
                if not niftis and not dicoms:
                    raise UserError(f"{path}: the folder holds no NIfTI files or DICOM series")
                found.extend(p.resolve() for p in niftis + dicoms)
    unique = list(dict.fromkeys(found))
    if not unique:
        raise UserError("no input volumes given")
    return unique


def plan_jobs(sources: list[Path], out: Path, overwrite: bool) -> list[Job]:
    """Output path per input; refuses input folders as output and name clashes."""
    out = out.resolve()
    jobs: list[Job] = []
    names: dict[str, Path] = {}
    for source in sources:
        folder = source if source.is_dir() else source.parent
        if out == folder or out == source:
            raise UserError(f"--out {out} is an input folder; choose another folder (inputs are never written to)")
        name = f"{nifti_stem(source)}.nii.gz"
        if name in names:
            raise UserError(f"{source} and {names[name]} would both be written as {out / name}; "
                            "run them separately or rename one")
        names[name] = source
        target = out / name
        if target.exists() and not overwrite:
            raise UserError(f"{target} exists; pass --overwrite to replace it")
        jobs.append(Job(source, target))
    return jobs


def infer(checkpoint: Path, inputs: list[str], out: Path, patch_size: int | None, overlap: float | None,
          batch_size: int | None, blending: str | None, device: str, precision: str, overwrite: bool,
          previews: bool = True, prefetch: bool = True, drf: int | None = None) -> int:
    """Run the checkpoint's model over every input; returns the exit code (1 if any input failed).

    With ``previews``, ``OUT/previews/<name>.png`` shows coronal MIPs of each input and its output.
    With ``prefetch``, volume k+1 is read and volume k-1 written in threads while volume k is inferred.
    With ``drf``, a guided model is conditioned on that DRF instead of its dose head's prediction.
    ``precision``: auto (bf16 where the device runs it natively, else fp32), fp32, bf16 or fp16.
    """
    from rich.console import Console

    from lowdose_toolkit.core.checkpoint import load_checkpoint
    from lowdose_toolkit.core.device import resolve_device
    from lowdose_toolkit.infer.export import is_exported
    from lowdose_toolkit.infer.pipeline import denoise_all, write_summary
    from lowdose_toolkit.infer.predictor import Predictor

    console = Console(stderr=True)
    exported = is_exported(checkpoint)
    ckpt = None if exported else load_checkpoint(checkpoint)
    jobs = plan_jobs(expand_inputs(inputs), out, overwrite)
    dev = resolve_device(device)
    window = {"patch_size": patch_size, "overlap": None if overlap is None else (int(overlap) if overlap >= 1
                                                                                 else overlap),
              "batch_size": batch_size, "blending": blending}
    if ckpt is None:
        predictor = Predictor.from_exported(checkpoint, dev, precision.replace("none", "fp32"), **window)
    else:
        predictor, _ = Predictor.from_checkpoint(ckpt, dev, precision.replace("none", "fp32"), **window)
    runs_on = predictor.exported.runs_on if predictor.exported is not None else str(dev)
    drf_class = predictor.drf_class(drf)
    conditioned = None
    if predictor.guided and predictor.dose_head is not None:
        conditioned = f"DRF {drf} (--drf)" if drf is not None else "dose head"
    out.mkdir(parents=True, exist_ok=True)
    rows = denoise_all(predictor, jobs, out, console, previews=previews, prefetch=prefetch, drf_class=drf_class,
                       conditioned_on=conditioned)
    assert predictor.normalization is not None
    write_summary(rows, out, {"checkpoint": str(checkpoint), "model_format": predictor.exported.format
                              if predictor.exported is not None else "checkpoint",
                              "normalization": predictor.normalization.method, "precision": predictor.precision,
                              "device": runs_on})
    failed = sum(row["status"] == "failed" for row in rows)
    console.print(f"{len(rows) - failed}/{len(rows)} volumes written to {out} (summary.csv; {predictor.precision} on "
                  f"{runs_on})")
    return 1 if failed else 0


def infer_cmd(
    checkpoint: Path = typer.Argument(..., help="Checkpoint (.pt), run directory, or a file from ldt export."),
    inputs: list[str] = typer.Argument(..., help="NIfTI files, folders, globs, DICOM folders or a manifest CSV."),
    out: Path = typer.Option(..., "--out", help="Output folder (never an input folder)."),
    patch_size: int | None = typer.Option(None, "--patch-size", help="Sliding-window patch (default: recipe)."),
    overlap: float | None = typer.Option(None, "--overlap", help="Overlap: voxels, or a fraction < 1."),
    batch_size: int | None = typer.Option(None, "--batch-size"),
    blending: str | None = typer.Option(None, "--blending", help="hann | average | crop"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    precision: str = typer.Option(
        "auto", "--precision", "--amp", help="auto (bf16 where the device runs it natively, else fp32) | fp32 | bf16 "
                                             "| fp16, on CPU and CUDA"
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs."),
    previews: bool = typer.Option(True, "--previews/--no-previews", help="Coronal MIP PNGs in OUT/previews."),
    prefetch: bool = typer.Option(
        True, "--prefetch/--no-prefetch", help="Read the next and write the previous volume meanwhile (more memory)."
    ),
    drf: int | None = typer.Option(
        None, "--drf", help="Known dose reduction factor of every input: a guided model is conditioned on it "
                            "instead of its dose head's prediction (which is still reported)."
    ),
) -> None:
    """Denoise whole volumes with a trained model (sliding window, affine and header kept)."""
    raise typer.Exit(infer(checkpoint, inputs, out, patch_size, overlap, batch_size, blending, device, precision,
                           overwrite,
                           previews, prefetch, drf))
