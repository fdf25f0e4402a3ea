"""``ldt evaluate`` and ``ldt table``: score predictions and lay the results out like the paper.

The functions are plain typer commands; ``lowdose_toolkit.cli`` registers them. Heavy imports
(torch, nibabel) happen inside the functions so ``ldt --help`` stays fast.
"""

from __future__ import annotations

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
    low: Path | None = typer.Option(None, "--low", help="low-dose inputs, for the Low-Dose row"),
    out: Path | None = typer.Option(None, "--out", help="Output folder (default: <pred>_eval beside --pred)."),
    method: str = typer.Option("model", "--method", help="Method name for the predictions (e.g. cg3dsrgan)."),
    ssim_range: str = typer.Option(
        "challenge", "--ssim-range", help="SSIM data range: challenge (2, as the challenge did) or standard (1)."
    ),
    mask: bool = typer.Option(False, "--mask/--no-mask", help="Restrict metrics to a body mask of the reference."),
) -> None:
    """Score predictions against full-dose references: PSNR, SSIM, NRMSE per subject and DRF."""
    if ssim_range not in SSIM_RANGES:
        raise UserError(f"--ssim-range {ssim_range!r} is unknown; use challenge or standard")
    if run_dir is not None:
        if pred is not None or ref is not None:
            raise UserError("give either RUN_DIR or --pred/--ref, not both")
        try:
            from lowdose_toolkit.runeval import evaluate_run
        except ImportError as exc:
            if exc.name not in ("lowdose_toolkit.runeval", None):
                raise
            raise UserError(
                "evaluating a run directory is not available in this build; use --pred PRED --ref REF"
            ) from None
        _call_evaluate_run(
            evaluate_run, run_dir, out=out, low=low, method=None if method == "model" else method,
            ssim_range=None if ssim_range == "challenge" else ssim_range, mask=mask or None,
        )  # fmt: skip
        return
    if pred is None or ref is None:
        raise UserError("give a RUN_DIR, or both --pred and --ref (folders of NIfTI files or manifest CSVs)")
    run_pairs(pred, ref, low=low, out=out or _default_out(pred), method=method, ssim_range=ssim_range, mask=mask)


def _call_evaluate_run(evaluate_run: Any, run_dir: Path, **options: Any) -> Any:
    """Call ``evaluate_run`` with the options the user set, refusing those it does not take.

    Options left at their defaults arrive here as ``None`` and are not passed, so the run's recipe decides.
    """
    import inspect

    accepted = inspect.signature(evaluate_run).parameters
    flags = {"out": "--out", "low": "--low", "method": "--method", "ssim_range": "--ssim-range", "mask": "--mask"}
    kwargs = {}
    for name, value in options.items():
        if value is None:
            continue
        if name not in accepted:
            raise UserError(f"{flags[name]} is not supported with RUN_DIR (the run's recipe decides); drop it")
        kwargs[name] = value
    return evaluate_run(run_dir, **kwargs)


def run_pairs(
    pred: Path,
    ref: Path,
    low: Path | None,
    out: Path,
    method: str = "model",
    ssim_range: str = "challenge",
    mask: bool = False,
    console: Any = None,
) -> list[dict[str, Any]]:
    """Pair, evaluate, write ``results.json``/``cases.csv``/``summary.csv``/``summary.md`` and print a summary.

    Returns:
        The per-case rows (predictions first, then the Low-Dose rows when ``low`` is given).
    """
    from rich.console import Console

    from lowdose_toolkit.evaluate import aggregate, evaluate_pairs, pair_by_filename, print_summary, write_results
    from lowdose_toolkit.paper import LOW_DOSE

    console = console or Console()
    pairs = pair_by_filename(pred, ref, method=method)
    if low is not None:
        pairs += pair_by_filename(low, ref, method=LOW_DOSE)
    rows = evaluate_pairs(pairs, ssim_range=ssim_range, mask=mask)
    settings = {"ssim_range": ssim_range, "mask": mask, "pred": str(pred), "ref": str(ref), "low": str(low or "")}
    paths = write_results(rows, out, settings)
    print_summary(aggregate(rows), console, title=f"{method}: {len(rows)} case(s)")
    console.print(f"wrote {paths['json']}, {paths['cases'].name}, {paths['summary'].name}, {paths['md'].name}")
    return rows


def table(
    inputs: list[Path] = typer.Argument(..., help="results.json / cases.csv files or run directories."),
    out: Path | None = typer.Option(None, "--out", help="Output folder (default: ./tables)."),
) -> None:
    """Print and write the paper's Table I (methods x DRF) and Table II (ablations at DRF 100)."""
    from rich.console import Console

    from lowdose_toolkit.evaluate import build_table_i, build_table_ii, load_results, print_table, write_table

    console = Console()
    rows = load_results(inputs)
    out = out or Path("tables")
    written = []
    for stem, tbl in (("table1", build_table_i(rows)), ("table2", build_table_ii(rows))):
        print_table(tbl, console)
        written += write_table(tbl, out / stem)
    console.print("wrote " + ", ".join(str(p) for p in written))
