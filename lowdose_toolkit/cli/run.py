"""``ldt run``: train a recipe into a run directory, then evaluate it on the held-out subjects."""

from __future__ import annotations

from pathlib import Path

import typer

from lowdose_toolkit.cli.check import SET_HELP
from lowdose_toolkit.errors import UserError


def run(recipe_path: Path | None, overrides: list[str], out: Path | None, resume: Path | None) -> None:
    from rich.console import Console

    from lowdose_toolkit.core.plugin_manager import get_registry
    from lowdose_toolkit.core.recipe import load_recipe, resolve_recipe, safe_load
    from lowdose_toolkit.evaluation.runeval import evaluate_run, print_dose_head, print_lesions
    from lowdose_toolkit.evaluation.summary import print_summary
    from lowdose_toolkit.train.distributed import leave_process
    from lowdose_toolkit.train.engine import Trainer
    from lowdose_toolkit.train.rundir import first_difference

    console = Console(stderr=True)
    registry = get_registry()
    if resume is not None:
        recorded = resume / "recipe.yaml"
        if not recorded.is_file():
            raise UserError(f"{resume}: not a run directory (no recipe.yaml); pass the folder `ldt run` named "
                            "(a run killed before it wrote its recipe: start it again with `ldt run RECIPE --out "
                            f"{resume}`)")
        if overrides:
            raise UserError("--set cannot be combined with --resume: a resumed run keeps its recorded recipe")
        recipe = resolve_recipe(safe_load(recorded.read_text()), registry, str(recorded))
        if recipe_path is not None:
            given = resolve_recipe(load_recipe(recipe_path), registry, str(recipe_path))
            difference = first_difference(recipe, given)
            if difference is not None:
                key, was, now = difference
                raise UserError(f"{recipe_path} differs from the recipe recorded in {recorded} at {key} ({was!r} "
                                f"recorded, {now!r} given); resume without RECIPE or start a new run")
        run_dir = resume
    else:
        if recipe_path is None:
            raise UserError("give a RECIPE to train, or --resume RUN_DIR")
        recipe = resolve_recipe(load_recipe(recipe_path, overrides), registry, str(recipe_path))
        run_dir = out  # None: the trainer makes a new runs/<name>-<time>
    # The trainer locks the run directory and writes its recipe first (a run already there is refused).
    trainer = Trainer(recipe, run_dir, registry, resume=resume is not None, console=console)
    run_dir = trainer.run_dir
    console.print(f"data: {len(trainer.split.train)} train / {len(trainer.split.val)} val / "
                  f"{len(trainer.split.test)} test subjects, DRFs {trainer.drfs}; device {trainer.device}")
    trainer.fit()  # Ctrl-C or SIGTERM: a consistent run directory, `ldt run --resume` continues it
    if trainer.dist.is_main and trainer.split.test:
        summary = evaluate_run(run_dir, console=console)
        print_summary(summary, Console(), title=f"{recipe['name']}: held-out test subjects")
        print_dose_head(run_dir / "results.json", Console())
        print_lesions(run_dir / "results.json", Console())
        console.print(f"results: {run_dir / 'results.md'}")
    leave_process(trainer.dist)  # a distributed worker ends here, its work written (see leave_process)


def run_cmd(
    recipe: Path | None = typer.Argument(None, help="Recipe YAML file (optional with --resume)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    out: Path | None = typer.Option(None, "--out", help="Run directory (default: a new runs/<name>-<time>, with "
                                    "-2, -3, ... when that name is taken)."),
    resume: Path | None = typer.Option(None, "--resume", help="Resume the run in this directory (one stopped at "
                                       "any point, killed included)."),
) -> None:
    """Train a recipe: data -> model -> training -> run directory, then evaluate on the test split."""
    run(recipe, set_, out, resume)
