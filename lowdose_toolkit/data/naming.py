"""NIfTI file names: one home for the suffix rules every reader and writer follows.

A NIfTI file ends in ``.nii`` or ``.nii.gz`` in any case (``scan.NII.GZ`` is as good as
``scan.nii.gz``); the toolkit always writes ``.nii.gz``. A data set's per-subject files are
``full.nii.gz`` and ``drf_004.nii.gz`` ... (:func:`dose_filename`).

Example:
    >>> is_nifti("scan.NII.GZ"), nifti_stem("scan.NII.GZ"), nifti_suffix("a/b.nii")
    (True, 'scan', '.nii')
    >>> dose_filename("full"), dose_filename(4)
    ('full.nii.gz', 'drf_004.nii.gz')
"""

from __future__ import annotations

import os
import re
from pathlib import PurePath

from lowdose_toolkit.records import FULL

__all__ = [
    "NIFTI_SUFFIXES", "NIFTI_SUFFIX_RE", "dose_filename", "is_nifti", "nifti_stem", "nifti_suffix",
    "strip_nifti_suffix",
]  # fmt: skip

NIFTI_SUFFIXES = (".nii", ".nii.gz")  # lower case; names are compared case-insensitively
NIFTI_SUFFIX_RE = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)


def nifti_suffix(path: str | os.PathLike[str]) -> str:
    """The NIfTI suffix of ``path``'s name as written (``.nii``, ``.NII.GZ`` ...), or ``""`` if none."""
    match = NIFTI_SUFFIX_RE.search(PurePath(path).name)
    return match.group(0) if match else ""


def is_nifti(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a NIfTI file by its suffix (``.nii`` or ``.nii.gz``, any case)."""
    return bool(nifti_suffix(path))


def strip_nifti_suffix(text: str) -> str:
    """``text`` (a name or relative path) without a trailing NIfTI suffix in any case."""
    match = NIFTI_SUFFIX_RE.search(text)
    return text[: match.start()] if match else text


def nifti_stem(path: str | os.PathLike[str]) -> str:
    """``path``'s name without its NIfTI suffix in any case (``scan.NII.GZ`` -> ``scan``); other names as is."""
    return strip_nifti_suffix(PurePath(path).name)


def dose_filename(drf: int | str, suffix: str = ".nii.gz") -> str:
    """A subject's file for one dose level: ``full.nii.gz`` or ``drf_004.nii.gz`` (``suffix=".nii"``: uncompressed)."""
    return f"{FULL}{suffix}" if drf == FULL else f"drf_{int(drf):03d}{suffix}"
