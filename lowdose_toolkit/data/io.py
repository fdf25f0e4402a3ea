"""Image IO: NIfTI files and DICOM series in, float32 NIfTI out, the affine untouched.

Axis convention (checked against TorchIO 1.2, nibabel 5 and SimpleITK 2.5):

* A ``torchio.ScalarImage`` tensor is ``[C, I, J, K]`` (TorchIO's docs call it ``C, W, H, D``). The
  three spatial axes are the *file's voxel axes in storage order*, never reoriented or transposed:
  NIfTI's ``i, j, k`` (``i`` fastest on disk); for a DICOM series ``i`` = column, ``j`` = row and
  ``k`` = slice, slices sorted along the slice normal. The voxel order is therefore *not* RAS.
* RAS+ is the world frame: the 4x4 ``affine`` maps ``(i, j, k, 1)`` to RAS+ millimetres. For DICOM
  (LPS) the direction and origin are flipped with ``diag(-1, -1, 1)``, as TorchIO does.
* :func:`load_array` returns that same tensor, ``[1, I, J, K]``. The model contract's
  ``[C, D, H, W]`` only names the three spatial axes; the toolkit never permutes them, so a
  prediction goes back to disk with the input's affine as is.

NIfTI is read with nibabel, not SimpleITK (which TorchIO tries first): nibabel's affine is the
header's own (sform when ``sform_code > 0``, else qform) without ITK's orthonormalisation, so
``read -> save_like -> read`` keeps data and affine bit-exactly. DICOM series are read with
SimpleITK's ``ImageSeriesReader`` with float32 output: left to itself GDCM picks the pixel type
of the first slice, which truncates (or overflows) PET slices that carry their own RescaleSlope.
A prediction goes back to DICOM through :mod:`lowdose_toolkit.data.dicom_out` (a new series).
"""

from __future__ import annotations

import math
import os
import warnings
import zlib
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torchio as tio
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError, HeaderTypeError

from lowdose_toolkit.core.atomic import atomic_path
from lowdose_toolkit.data.naming import is_nifti
from lowdose_toolkit.errors import DataError
from lowdose_toolkit.records import SubjectRecord

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
AFFINE_ATOL = 1e-3  # mm; float32 headers of whole-body scans carry ~1e-4 mm of rounding
PET_MODALITY = "PT"  # the DICOM Modality of PET images; other series are refused
SLICE_TOLERANCE = 0.1  # a slice may sit this fraction of the slice spacing off its regular place
_SERIES_TAGS = ["Modality", "Rows", "Columns", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                "NumberOfFrames", "SOPClassUID"]
_READ_ERRORS = (ImageFileError, HeaderDataError, HeaderTypeError, OSError, EOFError, ValueError, zlib.error)

__all__ = [
    "ImageInfo",
    "check_dicom_series",
    "check_same_geometry",
    "checked_info",
    "declared_volume",
    "dicom_files",
    "is_dicom_folder",
    "is_nifti",
    "mm_per_unit",
    "spatial_units",
    "voxel_spacing",
    "load_array",
    "read_dicom_series",
    "read_image",
    "read_info",
    "read_nifti",
    "save_like",
    "save_nifti",
    "screen_records",
    "validate_image",
    "validate_record",
    "volume_grid",
]


@dataclass(frozen=True)
class ImageInfo:
    """What is known about an image without its voxels (the "header").

    Attributes:
        path: The file or DICOM folder.
        shape: Spatial shape ``(I, J, K)`` in the file's voxel order.
        channels: Volumes/channels in the file (1 for a plain 3D image).
        affine: 4x4 voxel-to-RAS+ (mm) matrix, float64.
        format: ``"nifti"`` or ``"dicom"``.
        dtype: On-disk data type (before scaling).
        units: Spatial units (``"mm"`` for DICOM; the NIfTI ``xyzt_units`` otherwise, or ``"unknown"``).
        qform_code: NIfTI qform code (``None`` for DICOM).
        sform_code: NIfTI sform code (``None`` for DICOM).
    """

    path: Path
    shape: tuple[int, int, int]
    channels: int
    affine: np.ndarray
    format: str
    dtype: str
    units: str = "mm"
    qform_code: int | None = None
    sform_code: int | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along ``i, j, k`` (column norms of the affine, in the header's spatial units)."""
        return voxel_spacing(self.affine, self.units)

    def __repr__(self) -> str:
        sp = tuple(round(s, 4) for s in self.spacing)
        return f"ImageInfo({self.path.name!r}, shape={self.shape}, spacing={sp}, format={self.format!r})"


MM_PER_UNIT = {"meter": 1000.0, "mm": 1.0, "micron": 0.001}  # NIfTI xyzt_units; anything else: mm


def mm_per_unit(units: str) -> float:
    """Millimetres per spatial unit of a NIfTI header (``get_xyzt_units()[0]``); unknown units count as mm,
    as nibabel and most viewers read them."""
    return MM_PER_UNIT.get(units, 1.0)


def voxel_spacing(affine: np.ndarray, units: str = "mm") -> tuple[float, float, float]:
    """The voxel size in mm along ``i, j, k`` of ``affine`` (column norms) in the spatial ``units``."""
    sx, sy, sz = np.sqrt((np.asarray(affine, np.float64)[:3, :3] ** 2).sum(axis=0)) * mm_per_unit(units)
    return float(sx), float(sy), float(sz)


def spatial_units(path: str | os.PathLike[str]) -> str:
    """An image's spatial units from its header alone: a NIfTI's ``xyzt_units``, ``"mm"`` for DICOM."""
    path = Path(path)
    if _kind(path) == "dicom":
        return "mm"
    header = _nifti_header(path)[0].header
    return (header.get_xyzt_units()[0] if hasattr(header, "get_xyzt_units") else "") or "unknown"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _kind(path: Path) -> str:
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; check the path")
    if path.is_dir():
        return "dicom"
    if is_nifti(path):
        return "nifti"
    raise DataError(f"{path}: unsupported image type; expected a .nii/.nii.gz file or a DICOM series folder")


# --------------------------------------------------------------------------------------------- reading


def _nifti_channels(shape: Sequence[int], path: Path) -> tuple[tuple[int, int, int], int]:
    """Split a NIfTI data shape into the spatial shape and the number of volumes/channels."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 3:
        shape = shape + (1,) * (3 - len(shape))
    extra = shape[3:]
    if len(extra) > 2 or (len(extra) == 2 and extra[0] != 1):
        raise DataError(f"{path}: unsupported {len(shape)}D shape {shape}; one 3D volume is expected")
    channels = math.prod(extra) if extra else 1
    return (shape[0], shape[1], shape[2]), channels


def read_nifti(path: str | os.PathLike[str]) -> tuple[torch.Tensor, np.ndarray]:
    """Read a NIfTI file as TorchIO does, but with nibabel: ``([C, I, J, K] float32, affine)``.

    This is the ``reader`` handed to ``tio.ScalarImage``; scaling (``scl_slope``/``scl_inter``) is
    applied. Raises :class:`DataError` naming the file if it is unreadable or truncated.
    """
    path = Path(path)
    try:
        img = nib.load(str(path), mmap=False)  # a private copy, not a view of the file
        spatial, channels = _nifti_channels(img.shape, path)
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except DataError:
        raise
    except _READ_ERRORS as exc:
        raise DataError(
            f"{path}: unreadable or truncated NIfTI ({type(exc).__name__}: {_one_line(exc)}); "
            "re-export or re-download it"
        ) from exc
    data = data.reshape(*spatial, channels)  # (I, J, K[, 1], C) -> (I, J, K, C)
    tensor = torch.from_numpy(np.ascontiguousarray(np.moveaxis(data, -1, 0)))
    return tensor, np.asarray(img.affine, dtype=np.float64)


def is_dicom_folder(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` holds DICOM files, whatever they are named (``IM0001.dcm``, a UID, no extension):
    a visible file with the DICOM preamble, or, in a folder without NIfTI files, one GDCM can read (files
    written without the preamble)."""
    import SimpleITK as sitk

    folder = Path(folder)
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    for path in files:
        try:
            with path.open("rb") as fh:
                if fh.read(132)[128:132] == b"DICM":
                    return True
        except OSError:
            continue
    if not files or any(is_nifti(p) for p in files):
        return False
    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError:  # pragma: no cover - GDCM failing on a folder listing is rare
        return False


def dicom_files(folder: str | os.PathLike[str]) -> list[str]:
    """The files of the one DICOM series in ``folder``, in GDCM's order (not checked: see
    :func:`check_dicom_series`); a DataError naming the folder when it holds none or several."""
    import SimpleITK as sitk

    folder = Path(folder)

    try:
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as exc:  # pragma: no cover - GDCM failing on a folder listing is rare
        raise DataError(f"{folder}: cannot list DICOM series ({_one_line(exc)})") from exc
    if not series:
        raise DataError(f"{folder}: holds no DICOM series; point to a folder of DICOM slice files")
    if len(series) > 1:
        parts = []
        for uid in sorted(series):
            names = sorted(Path(f).name for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
            parts.append(f"{len(names)} file{'s' if len(names) != 1 else ''} of series {uid} (e.g. {names[0]})")
        shown = "; ".join(parts[:3]) + (f"; and {len(parts) - 3} more series" if len(parts) > 3 else "")
        raise DataError(
            f"{folder}: holds {len(series)} DICOM series mixed in one folder ({shown}); "
            "put each series (SeriesInstanceUID) in its own folder"
        )
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))


def _numbers(ds: object, keyword: str, count: int, path: Path) -> np.ndarray | None:
    """A numeric multi-valued DICOM attribute as float64, ``None`` if absent; a DataError if malformed."""
    try:
        value = ds.get(keyword)  # type: ignore[attr-defined]
        if value is None or value == "":
            return None
        if isinstance(value, (str, bytes)):
            items = (value.decode("ascii", "replace") if isinstance(value, bytes) else value).split("\\")
        elif hasattr(value, "__iter__"):
            items = list(value)
        else:
            items = [value]
        numbers = np.array([float(v) for v in items], dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        numbers = np.array([])
    if numbers.shape != (count,) or not np.isfinite(numbers).all():
        raise DataError(
            f"{path}: {keyword} is {_raw(ds, keyword)!r}, not {count} numbers; the file is not a valid image "
            "slice, re-export the series"
        )
    return numbers


def _raw(ds: object, keyword: str) -> str:
    """An attribute's value as written, for messages."""
    try:
        element = ds[keyword]  # type: ignore[index]
        value = element.value
    except Exception:  # noqa: BLE001 - only for a message
        return ""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return str(value)
    return "\\".join(str(v) for v in value)


def _slice_spacing(gaps: np.ndarray) -> float:
    """The regular slice spacing of sorted slice gaps: the gap whose multiples explain the most gaps.

    Each non-zero gap is a candidate; a gap fits a candidate ``c`` when it is ``n * c`` (``n >= 1``)
    within ``SLICE_TOLERANCE * c``. Most fits wins, then most single-step fits (so 3 mm beats 1.5 mm
    for gaps of 3 and 6 mm); the median of the remaining candidates is returned (0 if none).
    """
    moving = gaps[gaps > 1e-6]
    if not moving.size:
        return 0.0
    candidates = np.unique(moving)
    ratio = moving[None, :] / candidates[:, None]
    steps = np.round(ratio)
    fits = (steps >= 1) & (np.abs(ratio - steps) <= SLICE_TOLERANCE)
    score = fits.sum(axis=1) * (moving.size + 1) + (fits & (steps == 1)).sum(axis=1)
    return float(np.median(candidates[score == score.max()]))


def check_dicom_series(folder: str | os.PathLike[str]) -> list[str]:
    """The files of the one PET series in ``folder`` (GDCM's order), after checking it is one whole volume.

    Raises :class:`DataError` (one line naming the folder or file, the value and the fix) for: no
    series or several series (SeriesInstanceUIDs) in the folder; a file whose ``Modality`` is not
    ``PT``; slices of different sizes or orientations; a missing or malformed
    ``ImagePositionPatient``; and, from the positions along the slice normal, duplicate slices
    (closer than ``SLICE_TOLERANCE`` of the spacing), missing slices (a gap of about twice the
    spacing or more) and otherwise irregular spacing; slices drifting sideways off the slice normal by
    more than half a pixel (a gantry tilt); multi-frame files (Enhanced PET). A slice missing at either
    end of a series cannot be seen.
    """
    import pydicom

    folder = Path(folder)
    files = dicom_files(folder)
    headers = []
    for name in files:
        path = Path(name)
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=_SERIES_TAGS)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types for a damaged header
            raise DataError(f"{path}: unreadable DICOM header ({_one_line(exc)}); re-export the series") from exc
        headers.append((path, ds))

    modalities = [(path, str(ds.get("Modality", "") or "").strip().upper()) for path, ds in headers]
    others = [(path, m) for path, m in modalities if m != PET_MODALITY]
    if others:
        path, modality = others[0]
        what = f"Modality {modality!r}" if modality else "no Modality"
        raise DataError(
            f"{path}: {what} where PET ('{PET_MODALITY}') is expected ({len(others)} of {len(headers)} files "
            f"in {folder}); point to the PET series' folder"
        )
    frames = [(path, ds.get("NumberOfFrames")) for path, ds in headers if _frames(ds) > 1]
    if frames:
        path, count = frames[0]
        raise DataError(
            f"{path}: a multi-frame PET file ({count} frames, SOP class {str(headers[0][1].get('SOPClassUID', ''))!r}"
            "); ldt reads PET Image Storage, one slice per file: convert the series (e.g. dcm2niix to NIfTI) "
            "and give the result"
        )
    if len(headers) < 2:
        return files

    sizes = {(int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)) for _, ds in headers}
    if len(sizes) > 1:
        shown = ", ".join(f"{r}x{c}" for r, c in sorted(sizes))
        raise DataError(f"{folder}: slices of different sizes ({shown} rows x columns); "
                        "the folder mixes images, keep one series per folder")
    positions, orientation = [], None
    for path, ds in headers:
        iop = _numbers(ds, "ImageOrientationPatient", 6, path)
        ipp = _numbers(ds, "ImagePositionPatient", 3, path)
        if iop is None or ipp is None:
            missing = "ImageOrientationPatient" if iop is None else "ImagePositionPatient"
            raise DataError(f"{path}: no {missing}, so the slice cannot be placed; re-export the series "
                            "with its geometry, or move the file out of the folder")
        if orientation is None:
            orientation = iop
        elif np.abs(iop - orientation).max() > 1e-4:
            raise DataError(
                f"{path}: ImageOrientationPatient {_fmt(iop)} differs from {headers[0][0].name}'s "
                f"{_fmt(orientation)}; the folder mixes differently oriented slices, keep one series per folder"
            )
        positions.append(ipp)
    normal = np.cross(orientation[:3], orientation[3:])
    if np.linalg.norm(normal) < 1e-6:
        raise DataError(f"{headers[0][0]}: ImageOrientationPatient {_fmt(orientation)} has parallel row and "
                        "column directions; re-export the series")
    normal /= np.linalg.norm(normal)
    along = np.array([float(p @ normal) for p in positions])
    _check_shear(folder, headers, positions, normal, along)
    order = np.argsort(along, kind="stable")
    z = along[order]
    names = [headers[i][0].name for i in order]
    gaps = np.diff(z)
    spacing = _slice_spacing(gaps)
    steps = np.round(gaps / spacing) if spacing > 0 else np.zeros_like(gaps)
    regular = np.abs(gaps / spacing - steps) <= SLICE_TOLERANCE if spacing > 0 else gaps > 0
    dup = [i for i, g in enumerate(gaps) if g <= SLICE_TOLERANCE * spacing]
    if dup:
        i = dup[0]
        raise DataError(
            f"{folder}: duplicate slices: {names[i]} and {names[i + 1]} are both at {z[i]:.3f} mm along the "
            f"slice normal ({len(dup)} duplicate{'s' if len(dup) != 1 else ''} among {len(z)} files); remove "
            "the extra files or re-export the series"
        )
    holes = [i for i in range(len(gaps)) if regular[i] and steps[i] >= 2]
    if holes:
        i, n_missing = holes[0], int(sum(steps[j] - 1 for j in holes))
        more = f", and {len(holes) - 1} more gap{'s' if len(holes) > 2 else ''}" if len(holes) > 1 else ""
        raise DataError(
            f"{folder}: {n_missing} missing slice{'s' if n_missing != 1 else ''}: {names[i]} ({z[i]:.3f} mm) and "
            f"{names[i + 1]} ({z[i + 1]:.3f} mm along the slice normal) are {gaps[i]:.4g} mm apart where slices "
            f"are {spacing:.4g} mm apart{more}; add the missing files or re-export the complete series"
        )
    odd = [i for i in range(len(gaps)) if not regular[i]]
    if odd:
        i = odd[0]
        raise DataError(
            f"{folder}: irregular slice spacing: {names[i]} and {names[i + 1]} are {gaps[i]:.4g} mm apart along "
            f"the slice normal where the other slices are {spacing:.4g} mm apart; re-export the series on a "
            "regular grid"
        )
    return files


def _frames(ds: object) -> int:
    try:
        return int(ds.get("NumberOfFrames") or 1)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return 1


def _check_shear(folder: Path, headers: Sequence[tuple[Path, object]], positions: Sequence[np.ndarray],
                 normal: np.ndarray, along: np.ndarray) -> None:
    """Refuse a stack whose slices drift sideways off the slice normal (a gantry tilt) by more than half a
    pixel: one affine would misplace them, and the volume's geometry would be silently wrong."""
    offsets = np.array([p - positions[0] for p in positions])
    sideways = offsets - np.outer(offsets @ normal, normal)
    drift = np.linalg.norm(sideways, axis=1)
    worst = int(np.argmax(drift))
    spacing = _numbers(headers[worst][1], "PixelSpacing", 2, headers[worst][0])
    pixel = float(np.min(spacing)) if spacing is not None else 1.0
    if drift[worst] <= 0.5 * pixel:
        return
    angle = math.degrees(math.atan2(drift[worst], abs(along[worst] - along[0])))
    raise DataError(
        f"{folder}: sheared slice stack (a gantry tilt of {angle:.3g} degrees): {headers[worst][0].name} sits "
        f"{drift[worst]:.3g} mm off the slice normal through {headers[0][0].name}, more than half a pixel "
        f"({0.5 * pixel:.3g} mm), so no affine places every slice; resample the series to an untilted grid "
        "(dcm2niix corrects gantry tilt) and give the result"
    )


def read_dicom_series(path: str | os.PathLike[str]) -> tuple[torch.Tensor, np.ndarray]:
    """Read a DICOM series folder: ``([1, I, J, K] float32, RAS affine)``.

    Rescale slope/intercept are applied per slice (float32 output), so values are in the series'
    units (Bq/mL for PET with ``Units = BQML``). ``I`` runs along a row (columns), ``J`` down a
    column (rows), ``K`` along the slice normal. The series is checked first (:func:`check_dicom_series`:
    one PET series, no duplicate or missing slices).
    """
    import SimpleITK as sitk

    folder = Path(path)
    files = check_dicom_series(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise DataError(f"{folder}: unreadable DICOM series ({_one_line(exc)}); check the slice files") from exc
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(
            f"{folder}: DICOM series is {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} components; one 3D grey-level volume is expected"
        )
    array = sitk.GetArrayFromImage(image)  # (K, J, I)
    tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 1, 0)[np.newaxis]))
    return tensor, _ras_affine(image)


def _ras_affine(image: object) -> np.ndarray:
    """The voxel-to-RAS affine of a SimpleITK image (whose metadata is LPS)."""
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ direction * spacing
    affine[:3, 3] = LPS_TO_RAS @ origin
    return affine


def _reader(path: Path):
    return read_dicom_series if _kind(path) == "dicom" else read_nifti


def read_image(path: str | os.PathLike[str]) -> tio.ScalarImage:
    """A lazy ``tio.ScalarImage`` of a NIfTI file or DICOM series folder.

    The voxels are read on first access with :func:`read_nifti` or :func:`read_dicom_series`
    (both picklable, so the image can cross into DataLoader workers); read errors are
    :class:`DataError` naming the file.

    Example:
        >>> img = read_image("sub01/full.nii.gz")  # doctest: +SKIP
        >>> img.shape, img.affine  # [C, I, J, K] and voxel -> RAS+ mm  # doctest: +SKIP
    """
    path = Path(path)
    return tio.ScalarImage(path, reader=_reader(path))


def _nifti_header(path: Path) -> tuple[Any, tuple[int, int, int], int]:
    """``(image, spatial shape, channels)`` of a NIfTI file from its header alone; one line naming the file
    when the header cannot be read."""
    try:
        img = nib.load(str(path))
        spatial, channels = _nifti_channels(img.shape, path)
    except DataError:
        raise
    except _READ_ERRORS as exc:
        raise DataError(
            f"{path}: unreadable NIfTI header ({type(exc).__name__}: {_one_line(exc)}); re-export or re-download it"
        ) from exc
    return img, spatial, channels


def read_info(path: str | os.PathLike[str]) -> ImageInfo:
    """Read an image's geometry: the NIfTI header only, or the whole series for DICOM."""
    path = Path(path)
    if _kind(path) == "dicom":
        tensor, affine = read_dicom_series(path)
        return _dicom_info(path, tensor, affine)
    img, spatial, channels = _nifti_header(path)
    header = img.header
    affine = np.asarray(img.affine, dtype=np.float64)
    units = header.get_xyzt_units()[0] if hasattr(header, "get_xyzt_units") else "unknown"
    return ImageInfo(
        path=path,
        shape=spatial,
        channels=channels,
        affine=affine,
        format="nifti",
        dtype=str(header.get_data_dtype()),
        units=units or "unknown",
        qform_code=int(header["qform_code"]) if "qform_code" in header else None,
        sform_code=int(header["sform_code"]) if "sform_code" in header else None,
    )


def volume_grid(path: str | os.PathLike[str]) -> tuple[tuple[int, int, int], np.ndarray]:
    """``(shape I, J, K, affine)`` of one 3D volume, from a NIfTI header (or a DICOM series); a file of
    several volumes is refused as by :func:`load_array`."""
    info = read_info(path)
    _check_channels(path, info.channels, (info.channels, *info.shape))
    return info.shape, info.affine


def declared_volume(path: str | os.PathLike[str]) -> tuple[tuple[int, int, int], str, int] | None:
    """What an image says it holds, before any voxel is read: ``(shape I, J, K, data type, data bytes)``.

    NIfTI: the header's shape and on-disk type (a file of several volumes is refused, as by
    :func:`load_array`). DICOM: the first slice's columns x rows (x frames) x the files in the folder, as
    float32 (the series reader's output type). ``None`` when a DICOM folder holds no readable header
    (the reader then says why). The header may lie (a damaged or crafted file): that is the point of
    asking it first.
    """
    path = Path(path)
    if _kind(path) == "dicom":
        return _declared_dicom(path)
    img, spatial, channels = _nifti_header(path)
    dtype = np.dtype(img.header.get_data_dtype())
    _check_channels(path, channels, (channels, *spatial))
    return spatial, dtype.name, math.prod(spatial) * dtype.itemsize


def _declared_dicom(folder: Path) -> tuple[tuple[int, int, int], str, int] | None:
    try:
        import pydicom
    except ImportError:  # pragma: no cover - pydicom comes with the toolkit
        return None
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
    for file in files:
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True, specific_tags=["Rows", "Columns", "NumberOfFrames"])
            rows, cols, frames = int(ds.Rows), int(ds.Columns), int(ds.get("NumberOfFrames") or 1)
        except Exception:  # noqa: BLE001 - not a DICOM image (DICOMDIR, notes...): try the next file
            continue
        shape = (cols, rows, frames * len(files))
        return shape, "float32", math.prod(shape) * 4
    return None


def _dicom_info(path: Path, tensor: torch.Tensor, affine: np.ndarray) -> ImageInfo:
    c, i, j, k = tensor.shape
    return ImageInfo(path, (i, j, k), c, affine, "dicom", "float32")


def load_array(path: str | os.PathLike[str], *, validate: bool = True) -> tuple[torch.Tensor, np.ndarray, ImageInfo]:
    """Load one volume: ``(tensor [1, I, J, K] float32, affine 4x4 float64, info)``.

    Args:
        path: A ``.nii``/``.nii.gz`` file or a DICOM series folder.
        validate: Also reject NaN/Inf and all-zero volumes (:func:`validate_image`); a
            multi-volume file is always rejected.

    Example:
        >>> x, affine, info = load_array("sub01/drf_100.nii.gz")  # doctest: +SKIP
        >>> x.shape  # torch.Size([1, I, J, K]), the file's voxel order  # doctest: +SKIP
    """
    path = Path(path)
    if _kind(path) == "dicom":
        tensor, affine = read_dicom_series(path)
        info = _dicom_info(path, tensor, affine)
    else:
        info = read_info(path)
        _check_channels(path, info.channels, (info.channels, *info.shape))
        tensor, affine = read_nifti(path)
    _check_channels(path, tensor.shape[0], tuple(tensor.shape))
    if validate:
        validate_image(path, tensor)
    return tensor, affine, info


# ------------------------------------------------------------------------------------------ validation


def _check_channels(path: Path | str, channels: int, shape: tuple[int, ...]) -> None:
    if channels != 1:
        raise DataError(
            f"{path}: holds {channels} volumes or channels (shape {shape}) where one 3D volume is "
            "expected; extract one first (e.g. `fslroi IN OUT 0 1`)"
        )


def validate_image(path: str | os.PathLike[str], tensor: torch.Tensor) -> None:
    """Check a loaded image tensor ``[C, I, J, K]``; raise :class:`DataError` naming ``path``.

    Rejects: a tensor that is not 4D, more than one channel/volume, no voxels, NaN/Inf voxels
    (counted), and an all-zero volume.
    """
    shape = tuple(tensor.shape)
    if tensor.ndim != 4:
        raise DataError(f"{path}: expected a [C, I, J, K] image tensor, got shape {shape}")
    _check_channels(path, shape[0], shape)
    n = tensor.numel()
    if n == 0:
        raise DataError(f"{path}: empty volume (shape {shape[1:]}); re-export the image")
    finite = torch.isfinite(tensor)
    bad = n - int(finite.sum())
    if bad:
        nan = int(torch.isnan(tensor).sum())
        raise DataError(
            f"{path}: {nan} NaN and {bad - nan} Inf voxels (of {n}); "
            "replace them (e.g. numpy.nan_to_num) or re-export the image"
        )
    if not bool(tensor.any()):
        raise DataError(f"{path}: empty volume: all {n} voxels are 0; check the export")


def _geometry(img: tio.Image | ImageInfo) -> tuple[tuple[int, ...], np.ndarray]:
    if isinstance(img, ImageInfo):
        return tuple(img.shape), img.affine
    return tuple(int(s) for s in img.spatial_shape), np.asarray(img.affine, dtype=np.float64)


def _fmt(values: Iterable[float]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def check_same_geometry(
    a_path: str | os.PathLike[str],
    a_img: tio.Image | ImageInfo,
    b_path: str | os.PathLike[str],
    b_img: tio.Image | ImageInfo,
    *,
    atol: float = AFFINE_ATOL,
) -> None:
    """Raise :class:`DataError` if two images are not on the same voxel grid.

    Compares the spatial shape, the voxel spacing and the whole affine (orientation and origin),
    each within ``atol`` mm, and names both files and the differing values.
    """
    shape_a, aff_a = _geometry(a_img)
    shape_b, aff_b = _geometry(b_img)
    fix = "resample one onto the other (e.g. tio.Resample(target=...))"
    if shape_a != shape_b:
        raise DataError(f"{a_path} and {b_path} differ in shape: {shape_a} vs {shape_b}; {fix}")
    sp_a = np.sqrt((aff_a[:3, :3] ** 2).sum(axis=0))
    sp_b = np.sqrt((aff_b[:3, :3] ** 2).sum(axis=0))
    if not np.allclose(sp_a, sp_b, rtol=0, atol=atol):
        raise DataError(f"{a_path} and {b_path} differ in voxel spacing: {_fmt(sp_a)} vs {_fmt(sp_b)} mm; {fix}")
    diff = float(np.abs(aff_a - aff_b).max())
    if diff > atol:
        raise DataError(
            f"{a_path} and {b_path} differ in affine (max difference {diff:.4g} > {atol:g}): "
            f"{_rows(aff_a)} vs {_rows(aff_b)}; {fix}"
        )


def _rows(affine: np.ndarray) -> str:
    text = np.array2string(affine[:3], precision=4, separator=",", max_line_width=10_000, suppress_small=True)
    return text.replace("\n", "").replace(" ", "")


# A validated file is cached by (path, mtime, size): re-validating an unchanged file is free.
_CHECKED: dict[tuple[str, int, int], ImageInfo] = {}


def _stat_key(path: Path) -> tuple[str, int, int]:
    if path.is_dir():
        files = [p for p in path.iterdir() if p.is_file()]
        stats = [p.stat() for p in files]
        mtime = max((s.st_mtime_ns for s in stats), default=0)
        return (str(path.resolve()), mtime, sum(s.st_size for s in stats) * 1_000_003 + len(files))
    st = path.stat()
    return (str(path.resolve()), st.st_mtime_ns, st.st_size)


def checked_info(path: str | os.PathLike[str]) -> ImageInfo:
    """Read and fully validate one image (voxels included); cached while the file is unchanged."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; check the path")
    key = _stat_key(path)
    info = _CHECKED.get(key)
    if info is None:
        _, _, info = load_array(path, validate=True)
        _CHECKED[key] = info
    return info


def validate_record(record: SubjectRecord, *, data: bool = True) -> None:
    """Check one subject's files; raise :class:`DataError` for the first problem.

    Every file must exist and hold one 3D volume; with ``data`` the voxels are read too (NaN/Inf,
    empty); every low-dose image must be on the full-dose image's grid.
    """
    items = [("full dose", record.full)] + [(f"DRF {d}", p) for d, p in sorted(record.low.items())]
    for what, p in items:
        if not Path(p).exists():
            raise DataError(f"{p}: file not found (subject {record.subject!r}, {what}); check the path")
    infos = []
    for _, p in items:
        if data:
            infos.append(checked_info(p))
        else:
            info = read_info(p)
            _check_channels(p, info.channels, (info.channels, *info.shape))
            infos.append(info)
    for (_, p), info in zip(items[1:], infos[1:], strict=True):
        check_same_geometry(p, info, record.full, infos[0])


def screen_records(
    records: Sequence[SubjectRecord],
    problems: dict[str, str] | None = None,
    *,
    skip_bad: bool = False,
    validate: bool = True,
    source: str = "source",
    workers: int | None = None,
) -> list[SubjectRecord]:
    """Validate subjects; raise on the first bad one, or warn and leave it out with ``skip_bad``.

    Args:
        records: Candidate subjects.
        problems: Subject -> one-line message for problems found while listing (missing dose...);
            such subjects may be absent from ``records``.
        skip_bad: Leave bad subjects out with one warning line each instead of raising.
        validate: Read headers and voxels (NaN/Inf, empty, geometry); otherwise only check that
            the files exist.
        source: Name used in messages (``nifti``, ``uldp``).
        workers: Threads reading files (default ``min(4, cpu count)``; reading gzip releases the GIL).

    Returns:
        The good records, sorted by subject.

    Raises:
        DataError: The first problem (by subject), or no subject left.
    """
    errors: dict[str, str] = dict(problems or {})
    todo = [r for r in records if r.subject not in errors]
    trusted = _validated_by_cache(todo) if validate else set()

    def check(rec: SubjectRecord) -> str | None:
        try:
            if validate:
                validate_record(rec, data=rec.subject not in trusted)
            else:
                for p in [rec.full, *rec.low.values()]:
                    if not Path(p).exists():
                        raise DataError(f"{p}: file not found (subject {rec.subject!r}); check the path")
        except DataError as exc:
            return str(exc)
        return None

    n_workers = workers or min(4, os.cpu_count() or 1)
    if validate and n_workers > 1 and len(todo) > 1:
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            results = list(pool.map(check, todo))
    else:
        results = [check(r) for r in todo]
    for rec, err in zip(todo, results, strict=True):
        if err is not None:
            errors[rec.subject] = err
    good = sorted((r for r in todo if r.subject not in errors), key=lambda r: r.subject)
    bad = sorted(errors)
    if bad and not skip_bad:
        more = len(bad) - 1
        tail = f"; {more} more subject{'s' if more > 1 else ''} with problems (skip_bad: true leaves them out)"
        raise DataError(errors[bad[0]] + (tail if more else ""))
    for subject in bad:
        warnings.warn(f"{source}: skipping subject {subject!r}: {errors[subject]}", UserWarning, stacklevel=3)
    if not good:
        raise DataError(f"{source}: no usable subject left: all {len(bad)} were skipped as bad (see warnings)")
    return good


def _validated_by_cache(records: Sequence[SubjectRecord]) -> set[str]:
    """Subjects whose files ``ldt cache`` read and checked as they are now: their voxels need no second read."""
    from lowdose_toolkit.data.cache import find_cache

    try:
        index = find_cache(records)
    except DataError:  # an unreadable cache index is reported where the cache is used
        return set()
    return set() if index is None else {r.subject for r in records if index.validated(r)}


# --------------------------------------------------------------------------------------------- writing


def as_volume(tensor: torch.Tensor | np.ndarray, out_path: Path) -> np.ndarray:
    """A prediction ``[1, I, J, K]`` (tensor or array) as a float32 ``[I, J, K]`` array to write to ``out_path``."""
    array = tensor.detach().cpu().numpy() if isinstance(tensor, torch.Tensor) else np.asarray(tensor)
    while array.ndim > 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"cannot write {out_path}: expected a [1, I, J, K] volume, got shape {array.shape}")
    return np.asarray(array, dtype=np.float32)


def _check_out(out_path: Path) -> None:
    if not is_nifti(out_path):
        raise DataError(f"{out_path}: output must end in .nii or .nii.gz")


def save_nifti(tensor: torch.Tensor | np.ndarray, affine: np.ndarray, out_path: str | os.PathLike[str]) -> Path:
    """Write a float32 NIfTI (atomically) with ``affine`` as sform and qform (code 1, scanner), mm/s.

    The affine is stored in float32 like any NIfTI header; it round-trips exactly when its values
    are float32-representable (as those read from a NIfTI file are).
    """
    out_path = Path(out_path)
    _check_out(out_path)
    affine = np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(as_volume(tensor, out_path), affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    with atomic_path(out_path) as tmp:
        nib.save(img, tmp)
    return out_path


def save_like(
    tensor: torch.Tensor | np.ndarray,
    reference: str | os.PathLike[str] | tio.Image,
    out_path: str | os.PathLike[str],
) -> Path:
    """Write ``tensor`` as float32 NIfTI on the reference's grid, atomically.

    A NIfTI reference lends its whole header (affine, qform/sform codes, units, description), with
    the data type set to float32 and scaling cleared: ``read -> save_like -> read`` is bit-exact. A
    DICOM or in-memory reference lends its affine (:func:`save_nifti`).

    Args:
        tensor: ``[1, I, J, K]`` or ``[I, J, K]`` in the reference's voxel order.
        reference: Path of the reference image, or a ``tio.Image`` (its file is used when it has one).
        out_path: Output ``.nii`` or ``.nii.gz``.

    Example:
        >>> x, affine, _ = load_array("low.nii.gz")  # doctest: +SKIP
        >>> save_like(model(x[None])[0], "low.nii.gz", "pred.nii.gz")  # doctest: +SKIP
    """
    out_path = Path(out_path)
    _check_out(out_path)
    volume = as_volume(tensor, out_path)
    ref_path: Path | None = None
    if isinstance(reference, tio.Image):
        if isinstance(reference.path, Path) and is_nifti(reference.path) and reference.path.is_file():
            ref_path = reference.path
        else:
            ref_shape, ref_affine = _geometry(reference)
            _check_shape(volume, ref_shape, reference.path or "in-memory reference", out_path)
            return save_nifti(volume, ref_affine, out_path)
    else:
        ref_path = Path(reference)
        if _kind(ref_path) == "dicom":
            info = read_info(ref_path)
            _check_shape(volume, info.shape, ref_path, out_path)
            return save_nifti(volume, info.affine, out_path)
    try:
        ref = nib.load(str(ref_path))
        spatial, _ = _nifti_channels(ref.shape, ref_path)
    except _READ_ERRORS as exc:
        raise DataError(f"{ref_path}: unreadable NIfTI header ({_one_line(exc)})") from exc
    _check_shape(volume, spatial, ref_path, out_path)
    header = ref.header.copy()
    header.set_data_dtype(np.float32)
    header.set_slope_inter(np.nan, np.nan)
    header["cal_min"] = 0.0
    header["cal_max"] = 0.0
    img = type(ref)(volume, None, header=header)  # affine=None: sform/qform kept as in the header
    with atomic_path(out_path) as tmp:
        nib.save(img, tmp)
    return out_path


def _check_shape(volume: np.ndarray, ref_shape: Sequence[int], ref: object, out_path: Path) -> None:
    if tuple(volume.shape) != tuple(ref_shape):
        raise DataError(
            f"cannot write {out_path} like {ref}: volume shape {tuple(volume.shape)} differs from "
            f"the reference's {tuple(ref_shape)}; use the image the prediction was made from"
        )
