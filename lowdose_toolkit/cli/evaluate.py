"""``ldt evaluate`` and ``ldt table``: score predictions and lay the results out like the paper.

The functions are plain typer commands; ``lowdose_toolkit.cli.app`` registers them. Heavy imports
(torch, nibabel) happen inside the functions so ``ldt --help`` stays fast.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import typer

from lowdose_toolkit.errors import UserError

SSIM_RANGES = ("challenge", "standard")


def _default_out(pred: Path) -> Path:
    """``preds/`` -> ``preds_eval/``; ``preds.csv`` -> ``preds_eval/`` beside it."""
    pred = Path(pred)
    name = pred.stem if pred.is_file() else pred.name
    return pred.parent / f"{name}_eval"


def evaluate(
    run_dir: Path | None = typer.Argument(
        None, help="Run directory: evaluate its test split (the alternative to --pred/--ref)."
    ),
    pred: Path | None = typer.Option(None, "--pred", help="Predictions: a folder of NIfTI files or a manifest CSV."),
    ref: Path | None = typer.Option(None, "--ref", help="Full-dose references: a folder or a manifest CSV."),
    low: Path | None = typer.Option(None, "--low", help="Low-dose inputs, for the Low-Dose row (with --pred/--ref)."),
    out: Path | None = typer.Option(
        None, "--out", help="Output folder (default: <pred>_eval; RUN_DIR, or RUN_DIR/body_mask with --mask)."
    ),
    method: str = typer.Option("model", "--method", help="Method name of the predictions (RUN_DIR: the recipe's)."),
    ssim_range: str | None = typer.Option(
        None, "--ssim-range",
        help="SSIM data range: challenge (2, as the challenge did) or standard (1); default challenge / the recipe's.",
    ),  # fmt: skip
    mask: bool = typer.Option(False, "--mask/--no-mask", help="Restrict metrics to a body mask of the reference."),
    mask_threshold: float = typer.Option(0.01, "--mask-threshold", help="Body mask: fraction of the reference max."),
    checkpoint: str = typer.Option("best", "--checkpoint", help="RUN_DIR: best (highest val PSNR) or last."),
    device: str = typer.Option("auto", "--device", help="RUN_DIR: auto, cpu, cuda, cuda:N."),
    save_predictions: bool = typer.Option(
        False, "--save-predictions", help="RUN_DIR: also write the predictions as NIfTI under <out>/predictions."
    ),
    allow_misaligned: bool = typer.Option(
        False, "--allow-misaligned", help="Score a prediction whose affine differs from its reference's (as arrays)."
    ),
    lesions: str | None = typer.Option(
        None, "--lesions",
        help="Also quantify lesions and organs (SUVmean/SUVmax bias against the full dose): 'phantom' (the label "
             "maps `ldt simulate` writes: its lesions and liver, blood pool, myocardium, kidneys, spleen, brain) or "
             "a folder of masks named <subject>.nii.gz (every nonzero voxel lesion, or label maps named by the "
             "folder's labels.json, e.g. {\"lesion\": 1, \"liver\": 5}); 'none': neither (default: RUN_DIR of a "
             "phantom run, its phantom's; otherwise none).",
    ),  # fmt: skip
    consistency: bool | None = typer.Option(
        None, "--consistency/--no-consistency",
        help="RUN_DIR: apply the local-consistency guard to the predictions, or not (default: the recipe's "
             "eval.consistency).",
    ),  # fmt: skip
) -> None:
    """Score predictions against full-dose references: PSNR, SSIM, NRMSE per subject and DRF."""
    if ssim_range is not None and ssim_range not in SSIM_RANGES:
        raise UserError(f"--ssim-range {ssim_range!r} is unknown; use challenge or standard")
    if not 0 < mask_threshold < 1:
        raise UserError(f"--mask-threshold must be in (0, 1) (a fraction of the reference max), got {mask_threshold}")
    if lesions == "none":
        lesions = None
    elif lesions is None and run_dir is not None:
        lesions = "auto"
    if run_dir is not None:
        if pred is not None or ref is not None:
            raise UserError("give either RUN_DIR or --pred/--ref, not both")
        if low is not None:
            raise UserError("--low is for --pred/--ref; with RUN_DIR the Low-Dose row comes from the run's own test "
                            "inputs; drop --low")
        run_directory(run_dir, out=out, method=None if method == "model" else method, ssim_range=ssim_range,
                      mask=mask, mask_threshold=mask_threshold, checkpoint=checkpoint, device=device,
                      save_predictions=save_predictions, lesions=lesions, consistency=consistency)  # fmt: skip
        return
    if pred is None or ref is None:
        raise UserError("give a RUN_DIR, or both --pred and --ref (folders of NIfTI files or manifest CSVs)")
    for flag, value, default in (("--checkpoint", checkpoint, "best"), ("--device", device, "auto"),
                                 ("--save-predictions", save_predictions, False),
                                 ("--consistency", consistency, None)):  # fmt: skip
        if value != default:
            raise UserError(f"{flag} is for RUN_DIR (it runs inference); with --pred/--ref the predictions exist")
    _, failures = run_pairs(pred, ref, low=low, out=out or _default_out(pred), method=method,
                            ssim_range=ssim_range or "challenge", mask=mask, mask_threshold=mask_threshold,
                            allow_misaligned=allow_misaligned, lesions=lesions)
    if failures:
        raise typer.Exit(1)


def run_directory(run_dir: Path, console: Any = None, **options: Any) -> list[dict[str, Any]]:
    """Evaluate a run directory on its test split, print the summary and where it was written."""
    from rich.console import Console

    from lowdose_toolkit.evaluation.lesions import CASES_CSV as LESIONS_CSV
    from lowdose_toolkit.evaluation.lesions import ORGANS_CSV, UPTAKE_PNG
    from lowdose_toolkit.evaluation.runeval import evaluate_run, print_dose_head, print_lesions, results_dir
    from lowdose_toolkit.evaluation.summary import print_summary
    from lowdose_toolkit.train.rundir import RunLock

    if not Path(run_dir).is_dir():
        raise UserError(f"{run_dir} is not a directory; pass a run directory made by `ldt run`")
    console = console or Console()
    out = results_dir(run_dir, options.get("out"), options.get("mask", False))
    writes_in_run = Path(out).resolve().is_relative_to(Path(run_dir).resolve())
    lock: AbstractContextManager[object] = nullcontext()
    if writes_in_run:
        lock = RunLock(run_dir, "wait for it to end, or write the results elsewhere with --out DIR")
    with lock:  # not while a training (or another evaluation) writes there
        summary = evaluate_run(run_dir, console=Console(stderr=True), **options)
    region = "inside a body mask" if options.get("mask") else "whole volume"
    print_summary(summary, console, title=f"{run_dir}: held-out test subjects ({region})")
    print_dose_head(Path(out) / "results.json", console)
    lesions, organs = print_lesions(Path(out) / "results.json", console)
    console.print(f"wrote {Path(out) / 'results.csv'}, results.json, results.md"
                  + (f", {LESIONS_CSV}, {UPTAKE_PNG}" if lesions else "") + (f", {ORGANS_CSV}" if organs else ""))
    return summary


def run_pairs(
    pred: Path,
    ref: Path,
    low: Path | None,
    out: Path,
    method: str = "model",
    ssim_range: str = "challenge",
    mask: bool = False,
    console: Any = None,
    mask_threshold: float = 0.01,
    allow_misaligned: bool = False,
    lesions: str | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Pair, evaluate, write ``results.json``/``cases.csv``/``summary.csv``/``summary.md`` and print a summary.

    A pair that fails (unreadable file, another grid) is one printed line and one entry of
    ``results.json``'s ``failures``; the others are scored and written. With ``lesions`` (``"phantom"`` or a
    folder of masks) every pair's lesions (and organs, where the masks name them) are quantified too:
    ``lesions.csv`` (``organs.csv``) and ``lesions.md``.

    Returns:
        The per-case rows (predictions first, then the Low-Dose rows when ``low`` is given) and the failures.
    """
    from rich.console import Console

    from lowdose_toolkit.evaluation import lesions as lesion_eval
    from lowdose_toolkit.evaluation.pairing import pair_by_filename
    from lowdose_toolkit.evaluation.paper import LOW_DOSE
    from lowdose_toolkit.evaluation.scoring import evaluate_pairs
    from lowdose_toolkit.evaluation.summary import aggregate, print_summary, write_results

    console = console or Console()
    masks = None if lesions is None else lesion_eval.LesionMasks(lesions)
    pairs = pair_by_filename(pred, ref, method=method)
    if low is not None:
        pairs += pair_by_filename(low, ref, method=LOW_DOSE)
    failures: list[dict[str, str]] = []
    lesion_cases: list[dict[str, Any]] = []
    rows = evaluate_pairs(pairs, ssim_range=ssim_range, mask=mask, mask_threshold=mask_threshold, failures=failures,
                          allow_misaligned=allow_misaligned, lesions=masks, lesion_cases=lesion_cases)
    for failure in failures:
        console.print(f"[red]failed[/] {failure['error']}", soft_wrap=True)
    settings = {"ssim_range": ssim_range, "mask": mask, "pred": str(pred), "ref": str(ref), "low": str(low or "")}
    if mask:
        settings["mask_threshold"] = mask_threshold
    extra = {} if masks is None else lesion_eval.region_facts(str(lesions), lesion_cases)
    unfound = None if masks is None or not rows else masks.unfound(lesion_cases)
    if unfound:
        from rich.markup import escape

        console.print(f"[yellow]warning[/] {escape(unfound)}", soft_wrap=True)
    lesion_files = ""
    if masks is not None:  # before results.json and cases.csv, whose presence means the evaluation is complete
        from lowdose_toolkit.core.atomic import TEXT, atomic_path

        written = lesion_eval.write_region_files(lesion_cases, extra, out)
        with atomic_path(out / "lesions.md") as tmp:
            tmp.write_text(lesion_eval.region_report(extra), **TEXT)
        lesion_files = "".join(f", {p.name}" for p in written) + ", lesions.md"
    paths = write_results(rows, out, settings, failures=failures, **extra)
    print_summary(aggregate(rows), console, title=f"{method}: {len(rows)} case(s)")
    if masks is not None:
        from lowdose_toolkit.evaluation.runeval import print_lesions

        print_lesions(paths["json"], console)
    console.print(f"wrote {paths['json']}, {paths['cases'].name}, {paths['summary'].name}, {paths['md'].name}"
                  + lesion_files
                  + (f"; {len(failures)} pair(s) failed (listed in results.json)" if failures else ""))
    return rows, failures


def table(
    inputs: list[Path] = typer.Argument(..., help="results.json / cases.csv files or run directories."),
    out: Path | None = typer.Option(None, "--out", help="Output folder (default: ./tables)."),
) -> None:
    """Print and write the paper's Table I (methods x DRF) and Table II (ablations at DRF 100): Markdown, CSV
    and a PNG chart each; and Table III, lesion uptake, and Table IV, organ uptake, where the evaluations
    quantified them."""
    from rich.console import Console

    from lowdose_toolkit.evaluation.lesions import (
        UPTAKE_PNG,
        markdown,
        organ_markdown,
        print_organs,
        uptake_tables,
        write_uptake_chart,
    )
    from lowdose_toolkit.evaluation.lesions import print_summary as print_lesions
    from lowdose_toolkit.evaluation.paper_tables import (
        build_table_i,
        build_table_ii,
        print_table,
        write_table,
        write_table_chart,
    )
    from lowdose_toolkit.evaluation.results import load_results

    console = Console()
    rows = load_results(inputs)
    out = out or Path("tables")
    written = []
    for stem, tbl in (("table1", build_table_i(rows)), ("table2", build_table_ii(rows))):
        print_table(tbl, console)
        written += [*write_table(tbl, out / stem), write_table_chart(tbl, out / stem)]
    lesions, organs = uptake_tables(inputs)
    from lowdose_toolkit.core.atomic import TEXT, atomic_path

    if lesions:  # Table III (ours): lesion uptake, where the evaluations quantified lesions
        print_lesions(lesions, console, title="Table III (ours): lesion uptake against the full dose (%)")
        with atomic_path(out / "table3.md") as tmp:
            tmp.write_text(markdown(lesions), **TEXT)
        written.append(out / "table3.md")
    if organs:  # Table IV (ours): organ uptake
        print_organs(organs, console, title="Table IV (ours): organ SUVmean against the full dose (%)")
        with atomic_path(out / "table4.md") as tmp:
            tmp.write_text(organ_markdown(organs), **TEXT)
        written.append(out / "table4.md")
    chart = write_uptake_chart(lesions, organs, out / UPTAKE_PNG)  # Tables III and IV as a chart
    written += [chart] if chart else []
    console.print("wrote " + ", ".join(str(p) for p in written))
