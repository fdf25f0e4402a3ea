"""The ``ldt`` command line. Heavy imports (torch) happen inside commands so ``ldt --help`` is fast."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from lowdose_toolkit import __version__

app = typer.Typer(
    name="ldt",
    help="lowdose-toolkit: recover standard-dose PET from low-dose PET (CG-3DSRGAN and baselines).\n\n"
    "Add --debug anywhere to see tracebacks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)

SET_HELP = "Override a recipe key, e.g. --set train.epochs=2 (value parsed as YAML). Repeatable."


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lowdose-toolkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """lowdose-toolkit (ldt)."""


@app.command("plugins")
def plugins_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List installed plugins and the parts they register."""
    import json

    from rich.console import Console
    from rich.table import Table

    from lowdose_toolkit.core.plugin_manager import get_plugin_manager, get_registry

    registry = get_registry()
    failures = get_plugin_manager().failures
    rows = [
        {"kind": e.kind, "name": e.name, "plugin": e.plugin, "version": e.version, "doc": e.doc}
        for e in registry.entries()
    ]
    if as_json:
        typer.echo(json.dumps({"parts": rows, "failures": [f.__dict__ for f in failures]}, indent=2))
        return
    table = Table(title="lowdose-toolkit parts")
    for col in ("kind", "name", "plugin", "version", "doc"):
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*(row[c] for c in ("kind", "name", "plugin", "version", "doc")))
    console = Console()
    console.print(table)
    for failure in failures:
        console.print(f"[yellow]warning:[/] {failure}")


@app.command("check")
def check_cmd(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Validate a recipe and build every part (no data is loaded, nothing is trained)."""
    from lowdose_toolkit.cli.check import check

    check(recipe, set_)


@app.command("run")
def run_cmd(
    recipe: Path | None = typer.Argument(None, help="Recipe YAML file (optional with --resume)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    out: Path | None = typer.Option(None, "--out", help="Run directory (default: runs/<name>-<time>)."),
    resume: Path | None = typer.Option(None, "--resume", help="Resume the run in this directory."),
) -> None:
    """Train a recipe: data -> model -> training -> run directory, then evaluate on the test split."""
    from lowdose_toolkit.cli.run import run

    run(recipe, set_, out, resume)


@app.command("infer")
def infer_cmd(
    checkpoint: Path = typer.Argument(..., help="Checkpoint (.pt) or run directory."),
    inputs: list[str] = typer.Argument(..., help="NIfTI files, folders, globs, DICOM folders or a manifest CSV."),
    out: Path = typer.Option(..., "--out", help="Output folder (never an input folder)."),
    patch_size: int | None = typer.Option(None, "--patch-size", help="Sliding-window patch (default: recipe)."),
    overlap: float | None = typer.Option(None, "--overlap", help="Overlap: voxels, or a fraction < 1."),
    batch_size: int | None = typer.Option(None, "--batch-size"),
    blending: str | None = typer.Option(None, "--blending", help="hann | average | crop"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    precision: str = typer.Option(
        "auto", "--precision", "--amp", help="auto (bf16 where the device runs it natively, else fp32) | fp32 | bf16 "
                                             "| fp16, on CPU and CUDA"
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs."),
    previews: bool = typer.Option(True, "--previews/--no-previews", help="Coronal MIP PNGs in OUT/previews."),
    prefetch: bool = typer.Option(
        True, "--prefetch/--no-prefetch", help="Read the next and write the previous volume meanwhile (more memory)."
    ),
    drf: int | None = typer.Option(
        None, "--drf", help="Known dose reduction factor of every input: a guided model is conditioned on it "
                            "instead of its dose head's prediction (which is still reported)."
    ),
) -> None:
    """Denoise whole volumes with a trained model (sliding window, affine and header kept)."""
    from lowdose_toolkit.cli.infer import infer

    raise typer.Exit(infer(checkpoint, inputs, out, patch_size, overlap, batch_size, blending, device, precision,
                           overwrite,
                           previews, prefetch, drf))


@app.command("study")
def study_cmd(
    study: Path = typer.Argument(..., help="Study file, e.g. recipes/study_cpu.yaml."),
    out: Path = typer.Option(Path("runs/study"), "--out", help="Folder for the runs and tables."),
    docs: Path | None = typer.Option(None, "--docs", help="Also write RESULTS.md, results.csv, figure2.png here."),
    only: list[str] = typer.Option([], "--only", help="Train only these methods (by label). Repeatable."),
) -> None:
    """Train and evaluate every method of a study under one budget; write Table I, Table II and a figure."""
    from lowdose_toolkit.evaluation.study import run_study

    run_study(study, out, docs, only)


def _register_optional_commands() -> None:
    """Commands implemented in their own modules (imported lazily themselves)."""
    import importlib

    modules = {}
    for name in ("evaluate", "prepare", "simulate"):
        try:
            modules[name] = importlib.import_module(f"lowdose_toolkit.cli.{name}")
        except ModuleNotFoundError as exc:  # pragma: no cover - a broken install
            if exc.name != f"lowdose_toolkit.cli.{name}":
                raise
    if "evaluate" in modules:
        app.command("evaluate")(modules["evaluate"].evaluate)
        app.command("table")(modules["evaluate"].table)
    if "simulate" in modules:
        app.command("simulate")(modules["simulate"].simulate)
    if "prepare" in modules:
        app.add_typer(modules["prepare"].prepare_app, name="prepare")


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors print one red line and exit 2; ``--debug`` shows tracebacks."""
    from lowdose_toolkit.errors import UserError

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("LDT_DEBUG", "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    if not debug:  # warnings as one line each, without the source line that raised them
        import warnings

        warnings.formatwarning = lambda message, category, *_a, **_k: f"warning: {message}\n"
    _register_optional_commands()
    try:
        app(args=args, prog_name="ldt")  # standalone: usage errors print their help and exit 2
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if code == 130:  # typer turns Ctrl-C into exit 130 without a word
            _error("interrupted; files already written are complete (atomic writes); "
                   "`ldt run --resume RUN_DIR` continues a training")
        return code
    except UserError as exc:
        if debug:
            raise
        _error(str(exc))
        return 2
    except KeyboardInterrupt:  # outside typer's own handling (e.g. while it starts)
        _error("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence for users
        if debug:
            raise
        _error(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)")
        return 1
    return 0


def _error(message: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}")


if __name__ == "__main__":
    sys.exit(main())
