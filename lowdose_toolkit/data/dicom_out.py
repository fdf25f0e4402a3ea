"""DICOM out: a prediction written as a new PET series beside (never into) the series it was made from.

Each output slice is its input slice's header with what a derived image must change: new
SeriesInstanceUID and SOPInstanceUIDs (:func:`pydicom.uid.generate_uid`), ImageType
``DERIVED\\SECONDARY``, a SeriesDescription and DerivationDescription naming the model, the recipe
and ldt's version, a SourceImageSequence pointing at the input slice, ldt in the
ContributingEquipmentSequence, and 16-bit signed pixel data with its own RescaleSlope (RescaleIntercept
0, as the PET Image module requires). Everything else is the input's: patient and study identity,
FrameOfReferenceUID, geometry per slice (ImagePositionPatient, ImageOrientationPatient, PixelSpacing,
SliceThickness), Units and the PET/SUV tags (RadiopharmaceuticalInformationSequence, PatientWeight,
DecayCorrection, SeriesDate/SeriesTime: the decay reference, so SUV stays right). Private tags
are dropped (their scale factors describe the input's pixels), as are attributes tied to the input's
stored values (smallest/largest pixel value, padding value, modality LUT) and its signatures.

Values round-trip within half a slice's slope: ``slope = max|slice| / 32767``, so the error is at most
``max|slice| / 65534`` (1.5e-5 of the slice's peak). The series is written into a temporary folder and
renamed into place (:func:`lowdose_toolkit.core.atomic.atomic_dir`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowdose_toolkit import __version__
from lowdose_toolkit.core.atomic import atomic_dir
from lowdose_toolkit.data.io import as_volume
from lowdose_toolkit.errors import DataError

__all__ = ["Derivation", "quantise", "save_dicom_like"]

MAX_STORED = 32767  # signed 16-bit: the largest |stored value| a slice's peak is scaled to
_SERIES_NUMBER_OFFSET = 1000  # the derived series is numbered after its source, as scanners number derived series
_PROCESSING_EQUIPMENT = ("109102", "DCM", "Processing Equipment")  # CID 7005
# Attributes that describe the input's pixel data, file or signatures: wrong (or void) for the new series.
_DROP = (
    "PixelData", "FloatPixelData", "DoubleFloatPixelData", "ExtendedOffsetTable", "ExtendedOffsetTableLengths",
    "DataSetTrailingPadding", "IconImageSequence", "SmallestImagePixelValue", "LargestImagePixelValue",
    "SmallestPixelValueInSeries", "LargestPixelValueInSeries", "PixelPaddingValue", "PixelPaddingRangeLimit",
    "PlanarConfiguration", "NumberOfFrames", "ModalityLUTSequence", "VOILUTSequence", "RescaleType",
    "DigitalSignaturesSequence", "MACParametersSequence", "EncryptedAttributesSequence",
    "OriginalAttributesSequence", "InstanceCreatorUID", "StorageMediaFileSetUID", "StorageMediaFileSetID",
    "SourceImageSequence", "DerivationCodeSequence", "PixelDataProviderURL",
)  # fmt: skip


@dataclass(frozen=True)
class Derivation:
    """What made a derived series; named in its SeriesDescription and DerivationDescription.

    Attributes:
        recipe: The recipe's name.
        model: The synthesis network (the recipe's generator).
        source: The checkpoint or exported file (name, epoch).
        version: ldt's version.
        note: Per volume, e.g. the dose head's verdict.
    """

    recipe: str = "unknown"
    model: str = "unknown"
    source: str = "unknown"
    version: str = __version__
    note: str = ""

    def series_description(self, original: str) -> str:
        """The input's SeriesDescription with the model, recipe and version after it (64 characters at most)."""
        tail = f"denoised (ldt {self.version}, {self.recipe}, {self.model})"
        room = 64 - len(tail) - 1
        head = original.strip()[: max(room, 0)].strip()
        return (f"{head} {tail}" if head else tail)[:64]

    def derivation_description(self, source_series: str) -> str:
        """One sentence saying how the series was made (1024 characters at most, the ST limit)."""
        text = (f"Denoised by lowdose-toolkit {self.version} (ldt infer): model {self.model}, recipe {self.recipe}, "
                f"from {self.source}; source series {source_series}")
        if self.note:
            text += f"; {self.note}"
        return text[:1024]


def quantise(plane: np.ndarray) -> tuple[np.ndarray, str]:
    """A slice as signed 16-bit stored values and its RescaleSlope (DS text, intercept 0).

    ``stored * float(slope)`` equals ``plane`` within ``float(slope) / 2``; an all-zero slice has slope 1.
    """
    values = np.asarray(plane, dtype=np.float64)
    peak = float(np.abs(values).max()) if values.size else 0.0
    if peak == 0.0:
        return np.zeros(values.shape, dtype="<i2"), "1"
    slope = f"{peak / MAX_STORED:.10g}"  # at most 16 characters, the DS limit; the value written is the one used
    stored = np.clip(np.rint(values / float(slope)), -MAX_STORED - 1, MAX_STORED)
    return stored.astype("<i2"), slope


def _read_headers(reference: Path) -> tuple[list[Path], list[Any]]:
    """The input series' files in the order its volume stacks them (:func:`io.read_dicom_series`), with headers."""
    import pydicom

    from lowdose_toolkit.data.io import check_dicom_series

    files = [Path(f) for f in check_dicom_series(reference)]
    headers = []
    for path in files:
        try:
            headers.append(pydicom.dcmread(path, stop_before_pixels=True, force=True))
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types for a damaged header
            raise DataError(f"{path}: unreadable DICOM header ({type(exc).__name__}: {exc}); re-export the series"
                            ) from exc
    return files, headers  # single-slice files: check_dicom_series refuses multi-frame ones


def _write(ds: Any, path: Path) -> None:
    """Save ``ds`` as a DICOM file (preamble, file meta, explicit VR little endian), pydicom 2.4 or 3."""
    import pydicom

    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(path, enforce_file_format=True)
    else:  # pragma: no cover - pydicom 2.x
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=False)


def _series_number(ds: Any) -> int | None:
    try:
        number = int(ds.get("SeriesNumber"))
    except (TypeError, ValueError):
        return None
    number += _SERIES_NUMBER_OFFSET
    return number if 0 <= number < 2**31 else None


def _derived(ds: Any, stored: np.ndarray, slope: str, series_uid: str, description: str, derivation: str,
             series_number: int | None, now: datetime) -> Any:
    """The input slice's header ``ds`` turned, in place, into the header of its derived slice."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    source = Dataset()
    source.ReferencedSOPClassUID = ds.SOPClassUID
    source.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    ds.remove_private_tags()
    for keyword in _DROP:
        if keyword in ds:
            delattr(ds, keyword)
    for tag in [t for t in ds.keys() if (t.group & 0xFF00) in (0x5000, 0x6000)]:  # curves, overlays
        del ds[tag]
    uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.SOPInstanceUID = uid
    ds.SeriesInstanceUID = series_uid
    image_type = ds.get("ImageType") or []
    image_type = [image_type] if isinstance(image_type, str) else list(image_type)
    ds.ImageType = ["DERIVED", "SECONDARY", *image_type[2:]]
    ds.SeriesDescription = description
    ds.DerivationDescription = derivation
    ds.SourceImageSequence = Sequence([source])
    if series_number is not None:
        ds.SeriesNumber = series_number
    ds.InstanceCreationDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = ds.ContentTime = now.strftime("%H%M%S")
    equipment = Dataset()
    equipment.Manufacturer = "lowdose-toolkit"
    equipment.SoftwareVersions = __version__
    equipment.ContributionDateTime = now.strftime("%Y%m%d%H%M%S")
    equipment.ContributionDescription = "denoising (ldt infer)"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = _PROCESSING_EQUIPMENT
    equipment.PurposeOfReferenceCodeSequence = Sequence([code])
    ds.ContributingEquipmentSequence = Sequence([*list(ds.get("ContributingEquipmentSequence") or []), equipment])
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = slope, "0"
    ds.PixelData = stored.tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def save_dicom_like(tensor: torch.Tensor | np.ndarray, reference: str | os.PathLike[str],
                    out_folder: str | os.PathLike[str], derivation: Derivation | None = None) -> Path:
    """Write ``tensor`` as a new PET series in ``out_folder`` on the DICOM series ``reference``'s grid, atomically.

    Args:
        tensor: ``[1, I, J, K]`` or ``[I, J, K]`` in the reference's voxel order (as
            :func:`lowdose_toolkit.data.io.load_array` reads it: ``I`` column, ``J`` row, ``K`` slice).
        reference: The input series' folder; each output slice takes its slice's header.
        out_folder: The new series' folder (created; an existing one is replaced whole).
        derivation: What made it (model, recipe, version), for the descriptions.

    Example:
        >>> x, _, _ = load_array("PET_low")  # doctest: +SKIP
        >>> save_dicom_like(model(x[None])[0], "PET_low", "out/PET_low")  # doctest: +SKIP
    """
    from pydicom.uid import generate_uid

    reference, out = Path(reference), Path(out_folder)
    derivation = derivation or Derivation()
    if not reference.is_dir():
        raise DataError(f"{reference}: DICOM output needs a DICOM series as its template, not a file; "
                        "pass --output-format nifti")
    if out.resolve() == reference.resolve() or reference.resolve() in out.resolve().parents:
        raise DataError(f"cannot write {out}: it is inside the input series {reference}; choose another folder")
    volume = as_volume(tensor, out)
    files, headers = _read_headers(reference)
    first = headers[0]
    shape = (int(first.Columns), int(first.Rows), len(files))
    if tuple(volume.shape) != shape:
        raise DataError(f"cannot write {out} like {reference}: volume shape {tuple(volume.shape)} differs from the "
                        f"series' {shape} (columns x rows x slices); use the series the prediction was made from")
    if not np.isfinite(volume).all():
        raise DataError(f"cannot write {out}: the volume has NaN or Inf voxels, which DICOM cannot store")
    series_uid, now = generate_uid(), datetime.now()
    description = derivation.series_description(str(first.get("SeriesDescription") or ""))
    text = derivation.derivation_description(str(first.get("SeriesInstanceUID") or "unknown"))
    number = _series_number(first)
    width = max(4, len(str(len(files))))
    with atomic_dir(out) as tmp:
        for k, ds in enumerate(headers):
            stored, slope = quantise(volume[:, :, k].T)  # [I, J] -> the slice's [row, column]
            _write(_derived(ds, stored, slope, series_uid, description, text, number, now),
                   tmp / f"IM{k + 1:0{width}d}.dcm")
    return out
