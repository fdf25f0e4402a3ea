"""``ldt infer``: batch denoising of whole volumes with a trained checkpoint.

The checkpoint alone is enough: its recipe names the parts (their plugins must be installed), its
weights fill them, and its normalisation method is applied to each input and inverted on output.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowdose_toolkit.errors import UserError
from lowdose_toolkit.naming import is_nifti, nifti_stem


class Inline:
    """An executor that runs each task when it is submitted: ``ldt infer --no-prefetch``."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:  # noqa: BLE001 - handed to the caller through the future, as a thread would
            future.set_exception(exc)
        return future

    def __enter__(self) -> Inline:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


@dataclass(frozen=True)
class Job:
    """One input volume and where its prediction goes."""

    source: Path
    output: Path


def _from_manifest(path: Path) -> list[Path]:
    """The manifest's low-dose volumes (rows whose drf is not ``full``); only its ``path`` column is required."""
    from lowdose_toolkit.manifest import read_manifest

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
          batch_size: int | None, blending: str | None, device: str, amp: str, overwrite: bool,
          previews: bool = True, prefetch: bool = True, drf: int | None = None) -> int:
    """Run the checkpoint's model over every input; returns the exit code (1 if any input failed).

    With ``previews``, ``OUT/previews/<name>.png`` shows coronal MIPs of each input and its output.
    With ``prefetch``, volume k+1 is read and volume k-1 written in threads while volume k is inferred
    (two inputs and two outputs in memory); without, one volume at a time. With ``drf``, a guided model is
    conditioned on that DRF instead of its dose head's prediction.
    """
    from concurrent.futures import ThreadPoolExecutor, wait

    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lowdose_toolkit.atomic import atomic_path
    from lowdose_toolkit.engine import load_checkpoint, resolve_device
    from lowdose_toolkit.errors import DataError
    from lowdose_toolkit.io import load_array, save_like
    from lowdose_toolkit.normalize import LEGACY_QUANTILE, fit_normalization
    from lowdose_toolkit.predict import predict_volume
    from lowdose_toolkit.preview import ras_mip, save_mips_png
    from lowdose_toolkit.runeval import model_from_checkpoint

    console = Console(stderr=True)
    ckpt = load_checkpoint(checkpoint)
    jobs = plan_jobs(expand_inputs(inputs), out, overwrite)
    dev = resolve_device(device)
    model, recipe = model_from_checkpoint(ckpt, dev)
    cfg = recipe["eval"]
    precision = recipe["train"]["amp"] if amp == "auto" else amp
    if precision not in ("none", "bf16", "fp16"):
        raise UserError(f"--amp {amp!r}: use auto, none, bf16 or fp16")
    use_amp = precision != "none" and dev.type == "cuda"
    method = ckpt["normalization"]["method"]
    quantile = ckpt["normalization"].get("quantile", LEGACY_QUANTILE)
    drfs: list[int] = list(ckpt["drfs"])
    drf_class: int | None = None
    if drf is not None:
        if model.guidance is None:
            raise UserError(f"--drf {drf}: this checkpoint's model is not guided by a dose head (no model.guidance "
                            "in its recipe), so a stated DRF cannot change its output; leave --drf out")
        if drf not in drfs:
            raise UserError(f"--drf {drf}: the model was trained on DRFs {drfs}; give one of them")
        drf_class = drfs.index(drf)
    window = {"patch_size": patch_size or cfg["patch_size"],
              "overlap": cfg["overlap"] if overlap is None else (int(overlap) if overlap >= 1 else overlap),
              "batch_size": batch_size or cfg["batch_size"], "blending": blending or cfg["blending"]}
    out.mkdir(parents=True, exist_ok=True)

    def read(job: Job) -> tuple[torch.Tensor, Any, Any, Any, float]:
        """Reader thread: load and fit the normalisation (nibabel/zlib release the GIL meanwhile)."""
        t0 = time.monotonic()
        volume, affine, info = load_array(job.source)
        norm = fit_normalization(volume, method, None, where=str(job.source), quantile=quantile)
        return volume, affine, info, norm, time.monotonic() - t0

    def write(volume: torch.Tensor, job: Job, mips: list[tuple[str, Any]], title: str) -> float:
        """Writer thread: save atomically (temp file + rename), then the preview; returns the seconds."""
        t0 = time.monotonic()
        save_like(volume, job.source, job.output)
        if mips:
            save_mips_png(mips, out / "previews" / f"{nifti_stem(job.output)}.png", title=title)
        return time.monotonic() - t0

    def denoise(volume: torch.Tensor, affine: Any, norm: Any) -> tuple[torch.Tensor, list[tuple[str, Any]], dict]:
        """Sliding-window prediction (normalised units), the preview MIPs (if wanted), the dose head's verdict."""
        with torch.no_grad():
            pred, probs = predict_volume(model, norm.apply(volume), window, dev, amp=use_amp, drf_class=drf_class)
        mips = []
        if previews:
            mips = [("input", ras_mip(volume, affine)), ("denoised", ras_mip(pred, affine) * norm.scale)]
        dose: dict[str, Any] = {}
        if probs is not None:
            k = int(probs.argmax())
            dose = {"predicted_drf": drfs[k], "drf_probability": round(float(probs[k]), 4)}
            if model.guidance is not None:
                dose["conditioned_on"] = f"DRF {drf} (--drf)" if drf is not None else "dose head"
        return pred, mips, dose

    def fail(row: dict[str, Any], source: Path, exc: Exception) -> None:
        row.update(status="failed", error=str(exc))
        console.print(f"[red]failed[/] {source}: {exc}")

    # A three-stage pipeline: volume k+1 is read and volume k-1 written while volume k is inferred, so
    # for a folder of scans the decompression and compression of NIfTI files hide behind the model.
    # At most two inputs and two outputs are in memory at a time.
    rows: list[dict[str, Any]] = []
    writes: list[tuple[dict[str, Any], Job, Future[float], float]] = []
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with (
        ThreadPoolExecutor(1, thread_name_prefix="ldt-read") if prefetch else Inline() as reader,
        ThreadPoolExecutor(1, thread_name_prefix="ldt-write") if prefetch else Inline() as writer,
        Progress(*columns, console=console) as progress,
    ):
        task = progress.add_task("denoising", total=len(jobs))
        reads = {0: reader.submit(read, jobs[0])}
        try:
            for i, job in enumerate(jobs):
                if i + 1 < len(jobs) and prefetch:
                    reads[i + 1] = reader.submit(read, jobs[i + 1])
                elif i not in reads:
                    reads[i] = reader.submit(read, job)
                row: dict[str, Any] = {"input": str(job.source), "output": str(job.output)}
                rows.append(row)
                try:
                    volume, affine, info, norm, seconds = reads.pop(i).result()  # popped: freed early
                    t0 = time.monotonic()
                    pred, mips, dose = denoise(volume, affine, norm)
                    del volume
                    row.update(status="ok", shape="x".join(map(str, info.shape)), **dose)
                    title = nifti_stem(job.source)
                    if dose:
                        title += f" - predicted DRF {dose['predicted_drf']} ({dose['drf_probability']:.0%})"
                    if writes:
                        wait([writes[-1][2]])  # one write behind at most
                    future = writer.submit(write, norm.invert(pred), job, mips, title)
                    del pred
                    future.add_done_callback(lambda _: progress.advance(task))
                    writes.append((row, job, future, seconds + time.monotonic() - t0))
                except (DataError, UserError) as exc:
                    fail(row, job.source, exc)
                    progress.advance(task)
        except BaseException:  # Ctrl-C: drop the queued read; the running write finishes (atomically)
            for pending in reads.values():
                pending.cancel()
            raise
        for row, job, future, seconds in writes:
            try:
                row["seconds"] = round(seconds + future.result(), 2)
            except (DataError, UserError, OSError) as exc:
                fail(row, job.source, exc)
    failed = sum(row["status"] == "failed" for row in rows)
    fields = ["input", "output", "status", "shape", "seconds", "predicted_drf", "drf_probability", "conditioned_on",
              "error"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(out / "summary.csv") as tmp:
        tmp.write_text(buf.getvalue())
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps({"checkpoint": str(checkpoint), "normalization": method, "volumes": rows}, indent=2))
    console.print(f"{len(rows) - failed}/{len(rows)} volumes written to {out} (summary.csv)")
    return 1 if failed else 0
