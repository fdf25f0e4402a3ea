"""``ldt cache``: write a data set's random-access layout (uncompressed NIfTI + stored normalisation)."""

from __future__ import annotations

import shlex
from pathlib import Path

import typer

from lowdose_toolkit.cli.check import SET_HELP
from lowdose_toolkit.cli.prepare import _parse_drfs


def _records(src: Path, drfs: list[int] | None, overrides: list[str]) -> list:
    """The subjects of a recipe's source, or of a NIfTI folder / manifest (read by the ``nifti`` source)."""
    from lowdose_toolkit.core.plugin_manager import get_registry
    from lowdose_toolkit.errors import UserError

    registry = get_registry()
    if src.suffix.lower() in (".yaml", ".yml"):
        from lowdose_toolkit.core.recipe import load_recipe, resolve_recipe

        recipe = resolve_recipe(load_recipe(src, overrides), registry, str(src))
        spec = dict(recipe["data"]["source"])
        if spec.get("name") == "nifti":
            spec.setdefault("validate", False)  # ldt cache reads and checks every file itself
        return registry.build("source", spec, "data.source", context={"drfs": drfs or recipe["data"]["drfs"]}).records()
    if overrides:
        raise UserError("--set applies to a recipe; SRC is a data folder or manifest")
    return registry.build("source", {"name": "nifti", "root": str(src), "validate": False}, "data.source",
                          context={"drfs": drfs}).records()


def cache_cmd(
    src: Path = typer.Argument(..., help="A NIfTI data folder, its manifest CSV, or a recipe (its data.source)."),
    out: Path = typer.Argument(None, help="Output folder (default: SRC's root/.ldt-cache, found automatically)."),
    drfs: str = typer.Option("", "--drfs", help="Comma-separated DRFs to cache (default: all; a recipe's data.drfs)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Write the random-access layout that training samples patches from without decompressing volumes.

    Every image becomes an uncompressed float32 .nii (read through memory maps; an image that already is
    one is indexed in place) and each low-dose image's normalisation scale and sampling map are computed
    once, into OUT/cache.json. Without OUT the cache goes to .ldt-cache in the data's root and recipes
    reading that data use it (data.layout: auto); with OUT, train with source: {name: nifti, root: OUT}.
    Run it again after the data changed: unchanged files are kept. Needs about the data's uncompressed
    size on disk (a 360x360x673 volume is 349 MB).
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lowdose_toolkit.data.cache import CacheIndex, default_cache_dir, write_cache

    console = Console(stderr=True, soft_wrap=True)
    records = _records(src, _parse_drfs(drfs), set_)
    target = out if out is not None else default_cache_dir(records)
    words = ["ldt", "cache", str(src.absolute())] + ([str(out.absolute())] if out is not None else [])
    words += (["--drfs", drfs] if drfs else []) + [a for s in set_ for a in ("--set", s)]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("caching", total=len(records))

        def progress(subject: str, index: int, total: int) -> None:
            bar.update(task, completed=index, total=total, description=f"caching {escape(subject)}")

        index_path = write_cache(records, target, command=shlex.join(words), manifest=out is not None,
                                 progress=progress)
    index = CacheIndex.load(index_path)
    size = sum(e["size"] for rel, e in index.files.items() if not Path(rel).is_absolute())  # copies, not in place
    files = sum(len(r.low) + 1 for r in records)
    use = (f"train with source: {{name: nifti, root: {target}}}" if out is not None
           else "recipes reading this data use it (data.layout: auto)")
    console.print(escape(f"cached {len(records)} subjects ({files} images, {size / 2**30:.2f} GiB of copies) in "
                         f"{target}; {use}"))
