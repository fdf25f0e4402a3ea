"""``ldt study``: every method of a study trained under one budget, then Tables I and II and a figure."""

from __future__ import annotations

from pathlib import Path

import typer


def study(
    study: Path = typer.Argument(..., help="Study file, e.g. recipes/study_cpu.yaml."),
    out: Path = typer.Option(Path("runs/study"), "--out", help="Folder for the runs and tables."),
    docs: Path | None = typer.Option(None, "--docs", help="Also write RESULTS.md, results.csv, figure2.png here."),
    only: list[str] = typer.Option([], "--only", help="Train only these methods (by label). Repeatable."),
) -> None:
    """Train and evaluate every method of a study under one budget; write Table I, Table II and a figure."""
    from lowdose_toolkit.evaluation.study import run_study

    run_study(study, out, docs, only)
