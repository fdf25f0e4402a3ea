"""Evaluate a trained run on its held-out test subjects (the paper's protocol, on our data).

For every test subject and DRF: the model's whole-volume prediction (sliding window) and the
low-dose input itself (the "Low-Dose" row) are compared with the full-dose reference using the
challenge's metrics. Rows go to ``results.csv`` (``method, subject, drf, psnr, ssim, nrmse``; NRMSE
as a fraction) and a per-DRF summary to ``results.json`` / ``results.md`` in the run directory.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lowdose_toolkit.atomic import atomic_path
from lowdose_toolkit.errors import RecipeError, UserError

LOW_DOSE = "Low-Dose"
COLUMNS = ("method", "subject", "drf", "psnr", "ssim", "nrmse")


def model_from_checkpoint(ckpt: Mapping[str, Any], device: torch.device) -> Any:
    """Rebuild the synthesis model of a checkpoint (its recipe names the parts) and load its weights."""
    from lowdose_toolkit.model import build_model
    from lowdose_toolkit.plugins import get_registry
    from lowdose_toolkit.recipe import resolve_recipe

    registry = get_registry()
    try:
        recipe = resolve_recipe(ckpt["recipe"], registry, "checkpoint recipe")
        model, _ = build_model(recipe, registry)
    except RecipeError as exc:
        raise RecipeError(f"{exc} -- the checkpoint was trained with a part that is not installed here; "
                          "install the plugin that provides it (see `ldt plugins`)") from None
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), recipe


def write_case_rows(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Per-case rows (``method, subject, drf, psnr, ssim, nrmse``) as CSV, atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS))
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def by_drf(summary: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Summary rows ordered by DRF, the Low-Dose input first within each DRF (the paper's layout)."""
    return sorted(summary, key=lambda s: (s["drf"], s["method"] != LOW_DOSE, s["method"]))


def evaluate_run(
    run_dir: Path,
    method: str | None = None,
    checkpoint: str = "best",
    device: str = "auto",
    save_predictions: bool = False,
    console: Any = None,
) -> list[dict[str, Any]]:
    """Evaluate ``run_dir``'s checkpoint on its test split; write and return the per-DRF summary."""
    from rich.progress import Progress

    from lowdose_toolkit.data import pairs_dataset
    from lowdose_toolkit.engine import load_checkpoint, resolve_device
    from lowdose_toolkit.evaluate import aggregate, summary_markdown
    from lowdose_toolkit.metrics import compute_all
    from lowdose_toolkit.plugins import get_registry
    from lowdose_toolkit.sliding import infer_volume

    run_dir = Path(run_dir)
    path = run_dir / "checkpoints" / f"{checkpoint}.pt"
    if not path.is_file():
        raise UserError(f"{run_dir}: no checkpoints/{checkpoint}.pt; is this a finished run directory?")
    ckpt = load_checkpoint(path)
    dev = resolve_device(device)
    model, recipe = model_from_checkpoint(ckpt, dev)
    method = method or recipe["name"]
    registry = get_registry()
    drfs = list(ckpt["drfs"])
    source = registry.build("source", recipe["data"]["source"], "data.source", context={"drfs": drfs})
    test_ids = set(ckpt["split"]["test"])
    records = [r for r in source.records() if r.subject in test_ids]
    if not records:
        raise UserError(f"{run_dir}: the run has no test subjects (data.split.test is 0)")
    dataset = pairs_dataset(records, drfs, recipe["data"]["normalization"])
    cfg = recipe["eval"]
    amp = recipe["train"]["amp"] != "none" and dev.type == "cuda"
    rows: list[dict[str, Any]] = []
    with Progress(console=console, transient=True) as progress, torch.no_grad():
        task = progress.add_task("evaluating test subjects", total=len(dataset))
        for i in range(len(dataset)):
            subject = dataset[i]
            low, full = subject["low"].data.float(), subject["full"].data.float()
            pred = infer_volume(low, model.predict, patch_size=cfg["patch_size"], overlap=cfg["overlap"],
                                batch_size=cfg["batch_size"], blending=cfg["blending"], device=dev, amp=amp)
            sid, drf = subject["subject_id"], int(subject["drf"])
            for name, image in ((LOW_DOSE, low), (method, pred)):
                m = compute_all(full[0], image[0], ssim_range=cfg["ssim_range"])
                rows.append({"method": name, "subject": sid, "drf": drf,
                             "psnr": m["psnr"], "ssim": m["ssim"], "nrmse": m["nrmse"]})
            if save_predictions:
                from lowdose_toolkit.io import save_like

                scale = float(subject["scale"])
                save_like(pred * scale, subject["low"].path, run_dir / "predictions" / f"{sid}_drf_{drf:03d}.nii.gz")
            progress.advance(task)
    summary = by_drf(aggregate(rows))
    write_case_rows(rows, run_dir / "results.csv")
    meta = {"method": method, "checkpoint": str(path), "epoch": ckpt["epoch"], "ssim_range": cfg["ssim_range"],
            "test_subjects": sorted(test_ids), "summary": summary}
    with atomic_path(run_dir / "results.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=2))
    with atomic_path(run_dir / "results.md") as tmp:
        tmp.write_text(f"### {method} on held-out test subjects\n\n"
                       + summary_markdown(summary, {"ssim_range": cfg["ssim_range"], "mask": False}))
    return summary
