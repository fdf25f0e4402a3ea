"""Evaluation: pairing files, scoring NIfTI volumes, results files and the paper's tables."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from lowdose_toolkit.cli.evaluate import evaluate, table
from lowdose_toolkit.errors import DataError, UserError
from lowdose_toolkit.evaluation import metrics
from lowdose_toolkit.evaluation.pairing import Pair, pair_by_filename, parse_drf
from lowdose_toolkit.evaluation.paper import TABLE_I, TABLE_II, canonical_method, paper_method
from lowdose_toolkit.evaluation.paper_tables import (
    build_table_i,
    build_table_ii,
    print_table,
    table_markdown,
    write_table,
)
from lowdose_toolkit.evaluation.results import load_results
from lowdose_toolkit.evaluation.scoring import evaluate_pairs
from lowdose_toolkit.evaluation.summary import aggregate, write_results
from lowdose_toolkit.records import SubjectRecord, write_manifest

SHAPE = (12, 11, 10)
AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


def _save(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.float32), AFFINE), str(path))
    return path


def _full(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.gamma(2.0, 1.0, SHAPE) + 0.1).astype(np.float32)


def _noisy(ref: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    return (ref + sigma * np.random.default_rng(seed).standard_normal(ref.shape)).astype(np.float32)


@pytest.fixture
def study(tmp_path: Path) -> dict[str, Path]:
    """Two subjects: full dose, low dose at DRF 4 and 100, and a model's predictions (less noisy)."""
    ref_dir, low_dir, pred_dir = tmp_path / "full", tmp_path / "low", tmp_path / "pred"
    for s, subject in enumerate(("sub01", "sub02")):
        ref = _full(s)
        _save(ref_dir / f"{subject}.nii.gz", ref)
        for drf, sigma in ((4, 0.2), (100, 1.0)):
            _save(low_dir / f"{subject}_drf_{drf}.nii.gz", _noisy(ref, sigma, 10 * s + drf))
            _save(pred_dir / f"{subject}_DRF-{drf}.nii.gz", _noisy(ref, sigma / 4, 20 * s + drf))
    return {"ref": ref_dir, "low": low_dir, "pred": pred_dir, "root": tmp_path}


# ------------------------------------------------------------------------------------------------ pairing


@pytest.mark.parametrize(
    ("name", "drf"),
    [
        ("sub01_drf_100.nii.gz", 100),
        ("sub01_DRF-100.nii.gz", 100),
        ("sub01_DRF100.nii", 100),
        ("sub01drf4.nii.gz", 4),
        ("DRF-20/sub01.nii.gz", 20),
        ("Subject_1/1-50 dose.nii.gz", 50),
        ("sub01.nii.gz", None),
        ("sub01_full.nii.gz", None),
    ],
)
def test_parse_drf(name: str, drf: int | None) -> None:
    assert parse_drf(name) == drf


def test_parse_drf_rejects_two_drfs() -> None:
    with pytest.raises(DataError, match=r"several DRFs \[4, 10\]"):
        parse_drf("drf_4/sub01_drf_10.nii.gz")


def test_pair_by_filename_strips_drf_and_full_tokens(tmp_path: Path) -> None:
    ref = _full(0)
    _save(tmp_path / "ref" / "sub01.nii.gz", ref)
    _save(tmp_path / "ref" / "sub02_full_dose.nii.gz", ref)
    _save(tmp_path / "pred" / "sub01_drf_4.nii.gz", ref)
    _save(tmp_path / "pred" / "sub01_DRF-100.nii.gz", ref)
    _save(tmp_path / "pred" / "drf_10" / "sub02.nii.gz", ref)
    pairs = pair_by_filename(tmp_path / "pred", tmp_path / "ref", method="cg3dsrgan")
    got = {(p.subject, p.drf, p.ref.name) for p in pairs}
    assert got == {
        ("sub01", 4, "sub01.nii.gz"),
        ("sub01", 100, "sub01.nii.gz"),
        ("sub02", 10, "sub02_full_dose.nii.gz"),
    }
    assert {p.method for p in pairs} == {"cg3dsrgan"}


def test_pair_by_same_relative_name(tmp_path: Path) -> None:
    ref = _full(0)
    for sub in ("a/scan_drf_20.nii.gz", "b/scan_drf_20.nii.gz"):
        _save(tmp_path / "ref" / sub, ref)
        _save(tmp_path / "pred" / sub, ref)
    pairs = pair_by_filename(tmp_path / "pred", tmp_path / "ref")
    assert sorted((p.pred.relative_to(tmp_path / "pred").as_posix(), p.ref.parent.name, p.drf) for p in pairs) == [
        ("a/scan_drf_20.nii.gz", "a", 20),
        ("b/scan_drf_20.nii.gz", "b", 20),
    ]


def test_pair_by_manifest(study: dict[str, Path]) -> None:
    root = study["root"]
    records = [
        SubjectRecord(s, study["ref"] / f"{s}.nii.gz", {d: study["low"] / f"{s}_drf_{d}.nii.gz" for d in (4, 100)})
        for s in ("sub01", "sub02")
    ]
    write_manifest(records, root / "data.csv")
    # The data set's manifest is the reference side (its `full` rows) and the low-dose side (the others).
    low_pairs = pair_by_filename(root / "data.csv", root / "data.csv", method="Low-Dose")
    assert sorted((p.subject, p.drf, p.pred.name, p.ref.name) for p in low_pairs) == [
        ("sub01", 4, "sub01_drf_4.nii.gz", "sub01.nii.gz"),
        ("sub01", 100, "sub01_drf_100.nii.gz", "sub01.nii.gz"),
        ("sub02", 4, "sub02_drf_4.nii.gz", "sub02.nii.gz"),
        ("sub02", 100, "sub02_drf_100.nii.gz", "sub02.nii.gz"),
    ]
    with (root / "preds.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerows([("subject", "drf", "path"), ("SUB01", "100", "pred/sub01_DRF-100.nii.gz")])
    pairs = pair_by_filename(root / "preds.csv", root / "data.csv")
    assert [(p.subject, p.drf, p.ref.name) for p in pairs] == [("SUB01", 100, "sub01.nii.gz")]
    # A folder of predictions against a manifest of references works too.
    assert len(pair_by_filename(study["pred"], root / "data.csv")) == 4


def test_pairing_errors_name_the_files(study: dict[str, Path], tmp_path: Path) -> None:
    _save(study["pred"] / "sub03_drf_4.nii.gz", _full(3))
    with pytest.raises(DataError, match=r"no reference for .*sub03_drf_4\.nii\.gz \(subject 'sub03'\).*sub01, sub02"):
        pair_by_filename(study["pred"], study["ref"])
    (study["pred"] / "sub03_drf_4.nii.gz").unlink()
    _save(study["pred"] / "sub01-drf4.nii.gz", _full(3))
    with pytest.raises(DataError, match=r"sub01-drf4\.nii\.gz and .*sub01_DRF-4\.nii\.gz are both subject 'sub01'"):
        pair_by_filename(study["pred"], study["ref"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no NIfTI files"):
        pair_by_filename(empty, study["ref"])
    with pytest.raises(UserError, match="does not exist"):
        pair_by_filename(tmp_path / "nope", study["ref"])
    (tmp_path / "bad.csv").write_text("name,dose\nsub01,4\n")
    with pytest.raises(DataError, match=r"bad\.csv: manifest lacks column\(s\) \['drf', 'path', 'subject'\]"):
        pair_by_filename(tmp_path / "bad.csv", study["ref"])


# ------------------------------------------------------------------------------------------------ scoring


def test_evaluate_pairs_matches_metrics(study: dict[str, Path]) -> None:
    pairs = pair_by_filename(study["pred"], study["ref"], method="cg3dsrgan")
    rows = evaluate_pairs(pairs, progress=False)
    assert [(r["subject"], r["drf"]) for r in rows] == [(p.subject, p.drf) for p in pairs]
    for row, pair in zip(rows, pairs, strict=True):
        ref = nib.load(pair.ref).get_fdata()
        pred = nib.load(pair.pred).get_fdata()
        assert row["psnr"] == pytest.approx(20 * np.log10(ref.max() / np.sqrt(np.mean((ref - pred) ** 2))), abs=1e-6)
        assert row["ssim"] == pytest.approx(metrics.ssim(ref, pred), abs=1e-9)
        assert row["nrmse"] == pytest.approx(metrics.nrmse(ref, pred), rel=1e-9)
        assert row["ssim_range"] == "challenge" and row["masked"] is False
    masked = evaluate_pairs(pairs[:1], ssim_range="standard", mask=True, progress=False)[0]
    ref = nib.load(pairs[0].ref).get_fdata()
    body = metrics.body_mask(ref)
    expected = metrics.compute_all(ref, nib.load(pairs[0].pred).get_fdata(), "standard", mask=body)
    assert masked["masked"] is True and masked["ssim_data_range"] == 1.0
    assert masked["ssim"] == pytest.approx(expected["ssim"], abs=1e-9)


def test_shape_mismatch_names_both_files(study: dict[str, Path]) -> None:
    bad = _save(study["pred"] / "odd.nii.gz", np.ones((12, 11, 9)))
    pair = Pair("sub01", 4, "m", bad, study["ref"] / "sub01.nii.gz")
    with pytest.raises(DataError, match=r"odd\.nii\.gz is \(12, 11, 9\) but reference .*sub01\.nii\.gz is \(12, 11"):
        evaluate_pairs([pair], progress=False)
    broken = study["pred"] / "broken.nii.gz"
    broken.write_bytes(b"not a nifti")
    with pytest.raises(DataError, match=r"broken\.nii\.gz: unreadable NIfTI header"):
        evaluate_pairs([Pair("s", 4, "m", broken, study["ref"] / "sub01.nii.gz")], progress=False)
    import gzip

    raw = bytearray(gzip.decompress((study["pred"] / "odd.nii.gz").read_bytes()))
    raw[70:72] = (999).to_bytes(2, "little")  # a datatype code nibabel does not know: was a traceback
    (study["pred"] / "code.nii.gz").write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match=r"code\.nii\.gz: unreadable NIfTI header \(HeaderDataError"):
        evaluate_pairs([Pair("s", 4, "m", study["pred"] / "code.nii.gz", study["ref"] / "sub01.nii.gz")],
                       progress=False)
    frames = _save(study["pred"] / "frames.nii.gz", np.ones((12, 12, 10, 2)))  # a dynamic scan: not one volume
    with pytest.raises(DataError, match=r"frames\.nii\.gz: holds 2 volumes or channels .* extract one first"):
        evaluate_pairs([Pair("s", 4, "m", frames, study["ref"] / "sub01.nii.gz")], progress=False)


def test_results_roundtrip_with_infinite_psnr(study: dict[str, Path], tmp_path: Path) -> None:
    ref = study["ref"] / "sub01.nii.gz"
    rows = evaluate_pairs([Pair("sub01", 4, "oracle", ref, ref)], progress=False)
    assert rows[0]["psnr"] == math.inf
    paths = write_results(rows, tmp_path / "out")
    doc = json.loads(paths["json"].read_text())  # strict JSON: no bare Infinity
    assert doc["cases"][0]["psnr"] == "inf" and doc["settings"]["ssim_range"] == "challenge"
    for source in (paths["json"], paths["cases"], tmp_path / "out"):
        back = load_results([source])
        assert back[0]["psnr"] == math.inf and back[0]["drf"] == 4 and back[0]["method"] == "oracle"
    assert "| oracle | 4 | 1 | ∞ | 1.0000 | 0.000 |" in paths["md"].read_text()


def test_aggregate_mean_std() -> None:
    rows = [
        {"method": "m", "drf": 4, "psnr": 40.0, "ssim": 0.9, "nrmse": 0.01},
        {"method": "m", "drf": 4, "psnr": 42.0, "ssim": 0.8, "nrmse": 0.03},
        {"method": "m", "drf": 100, "psnr": 30.0, "ssim": 0.7, "nrmse": 0.05},
    ]
    s4, s100 = aggregate(rows)
    assert (s4["drf"], s4["n"], s4["psnr_mean"]) == (4, 2, 41.0) and s4["psnr_std"] == pytest.approx(math.sqrt(2))
    assert s4["nrmse_mean"] == pytest.approx(0.02) and s100["n"] == 1 and s100["ssim_std"] == 0.0


def test_load_results_rejects_conflicts(tmp_path: Path) -> None:
    row = {"method": "m", "subject": "s", "drf": 4, "psnr": 40.0, "ssim": 0.9, "nrmse": 0.01, "rmse": 0.1,
           "ssim_range": "challenge", "ssim_data_range": 2.0, "masked": False, "ref": "r"}  # fmt: skip
    a = write_results([{**row, "pred": "a.nii"}], tmp_path / "a")["json"]
    b = write_results([{**row, "pred": "b.nii", "psnr": 41.0}], tmp_path / "b")["json"]
    c = write_results([{**row, "pred": "a.nii"}], tmp_path / "c")["json"]
    assert len(load_results([a, c])) == 1  # the same case twice (e.g. Low-Dose rows) is kept once
    with pytest.raises(UserError, match="m / s / DRF 4 is in both .* different results"):
        load_results([a, b])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: no results.json here or one level below"):
        load_results([tmp_path / "empty"])


# ------------------------------------------------------------------------------------------------ tables


def _case(method: str, subject: str, drf: int, psnr: float, ssim: float, nrmse: float) -> dict:
    metrics_ = {"psnr": psnr, "ssim": ssim, "nrmse": nrmse}
    where = {"pred": f"{method}/{subject}_{drf}", "ref": subject}
    settings = {"ssim_range": "challenge", "masked": False}
    return {"method": method, "subject": subject, "drf": drf, **metrics_, **settings, **where}


def _cases() -> list[dict]:
    return [
        _case("cg3dsrgan", "s1", 100, 48.0, 0.990, 0.0040),
        _case("cg3dsrgan", "s2", 100, 50.0, 0.992, 0.0036),
        _case("unet3d", "s1", 100, 47.0, 0.995, 0.0050),
        _case("unet3d", "s2", 100, 47.0, 0.995, 0.0050),
        _case("my-net", "s1", 100, 40.0, 0.900, 0.0100),
        _case("Low-Dose", "s1", 100, 60.0, 0.999, 0.0010),  # the input "beats" everyone: not ranked
        _case("cg3dsrgan", "s1", 4, 58.0, 0.998, 0.0016),
        _case("cg3dsrgan_baseline", "s1", 100, 45.0, 0.98, 0.006),
        _case("CG-3DGAN", "s1", 100, 46.5, 0.9905, 0.0041),
    ]


def test_paper_names() -> None:
    assert paper_method("cg3dsrgan") == "CG-3DSRGAN" and paper_method("3d_unet") == "3D-UNet"
    assert paper_method("baseline+cg") == "Baseline+CG" and paper_method("my-net") is None
    assert canonical_method("my-net") == "my-net"
    assert TABLE_I[100]["Low-Dose"].nrmse_pct == 1.402 and TABLE_II["Baseline"].psnr == 46.019


def test_table_i_layout_bold_and_paper_column() -> None:
    t = build_table_i(_cases())
    by = {(r.drf, r.method): r for r in t.rows}
    assert [r.method for r in t.rows if r.drf == 100] == [
        "Low-Dose", "3D-UNet", "3D-cGAN", "3D-CycleGAN", "CG-3DSRGAN", "my-net",
    ]  # fmt: skip
    assert {r.drf for r in t.rows} == {4, 100}
    srgan = by[(100, "CG-3DSRGAN")]
    assert srgan.n == 2 and srgan.mean["psnr"] == pytest.approx(49.0) and srgan.mean["nrmse"] == pytest.approx(0.38)
    assert srgan.best == {"psnr", "nrmse"} and by[(100, "3D-UNet")].best == {"ssim"}
    assert by[(100, "Low-Dose")].best == set() and by[(100, "Low-Dose")].paper.psnr == 42.490
    assert by[(4, "Low-Dose")].n == 0 and by[(4, "Low-Dose")].paper.psnr == 58.718  # always present
    assert by[(100, "my-net")].paper is None
    md = table_markdown(t)
    assert "| 100 | Low-Dose | 1 | 60.000 | 42.490 | 0.9990 | 0.970 | 0.100 | 1.402 |" in md
    expected = "| CG-3DSRGAN | 2 | **49.000 ± 1.414** | 48.453 | 0.9910 ± 0.0014 | 0.994 | **0.380 ± 0.028** | 0.388 |"
    assert expected in md
    assert "my-net" not in md.split("| 100 |")[0]  # our extra methods appear only at DRFs they were evaluated at
    assert "| 4 | Low-Dose | — | — | 58.718 |" in md
    assert "data range 2 (challenge)" in md


def test_table_ii_ablations(tmp_path: Path) -> None:
    t = build_table_ii(_cases())
    assert [r.method for r in t.rows] == ["Baseline", "Baseline+CG", "CG-3DGAN", "CG-3DSRGAN"]
    baseline, with_cg, gan, srgan = t.rows
    assert baseline.mean["psnr"] == 45.0 and with_cg.n == 0 and with_cg.paper.psnr == 46.832
    assert srgan.best == {"psnr", "ssim", "nrmse"} and gan.best == set()
    md, csv_path = write_table(t, tmp_path / "table2")
    assert md.read_text().startswith("### Table II: ablations at DRF 100")
    rows = list(csv.DictReader(csv_path.open()))
    assert rows[3]["method"] == "CG-3DSRGAN" and rows[3]["best"] == "psnr ssim nrmse"
    assert float(rows[3]["nrmse_pct_paper"]) == 0.388 and rows[1]["psnr_mean"] == ""


def test_tables_refuse_mixed_settings() -> None:
    rows = _cases()
    rows[0] = {**rows[0], "ssim_range": "standard"}
    with pytest.raises(UserError, match="mix SSIM ranges"):
        build_table_i(rows)


def test_rich_table_printer() -> None:
    from rich.console import Console

    console = Console(record=True, width=200)
    print_table(build_table_i(_cases()), console)
    text = console.export_text()
    assert "Table I" in text and "CG-3DSRGAN" in text and "48.453" in text and "49.000 ± 1.414" in text


# ------------------------------------------------------------------------------------------------ commands


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()
    app.command("evaluate")(evaluate)
    app.command("table")(table)
    return app


def test_cli_evaluate_then_table(app: typer.Typer, study: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    runner = CliRunner()
    out = tmp_path / "eval"
    args = ["evaluate", "--pred", str(study["pred"]), "--ref", str(study["ref"]), "--low", str(study["low"])]
    result = runner.invoke(app, [*args, "--out", str(out), "--method", "cg3dsrgan"])
    assert result.exit_code == 0, result.output
    assert "cg3dsrgan" in result.output and "Low-Dose" in result.output
    doc = json.loads((out / "results.json").read_text())
    assert len(doc["cases"]) == 8 and {c["method"] for c in doc["cases"]} == {"cg3dsrgan", "Low-Dose"}
    low100 = [c for c in doc["summary"] if c["method"] == "Low-Dose" and c["drf"] == 100][0]
    ours100 = [c for c in doc["summary"] if c["method"] == "cg3dsrgan" and c["drf"] == 100][0]
    assert ours100["psnr_mean"] > low100["psnr_mean"] + 6  # a quarter of the noise: ~12 dB better

    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["table", str(out)])
    assert result.exit_code == 0, result.output
    t1 = (tmp_path / "tables" / "table1.md").read_text()
    assert "| 4 | Low-Dose | 2 |" in t1 and "**" in t1 and "58.621" in t1
    assert (tmp_path / "tables" / "table2.csv").is_file()
    assert all((tmp_path / "tables" / f"table{n}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in (1, 2))
    result = runner.invoke(app, ["table", str(out / "cases.csv"), "--out", str(tmp_path / "t")])
    assert result.exit_code == 0 and (tmp_path / "t" / "table1.csv").is_file()


def test_cli_default_out_and_errors(app: typer.Typer, study: dict[str, Path]) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", "--pred", str(study["pred"]), "--ref", str(study["ref"])])
    assert result.exit_code == 0, result.output
    assert (study["root"] / "pred_eval" / "summary.md").is_file()
    result = runner.invoke(app, ["evaluate", "--pred", str(study["pred"])])
    assert isinstance(result.exception, UserError) and "both --pred and --ref" in str(result.exception)
    result = runner.invoke(app, ["evaluate", "--pred", "p", "--ref", "r", "--ssim-range", "wide"])
    assert isinstance(result.exception, UserError) and "'wide'" in str(result.exception)


def test_table_reads_a_run_directory(tmp_path: Path) -> None:
    """A run directory's results.json (a summary) with its per-case results.csv, as `ldt run` writes them."""
    run = tmp_path / "runs" / "cg3dsrgan-1"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"method": "cg3dsrgan", "ssim_range": "standard", "summary": []}))
    with (run / "results.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerows([
            ("method", "subject", "drf", "psnr", "ssim", "nrmse"),
            ("Low-Dose", "s1", "100", "40.0", "0.95", "0.012"),
            ("cg3dsrgan", "s1", "100", "45.0", "0.98", "0.006"),
        ])  # fmt: skip
    rows = load_results([tmp_path / "runs" / "cg3dsrgan-1"])
    assert {r["method"] for r in rows} == {"Low-Dose", "cg3dsrgan"} and {r["ssim_range"] for r in rows} == {"standard"}
    t = build_table_i(rows)
    srgan = [r for r in t.rows if r.method == "CG-3DSRGAN"][0]
    assert srgan.mean["psnr"] == 45.0 and srgan.best == {"psnr", "ssim", "nrmse"}
    assert "data range 1 (standard)" in table_markdown(t)
    # The same Low-Dose case from another evaluation with equal metrics is kept once.
    other = write_results([{**rows[0], "pred": "elsewhere", "rmse": 0.0, "ssim_data_range": 1.0}], tmp_path / "o")
    assert len(load_results([run, other["json"]])) == 2


def test_one_bad_pair_is_reported_and_the_rest_scored(app: typer.Typer, study: dict[str, Path], tmp_path: Path) -> None:
    """A truncated prediction, one on another grid and a killed writer's hidden temp file: the first two are
    one line and one failures entry each (exit 1), the temp file is ignored, every other pair is scored."""
    import gzip

    good = (study["pred"] / "sub01_DRF-4.nii.gz").read_bytes()
    (study["pred"] / "sub01_DRF-100.nii.gz").write_bytes(gzip.compress(gzip.decompress(good)[:500]))  # truncated
    shifted = nib.load(str(study["pred"] / "sub02_DRF-4.nii.gz"))
    moved = AFFINE.copy()
    moved[:3, 3] += 5.0  # same shape, another place in space
    nib.save(nib.Nifti1Image(np.asarray(shifted.dataobj), moved), str(study["pred"] / "sub02_DRF-4.nii.gz"))
    (study["pred"] / ".sub02_DRF-100.nii.gz.x1y2.tmp.nii.gz").write_bytes(b"partial")  # left by a kill
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["evaluate", "--pred", str(study["pred"]), "--ref", str(study["ref"]),
                                      "--out", str(out)])
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "sub01_DRF-100.nii.gz: unreadable or truncated NIfTI" in text and "re-export" in text
    assert "sub02_DRF-4.nii.gz and its reference" in text and "--allow-misaligned" in text
    doc = json.loads((out / "results.json").read_text())
    assert [(c["subject"], c["drf"]) for c in doc["cases"]] == [("sub01", 4), ("sub02", 100)]
    assert len(doc["failures"]) == 2 and all(f["error"] for f in doc["failures"])
    truncated = next(f["error"] for f in doc["failures"] if "unreadable" in f["error"])
    assert truncated.count("sub01_DRF-100.nii.gz") == 1  # the file named once, not "pred vs ref: pred: ..."
    assert load_results([out])  # the results file reads back with its failures
    result = CliRunner().invoke(app, ["evaluate", "--pred", str(study["pred"]), "--ref", str(study["ref"]),
                                      "--out", str(tmp_path / "eval2"), "--allow-misaligned"])
    doc = json.loads((tmp_path / "eval2" / "results.json").read_text())
    assert len(doc["cases"]) == 3 and len(doc["failures"]) == 1  # only the truncated file is left out
