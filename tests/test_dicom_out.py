"""DICOM out: a prediction written as a new PET series, read back by pydicom, ldt's reader and dcm2niix."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from badinputs import edit_series
from test_uldp import activity, write_series

from lowdose_toolkit import __version__
from lowdose_toolkit.data.dicom_out import Derivation, quantise, save_dicom_like
from lowdose_toolkit.data.io import load_array
from lowdose_toolkit.data.prepare import suv_from_dicom
from lowdose_toolkit.errors import DataError

IDENTITY = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
            "StudyTime", "StudyID", "AccessionNumber", "FrameOfReferenceUID", "SeriesDate", "SeriesTime",
            "AcquisitionDate", "AcquisitionTime", "Modality", "SOPClassUID", "Manufacturer")
PER_SLICE = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "Rows", "Columns",
             "InstanceNumber", "Units", "DecayCorrection", "PatientWeight", "RadiopharmaceuticalInformationSequence")
MADE_BY = Derivation("tiny", "mlnet", "best.pt (epoch 1)", note="predicted DRF 100 (97%)")


def digest(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` with the SHA-256 of its bytes, and its mtime (to prove nothing was written)."""
    return {str(p.relative_to(folder)): f"{hashlib.sha256(p.read_bytes()).hexdigest()} {p.stat().st_mtime_ns}"
            for p in sorted(folder.rglob("*")) if p.is_file()}


def pet_series(folder: Path, seed: int = 3) -> Path:
    """write_series' oblique PET series (per-slice slopes) with a fuller identity and a private tag."""
    write_series(folder, activity(seed))

    def change(ds: pydicom.Dataset, k: int) -> None:
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Doe^Jane", "P-0042", "19600101", "F"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240102", "100000", "7", "ACC-1"
        ds.Manufacturer, ds.SeriesDescription, ds.SeriesNumber = "SIEMENS", "PET WB 1-4 dose", 4
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.add_new(0x00710010, "LO", "SOME VENDOR")  # a private creator and a private scale factor
        ds.add_new(0x00711001, "DS", "0.25")

    return edit_series(folder, change)


def by_position(folder: Path) -> list[pydicom.Dataset]:
    """A series' files, pixels included, in slice order (along the slice normal)."""
    files = [pydicom.dcmread(p) for p in sorted(folder.iterdir())]
    iop = np.array(files[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    return sorted(files, key=lambda ds: float(np.array(ds.ImagePositionPatient, dtype=float) @ normal))


@pytest.fixture
def written(tmp_path: Path) -> tuple[Path, Path, torch.Tensor]:
    """An input series, the prediction written from it (values of both signs), and that prediction."""
    series = pet_series(tmp_path / "scan" / "PET")
    volume, _, _ = load_array(series)
    rng = np.random.default_rng(0)
    pred = volume * 1.3 - 200.0 + torch.from_numpy(rng.normal(0, 50, volume.shape).astype(np.float32))
    before = digest(series)
    out = save_dicom_like(pred, series, tmp_path / "out" / "PET", MADE_BY)
    assert digest(series) == before  # the input is untouched
    return series, out, pred


def test_series_reads_back_with_pydicom(written: tuple[Path, Path, torch.Tensor]) -> None:
    series, out, pred = written
    src, dst = by_position(series), by_position(out)
    assert len(dst) == len(src) == pred.shape[-1] and sorted(p.name for p in out.iterdir()) == [
        "IM0001.dcm", "IM0002.dcm", "IM0003.dcm", "IM0004.dcm"]
    assert not list(out.parent.glob(".*"))  # no temporary folder left
    uids = {ds.SeriesInstanceUID for ds in dst}
    assert len(uids) == 1 and uids.isdisjoint({ds.SeriesInstanceUID for ds in src})
    sops = [ds.SOPInstanceUID for ds in dst]
    assert len(set(sops)) == len(sops) and set(sops).isdisjoint(ds.SOPInstanceUID for ds in src)
    for k, (a, b) in enumerate(zip(src, dst, strict=True)):
        assert b.file_meta.MediaStorageSOPInstanceUID == b.SOPInstanceUID
        assert b.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        for keyword in (*IDENTITY, *PER_SLICE):
            assert b.get(keyword) == a.get(keyword), (k, keyword)
        assert list(b.ImageType) == ["DERIVED", "SECONDARY"]
        assert b.SourceImageSequence[0].ReferencedSOPInstanceUID == a.SOPInstanceUID
        assert b.SeriesDescription == f"PET WB 1-4 dose denoised (ldt {__version__}, tiny, mlnet)"
        assert b.DerivationDescription == (f"Denoised by lowdose-toolkit {__version__} (ldt infer): model mlnet, "
                                           f"recipe tiny, from best.pt (epoch 1); source series {a.SeriesInstanceUID}; "
                                           "predicted DRF 100 (97%)")
        assert b.SeriesNumber == 1004 and b.ContributingEquipmentSequence[0].SoftwareVersions == __version__
        assert (0x0071, 0x1001) in a and not any(tag.is_private for tag in b.keys())  # private scale factors dropped
        assert (b.BitsAllocated, b.BitsStored, b.PixelRepresentation, float(b.RescaleIntercept)) == (16, 16, 1, 0.0)
        slope = float(b.RescaleSlope)
        truth = pred[0, :, :, k].numpy().T  # [I, J] -> [row, column]
        assert slope == pytest.approx(np.abs(truth).max() / 32767, rel=1e-9)
        values = b.pixel_array * slope + float(b.RescaleIntercept)
        assert np.abs(values - truth).max() <= slope / 2 * (1 + 1e-6), k
    info_in, info_out = suv_from_dicom(series), suv_from_dicom(out)
    assert info_out["factor"] == info_in["factor"] and info_out["scan_time"] == info_in["scan_time"]


def test_series_reads_back_with_ldt_reader(written: tuple[Path, Path, torch.Tensor]) -> None:
    series, out, pred = written
    _, affine_in, _ = load_array(series)
    again, affine_out, info = load_array(out)
    assert info.format == "dicom" and again.shape == pred.shape
    np.testing.assert_allclose(affine_out, affine_in, rtol=0, atol=1e-4)
    slopes = np.array([float(ds.RescaleSlope) for ds in by_position(out)])
    assert (np.abs((again - pred)[0].numpy()) <= slopes / 2 * (1 + 1e-6) + 1e-3).all()


def _dcm2niix() -> str:
    dcm2niix = pytest.importorskip("dcm2niix", reason="the test extra dcm2niix (pip install dcm2niix) is not installed")
    return str(dcm2niix.bin)


def convert(binary: str, series: Path, out: Path) -> nib.Nifti1Image:
    out.mkdir(parents=True)
    done = subprocess.run([binary, "-o", str(out), "-f", "x", "-z", "n", "-b", "n", str(series)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return nib.load(out / "x.nii")


def test_dcm2niix_agrees_on_the_affine(written: tuple[Path, Path, torch.Tensor], tmp_path: Path) -> None:
    """dcm2niix, the converter PET users have, gives the output the input's affine, and the written values."""
    binary = _dcm2niix()
    series, out, pred = written
    theirs_in, theirs_out = convert(binary, series, tmp_path / "n_in"), convert(binary, out, tmp_path / "n_out")
    assert theirs_out.shape == theirs_in.shape == pred.shape[1:]
    np.testing.assert_allclose(theirs_out.affine, theirs_in.affine, rtol=0, atol=1e-4)
    # dcm2niix stores rows bottom-up: its voxels are ldt's up to a flip, and both put each voxel at one place.
    _, ours, _ = load_array(out)
    to_ours = np.linalg.inv(ours) @ theirs_out.affine
    np.testing.assert_allclose(to_ours, np.round(to_ours), atol=1e-4)
    index = np.indices(pred.shape[1:]).reshape(3, -1)
    mapped = np.round(to_ours[:3, :3] @ index + to_ours[:3, 3:]).astype(int)
    values = theirs_out.get_fdata(dtype=np.float32)[tuple(index)]
    slopes = np.array([float(ds.RescaleSlope) for ds in by_position(out)])
    error = np.abs(values - pred[0].numpy()[tuple(mapped)])
    assert (error <= slopes[mapped[2]] / 2 * (1 + 1e-5) + 1e-2).all()


def test_quantise_round_trips_within_half_a_step() -> None:
    rng = np.random.default_rng(1)
    for scale in (1e-30, 1e-3, 1.0, 3e4, 1e30, 3e38):
        plane = (rng.uniform(-1, 1, (7, 5)) * scale).astype(np.float32)
        stored, slope = quantise(plane)
        assert stored.dtype == np.dtype("<i2") and len(slope) <= 16 and float(slope) > 0
        assert np.abs(stored * float(slope) - plane.astype(np.float64)).max() <= float(slope) / 2 * (1 + 1e-9)
        assert np.abs(stored).max() >= 32766  # the peak uses the range
    stored, slope = quantise(np.zeros((3, 3), np.float32))
    assert slope == "1" and not stored.any()


def test_refusals(tmp_path: Path) -> None:
    series = pet_series(tmp_path / "PET")
    volume, _, _ = load_array(series)
    with pytest.raises(DataError, match=r"volume shape \(6, 5, 3\) differs from the series' \(6, 5, 4\) \(columns x "
                                        r"rows x slices\); use the series the prediction was made from"):
        save_dicom_like(volume[..., :3], series, tmp_path / "out")
    with pytest.raises(DataError, match=r"it is inside the input series .*PET; choose another folder"):
        save_dicom_like(volume, series, series / "denoised")
    nifti = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((6, 5, 4), np.float32), np.eye(4)), nifti)
    with pytest.raises(DataError, match=r"x\.nii\.gz: DICOM output needs a DICOM series as its template, not a file"):
        save_dicom_like(volume, nifti, tmp_path / "out")
    bad = volume.clone()
    bad[0, 1, 1, 1] = float("nan")
    with pytest.raises(DataError, match="NaN or Inf voxels"):
        save_dicom_like(bad, series, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_existing_series_is_replaced_whole(written: tuple[Path, Path, torch.Tensor]) -> None:
    series, out, pred = written
    first = {ds.SeriesInstanceUID for ds in by_position(out)}
    (out / "IM0009.dcm").write_bytes(b"left over")
    save_dicom_like(pred * 2, series, out)
    assert sorted(p.name for p in out.iterdir()) == ["IM0001.dcm", "IM0002.dcm", "IM0003.dcm", "IM0004.dcm"]
    assert {ds.SeriesInstanceUID for ds in by_position(out)}.isdisjoint(first)
    assert sorted(p.name for p in out.parent.iterdir()) == ["PET"]
    shutil.rmtree(out)
