"""The challenge's DICOM release: series geometry and values, SUV factor, uldp source, ldt prepare uldp."""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

pydicom = pytest.importorskip("pydicom")
from conftest import snapshot  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from ldt_plugins.sources.nifti import NiftiSource  # noqa: E402
from ldt_plugins.sources.uldp import UldpSource  # noqa: E402
from lowdose_toolkit.data import io  # noqa: E402
from lowdose_toolkit.data.prepare import parse_dose_folder, prepare_uldp, suv_from_dicom  # noqa: E402
from lowdose_toolkit.errors import DataError  # noqa: E402

PET_STORAGE = "1.2.840.10008.5.1.4.1.1.128"
SHAPE_KJI = (4, 5, 6)  # slices, rows, columns
SPACING = (1.5, 2.0, 3.0)  # column spacing (i), row spacing (j), slice spacing (k)
ORIGIN = (-120.0, -95.5, 310.25)  # LPS position of the first voxel
A = 0.25
ROW_DIR = (math.cos(A), math.sin(A), 0.0)  # oblique: rotated about the z axis
COL_DIR = (-math.sin(A), math.cos(A), 0.0)
HALF_LIFE = 6586.2
SUV_TAGS = {
    "PatientWeight": "72.5",
    "Units": "BQML",
    "DecayCorrection": "START",
    "SeriesDate": "20240102",
    "SeriesTime": "101500.000000",
    "AcquisitionDate": "20240102",
    "AcquisitionTime": "101512.500000",
    "dose": "3.5e8",
    "injection": "091500.00",
}


def expected_affine() -> np.ndarray:
    """Voxel (i=column, j=row, k=slice) -> RAS+ mm, written out by hand from the DICOM tags."""
    normal = np.cross(ROW_DIR, COL_DIR)
    lps = np.eye(4)
    lps[:3, 0] = np.multiply(ROW_DIR, SPACING[0])
    lps[:3, 1] = np.multiply(COL_DIR, SPACING[1])
    lps[:3, 2] = normal * SPACING[2]
    lps[:3, 3] = ORIGIN
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def activity(seed: int) -> np.ndarray:
    """A [K, J, I] activity volume in Bq/mL; slice 0 stays below 30000 so its slope can be 1."""
    rng = np.random.default_rng(seed)
    vol = rng.random(SHAPE_KJI) * np.array([25000.0, 60000.0, 5000.0, 90000.0])[:, None, None]
    return vol.astype(np.float32) + 1.0


def write_series(folder: Path, volume: np.ndarray, tags: dict[str, str] | None = None) -> list[float]:
    """Write one PET slice per file (names shuffled), each with its own RescaleSlope; return the slopes."""
    tags = {**SUV_TAGS, **(tags or {})}
    folder.mkdir(parents=True, exist_ok=True)
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    normal = np.cross(ROW_DIR, COL_DIR)
    slopes = []
    for k in range(volume.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = PET_STORAGE
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = PET_STORAGE, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientName, ds.PatientID = "PT", "Anon", "anon"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.6f}" for v in np.add(ORIGIN, normal * SPACING[2] * k)]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*ROW_DIR, *COL_DIR)]
        ds.PixelSpacing = [str(SPACING[1]), str(SPACING[0])]  # row spacing, column spacing
        ds.SliceThickness = str(SPACING[2])
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        peak = float(volume[k].max())
        slope = 1.0 if peak < 30000 else peak / 32000  # like scanners: per-slice slopes
        slopes.append(slope)
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", "0"
        ds.PixelData = np.round(volume[k] / slope).astype(np.int16).tobytes()
        for key in ("PatientWeight", "Units", "DecayCorrection", "SeriesDate", "SeriesTime"):
            if tags.get(key):
                setattr(ds, key, tags[key])
        ds.AcquisitionDate, ds.AcquisitionTime = tags["AcquisitionDate"], tags["AcquisitionTime"]
        rph = Dataset()
        rph.RadionuclideTotalDose = tags["dose"]
        rph.RadionuclideHalfLife = str(HALF_LIFE)
        rph.RadiopharmaceuticalStartTime = tags["injection"]
        if tags.get("injection_dt"):
            rph.RadiopharmaceuticalStartDateTime = tags["injection_dt"]
        ds.RadiopharmaceuticalInformationSequence = Sequence([rph])
        ds.save_as(folder / f"IM{volume.shape[0] - 1 - k:04d}.dcm", enforce_file_format=True)
    return slopes


QUADRA = {"Full_dose": 0, "1-2 dose": 2, "1-4 dose": 4, "1-10 dose": 10, "1-100 dose": 100}
UEXPLORER = {
    "2.886 x 600 WB NORMAL": 0,
    "2.886 x 600 WB DRF_4": 4,
    "2.886 x 600 WB DRF_10": 10,
    "2.886 x 600 WB DRF_100": 100,
}


def release(root: Path) -> Path:
    """A two-subject release: one Quadra-style, one uEXPLORER-style (nested one level deeper)."""
    for name, drf in QUADRA.items():
        write_series(root / "Anonymous_01" / name, activity(drf + 1))
    for name, drf in UEXPLORER.items():
        write_series(root / "Patient_02" / "study" / name, activity(drf + 2))
    return root


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return release(tmp_path_factory.mktemp("uldp") / "release")


def test_parse_dose_folder() -> None:
    names = ["Full_dose", "full dose", "1-2 dose", "1-4 dose", "1-100 dose", "WB DRF_4", "x drf-100", "WB NORMAL"]
    assert [parse_dose_folder(n) for n in names] == ["full", "full", 2, 4, 100, 4, 100, "full"]
    assert [parse_dose_folder(n) for n in ["CT", "abnormal", "AC_CT 1.5"]] == [None, None, None]


def test_dicom_series_geometry_and_values(src: Path) -> None:
    folder = src / "Anonymous_01" / "1-4 dose"
    tensor, affine, info = io.load_array(folder)
    truth = activity(5).transpose(2, 1, 0)  # [K, J, I] -> [I, J, K]
    assert tensor.shape == (1, 6, 5, 4) and tensor.dtype == torch.float32 and info.format == "dicom"
    slopes = np.array([1.0, 60000 / 32000, 1.0, 90000 / 32000])  # upper bounds of the per-slice slopes
    assert (np.abs(tensor[0].numpy() - truth) <= slopes[None, None, :] / 2 + 1e-3).all()
    assert np.allclose(affine, expected_affine(), atol=1e-5)
    assert np.allclose(info.spacing, SPACING, atol=1e-6)
    image = io.read_image(folder)  # lazy ScalarImage with the same reader
    assert torch.equal(image.data, tensor) and np.array_equal(image.affine, affine)


def test_suv_factor(src: Path, tmp_path: Path) -> None:
    info = suv_from_dicom(src / "Anonymous_01" / "Full_dose")
    decayed = 3.5e8 * 2 ** (-3600.0 / HALF_LIFE)  # injected 09:15, series start 10:15
    assert info["factor"] == pytest.approx(72500.0 / decayed, rel=1e-12)
    assert info["scan_time_source"] == "SeriesDate/Time" and info["elapsed_s"] == pytest.approx(3600.0)

    cases = {
        "admin": ({"DecayCorrection": "ADMIN"}, 72500.0 / 3.5e8),
        "datetime": ({"injection_dt": "20240102094500.000000+0100"}, 72500.0 / (3.5e8 * 2 ** (-1800 / HALF_LIFE))),
        "overnight": (
            {"SeriesTime": "003000", "AcquisitionTime": "003000", "injection": "233000"},
            72500.0 / (3.5e8 * 2 ** (-3600 / HALF_LIFE)),
        ),
        "acquisition earlier": ({"SeriesTime": "120000"}, 72500.0 / (3.5e8 * 2 ** (-3612.5 / HALF_LIFE))),
        "counts": ({"Units": "CNTS"}, None),
        "no weight": ({"PatientWeight": ""}, None),
    }
    for name, (tags, factor) in cases.items():
        folder = tmp_path / name
        write_series(folder, activity(0)[:1], tags)
        got = suv_from_dicom(folder)
        if factor is None:
            assert got["factor"] is None and got["reason"], name
        else:
            assert got["factor"] == pytest.approx(factor, rel=1e-12), name
    assert "not BQML" in suv_from_dicom(tmp_path / "counts")["reason"]


def test_suv_reads_the_series_not_the_first_file_by_name(tmp_path: Path) -> None:
    """A multi-bed series re-created after the scan (SeriesTime 11:30) starts at its earliest AcquisitionTime,
    whichever file has it (here not the first by name: it was the last bed's, 3 % off); a DICOMDIR beside the
    slices (sorted first) is not read as the series' header."""
    import pydicom

    folder = tmp_path / "PET"
    write_series(folder, activity(0), {"SeriesTime": "113000"})
    for path in folder.iterdir():  # slices 0-1 (files IM0002-3) bed 1 at 10:15, slices 2-3 bed 2 at 10:20
        ds = pydicom.dcmread(path)
        ds.AcquisitionTime = "101500" if int(ds.InstanceNumber) <= 2 else "102000"
        ds.save_as(path, enforce_file_format=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.1.3.10", generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dicomdir = Dataset()
    dicomdir.file_meta, dicomdir.FileSetID = meta, "EXPORT"
    dicomdir.save_as(folder / "DICOMDIR", enforce_file_format=True)
    info = suv_from_dicom(folder)
    assert info["factor"] == pytest.approx(72500.0 / (3.5e8 * 2 ** (-3600.0 / HALF_LIFE)), rel=1e-12)
    assert info["scan_time"] == "2024-01-02T10:15:00" and info["file"].startswith("IM")
    assert info["scan_time_source"] == "AcquisitionDate/Time of IM0003.dcm (the series' earliest)"


def test_uldp_source_both_layouts(src: Path) -> None:
    before = snapshot(src)
    recs = UldpSource(str(src), drfs=[4, 10, 100]).records()
    assert [r.subject for r in recs] == ["Anonymous_01", "Patient_02"]
    quadra, explorer = recs
    assert quadra.full.name == "Full_dose" and quadra.low[10].name == "1-10 dose"
    assert explorer.full.name == "2.886 x 600 WB NORMAL" and explorer.low[4].name == "2.886 x 600 WB DRF_4"
    assert (quadra.meta["style"], explorer.meta["style"]) == ("quadra", "uexplorer")
    assert quadra.suv_factor == pytest.approx(72500.0 / (3.5e8 * 2 ** (-3600.0 / HALF_LIFE)))
    assert sorted(UldpSource(str(src)).records()[0].low) == [2, 4, 10, 100]
    with pytest.raises(DataError, match=r"Patient_02: subject 'Patient_02' has no DRF 2 series .*'1-2 dose'"):
        UldpSource(str(src), drfs=[2, 4]).records()
    with pytest.warns(UserWarning, match=r"uldp: skipping subject 'Patient_02': .* has no DRF 2 series"):
        assert [r.subject for r in UldpSource(str(src), drfs=[2], skip_bad=True).records()] == ["Anonymous_01"]
    assert snapshot(src) == before


def test_uldp_source_geometry_mismatch(tmp_path: Path) -> None:
    write_series(tmp_path / "s" / "Full_dose", activity(1))
    write_series(tmp_path / "s" / "1-4 dose", activity(2)[:3])
    with pytest.raises(DataError, match=r"1-4 dose and .*Full_dose differ in shape: \(6, 5, 3\) vs \(6, 5, 4\)"):
        UldpSource(str(tmp_path), drfs=[4]).records()  # a single subject folder may be the root


def test_prepare_uldp(src: Path, tmp_path: Path) -> None:
    before = snapshot(src)
    out = tmp_path / "prepared"
    manifest = prepare_uldp(src, out)
    assert manifest == out / "manifest.csv"
    assert sorted(p.name for p in (out / "Anonymous_01").iterdir()) == [
        "drf_002.nii.gz",
        "drf_004.nii.gz",
        "drf_010.nii.gz",
        "drf_100.nii.gz",
        "full.nii.gz",
    ]
    record = json.loads((out / "prepare.json").read_text())
    assert record["status"] == "complete" and record["tool"] == "ldt prepare uldp"
    entry = record["subjects"]["Patient_02"]
    assert entry["files"]["4"]["source"] == "Patient_02/study/2.886 x 600 WB DRF_4"
    assert entry["suv"]["decay_correction"] == "START" and entry["suv"]["units"] == "BQML"

    recs = NiftiSource(str(out), drfs=[4, 10, 100]).records()
    assert [r.subject for r in recs] == ["Anonymous_01", "Patient_02"]
    assert recs[0].suv_factor == pytest.approx(72500.0 / (3.5e8 * 2 ** (-3600.0 / HALF_LIFE)), rel=1e-12)
    # Same voxels and the same physical grid as the DICOM series, by our reader and by SimpleITK's.
    for dicom, nifti in [
        (src / "Anonymous_01/1-10 dose", recs[0].low[10]),
        (src / "Patient_02/study/2.886 x 600 WB NORMAL", recs[1].full),
    ]:
        d_tensor, d_affine, _ = io.load_array(dicom)
        n_tensor, n_affine, _ = io.load_array(nifti)
        assert torch.equal(d_tensor, n_tensor) and np.allclose(d_affine, n_affine, atol=1e-4)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(dicom)))
        a, b = reader.Execute(), sitk.ReadImage(str(nifti))
        assert np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
        assert np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
        assert np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)
    assert nib.load(recs[0].full).header["sform_code"] == 1
    assert snapshot(src) == before

    # A second run resumes: unchanged subjects are not rewritten.
    stamp = (out / "Anonymous_01" / "full.nii.gz").stat().st_mtime_ns
    prepare_uldp(src, out)
    assert (out / "Anonymous_01" / "full.nii.gz").stat().st_mtime_ns == stamp


def test_prepare_refuses_unsafe_outputs(src: Path, tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"busy: not empty and not an earlier `ldt prepare uldp` output"):
        prepare_uldp(src, busy)
    with pytest.raises(DataError, match=r"OUT is inside SRC"):
        prepare_uldp(src, src / "Anonymous_01" / "out")
    assert not (src / "Anonymous_01" / "out").exists()
    with pytest.raises(DataError, match=r"nowhere: SRC is not a folder"):
        prepare_uldp(tmp_path / "nowhere", tmp_path / "o")


def test_prepare_skip_bad_and_command(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from lowdose_toolkit.cli.prepare import prepare_app

    src = tmp_path / "src"
    write_series(src / "good" / "Full_dose", activity(1))
    write_series(src / "good" / "1-4 dose", activity(2))
    write_series(src / "bad" / "Full_dose", activity(3))
    with pytest.raises(DataError, match=r"bad: subject 'bad' has no DRF 4 series"):
        prepare_uldp(src, tmp_path / "strict", drfs=[4])
    assert json.loads((tmp_path / "strict" / "prepare.json").read_text())["status"] == "incomplete"
    with pytest.warns(UserWarning, match="skipping subject 'bad'"):  # an interrupted output may be resumed
        prepare_uldp(src, tmp_path / "strict", drfs=[4], skip_bad=True)

    app = typer.Typer()
    app.add_typer(prepare_app, name="prepare")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["prepare", "uldp", str(src), str(out), "--drfs", "4", "--skip-bad"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "skipping subject 'bad'" in text and "(1 subject, 1 skipped)" in text
    assert [r.split(",")[:2] for r in (out / "manifest.csv").read_text().splitlines()[1:]] == [
        ["good", "full"],
        ["good", "4"],
    ]
    result = CliRunner().invoke(app, ["prepare", "uldp", str(src), str(out), "--drfs", "four"])
    assert result.exit_code == 2 and "comma-separated integers" in result.output
    assert datetime.fromisoformat(json.loads((out / "prepare.json").read_text())["finished"])
