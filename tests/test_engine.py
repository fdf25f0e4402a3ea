"""The training engine: loss falls, GAN phases, checkpoints, resume after SIGKILL, run directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tiny_dataset, tiny_gan_recipe, tiny_recipe, write

from lowdose_toolkit.cli.app import main
from lowdose_toolkit.core.checkpoint import load_checkpoint
from lowdose_toolkit.core.plugin_manager import get_registry
from lowdose_toolkit.core.recipe import load_recipe, resolve_recipe
from lowdose_toolkit.errors import UserError
from lowdose_toolkit.train.engine import Trainer


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"))


def trainer_for(tmp_path: Path, text: str, overrides: tuple[str, ...] = (), run: str = "run") -> Trainer:
    path = write(tmp_path / "recipe.yaml", text)
    recipe = resolve_recipe(load_recipe(path, overrides), get_registry(), str(path))
    return Trainer(recipe, tmp_path / run, get_registry())


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tiny_training_makes_loss_fall_and_fills_run_dir(tmp_path: Path, data_root: Path) -> None:
    trainer = trainer_for(tmp_path, tiny_recipe(data_root), ("train.epochs=4",))
    trainer.fit()
    run = tmp_path / "run"
    metrics = read_metrics(run)
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4]
    first, last = metrics[0]["losses"], metrics[-1]["losses"]
    assert last["l1"] < 0.85 * first["l1"], (first, last)
    assert set(metrics[0]["val"]["per_drf"]) == {"4", "100"}
    assert {"psnr", "ssim", "nrmse"} <= set(metrics[0]["val"]["per_drf"]["100"])
    assert metrics[0]["lr"] == pytest.approx(1e-3) and metrics[0]["epoch_seconds"] > 0
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 4 and ckpt["recipe"]["name"] == "tiny"
    assert set(ckpt) >= {"model", "scheme", "schedulers", "rng", "normalization", "split", "drfs"}
    assert (run / "checkpoints" / "best.pt").is_file()
    png = (run / "previews" / "epoch_004.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert yaml.safe_load((run / "recipe.yaml").read_text())["train"]["epochs"] == 4
    record = json.loads((run / "run.json").read_text())
    assert record["device"] == "cpu" and len(record["split"]["test"]) == 1


def test_split_seed_fixes_the_subjects_while_the_training_seed_varies(tmp_path: Path, data_root: Path) -> None:
    """A seed study (one split, several training seeds) sets data.split.seed; by default the seed shuffles both."""
    def split(*overrides: str) -> dict:
        return trainer_for(tmp_path, tiny_recipe(data_root), overrides, run=f"run{len(list(tmp_path.iterdir()))}"
                           ).split.summary()

    base = split("seed=0")
    assert all(split(f"seed={s}", "data.split.seed=0") == base for s in (1, 2, 3))
    assert any(split(f"seed={s}") != base for s in (1, 2, 3))  # 5 subjects: some other seed moves one


def test_subject_pairs_of_a_drf_subset_keep_the_models_classes(tmp_path: Path, data_root: Path) -> None:
    from lowdose_toolkit.evaluation.subjects import subject_pairs

    path = write(tmp_path / "recipe.yaml", tiny_recipe(data_root))
    recipe = resolve_recipe(load_recipe(path), get_registry(), str(path))  # data.drfs [4, 100]
    pairs = subject_pairs(recipe, ["sub01", "sub03", "nobody"], [100])
    assert [(s["subject_id"], int(s["drf"]), int(s["drf_class"])) for s in pairs] == [("sub01", 100, 1),
                                                                                      ("sub03", 100, 1)]
    assert len(subject_pairs(recipe, ["sub01"])) == 2
    with pytest.raises(UserError, match=r"none of the subjects \['nobody'\] is in the data source"):
        subject_pairs(recipe, ["nobody"])
    with pytest.raises(ValueError, match=r"DRFs \[10\] are not all among the run's data.drfs \[4, 100\]"):
        subject_pairs(recipe, ["sub01"], [10])


def test_a_resumed_auto_run_keeps_the_precision_it_started_in(tmp_path: Path, data_root: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that auto started in fp32 (an older version, another machine) goes on in fp32 where auto now
    picks bf16: its remaining steps stay like its first ones."""
    from lowdose_toolkit.infer import precision

    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    path = write(tmp_path / "recipe.yaml", tiny_recipe(data_root))
    recipe = resolve_recipe(load_recipe(path, ("train.precision=auto",)), get_registry(), str(path))
    fresh = Trainer(recipe, tmp_path / "fresh", get_registry())
    fresh.close()
    assert fresh.precision == fresh.scheme.precision == "bf16"
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / "run.json").write_text(json.dumps({"precision": "fp32", "precision_setting": "auto"}))
    resumed = Trainer(recipe, tmp_path / "started", get_registry(), resume=True)
    resumed.close()
    assert resumed.precision == resumed.scheme.precision == resumed.predictor.precision == "fp32"


def test_gan_phases_step_the_right_parameters(tmp_path: Path, data_root: Path) -> None:
    text = tiny_gan_recipe(data_root)
    trainer = trainer_for(tmp_path, text)
    scheme = trainer.scheme
    g = [p for p in trainer.model.parameters()]
    d = [p for p in trainer.discriminator.parameters()]
    seen = []
    original = scheme.backward_step

    def spy(name: str, loss: torch.Tensor) -> None:
        before_g = [p.detach().clone() for p in g]
        before_d = [p.detach().clone() for p in d]
        original(name, loss)
        g_changed = any(not torch.equal(a, p) for a, p in zip(before_g, g, strict=True))
        d_changed = any(not torch.equal(a, p) for a, p in zip(before_d, d, strict=True))
        seen.append((name, g_changed, d_changed))

    scheme.backward_step = spy
    trainer.model.train()
    batch = trainer.stream.next_batch()
    values = scheme.train_step(batch)
    assert seen == [("discriminator", False, True), ("generator", True, False)]
    assert {"lsgan_g", "lsgan_d", "l1", "cross_entropy", "total"} <= set(values)


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path: Path, data_root: Path) -> None:
    text = tiny_recipe(data_root).replace("epochs: 3", "epochs: 4").replace("steps_per_epoch: 6",
                                                                             "steps_per_epoch: 12")
    recipe = write(tmp_path / "recipe.yaml", text)
    # Uninterrupted reference, in this process.
    assert main(["run", str(recipe), "--out", str(tmp_path / "ref")]) == 0
    # The same run in a subprocess, killed with SIGKILL once epoch 2 is checkpointed (mid-epoch 3).
    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "lowdose_toolkit.cli.app", "run", str(recipe), "--out", str(run)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            metrics = run / "metrics.jsonl"
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
                break
            if proc.poll() is not None:
                pytest.fail(f"training subprocess ended early with {proc.returncode}")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    killed_at = load_checkpoint(run / "checkpoints" / "last.pt").epoch
    assert 2 <= killed_at < 4
    assert main(["run", "--resume", str(run)]) == 0
    ref = torch.load(tmp_path / "ref" / "checkpoints" / "last.pt", weights_only=True)
    res = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert res["epoch"] == ref["epoch"] == 4
    for key, value in ref["model"].items():
        assert torch.equal(value, res["model"][key]), key
    assert [m["epoch"] for m in read_metrics(run)] == [1, 2, 3, 4]
    assert (run / "results.csv").is_file()


def test_run_prints_test_table_and_writes_results(tmp_path: Path, data_root: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    recipe = write(tmp_path / "recipe.yaml", tiny_recipe(data_root).replace("epochs: 3", "epochs: 1"))
    assert main(["run", str(recipe), "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "Low-Dose" in out and "tiny" in out
    rows = (tmp_path / "r" / "results.csv").read_text().splitlines()
    assert rows[0] == "method,subject,drf,psnr,ssim,nrmse,ssim_range,masked" and len(rows) == 1 + 2 * 2
    assert main(["run", str(recipe), "--out", str(tmp_path / "r")]) == 2  # refuses to overwrite a run
    assert "already holds a run" in capsys.readouterr().err


def test_two_stage_training(tmp_path: Path, data_root: Path) -> None:
    text = tiny_recipe(data_root).replace("  heads:", "  refiner: {name: contextual_net, channels: 4}\n  heads:")
    text = text.replace("losses:\n", "losses:\n  - {name: l1, weight: 100, on: refined}\n")
    text = text.replace("train:\n", "train:\n  stages:\n    - {name: coarse, epochs: 1, trainable: [generator, heads],"
                        " use_refiner: false}\n    - {name: refine, epochs: 1, trainable: [refiner]}\n")
    trainer = trainer_for(tmp_path, text)
    gen_before = {k: v.clone() for k, v in trainer.model.generator.state_dict().items()}
    ref_before = {k: v.clone() for k, v in trainer.model.refiner.state_dict().items()}
    trainer.fit()
    metrics = read_metrics(tmp_path / "run")
    assert [m["stage"] for m in metrics] == ["coarse", "refine"]
    # Stage 2 froze the generator: its weights changed only in stage 1; the refiner trained only in stage 2.
    assert any(not torch.equal(gen_before[k], v) for k, v in trainer.model.generator.state_dict().items())
    assert any(not torch.equal(ref_before[k], v) for k, v in trainer.model.refiner.state_dict().items())
    assert "l1_refined" not in metrics[0]["losses"] and "l1_refined" in metrics[1]["losses"]
    # Stage 2 left the generator exactly as stage 1 made it, BatchNorm running statistics included.
    refine = "    - {name: refine, epochs: 1, trainable: [refiner]}\n"
    assert refine in text
    first = trainer_for(tmp_path, text.replace(refine, ""), run="first")  # stage 1 alone
    first.fit()
    for key, value in first.model.generator.state_dict().items():
        assert torch.equal(value, trainer.model.generator.state_dict()[key]), key


def test_stage_that_freezes_the_discriminator_in_a_paired_gan(tmp_path: Path, data_root: Path) -> None:
    text = tiny_gan_recipe(data_root).replace(
        "train:\n", "train:\n  stages:\n    - {name: g-only, epochs: 1, trainable: [generator, heads]}\n", 1
    )
    trainer = trainer_for(tmp_path, text)
    d_before = {k: v.clone() for k, v in trainer.discriminator.state_dict().items()}
    g_before = {k: v.clone() for k, v in trainer.model.generator.state_dict().items()}
    trainer.fit()
    assert all(torch.equal(d_before[k], v) for k, v in trainer.discriminator.state_dict().items())
    assert any(not torch.equal(g_before[k], v) for k, v in trainer.model.generator.state_dict().items())
    assert "lsgan_d" in read_metrics(tmp_path / "run")[0]["losses"]  # still scored, for the log


def test_monitor_one_drf_picks_the_best_checkpoint_at_that_drf(tmp_path: Path, data_root: Path) -> None:
    overrides = ("train.epochs=4", "train.scheduler.monitor=val_psnr_drf100")
    trainer = trainer_for(tmp_path, tiny_recipe(data_root), overrides)
    trainer.fit()
    metrics = read_metrics(tmp_path / "run")
    at_100 = [m["val"]["per_drf"]["100"]["psnr"] for m in metrics]
    assert metrics[-1]["best_epoch"] == 1 + at_100.index(max(at_100))
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt").epoch == metrics[-1]["best_epoch"]


@pytest.mark.parametrize("monitor", ["val_psnr_drf50", "val_ssim", "val_psnr_drf"])
def test_unknown_monitor_is_a_recipe_error(tmp_path: Path, data_root: Path, monitor: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    recipe = write(tmp_path / "r.yaml", tiny_recipe(data_root))
    assert main(["check", str(recipe), "--set", f"train.scheduler.monitor={monitor}"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"train.scheduler.monitor: '{monitor}' is unknown" in err and "data.drfs [4, 100]" in err


def test_after_epoch_steps_run_in_one_order_and_the_stage_is_passed_to_the_scheme(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """validate -> schedule -> best -> save, every epoch; entering a stage hands the scheme its state."""
    data = make_tiny_dataset(tmp_path / "data")
    text = tiny_recipe(data).replace("  epochs: 3\n", "  epochs: 2\n  stages:\n    - {name: a, epochs: 1, trainable: "
                                     "[generator, heads]}\n    - {name: b, epochs: 1, trainable: [heads]}\n")
    recipe = resolve_recipe(load_recipe(write(tmp_path / "r.yaml", text)), get_registry())
    trainer = Trainer(recipe, tmp_path / "run", get_registry())
    calls: list[str] = []
    for name in ("_validate_step", "_schedule_step", "_best_step", "_save_step"):
        original = getattr(trainer, name)
        monkeypatch.setattr(trainer, name, lambda *a, _o=original, _n=name: (calls.append(_n), _o(*a))[1])
    entered: list[tuple[frozenset[str], bool]] = []
    original_enter = trainer.scheme.enter_stage
    monkeypatch.setattr(trainer.scheme, "enter_stage", lambda f, r: (entered.append((f, r)), original_enter(f, r)))
    trainer.fit()
    assert calls == ["_validate_step", "_schedule_step", "_best_step", "_save_step"] * 2
    assert entered == [(frozenset({"refiner", "discriminator"}), False),
                       (frozenset({"generator", "refiner", "discriminator"}), False)]


def test_training_autocasts_on_the_cpu_in_its_precision(tmp_path: Path) -> None:
    """train.precision is honoured on the CPU: bf16 runs the networks in bf16, and run.json says so."""
    data = make_tiny_dataset(tmp_path / "data")
    text = tiny_recipe(data).replace("  epochs: 3\n", "  epochs: 1\n  precision: bf16\n")
    recipe = resolve_recipe(load_recipe(write(tmp_path / "r.yaml", text)), get_registry())
    trainer = Trainer(recipe, tmp_path / "run", get_registry())
    seen: list[torch.dtype] = []
    conv = next(m for m in trainer.model.generator.modules() if isinstance(m, torch.nn.Conv3d))
    conv.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    trainer.fit()
    assert torch.bfloat16 in seen
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["precision"] == "bf16" and record["precision_setting"] == "bf16"
