"""`ldt evaluate RUN_DIR`: a trained run scored on its own test split, with every option."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import make_tiny_dataset, tiny_recipe, write

from lowdose_toolkit.cli.app import main
from lowdose_toolkit.evaluation.results import load_results


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runeval")
    data = make_tiny_dataset(root / "data")
    text = tiny_recipe(data).replace("depth: 2}", "depth: 2, residual: true}")  # starts as the identity
    assert "residual: true" in text
    recipe = write(root / "recipe.yaml", text.replace("epochs: 3", "epochs: 2"))
    assert main(["run", str(recipe), "--out", str(root / "run")]) == 0
    return root / "run"


def _rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open()))


def test_mask_writes_a_labelled_evaluation_beside_the_whole_volume_one(run_dir: Path, capsys) -> None:
    whole = _rows(run_dir / "results.csv")
    assert {r["masked"] for r in whole} == {"False"} and {r["ssim_range"] for r in whole} == {"challenge"}
    assert main(["evaluate", str(run_dir), "--mask", "--mask-threshold", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "inside a body mask" in out and "Low-Dose" in out
    masked = _rows(run_dir / "body_mask" / "results.csv")
    assert _rows(run_dir / "results.csv") == whole  # the paper-protocol results are not replaced
    assert [(r["method"], r["subject"], r["drf"]) for r in masked] == [(r["method"], r["subject"], r["drf"])
                                                                       for r in whole]  # fmt: skip
    assert {r["masked"] for r in masked} == {"True"}
    # The tiny phantom's warm background is below 0.3 x max: the body mask leaves it out, so PSNR changes.
    assert all(abs(float(m["psnr"]) - float(w["psnr"])) > 0.01 for m, w in zip(masked, whole, strict=True))
    doc = json.loads((run_dir / "body_mask" / "results.json").read_text())
    assert doc["settings"] == {"ssim_range": "challenge", "mask": True, "mask_threshold": 0.3}
    assert "body mask" in (run_dir / "body_mask" / "results.md").read_text()
    rows = load_results([run_dir / "body_mask"])
    assert rows and all(r["masked"] for r in rows)
    assert all(not r["masked"] for r in load_results([run_dir]))  # the run dir alone: its own results only


def test_ssim_range_out_checkpoint_and_saved_predictions(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    argv = ["evaluate", str(run_dir), "--ssim-range", "standard", "--checkpoint", "last", "--out", str(out),
            "--save-predictions", "--method", "mine", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    rows = _rows(out / "results.csv")
    assert {r["method"] for r in rows} == {"Low-Dose", "mine"} and {r["ssim_range"] for r in rows} == {"standard"}
    whole = {(r["method"], r["subject"], r["drf"]): r for r in _rows(run_dir / "results.csv")}
    for r in rows:  # SSIM's constants depend on the data range; PSNR does not
        ref = whole[("tiny" if r["method"] == "mine" else r["method"], r["subject"], r["drf"])]
        assert float(r["ssim"]) != pytest.approx(float(ref["ssim"]), abs=1e-4)
        if r["method"] == "Low-Dose":  # same input, so same PSNR; a positive SSIM is lower with range 1 than 2
            assert float(r["psnr"]) == pytest.approx(float(ref["psnr"]), abs=1e-9)
            assert 0 < float(r["ssim"]) < float(ref["ssim"])
    assert json.loads((out / "results.json").read_text())["checkpoint"].endswith("last.pt")
    preds = sorted((out / "predictions").glob("*.nii.gz"))
    assert len(preds) == 2  # one test subject x DRF 4 and 100
    subject = rows[0]["subject"]
    low = nib.load(run_dir.parent / "data" / subject / "drf_100.nii.gz")
    pred = nib.load(out / "predictions" / f"{subject}_drf_100.nii.gz")
    assert pred.shape == low.shape and np.allclose(pred.affine, low.affine)
    # In the input's units (normalisation inverted): a residual model barely trained stays near its input.
    ratio = float(np.asarray(pred.dataobj).mean() / np.asarray(low.dataobj).mean())
    assert 0.8 < ratio < 1.25


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--low", "x"], "--low is for --pred/--ref"),
        (["--checkpoint", "first"], "checkpoint 'first' is unknown; use best or last"),
        (["--ssim-range", "wide"], "--ssim-range 'wide' is unknown"),
        (["--mask", "--mask-threshold", "1.5"], "--mask-threshold must be in (0, 1)"),
        (["--pred", "p"], "not both"),
    ],
)
def test_run_dir_errors(run_dir: Path, extra: list[str], message: str, capsys) -> None:
    assert main(["evaluate", str(run_dir), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_run_dir_option_with_pred_ref_and_missing_dir(tmp_path: Path, capsys) -> None:
    assert main(["evaluate", "--pred", "p", "--ref", "r", "--checkpoint", "last"]) == 2
    assert "--checkpoint is for RUN_DIR" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err
