"""``ldt prepare``: convert a released data set to the ``nifti`` source's layout, once."""

from __future__ import annotations

from pathlib import Path

import typer

prepare_app = typer.Typer(
    help="Convert a released data set to NIfTI + manifest.csv once, then train with `source: nifti`.",
    no_args_is_help=True,
)


def _parse_drfs(text: str) -> list[int] | None:
    if not text.strip():
        return None
    try:
        drfs = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise typer.BadParameter(f"{text!r}: expected comma-separated integers, e.g. 4,10,20,50,100") from None
    if any(d < 1 for d in drfs):
        raise typer.BadParameter(f"{text!r}: DRFs must be positive")
    return drfs


@prepare_app.command("uldp")
def uldp(
    src: Path = typer.Argument(..., help="Challenge release folder: one folder per subject, one folder per dose."),
    out: Path = typer.Argument(..., help="New or empty output folder, or an earlier output of this command (resume)."),
    drfs: str = typer.Option("", "--drfs", help="Comma-separated DRFs to convert, e.g. 4,10,20 (default: all)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Leave out bad subjects with a warning; don't stop."),
    no_suv: bool = typer.Option(False, "--no-suv", help="Leave SUV factors out (headers with unusable dates/doses)."),
    cache: bool = typer.Option(False, "--cache", help="Write uncompressed .nii indexed for fast patch sampling "
                               "(ldt cache's layout, in place; more disk than .nii.gz)."),
) -> None:
    """Convert the Ultra-Low-Dose PET challenge's DICOM folders (Quadra or uEXPLORER) to NIfTI.

    Writes OUT/<subject>/full.nii.gz and drf_XXX.nii.gz (float32, Bq/mL, RAS affine),
    OUT/manifest.csv with each subject's SUV factor, and OUT/prepare.json with the provenance.
    A series that is not one complete PET volume, or whose SUV header cannot be true, stops the
    conversion with one line naming it (--skip-bad leaves its subject out instead).
    """
    import json
    import warnings

    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lowdose_toolkit.data.prepare import prepare_uldp

    wanted = _parse_drfs(drfs)
    console = Console(stderr=True, soft_wrap=True)

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: object = None,
        line: object = None,
    ) -> None:
        console.print(f"[yellow]warning:[/] {escape(str(message))}")

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with warnings.catch_warnings(), Progress(*columns, console=console, transient=True) as bar:
        warnings.showwarning = show
        task = bar.add_task("converting", total=None)

        def progress(subject: str, index: int, total: int) -> None:
            bar.update(task, completed=index, total=total, description=f"converting {escape(subject)}")

        manifest = prepare_uldp(src, out, drfs=wanted, skip_bad=skip_bad, suv=not no_suv, cache=cache,
                                progress=progress)
    record = json.loads((manifest.parent / "prepare.json").read_text())
    n, skipped = len(record["subjects"]), len(record["skipped"])
    tail = f", {skipped} skipped" if skipped else ""
    count = f"{n} subject{'s' if n != 1 else ''}{tail}"
    console.print(escape(f"wrote {manifest} ({count}); train with source: nifti, root: {manifest.parent}"))
