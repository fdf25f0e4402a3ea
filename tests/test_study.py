"""The comparison study: methods under one budget -> Table I / II, results.csv, a figure, docs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import make_tiny_dataset, tiny_recipe, write

from lowdose_toolkit.cli.app import main
from lowdose_toolkit.errors import RecipeError
from lowdose_toolkit.evaluation.study import load_study, slug


def test_study_writes_tables_csv_figure_and_docs(tmp_path: Path) -> None:
    data = make_tiny_dataset(tmp_path / "data", subjects=5)
    write(tmp_path / "recipes" / "base.yaml", tiny_recipe(data).replace("epochs: 3", "epochs: 1"))
    write(tmp_path / "recipes" / "cg.yaml", "extends: base.yaml\nname: cg\n")
    study = write(tmp_path / "recipes" / "study.yaml", """
name: tiny-study
seed: 1
set: [train.steps_per_epoch=2, data.split.test=2]
methods:
  - {method: Baseline, recipe: base.yaml, set: ["model.heads=[]", "losses=[{name: l1, on: coarse}]"]}
  - {method: Baseline+CG, recipe: cg.yaml}
classical: [gaussian]
figure_drf: 100
checkpoint: last
""")
    docs = tmp_path / "docs"
    write(docs / "RESULTS.md", "old\n<!-- reading: kept when the study rewrites this file -->\n\n## Reading\n\nmine\n")
    assert main(["study", str(study), "--out", str(tmp_path / "out"), "--docs", str(docs)]) == 0
    out = tmp_path / "out"
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["method"] for r in rows} == {"Low-Dose", "Baseline", "Baseline+CG", "Gaussian"}
    assert {r["drf"] for r in rows} == {"4", "100"}
    assert list(rows[0]) == ["method", "drf", "psnr", "ssim", "nrmse"]
    table_ii = (out / "table_ii.md").read_text()
    assert "Baseline+CG" in table_ii and "46.832" in table_ii  # the paper's figure beside ours
    assert (out / "figure2.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((out / "baseline" / "results.json").read_text())["checkpoint"].endswith("last.pt")
    text = (docs / "RESULTS.md").read_text()
    assert "Table I" in text or "TABLE I" in text.upper()
    assert text.endswith("## Reading\n\nmine\n") and "old" not in text.split("\n")[0]
    assert (docs / "results.csv").read_text() == (out / "results.csv").read_text()
    # A second call reuses the finished runs (no retraining).
    mtime = (out / "baseline" / "checkpoints" / "last.pt").stat().st_mtime_ns
    assert main(["study", str(study), "--out", str(out)]) == 0
    assert (out / "baseline" / "checkpoints" / "last.pt").stat().st_mtime_ns == mtime


def test_study_file_errors(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="methods: a list"):
        load_study(write(tmp_path / "a.yaml", "name: x\n"))
    with pytest.raises(RecipeError, match=r"methods.0.recipe: 'nope.yaml' not found"):
        load_study(write(tmp_path / "b.yaml", "methods: [{method: A, recipe: nope.yaml}]\n"))
    with pytest.raises(RecipeError, match="budgett: unknown key"):
        load_study(write(tmp_path / "c.yaml", "budgett: 1\nmethods: [{method: A, recipe: b.yaml}]\n"))
    with pytest.raises(RecipeError, match="checkpoint: 'final' is unknown; use best"):
        load_study(write(tmp_path / "d.yaml", "checkpoint: final\nmethods: [{method: A, recipe: b.yaml}]\n"))
    assert slug("Baseline+CG") == "baseline-cg" and slug("3D-UNet") == "3d-unet"
