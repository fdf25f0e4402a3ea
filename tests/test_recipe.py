"""Recipes: extends/merge, --set, and every error a user can make, with its message."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write

from lowdose_toolkit.cli.app import main
from lowdose_toolkit.core.plugin_manager import get_registry
from lowdose_toolkit.core.recipe import apply_override, deep_merge, load_recipe, resolve_recipe
from lowdose_toolkit.errors import RecipeError

BASE = """
name: tiny
data:
  drfs: [4, 100]
  patch_size: 16
model:
  generator: {name: mlnet, channels: 4, depth: 2}
  heads: [{name: dose_classifier, input: bottleneck}]
  refiner: {name: contextual_net, channels: 4}
losses:
  - {name: l1, weight: 300, on: coarse}
  - {name: cross_entropy, weight: 10, on: dose_classifier}
train: {epochs: 1}
"""


def resolve(path: Path, overrides: tuple[str, ...] = ()) -> dict:
    return resolve_recipe(load_recipe(path, overrides), get_registry(), str(path))


def test_resolve_fills_defaults(tmp_path: Path) -> None:
    recipe = resolve(write(tmp_path / "r.yaml", BASE))
    assert recipe["train"]["optimizer"] == {"name": "adam", "lr": 2e-4, "betas": [0.5, 0.999], "weight_decay": 0.0}
    assert recipe["model"]["heads"][0] == {"name": "dose_classifier", "input": "bottleneck", "target": "drf_class"}
    assert recipe["losses"][0]["weight"] == 300.0 and isinstance(recipe["losses"][0]["weight"], float)
    assert recipe["model"]["discriminator"] is None


def test_extends_deep_merge_and_null_removes_part(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", BASE)
    child = write(tmp_path / "sub" / "child.yaml", "extends: ../base.yaml\nname: child\nmodel:\n  refiner: null\n"
                  "  generator: {channels: 8}\n")
    recipe = resolve(child)
    assert recipe["name"] == "child"
    assert recipe["model"]["refiner"] is None
    assert recipe["model"]["generator"] == {"name": "mlnet", "channels": 8, "depth": 2}


def test_deep_merge_replaces_lists() -> None:
    assert deep_merge({"a": {"b": 1, "c": [1, 2]}}, {"a": {"c": [3]}}) == {"a": {"b": 1, "c": [3]}}


def test_deep_merge_another_part_replaces_the_inherited_one() -> None:
    base = {"model": {"generator": {"name": "mlnet", "depth": 5, "channels": 32}}}
    child = {"model": {"generator": {"name": "unet3d", "channels": 16}}}
    assert deep_merge(base, child) == {"model": {"generator": {"name": "unet3d", "channels": 16}}}
    same = {"model": {"generator": {"name": "mlnet", "channels": 16}}}
    assert deep_merge(base, same)["model"]["generator"] == {"name": "mlnet", "depth": 5, "channels": 16}


def test_set_overrides_with_yaml_types(tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", BASE)
    recipe = resolve(path, ("train.epochs=3", "model.generator.channels=6", "losses.0.weight=5", "train.precision=bf16",
                            "data.drfs=[4, 10]"))
    assert recipe["train"]["epochs"] == 3
    assert recipe["model"]["generator"]["channels"] == 6
    assert recipe["losses"][0]["weight"] == 5.0
    assert recipe["data"]["drfs"] == [4, 10]


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        (BASE.replace("name: mlnet", "name: mlnett"), (),
         "model.generator.name: unknown generator 'mlnett' (did you mean 'mlnet'?); available:"),
        (BASE.replace("channels: 4, depth", "chanels: 4, depth"), (),
         "model.generator.chanels: unknown parameter of generator 'mlnet' (did you mean 'channels'?)"),
        (BASE.replace("channels: 4, depth", "channels: four, depth"), (),
         "model.generator.channels: expected int, got str 'four'"),
        (BASE.replace("epochs: 1", "epochs: 1.5"), (), "train.epochs: expected int, got float 1.5"),
        (BASE + "trian: {}\n", (), "trian: unknown section (did you mean 'train'?)"),
        (BASE.replace("train: {epochs: 1}", "train: {epochz: 1}"), (),
         "train.epochz: unknown key (did you mean 'epochs'?)"),
        (BASE, ("train.epoch=2",), "--set train.epoch=2: no such key 'train.epoch'"),
        (BASE, ("nope.key=2",), "--set nope.key=2: no such key 'nope'"),
        (BASE, ("losses.5.weight=2",), "losses.5: no item '5' (the list has 2 items)"),
        (BASE.replace("on: coarse", "on: refind"), (), "losses.0.on: the model has no output 'refind'"),
        (BASE.replace("input: bottleneck", "input: bottlenek"), (), "model.heads.0.input: generator 'mlnet' has no"),
    ],
)
def test_recipe_errors(tmp_path: Path, text: str, overrides: tuple[str, ...], message: str,
                       capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "r.yaml", text)
    args = ["check", str(path)] + [a for o in overrides for a in ("--set", o)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()), err
    assert "Traceback" not in err


def test_missing_extends_file(tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", "extends: nothere.yaml\nname: x\n")
    with pytest.raises(RecipeError, match=r"r.yaml: extends: file 'nothere.yaml' not found"):
        load_recipe(path)


def test_cyclic_extends(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(RecipeError, match=r"cyclic 'extends': a.yaml -> b.yaml -> a.yaml"):
        load_recipe(tmp_path / "a.yaml")


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", "name: x\ndata:\n  drfs: [4, 10\nmodel: {}\n")
    with pytest.raises(RecipeError, match=r"bad.yaml:4:\d+: YAML syntax error"):
        load_recipe(path)


def test_missing_recipe_file_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml: recipe file not found" in capsys.readouterr().err


def test_debug_shows_traceback(tmp_path: Path) -> None:
    with pytest.raises(RecipeError):
        main(["--debug", "check", str(tmp_path / "none.yaml")])


def test_apply_override_rejects_missing_equals() -> None:
    with pytest.raises(RecipeError, match="expected dotted.key=value"):
        apply_override({}, "train.epochs")


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).parents[1] / "recipes").glob("*.yaml")
                                         if not p.stem.startswith("study")))
def test_shipped_recipes_check(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import RECIPES

    assert main(["check", str(RECIPES / f"{name}.yaml")]) == 0, capsys.readouterr().err
    assert "is valid" in capsys.readouterr().out
