"""A corpus of bad inputs, shared by the tests: each entry writes one bad input and says what its error must say.

Add an entry for every bug a bad input revealed; the tests that use a list run every entry in it
(tests/test_badinputs.py for DICOM). Makers write under the folder they are given and return it.

* ``BAD_DICOM_SERIES``: series folders the DICOM reader refuses (``io.check_dicom_series``).
* ``BAD_SUV_HEADERS``: geometrically sound PET series whose SUV header cannot be true
  (``prepare.suv_from_dicom``).
* ``crafted_checkpoint``: a ``.pt`` file that runs code when unpickled without ``weights_only``.
* ``BAD_NIFTI``: NIfTI files ``ldt infer`` fails one at a time (``make`` returns the file); ``error``
  matches that volume's summary row.
* ``degenerate_affine_nifti``: a readable volume whose sform cannot be oriented (no preview can be drawn).
* ``nan_weights_checkpoint``: a real checkpoint whose weights are NaN (a diverged training).
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
from pydicom.uid import generate_uid
from test_uldp import SPACING, activity, write_series


@dataclass(frozen=True)
class BadInput:
    """One bad input: ``make(folder)`` writes it and returns its path; its error matches ``error`` (regex)."""

    name: str
    make: Callable[[Path], Path]
    error: str

    def __repr__(self) -> str:  # the test id
        return self.name


# ------------------------------------------------------------------------------------------ DICOM


def edit_series(folder: Path, change: Callable[[pydicom.Dataset, int], None]) -> Path:
    """Rewrite every file of a series after ``change(dataset, slice_index)`` (index along the normal)."""
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path)
        change(ds, int(ds.InstanceNumber) - 1)
        ds.save_as(path, enforce_file_format=True)
    return folder


def file_of_slice(folder: Path, k: int) -> Path:
    """The file holding slice ``k`` (write_series names files in reverse slice order)."""
    for path in sorted(folder.iterdir()):
        if int(pydicom.dcmread(path, stop_before_pixels=True).InstanceNumber) == k + 1:
            return path
    raise FileNotFoundError(f"{folder}: no slice {k}")


def good_series(folder: Path, seed: int = 1, **tags: str) -> Path:
    """A sound 4-slice PET series (Bq/mL, plausible SUV header); ``tags`` override write_series' header."""
    write_series(folder, activity(seed), tags or None)
    return folder


def _modality(value: str | None) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        def change(ds: pydicom.Dataset, k: int) -> None:
            if value is None:
                del ds.Modality
            else:
                ds.Modality = value

        return edit_series(good_series(folder), change)

    return make


def _missing_slice(folder: Path) -> Path:
    good_series(folder)
    file_of_slice(folder, 1).unlink()  # slices 0, 2, 3 left: a 6 mm gap where slices are 3 mm apart
    return folder


def _duplicate_slice(folder: Path) -> Path:
    good_series(folder)
    ds = pydicom.dcmread(file_of_slice(folder, 2))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()  # a second export of slice 2
    ds.save_as(folder / "copy_of_slice_2.dcm", enforce_file_format=True)
    return folder


def _irregular_spacing(folder: Path) -> Path:
    good_series(folder)
    path = file_of_slice(folder, 2)
    ds = pydicom.dcmread(path)
    iop = [float(v) for v in ds.ImageOrientationPatient]
    position = np.add([float(v) for v in ds.ImagePositionPatient], np.cross(iop[:3], iop[3:]) * 1.2)
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.save_as(path, enforce_file_format=True)  # 1.2 mm off its place: gaps of 4.2 and 1.8 mm
    return folder


def _mixed_series(folder: Path) -> Path:
    good_series(folder)
    other = good_series(folder.with_name(folder.name + "_other"), seed=7)
    for path in sorted(other.iterdir()):
        shutil.move(path, folder / f"B{path.name}")
    other.rmdir()
    return folder


def _mixed_orientation(folder: Path) -> Path:
    good_series(folder)
    path = file_of_slice(folder, 1)
    ds = pydicom.dcmread(path)
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.save_as(path, enforce_file_format=True)
    return folder


def _no_position(folder: Path) -> Path:
    good_series(folder)
    path = file_of_slice(folder, 3)
    ds = pydicom.dcmread(path)
    del ds.ImagePositionPatient
    ds.save_as(path, enforce_file_format=True)
    return folder


def _sheared(folder: Path) -> Path:
    """A gantry-tilted stack: each slice 1 mm further along the column direction (tan 18.4 degrees)."""
    def change(ds: pydicom.Dataset, k: int) -> None:
        iop = [float(v) for v in ds.ImageOrientationPatient]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in np.add([float(v) for v in ds.ImagePositionPatient],
                                                                np.multiply(iop[3:], 1.0 * k))]

    return edit_series(good_series(folder), change)


def _multi_frame(folder: Path) -> Path:
    """An Enhanced PET file: the four slices as frames of one file."""
    good_series(folder)
    files = sorted(folder.iterdir())
    ds = pydicom.dcmread(files[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.130"
    ds.NumberOfFrames = len(files)
    ds.PixelData = b"".join(pydicom.dcmread(f).PixelData for f in files)
    for f in files:
        f.unlink()
    ds.save_as(folder / "EPET.dcm", enforce_file_format=True)
    return folder


_S = SPACING[2]
BAD_DICOM_SERIES: list[BadInput] = [
    BadInput("ct_series", _modality("CT"), r"Modality 'CT' where PET \('PT'\) is expected \(4 of 4 files"),
    BadInput("no_modality", _modality(None), r"no Modality where PET \('PT'\) is expected"),
    BadInput("missing_slice", _missing_slice,
             rf"1 missing slice: IM\d+\.dcm .* are {2 * _S:g} mm apart where slices are {_S:g} mm apart; add the"),
    BadInput("duplicate_slice", _duplicate_slice,
             r"duplicate slices: (IM0001\.dcm and copy_of_slice_2\.dcm|copy_of_slice_2\.dcm and IM0001\.dcm) are "
             r"both at .* \(1 duplicate among 5 files\); remove the extra files"),
    BadInput("irregular_spacing", _irregular_spacing,
             rf"irregular slice spacing: .* are (4\.2|1\.8) mm apart .* where the other slices are {_S:g} mm apart"),
    BadInput("mixed_series", _mixed_series,
             r"holds 2 DICOM series mixed in one folder \(4 files of series [\d.]+ \(e\.g\. B?IM0000\.dcm\); "
             r"4 files of series .*put each series \(SeriesInstanceUID\) in its own folder"),
    BadInput("mixed_orientation", _mixed_orientation,
             r"ImageOrientationPatient \(.*\) differs from IM\d+\.dcm's \(.*\); the folder mixes differently "
             r"oriented slices, keep one series per folder"),
    BadInput("no_position", _no_position, r"IM0000\.dcm: no ImagePositionPatient, so the slice cannot be placed"),
    BadInput("gantry_tilt", _sheared,
             r"sheared slice stack \(a gantry tilt of 18\.4 degrees\): IM0000\.dcm sits 3 mm off the slice normal "
             r"through IM0003\.dcm, more than half a pixel \(0\.75 mm\).*dcm2niix corrects gantry tilt"),
    BadInput("multi_frame", _multi_frame,
             r"EPET\.dcm: a multi-frame PET file \(4 frames, SOP class '1\.2\.840\.10008\.5\.1\.4\.1\.1\.130'\); "
             r"ldt reads PET Image Storage, one slice per file"),
]


def _header(**tags: str) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        with warnings.catch_warnings():  # pydicom warns while writing an invalid date or time: that's the point
            warnings.simplefilter("ignore", UserWarning)
            return good_series(folder, **tags)

    return make


# write_series' header: scan (series) start 2024-01-02 10:15:00, injection 09:15:00, F-18 (6586.2 s).
BAD_SUV_HEADERS: list[BadInput] = [
    BadInput("zero_series_date", _header(SeriesDate="00000000", AcquisitionDate="00000000"),
             r"SeriesDate is '00000000', not a valid date \(YYYYMMDD\); correct the DICOM header"),
    BadInput("zero_injection_datetime", _header(injection_dt="00000000091500"),
             r"RadiopharmaceuticalStartDateTime is '00000000091500', not a valid date and time"),
    BadInput("bad_series_time", _header(SeriesTime="256000"), r"SeriesTime is '256000', not a valid time"),
    BadInput("injection_90_days_before", _header(injection_dt="20231004101500"),  # today: ZeroDivisionError
             r"the injection \(2023-10-04T10:15:00, .*\) is 90\.0 days before the scan start \(2024-01-02T10:15:00"
             r".*: 1\.18e\+03 half-lives of 6586\.2 s, more than the 5 a PET scan allows"),
    BadInput("injection_30_days_before", _header(injection_dt="20231203101500"),  # today: a factor of 6e114
             r"is 30\.0 days before the scan start .*: 394 half-lives"),
    BadInput("injection_after_scan", _header(injection_dt="20240102111500"),
             r"the injection \(2024-01-02T11:15:00, from RadiopharmaceuticalStartDateTime\) is 60 min after the "
             r"scan start"),
    BadInput("injection_time_after_scan_time", _header(injection="102000"),  # a clock 5 min off: "the day before"
             r"the injection \(2024-01-01T10:20:00, from RadiopharmaceuticalStartTime, taken as the day before the "
             r"scan \(later than its time\)\) is 23\.9 h before the scan start"),
    BadInput("weight_in_grams", _header(PatientWeight="72500"),
             r"PatientWeight is '72500' kg, outside the plausible 0\.01-500 kg \(grams written as kilograms\?\)"),
    BadInput("dose_in_mbq", _header(dose="350"),
             r"RadionuclideTotalDose is '350' Bq, outside the plausible 1e\+06-2e\+10 Bq"),
]


# ------------------------------------------------------------------------------------------ checkpoints


class _RunsCode:
    """Unpickled, this creates the folder ``marker``: a stand-in for any code a crafted file could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Callable[[str], None], tuple[str]]:
        return os.mkdir, (self.marker,)


def crafted_checkpoint(path: Path, marker: Path, like: dict | None = None) -> Path:
    """A checkpoint-shaped ``.pt`` (``like``'s keys, e.g. a real checkpoint's) carrying a code payload."""
    payload = dict(like or {"format": 1, "recipe": {}})
    payload["model"] = {"weight": torch.zeros(2), "hook": _RunsCode(marker)}
    torch.save(payload, path)
    return path


# ------------------------------------------------------------------------------------------ NIfTI


def _nifti(name: str, data: np.ndarray, affine: np.ndarray | None = None) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        import nibabel as nib

        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, np.diag([4.0, 4.0, 4.0, 1.0]) if affine is None else affine), path)
        return path

    return make


def _voxels(nan: int = 0, inf: int = 0) -> np.ndarray:
    """A 20^3 float32 volume of ones whose first ``nan`` voxels are NaN and next ``inf`` voxels Inf."""
    data = np.ones(20**3, dtype=np.float32)
    data[:nan] = np.nan
    data[nan:nan + inf] = np.inf
    return data.reshape(20, 20, 20)


def _truncated(folder: Path) -> Path:
    path = _nifti("truncated", np.random.default_rng(0).random((20, 20, 20), dtype=np.float32))(folder)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # the header whole, half the voxels
    return path


def _huge_header(folder: Path) -> Path:
    """A header declaring 30000^3 float32 voxels (98 TiB) over 40 bytes of data: reading it was a MemoryError."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 30000))
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "huge_header.nii"
    path.write_bytes(header.binaryblock + b"\0" * 4 + np.ones(10, dtype=np.float32).tobytes())
    return path


def _bad_datatype(folder: Path) -> Path:
    """A sound file whose header names datatype code 999, which nibabel does not know (HeaderDataError)."""
    path = _nifti("bad_datatype", np.ones((20, 20, 20), dtype=np.float32))(folder)
    import gzip

    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[70:72] = (999).to_bytes(2, "little")  # the NIfTI-1 header's datatype field
    path.write_bytes(gzip.compress(bytes(raw)))
    return path


def _not_gzip(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "not_gzip.nii.gz"
    path.write_text("subject,drf,path\n")
    return path


BAD_NIFTI: list[BadInput] = [
    BadInput("nan_voxels", _nifti("nan_voxels", _voxels(nan=3)),
             r"nan_voxels\.nii\.gz: 3 NaN and 0 Inf voxels \(of 8000\)"),
    BadInput("inf_voxels", _nifti("inf_voxels", _voxels(inf=2)),
             r"inf_voxels\.nii\.gz: 0 NaN and 2 Inf voxels \(of 8000\)"),
    BadInput("all_zero", _nifti("all_zero", np.zeros((20, 20, 20), dtype=np.float32)),
             r"all_zero\.nii\.gz: empty volume: all 8000 voxels are 0"),
    BadInput("two_volumes", _nifti("two_volumes", np.ones((20, 20, 20, 2), dtype=np.float32)),
             r"two_volumes\.nii\.gz: holds 2 volumes or channels"),
    BadInput("truncated", _truncated, r"truncated\.nii\.gz: unreadable or truncated NIfTI"),
    BadInput("not_gzip", _not_gzip, r"not_gzip\.nii\.gz: unreadable NIfTI header"),
    BadInput("bad_datatype", _bad_datatype,
             r"bad_datatype\.nii\.gz: unreadable NIfTI header \(HeaderDataError: data code 999"),
    BadInput("huge_header", _huge_header,
             r"huge_header\.nii: needs about 393 TiB of memory \(30000x30000x30000 float32 voxels: 98\.2 TiB to read "
             r"plus 3 float32 working copies of 98\.2 TiB\) but .* is available; free memory"),
]


def degenerate_affine_nifti(path: Path) -> Path:
    """A sound volume whose sform has a zero column: nibabel cannot orient it (OrientationError)."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape((16, 16, 16))
    header.set_data_dtype(np.float32)
    header.set_qform(np.eye(4), code=0)
    header["sform_code"] = 1
    header["srow_x"], header["srow_y"], header["srow_z"] = [4, 0, 0, 0], [0, 0, 0, 0], [0, 0, 4, 0]
    data = np.random.default_rng(1).poisson(50, size=(16, 16, 16)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, None, header=header), path)
    return path


def nan_weights_checkpoint(source: Path, path: Path) -> Path:
    """A copy of the checkpoint ``source`` with every floating-point weight of its model NaN."""
    ckpt = torch.load(source, weights_only=True)
    ckpt["model"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                     for k, v in ckpt["model"].items()}
    torch.save(ckpt, path)
    return path
