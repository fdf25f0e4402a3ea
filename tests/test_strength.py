"""The fitted output strength (lowdose_toolkit/models/strength.py) and the dose head's continuous level."""
from __future__ import annotations

import math

import pytest
import torch

from ldt_plugins.heads.noise_level import NoiseLevelHead
from lowdose_toolkit.models.strength import OutputStrength

DRFS = [4, 10, 20, 50, 100]


def _terms(alpha_true: dict[float, float], seed: int = 0) -> tuple[list[float], list[float], list[float]]:
    """Per volume (level, <d, r>, ||d||²) of residuals r = alpha * d + noise orthogonal-ish to d."""
    g = torch.Generator().manual_seed(seed)
    levels, dot, energy = [], [], []
    for level, a in alpha_true.items():
        d = torch.randn(4000, generator=g, dtype=torch.float64)
        r = a * d + 0.1 * torch.randn(4000, generator=g, dtype=torch.float64)
        levels.append(level)
        dot.append(float(d @ r))
        energy.append(float(d @ d))
    return levels, dot, energy


def test_unfitted_strength_is_the_identity() -> None:
    s = OutputStrength(DRFS)
    low, pred = torch.rand(3, 4, 5), torch.rand(3, 4, 5)
    out, a = s.apply(low, pred.clone(), 1.5)
    assert a == 1.0 and torch.equal(out, pred)


def test_fit_recovers_each_dose_levels_strength_and_interpolates_in_log_drf() -> None:
    s = OutputStrength(DRFS)
    s.fit(*_terms({4: 0.55, 10: 0.8, 20: 0.9, 50: 0.95, 100: 0.97}))
    alpha = s.alpha.tolist()
    assert alpha == pytest.approx([0.55, 0.8, 0.9, 0.95, 0.97], abs=0.01)
    half_way = math.sqrt(4 * 10)  # halfway between DRF 4 and 10 in ln DRF
    assert s.factor(half_way) == pytest.approx((alpha[0] + alpha[1]) / 2, abs=1e-9)
    assert s.factor(400.0) == pytest.approx(alpha[-1])  # above the noisiest class: its strength


def test_cleaner_than_the_cleanest_class_gets_less_and_a_full_dose_input_none() -> None:
    s = OutputStrength(DRFS)
    s.fit(*_terms({4: 0.6, 10: 0.9, 20: 1.0, 50: 1.0, 100: 1.0}))
    alpha = s.alpha.tolist()
    assert s.factor(2.0) == pytest.approx(alpha[0] * (1 - 1 / 2) / (1 - 1 / 4))  # the list-mode share
    assert s.factor(1.0) == 0.0 and s.factor(0.8) == 0.0
    low, pred = torch.rand(2, 3, 4), torch.rand(2, 3, 4)
    out, a = s.apply(low, pred.clone(), 1.0)
    assert a == 0.0 and torch.equal(out, low)  # a full-dose input comes back as it went in
    out, a = s.apply(low, pred.clone(), 2.0)
    assert torch.allclose(out, low + a * (pred - low))


def test_fitted_strengths_stay_in_zero_to_one_and_never_fall_with_the_dose_level() -> None:
    s = OutputStrength(DRFS)
    alpha = s.fit(*_terms({4: -0.2, 10: 1.3, 20: 0.7, 50: 0.9, 100: 1.4}))
    assert alpha[0] == pytest.approx(0.0, abs=1e-6) and max(alpha) <= 1.0
    assert all(b >= a for a, b in zip(alpha, alpha[1:], strict=False))
    assert alpha[1] == pytest.approx(alpha[2])  # 1.0 (clamped) and 0.7 violate the order: pooled


def test_without_a_dose_estimate_one_strength_serves_every_volume() -> None:
    s = OutputStrength(DRFS)
    levels, dot, energy = _terms({4: 0.7, 100: 0.7})
    s.fit([None, None], dot, energy)
    assert s.factor(None) == pytest.approx(0.7, abs=0.01)
    with pytest.raises(ValueError, match="dose level -1"):
        s.factor(-1.0)
    with pytest.raises(ValueError, match="expected equal non-empty lists, got 1, 2, 2 values"):
        s.fit([4.0], dot, energy)


def test_each_subject_is_fitted_alone_and_an_anchor_keeps_the_weakest_reduction_they_ask_for() -> None:
    a = _terms({4: 0.5, 10: 1.0, 20: 1.0, 50: 1.0, 100: 1.0}, seed=1)
    b = _terms({4: 0.7, 10: 0.6, 20: 0.8, 50: 1.0, 100: 1.0}, seed=2)
    s = OutputStrength(DRFS)
    s.fit(a[0] + b[0], a[1] + b[1], a[2] + b[2], groups=["a"] * 5 + ["b"] * 5)
    assert s.alpha.tolist() == pytest.approx([0.7, 1.0, 1.0, 1.0, 1.0], abs=0.01)
    pooled = OutputStrength(DRFS)
    pooled.fit(a[0] + b[0], a[1] + b[1], a[2] + b[2])
    assert pooled.alpha[1] < 0.9  # pooled, subject b's DRF 10 would weaken subject a's correction too


def test_a_state_dict_from_before_the_strength_loads_as_the_identity() -> None:
    s = OutputStrength(DRFS)
    s.load_state_dict({})
    assert not bool(s.fitted) and s.factor(3.0) == 1.0
    s.fit(*_terms({4: 0.5, 100: 0.9}))
    t = OutputStrength(DRFS)
    t.load_state_dict(s.state_dict())
    assert t.factor(2.0) == s.factor(2.0) and bool(t.fitted)


def _noisy(drf: float, seed: int) -> torch.Tensor:
    """Piecewise-constant activity with noise of variance proportional to activity x DRF (as the list-mode
    counts of a scan at that dose level)."""
    g = torch.Generator().manual_seed(seed)
    activity = torch.ones(24, 24, 24)
    activity[6:18, 6:18, 6:18] = 3.0
    return (activity + torch.randn(activity.shape, generator=g) * (activity * drf * 1e-3).sqrt())[None, None]


def test_the_noise_level_head_reads_a_continuous_dose_level_also_below_its_classes() -> None:
    head = NoiseLevelHead(in_channels=1, num_classes=len(DRFS), drfs=DRFS)
    stats = torch.cat([head.statistics(_noisy(d, seed)) for seed in range(3) for d in DRFS])
    head.calibrate(stats, torch.tensor([c for _ in range(3) for c in range(len(DRFS))]))
    for drf in (1, 2, 7, 30, 100):
        logits, level = head.volume_estimate(_noisy(drf, seed=9))
        assert logits.shape == (1, len(DRFS))
        assert level == pytest.approx(drf, rel=0.25)  # a DRF 2 or full-dose volume reads below DRF 4
    assert NoiseLevelHead(in_channels=1, num_classes=2).volume_estimate(_noisy(4, 0))[1] is None  # no drfs known


def test_noise_level_drfs_must_match_the_classes() -> None:
    from lowdose_toolkit.errors import UserError

    with pytest.raises(UserError, match=r"drfs=\[4, 10\] must be 3 DRFs >= 1"):
        NoiseLevelHead(in_channels=1, num_classes=3, drfs=[4, 10])


def test_a_run_without_a_continuous_dose_level_fits_its_strength_at_the_heads_class(tmp_path) -> None:
    """The tiny recipe's paper-style head (no whole-volume estimate): each validation volume's level is the DRF
    its head names, and ldt evaluate applies the fitted strength."""
    import json

    from conftest import make_tiny_dataset, tiny_recipe, write

    from lowdose_toolkit.cli.app import main
    from lowdose_toolkit.core.checkpoint import load_checkpoint

    data = make_tiny_dataset(tmp_path / "data")
    text = tiny_recipe(data).replace("epochs: 3", "epochs: 1").replace("val_subjects: 1}",
                                                                       "val_subjects: 1, fit_strength: true}")
    assert main(["run", str(write(tmp_path / "recipe.yaml", text)), "--out", str(tmp_path / "run")]) == 0
    fit = json.loads((tmp_path / "run" / "strength_fit.json").read_text())
    assert {v["dose_level"] for v in fit["volumes"]} <= {4.0, 100.0}
    assert all(0.0 <= a <= 1.0 for a in fit["anchors"].values()) and fit["anchors"]["4"] <= fit["anchors"]["100"]
    assert bool(load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt").model["strength.fitted"])
