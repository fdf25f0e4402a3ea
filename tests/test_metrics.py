"""Metrics agree with the challenge's formulas and scikit-image, on whole volumes and in slabs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import normalized_root_mse, structural_similarity
from skimage.util import crop

from lowdose_toolkit.errors import DataError, UserError
from lowdose_toolkit.evaluation import metrics

SHAPES = [(20, 23, 17), (9, 31, 12), (7, 7, 7)]


def _blobs(shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A PET-like reference (gaussian blobs on a body) and a noisy, slightly biased estimate."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    ref = np.zeros(shape)
    for _ in range(5):
        centre = rng.uniform(-0.6, 0.6, len(shape))
        width = rng.uniform(0.1, 0.4)
        ref += rng.uniform(1, 10) * np.exp(-sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True)) / width**2)
    body = sum(g**2 for g in grids) < 0.8
    ref = ref * body + 0.5 * body
    pred = ref * 1.02 + 0.05 * rng.standard_normal(shape) * body
    return ref, pred


def _random(shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ref = rng.gamma(2.0, 1.0, shape)
    return ref, ref + 0.3 * rng.standard_normal(shape)


def _volumes() -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for i, shape in enumerate(SHAPES):
        out.append(_blobs(shape, i))
        out.append(_random(shape, 10 + i))
    return out


def _np_rmse(ref: np.ndarray, pred: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(ref - pred))))


@pytest.fixture(params=[None, 1500], ids=["one-slab", "many-slabs"])
def slabs(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run each test once with whole-volume slabs and once with slabs of a few planes."""
    if request.param is not None:
        monkeypatch.setattr(metrics, "SLAB_VOXELS", request.param)


@pytest.mark.usefixtures("slabs")
@pytest.mark.parametrize("case", range(2 * len(SHAPES)))
def test_error_metrics_match_challenge_formulas(case: int) -> None:
    ref, pred = _volumes()[case]
    err = _np_rmse(ref, pred)
    assert metrics.rmse(ref, pred) == pytest.approx(err, rel=1e-10)
    # The challenge's PSNR: peak = max(ref), not skimage's data range.
    assert metrics.psnr(ref, pred) == pytest.approx(20 * np.log10(ref.max() / err), abs=1e-6)
    assert metrics.nrmse(ref, pred) == pytest.approx(normalized_root_mse(ref, pred, normalization="min-max"))
    assert metrics.nrmse(ref, pred) == pytest.approx(err / (ref.max() - ref.min()), rel=1e-10)


@pytest.mark.usefixtures("slabs")
@pytest.mark.parametrize("case", range(2 * len(SHAPES)))
@pytest.mark.parametrize(("name", "data_range"), [("challenge", 2), ("standard", 1)])
def test_ssim_matches_skimage(case: int, name: str, data_range: int) -> None:
    ref, pred = _volumes()[case]
    expected = structural_similarity(ref / ref.max(), pred / pred.max(), data_range=data_range, win_size=7)
    assert metrics.ssim(ref, pred, data_range=name) == pytest.approx(expected, abs=1e-10)


def test_ssim_2d_and_float32_torch_input() -> None:
    ref, pred = _blobs((40, 33), 3)
    expected = structural_similarity(ref / ref.max(), pred / pred.max(), data_range=2, win_size=7)
    assert metrics.ssim(ref, pred) == pytest.approx(expected, abs=1e-10)
    ref3, pred3 = _blobs((12, 19, 15), 4)
    r32, p32 = ref3.astype(np.float32), pred3.astype(np.float32)
    # The challenge read NIfTI as float64, so compare with skimage on the float64 copies.
    expected = structural_similarity(
        r32.astype(np.float64) / r32.max(), p32.astype(np.float64) / p32.max(), data_range=2, win_size=7
    )
    got = metrics.ssim(torch.from_numpy(r32)[None, None], torch.from_numpy(p32)[None])
    assert got == pytest.approx(expected, abs=1e-6)
    # A 2-D image as NIfTI stores it, [X, Y, 1] (and masked): the 2-D figures (it was 'SSIM needs every
    # dimension >= 7 voxels, got shape (40, 33, 1)', and the pair failed).
    mask = metrics.body_mask(ref, threshold_fraction=0.05)
    for got, want in ((metrics.compute_all(ref[..., None], pred[..., None]), metrics.compute_all(ref, pred)),
                      (metrics.compute_all(ref[:, None], pred[:, None], mask=mask[:, None]),
                       metrics.compute_all(ref, pred, mask=mask))):
        assert got == pytest.approx(want, abs=1e-12)


@pytest.mark.usefixtures("slabs")
def test_masked_metrics_match_numpy() -> None:
    ref, pred = _blobs((18, 21, 16), 5)
    mask = metrics.body_mask(ref, threshold_fraction=0.05).numpy()
    assert 0 < mask.sum() < mask.size
    d = (ref - pred)[mask]
    err = float(np.sqrt(np.mean(d**2)))
    assert metrics.rmse(ref, pred, mask=mask) == pytest.approx(err, rel=1e-10)
    hi, lo = ref[mask].max(), ref[mask].min()
    assert metrics.psnr(ref, pred, mask=mask) == pytest.approx(20 * np.log10(hi / err), abs=1e-6)
    assert metrics.nrmse(ref, pred, mask=mask) == pytest.approx(err / (hi - lo), rel=1e-10)
    _, smap = structural_similarity(ref / ref.max(), pred / pred.max(), data_range=2, win_size=7, full=True)
    expected = crop(smap, 3)[crop(mask, 3)].mean()
    assert metrics.ssim(ref, pred, mask=torch.from_numpy(mask)) == pytest.approx(expected, abs=1e-10)
    everything = np.ones_like(mask)
    assert metrics.ssim(ref, pred, mask=everything) == pytest.approx(metrics.ssim(ref, pred), abs=1e-12)


def test_body_mask_fills_enclosed_holes() -> None:
    ref = np.zeros((20, 20, 20))
    ref[3:17, 3:17, 3:17] = 1.0
    ref[8:12, 8:12, 8:12] = 0.0  # a cold "lung" inside the body
    ref[5, 5, 5] = 4.0
    mask = metrics.body_mask(ref, threshold_fraction=0.1)
    assert mask.dtype == torch.bool
    assert bool(mask[9, 9, 9]) and not bool(mask[0, 0, 0])
    assert int(mask.sum()) == 14**3
    assert int(metrics.body_mask(ref, 0.1, fill_holes=False).sum()) == 14**3 - 4**3


def test_compute_all_bundles_metrics() -> None:
    ref, pred = _blobs((16, 17, 18), 6)
    out = metrics.compute_all(ref, pred, ssim_range="standard")
    assert out["psnr"] == pytest.approx(metrics.psnr(ref, pred))
    assert out["nrmse"] == pytest.approx(metrics.nrmse(ref, pred))
    assert out["ssim"] == pytest.approx(metrics.ssim(ref, pred, "standard"))
    assert out["ssim_range"] == "standard" and out["ssim_data_range"] == 1.0 and out["masked"] is False
    masked = metrics.compute_all(ref, pred, mask=metrics.body_mask(ref))
    assert masked["masked"] is True and masked["ssim_data_range"] == 2.0


def test_identical_volumes() -> None:
    ref, _ = _blobs((10, 11, 12), 7)
    out = metrics.compute_all(ref, ref.copy())
    assert out["psnr"] == math.inf
    assert out["nrmse"] == 0.0 and out["rmse"] == 0.0
    assert out["ssim"] == pytest.approx(1.0, abs=1e-12)


def test_constant_reference_is_a_clear_error() -> None:
    ref = np.full((8, 8, 8), 3.0)
    pred = ref + np.random.default_rng(0).random(ref.shape)
    for fn in (metrics.psnr, metrics.nrmse, metrics.ssim, metrics.compute_all):
        with pytest.raises(DataError, match="constant.*= 3"):
            fn(ref, pred)


def test_bad_inputs_are_named() -> None:
    ref, pred = _blobs((8, 9, 10), 8)
    with pytest.raises(UserError, match=r"\(8, 9, 10\) vs \(8, 9, 11\)"):
        metrics.psnr(ref, np.zeros((8, 9, 11)))
    with pytest.raises(UserError, match="every dimension >= 7"):
        metrics.ssim(ref[:6], pred[:6])
    with pytest.raises(UserError, match="'wide'"):
        metrics.ssim(ref, pred, data_range="wide")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="prediction maximum is 0"):
        metrics.ssim(ref, np.zeros_like(ref))
    bad = pred.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(DataError, match="pred has 1 NaN"):
        metrics.compute_all(ref, bad)
    with pytest.raises(UserError, match="mask must be boolean"):
        metrics.rmse(ref, pred, mask=np.ones(ref.shape))
    with pytest.raises(DataError, match="selects no voxel"):
        metrics.rmse(ref, pred, mask=np.zeros(ref.shape, dtype=bool))
    with pytest.raises(DataError, match="reference maximum is -1"):
        metrics.psnr(-ref - 1, pred)
