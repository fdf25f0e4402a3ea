"""Image IO: axis convention, bit-exact NIfTI round trips, validation messages."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torchio as tio

from lowdose_toolkit.data import io
from lowdose_toolkit.errors import DataError


def oblique_affine() -> np.ndarray:
    """An oblique (rotated about two axes), anisotropic, x-flipped affine with an odd origin."""
    a, b = 0.3, -0.2
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag([-1.65, 2.03, 3.27])
    affine[:3, 3] = [-301.25, 17.3, 712.71]
    return affine


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None, **header: float) -> Path:
    img = nib.Nifti1Image(data, oblique_affine() if affine is None else affine)
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=2)
    img.header.set_xyzt_units("mm", "sec")
    for key, value in header.items():
        img.header[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path


@pytest.fixture
def volume() -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.random((7, 5, 4)) * 1000).astype(np.float32)  # distinct sizes expose any transposition


def test_torchio_axis_convention(tmp_path: Path, volume: np.ndarray) -> None:
    """TorchIO keeps the file's voxel order ([C, i, j, k]); the affine maps (i, j, k) to RAS+ mm."""
    path = write_nifti(tmp_path / "a.nii.gz", volume)
    ours = io.read_image(path)
    theirs = tio.ScalarImage(path)  # TorchIO's own reader (SimpleITK first)
    assert ours.shape == theirs.shape == (1, 7, 5, 4)
    assert torch.equal(ours.data, theirs.data.float())
    assert ours.data[0, 6, 1, 3] == volume[6, 1, 3]  # no transposition, no reorientation
    # SimpleITK goes through its own direction/spacing and lands close, but not bit-exact.
    assert np.allclose(ours.affine, theirs.affine, atol=1e-4)
    assert np.array_equal(ours.affine, nib.load(path).affine)
    # World position of voxel (i, j, k) is affine @ (i, j, k, 1) in RAS+: the first axis runs to -x (left).
    assert ours.affine[0, 0] < 0


def test_round_trip_is_bit_exact(tmp_path: Path, volume: np.ndarray) -> None:
    src = write_nifti(tmp_path / "src" / "low.nii.gz", volume, descrip=b"scanner recon")
    tensor, affine, info = io.load_array(src)
    assert tensor.shape == (1, 7, 5, 4) and tensor.dtype == torch.float32
    assert info.shape == (7, 5, 4) and info.units == "mm" and (info.qform_code, info.sform_code) == (1, 2)
    assert np.allclose(info.spacing, (1.65, 2.03, 3.27), atol=1e-5)

    out = io.save_like(tensor, src, tmp_path / "out" / "pred.nii.gz")
    again, affine2, info2 = io.load_array(out)
    assert torch.equal(again, tensor)
    assert np.array_equal(affine2, affine)
    assert (info2.qform_code, info2.sform_code, info2.units, info2.dtype) == (1, 2, "mm", "float32")
    header = nib.load(out).header
    assert header["descrip"].tobytes().startswith(b"scanner recon")
    assert np.array_equal(header.get_qform(), nib.load(src).header.get_qform())
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["pred.nii.gz"]  # no temporary left behind

    # The reference may be a ScalarImage, and a [I, J, K] tensor works as well as [1, I, J, K].
    out2 = io.save_like(tensor[0] * 2, io.read_image(src), tmp_path / "out" / "pred2.nii")
    doubled, affine3, _ = io.load_array(out2)
    assert torch.equal(doubled, tensor * 2) and np.array_equal(affine3, affine)


def test_save_like_scaled_integer_reference(tmp_path: Path) -> None:
    """An int16 reference with scl_slope gives a float32 output without scaling."""
    raw = np.arange(60, dtype=np.int16).reshape(5, 4, 3) + 1
    ref = write_nifti(tmp_path / "ref.nii", raw)
    with ref.open("r+b") as fh:  # nibabel resets scaling on save: patch scl_slope/scl_inter in place
        fh.seek(112)
        fh.write(struct.pack("<ff", 0.5, 10.0))
    tensor, _, _ = io.load_array(ref)
    assert torch.allclose(tensor[0], torch.from_numpy(raw * 0.5 + 10.0).float())
    out = io.save_like(tensor, ref, tmp_path / "out.nii.gz")
    header = nib.load(out).header
    assert header.get_data_dtype() == np.float32
    assert np.isnan(header["scl_slope"]) or header["scl_slope"] in (0, 1)
    assert torch.equal(io.load_array(out)[0], tensor)


def test_save_nifti_writes_affine_and_codes(tmp_path: Path, volume: np.ndarray) -> None:
    affine = oblique_affine().astype(np.float32).astype(np.float64)
    out = io.save_nifti(torch.from_numpy(volume)[None], affine, tmp_path / "x.nii.gz")
    tensor, back, info = io.load_array(out)
    assert np.array_equal(back, affine) and (info.qform_code, info.sform_code) == (1, 1)
    assert torch.equal(tensor[0], torch.from_numpy(volume))


def test_save_like_checks_shape_and_suffix(tmp_path: Path, volume: np.ndarray) -> None:
    ref = write_nifti(tmp_path / "ref.nii.gz", volume)
    with pytest.raises(DataError, match=r"volume shape \(7, 5, 3\) differs from the reference's \(7, 5, 4\)"):
        io.save_like(torch.zeros(1, 7, 5, 3), ref, tmp_path / "o.nii.gz")
    with pytest.raises(DataError, match=r"o\.mha: output must end in \.nii or \.nii\.gz"):
        io.save_like(torch.zeros(1, 7, 5, 4), ref, tmp_path / "o.mha")


def test_truncated_file_is_named(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    good = write_nifti(tmp_path / "good.nii.gz", rng.random((24, 24, 24)).astype(np.float32))
    cut = tmp_path / "cut.nii.gz"
    blob = good.read_bytes()
    cut.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match=r"cut\.nii\.gz: unreadable or truncated NIfTI \(EOFError"):
        io.load_array(cut)
    image = io.read_image(cut)  # lazy: the error comes on first access, still naming the file
    with pytest.raises(DataError, match="cut.nii.gz"):
        image.load()
    garbage = tmp_path / "garbage.nii"
    garbage.write_bytes(b"not a nifti")
    with pytest.raises(DataError, match=r"garbage\.nii: unreadable NIfTI header"):
        io.load_array(garbage)


def test_multi_volume_rejected(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "dyn.nii.gz", np.ones((4, 4, 3, 3), np.float32))
    with pytest.raises(DataError, match=r"dyn\.nii\.gz: holds 3 volumes or channels \(shape \(3, 4, 4, 3\)\)"):
        io.load_array(path)
    single = write_nifti(tmp_path / "one.nii.gz", np.ones((4, 4, 3, 1), np.float32))
    assert io.load_array(single)[0].shape == (1, 4, 4, 3)


def test_nan_inf_and_empty(tmp_path: Path, volume: np.ndarray) -> None:
    bad = volume.copy()
    bad[0, 0, 0] = bad[1, 1, 1] = np.nan
    bad[2, 2, 2] = np.inf
    path = write_nifti(tmp_path / "nan.nii.gz", bad)
    with pytest.raises(DataError, match=r"nan\.nii\.gz: 2 NaN and 1 Inf voxels \(of 140\)"):
        io.load_array(path)
    assert io.load_array(path, validate=False)[0].isnan().sum() == 2
    zeros = write_nifti(tmp_path / "zeros.nii.gz", np.zeros((3, 3, 3), np.float32))
    with pytest.raises(DataError, match=r"zeros\.nii\.gz: empty volume: all 27 voxels are 0"):
        io.load_array(zeros)
    with pytest.raises(DataError, match=r"x\.nii: empty volume"):
        io.validate_image("x.nii", torch.zeros(1, 0, 3, 3))


def test_missing_and_unsupported_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.nii\.gz: no such file or folder"):
        io.load_array(tmp_path / "nope.nii.gz")
    other = tmp_path / "img.mha"
    other.write_bytes(b"")
    with pytest.raises(DataError, match=r"img\.mha: unsupported image type"):
        io.read_image(other)
    with pytest.raises(DataError, match="holds no DICOM series"):
        io.load_array(tmp_path)


def test_check_same_geometry(tmp_path: Path, volume: np.ndarray) -> None:
    affine = oblique_affine()
    a = io.read_info(write_nifti(tmp_path / "a.nii.gz", volume, affine))
    io.check_same_geometry("a", a, "b", io.read_info(write_nifti(tmp_path / "b.nii.gz", volume, affine)))

    c = io.read_info(write_nifti(tmp_path / "c.nii.gz", volume[:, :, :3], affine))
    with pytest.raises(
        DataError, match=r"^low\.nii and full\.nii differ in shape: \(7, 5, 4\) vs \(7, 5, 3\); resample"
    ):
        io.check_same_geometry("low.nii", a, "full.nii", c)

    zoomed = affine.copy()
    zoomed[:3, 2] *= 1.5
    d = io.read_info(write_nifti(tmp_path / "d.nii.gz", volume, zoomed))
    with pytest.raises(
        DataError, match=r"differ in voxel spacing: \(1\.65, 2\.03, 3\.27\) vs \(1\.65, 2\.03, 4\.905\) mm"
    ):
        io.check_same_geometry("a.nii.gz", a, "d.nii.gz", d)

    moved = affine.copy()
    moved[:3, 3] += [0.0, 2.5, 0.0]
    e = io.read_info(write_nifti(tmp_path / "e.nii.gz", volume, moved))
    with pytest.raises(DataError, match=r"a\.nii\.gz and e\.nii\.gz differ in affine \(max difference 2\.5 > 0\.001\)"):
        io.check_same_geometry("a.nii.gz", a, "e.nii.gz", e)

    nudged = affine.copy()
    nudged[:3, 3] += 2e-4  # float32 rounding of a whole-body origin: same grid
    io.check_same_geometry("a", a, "f", io.read_info(write_nifti(tmp_path / "f.nii.gz", volume, nudged)))
    io.check_same_geometry("a", io.read_image(tmp_path / "a.nii.gz"), "b", a)  # a ScalarImage works too


def test_checked_info_caches_until_the_file_changes(
    tmp_path: Path, volume: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_nifti(tmp_path / "a.nii.gz", volume)
    calls = []
    real = io.load_array
    monkeypatch.setattr(io, "load_array", lambda p, **kw: calls.append(p) or real(p, **kw))
    monkeypatch.setattr(io, "_CHECKED", {})
    first = io.checked_info(path)
    assert io.checked_info(path) is first and len(calls) == 1
    bad = volume.copy()
    bad[0, 0, 0] = np.nan
    write_nifti(path, bad)
    with pytest.raises(DataError, match="1 NaN"):
        io.checked_info(path)
    assert len(calls) == 2
