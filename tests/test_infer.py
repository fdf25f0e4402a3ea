"""``ldt infer``: whole volumes in, aligned NIfTI out, bad inputs skipped, inputs never touched."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import make_tiny_dataset, snapshot, tiny_recipe, write

from lowdose_toolkit.cli.app import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("infer")
    data = make_tiny_dataset(root / "data", subjects=4)
    # A residual ML-Net starts from the identity, so even a briefly trained model gives plausible values.
    text = tiny_recipe(data).replace("epochs: 3", "epochs: 1").replace("steps_per_epoch: 6", "steps_per_epoch: 2")
    recipe = write(root / "r.yaml", text.replace("depth: 2}", "depth: 2, residual: true}"))
    assert main(["run", str(recipe), "--out", str(root / "run"), "--set", "data.split.test=0"]) == 0
    return root / "run", data


def test_infer_folder_keeps_geometry_and_reports_drf(trained: tuple[Path, Path], tmp_path: Path) -> None:
    run, data = trained
    inputs = tmp_path / "in"
    inputs.mkdir()
    # An odd-sized, anisotropic, oblique volume and a copy of a training input.
    affine = np.array([[0, -2.5, 0.3, 10], [3.0, 0, 0, -20], [0, 0.2, 1.7, 5], [0, 0, 0, 1]])
    odd = np.random.default_rng(0).poisson(50, size=(19, 27, 31)).astype(np.float32)
    img = nib.Nifti1Image(odd, affine)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, inputs / "odd.nii.gz")
    shutil.copy(data / "sub00" / "drf_100.nii.gz", inputs / "sub00_drf100.nii.gz")
    before = snapshot(inputs)
    out = tmp_path / "out"
    assert main(["infer", str(run), str(inputs), "--out", str(out)]) == 0
    assert snapshot(inputs) == before
    pred = nib.load(out / "odd.nii.gz")
    assert pred.shape == odd.shape and pred.get_data_dtype() == np.float32
    np.testing.assert_array_equal(pred.affine, nib.load(inputs / "odd.nii.gz").affine)
    assert pred.header.get_xyzt_units() == ("mm", "sec")
    values = pred.get_fdata()
    assert np.isfinite(values).all() and 5 < values.mean() < 500  # back in the input's units
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["ok", "ok"]
    previews = sorted(p.name for p in (out / "previews").iterdir())
    assert previews == ["odd.png", "sub00_drf100.png"]
    assert (out / "previews" / "odd.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(r["predicted_drf"] in ("4", "100") and 0.5 <= float(r["drf_probability"]) <= 1 for r in rows)
    # Existing outputs are kept unless --overwrite.
    assert main(["infer", str(run), str(inputs), "--out", str(out)]) == 2
    assert main(["infer", str(run), str(inputs / "odd.nii.gz"), "--out", str(out), "--overwrite"]) == 0


def test_infer_refuses_input_folder_as_output(trained: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    run, data = trained
    folder = data / "sub01"
    assert main(["infer", str(run / "checkpoints" / "best.pt"), str(folder / "drf_004.nii.gz"),
                 "--out", str(folder)]) == 2
    assert "is an input folder" in capsys.readouterr().err


def test_bad_input_is_skipped_and_exit_code_nonzero(trained: tuple[Path, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    run, data = trained
    inputs = tmp_path / "in"
    inputs.mkdir()
    bad = np.ones((20, 20, 20), dtype=np.float32)
    bad[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(bad, np.eye(4)), inputs / "a_nan.nii.gz")
    shutil.copy(data / "sub02" / "drf_004.nii.gz", inputs / "b_good.nii.gz")
    (inputs / "c_truncated.nii.gz").write_bytes((data / "sub02" / "full.nii.gz").read_bytes()[:300])
    assert main(["infer", str(run), str(inputs / "*.nii.gz"), "--out", str(tmp_path / "out")]) == 1
    rows = {Path(r["input"]).name: r for r in csv.DictReader((tmp_path / "out" / "summary.csv").open())}
    assert rows["b_good.nii.gz"]["status"] == "ok"
    assert rows["a_nan.nii.gz"]["status"] == "failed" and "NaN" in rows["a_nan.nii.gz"]["error"]
    assert rows["c_truncated.nii.gz"]["status"] == "failed"
    assert (tmp_path / "out" / "b_good.nii.gz").is_file() and not (tmp_path / "out" / "a_nan.nii.gz").exists()


def test_manifest_input_and_missing_checkpoint(trained: tuple[Path, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    run, data = trained
    assert main(["infer", str(tmp_path / "nope.pt"), str(data), "--out", str(tmp_path / "o")]) == 2
    assert "no checkpoint here" in capsys.readouterr().err
    manifest = write(tmp_path / "m" / "list.csv", "subject,drf,path\n"
                     f"sub03,100,{data / 'sub03' / 'drf_100.nii.gz'}\nsub03,full,{data / 'sub03' / 'full.nii.gz'}\n")
    assert main(["infer", str(run), str(manifest), "--out", str(tmp_path / "o")]) == 0
    assert sorted(p.name for p in (tmp_path / "o").glob("*.nii.gz")) == ["sub03_drf_100.nii.gz"]
    # Subject folders holding the same file names (the simulator's and the challenge's layout): one output
    # each, named after its subject, as ldt evaluate pairs them; a name holding its subject keeps it.
    shutil.copy(data / "sub02" / "drf_100.nii.gz", tmp_path / "m" / "sub02_scan.nii.gz")
    manifest = write(tmp_path / "m" / "two.csv", "subject,drf,path\n"
                     f"sub03,100,{data / 'sub03' / 'drf_100.nii.gz'}\nsub01,100,{data / 'sub01' / 'drf_100.nii.gz'}\n"
                     "sub02,100,sub02_scan.nii.gz\n")
    assert main(["infer", str(run), str(manifest), "--out", str(tmp_path / "o2"), "--no-previews"]) == 0
    assert sorted(p.name for p in (tmp_path / "o2").glob("*.nii.gz")) == [
        "sub01_drf_100.nii.gz", "sub02_scan.nii.gz", "sub03_drf_100.nii.gz"]


def test_dicom_series_input(trained: tuple[Path, Path], tmp_path: Path) -> None:
    from test_uldp import activity, write_series

    run, _ = trained
    series = tmp_path / "scan" / "PET_DRF_100"
    write_series(series, activity(3))
    out = tmp_path / "out"
    assert main(["infer", str(run), str(series), "--out", str(out), "--output-format", "nifti"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["PET_DRF_100.nii.gz", "previews", "summary.csv", "summary.json"]
    pred = nib.load(out / "PET_DRF_100.nii.gz")
    from lowdose_toolkit.data.io import load_array

    _, affine, info = load_array(series)
    assert pred.shape == info.shape
    np.testing.assert_allclose(pred.affine, affine, atol=1e-4)


def test_bad_dicom_series_fail_alone(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """A series with a duplicate slice and a CT series are one failed row each; the good series is written."""
    from badinputs import BAD_DICOM_SERIES, good_series

    run, _ = trained
    cases = {c.name: c for c in BAD_DICOM_SERIES}
    scans = tmp_path / "scans"
    good_series(scans / "a_good")
    cases["duplicate_slice"].make(scans / "b_duplicate")
    cases["ct_series"].make(scans / "c_ct")
    out = tmp_path / "out"
    assert main(["infer", str(run), str(scans), "--out", str(out)]) == 1  # some input failed
    rows = {Path(r["input"]).name: r for r in csv.DictReader((out / "summary.csv").open())}
    assert [rows[n]["status"] for n in ("a_good", "b_duplicate", "c_ct")] == ["ok", "failed", "failed"]
    assert "duplicate slices:" in rows["b_duplicate"]["error"] and "\n" not in rows["b_duplicate"]["error"]
    assert "Modality 'CT' where PET ('PT') is expected" in rows["c_ct"]["error"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["a_good", "previews"]  # DICOM in, DICOM out


def test_dicom_in_dicom_out(trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A DICOM series in, a new series out (the default): the input's grid, identity and PET tags, the model and
    recipe named, the NIfTI output's values within each slice's quantisation step; the input untouched."""
    from test_dicom_out import IDENTITY, PER_SLICE, by_position, digest, pet_series

    from lowdose_toolkit import __version__
    from lowdose_toolkit.data.io import load_array

    run, data = trained
    scans = tmp_path / "scans"
    series = pet_series(scans / "PET_DRF_100")
    before = digest(scans)
    out = tmp_path / "out"
    assert main(["infer", str(run), str(series), "--out", str(out)]) == 0
    assert digest(scans) == before
    assert sorted(p.name for p in out.iterdir()) == ["PET_DRF_100", "previews", "summary.csv", "summary.json"]
    [row] = summary(out).values()
    assert row["status"] == "ok" and row["output"] == str(out / "PET_DRF_100") and row["shape"] == "6x5x4"
    src, written = by_position(series), by_position(out / "PET_DRF_100")
    assert len({ds.SOPInstanceUID for ds in written}) == len(src) == 4
    assert {ds.SeriesInstanceUID for ds in written}.isdisjoint({ds.SeriesInstanceUID for ds in src})
    for a, b in zip(src, written, strict=True):
        assert all(b.get(k) == a.get(k) for k in (*IDENTITY, *PER_SLICE))
        assert list(b.ImageType) == ["DERIVED", "SECONDARY"]
    text = written[0].DerivationDescription
    assert text.startswith(f"Denoised by lowdose-toolkit {__version__} (ldt infer): model mlnet, recipe tiny, from "
                           "best.pt (epoch ") and f"; predicted DRF {row['predicted_drf']} (" in text
    assert written[0].SeriesDescription == f"PET WB 1-4 dose denoised (ldt {__version__}, tiny, mlnet)"
    _, affine_in, _ = load_array(series)
    pred, affine_out, _ = load_array(out / "PET_DRF_100")
    np.testing.assert_allclose(affine_out, affine_in, rtol=0, atol=1e-4)
    nifti = tmp_path / "nifti"  # the same prediction, written as NIfTI
    assert main(["infer", str(run), str(series), "--out", str(nifti), "--output-format", "nifti", "--no-previews"]) == 0
    exact = nib.load(nifti / "PET_DRF_100.nii.gz").get_fdata(dtype=np.float32)
    slopes = np.array([float(ds.RescaleSlope) for ds in written])
    assert (np.abs(pred[0].numpy() - exact) <= slopes / 2 * (1 + 1e-6) + 1e-3).all()
    # --skip-existing keeps the series, --overwrite replaces it with a new one, but not a folder holding more.
    assert main(["infer", str(run), str(series), "--out", str(out), "--skip-existing"]) == 0
    assert summary(out)["PET_DRF_100"]["status"] == "skipped"
    assert main(["infer", str(run), str(series), "--out", str(out), "--overwrite"]) == 0
    again = by_position(out / "PET_DRF_100")
    assert again[0].SeriesInstanceUID != written[0].SeriesInstanceUID and len(again) == 4
    (out / "PET_DRF_100" / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["infer", str(run), str(series), "--out", str(out), "--overwrite"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert (f"{out / 'PET_DRF_100'} exists and holds 'notes.txt', not only the .dcm files of a series ldt wrote, so "
            "--overwrite does not replace it; remove it or choose another --out") in err
    assert (out / "PET_DRF_100" / "notes.txt").is_file() and digest(scans) == before


def test_dicom_output_needs_a_dicom_input(trained: tuple[Path, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """NIfTI in, DICOM out is refused before anything is written (a new series needs a DICOM template)."""
    run, data = trained
    volume = data / "sub00" / "drf_004.nii.gz"
    out = tmp_path / "out"
    assert main(["infer", str(run), str(volume), "--out", str(out), "--output-format", "dicom"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert (f"{volume}: --output-format dicom needs a DICOM series input (its headers are the new series' template); "
            "pass --output-format nifti or leave the option out for NIfTI inputs") in err
    assert main(["infer", str(run), str(volume), "--out", str(out), "--output-format", "png"]) == 2
    assert "--output-format png: not a format ldt writes; choose dicom or nifti" in capsys.readouterr().err
    assert not out.exists()
    assert main(["infer", str(run), str(volume), "--out", str(out), "--output-format", "NIfTI"]) == 0
    # A series' output folder is never an input, nor holds one.
    from badinputs import good_series

    series = good_series(tmp_path / "scans" / "PET")
    assert main(["infer", str(run), str(series), "--out", str(tmp_path / "scans")]) == 2
    assert (f"{series} would be the output series, but it is the input series {series}; choose another --out"
            in " ".join(capsys.readouterr().err.split()))
    (out / "PET").mkdir()
    inner = Path(shutil.copy(volume, out / "PET" / "x.nii.gz"))
    assert main(["infer", str(run), str(series), str(inner), "--out", str(out), "--overwrite"]) == 2
    assert (f"{out / 'PET'} would be the output series, but it holds the input {inner}; choose another --out"
            in " ".join(capsys.readouterr().err.split()))


def test_checkpoint_naming_a_missing_plugin(trained: tuple[Path, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    run, data = trained
    ckpt = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    ckpt["recipe"]["model"]["generator"]["name"] = "fancy_unet"
    torch.save(ckpt, tmp_path / "foreign.pt")
    assert main(["infer", str(tmp_path / "foreign.pt"), str(data / "sub00" / "drf_004.nii.gz"),
                 "--out", str(tmp_path / "o")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "unknown generator 'fancy_unet'" in err and "install the plugin that provides it" in err


def test_pipelined_folder_equals_one_volume_at_a_time(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """Reading ahead and writing behind changes nothing: each output equals its volume run alone."""
    run, data = trained
    inputs = tmp_path / "in"
    inputs.mkdir()
    for s in (0, 1, 2):
        for d in (4, 100):
            shutil.copy(data / f"sub0{s}" / f"drf_{d:03d}.nii.gz", inputs / f"sub0{s}_drf{d}.nii.gz")
    together = tmp_path / "together"
    assert main(["infer", str(run), str(inputs), "--out", str(together)]) == 0
    rows = list(csv.DictReader((together / "summary.csv").open()))
    assert [Path(r["input"]).name for r in rows] == sorted(p.name for p in inputs.iterdir())  # input order
    assert [r["status"] for r in rows] == ["ok"] * 6
    sequential = tmp_path / "sequential"
    assert main(["infer", str(run), str(inputs), "--out", str(sequential), "--no-prefetch", "--no-previews"]) == 0
    assert not (sequential / "previews").exists()
    for r in rows:
        a = np.asarray(nib.load(r["output"]).dataobj)
        np.testing.assert_array_equal(a, np.asarray(nib.load(sequential / Path(r["output"]).name).dataobj))
    assert (sequential / "summary.csv").read_text().count(",ok,") == 6
    for r in rows[::2]:
        alone = tmp_path / f"alone_{Path(r['input']).name}"
        assert main(["infer", str(run), r["input"], "--out", str(alone)]) == 0
        a = np.asarray(nib.load(r["output"]).dataobj)
        b = np.asarray(nib.load(alone / Path(r["output"]).name).dataobj)
        np.testing.assert_array_equal(a, b)
        assert float(r["seconds"]) > 0


def three_copies(data: Path, folder: Path) -> Path:
    """``folder`` holding a.nii.gz, b.nii.gz and c.nii.gz, copies of one tiny input volume."""
    folder.mkdir()
    for name in ("a", "b", "c"):
        shutil.copy(data / "sub01" / "drf_100.nii.gz", folder / f"{name}.nii.gz")
    return folder


def test_a_failed_write_is_reported_and_the_rest_are_written(trained: tuple[Path, Path], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    import lowdose_toolkit.data.io as ldt_io

    run, data = trained
    inputs = three_copies(data, tmp_path / "in")
    real = ldt_io.save_like

    def save_like(volume, reference, out_path):  # noqa: ANN001, ANN202 - the patched function's signature
        if Path(out_path).name == "b.nii.gz":
            raise OSError(28, "No space left on device")
        return real(volume, reference, out_path)

    monkeypatch.setattr(ldt_io, "save_like", save_like)
    assert main(["infer", str(run), str(inputs), "--out", str(tmp_path / "out")]) == 1
    rows = {Path(r["input"]).name: r for r in csv.DictReader((tmp_path / "out" / "summary.csv").open())}
    assert [rows[n]["status"] for n in ("a.nii.gz", "b.nii.gz", "c.nii.gz")] == ["ok", "failed", "ok"]
    assert "No space left on device" in rows["b.nii.gz"]["error"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == ["a.nii.gz", "c.nii.gz"]
    assert "failed" in capsys.readouterr().err


def test_preview_mip_is_coronal_head_up_whatever_the_voxel_order() -> None:
    """A hot spot near the head (+Z, superior) at high X (RAS+: towards the patient's right) lands top-right."""
    import torch

    from lowdose_toolkit.infer.preview import ras_mip

    ras = np.zeros((10, 6, 20), dtype=np.float32)  # RAS+ voxel order: X, Y (anterior), Z (superior)
    ras[8, 3, 17] = 1.0
    expected = ras_mip(torch.from_numpy(ras), np.eye(4))
    assert expected.shape == (20, 10) and np.unravel_index(expected.argmax(), expected.shape) == (2, 8)
    # The same image stored LPS-transposed: voxel axes (K=Z, J=-Y, I=-X), as a DICOM reader may give it.
    stored = np.ascontiguousarray(ras[::-1, ::-1, :].transpose(2, 1, 0))
    affine = np.array([[0, 0, -1, 9], [0, -1, 0, 5], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
    np.testing.assert_array_equal(ras_mip(torch.from_numpy(stored)[None], affine), expected)


def test_interrupt_keeps_finished_outputs_whole(trained: tuple[Path, Path], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C during the second volume: exit 130, the first output complete, no temporary file left, and the
    summary of what was done (the rest ``not done``) written all the same (it was not before)."""
    import lowdose_toolkit.infer.sliding as sliding

    run, data = trained
    inputs = three_copies(data, tmp_path / "in")
    real, calls = sliding.infer_volume, []

    def interrupted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - the patched function's signature
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sliding, "infer_volume", interrupted)
    out = tmp_path / "out"
    assert main(["infer", str(run), str(inputs), "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "lists what was done; the same command with --skip-existing finishes" in err
    assert "--resume" not in err  # a training's way on is not an inference's
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["a.nii.gz", "a.png", "summary.csv",
                                                                      "summary.json"]  # no lock file left
    np.testing.assert_array_equal(nib.load(out / "a.nii.gz").shape, nib.load(inputs / "a.nii.gz").shape)
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [(Path(r["input"]).name, r["status"]) for r in rows] == [("a.nii.gz", "ok"), ("b.nii.gz", "not done"),
                                                                     ("c.nii.gz", "not done")]
    assert "the batch was stopped" in rows[2]["error"]
    # ... and --skip-existing resumes it: a is kept as it is, b and c are denoised.
    before = (out / "a.nii.gz").stat().st_mtime_ns
    monkeypatch.setattr(sliding, "infer_volume", real)
    assert main(["infer", str(run), str(inputs), "--out", str(out), "--skip-existing"]) == 0
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["skipped", "ok", "ok"]
    assert rows[0]["predicted_drf"] in ("4", "100")  # carried over from the first run's summary
    assert (out / "a.nii.gz").stat().st_mtime_ns == before and (out / "c.nii.gz").is_file()
    assert "2/3 volumes written" in capsys.readouterr().err
    assert main(["infer", str(run), str(inputs), "--out", str(out), "--skip-existing", "--overwrite"]) == 2
    assert "--overwrite and --skip-existing contradict each other" in capsys.readouterr().err


def test_infer_normalises_with_the_quantile_the_checkpoint_was_trained_with(
        trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """New checkpoints record the robust normalisation's quantile (0.99); older ones, without it, used 0.999."""
    import torch

    from lowdose_toolkit.data import normalize

    run, data = trained
    seen: list[float | None] = []
    original = normalize.fit_normalization

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - the patched function's signature
        seen.append(kwargs.get("quantile"))
        return original(*args, **kwargs)

    monkeypatch.setattr(normalize, "fit_normalization", spy)
    volume = str(data / "sub00" / "drf_004.nii.gz")
    assert main(["infer", str(run), volume, "--out", str(tmp_path / "new")]) == 0
    ckpt = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert ckpt["normalization"] == {"method": "robust", "quantile": 0.99}
    del ckpt["normalization"]["quantile"]
    torch.save(ckpt, tmp_path / "old.pt")
    assert main(["infer", str(tmp_path / "old.pt"), volume, "--out", str(tmp_path / "old")]) == 0
    assert seen == [0.99, 0.999]


# ------------------------------------------------------------------------- a batch that always finishes


def summary(out: Path) -> dict[str, dict[str, str]]:
    return {Path(r["input"]).name: r for r in csv.DictReader((out / "summary.csv").open())}


def test_bad_niftis_fail_alone_and_the_summary_is_written(trained: tuple[Path, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Every entry of badinputs.BAD_NIFTI is one failed row and one console line; the good volume is written.

    Before: the header declaring 98 TiB raised MemoryError while reading, which ended the batch with no summary.
    """
    import re

    from badinputs import BAD_NIFTI

    run, data = trained
    inputs = tmp_path / "in"
    for case in BAD_NIFTI:
        case.make(inputs)
    shutil.copy(data / "sub02" / "drf_004.nii.gz", inputs / "good.nii.gz")
    out = tmp_path / "out"
    assert main(["infer", str(run), str(inputs), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    rows = summary(out)
    assert len(rows) == len(BAD_NIFTI) + 1 and rows["good.nii.gz"]["status"] == "ok"
    for case in BAD_NIFTI:
        row = next(r for name, r in rows.items() if name.startswith(case.name))
        assert row["status"] == "failed", case.name
        assert re.search(case.error, row["error"]) and "\n" not in row["error"], row["error"]
        assert re.search(rf"failed .*{re.escape(Path(row['input']).name)}: ", " ".join(err.split())), case.name
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["good.nii.gz"]
    assert f"1/{len(rows)} volumes written" in err and f"{len(BAD_NIFTI)} failed" in err


def test_any_error_fails_one_volume_and_the_batch_goes_on(trained: tuple[Path, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """CUDA running out of memory, a bug in the model, a failed write: each one volume's row; the rest written.

    Before, only DataError/UserError were caught: the first of these ended the batch with no summary.
    """
    import torch

    import lowdose_toolkit.data.io as ldt_io
    import lowdose_toolkit.infer.sliding as sliding

    run, data = trained
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a", "b_oom", "c_bug", "d", "e_write"):
        shutil.copy(data / "sub01" / "drf_100.nii.gz", inputs / f"{name}.nii.gz")
    real_infer, real_save = sliding.infer_volume, ldt_io.save_like
    calls: list[int] = []

    def infer_volume(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - the patched function's signature
        calls.append(1)
        if len(calls) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB.\nGPU 0 has 1 GiB free")
        if len(calls) == 3:
            raise RuntimeError("shape mismatch in layer 3")
        return real_infer(*args, **kwargs)

    def save_like(volume, reference, out_path):  # noqa: ANN001, ANN202 - the patched function's signature
        if Path(out_path).name == "e_write.nii.gz":
            raise ValueError("compression failed")
        return real_save(volume, reference, out_path)

    monkeypatch.setattr(sliding, "infer_volume", infer_volume)
    monkeypatch.setattr(ldt_io, "save_like", save_like)
    out = tmp_path / "out"
    assert main(["infer", str(run), str(inputs), "--out", str(out)]) == 1
    rows = summary(out)
    assert [rows[f"{n}.nii.gz"]["status"] for n in ("a", "b_oom", "c_bug", "d", "e_write")] == [
        "ok", "failed", "failed", "ok", "failed"]
    assert rows["b_oom"".nii.gz"]["error"].startswith("OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 "
                                                      "GiB. GPU 0 has 1 GiB free; the device ran out of memory: lower "
                                                      "--batch-size")
    assert rows["c_bug.nii.gz"]["error"] == "RuntimeError: shape mismatch in layer 3"
    assert rows["e_write.nii.gz"]["error"] == "ValueError: compression failed"
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["a.nii.gz", "d.nii.gz"]
    err = " ".join(capsys.readouterr().err.split())
    assert all(f"failed {inputs / n}.nii.gz: " in err for n in ("b_oom", "c_bug", "e_write"))


def test_a_preview_that_cannot_be_drawn_keeps_the_prediction(trained: tuple[Path, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A sform nibabel cannot orient: the volume is written, without preview, and the row says why.

    Before: nibabel's OrientationError while drawing the preview ended the batch.
    """
    from badinputs import degenerate_affine_nifti

    run, data = trained
    inputs = tmp_path / "in"
    degenerate_affine_nifti(inputs / "a_degenerate.nii.gz")
    shutil.copy(data / "sub01" / "drf_100.nii.gz", inputs / "b.nii.gz")
    out = tmp_path / "out"
    assert main(["infer", str(run), str(inputs), "--out", str(out)]) == 0
    rows = summary(out)
    assert [r["status"] for r in rows.values()] == ["ok", "ok"]
    assert rows["a_degenerate.nii.gz"]["error"].startswith("no preview: OrientationError: ")
    assert (out / "a_degenerate.nii.gz").is_file() and sorted(p.name for p in (out / "previews").iterdir()) == [
        "b.png"]
    assert "warning" in capsys.readouterr().err


def test_memory_is_checked_from_the_header_before_reading(trained: tuple[Path, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Needed (header shape x type + 3 float32 copies) against available: refused with both numbers."""
    from badinputs import good_series

    from lowdose_toolkit.data import io
    from lowdose_toolkit.infer import memory

    run, data = trained
    volume = data / "sub00" / "drf_004.nii.gz"  # 24^3 float32: 54 KiB stored, 4 x 54 KiB needed
    assert memory.memory_needed(volume)[0] == 4 * 24**3 * 4
    assert memory.memory_needed(volume, extra_copies=5) == (9 * 24**3 * 4, "24x24x24 float32 voxels: 54 KiB to "
                                                            "read plus 8 float32 working copies of 54 KiB")
    series = good_series(tmp_path / "series")
    assert io.declared_volume(series)[0] == io.load_array(series)[2].shape
    assert memory.available_memory() > 0 and memory.format_bytes(1536) == "1.5 KiB"
    monkeypatch.setattr(memory, "available_memory", lambda: 100_000)
    out = tmp_path / "out"
    assert main(["infer", str(run), str(volume), "--out", str(out)]) == 1
    [row] = summary(out).values()
    assert row["error"] == (f"{volume}: needs about 216 KiB of memory (24x24x24 float32 voxels: 54 KiB to read plus 3 "
                            "float32 working copies of 54 KiB) but 97.7 KiB is available; free memory or use a "
                            "machine with more (a shape this machine cannot hold may also be a damaged header: check "
                            "the file)")


def test_a_nonfinite_prediction_is_an_error_not_a_written_volume(trained: tuple[Path, Path], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint with NaN weights, and a model that overflows on one volume: failed rows, nothing written.

    Before: the NaN volumes were written and marked ok.
    """
    from badinputs import nan_weights_checkpoint

    import lowdose_toolkit.infer.sliding as sliding

    run, data = trained
    inputs = three_copies(data, tmp_path / "in")
    broken = nan_weights_checkpoint(run / "checkpoints" / "best.pt", tmp_path / "nan.pt")
    out = tmp_path / "nan"
    assert main(["infer", str(broken), str(inputs), "--out", str(out), "--precision", "fp32"]) == 1
    rows = summary(out)
    assert {r["status"] for r in rows.values()} == {"failed"} and not list(out.glob("*.nii.gz"))
    assert rows["a.nii.gz"]["error"] == (
        f"{inputs / 'a.nii.gz'}: the prediction has 13824 NaN and 0 Inf voxels (of 13824); nothing was written; the "
        "checkpoint's weights may be damaged (a diverged training?) or the input far outside what the model was "
        "trained on; check the checkpoint with `ldt evaluate RUN_DIR`")
    real = sliding.infer_volume

    def overflowing(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - the patched function's signature
        pred = real(*args, **kwargs).clone()
        if args[0].mean() > 0 and len(overflowing.seen) == 1:  # the second volume
            pred[0, 1, 2, 3] = float("inf")
        overflowing.seen.append(1)
        return pred

    overflowing.seen = []
    monkeypatch.setattr(sliding, "infer_volume", overflowing)
    out = tmp_path / "inf"
    assert main(["infer", str(run), str(inputs), "--out", str(out), "--precision", "bf16"]) == 1
    rows = summary(out)
    assert [r["status"] for r in rows.values()] == ["ok", "failed", "ok"]
    assert rows["b.nii.gz"]["error"].endswith("0 NaN and 1 Inf voxels (of 13824); nothing was written; rerun with "
                                              "--precision fp32 (bf16 can overflow)")
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["a.nii.gz", "c.nii.gz"]


# -------------------------------------------------------------------------------------- links and locks


def test_links_never_let_an_input_be_written_over(trained: tuple[Path, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Inputs given through symbolic (or hard) links: the listed folder is an input folder, and an output that
    is a link to an input is never replaced.

    Before, only resolved paths were compared: `--out links --overwrite` replaced the user's links with
    predictions, and an output that was a link to (or a hard link of) an input was replaced.
    """
    import os

    run, data = trained
    store = three_copies(data, tmp_path / "store")
    links = tmp_path / "links"
    links.mkdir()
    for name in ("a", "b"):
        (links / f"patient_{name}.nii.gz").symlink_to(store / f"{name}.nii.gz")
    before = snapshot(tmp_path)

    def refused(*args: str) -> str:
        assert main(["infer", str(run), *args]) == 2
        assert snapshot(tmp_path) == before
        return " ".join(capsys.readouterr().err.split())

    err = refused(str(links), "--out", str(links), "--overwrite")
    assert f"--out {links}: {links} is an input folder (a folder listed as input)" in err
    err = refused(str(links / "*.nii.gz"), "--out", str(links), "--overwrite")
    assert f"is an input folder (it holds the input {links / 'patient_a.nii.gz'})" in err
    assert "choose another folder (inputs are never written to)" in err
    # An output folder where the output name is a link to an input, or a hard link of one.
    results = tmp_path / "results"
    results.mkdir()
    (results / "patient_a.nii.gz").symlink_to(store / "a.nii.gz")
    os.link(store / "b.nii.gz", results / "patient_b.nii.gz")
    before = snapshot(tmp_path)
    err = refused(str(links / "patient_a.nii.gz"), "--out", str(results), "--overwrite")
    assert (f"{results / 'patient_a.nii.gz'} is a link to the input {links / 'patient_a.nii.gz'} (a link to "
            f"{store / 'a.nii.gz'}); inputs are never replaced") in err
    err = refused(str(links / "patient_b.nii.gz"), "--out", str(results), "--overwrite")
    assert f"{results / 'patient_b.nii.gz'} is the same file as the input" in err
    assert (results / "patient_a.nii.gz").is_symlink()
    # Linked inputs are named as listed, not as the files they link to.
    out = tmp_path / "out"
    assert main(["infer", str(run), str(links), "--out", str(out), "--no-previews"]) == 0
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["patient_a.nii.gz", "patient_b.nii.gz"]
    assert summary(out)["patient_a.nii.gz"]["input"] == str(links / "patient_a.nii.gz")


def test_a_second_infer_into_the_same_out_is_refused(trained: tuple[Path, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """OUT is locked while an `ldt infer` writes there: another one gets one line naming the holder's pid.

    Before, both ran and mixed their outputs (and the summary listed one of them).
    """
    import subprocess
    import sys

    run, data = trained
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from lowdose_toolkit.core.lock import folder_lock\n"
         f"with folder_lock({str(out)!r}, 'ldt infer', 'wait', '.ldt-infer.lock'):\n"
         "    print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        volume = str(data / "sub00" / "drf_004.nii.gz")
        assert main(["infer", str(run), volume, "--out", str(out)]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert (f"error: {out} is in use by another ldt infer (pid {holder.pid}); wait for it or choose another "
                "--out") in err
        assert sorted(p.name for p in out.iterdir()) == [".ldt-infer.lock"]
    finally:
        holder.communicate("")
    assert not (out / ".ldt-infer.lock").exists()
    assert main(["infer", str(run), volume, "--out", str(out)]) == 0


def test_the_lock_is_exclusive_in_one_process_too(tmp_path: Path) -> None:
    from lowdose_toolkit.core.lock import folder_lock
    from lowdose_toolkit.errors import UserError

    with folder_lock(tmp_path, "ldt infer", "wait for it", "x.lock") as path:
        assert path.read_text() == f"{__import__('os').getpid()}\n"
        with pytest.raises(UserError, match=r"is in use by another ldt infer \(pid \d+\); wait for it$"):
            with folder_lock(tmp_path, "ldt infer", "wait for it", "x.lock"):
                pass
    with folder_lock(tmp_path, "ldt infer", "wait for it", "x.lock"):  # free again
        pass
    assert not (tmp_path / "x.lock").exists()


# ------------------------------------------------------------------------------------------------- SUV


@pytest.fixture(scope="module")
def suv_checkpoint(trained: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained checkpoint as if trained with data.normalization: suv (the weights do not mind)."""
    import torch

    run, _ = trained
    ckpt = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    ckpt["normalization"] = {"method": "suv"}
    path = tmp_path_factory.mktemp("suv") / "suv.pt"
    torch.save(ckpt, path)
    return path


def test_suv_checkpoint_takes_the_factor_from_each_input(trained: tuple[Path, Path], suv_checkpoint: Path,
                                                         tmp_path: Path) -> None:
    """A model trained on SUV: the factor from --suv-factor, a JSON sidecar, a manifest or a DICOM header.

    Before, infer never supplied one: every volume failed (normalization 'suv' needs the SUV factor).
    """
    import json

    from badinputs import good_series

    from lowdose_toolkit.data.prepare import suv_from_dicom

    run, data = trained
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a_none", "b_sidecar", "c_bad_sidecar", "d_implausible"):
        shutil.copy(data / "sub01" / "drf_100.nii.gz", inputs / f"{name}.nii.gz")
    write(inputs / "b_sidecar.json", json.dumps({"suv_factor": 2.5e-4, "Modality": "PT"}))
    write(inputs / "c_bad_sidecar.json", "{suv_factor: 2.5e-4}")
    write(inputs / "d_implausible.json", '{"suv_factor": 4000}')
    series = good_series(inputs / "e_dicom")
    out = tmp_path / "out"
    assert main(["infer", str(suv_checkpoint), str(inputs), "--out", str(out)]) == 1
    rows = summary(out)
    assert [r["status"] for r in rows.values()] == ["failed", "ok", "failed", "failed", "ok"]
    assert rows["a_none.nii.gz"]["error"] == (
        f"{inputs / 'a_none.nii.gz'}: the checkpoint was trained on SUV (data.normalization: suv) and this input's "
        "SUV factor is unknown (no sidecar a_none.json with a suv_factor); give it with --suv-factor X (X = body "
        "weight in g / injected activity in Bq), a manifest's suv_factor column, or a JSON sidecar "
        f"{inputs / 'a_none.json'} holding {{\"suv_factor\": X}}")
    assert rows["b_sidecar.nii.gz"]["suv_factor"] == "0.00025"
    assert rows["c_bad_sidecar.nii.gz"]["error"].startswith(f"{inputs / 'c_bad_sidecar.json'}: not a readable JSON "
                                                            "sidecar (")
    assert rows["d_implausible.nii.gz"]["error"].startswith(f"{inputs / 'd_implausible.json'}: suv_factor 4000 is "
                                                            "not a plausible body weight (g) / injected activity (Bq)")
    assert float(rows["e_dicom"]["suv_factor"]) == pytest.approx(suv_from_dicom(series)["factor"])
    sources = {Path(r["input"]).name: r.get("suv_source") for r in json.loads((out / "summary.json").read_text())[
        "volumes"]}
    assert sources["b_sidecar.nii.gz"] == f"sidecar {inputs / 'b_sidecar.json'}"
    assert sources["e_dicom"].startswith("DICOM header IM")
    # --suv-factor: every input's factor.
    out = tmp_path / "given"
    assert main(["infer", str(suv_checkpoint), str(inputs / "a_none.nii.gz"), "--out", str(out),
                 "--suv-factor", "3e-4"]) == 0
    assert summary(out)["a_none.nii.gz"]["suv_factor"] == "0.0003"
    assert main(["infer", str(suv_checkpoint), str(inputs / "a_none.nii.gz"), "--out", str(out),
                 "--suv-factor", "-1", "--overwrite"]) == 2
    # A manifest's suv_factor column (given on the subject's full-dose row).
    manifest = write(tmp_path / "m" / "list.csv", "subject,drf,path,suv_factor\n"
                     f"sub03,100,{data / 'sub03' / 'drf_100.nii.gz'},\n"
                     f"sub03,full,{data / 'sub03' / 'full.nii.gz'},2e-4\n")
    out = tmp_path / "manifest"
    assert main(["infer", str(suv_checkpoint), str(manifest), "--out", str(out)]) == 0
    assert summary(out)["drf_100.nii.gz"]["suv_factor"] == "0.0002"


def test_consistency_guard_follows_the_recipe_unless_told(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """The checkpoint's eval.consistency applies the guard (the summary gives the share of body voxels it changed,
    summary.json its settings); --no-consistency leaves it off, --consistency puts it on for a model without."""
    import dataclasses
    import json

    from lowdose_toolkit.core.checkpoint import load_checkpoint

    run, data = trained
    ckpt = load_checkpoint(run / "checkpoints" / "best.pt")
    assert ckpt.recipe["eval"]["consistency"] is None
    recipe = {**ckpt.recipe, "eval": {**ckpt.recipe["eval"], "consistency": {"z": 0.2, "sigma_mm": 2.0}}}
    dataclasses.replace(ckpt, recipe=recipe).save(tmp_path / "guarded.pt")  # a tight guard: it acts here
    source = data / "sub00" / "drf_100.nii.gz"
    outputs = {}
    for name, model, flag in (("plain", run, []), ("guarded", tmp_path / "guarded.pt", []),
                              ("off", tmp_path / "guarded.pt", ["--no-consistency"]),
                              ("on", run, ["--consistency"])):
        out = tmp_path / name
        assert main(["infer", str(model), str(source), "--out", str(out), "--no-previews", *flag]) == 0
        outputs[name] = (summary(out)["drf_100.nii.gz"], json.loads((out / "summary.json").read_text()),
                         nib.load(out / "drf_100.nii.gz").get_fdata())
    assert outputs["plain"][0]["consistency"] == "" and outputs["plain"][1]["consistency"] is None
    assert outputs["guarded"][1]["consistency"] == {"z": 0.2, "sigma_mm": 2.0}
    assert 0 < float(outputs["guarded"][0]["consistency"]) < 1
    assert outputs["on"][1]["consistency"] == {"z": 3.0, "sigma_mm": 3.0} and outputs["on"][0]["consistency"] != ""
    plain, guarded, off = outputs["plain"][2], outputs["guarded"][2], outputs["off"][2]
    np.testing.assert_array_equal(off, plain)  # --no-consistency: the model's own output
    low = nib.load(source).get_fdata()
    # The guard gives local means back towards the input: the guarded output is nearer to it.
    assert not np.array_equal(guarded, plain) and np.abs(guarded - low).mean() < np.abs(plain - low).mean()


def test_dicom_series_found_whatever_their_files_are_named(tmp_path: Path) -> None:
    """Series whose files are named by UID (PACS exports) or written without the DICOM preamble are inputs, alone
    or in a folder of series (they were 'no NIfTI files or DICOM series', or silently left out of the folder)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from test_uldp import activity, write_series

    from lowdose_toolkit.cli.infer import find_inputs
    from lowdose_toolkit.data.io import load_array
    from lowdose_toolkit.data.prepare import suv_from_dicom
    from lowdose_toolkit.errors import UserError

    scans = tmp_path / "scans"
    write_series(scans / "a_named", activity(1))
    write_series(scans / "b_uid", activity(2))
    for k, path in enumerate(sorted((scans / "b_uid").iterdir())):
        path.rename(path.with_name(f"1.3.12.2.1107.5.1.4.{k}.30000024010209"))
    write_series(scans / "c_raw", activity(3))
    for path in (scans / "c_raw").iterdir():
        ds = pydicom.dcmread(path)
        ds.preamble, ds.file_meta = None, FileMetaDataset()
        pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
        assert path.read_bytes()[128:132] != b"DICM"
    assert [v.path.name for v in find_inputs([str(scans)]).volumes] == ["a_named", "b_uid", "c_raw"]
    for name in ("b_uid", "c_raw"):
        assert [v.path.name for v in find_inputs([str(scans / name)]).volumes] == [name]
        assert load_array(scans / name)[0].shape == load_array(scans / "a_named")[0].shape
        assert suv_from_dicom(scans / name)["factor"] == pytest.approx(suv_from_dicom(scans / "a_named")["factor"])
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README").write_text("not a scan")
    with pytest.raises(UserError, match="the folder holds no NIfTI files or DICOM series"):
        find_inputs([str(tmp_path / "notes")])


def test_names_a_batch_meets_on_real_disks(trained: tuple[Path, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A file name that is not UTF-8 (Latin-1 on a Linux disk) gets its outputs and the summary (the summary
    failed to write: 'internal error: UnicodeEncodeError', no summary.csv); a name with brackets is a file, not a
    pattern; an --out that cannot be written is one line naming it (exit 2), not an internal error."""
    import json
    import os

    run, data = trained
    inputs = tmp_path / "in"
    inputs.mkdir()
    latin1 = inputs / os.fsdecode(b"scan_\xe9t\xe9.nii.gz")
    shutil.copy(data / "sub00" / "drf_100.nii.gz", latin1)
    bracket = tmp_path / "PET [AC].nii.gz"
    shutil.copy(data / "sub01" / "drf_004.nii.gz", bracket)
    out = tmp_path / "out"
    assert main(["infer", str(run), str(inputs), str(bracket), "--out", str(out), "--no-previews"]) == 0
    assert (out / latin1.name).is_file() and (out / bracket.name).is_file()
    assert os.fsencode(latin1.name) in (out / "summary.csv").read_bytes()
    volumes = json.loads((out / "summary.json").read_text())["volumes"]
    assert [v["input"] for v in volumes] == [str(latin1), str(bracket)] and {v["status"] for v in volumes} == {"ok"}
    assert main(["infer", str(run), str(inputs), "--out", str(out), "--skip-existing", "--no-previews"]) == 0
    assert json.loads((out / "summary.json").read_text())["volumes"][0]["status"] == "skipped"
    (inputs / "moved.nii.gz").symlink_to(tmp_path / "gone.nii.gz")  # a link whose scan was moved away
    assert main(["infer", str(run), str(inputs), "--out", str(tmp_path / "out2"), "--no-previews"]) == 1
    rows = {Path(r["input"]).name: r for r in csv.DictReader((tmp_path / "out2" / "summary.csv").open(
        encoding="utf-8", errors="surrogateescape"))}
    assert rows["moved.nii.gz"]["status"] == "failed" and "gone.nii.gz" in rows["moved.nii.gz"]["error"]
    capsys.readouterr()
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way")
    assert main(["infer", str(run), str(bracket), "--out", str(blocker / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{blocker / 'out'}: Not a directory; a file is in the way of a folder" in " ".join(err.split())
    assert "internal error" not in err
