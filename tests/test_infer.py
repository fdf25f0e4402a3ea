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
    assert sorted(p.name for p in (tmp_path / "o").glob("*.nii.gz")) == ["drf_100.nii.gz"]


def test_dicom_series_input(trained: tuple[Path, Path], tmp_path: Path) -> None:
    from test_uldp import activity, write_series

    run, _ = trained
    series = tmp_path / "scan" / "PET_DRF_100"
    write_series(series, activity(3))
    out = tmp_path / "out"
    assert main(["infer", str(run), str(series), "--out", str(out)]) == 0
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
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["a_good.nii.gz"]


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
    """Ctrl-C during the second volume: exit 130, the first output complete, no temporary file left."""
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
    assert "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["a.nii.gz", "a.png"]
    np.testing.assert_array_equal(nib.load(out / "a.nii.gz").shape, nib.load(inputs / "a.nii.gz").shape)


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
