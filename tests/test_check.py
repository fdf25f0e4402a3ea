"""``ldt check`` rejects every recipe ``ldt run`` would reject later: exit 2, the dotted key in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write
from test_recipe import BASE as RECIPE_BASE

from lowdose_toolkit.cli.app import main
from lowdose_toolkit.core.plugin_manager import get_registry
from lowdose_toolkit.core.recipe import load_recipe, resolve_recipe
from lowdose_toolkit.core.spec import run_spec
from lowdose_toolkit.errors import RecipeError

BASE = RECIPE_BASE.replace("train: {epochs: 1}\n", """train:
  epochs: 2
  stages:
    - {name: coarse, epochs: 1, trainable: [generator, heads], use_refiner: false}
    - {name: refine, epochs: 1, trainable: [refiner]}
eval: {patch_size: 24, overlap: 0}
""")

BAD = [  # (--set override, the key the message must name, a word of the fix or the value)
    ("train.stages.1.trainable=[refiner, decoder]", "train.stages.1.trainable", "'decoder'"),
    ("train.stages.0.epochs=0", "train.stages.0.epochs", "positive int"),
    ("train.stages.0.max_minutes=0", "train.stages.0.max_minutes", "positive number"),
    ("train.stages.0.trainable=generator", "train.stages.0.trainable", "list of parts"),
    ("train.stages.0.use_refiner=maybe", "train.stages.0.use_refiner", "true or false"),
    ("train.stages.1.name=coarse", "train.stages.1.name", "unique"),
    ("eval.overlap=3", "eval.overlap", "even"),
    ("eval.overlap=24", "eval.overlap", "24"),
    ("eval.overlap=1.5", "eval.overlap", "fraction"),
    ("eval.overlap=-2", "eval.overlap", ">= 0"),
    ("eval.patch_size=[24, 24]", "eval.patch_size", "one size or three"),
    ("eval.patch_size=0", "eval.patch_size", ">= 1"),
    ("eval.batch_size=0", "eval.batch_size", ">= 1"),
    ("eval.val_subjects=0", "eval.val_subjects", ">= 1"),
    ("train.val_every=0", "train.val_every", ">= 1"),
    ("train.epochs=0", "train.epochs", ">= 1"),
    ("train.steps_per_epoch=0", "train.steps_per_epoch", ">= 1"),
    ("train.max_minutes=-1", "train.max_minutes", "> 0"),
    ("train.optimizer.lr=0", "train.optimizer.lr", "> 0"),
    ("train.optimizer.betas=[0.5, 0.9, 0.99]", "train.optimizer.betas", "two values"),
    ("train.optimizer.betas=[0.5, 1.5]", "train.optimizer.betas", "[0, 1)"),
    ("train.optimizer.weight_decay=-0.1", "train.optimizer.weight_decay", ">= 0"),
    ("train.scheduler.factor=1.5", "train.scheduler.factor", "< 1"),
    ("train.scheduler.patience=-1", "train.scheduler.patience", ">= 0"),
    ("train.scheduler.monitor=val_psnr_drf50", "train.scheduler.monitor", "data.drfs [4, 100]"),
    ("train.scheduler.monitor=psnr", "train.scheduler.monitor", "val_gain"),
    ("train.device=gpu", "train.device", "cuda:N"),
    ("data.drfs=[4, 4, 100]", "data.drfs", "distinct"),
    ("data.drfs=[0, 100]", "data.drfs", ">= 1"),
    ("data.patch_size=[16, 16]", "data.patch_size", "one size or three"),
    ("data.batch_size=0", "data.batch_size", ">= 1"),
    ("data.num_workers=-1", "data.num_workers", ">= 0"),
    ("data.queue_length=4", "data.queue_length", "samples_per_volume"),
    ("data.split.val=-1", "data.split.val", ">= 0"),
    ("data.split.test=1.5", "data.split.test", "whole number"),
    ("data.split.val=0", "data.split.val", "no validation subject"),
    ("data.split.val=0.8", "data.split", "leave no training subjects"),
    ("losses.0.weight=-300", "losses.0.weight", ">= 0"),
    ("seed=-1", "seed", ">= 0"),
]


@pytest.mark.parametrize(("override", "key", "hint"), BAD, ids=[b[0] for b in BAD])
def test_check_rejects_bad_recipe(tmp_path: Path, override: str, key: str, hint: str,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "r.yaml", BASE)
    assert main(["check", str(path), "--set", override]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{path}: {key}:" in err, err
    assert hint in err, err
    assert "Traceback" not in err


def test_check_accepts_the_base_recipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(write(tmp_path / "r.yaml", BASE))]) == 0, capsys.readouterr().err


def test_run_spec_is_typed_and_frozen(tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", BASE)
    spec = run_spec(resolve_recipe(load_recipe(path), get_registry(), str(path)))
    assert spec.drfs == (4, 100) and spec.patch_size == (16, 16, 16)
    assert [(s.name, s.epochs, s.trainable, s.use_refiner) for s in spec.stages] == [
        ("coarse", 1, ("generator", "heads"), False), ("refine", 1, ("refiner",), True)]
    assert spec.window.patch_size == (24, 24, 24) and spec.window.overlap == (0, 0, 0)
    assert spec.schedule.mode == "max" and spec.total_epochs == 2
    with pytest.raises(AttributeError):
        spec.drfs = (4,)  # type: ignore[misc]


def test_run_rejects_what_check_rejects_before_touching_data(tmp_path: Path) -> None:
    """``ldt run`` resolves through the same pass: the error comes before any data or run directory."""
    path = write(tmp_path / "r.yaml", BASE)
    out = tmp_path / "run"
    assert main(["run", str(path), "--set", "eval.overlap=3", "--out", str(out)]) == 2
    assert not out.exists()
    with pytest.raises(RecipeError, match="eval.overlap"):
        resolve_recipe(load_recipe(path, ["eval.overlap=3"]), get_registry(), str(path))


def test_check_runs_every_shape_on_the_meta_device(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A window too small for the network is caught by ``ldt check``, not after the data has loaded."""
    text = BASE.replace("patch_size: 16\n", "patch_size: 16\n  batch_size: 1\n")
    text = text.replace("{name: dose_classifier, input: bottleneck}", "{name: noise_level, input: image}")
    path = write(tmp_path / "r.yaml", text.replace("on: dose_classifier", "on: noise_level"))
    assert main(["check", str(path), "--set", "data.patch_size=8"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{path}: data.patch_size: the model cannot train on a [1, 1, 8, 8, 8] batch" in err, err
    assert "at least 10 voxels" in err, err  # the network's own reason


def test_precision_setting_and_its_older_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "r.yaml", BASE)
    resolve = lambda *o: run_spec(resolve_recipe(load_recipe(path, list(o)), get_registry(), str(path)))  # noqa: E731
    assert resolve().precision == "fp32"  # the default: CPU runs stay as they were
    assert resolve("train.precision=auto").precision == "auto"
    assert resolve("train.amp=none").precision == "fp32"  # recipes and checkpoints of earlier versions
    assert resolve("train.amp=bf16").precision == "bf16" and resolve("train.amp=bf16").precision_cuda_only
    assert main(["check", str(path), "--set", "train.precision=fp16", "--set", "train.amp=bf16"]) == 2
    assert "train.amp: 'bf16' contradicts train.precision 'fp16'" in capsys.readouterr().err


@pytest.mark.parametrize("native", [True, False])
def test_training_precision_auto_is_bf16_where_native_and_train_amp_stays_cuda_only(
        native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """auto trains in bf16 on a CPU that runs it natively (equal PSNR over three seeds, 1.58x per step), fp32
    on one that does not; the older train.amp autocasts on CUDA only, as it did."""
    import torch

    from lowdose_toolkit.infer import precision

    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    cpu = torch.device("cpu")
    assert precision.training_precision("auto", cpu) == ("bf16" if native else "fp32")
    assert precision.training_precision("bf16", cpu, cuda_only=True) == "fp32"
    assert precision.training_precision("bf16", cpu) == "bf16"  # asked for explicitly: honoured on the CPU
    assert precision.training_precision("fp32", cpu) == "fp32"


def test_a_run_recorded_with_the_older_amp_key_matches_the_same_recipe_now(tmp_path: Path) -> None:
    from lowdose_toolkit.train.rundir import first_difference

    path = write(tmp_path / "r.yaml", BASE)
    new = resolve_recipe(load_recipe(path), get_registry(), str(path))
    old = resolve_recipe(load_recipe(path, ["train.amp=none"]), get_registry(), str(path))
    old["train"].pop("precision")  # as recorded by an earlier version
    assert first_difference(old, new) is None
    assert first_difference(old, resolve_recipe(load_recipe(path, ["train.precision=bf16"]), get_registry()))[0] \
        == "train.precision"
