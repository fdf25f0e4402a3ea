"""The batch pipeline of ``ldt infer``: read, denoise and write whole volumes, overlapped in threads.

Volume k+1 is read and volume k-1 written while volume k is denoised, so for a folder of scans the
decompression and compression of NIfTI files hide behind the model; at most two inputs and two outputs
are in memory at a time. Each volume's failure, whatever it is (a bad file, a header declaring more
memory than the machine has, a non-finite prediction, CUDA running out of memory, a full disk), is one
summary row and one console line naming the file; the batch goes on. Each row is updated in place as
its volume goes through, so a caller that writes the summary in a ``finally`` covers an interrupted
batch too: what was not written is ``not done``.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from lowdose_toolkit.core.atomic import TEXT, atomic_path
from lowdose_toolkit.data.naming import nifti_stem
from lowdose_toolkit.errors import DataError, UserError
from lowdose_toolkit.infer.predictor import Predictor

SUMMARY_FIELDS = ("input", "output", "status", "shape", "seconds", "predicted_drf", "drf_probability",
                  "conditioned_on", "dose_level", "strength", "consistency", "suv_factor", "error")
OK, FAILED, SKIPPED, NOT_DONE = "ok", "failed", "skipped", "not done"
_MAX_ERROR = 400


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


def describe(exc: BaseException) -> str:
    """One line for a volume's failure: a UserError's own message, else the exception's type and message.

    Running out of memory (host or device) gets the options that need less.
    """
    text = " ".join(str(exc).split())
    if not isinstance(exc, UserError):  # our own messages are one line already; others can be pages
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
        if len(text) > _MAX_ERROR:
            text = text[: _MAX_ERROR - 3] + "..."
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower():
        text += ("; the device ran out of memory: lower --batch-size or --patch-size, use --precision bf16, "
                 "or --device cpu")
    elif isinstance(exc, MemoryError):
        text += "; the machine ran out of memory: free memory, or pass --no-prefetch (one volume at a time)"
    return text


def summary_row(job: Any) -> dict[str, Any]:
    """A job's summary row before it runs: the input as the user gave it, the output, status ``not done``."""
    given = getattr(job, "given", None) or job.source
    return {"input": str(given), "output": str(job.output), "status": NOT_DONE}


def suv_factor_for(job: Any, override: float | None) -> tuple[float, str]:
    """The SUV factor of a job's input: ``override`` (``--suv-factor``), the manifest's, a sidecar's or the
    DICOM header's; a DataError saying how to give one when none is known."""
    from lowdose_toolkit.data.normalize import SUV_HOW, check_suv_factor, sidecar, suv_factor_of

    if override is not None:
        return check_suv_factor(override, "--suv-factor"), "--suv-factor"
    given = getattr(job, "given", None) or job.source
    if getattr(job, "suv_factor", None) is not None:
        where = getattr(job, "suv_source", "") or "manifest"
        return check_suv_factor(job.suv_factor, where), where
    factor, where = suv_factor_of(job.source, given)
    if factor is None:
        raise DataError(f"{given}: the checkpoint was trained on SUV (data.normalization: suv) and this input's "
                        f"SUV factor is unknown ({where}); " + SUV_HOW.format(sidecar=sidecar(given)))
    return factor, where


def denoise_all(predictor: Predictor, jobs: Sequence[Any], out: Path, console: Any, previews: bool = True,
                prefetch: bool = True, drf_class: int | None = None, conditioned_on: str | None = None,
                rows: Sequence[dict[str, Any]] | None = None, suv_factor: float | None = None,
                derivation: Any = None) -> list[dict[str, Any]]:
    """Denoise every job (``source`` -> ``output``); returns one summary row per job, in order.

    ``rows`` (one per job, from :func:`summary_row`) are updated in place as the volumes go through.
    ``suv_factor`` overrides every input's (for a model trained on SUV). A job whose ``format`` is
    ``dicom`` is written as a new DICOM series described by ``derivation`` (a
    :class:`~lowdose_toolkit.data.dicom_out.Derivation`: model, recipe, version), the rest as NIfTI.
    Before a volume is read, the memory it needs is checked against what is available
    (:mod:`lowdose_toolkit.infer.memory`).
    KeyboardInterrupt and SystemExit stop the batch (the write under way finishes, atomically) and are
    re-raised with the unwritten rows ``not done``.
    """
    from concurrent.futures import ThreadPoolExecutor, wait

    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lowdose_toolkit.data import dicom_out
    from lowdose_toolkit.data.io import load_array, save_like
    from lowdose_toolkit.data.normalize import fit_normalization
    from lowdose_toolkit.infer.consistency import WORKING_COPIES as GUARD_COPIES
    from lowdose_toolkit.infer.memory import check_memory
    from lowdose_toolkit.infer.predictor import check_finite
    from lowdose_toolkit.infer.preview import SUV, Panel, input_units, ras_mip, save_mips_png

    norm_cfg = predictor.normalization
    assert norm_cfg is not None, "a batch predictor is built from a checkpoint"
    rows = [summary_row(job) for job in jobs] if rows is None else list(rows)
    if len(rows) != len(jobs):
        raise ValueError(f"{len(rows)} summary rows for {len(jobs)} jobs")

    def label(job: Any) -> str:
        return str(getattr(job, "given", None) or job.source)

    def read(job: Any, row: dict[str, Any]) -> tuple[torch.Tensor, Any, Any, Any, float]:
        """Reader thread: check the memory, load, fit the normalisation (nibabel/zlib release the GIL meanwhile)."""
        t0 = time.monotonic()
        check_memory(job.source, extra_copies=0 if predictor.consistency is None else GUARD_COPIES)
        factor = None
        if norm_cfg.method == "suv":
            factor, row["suv_source"] = suv_factor_for(job, suv_factor)
            row["suv_factor"] = factor
        volume, affine, info = load_array(job.source)
        norm = fit_normalization(volume, norm_cfg.method, factor, where=label(job), quantile=norm_cfg.quantile)
        return volume, affine, info, norm, time.monotonic() - t0

    def say(kind: str, job: Any, text: str) -> None:
        """One console line naming the input (once: most messages start with it already)."""
        name = label(job)
        line = text if text.startswith(f"{name}: ") else f"{name}: {text}"
        console.print(f"{kind} {escape(line)}", soft_wrap=True)

    def fail(row: dict[str, Any], job: Any, exc: BaseException) -> None:
        row.update(status=FAILED, error=describe(exc))
        say("[red]failed[/]", job, row["error"])

    def no_preview(row: dict[str, Any], job: Any, exc: BaseException) -> None:
        """A preview that cannot be drawn (e.g. a degenerate affine) is noted; the prediction stands."""
        row["error"] = f"no preview: {describe(exc)}"
        say("[yellow]warning[/]", job, row["error"])

    def write(volume: torch.Tensor, job: Any, row: dict[str, Any], mips: tuple[list[Panel], str], title: str,
              seconds: float, note: str = "") -> None:
        """Writer thread: save atomically (temp file or folder + rename), then the preview; the row says how it went."""
        t0 = time.monotonic()
        try:
            if getattr(job, "format", "nifti") == "dicom":
                made_by = derivation or dicom_out.Derivation()
                dicom_out.save_dicom_like(volume, job.source, job.output, replace(made_by, note=note))
            else:
                save_like(volume, job.source, job.output)
        except Exception as exc:  # noqa: BLE001 - any failure is this volume's, reported in its row
            fail(row, job, exc)
            return
        row.update(status=OK, seconds=round(seconds + time.monotonic() - t0, 2))
        if mips[0]:
            try:
                save_mips_png(mips[0], out / "previews" / f"{nifti_stem(job.output)}.png", title=title, units=mips[1],
                              difference_to=0, difference_label="denoised − input")
            except Exception as exc:  # noqa: BLE001
                no_preview(row, job, exc)

    def denoise(job: Any, row: dict[str, Any], volume: torch.Tensor, affine: Any, info: Any, norm: Any
                ) -> tuple[torch.Tensor, tuple[list[Panel], str], dict]:
        """The prediction in the input's units, the preview MIPs (if wanted) with their units, the dose head's
        verdict. The previews of a model trained on SUV are in SUV (the input's factor), else in the input's units."""
        pred, probs = predictor.predict(norm.apply(volume), drf_class, spacing=info.spacing)
        pred = norm.invert(pred)
        check_finite(pred, label(job), predictor.precision)
        mips: tuple[list[Panel], str] = ([], "")
        if previews:
            try:
                factor, units = (row["suv_factor"], SUV) if row.get("suv_factor") else (1.0, input_units(job.source))
                mips = ([Panel("input", ras_mip(volume, affine) * factor),
                         Panel("denoised", ras_mip(pred, affine) * factor)], units)
            except Exception as exc:  # noqa: BLE001
                no_preview(row, job, exc)
        dose = predictor.verdict(probs)
        how = conditioned_on
        if how and drf_class is None and predictor.per_window:  # too small for the whole volume's reading
            how = f"dose head per window ({predictor.per_window})"
        if dose and how and predictor.code_used is not None:  # the head's continuous dose level
            dose["conditioned_on"] = f"{how}: dose level {predictor.applied['dose_level']:.1f} via the " \
                                     f"{predictor.code_used}"
        elif dose and how:
            cls = drf_class if drf_class is not None else predictor.drfs.index(dose["predicted_drf"])
            code = predictor.code_drf(cls)
            mapped = code is not None and code != predictor.drfs[cls]
            dose["conditioned_on"] = f"{how} via the DRF {code} code" if mapped else how
        dose.update({k: round(v, 4) for k, v in predictor.applied.items()})  # dose level, strength, consistency
        return pred, mips, dose

    def recover() -> None:
        """After a failure on the device, give its cached memory back so the next volume has it."""
        if predictor.device.type == "cuda":
            torch.cuda.empty_cache()

    if not jobs:
        return rows
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with (
            ThreadPoolExecutor(1, thread_name_prefix="ldt-read") if prefetch else Inline() as reader,
            ThreadPoolExecutor(1, thread_name_prefix="ldt-write") if prefetch else Inline() as writer,
            Progress(*columns, console=console) as progress,
        ):
            task = progress.add_task("denoising", total=len(jobs))
            reads: dict[int, Future[Any]] = {}
            last_write: Future[Any] | None = None
            try:
                for i, (job, row) in enumerate(zip(jobs, rows, strict=True)):
                    if i not in reads:
                        reads[i] = reader.submit(read, job, row)
                    if i + 1 < len(jobs) and prefetch:
                        reads[i + 1] = reader.submit(read, jobs[i + 1], rows[i + 1])
                    try:
                        volume, affine, info, norm, seconds = reads.pop(i).result()  # popped: freed early
                        t0 = time.monotonic()
                        pred, mips, dose = denoise(job, row, volume, affine, info, norm)
                        del volume
                        row.update(shape="x".join(map(str, info.shape)), **dose)
                        title, note = nifti_stem(job.output), ""
                        if "predicted_drf" in dose:
                            verdict = f"predicted DRF {dose['predicted_drf']} ({dose['drf_probability']:.0%})"
                            if "strength" in dose:  # a fitted strength: the level it followed and what it applied
                                verdict += f", dose level {dose['dose_level']:.1f}, strength {dose['strength']:.2f}"
                            title += f" - {verdict}"
                            note = verdict + (f", conditioned on: {conditioned_on}" if conditioned_on else "")
                        if last_write is not None:
                            wait([last_write])  # one write behind at most
                        last_write = writer.submit(write, pred, job, row, mips, title,
                                                   seconds + time.monotonic() - t0, note)
                        del pred
                        last_write.add_done_callback(lambda _: progress.advance(task))
                    except Exception as exc:  # noqa: BLE001 - any failure is this volume's; the batch goes on
                        fail(row, job, exc)
                        recover()
                        progress.advance(task)
                if last_write is not None:  # the bar ends at N/N while it is still drawn
                    wait([last_write])
                progress.update(task, completed=len(jobs))
            except BaseException:  # Ctrl-C: drop the queued read; the running write finishes (atomically)
                for pending in reads.values():
                    pending.cancel()
                raise
    finally:  # the executors are shut down: every row says what became of its volume
        for row in rows:
            if row["status"] == NOT_DONE:
                row.setdefault("error", "not run: the batch was stopped before this volume was written")
    return rows


def previous_rows(out: Path) -> dict[str, dict[str, Any]]:
    """The rows of an earlier ``summary.json`` in ``out`` by output path (empty if none or unreadable)."""
    try:
        volumes = json.loads((out / "summary.json").read_text()).get("volumes", [])
        return {str(row["output"]): row for row in volumes if isinstance(row, dict) and "output" in row}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def write_summary(rows: Sequence[Mapping[str, Any]], out: Path, meta: Mapping[str, Any]) -> None:
    """``summary.csv`` (one row per volume) and ``summary.json`` (``meta`` + the rows), atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(out / "summary.csv") as tmp:
        tmp.write_text(buf.getvalue(), **TEXT)
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps({**meta, "volumes": list(rows)}, indent=2), **TEXT)
