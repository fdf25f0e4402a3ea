"""Experiment tracking as plugins: the loggers contract (a fake logger registered in-process), TensorBoard
events read back with TensorBoard's own reader, curves.png redrawn each epoch, the README's MLflow logger."""

from __future__ import annotations

import hashlib
import json
import re
import sys
import types
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, make_tiny_dataset, tiny_recipe, write

from lowdose_toolkit import hookimpl
from lowdose_toolkit.cli.app import main
from lowdose_toolkit.core import plugin_manager as plugins
from lowdose_toolkit.core.recipe import load_recipe, resolve_recipe
from lowdose_toolkit.errors import RecipeError
from lowdose_toolkit.loggers import Logger, example_record, scalars
from lowdose_toolkit.testing import check_part
from lowdose_toolkit.train.engine import Trainer
from lowdose_toolkit.train.rundir import read_metrics

EventAccumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator").EventAccumulator

CALLS: list[tuple[Any, ...]] = []


class FakeLogger(Logger):
    """Records what the engine hands a logger (test double)."""

    def __init__(self, run_dir: Path, recipe: Mapping[str, Any], tag: str = "x") -> None:
        CALLS.append(("init", Path(run_dir).name, recipe["name"], tag, sorted(p.name for p in Path(run_dir).iterdir())))

    def start(self, epoch: int, history: Sequence[Mapping[str, Any]]) -> None:
        CALLS.append(("start", epoch, [r["epoch"] for r in history]))

    def log_epoch(self, record: Mapping[str, Any], pictures: Mapping[str, Path]) -> None:
        digests = {name: hashlib.sha256(Path(path).read_bytes()).hexdigest() for name, path in pictures.items()}
        CALLS.append(("log_epoch", record["epoch"], sorted(pictures), digests, bool(record["val"]),
                      sorted(record["lrs"])))

    def close(self) -> None:
        CALLS.append(("close",))


class FakePlugin:
    @hookimpl
    def ldt_register_loggers(self, register: Any) -> None:
        register("fake", FakeLogger)


@pytest.fixture
def fake() -> Iterator[None]:
    CALLS.clear()
    name = plugins.register_plugin(FakePlugin(), name="fake-logger")
    yield
    plugins.unregister_plugin(name)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"))


def trainer(tmp_path: Path, data_root: Path, loggers: str, epochs: int = 2, resume: bool = False) -> Trainer:
    text = tiny_recipe(data_root).replace("  epochs: 3\n", f"  epochs: {epochs}\n  loggers: {loggers}\n")
    text = text.replace("steps_per_epoch: 6", "steps_per_epoch: 2")
    path = write(tmp_path / "recipe.yaml", text)
    registry = plugins.get_registry()
    return Trainer(resolve_recipe(load_recipe(path), registry, str(path)), tmp_path / "run", registry, resume=resume)


def events(folder: Path) -> Any:
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def test_loggers_get_each_committed_epoch_and_tensorboard_reads_it_back(tmp_path: Path, data_root: Path,
                                                                       fake: None) -> None:
    """Epoch 1 trains, Ctrl-C, the run resumes for epoch 2: every logger gets start / log_epoch / close."""
    first = trainer(tmp_path, data_root, "[jsonl, {name: fake, tag: t}, tensorboard]")
    original = first._train_epoch
    first._train_epoch = lambda progress: (_ for _ in ()).throw(KeyboardInterrupt) if first.epoch == 1 \
        else original(progress)  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    trainer(tmp_path, data_root, "[jsonl, {name: fake, tag: t}, tensorboard]", resume=True).fit()

    run = tmp_path / "run"
    inits = [c for c in CALLS if c[0] == "init"]
    assert inits[0][1:4] == ("run", "tiny", "t") and "checkpoints" not in inits[0][4]  # built before training
    logged = [c for c in CALLS if c[0] != "init"]
    assert [c[:3] if c[0] == "start" else c[:2] for c in logged] == [
        ("start", 0, []), ("log_epoch", 1), ("close",), ("start", 1, [1]), ("log_epoch", 2), ("close",)]
    epochs = [c for c in logged if c[0] == "log_epoch"]
    assert all(c[2] == ["curves", "preview"] and c[4] and c[5] == ["generator"] for c in epochs)
    assert epochs[0][3]["curves"] != epochs[1][3]["curves"]  # curves.png redrawn for each epoch
    assert epochs[1][3]["curves"] == hashlib.sha256((run / "curves.png").read_bytes()).hexdigest()
    assert [r["epoch"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]  # the jsonl logger
    assert not list(run.glob(".*.tmp*"))

    tb = events(run / "tensorboard")
    tags = tb.Tags()["scalars"]
    for tag in ("loss/l1", "loss/cross_entropy", "loss/total", "val/psnr/drf4", "val/ssim/drf100",
                "val/nrmse/drf100", "input/psnr/drf4", "input/psnr/drf100", "val/gain", "lr/generator",
                "dose_head/accuracy"):
        assert tag in tags, tag
        assert [e.step for e in tb.Scalars(tag)] == [1, 2], tag  # the resume did not log epoch 1 twice
    records = read_metrics(run / "metrics.jsonl")
    assert [e.value for e in tb.Scalars("val/psnr/drf100")] == pytest.approx(
        [r["val"]["per_drf"]["100"]["psnr"] for r in records])
    assert [e.value for e in tb.Scalars("input/psnr/drf4")] == pytest.approx(
        [r["val"]["low_dose"]["4"]["psnr"] for r in records])
    previews = tb.Images("preview")
    assert [e.step for e in previews] == [1, 2] and previews[0].width > 300
    assert "recipe/text_summary" in tb.Tags()["tensors"]


def test_a_run_without_loggers_still_draws_its_curves(tmp_path: Path, data_root: Path) -> None:
    trainer(tmp_path, data_root, "[]", epochs=1).fit()
    run = tmp_path / "run"
    assert (run / "curves.png").is_file() and (run / "previews" / "epoch_001.png").is_file()
    assert not (run / "metrics.jsonl").exists() and not (run / "tensorboard").exists()


def test_tensorboard_resume_purges_what_a_kill_left_after_the_checkpoint(tmp_path: Path) -> None:
    """Epochs 1-3 logged, the checkpoint holds epoch 2: the resumed run shows 1, 2, 3 once each."""
    from ldt_plugins.loggers.tensorboard import TensorBoardLogger

    logger = TensorBoardLogger(tmp_path, {"name": "r"})
    assert not list(tmp_path.iterdir())  # building writes nothing
    logger.start(0, [])
    for epoch in (1, 2, 3):
        logger.log_epoch(example_record(epoch), {})
    logger.close()
    history = [example_record(1), example_record(2)]
    resumed = TensorBoardLogger(tmp_path, {"name": "r"})
    resumed.start(2, history)
    record = example_record(3)
    record["losses"]["l1"] = 0.5  # the resumed epoch 3 differs from the lost one
    resumed.log_epoch(record, {})
    resumed.close()
    l1 = events(tmp_path / "tensorboard").Scalars("loss/l1")
    assert [(e.step, round(e.value, 4)) for e in l1] == [(1, 0.1), (2, 0.05), (3, 0.5)]


def test_scalars_name_every_number_of_an_epoch() -> None:
    values = scalars(example_record(2))
    assert values["loss/l1"] == 0.05 and values["val/psnr/drf100"] == 43.0 and values["input/psnr/drf4"] == 38.04
    assert values["lr/generator"] == 1e-3 and values["dose_head/accuracy"] == 0.5 and values["val/gain"] == 2.0
    assert "val/psnr/drf4" not in scalars({**example_record(1), "val": {}})
    assert scalars({"epoch": 1, "lr": 1e-4, "losses": {"l1": float("nan")}}) == {"lr": 1e-4}


@pytest.mark.parametrize("name", ["jsonl", "tensorboard"])
def test_built_in_loggers_pass_the_conformance_check(name: str) -> None:
    check_part("logger", name)


def test_loggers_are_recipe_checked_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    recipe = write(tmp_path / "r.yaml", "name: r\nmodel: {generator: {name: mlnet, channels: 4, depth: 2}}\n"
                   "losses: [{name: l1}]\ndata: {drfs: [4, 100]}\n")
    resolved = resolve_recipe(load_recipe(recipe), plugins.get_registry())
    assert resolved["train"]["loggers"] == [{"name": "jsonl"}]  # the default
    with pytest.raises(RecipeError, match=r"train.loggers.0.img: unknown parameter of logger 'tensorboard' "
                                          r"\(did you mean 'images'\?\)"):
        resolve_recipe(load_recipe(recipe, ["train.loggers=[{name: tensorboard, img: false}]"]),
                       plugins.get_registry())
    assert main(["plugins", "--json"]) == 0
    parts = json.loads(capsys.readouterr().out)["parts"]
    assert {(p["kind"], p["name"]) for p in parts} >= {("logger", "jsonl"), ("logger", "tensorboard")}
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # the extra is not installed: ldt check says so
    assert main(["check", str(recipe), "--set", "train.loggers=[jsonl, tensorboard]"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "train.loggers.1: logger 'tensorboard'" in err and "pip install 'lowdose-toolkit[tensorboard]'" in err


def test_readme_mlflow_logger_is_a_working_plugin(tmp_path: Path) -> None:
    """The README's MLflow example, run against a stand-in ``mlflow`` module that records the calls."""
    readme = (REPO / "README.md").read_text()
    start = readme.index("`ldt_mlflow.py`")
    code = re.compile(r"```python\n(.*?)```", re.S).search(readme, start).group(1)
    calls: list[tuple[Any, ...]] = []
    mlflow = types.ModuleType("mlflow")
    for function in ("set_experiment", "start_run", "log_params", "log_metrics", "log_artifact", "end_run"):
        setattr(mlflow, function, lambda *a, _f=function, **k: calls.append((_f, a, k)))
    module = types.ModuleType("ldt_mlflow")
    sys.modules["mlflow"] = mlflow
    try:
        exec(compile(code, "README.md:ldt_mlflow.py", "exec"), module.__dict__)  # noqa: S102 - our own README
        name = plugins.register_plugin(module, name="mlflow-example")
        try:
            snippet = re.compile(r"```yaml\n(.*?)```", re.S).search(readme, start).group(1)
            assert "name: mlflow" in snippet
            recipe = write(tmp_path / "r.yaml", "name: r\nmodel: {generator: {name: mlnet, channels: 4, depth: 2}}\n"
                           "losses: [{name: l1}]\ndata: {drfs: [4, 100]}\n" + snippet)
            resolved = resolve_recipe(load_recipe(recipe), plugins.get_registry())
            spec = resolved["train"]["loggers"][-1]
            assert spec["name"] == "mlflow"
            check_part("logger", "mlflow", {k: v for k, v in spec.items() if k != "name"})
        finally:
            plugins.unregister_plugin(name)
    finally:
        del sys.modules["mlflow"]
    made = [c[0] for c in calls]
    assert made[:2] == ["set_experiment", "start_run"] and made.count("end_run") == 2
    metrics = [c for c in calls if c[0] == "log_metrics"]
    assert metrics[0][1][0] == scalars(example_record(1)) and metrics[0][2] == {"step": 1}
    assert any(c[0] == "log_artifact" for c in calls)
