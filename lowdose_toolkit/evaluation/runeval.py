"""Evaluate a trained run on its held-out test subjects (the paper's protocol, on our data).

For every test subject and DRF: the model's whole-volume prediction (sliding window) and the
low-dose input itself (the "Low-Dose" row) are compared with the full-dose reference using the
challenge's metrics. Rows and the per-DRF summary go to ``results.json`` (kind ``run``, see
:mod:`lowdose_toolkit.evaluation.results`), the rows also to ``results.csv`` (``method, subject, drf, psnr, ssim,
nrmse, ssim_range, masked``; NRMSE as a fraction) and the summary to ``results.md``, in the run
directory, or in ``RUN_DIR/body_mask/`` for an evaluation inside a body mask (so the whole-volume
results, the paper's protocol, are never replaced by masked ones).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lowdose_toolkit.core.atomic import TEXT, atomic_path
from lowdose_toolkit.errors import UserError

LOW_DOSE = "Low-Dose"
MASK_DIR = "body_mask"


def dose_head_markdown(record: Mapping[str, Any]) -> str:
    """The dose head's accuracy and confusion matrix (rows: true DRF, columns: predicted) as Markdown."""
    drfs = record["drfs"]
    role = "guides the generator" if record["guides"] else "auxiliary (does not reach the image)"
    lines = [f"Dose head `{record['head']}` ({role}): predicted DRF correct for "
             f"{100 * record['accuracy']:.1f} % of {record['volumes']} test volumes.", "",
             "| true \\ predicted | " + " | ".join(f"DRF {d}" for d in drfs) + " |",
             "|---|" + "---|" * len(drfs)]
    for d, row in zip(drfs, record["confusion"], strict=True):
        lines.append(f"| DRF {d} | " + " | ".join(str(n) for n in row) + " |")
    return "\n".join(lines) + "\n"


def print_dose_head(results: Path, console: Any) -> None:
    """Print the dose head's test accuracy and confusion matrix from ``results`` (a results.json), if any."""
    from rich.table import Table

    from lowdose_toolkit.evaluation.results import read_results

    record = read_results(results).extra.get("dose_head")
    if not record:
        return
    console.print(f"dose head {record['head']}: predicted DRF right for {100 * record['accuracy']:.0f} % of "
                  f"{record['volumes']} test volumes (rows: true DRF, columns: predicted)")
    table = Table()
    table.add_column("DRF")
    for d in record["drfs"]:
        table.add_column(str(d), justify="right")
    for d, row in zip(record["drfs"], record["confusion"], strict=True):
        table.add_row(str(d), *map(str, row))
    console.print(table)


def print_lesions(results: Path, console: Any) -> tuple[bool, bool]:
    """Print the lesion and organ summaries of ``results`` (a results.json), where it has them; whether it had
    each."""
    from lowdose_toolkit.evaluation.lesions import print_organs, print_summary
    from lowdose_toolkit.evaluation.results import read_results

    extra = read_results(results).extra
    lesions, organs = extra.get("lesions"), extra.get("organs")
    if lesions:
        print_summary(lesions["summary"], console, title="lesions: bias against the full dose (%)")
    if organs:
        print_organs(organs["summary"], console)
    return bool(lesions), bool(organs)


def by_drf(summary: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Summary rows ordered by DRF, the Low-Dose input first within each DRF (the paper's layout)."""
    return sorted(summary, key=lambda s: (s["drf"], s["method"] != LOW_DOSE, s["method"]))


def results_dir(run_dir: Path, out: Path | None = None, mask: bool = False) -> Path:
    """Where :func:`evaluate_run` writes: ``out``, else the run directory (``RUN_DIR/body_mask`` if masked)."""
    if out is not None:
        return Path(out)
    return Path(run_dir) / MASK_DIR if mask else Path(run_dir)


def lesion_cases_of(masks: Any, subject: Any, images: Mapping[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Lesion rows of one test volume (a pairs dataset's subject; every image in ``images``)."""
    from lowdose_toolkit.evaluation.lesions import volume_cases

    full = subject["full"]
    return volume_cases(masks, subject["subject_id"], int(subject["drf"]), full.path, full.data[0].numpy(),
                        {k: v[0].numpy() for k, v in images.items()}, full.affine)


def evaluate_run(
    run_dir: Path,
    method: str | None = None,
    checkpoint: str = "best",
    device: str = "auto",
    save_predictions: bool = False,
    console: Any = None,
    out: Path | None = None,
    ssim_range: str | None = None,
    mask: bool = False,
    mask_threshold: float = 0.01,
    lesions: str | None = "auto",
    consistency: bool | None = None,
) -> list[dict[str, Any]]:
    """Evaluate ``run_dir``'s checkpoint on its test split; write and return the per-DRF summary.

    Args:
        run_dir: A run directory (``ldt run``'s output).
        method: Name of the method's rows (default: the recipe's name).
        checkpoint: ``"best"`` (highest validation PSNR) or ``"last"``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        save_predictions: Also write each prediction as NIfTI (input units, input's affine) under
            ``<out>/predictions/``.
        console: Rich console for the progress bar.
        out: Folder for ``results.{csv,json,md}``; default the run directory, or
            ``RUN_DIR/body_mask`` when ``mask`` is set.
        ssim_range: ``"challenge"`` (data range 2) or ``"standard"`` (1); default the recipe's
            ``eval.ssim_range``.
        mask: Score inside a body mask of the full-dose reference (voxels above ``mask_threshold``
            times its maximum, see :func:`lowdose_toolkit.evaluation.metrics.body_mask`), for both rows.
        mask_threshold: Fraction of the reference maximum for the body mask.
        lesions: Also quantify lesions (:mod:`lowdose_toolkit.evaluation.lesions`): ``"phantom"`` (the
            phantom's own label maps), a folder of lesion masks, ``"auto"`` (the phantom's when the run trained
            on the phantom source, else none) or None; writes ``lesions.csv`` and a ``lesions`` summary in
            ``results.json`` and ``results.md``, and, where the masks name organs, ``organs.csv`` and an
            ``organs`` summary likewise.
        consistency: None: as the run's recipe says (``eval.consistency``); True: the guard on (the recipe's
            settings, else the defaults); False: off (:mod:`lowdose_toolkit.infer.consistency`).
    """
    from rich.progress import Progress

    from lowdose_toolkit.core.checkpoint import load_checkpoint
    from lowdose_toolkit.core.device import resolve_device
    from lowdose_toolkit.evaluation.metrics import body_mask, check_ssim_range, compute_all
    from lowdose_toolkit.evaluation.results import write_results
    from lowdose_toolkit.evaluation.subjects import subject_pairs
    from lowdose_toolkit.evaluation.summary import aggregate, summary_markdown
    from lowdose_toolkit.infer.precision import training_precision
    from lowdose_toolkit.infer.predictor import Predictor, confusion_matrix

    run_dir = Path(run_dir)
    if checkpoint not in ("best", "last"):
        raise UserError(f"checkpoint {checkpoint!r} is unknown; use best or last")
    path = run_dir / "checkpoints" / f"{checkpoint}.pt"
    if not path.is_file():
        raise UserError(f"{run_dir}: no checkpoints/{checkpoint}.pt; is this a finished run directory?")
    if not 0 < mask_threshold < 1:
        raise UserError(f"mask threshold must be in (0, 1) (a fraction of the reference maximum), got {mask_threshold}")
    ckpt = load_checkpoint(path)
    dev = resolve_device(device)
    # The precision validation used (the recipe's train.precision), so test and validation numbers agree.
    from lowdose_toolkit.core.spec import run_spec

    predictor, recipe = Predictor.from_checkpoint(ckpt, dev, "fp32")
    spec = run_spec(recipe)
    predictor.precision = training_precision(spec.precision, dev, spec.precision_cuda_only)
    from lowdose_toolkit.infer.consistency import Consistency

    predictor.consistency = Consistency.override(predictor.consistency, consistency)
    model = predictor.model
    method = method or recipe["name"]
    cfg = recipe["eval"]
    ssim_range = ssim_range or cfg["ssim_range"]
    check_ssim_range(ssim_range)
    out = results_dir(run_dir, out, mask)
    drfs = list(ckpt.drfs)
    if not ckpt.split["test"]:
        raise UserError(f"{run_dir}: the run has no test subjects (data.split.test is 0)")
    dataset = subject_pairs(recipe, ckpt.split["test"], drfs)
    masks = None
    automatic = lesions == "auto"
    if automatic:
        from lowdose_toolkit.evaluation.lesions import auto_masks

        lesions = auto_masks(recipe)
    if lesions is not None:
        from lowdose_toolkit.errors import DataError
        from lowdose_toolkit.evaluation.lesions import LesionMasks

        masks = LesionMasks(lesions)
        try:
            for item in dataset.dry_iter():  # every test subject's mask found before any inference
                masks.path(item["subject_id"], item["full"].path)
        except DataError as exc:
            if not automatic:
                raise
            masks = None  # asked for nothing: the scores without lesions, and why
            if console is not None:
                console.print(f"[yellow]lesions not scored[/]: {exc}", soft_wrap=True)
    lesion_cases: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    dose_true: list[int] = []
    dose_pred: list[int] = []
    with Progress(console=console, transient=True) as progress, torch.no_grad():
        task = progress.add_task("evaluating test subjects", total=len(dataset))
        for i in range(len(dataset)):
            subject = dataset[i]
            low, full = subject["low"].data.float(), subject["full"].data.float()
            pred, probs = predictor.predict(low, spacing=subject["low"].spacing)
            sid, drf = subject["subject_id"], int(subject["drf"])
            if probs is not None:
                dose_true.append(drfs.index(drf))
                dose_pred.append(int(probs.argmax()))
            region = body_mask(full[0], mask_threshold) if mask else None
            for name, image in ((LOW_DOSE, low), (method, pred)):
                m = compute_all(full[0], image[0], ssim_range=ssim_range, mask=region)
                rows.append({"method": name, "subject": sid, "drf": drf, "psnr": m["psnr"], "ssim": m["ssim"],
                             "nrmse": m["nrmse"], "ssim_range": ssim_range, "masked": mask})
            if masks is not None:
                lesion_cases += lesion_cases_of(masks, subject, {LOW_DOSE: low, method: pred})
            if save_predictions:
                from lowdose_toolkit.data.io import save_like

                scale = float(subject["scale"])
                save_like(pred * scale, subject["low"].path, out / "predictions" / f"{sid}_drf_{drf:03d}.nii.gz")
            progress.advance(task)
    summary = by_drf(aggregate(rows))
    settings: dict[str, Any] = {"ssim_range": ssim_range, "mask": mask}
    if predictor.consistency is not None:
        settings["consistency"] = predictor.consistency.as_dict()
    if mask:
        settings["mask_threshold"] = mask_threshold
    facts: dict[str, Any] = {"method": method, "checkpoint": str(path), "epoch": ckpt.epoch,
                             "test_subjects": sorted(set(ckpt.split["test"]))}
    text = f"### {method} on held-out test subjects\n\n" + summary_markdown(summary, settings)
    if dose_true:
        head = model.dose_head
        matrix = confusion_matrix(dose_true, dose_pred, len(drfs))
        accuracy = sum(t == p for t, p in zip(dose_true, dose_pred, strict=True)) / len(dose_true)
        facts["dose_head"] = {"head": head, "guides": model.guidance is not None, "drfs": drfs,
                              "accuracy": accuracy, "volumes": len(dose_true), "confusion": matrix}
        text += "\n" + dose_head_markdown(facts["dose_head"])
    if masks is not None:
        from lowdose_toolkit.evaluation import lesions as lesion_eval

        facts.update(lesion_eval.region_facts(lesions, lesion_cases))
        text += "\n### Lesions: bias against the full dose\n\n" + lesion_eval.region_report(facts)
        lesion_eval.write_region_files(lesion_cases, facts, out)
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(text, **TEXT)
    write_results(out, "run", rows, summary, settings, **facts)  # results.json, results.csv
    return summary
