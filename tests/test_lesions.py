"""Lesion quantification (evaluation/lesions.py) and the local-consistency guard (infer/consistency.py)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from lowdose_toolkit.cli.app import main
from lowdose_toolkit.errors import DataError, UserError
from lowdose_toolkit.evaluation.lesions import (
    PHANTOM_LESION_LABEL,
    LesionMasks,
    label_components,
    lesion_rows,
    markdown,
    summarize,
    voxel_ml,
)
from lowdose_toolkit.infer.consistency import Consistency

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
SPACING = (6.0, 6.0, 6.0)  # the phantom's voxels: the guard's 3 mm are half a voxel


def _ball(shape: tuple[int, int, int], centre: tuple[int, int, int], radius: float) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return ((grid - np.array(centre)) ** 2).sum(-1) <= radius**2


def test_components_are_26_connected_and_numbered() -> None:
    mask = np.zeros((6, 6, 6), bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True  # touching at a corner: one lesion
    mask[4, 4, 4] = True
    components, n = label_components(mask)
    assert n == 2 and components[1, 1, 1] == components[2, 2, 2] != components[4, 4, 4]


def test_lesion_rows_give_the_bias_of_mean_and_max() -> None:
    ref = np.ones((10, 10, 10), np.float32)
    ref[2:4, 2:4, 2:4] = 5.0
    ref[7, 7, 7] = 8.0
    image = ref.copy()
    image[2:4, 2:4, 2:4] = 4.0  # -20 % everywhere in the first lesion
    image[7, 7, 7] = 10.0  # +25 % in the second
    components, n = label_components(ref > 2)
    rows = lesion_rows(ref, {"model": image, "Low-Dose": ref}, components, voxel_ml(AFFINE))
    assert n == 2 and len(rows) == 4
    model = [r for r in rows if r["method"] == "model"]
    assert [r["voxels"] for r in model] == [8, 1] and model[0]["volume_ml"] == pytest.approx(0.064)
    assert model[0]["mean_bias_pct"] == pytest.approx(-20.0) and model[0]["max_bias_pct"] == pytest.approx(-20.0)
    assert model[1]["mean_bias_pct"] == pytest.approx(25.0) and model[1]["ref_max"] == pytest.approx(8.0)
    assert all(r["mean_bias_pct"] == 0 for r in rows if r["method"] == "Low-Dose")
    summary = summarize([{"drf": 4, **r} for r in rows])
    assert [s["method"] for s in summary] == ["Low-Dose", "model"]  # the input first, as the paper's tables
    s = summary[1]
    assert s["lesions"] == 2 and s["mean_bias_pct"] == pytest.approx(2.5)
    assert s["abs_mean_bias_pct"] == pytest.approx(22.5)
    assert "| 4 | model | 2 | +2.5 ±" in markdown(summary)
    with pytest.raises(DataError, match=r"lesion mask is \(9, 10, 10\)"):
        lesion_rows(ref, {"model": image}, components[1:], 1.0)


def _save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def test_lesion_masks_find_read_and_check(tmp_path: Path) -> None:
    labels = np.zeros((8, 8, 8), np.uint8)
    labels[1:3, 1:3, 1:3] = PHANTOM_LESION_LABEL
    labels[5:7, 5:7, 5:7] = 9  # liver: not a lesion
    full = tmp_path / "sim" / "s1" / "full.nii.gz"
    _save(tmp_path / "sim" / "s1" / "labels.nii.gz", labels)
    components, n = LesionMasks("phantom").components("s1", full, (8, 8, 8), AFFINE)
    assert n == 1 and components[1, 1, 1] == 1 and components[5, 5, 5] == 0
    with pytest.raises(DataError, match="no phantom label map beside"):
        LesionMasks("phantom").components("s2", tmp_path / "other" / "full.nii.gz", (8, 8, 8))
    masks = tmp_path / "masks"
    _save(masks / "s1.nii.gz", (labels > 0).astype(np.uint8))  # own masks: every nonzero voxel
    assert LesionMasks(masks).components("s1", full, (8, 8, 8), AFFINE)[1] == 2
    with pytest.raises(DataError, match=r"s1.nii.gz is \(8, 8, 8\) but s1's reference is \(8, 8, 9\)"):
        LesionMasks(masks).components("s1", full, (8, 8, 9))
    with pytest.raises(DataError, match="different affines"):
        LesionMasks(masks).components("s1", full, (8, 8, 8), np.diag([3.0, 3.0, 3.0, 1.0]))
    with pytest.raises(DataError, match=r"no lesion mask for subject 's9' \(looked for s9.nii.gz"):
        LesionMasks(masks).components("s9", full, (8, 8, 8))
    # Masks named as the scans are: BIDS 'sub-01' is the subject sub_01, any case of the suffix.
    _save(masks / "sub-01.nii.gz", (labels > 0).astype(np.uint8))
    _save(masks / "PAT02.NII.GZ", (labels > 0).astype(np.uint8))
    for subject, name in (("sub_01", "sub-01.nii.gz"), ("PAT02", "PAT02.NII.GZ")):
        assert LesionMasks(masks).path(subject, full).name == name
    _save(masks / "sub 01.nii.gz", (labels > 0).astype(np.uint8))
    with pytest.raises(DataError, match=r"2 lesion masks for subject 'sub_01' \(sub 01.nii.gz, sub-01.nii.gz\); keep"):
        LesionMasks(masks).path("sub_01", full)
    (masks / "s3.nii.gz").write_bytes(b"not a mask")
    with pytest.raises(DataError, match=r"s3\.nii\.gz: unreadable NIfTI header .*re-export"):
        LesionMasks(masks).components("s3", full, (8, 8, 8))
    _save(masks / "s4.nii.gz", np.stack([labels, labels], -1))  # two masks in one file: which one is meant?
    with pytest.raises(DataError, match=r"s4\.nii\.gz: holds 2 volumes or channels"):
        LesionMasks(masks).components("s4", full, (8, 8, 8))
    with pytest.raises(UserError, match=r"--lesions \S+/nowhere: not a folder; give a folder"):
        LesionMasks(tmp_path / "nowhere")


def test_volumes_and_spacing_follow_the_headers_spatial_units(tmp_path: Path) -> None:
    """A NIfTI whose xyzt_units are metres (4 x 4 x 3 mm voxels written as 0.004 x 0.004 x 0.003): a 27-voxel
    lesion is 1.296 mL (it was 0.0) and the voxel size the guard reads is in mm."""
    from lowdose_toolkit.data.io import read_info
    from lowdose_toolkit.evaluation.lesions import volume_cases

    affine = np.diag([0.004, 0.004, 0.003, 1.0])
    ref = np.ones((8, 8, 8), np.float32)
    ref[2:5, 2:5, 2:5] = 4.0
    image = nib.Nifti1Image(ref, affine)
    image.header.set_xyzt_units("meter", "sec")
    full = tmp_path / "s1_full.nii.gz"
    nib.save(image, full)
    _save(tmp_path / "masks" / "s1.nii.gz", (ref > 1).astype(np.uint8), affine)
    rows = volume_cases(LesionMasks(tmp_path / "masks"), "s1", 4, full, ref, {"m": ref}, affine)
    assert [(r["voxels"], r["volume_ml"]) for r in rows] == [(27, 1.296)]
    assert read_info(full).spacing == pytest.approx((4.0, 4.0, 3.0))


def test_evaluate_pairs_with_lesion_masks(tmp_path: Path, capsys) -> None:
    shape = (16, 16, 16)
    rng = np.random.default_rng(0)
    ref = np.ones(shape, np.float32)
    hot = _ball(shape, (8, 8, 8), 2.0)
    ref[hot] = 6.0
    _save(tmp_path / "ref" / "sub01.nii.gz", ref)
    _save(tmp_path / "masks" / "sub01.nii.gz", hot.astype(np.uint8))
    low = ref + 0.05 * rng.standard_normal(shape).astype(np.float32)
    pred = ref.copy()
    pred[hot] = 4.5  # the lesion's uptake lowered by a quarter
    _save(tmp_path / "low" / "sub01_drf_4.nii.gz", low.astype(np.float32))
    _save(tmp_path / "pred" / "sub01_drf_4.nii.gz", pred)
    out = tmp_path / "eval"
    code = main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"), "--low",
                 str(tmp_path / "low"), "--out", str(out), "--lesions", str(tmp_path / "masks")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "lesions: bias against the full dose" in printed and "lesions.csv" in printed
    rows = {r.split(",")[0]: r.split(",") for r in (out / "lesions.csv").read_text().splitlines()[1:]}
    assert float(rows["model"][10]) == pytest.approx(-25.0) and abs(float(rows["Low-Dose"][10])) < 1
    assert "| 4 | model | 1 | -25.0" in (out / "lesions.md").read_text()
    summary = json.loads((out / "results.json").read_text())["lesions"]["summary"]
    assert {(s["method"], s["lesions"]) for s in summary} == {("model", 1), ("Low-Dose", 1)}
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"), "--lesions",
                 str(tmp_path / "nowhere")]) != 0
    assert "--lesions" in capsys.readouterr().err
    # A subject without a mask: its lesions are a listed failure (exit 1), its whole-volume scores are kept.
    _save(tmp_path / "ref" / "sub02.nii.gz", ref)
    _save(tmp_path / "pred" / "sub02_drf_4.nii.gz", pred)
    code = main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"), "--out",
                 str(tmp_path / "eval2"), "--lesions", str(tmp_path / "masks")])
    assert code == 1
    assert "lesions not scored" in capsys.readouterr().out
    doc = json.loads((tmp_path / "eval2" / "results.json").read_text())
    assert sorted(c["subject"] for c in doc["cases"]) == ["sub01", "sub02"]
    assert len(doc["failures"]) == 1 and "no lesion mask for subject 'sub02'" in doc["failures"][0]["error"]


# ------------------------------------------------------------------------------------------------ guard


def _scene(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """A warm body with a hot 3-voxel-radius lesion, and its noisy low-dose scan (Poisson-like noise)."""
    shape = (32, 32, 32)
    truth = np.zeros(shape, np.float32)
    truth[4:28, 4:28, 4:28] = 1.0
    lesion = _ball(shape, (16, 16, 16), 2.5)
    truth[lesion] = 4.0
    rng = np.random.default_rng(seed)
    low = truth + 0.15 * np.sqrt(truth + 0.05) * rng.standard_normal(shape).astype(np.float32)
    return torch.from_numpy(truth)[None], torch.from_numpy(low.astype(np.float32))[None], lesion


def test_guard_gives_back_a_flattened_lesion_and_leaves_noise_removal_alone() -> None:
    truth, low, lesion = _scene()
    guard = Consistency(z=3.0, sigma_mm=3.0)
    good, share = guard.apply_with_share(low, truth, SPACING)  # a perfect denoiser: removed pure noise only
    assert share < 0.01
    assert float((good - truth).abs().mean()) < 0.2 * float((low - truth).abs().mean())
    flat = truth.clone()
    flat[0][torch.from_numpy(lesion)] = 2.0  # the lesion's uptake halved
    fixed = guard.apply(low, flat, SPACING)
    before = float(flat[0][torch.from_numpy(lesion)].mean()) / 4 - 1
    after = float(fixed[0][torch.from_numpy(lesion)].mean()) / 4 - 1
    assert before == pytest.approx(-0.5) and -0.25 < after < 0.0  # mostly given back
    outside = ~torch.from_numpy(_ball(truth.shape[1:], (16, 16, 16), 5.0))
    changed = (fixed != flat)[0]
    assert float(changed[outside].float().mean()) < 0.01  # away from the lesion, (nearly) nothing changed


def test_guard_width_is_physical() -> None:
    """sigma_mm is a width in mm: 3 mm at 6 mm voxels is the same guard as 1.5 mm at 3 mm voxels (half a voxel),
    and anisotropic voxels get a width per axis."""
    truth, low, lesion = _scene()
    flat = truth.clone()
    flat[0][torch.from_numpy(lesion)] = 2.0
    coarse = Consistency(sigma_mm=3.0).apply(low, flat, (6.0, 6.0, 6.0))
    assert torch.equal(coarse, Consistency(sigma_mm=1.5).apply(low, flat, (3.0, 3.0, 3.0)))
    assert not torch.equal(coarse, Consistency(sigma_mm=3.0).apply(low, flat, (3.0, 3.0, 3.0)))
    assert not torch.equal(coarse, Consistency(sigma_mm=3.0).apply(low, flat, (6.0, 6.0, 3.0)))


@pytest.mark.parametrize(("spec", "message"), [
    ({"z": 0}, r"eval.consistency: z=0.0 must be positive"),
    ({"sigma_mm": -1}, r"eval.consistency: sigma_mm=-1.0 must be positive"),
    ({"width": 2}, r"eval.consistency: \{'width': 2\}; use null"),
    ({"z": "high"}, r"z and sigma_mm must be numbers"),
])
def test_guard_settings_are_checked(spec: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        Consistency.from_spec(spec)


def test_guard_spec_values() -> None:
    assert Consistency.from_spec(None) is None and Consistency.from_spec(False) is None
    assert Consistency.from_spec(True) == Consistency()
    assert Consistency.from_spec({"z": 2, "sigma_mm": 1}).as_dict() == {"z": 2.0, "sigma_mm": 1.0}


def test_run_dir_evaluation_with_the_guard_and_lesion_masks(tmp_path: Path, capsys) -> None:
    """A tiny trained run: --consistency is recorded in results.json, and --lesions scores the blobs."""
    from conftest import make_tiny_dataset, tiny_recipe, write

    data = make_tiny_dataset(tmp_path / "data", subjects=3)
    recipe = write(tmp_path / "recipe.yaml", tiny_recipe(data).replace("epochs: 3", "epochs: 1"))
    assert main(["run", str(recipe), "--out", str(tmp_path / "run")]) == 0
    test = json.loads((tmp_path / "run" / "results.json").read_text())["test_subjects"][0]
    full = nib.load(str(data / test / "full.nii.gz"))
    hot = (np.asarray(full.dataobj) > 400).astype(np.uint8)
    _save(tmp_path / "masks" / f"{test}.nii.gz", hot, full.affine)
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run"), "--consistency", "--lesions", str(tmp_path / "masks"),
                 "--out", str(tmp_path / "eval")]) == 0
    doc = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert doc["settings"]["consistency"] == {"z": 3.0, "sigma_mm": 3.0}
    summary = doc["lesions"]["summary"]
    assert {s["method"] for s in summary} == {"Low-Dose", "tiny"} and all(s["lesions"] >= 1 for s in summary)
    assert "### Lesions" in (tmp_path / "eval" / "results.md").read_text()
    assert (tmp_path / "eval" / "lesions.csv").read_text().startswith("method,subject,drf,lesion")
    # Masks for some test subjects only: refused before any inference, naming the subject and the folder.
    (tmp_path / "masks" / f"{test}.nii.gz").rename(tmp_path / "masks" / "other.nii.gz")
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run"), "--lesions", str(tmp_path / "masks"), "--out",
                 str(tmp_path / "eval3")]) != 0
    assert f"no lesion mask for subject '{test}'" in capsys.readouterr().err
    assert not (tmp_path / "eval3" / "results.json").exists()


def test_study_lesion_table_takes_each_runs_summary_and_the_input_once(tmp_path: Path) -> None:
    from lowdose_toolkit.evaluation.lesions import uptake_tables

    def lesion_table(inputs: list) -> str:  # Table III as ldt table and ldt study write it
        rows = uptake_tables(inputs)[0]
        return markdown(rows) if rows else ""
    from lowdose_toolkit.evaluation.results import write_results

    case = {"method": "m", "subject": "s", "drf": 4, "psnr": 40.0, "ssim": 0.9, "nrmse": 0.1,
            "ssim_range": "challenge", "masked": False}
    dirs = {}
    for name, bias in (("A", -10.0), ("B", -5.0)):
        rows = [{"method": "Low-Dose", "drf": 4, "mean_bias_pct": 1.0, "max_bias_pct": 3.0},
                {"method": name, "drf": 4, "mean_bias_pct": bias, "max_bias_pct": bias}]
        dirs[name] = tmp_path / name
        write_results(dirs[name], "run", [{**case, "method": name}], [], {"ssim_range": "challenge", "mask": False},
                      lesions={"masks": "phantom", "summary": summarize(rows)})
    table = lesion_table(list(dirs.values()))
    lines = [line for line in table.splitlines() if line.startswith("| 4 |")]
    assert [line.split(" | ")[1] for line in lines] == ["Low-Dose", "A", "B"]
    assert "| 4 | A | 1 | -10.0 ± 0.0 | 10.0 |" in table
    assert lesion_table([tmp_path / "A" / "results.csv"]).count("| 4 |") == 2  # a cases file: its results.json
    write_results(tmp_path / "plain", "run", [case], [], {"ssim_range": "challenge", "mask": False})
    assert lesion_table([tmp_path / "plain"]) == ""
    # ldt table writes and prints Table III beside Tables I and II.
    assert main(["table", str(tmp_path / "A"), str(tmp_path / "B"), "--out", str(tmp_path / "tables")]) == 0
    assert (tmp_path / "tables" / "table3.md").read_text() == table


def test_guard_and_smoothing_leave_their_inputs_alone() -> None:
    from lowdose_toolkit.evaluation.classical import gaussian

    truth, low, _ = _scene()
    flat = truth * 0.9
    before = (low.clone(), flat.clone())
    Consistency().apply(low, flat, SPACING)
    gaussian(low, 0.5)
    assert torch.equal(low, before[0]) and torch.equal(flat, before[1])


def test_guard_leaves_a_volume_without_body_alone() -> None:
    """No voxel above the body threshold (an empty or cold scan): nothing to measure the noise on, no change."""
    low = 0.01 * torch.rand(1, 12, 12, 12)
    pred = torch.zeros_like(low)
    out, share = Consistency().apply_with_share(low, pred, SPACING)
    assert share == 0.0 and torch.equal(out, pred)
    with pytest.raises(ValueError, match=r"low \(1, 12, 12, 12\) and pred \(1, 12, 12, 11\) differ"):
        Consistency().apply(low, pred[..., :11], SPACING)
    with pytest.raises(ValueError, match=r"spacing \(6.0, 0.0, 6.0\) must be three positive voxel sizes"):
        Consistency().apply(low, pred, (6.0, 0.0, 6.0))


def test_a_phantom_run_without_label_maps_is_scored_without_lesions(tmp_path: Path) -> None:
    """Lesions are scored by default for phantom runs; a cache without label maps (written by an older version)
    costs the lesion table, with a line saying why, never the evaluation."""
    from conftest import tiny_recipe, write
    from rich.console import Console

    from lowdose_toolkit.core.plugin_manager import get_registry
    from lowdose_toolkit.core.recipe import safe_load
    from lowdose_toolkit.evaluation.runeval import evaluate_run

    text = tiny_recipe(tmp_path / "unused").replace(
        f"source: {{name: nifti, root: {tmp_path / 'unused'}}}",
        "source: {name: phantom, subjects: 3, shape: [24, 24, 24], spacing_mm: [8, 8, 8]}")
    assert "name: phantom" in text
    recipe = write(tmp_path / "recipe.yaml", text.replace("epochs: 3", "epochs: 1"))
    assert main(["run", str(recipe), "--out", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "results.json").read_text())["lesions"]["masks"] == "phantom"
    test = json.loads((tmp_path / "run" / "results.json").read_text())["test_subjects"][0]
    recorded = safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    source = get_registry().build("source", recorded["data"]["source"], "data.source",
                                  context={"drfs": recorded["data"]["drfs"]})
    moved = [source.path / test / "labels.nii.gz"]  # this run's own cache folder only
    assert moved[0].is_file()
    console = Console(record=True, width=300)
    for path in moved:
        path.rename(path.with_name("labels.moved"))
    try:
        evaluate_run(tmp_path / "run", out=tmp_path / "eval", console=console)
    finally:
        for path in moved:
            path.with_name("labels.moved").rename(path)
    printed = console.export_text()
    assert "lesions not scored" in printed and "no phantom label map beside" in printed
    assert "lesions" not in json.loads((tmp_path / "eval" / "results.json").read_text())
    # The study's classical references (Gaussian) score the same lesions and organs, with their chart.
    from lowdose_toolkit.evaluation.study import evaluate_classical

    evaluate_classical(recorded, tmp_path / "run", {"classical": ["gaussian"], "bm4d_drfs": []},
                       tmp_path / "classical", console)
    classical = json.loads((tmp_path / "classical" / "results.json").read_text())
    assert {s["method"] for s in classical["lesions"]["summary"]} == {"Low-Dose", "Gaussian"}
    assert (tmp_path / "classical" / "lesions.csv").is_file()
    assert (tmp_path / "classical" / "uptake.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------ organs


def test_phantom_masks_score_organs_beside_lesions(tmp_path: Path, capsys) -> None:
    """The phantom's label map gives each organ's mean and max bias; an organ absent from the volume (no spleen
    in this crop) has no row; organs.csv, the organ table in lesions.md and results.json's ``organs``."""
    from lowdose_toolkit.data.phantom import LABELS
    from lowdose_toolkit.evaluation.lesions import PHANTOM_ORGANS, organ_markdown, organ_summary

    ids = {name: k for k, name in LABELS.items()}
    shape = (16, 16, 16)
    labels = np.full(shape, ids["muscle"], np.uint8)
    labels[:8] = ids["liver"]
    labels[12:, :4] = ids["myocardium"]
    labels[10:12, 10:12, 10:12] = ids["lesion"]
    ref = np.where(labels == ids["liver"], 2.0, 1.0).astype(np.float32)
    ref[labels == ids["lesion"]] = 8.0
    pred = ref.copy()
    pred[labels == ids["liver"]] *= 1.02  # the liver 2 % high
    pred[labels == ids["myocardium"]] *= 0.90  # the heart wall 10 % low
    full = tmp_path / "sim" / "s1" / "full.nii.gz"
    _save(full, ref)
    _save(tmp_path / "sim" / "s1" / "labels.nii.gz", labels)
    (tmp_path / "sim" / "manifest.csv").write_text("subject,drf,path\ns1,full,s1/full.nii.gz\n")
    _save(tmp_path / "pred" / "s1_drf_004.nii.gz", pred)
    _save(tmp_path / "low" / "s1_drf_004.nii.gz", ref)
    masks = LesionMasks("phantom")
    assert masks.organ_names == list(PHANTOM_ORGANS)
    out = tmp_path / "eval"
    code = main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "sim" / "manifest.csv"),
                 "--low", str(tmp_path / "low"), "--out", str(out), "--lesions", "phantom"])
    assert code == 0, capsys.readouterr()
    printed = capsys.readouterr().out
    assert "organs: SUVmean bias" in printed and "organs.csv" in printed
    doc = json.loads((out / "results.json").read_text())
    cells = {(s["method"], s["organ"]): s for s in doc["organs"]["summary"]}
    assert set(cells) == {(m, o) for m in ("model", "Low-Dose") for o in ("liver", "myocardium")}
    assert cells["model", "liver"]["mean_bias_pct"] == pytest.approx(2.0, abs=1e-4)
    assert cells["model", "myocardium"]["max_bias_pct"] == pytest.approx(-10.0, abs=1e-4)
    assert cells["Low-Dose", "liver"]["mean_bias_pct"] == 0.0 and cells["model", "liver"]["subjects"] == 1
    assert [s["lesions"] for s in doc["lesions"]["summary"]] == [1, 1]  # lesions unchanged beside the organs
    from lowdose_toolkit.core.figures import texts
    from lowdose_toolkit.evaluation.lesions import uptake_figure

    assert (out / "uptake.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "uptake.png" in printed
    drawn = texts(uptake_figure(doc["lesions"]["summary"], doc["organs"]["summary"]))
    assert {"lesions: SUVmean bias (%)", "liver: SUVmean bias (%)", "myocardium: SUVmean bias (%)", "model",
            "Low-Dose"} <= set(drawn)
    organs_csv = (out / "organs.csv").read_text().splitlines()
    assert organs_csv[0].startswith("method,subject,drf,organ,voxels") and len(organs_csv) == 5
    assert "| 4 | model | +2.0 ± 0.0 | -10.0 ± 0.0 |" in (out / "lesions.md").read_text()
    # Again into the same folder with plain lesion masks: no organs, and the earlier organs.csv is gone.
    _save(tmp_path / "masks" / "s1.nii.gz", (labels == ids["lesion"]).astype(np.uint8))
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "sim" / "manifest.csv"),
                 "--out", str(out), "--lesions", str(tmp_path / "masks")]) == 0
    assert "organs" not in capsys.readouterr().out and not (out / "organs.csv").exists()
    assert "organs" not in json.loads((out / "results.json").read_text())
    # A labels.json naming values no mask holds (another map's numbering) says so; it was a silent empty table.
    (tmp_path / "masks" / "labels.json").write_text(json.dumps({"lesion": 1, "spleen": 9}))
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "sim" / "manifest.csv"),
                 "--out", str(tmp_path / "eval2"), "--lesions", str(tmp_path / "masks")]) == 0
    assert (f"warning {tmp_path / 'masks' / 'labels.json'}: no mask holds 'spleen' (9); check those label values"
            in " ".join(capsys.readouterr().out.split()))
    rows = [{"method": "m", "drf": 4, "organ": "liver", "mean_bias_pct": v, "max_bias_pct": 0.0} for v in (1.0, -3.0)]
    assert organ_markdown(organ_summary(rows)) == "| DRF | Method | liver |\n|---|---|---|\n| 4 | m | -1.0 ± 2.8 |\n"


def test_a_masks_folder_names_its_labels(tmp_path: Path) -> None:
    """labels.json turns a folder of masks into label maps: 'lesion' values are lesions, other names organs; a
    folder without it stays every-nonzero-voxel-lesion; a bad labels.json is one line naming the file."""
    from lowdose_toolkit.evaluation.lesions import volume_cases

    shape = (8, 8, 8)
    labels = np.zeros(shape, np.uint8)
    labels[:4] = 5  # liver
    labels[4:, :2] = 2  # left kidney
    labels[4:, 6:] = 3  # right kidney
    labels[6, 4, 4] = 1  # a lesion
    ref = (1.0 + labels).astype(np.float32)
    masks = tmp_path / "masks"
    _save(masks / "s1.nii.gz", labels)
    full = tmp_path / "full.nii.gz"
    plain = volume_cases(LesionMasks(masks), "s1", 4, full, ref, {"m": ref}, AFFINE, "mm")
    assert {r.get("organ") for r in plain} == {None} and len(plain) == 2  # touching organs: one component
    (masks / "labels.json").write_text(json.dumps({"lesion": 1, "liver": 5, "kidney": [2, 3]}))
    named = LesionMasks(masks)
    rows = volume_cases(named, "s1", 4, full, ref, {"m": ref * 1.1}, AFFINE, "mm")
    lesions = [r for r in rows if "lesion" in r]
    organs = {r["organ"]: r for r in rows if "organ" in r}
    assert len(lesions) == 1 and lesions[0]["voxels"] == 1
    assert set(organs) == {"liver", "kidney"} and organs["kidney"]["voxels"] == 128
    assert organs["liver"]["mean_bias_pct"] == pytest.approx(10.0, abs=1e-4)
    for text, message in (("{not json", "not a readable JSON file"), ("[]", "expected an object naming label"),
                          ("true", "expected an object naming label"),
                          ('{"lesion": 1, "liver": [5, 1]}', "label value 1 is named both 'lesion' and 'liver'"),
                          ('{"liver": "five"}', r"'liver' is 'five'; give a positive integer"),
                          ('{"liver": [0]}', r"'liver' is \[0\]")):
        (masks / "labels.json").write_text(text)
        with pytest.raises(UserError, match=rf"labels\.json: {message}"):
            LesionMasks(masks)


def test_table_iv_takes_each_runs_organs_and_the_input_once(tmp_path: Path) -> None:
    from lowdose_toolkit.evaluation.lesions import organ_markdown, organ_summary, uptake_tables

    def organ_table(inputs: list) -> str:  # Table IV as ldt table and ldt study write it
        return organ_markdown(uptake_tables(inputs)[1])
    from lowdose_toolkit.evaluation.results import lesion_summaries, write_results

    case = {"method": "m", "subject": "s", "drf": 4, "psnr": 40.0, "ssim": 0.9, "nrmse": 0.1,
            "ssim_range": "challenge", "masked": False}
    for name, bias, low in (("A", -4.0, 0.5), ("B", 1.5, 0.7)):  # B's input row differs: A's, the first, is kept
        rows = [{"method": m, "drf": 4, "organ": o, "mean_bias_pct": b, "max_bias_pct": 0.0}
                for m, b in (("Low-Dose", low), (name, bias)) for o in ("liver", "kidney")]
        write_results(tmp_path / name, "run", [{**case, "method": name}], [], {"ssim_range": "challenge",
                      "mask": False}, organs={"masks": "phantom", "summary": organ_summary(rows)})
    table = organ_table([tmp_path / "A", tmp_path / "B"])
    assert table.splitlines()[0] == "| DRF | Method | kidney | liver |"
    assert [line.split(" | ")[1] for line in table.splitlines()[2:]] == ["Low-Dose", "A", "B"]
    assert "| 4 | A | -4.0 ± 0.0 | -4.0 ± 0.0 |" in table and "| 4 | Low-Dose | +0.5 ± 0.0 | +0.5 ± 0.0 |" in table
    assert len(lesion_summaries([tmp_path / "A", tmp_path / "B"], kind="organs")) == 6  # the input's once per organ
    # Two evaluations under one method name stay two rows (a row never takes another evaluation's cells).
    twice = organ_table([tmp_path / "A", tmp_path / "A" / "results.json"])
    assert twice.count("| 4 | A |") == 2
    with pytest.raises(ValueError, match="kind 'method'"):
        lesion_summaries([tmp_path / "A"], kind="method")
    assert main(["table", str(tmp_path / "A"), str(tmp_path / "B"), "--out", str(tmp_path / "tables")]) == 0
    assert (tmp_path / "tables" / "table4.md").read_text() == table
    assert (tmp_path / "tables" / "uptake.png").is_file()  # Table IV as a chart (no lesions: organ panels only)


# ------------------------------------------------------------------------------------------------ SUVpeak


@pytest.mark.parametrize("spacing", [(6.0, 6.0, 6.0), (2.0, 2.0, 2.0), (1.65, 1.65, 2.89), (4.0, 4.0, 1.0)])
def test_the_peak_sphere_holds_one_millilitre_on_any_voxels(spacing: tuple[float, float, float]) -> None:
    from lowdose_toolkit.evaluation.peak import peak_kernel, sphere_shares

    shares = sphere_shares(spacing)
    assert float(shares.sum()) * np.prod(spacing) == pytest.approx(1000.0, rel=0.01)  # mm³
    assert all(n % 2 == 1 for n in shares.shape) and shares[tuple(n // 2 for n in shares.shape)] == 1.0
    assert float(peak_kernel(spacing).sum()) == pytest.approx(1.0, abs=1e-12)


def test_region_peak_is_the_best_sphere_mean_centred_in_the_region() -> None:
    """Against a direct sum over the kernel at every region voxel (edge voxels repeated beyond the volume)."""
    from lowdose_toolkit.evaluation.peak import peak_kernel, region_peak

    rng = np.random.default_rng(3)
    image = rng.gamma(2.0, 1.0, (14, 13, 12))
    region = np.zeros(image.shape, bool)
    region[0:4, 5:9, 9:12] = True  # at two faces of the volume
    region[2, 8, 8] = True
    kernel = peak_kernel((2.5, 3.0, 2.0))
    h = [k // 2 for k in kernel.shape]
    padded = np.pad(image, [(n, n) for n in h], mode="edge")
    best = max(float((padded[i:i + kernel.shape[0], j:j + kernel.shape[1], k:k + kernel.shape[2]] * kernel).sum())
               for i, j, k in zip(*np.nonzero(region), strict=True))
    box = tuple(slice(int(a.min()), int(a.max()) + 1) for a in np.nonzero(region))
    assert region_peak(image, box, region[box], kernel) == pytest.approx(best, rel=1e-12)


def test_suvpeak_is_robust_to_the_noise_that_raises_suvmax() -> None:
    """A 2 cm lesion (SUV 8 in 1): the full dose's peak is its uptake; a noisy copy raises SUVmax far more than
    SUVpeak; the rows, the summary, the Markdown table and the chart carry SUVpeak beside SUVmean and SUVmax."""
    from lowdose_toolkit.core.figures import texts
    from lowdose_toolkit.evaluation.lesions import markdown, summarize, uptake_figure

    spacing = (2.0, 2.0, 2.0)
    ref = np.ones((32, 32, 32), np.float32)
    ball = _ball(ref.shape, (16, 16, 16), 5.0)  # radius 10 mm
    ref[ball] = 8.0
    noisy = (ref * (1 + 0.3 * np.random.default_rng(0).standard_normal(ref.shape))).astype(np.float32)
    rows = lesion_rows(ref, {"Low-Dose": noisy}, label_components(ball)[0], 0.008, spacing)
    (row,) = rows
    assert row["ref_peak"] == pytest.approx(8.0, rel=1e-6) and row["ref_max"] == 8.0
    assert row["max_bias_pct"] > 60 and abs(row["peak_bias_pct"]) < row["max_bias_pct"] / 4
    summary = summarize([{**row, "drf": 4}])
    assert summary[0]["peak_bias_pct"] == pytest.approx(row["peak_bias_pct"])
    assert "| SUVpeak bias (%) | mean abs (%) |" in markdown(summary).splitlines()[0]
    assert "lesions: SUVpeak bias (%)" in texts(uptake_figure(summary, []))
    older = [{k: v for k, v in s.items() if "peak" not in k} for s in summary]  # a results.json from before
    assert "SUVpeak" not in markdown(older) and "lesions: SUVpeak bias (%)" not in texts(uptake_figure(older, []))
