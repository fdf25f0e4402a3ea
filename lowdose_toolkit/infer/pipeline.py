"""The batch pipeline of ``ldt infer``: read, denoise and write whole volumes, overlapped in threads.

Volume k+1 is read and volume k-1 written while volume k is denoised, so for a folder of scans the
decompression and compression of NIfTI files hide behind the model; at most two inputs and two outputs
are in memory at a time. Each volume's failure is one row of the summary; the batch goes on.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from lowdose_toolkit.core.atomic import atomic_path
from lowdose_toolkit.data.naming import nifti_stem
from lowdose_toolkit.errors import DataError, UserError
from lowdose_toolkit.infer.predictor import Predictor

SUMMARY_FIELDS = ("input", "output", "status", "shape", "seconds", "predicted_drf", "drf_probability",
                  "conditioned_on", "error")


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


def denoise_all(predictor: Predictor, jobs: Sequence[Any], out: Path, console: Any, previews: bool = True,
                prefetch: bool = True, drf_class: int | None = None, conditioned_on: str | None = None
                ) -> list[dict[str, Any]]:
    """Denoise every job (``source`` -> ``output``); returns one summary row per job, in order."""
    from concurrent.futures import ThreadPoolExecutor, wait

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lowdose_toolkit.data.io import load_array, save_like
    from lowdose_toolkit.data.normalize import fit_normalization
    from lowdose_toolkit.infer.preview import ras_mip, save_mips_png

    norm_cfg = predictor.normalization
    assert norm_cfg is not None, "a batch predictor is built from a checkpoint"

    def read(job: Any) -> tuple[torch.Tensor, Any, Any, Any, float]:
        """Reader thread: load and fit the normalisation (nibabel/zlib release the GIL meanwhile)."""
        t0 = time.monotonic()
        volume, affine, info = load_array(job.source)
        norm = fit_normalization(volume, norm_cfg.method, None, where=str(job.source), quantile=norm_cfg.quantile)
        return volume, affine, info, norm, time.monotonic() - t0

    def write(volume: torch.Tensor, job: Any, mips: list[tuple[str, Any]], title: str) -> float:
        """Writer thread: save atomically (temp file + rename), then the preview; returns the seconds."""
        t0 = time.monotonic()
        save_like(volume, job.source, job.output)
        if mips:
            save_mips_png(mips, out / "previews" / f"{nifti_stem(job.output)}.png", title=title)
        return time.monotonic() - t0

    def denoise(volume: torch.Tensor, affine: Any, norm: Any) -> tuple[torch.Tensor, list[tuple[str, Any]], dict]:
        """The prediction (normalised units), the preview MIPs (if wanted), the dose head's verdict."""
        pred, probs = predictor.predict(norm.apply(volume), drf_class)
        mips = []
        if previews:
            mips = [("input", ras_mip(volume, affine)), ("denoised", ras_mip(pred, affine) * norm.scale)]
        dose = predictor.verdict(probs)
        if dose and conditioned_on:
            dose["conditioned_on"] = conditioned_on
        return pred, mips, dose

    def fail(row: dict[str, Any], source: Path, exc: Exception) -> None:
        row.update(status="failed", error=str(exc))
        console.print(f"[red]failed[/] {source}: {exc}")

    rows: list[dict[str, Any]] = []
    writes: list[tuple[dict[str, Any], Any, Future[float], float]] = []
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
    return rows


def write_summary(rows: Sequence[Mapping[str, Any]], out: Path, meta: Mapping[str, Any]) -> None:
    """``summary.csv`` (one row per volume) and ``summary.json`` (``meta`` + the rows), atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(out / "summary.csv") as tmp:
        tmp.write_text(buf.getvalue())
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps({**meta, "volumes": list(rows)}, indent=2))
