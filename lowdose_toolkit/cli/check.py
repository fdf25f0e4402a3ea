"""``ldt check``: validate a recipe and build every part without loading data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from lowdose_toolkit.errors import RecipeError

SET_HELP = "Override a recipe key, e.g. --set train.epochs=2 (value parsed as YAML). Repeatable."


def build_parts(recipe_path: Path, overrides: list[str]) -> dict[str, Any]:
    """Load, resolve and build everything a run needs except the data itself.

    Returns a mapping with ``recipe`` (resolved), ``registry``, ``model``, ``discriminator``,
    ``losses``, ``source``, ``scheme_entry`` and ``loggers`` (built, not started: nothing is written).
    """
    from lowdose_toolkit.core.plugin_manager import get_registry
    from lowdose_toolkit.core.recipe import load_recipe, resolve_recipe
    from lowdose_toolkit.models.lowdose_model import build_losses, build_model

    registry = get_registry()
    recipe = resolve_recipe(load_recipe(recipe_path, overrides), registry, str(recipe_path))
    try:
        model, discriminator = build_model(recipe, registry)
        losses = build_losses(recipe, registry, model, discriminator)
        loggers = [registry.build("logger", spec, f"train.loggers.{i}",
                                  context={"run_dir": Path("runs") / recipe["name"], "recipe": recipe})
                   for i, spec in enumerate(recipe["train"]["loggers"])]
    except RecipeError as exc:
        raise RecipeError(f"{recipe_path}: {exc}") from None
    source = registry.build("source", recipe["data"]["source"], "data.source", context={"drfs": recipe["data"]["drfs"]})
    scheme_entry, _ = registry.resolve("scheme", recipe["train"]["scheme"], "train.scheme")
    return {
        "recipe": recipe,
        "registry": registry,
        "model": model,
        "discriminator": discriminator,
        "losses": losses,
        "source": source,
        "scheme_entry": scheme_entry,
        "loggers": loggers,
    }


def check(recipe_path: Path, overrides: list[str]) -> None:
    """Print a table of the recipe's parts with their plugins and parameter counts."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from lowdose_toolkit.models.lowdose_model import count_parameters

    parts = build_parts(recipe_path, overrides)
    recipe, registry, model = parts["recipe"], parts["registry"], parts["model"]
    # Building the scheme validates that it fits the model (e.g. paired_gan needs a discriminator).
    from lowdose_toolkit.core.spec import run_spec
    from lowdose_toolkit.models.lowdose_model import dry_run
    from lowdose_toolkit.train.build import build_training

    model, discriminator, losses, scheme = build_training(recipe, registry, torch.device("cpu"))
    parts.update(model=model, discriminator=discriminator, losses=losses)
    try:  # every shape a run will use, on the meta device (no memory, no arithmetic)
        dry_run(model, discriminator, run_spec(recipe), recipe["data"]["batch_size"], recipe["eval"]["batch_size"])
    except RecipeError as exc:
        raise RecipeError(f"{recipe_path}: {exc}") from None
    table = Table(title=f"{recipe_path} ({recipe['name']})")
    for col in ("part", "name", "plugin", "parameters"):
        table.add_column(col, justify="right" if col == "parameters" else "left")

    def row(label: str, kind: str, spec: dict[str, Any] | None, module: Any = None, extra: str = "") -> None:
        if spec is None:
            return
        entry = registry.get(kind, spec["name"])
        count = f"{count_parameters(module):,}" if module is not None else "-"
        table.add_row(label, spec["name"] + extra, entry.plugin, count)

    row("generator", "generator", recipe["model"]["generator"], model.generator)
    for spec in recipe["model"]["heads"]:
        row("head", "head", spec, model.heads[spec["name"]], f" ({spec['input']} -> {spec['target']})")
    guidance = recipe["model"]["guidance"]
    if guidance is not None:
        row("guidance", "guidance", guidance, model.guidance, f" ({guidance['head']} -> generator decoder)")
    row("refiner", "refiner", recipe["model"]["refiner"], model.refiner)
    row("discriminator", "discriminator", recipe["model"]["discriminator"], parts["discriminator"])
    for term, spec in zip(parts["losses"], recipe["losses"], strict=True):
        row("loss", "loss", spec, None, f" x{term.weight:g} on {term.on}")
    row("scheme", "scheme", recipe["train"]["scheme"])
    scheme_plugin = registry.get("scheme", recipe["train"]["scheme"]["name"]).plugin
    for name, module in scheme.extra_modules.items():  # e.g. CycleGAN's full->low generator
        table.add_row(f"scheme: {name}", type(module).__name__, scheme_plugin, f"{count_parameters(module):,}")
    row("source", "source", recipe["data"]["source"])
    for spec in recipe["train"]["loggers"]:
        row("logger", "logger", spec)
    total = count_parameters(model) + count_parameters(parts["discriminator"])
    total += sum(count_parameters(m) for m in scheme.extra_modules.values())
    table.add_row("total", "", "", f"{total:,}", style="bold")
    Console().print(table)
    Console().print(f"[green]ok[/]: {recipe_path} is valid")


def check_cmd(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Validate a recipe and build every part (no data is loaded, nothing is trained)."""
    check(recipe, set_)
