"""Classical reference methods: Gaussian smoothing, its per-DRF tuning, the noise estimate, BM4D."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from lowdose_toolkit.errors import UserError
from lowdose_toolkit.evaluation.classical import (
    bm4d_denoise,
    estimate_noise_sigma,
    gaussian,
    gaussian_sweep,
    tune_gaussian_sigma,
)
from lowdose_toolkit.evaluation.metrics import psnr


def phantom(n: int = 24, seed: int = 0) -> torch.Tensor:
    """Warm background, four hot Gaussian blobs and a slab of air, float64 ``[n, n, n]``."""
    rng = np.random.default_rng(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64)] * 3, indexing="ij"), dim=-1)
    vol = torch.full((n, n, n), 100.0, dtype=torch.float64)
    for _ in range(4):
        centre = torch.tensor(rng.uniform(4, n - 4, 3))
        radius = rng.uniform(2, 4)
        vol += rng.uniform(200, 800) * torch.exp(-((grid - centre) ** 2).sum(-1) / (2 * radius**2))
    vol[:, :, :3] = 0.0
    return vol


def low_dose(full: torch.Tensor, drf: int, seed: int) -> torch.Tensor:
    """Count-like noise at 1/DRF of the counts, rescaled to the full-dose units (as the tiny data set)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.poisson(full * 0.5 / drf, generator=gen) * drf / 0.5


def test_gaussian_keeps_a_constant_and_its_shape_dtype() -> None:
    vol = torch.full((1, 9, 12, 7), 3.5)
    out = gaussian(vol, 2.0)
    assert out.shape == vol.shape and out.dtype == torch.float32
    assert torch.allclose(out, vol, atol=1e-5)
    assert torch.equal(gaussian(vol, 0.0), vol)
    assert gaussian(torch.ones(5, 5, 5, dtype=torch.int64), 1.0).dtype == torch.float32
    # A kernel wider than the volume is truncated to it, not an error.
    assert torch.allclose(gaussian(torch.full((1, 3, 3, 3), 2.0), 5.0), torch.full((1, 3, 3, 3), 2.0))


def test_gaussian_matches_scipy_mirror_mode() -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    vol = torch.rand(1, 13, 17, 11, dtype=torch.float64)
    for sigma in (0.5, 0.8, 2.0, (1.0, 0.0, 2.5)):
        ref = ndimage.gaussian_filter(vol[0].numpy(), sigma, mode="mirror", truncate=4.0)
        assert np.allclose(gaussian(vol, sigma)[0].numpy(), ref, atol=1e-12), sigma
        single = gaussian(vol.float(), sigma)  # float32 in, float32 out (the guard's path)
        assert single.dtype == torch.float32 and np.allclose(single[0].numpy(), ref, atol=1e-6), sigma


def test_gaussian_reduces_white_noise_variance_as_theory_says() -> None:
    noise = torch.randn(1, 48, 48, 48, dtype=torch.float64)
    sigma = 1.5
    smoothed = gaussian(noise, sigma)[0, 8:-8, 8:-8, 8:-8]
    ratio = float(smoothed.var() / noise.var())
    theory = (1.0 / (2.0 * np.sqrt(np.pi) * sigma)) ** 3  # sum of the squared 3D kernel
    assert ratio == pytest.approx(theory, rel=0.15)
    assert abs(float(gaussian(noise + 10, sigma).mean()) - float((noise + 10).mean())) < 0.01


@pytest.mark.parametrize("bad", [-1.0, float("nan"), (1.0, 2.0)])
def test_gaussian_rejects_bad_sigma(bad: object) -> None:
    with pytest.raises(UserError, match="sigma_vox"):
        gaussian(torch.ones(1, 4, 4, 4), bad)  # type: ignore[arg-type]


def test_tuned_sigma_grows_with_the_dose_reduction_factor() -> None:
    pairs: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for drf in (4, 20, 100):
        pairs[drf] = []
        for s in range(2):
            full = phantom(seed=s)
            pairs[drf].append((low_dose(full, drf, seed=10 * drf + s)[None], full[None]))
    best = tune_gaussian_sigma(pairs)
    assert set(best) == {4, 20, 100}
    assert 0 < best[4] < best[20] < best[100], best
    curve = gaussian_sweep(pairs[100])
    assert curve[best[100]] > curve[0.0] + 3  # filtering the noisiest input gains several dB
    assert curve[best[100]] == max(curve.values())


def test_tuning_needs_pairs() -> None:
    with pytest.raises(UserError, match="no DRFs"):
        tune_gaussian_sigma({})
    with pytest.raises(UserError, match="no \\(low, full\\) pairs"):
        tune_gaussian_sigma({4: []})
    with pytest.raises(UserError, match="sigmas"):
        gaussian_sweep([(torch.ones(4, 4, 4), torch.ones(4, 4, 4))], sigmas=[])


def test_noise_estimate_finds_white_and_correlated_noise_levels() -> None:
    gen = torch.Generator().manual_seed(0)
    body = torch.full((40, 40, 40), 50.0, dtype=torch.float64)
    body[:, :, :8] = 0.0  # air must not pull the estimate down
    white = torch.randn(body.shape, generator=gen, dtype=torch.float64)
    assert estimate_noise_sigma(body + 3 * white) == pytest.approx(3.0, rel=0.08)
    correlated = gaussian(white, 0.8)  # like post-smoothed reconstruction noise
    true_sd = float(correlated[:, :, 8:].std())
    assert estimate_noise_sigma(body + 3 * correlated) == pytest.approx(3 * true_sd, rel=0.15)


def test_bm4d_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bm4d", None)  # makes `import bm4d` raise ImportError
    with pytest.raises(UserError, match=r"pip install 'lowdose-toolkit\[bm4d\]'"):
        bm4d_denoise(torch.ones(1, 8, 8, 8))


def test_bm4d_denoises_a_small_count_like_volume() -> None:
    pytest.importorskip("bm4d")
    full = phantom(n=16, seed=3)
    low = low_dose(full, 50, seed=1)[None].float()
    out = bm4d_denoise(low)
    assert out.shape == low.shape and out.dtype == torch.float32
    assert bool(torch.isfinite(out).all()) and float(out.min()) >= 0
    assert psnr(full, out[0]) > psnr(full, low[0]) + 3
    with pytest.raises(UserError, match=">= 5 voxels"):
        bm4d_denoise(torch.ones(1, 4, 8, 8))
