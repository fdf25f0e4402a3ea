"""The synthetic FDG phantom: layout, determinism, per-subject variation, plausible values."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from lowdose_toolkit.data.phantom import LABELS, MU_PER_MM, SUV_RANGES, Phantom, make_phantom, nifti_affine
from lowdose_toolkit.errors import UserError

SHAPE = (64, 40, 40)
SPACING = (15.0, 12.0, 12.0)
ID = {v: k for k, v in LABELS.items()}


@pytest.fixture(scope="module")
def ph() -> Phantom:
    return make_phantom(SHAPE, SPACING, seed=7)


def test_types_layout_and_affine(ph: Phantom) -> None:
    assert ph.activity.shape == ph.mu.shape == ph.labels.shape == SHAPE
    assert ph.activity.dtype == ph.mu.dtype == torch.float32
    assert ph.labels.dtype == torch.uint8
    assert ph.label_names == LABELS
    assert ph.spacing_mm == SPACING
    assert nib.aff2axcodes(ph.affine) == ("R", "A", "S")
    np.testing.assert_allclose(np.diag(ph.affine)[:3], [12.0, 12.0, 15.0])
    # The affine maps the NIfTI array's (i, j, k) = tensor (w, h, d); the volume is centred.
    centre = ph.affine @ np.array([(SHAPE[2] - 1) / 2, (SHAPE[1] - 1) / 2, (SHAPE[0] - 1) / 2, 1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)
    assert np.array_equal(nifti_affine(SHAPE, SPACING), ph.affine)


def test_same_seed_same_subject_other_seed_other_anatomy(ph: Phantom) -> None:
    again = make_phantom(SHAPE, SPACING, seed=7)
    assert torch.equal(again.activity, ph.activity)
    assert torch.equal(again.mu, ph.mu) and torch.equal(again.labels, ph.labels)
    assert again.info == ph.info
    other = make_phantom(SHAPE, SPACING, seed=8)
    assert (other.labels != ph.labels).float().mean() > 0.01  # different outline/organs
    assert other.info["weight_kg"] != ph.info["weight_kg"]
    liver = [int((p.labels == ID["liver"]).sum()) for p in (ph, other)]
    assert liver[0] != liver[1]


def _centroid(p: Phantom, name: str) -> np.ndarray:
    return np.argwhere(p.labels.numpy() == ID[name]).mean(0)  # (d, h, w) voxel indices


def test_anatomy_is_where_it_belongs(ph: Phantom) -> None:
    present = {LABELS[int(v)] for v in torch.unique(ph.labels)}
    assert {"brain", "lung", "myocardium", "liver", "spleen", "kidney", "bladder", "marrow", "fat"} <= present
    z = {n: _centroid(ph, n)[0] for n in ("brain", "lung", "myocardium", "liver", "bladder")}
    assert z["brain"] > z["lung"] > z["liver"] > z["bladder"]  # index grows towards superior
    assert z["lung"] > z["myocardium"] > z["liver"]
    mid = (SHAPE[2] - 1) / 2
    assert _centroid(ph, "liver")[2] > mid  # x grows towards the patient's right
    assert _centroid(ph, "spleen")[2] < mid and _centroid(ph, "myocardium")[2] < mid
    assert _centroid(ph, "marrow")[1] < (SHAPE[1] - 1) / 2  # spine is posterior (y grows anterior)
    # The body stays inside the scanner's (inscribed circle) field of view.
    yy, xx = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(SHAPE[1:], SPACING[1:], strict=True)],
                         indexing="ij")
    outside = (yy**2 + xx**2) > (SHAPE[1] * SPACING[1] / 2) ** 2
    assert float(ph.activity[:, torch.from_numpy(outside)].abs().max()) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_uptake_and_attenuation_are_plausible(seed: int) -> None:
    p = make_phantom(SHAPE, SPACING, seed=seed)
    suv = p.activity.numpy() * p.suv_factor
    labels = p.labels.numpy()
    lesion_zone = ndimage.binary_dilation(labels == ID["lesion"], iterations=2)
    for name in ("brain", "liver", "lung", "muscle"):
        core = ndimage.binary_erosion(labels == ID[name]) & ~lesion_zone
        assert core.sum() > 0, name
        lo, hi = SUV_RANGES[name]
        assert lo - 0.05 <= float(np.median(suv[core])) <= hi + 0.05, name
        assert float(np.median(suv[core])) == pytest.approx(p.info["suv"][name], rel=0.02)
        mu = float(np.median(p.mu.numpy()[core]))
        assert mu == pytest.approx(MU_PER_MM[name], rel=0.02)
    for name in ("myocardium", "kidney", "marrow"):  # thin at 12 mm voxels: partial volume lowers
        lo, hi = SUV_RANGES[name]
        assert lo * 0.5 <= float(np.percentile(suv[labels == ID[name]], 90)) <= hi + 0.05, name
    # SUV 1 is ~3.7 MBq/kg: Bq/mL per SUV between 3330 and 4070 (+-10 % dispensing spread).
    assert 3330 <= 1 / p.suv_factor <= 4070
    assert 55 <= p.info["weight_kg"] <= 100
    assert float(p.mu.max()) <= MU_PER_MM["bone"] + 1e-6 and float(p.mu.min()) >= 0
    far_air = ~ndimage.binary_dilation(labels > 0)
    assert float(p.activity.numpy()[far_air].max()) == 0.0  # no activity away from the body
    assert 2 <= len(p.info["lesions"]) <= 8
    assert float(suv.max()) >= 8.0  # bladder / renal pelvis / brain / lesion hot spots


def test_bad_arguments_name_the_value() -> None:
    with pytest.raises(UserError, match=r"shape.*\(0, 40, 40\)"):
        make_phantom((0, 40, 40), SPACING)
    with pytest.raises(UserError, match="spacing_mm"):
        make_phantom(SHAPE, (15.0, -1.0, 12.0))
    with pytest.raises(UserError, match="supersample"):
        make_phantom(SHAPE, SPACING, supersample=0)


def test_texture_keeps_the_mean_uptake_and_varies_it_by_sigma_at_its_scale(ph: Phantom) -> None:
    from lowdose_toolkit.data.phantom import add_texture

    flat = torch.ones(64, 64, 64)
    textured = add_texture(flat, 0.2, 30.0, (6.0, 6.0, 6.0), seed=1)
    assert float(textured.mean()) == pytest.approx(1.0, abs=0.03)  # exp(s G - s^2/2) has mean 1
    assert float(textured.log().std()) == pytest.approx(0.2, rel=0.02)
    assert float((textured[1:] - textured[:-1]).abs().mean()) < 0.1  # smooth (white noise of this spread: 0.32)
    assert torch.equal(add_texture(textured, 0.2, 30.0, (6.0, 6.0, 6.0), seed=1),
                       add_texture(textured, 0.2, 30.0, (6.0, 6.0, 6.0), seed=1))  # seeded
    assert add_texture(ph.activity, 0.0, 15.0, SPACING) is ph.activity  # no texture: untouched
    with pytest.raises(UserError, match="texture sigma -0.1 must be >= 0"):
        add_texture(flat, -0.1, 15.0, SPACING)
