"""``ldt simulate``: write the phantom data set to a folder and/or print its calibration report.

A plain typer command function; ``lowdose_toolkit.cli.app`` registers it. Heavy imports (torch,
nibabel) happen inside the function so ``ldt --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer

from lowdose_toolkit.errors import UserError


def simulate(
    out: Path | None = typer.Option(
        None, "--out", help="New or empty folder to write the data set to (or an earlier output, replaced)."
    ),
    subjects: int | None = typer.Option(
        None, "--subjects", help="Number of phantom subjects (default: 10, as the phantom source)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of anatomy, uptake and counts (same seed, same files)."),
    counts_model: str = typer.Option(
        "listmode", "--counts-model",
        help="listmode: each low dose is the first 1/DRF of the full-dose events (nested, as the challenge); "
             "independent: every dose level its own Poisson acquisition.",
    ),
    texture: float = typer.Option(
        0.0, "--texture",
        help="Largest heterogeneity of uptake: each subject's relative spread is drawn in [0, TEXTURE] "
             "(0: uniform organs, the calibrated phantom; the quickstart trains on 0.25).",
    ),
    report: bool = typer.Option(
        False, "--report", help="Print the low-dose PSNR per DRF against the paper's Low-Dose row."
    ),
) -> None:
    """Simulate whole-body FDG phantoms with count-based low-dose scans (DRF 4, 10, 20, 50, 100).

    Writes OUT/<subject>/full.nii.gz, drf_XXX.nii.gz (Bq/mL) and labels.nii.gz, OUT/manifest.csv.

    With --report, prints the low-dose PSNR per DRF against the paper (simulated in memory without --out).
    """
    from rich.console import Console

    from lowdose_toolkit.data import simulate as sim
    from lowdose_toolkit.data.simulation_config import COUNTS_MODELS, make_config

    n = sim.DEFAULT_SUBJECTS if subjects is None else subjects
    if n < 1:
        raise UserError(f"--subjects must be at least 1, got {n}")
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    if out is None and not report:
        raise UserError("nothing to do: give --out FOLDER to write the data set, and/or --report")
    if counts_model not in COUNTS_MODELS:
        raise UserError(f"--counts-model {counts_model!r}: use one of {', '.join(COUNTS_MODELS)}")
    config = make_config(counts_model=counts_model, texture=texture)
    console = Console(stderr=True)
    if out is not None:
        manifest = sim.write_dataset(out, n, seed, progress=True, config=config)
        console.print(f"wrote {n} subjects to {out} (manifest: {manifest})")
        if report:
            sim.print_calibration(sim.dataset_report(out), Console())
    else:
        sim.print_calibration(sim.calibration_report(n, seed, progress=True, config=config), Console())
