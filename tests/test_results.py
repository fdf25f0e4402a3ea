"""results.json: one shape (format 1) for runs, pair evaluations and classical references; older shapes read."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from lowdose_toolkit.errors import DataError
from lowdose_toolkit.evaluation.results import FORMAT, load_results, read_cases_csv, read_results, write_results
from lowdose_toolkit.evaluation.summary import aggregate

SETTINGS = {"ssim_range": "challenge", "mask": False}


def _case(method: str, drf: int | None = 4, psnr: float | str = 40.0, **more: object) -> dict:
    return {"method": method, "subject": "s1", "drf": drf, "psnr": psnr, "ssim": 0.9, "nrmse": 0.02,
            "ssim_range": "challenge", "masked": False, **more}


KINDS = {
    "run": ([_case("Low-Dose"), _case("cg3dsrgan", psnr=45.0)],
            {"method": "cg3dsrgan", "checkpoint": "run/checkpoints/best.pt", "epoch": 3, "test_subjects": ["s1"],
             "dose_head": {"head": "dose_classifier", "drfs": [4], "accuracy": 1.0, "volumes": 1}}),
    "pairs": ([_case("oracle", psnr=math.inf, rmse=0.0, ssim_data_range=2.0, pred="p.nii.gz", ref="r.nii.gz"),
               _case("oracle", drf=None, pred="q.nii.gz", ref="r.nii.gz")], {}),
    "classical": ([_case("Low-Dose"), _case("Gaussian", psnr=41.0)], {"gaussian_sigma_vox": {"4": 1.25}}),
}
CSV_NAME = {"run": "results.csv", "pairs": "cases.csv", "classical": "results.csv"}


@pytest.mark.parametrize("kind", list(KINDS))
def test_round_trip(kind: str, tmp_path: Path) -> None:
    cases, facts = KINDS[kind]
    path = write_results(tmp_path, kind, cases, aggregate(cases), SETTINGS, **facts)
    doc = json.loads(path.read_text())  # strict JSON (no bare Infinity)
    assert (doc["format"], doc["kind"]) == (FORMAT, kind)
    back = read_results(path)
    assert (back.kind, back.format, back.settings, back.extra) == (kind, FORMAT, SETTINGS, facts)
    assert back.cases == cases and json.dumps(back.summary) == json.dumps(aggregate(cases))  # NaN std beside inf
    assert read_cases_csv(tmp_path / CSV_NAME[kind]) == cases
    assert load_results([tmp_path]) == cases


def test_reads_older_shapes(tmp_path: Path) -> None:
    """Run directories, `ldt evaluate` outputs and classical references written before the "format" key."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({
        "method": "m", "checkpoint": "c.pt", "epoch": 2, "ssim_range": "standard",
        "settings": {"ssim_range": "standard", "mask": False}, "test_subjects": ["s1"], "summary": [],
        "dose_head": {"head": "h"}}))
    with (run / "results.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([("method", "subject", "drf", "psnr", "ssim", "nrmse", "ssim_range", "masked"),
                                  ("m", "s1", "4", "41.5", "0.91", "0.02", "standard", "False")])
    old = read_results(run / "results.json")
    assert (old.kind, old.format, old.settings["ssim_range"]) == ("run", 0, "standard")
    assert old.extra["dose_head"] == {"head": "h"} and old.extra["checkpoint"] == "c.pt"
    assert old.cases == [{**_case("m", psnr=41.5, ssim_range="standard"), "ssim": 0.91}]
    classical = tmp_path / "classical"  # its CSV left ssim_range and masked empty; the JSON had the range
    classical.mkdir()
    (classical / "results.json").write_text(json.dumps({"method": "classical", "gaussian_sigma_vox": {"4": 1.0},
                                                        "ssim_range": "standard", "summary": []}))
    with (classical / "results.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([("method", "subject", "drf", "psnr", "ssim", "nrmse", "ssim_range", "masked"),
                                  ("Gaussian", "s1", "4", "40", "0.9", "0.02", "", "")])
    old = read_results(classical / "results.json")
    assert (old.kind, old.extra) == ("classical", {"method": "classical", "gaussian_sigma_vox": {"4": 1.0}})
    assert old.cases == [_case("Gaussian", ssim_range="standard")]
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    (pairs / "results.json").write_text(json.dumps({"settings": SETTINGS, "summary": [],
                                                    "cases": [_case("x", psnr="inf", pred="p")]}))
    assert read_results(pairs / "results.json").cases == [_case("x", psnr=math.inf, pred="p")]
    assert len(load_results([tmp_path / "run", classical, pairs / "results.json"])) == 3


def test_errors_name_the_file_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"format": FORMAT + 1, "kind": "run"}))
    with pytest.raises(DataError, match=r"results\.json: results format 2 is not one this ldt reads .*upgrade"):
        read_results(path)
    path.write_text(json.dumps({"format": FORMAT, "kind": "run", "settings": SETTINGS,
                                "cases": [{k: v for k, v in _case("m").items() if k != "masked"}]}))
    with pytest.raises(DataError, match=r"results\.json: a result row is incomplete .*masked"):
        read_results(path)  # format 1 has no defaults to fall back on
    with pytest.raises(ValueError, match=r"lacks \['ssim_range', 'masked'\]"):
        write_results(tmp_path, "run", [{"method": "m", "subject": "s", "drf": 4, "psnr": 1, "ssim": 1, "nrmse": 1}],
                      [], SETTINGS)
