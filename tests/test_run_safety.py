"""Training runs lose nothing: non-finite guards, crash-consistent epoch ends, resumable from the first
moment, SIGTERM, the time budget across resumes, the run lock, unique names, the study's run check, and a
kill test that SIGKILLs a tiny run at many points and resumes it to the uninterrupted run's weights."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_dataset, tiny_recipe, write

from lowdose_toolkit.cli.app import main
from lowdose_toolkit.core.checkpoint import load_checkpoint
from lowdose_toolkit.core.plugin_manager import get_registry
from lowdose_toolkit.core.recipe import dump_recipe, load_recipe, resolve_recipe
from lowdose_toolkit.errors import UserError
from lowdose_toolkit.schemes import NonFiniteLoss
from lowdose_toolkit.train.engine import Trainer
from lowdose_toolkit.train.rundir import LOCK_HOLDERS, default_run_dir, read_metrics


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"))


def make_trainer(tmp_path: Path, text: str, overrides: tuple[str, ...] = (), run: str = "run",
                 resume: bool = False) -> Trainer:
    path = write(tmp_path / "recipe.yaml", text)
    recipe = resolve_recipe(load_recipe(path, overrides), get_registry(), str(path))
    return Trainer(recipe, tmp_path / run, get_registry(), resume=resume)


def stop_after(trainer: Trainer, epoch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C as the epoch after ``epoch`` starts (``epoch`` is checkpointed)."""
    original = trainer._train_epoch

    def train_epoch(progress: object) -> dict[str, float]:
        if trainer.epoch == epoch:
            raise KeyboardInterrupt
        return original(progress)

    monkeypatch.setattr(trainer, "_train_epoch", train_epoch)


def finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


# ---------------------------------------------------------------------- non-finite values
def test_nan_loss_stops_training_naming_epoch_step_and_terms(tmp_path: Path, data_root: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = make_trainer(tmp_path, tiny_recipe(data_root))
    l1 = next(t for t in trainer.losses if t.name == "l1").loss
    original = l1.forward
    calls = {"n": 0}

    def forward(*args: object, **kwargs: object) -> torch.Tensor:
        value = original(*args, **kwargs)
        if trainer.epoch == 1:  # the second epoch, third step
            calls["n"] += 1
            if calls["n"] == 3:
                return value * float("nan")
        return value

    monkeypatch.setattr(l1, "forward", forward)
    with pytest.raises(UserError, match=r"^epoch 2, step 3/6: non-finite generator loss nan \(l1=nan, "
                                        r"cross_entropy=[0-9.]+\); training stopped .*keeps epoch 1"):
        trainer.fit()
    run = tmp_path / "run"
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert last.epoch == 1 and finite(last.model)
    assert finite(trainer.model.state_dict())  # the optimizer never stepped on it
    assert [m["epoch"] for m in read_metrics(run / "metrics.jsonl")] == [1]
    assert load_checkpoint(run / "checkpoints" / "best.pt").epoch == 1


def test_backward_step_refuses_a_non_finite_loss_for_any_phase(tmp_path: Path, data_root: Path) -> None:
    scheme = make_trainer(tmp_path, tiny_recipe(data_root)).scheme
    params = [p.detach().clone() for p in scheme.model.parameters()]
    loss = sum(p.sum() for p in scheme.model.parameters()) * float("inf")
    with pytest.raises(NonFiniteLoss, match="non-finite generator loss"):
        scheme.backward_step("generator", loss)
    assert all(torch.equal(a, p) for a, p in zip(params, scheme.model.parameters(), strict=True))


def test_non_finite_values_a_scheme_returns_stop_training(tmp_path: Path, data_root: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = make_trainer(tmp_path, tiny_recipe(data_root))
    original = trainer.scheme.train_step
    monkeypatch.setattr(trainer.scheme, "train_step", lambda batch: {
        **original(batch), **({"l1": math.inf} if trainer.epoch == 1 else {})})
    with pytest.raises(UserError, match=r"^epoch 2, step 1/6: non-finite loss \(l1=inf, cross_entropy="):
        trainer.fit()
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt").epoch == 1


def test_non_finite_weights_are_never_validated_or_saved(tmp_path: Path, data_root: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = make_trainer(tmp_path, tiny_recipe(data_root))
    original = trainer._train_epoch

    def train_epoch(progress: object) -> dict[str, float]:
        losses = original(progress)
        if trainer.epoch == 2:
            with torch.no_grad():
                next(trainer.model.generator.parameters()).fill_(math.nan)
        return losses

    monkeypatch.setattr(trainer, "_train_epoch", train_epoch)
    with pytest.raises(UserError, match=r"^epoch 2: non-finite values in generator weight .*keeps epoch 1"):
        trainer.fit()
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last.epoch == 1 and finite(last.model)


# ---------------------------------------------------------------------- the end of an epoch, resume
def test_partial_or_lost_metrics_lines_are_repaired_on_resume(tmp_path: Path, data_root: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    text = tiny_recipe(data_root).replace("steps_per_epoch: 6", "steps_per_epoch: 2")
    for case in ("partial", "lost"):
        trainer = make_trainer(tmp_path, text, run=case)
        stop_after(trainer, 1, monkeypatch)
        with pytest.raises(KeyboardInterrupt):
            trainer.fit()
        metrics = tmp_path / case / "metrics.jsonl"
        first = read_metrics(metrics)
        assert [m["epoch"] for m in first] == [1]
        if case == "partial":  # killed while appending epoch 2's line (old versions appended in place)
            metrics.write_text(metrics.read_text() + '{"epoch": 2, "stage": "tra')
        else:  # killed after last.pt, before metrics.jsonl
            metrics.unlink()
        make_trainer(tmp_path, text, run=case, resume=True).fit()
        lines = read_metrics(metrics)
        assert [m["epoch"] for m in lines] == [1, 2, 3]
        assert lines[0] == first[0]
        assert metrics.read_text().endswith("}\n")


def test_best_pt_is_repaired_from_last_pt_on_resume(tmp_path: Path, data_root: Path) -> None:
    text = tiny_recipe(data_root).replace("epochs: 3", "epochs: 1").replace("steps_per_epoch: 6",
                                                                             "steps_per_epoch: 2")
    make_trainer(tmp_path, text).fit()
    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / "best.pt").unlink()  # killed between last.pt and best.pt
    make_trainer(tmp_path, text, resume=True).fit()
    best, last = load_checkpoint(checkpoints / "best.pt"), load_checkpoint(checkpoints / "last.pt")
    assert best.epoch == last.epoch == 1 == read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["best_epoch"]
    assert all(torch.equal(v, last.model[k]) for k, v in best.model.items())


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_the_beginning(
        tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tiny_recipe(data_root).replace("epochs: 3", "epochs: 1").replace("steps_per_epoch: 6",
                                                                             "steps_per_epoch: 2")
    text = text.replace("split: {val: 1, test: 1}", "split: {val: 1, test: 0}")
    trainer = make_trainer(tmp_path, text)
    run = tmp_path / "run"
    assert (run / "recipe.yaml").is_file()  # written before any data was read
    trainer.close()  # as if killed here
    assert main(["run", "--resume", str(run)]) == 0
    assert "starting it from the beginning" in capsys.readouterr().err
    assert load_checkpoint(run / "checkpoints" / "last.pt").epoch == 1


def test_time_budget_counts_the_time_of_earlier_attempts(tmp_path: Path, data_root: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    text = tiny_recipe(data_root).replace("steps_per_epoch: 6", "steps_per_epoch: 2")
    trainer = make_trainer(tmp_path, text, ("train.max_minutes=1",))
    stop_after(trainer, 1, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    assert 0 < state["elapsed"] < 60
    state["elapsed"] = 61.0  # the first attempt had spent the whole budget
    torch.save(state, last)
    make_trainer(tmp_path, text, ("train.max_minutes=1",), resume=True).fit()
    assert load_checkpoint(last).epoch == 1
    assert "time budget of 1.0 min spent after epoch 1" in capsys.readouterr().err


# ---------------------------------------------------------------------- exclusivity
def test_a_second_process_cannot_train_in_a_locked_run_directory(tmp_path: Path, data_root: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    text = tiny_recipe(data_root).replace("epochs: 3", "epochs: 1").replace("steps_per_epoch: 6",
                                                                             "steps_per_epoch: 2")
    trainer = make_trainer(tmp_path, text)
    run = tmp_path / "run"
    assert main(["run", "--resume", str(run)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{run} is in use by another {LOCK_HOLDERS} (pid {os.getpid()})" in err
    # ldt evaluate RUN_DIR writes its results into the run directory: not while a training works there
    assert main(["evaluate", str(run)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{run} is in use by another {LOCK_HOLDERS} (pid {os.getpid()}); wait for it to end, or write the " \
           "results elsewhere with --out DIR" in err
    trainer.fit()  # the holder trains; fit releases the lock when it returns
    assert main(["evaluate", str(run)]) == 0 and not (run / ".lock").exists()
    assert main(["run", "--resume", str(run)]) == 0


def test_default_run_directories_are_unique_within_one_second(tmp_path: Path, data_root: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20250101-000000")
    first = default_run_dir({"name": "tiny"}, tmp_path / "runs")
    second = default_run_dir({"name": "tiny"}, tmp_path / "runs")
    assert first.is_dir() and second.is_dir() and first != second
    assert second.name == "tiny-20250101-000000-2"
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path / "recipe.yaml", tiny_recipe(data_root))
    recipe = resolve_recipe(load_recipe(path), get_registry(), str(path))
    trainer = Trainer(recipe, None, get_registry())
    trainer.close()
    assert trainer.run_dir == Path("runs/tiny-20250101-000000-3") and (trainer.run_dir / "recipe.yaml").is_file()


# ---------------------------------------------------------------------- ldt study
def test_study_refuses_a_run_trained_with_another_recipe(tmp_path: Path, data_root: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from lowdose_toolkit.evaluation.study import _recipe_for, load_study

    write(tmp_path / "recipes" / "base.yaml", tiny_recipe(data_root))
    study_path = write(tmp_path / "recipes" / "study.yaml", "set: [train.steps_per_epoch=2]\n"
                       "methods: [{method: Baseline, recipe: base.yaml}]\nclassical: []\n")
    study = load_study(study_path)
    recipe = _recipe_for(study, study["methods"][0])
    recipe["train"]["epochs"] = 1  # the run was trained before the study file changed
    write(tmp_path / "out" / "baseline" / "recipe.yaml", dump_recipe(recipe))
    assert main(["study", str(study_path), "--out", str(tmp_path / "out")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "train.epochs is 1 there and 3 in the study; remove" in err and "restore the study file" in err
    assert not (tmp_path / "out" / "baseline" / "checkpoints").exists()


# ---------------------------------------------------------------------- the kill test
#: Runs ``ldt`` and kills itself at a named point: ``startup`` (while the model's shapes are checked, the
#: recipe already written), ``batch:N`` (SIGKILL) or ``sigterm:N`` (SIGTERM) as the N-th batch is drawn,
#: ``replace:NAME:N:before|after`` around the N-th atomic rename onto a file named NAME.
DRIVER = r'''
import os, signal, sys
from pathlib import Path

kind, *args = os.environ["LDT_KILL_AT"].split(":")


def die():
    os.kill(os.getpid(), signal.SIGKILL)


if kind == "startup":
    import lowdose_toolkit.train.engine as engine
    engine.dry_run = lambda *a, **k: die()
elif kind in ("batch", "sigterm"):
    from lowdose_toolkit.data.datasets import PatchStream
    draw, count = PatchStream.next_batch, [0]

    def next_batch(self):
        count[0] += 1
        if count[0] == int(args[0]):
            die() if kind == "batch" else os.kill(os.getpid(), signal.SIGTERM)
        return draw(self)
    PatchStream.next_batch = next_batch
elif kind == "replace":
    name, nth, when = args[0], int(args[1]), args[2]
    rename, count = os.replace, [0]

    def replace(src, dst, *a, **k):
        if Path(dst).name == name:
            count[0] += 1
        hit = Path(dst).name == name and count[0] == nth
        if hit and when == "before":
            die()
        rename(src, dst, *a, **k)
        if hit and when == "after":
            die()
    os.replace = replace

from lowdose_toolkit.cli.app import main
sys.exit(main(sys.argv[1:]))
'''


def assert_recoverable(run: Path) -> None:
    """What a kill may leave: ``last.pt`` is the truth, and ``best.pt`` and ``metrics.jsonl`` agree with it
    (or lack only what ``last.pt`` itself restores: its own metrics line, its own epoch as the best)."""
    assert (run / "recipe.yaml").is_file()
    checkpoints = run / "checkpoints"
    metrics = read_metrics(run / "metrics.jsonl")
    if not (checkpoints / "last.pt").is_file():  # a resume starts afresh (and removes what is left)
        return
    last = load_checkpoint(checkpoints / "last.pt")
    assert json.loads(last.metrics)["epoch"] == last.epoch
    epochs = [m["epoch"] for m in metrics]
    assert epochs in (list(range(1, last.epoch + 1)), list(range(1, last.epoch))), (epochs, last.epoch)
    if last.best["epoch"] != last.epoch:  # else best.pt is (re)made from last.pt on resume
        assert load_checkpoint(checkpoints / "best.pt").epoch == last.best["epoch"]
    if epochs and epochs[-1] == last.epoch:
        assert metrics[-1]["best_epoch"] == last.best["epoch"]


def test_sigkill_anywhere_then_resume_reaches_the_uninterrupted_weights(tmp_path: Path, data_root: Path) -> None:
    text = tiny_recipe(data_root).replace("steps_per_epoch: 6", "steps_per_epoch: 4")
    recipe = write(tmp_path / "recipe.yaml", text)
    assert main(["run", str(recipe), "--out", str(tmp_path / "ref")]) == 0  # uninterrupted, in this process
    driver = write(tmp_path / "driver.py", DRIVER)
    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "2"}
    seed = os.environ.get("LDT_KILL_SEED", "12")
    rng = random.Random(seed)
    # (where it dies, what the run directory holds then); each attempt resumes the one before.
    points: list[tuple[str, str]] = [
        ("startup", "recipe.yaml only"),
        ("batch:2", "inside epoch 1, no checkpoint"),
        ("replace:last.pt:1:before", "epoch 1 saved to a temporary file, not renamed"),
        ("replace:last.pt:1:after", "last.pt of epoch 1, no best.pt, no metrics"),
        ("replace:best.pt:1:before", "while the resume repairs best.pt from last.pt"),
        ("replace:metrics.jsonl:2:before", "last.pt of epoch 2, metrics of epoch 1"),
        ("sigterm:2", "SIGTERM inside epoch 3"),
        ("random", "a random moment"),
        ("random", "a random moment"),
    ]
    for i, (point, what) in enumerate(points):
        args = ["run", str(recipe), "--out", str(run)] if i == 0 else ["run", "--resume", str(run)]
        proc = subprocess.Popen([sys.executable, str(driver), *args],
                                env={**env, "LDT_KILL_AT": point}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        if point == "random":
            try:
                proc.wait(timeout=rng.uniform(0.5, 3.0))
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
        try:
            err = proc.communicate(timeout=120)[1]
        finally:
            proc.kill()
        context = f"killed at {point} ({what}), seed {seed}: {err[-2000:]}"
        if point.startswith("sigterm"):
            assert proc.returncode == 143, context
            assert "terminated (SIGTERM)" in err and f"ldt run --resume {run}" in " ".join(err.split()), context
        elif point != "random":
            assert proc.returncode == -signal.SIGKILL, context
        assert_recoverable(run)
        last = run / "checkpoints" / "last.pt"
        if point in ("startup", "batch:2", "replace:last.pt:1:before"):
            assert not last.exists(), context
        elif point == "replace:last.pt:1:after":
            assert load_checkpoint(last).epoch == 1 and not (run / "metrics.jsonl").exists(), context
        elif point == "replace:best.pt:1:before":
            assert load_checkpoint(last).epoch == 1 and not (run / "checkpoints" / "best.pt").exists(), context
        elif point in ("replace:metrics.jsonl:2:before", "sigterm:2"):
            assert load_checkpoint(last).epoch == 2, context
    assert main(["run", "--resume", str(run)]) == 0

    ref_ckpt = load_checkpoint(tmp_path / "ref" / "checkpoints" / "last.pt")
    res_ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert res_ckpt.epoch == ref_ckpt.epoch == 3
    for key, value in ref_ckpt.model.items():
        assert torch.equal(value, res_ckpt.model[key]), key
    ref_metrics, res_metrics = read_metrics(tmp_path / "ref" / "metrics.jsonl"), read_metrics(run / "metrics.jsonl")
    assert [m["epoch"] for m in res_metrics] == [1, 2, 3]
    for ref, res in zip(ref_metrics, res_metrics, strict=True):
        assert {k: v for k, v in ref.items() if k != "epoch_seconds"} == \
            {k: v for k, v in res.items() if k != "epoch_seconds"}
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert best.epoch == res_metrics[-1]["best_epoch"] == load_checkpoint(tmp_path / "ref" / "checkpoints" /
                                                                          "best.pt").epoch
    ref_best = load_checkpoint(tmp_path / "ref" / "checkpoints" / "best.pt")
    assert all(torch.equal(v, best.model[k]) for k, v in ref_best.model.items())
    assert not [p for p in run.rglob(".*.tmp*")]  # temporary files of killed writers were removed
    assert (run / "results.csv").is_file()


def test_a_trained_best_checkpoint_is_never_deleted_by_starting_again(tmp_path: Path, data_root: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """last.pt removed (to save space) from a finished run: --resume refuses instead of retraining over best.pt."""
    text = tiny_recipe(data_root).replace("epochs: 3", "epochs: 1").replace("steps_per_epoch: 6",
                                                                             "steps_per_epoch: 2")
    make_trainer(tmp_path, text).fit()
    run = tmp_path / "run"
    (run / "checkpoints" / "last.pt").unlink()
    before = (run / "checkpoints" / "best.pt").read_bytes()
    assert main(["run", "--resume", str(run)]) == 2
    assert "has a trained checkpoints/best.pt but no last.pt" in " ".join(capsys.readouterr().err.split())
    assert (run / "checkpoints" / "best.pt").read_bytes() == before
