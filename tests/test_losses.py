"""Loss terms of CG-3DSRGAN: L1 (eq. 1), cross-entropy (eq. 2), perceptual (eq. 3), LSGAN (eq. 4)."""

import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from ldt_plugins.losses.cross_entropy import CrossEntropyLoss
from ldt_plugins.losses.l1 import L1Loss
from ldt_plugins.losses.lsgan import LSGANLoss
from ldt_plugins.losses.perceptual import PerceptualLoss
from lowdose_toolkit.errors import UserError
from lowdose_toolkit.models import vgg16


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_real_weights(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Never find a real VGG16 file of this machine: empty hub cache, no env var."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(vgg16.ENV_VAR, raising=False)


@pytest.fixture(scope="module")
def fake_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torchvision-format VGG16 file with random weights (seed 1) plus a classifier key to ignore."""
    path = tmp_path_factory.mktemp("vgg") / "vgg16-397923af.pth"
    state = vgg16.VGG16Features(seed=1).state_dict()
    state["classifier.6.bias"] = torch.zeros(1000)
    torch.save(state, path)
    return path


def volumes(shape: tuple[int, ...] = (2, 1, 12, 12, 12)) -> tuple[torch.Tensor, torch.Tensor]:
    target = torch.rand(shape) * 5.0
    pred = (target + 0.5 * torch.randn(shape)).requires_grad_(True)
    return pred, target


# ---------------------------------------------------------------- L1, cross-entropy, LSGAN


def test_l1_is_mean_absolute_error() -> None:
    pred = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    assert L1Loss()(pred, target).item() == pytest.approx((1 + 2 + 2 + 0) / 4)
    with pytest.raises(ValueError, match=r"pred shape \(2, 2\) != target shape \(1, 2\)"):
        L1Loss()(pred, target[:1])


def test_cross_entropy_on_logits_and_class_indices() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    target = torch.tensor([0, 2])
    log_p = torch.log_softmax(logits, dim=1)
    expected = -(log_p[0, 0] + log_p[1, 2]) / 2
    assert CrossEntropyLoss()(logits, target).item() == pytest.approx(expected.item())
    smoothed = CrossEntropyLoss(label_smoothing=0.3)(logits, target)
    assert smoothed.item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, target, label_smoothing=0.3).item()
    )
    assert "label_smoothing=0.3" in repr(CrossEntropyLoss(label_smoothing=0.3))
    with pytest.raises(ValueError, match="integer class indices"):
        CrossEntropyLoss()(logits, torch.tensor([0.0, 2.0]))
    with pytest.raises(UserError, match="label_smoothing=1.5"):
        CrossEntropyLoss(label_smoothing=1.5)


def test_lsgan_values_on_known_inputs() -> None:
    loss = LSGANLoss()
    assert loss.adversarial is True
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0])
    assert loss(logits, real=True).item() == pytest.approx((1 + 0 + 1 + 4) / 4)
    assert loss(logits, real=False).item() == pytest.approx((0 + 1 + 4 + 1) / 4)
    assert loss(torch.ones(1, 1, 2, 2, 2), real=True).item() == 0.0
    assert loss(torch.zeros(1, 1, 2, 2, 2), real=False).item() == 0.0
    with pytest.raises(TypeError, match="real must be a bool"):
        loss(logits, real=torch.tensor(1.0))  # type: ignore[arg-type]


def test_losses_register_through_the_public_hook() -> None:
    from ldt_plugins.losses import cross_entropy, gradient, l1, lsgan, perceptual

    got: dict[str, object] = {}
    for module in (l1, cross_entropy, lsgan, perceptual, gradient):
        module.ldt_register_losses(lambda name, factory: got.setdefault(name, factory))
    assert got == {
        "l1": L1Loss,
        "cross_entropy": CrossEntropyLoss,
        "lsgan": LSGANLoss,
        "perceptual": PerceptualLoss,
        "gradient": gradient.GradientLoss,
    }


def test_gradient_loss_sees_blur_that_l1_weighs_little() -> None:
    """A blurred step and a noisy step with the same voxel-wise L1: the gradient loss tells the blur apart (it
    flattens the edge) and is zero for an offset (same edges)."""
    from ldt_plugins.losses.gradient import GradientLoss

    step = torch.zeros(1, 1, 16, 4, 4)
    step[:, :, 8:] = 1.0
    loss = GradientLoss()
    assert loss(step + 0.5, step).item() == 0.0  # an offset keeps every edge
    blurred = step.clone()
    blurred[:, :, 6:10] = torch.tensor([0.2, 0.4, 0.6, 0.8]).view(1, 1, 4, 1, 1)
    # Every x-difference along the ramp is 0.2 instead of 0 / 1: 4 of the 15 x-differences per line off by 0.2,
    # one by 0.8 -> mean over x (0.2 * 4 + 0.8) / 15, and y, z untouched.
    assert loss(blurred, step).item() == pytest.approx((0.2 * 4 + 0.8) / 15 / 3)
    with pytest.raises(ValueError, match="pred shape"):
        loss(step, step[:, :, :8])
    with pytest.raises(ValueError, match="2\\+ voxels per axis"):
        loss(step[:, :, :, :1], step[:, :, :, :1])


# ---------------------------------------------------------------- VGG16 trunk


def test_vgg16_layout_matches_torchvision_keys() -> None:
    net = vgg16.VGG16Features()
    keys = list(net.state_dict())
    convs = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert keys == [f"features.{i}.{p}" for i in convs for p in ("weight", "bias")]
    assert net.state_dict()["features.28.weight"].shape == (512, 512, 3, 3)
    assert len(net.features) == 31
    assert vgg16.LAYERS["relu1_2"] == 3 and vgg16.LAYERS["relu4_3"] == 22 and vgg16.LAYERS["pool5"] == 30


def test_vgg16_random_init_is_seeded_and_leaves_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    a, b = vgg16.VGG16Features(seed=3), vgg16.VGG16Features(seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.features[0].weight, b.features[0].weight)
    assert not torch.equal(a.features[0].weight, vgg16.VGG16Features(seed=4).features[0].weight)


def test_save_vgg16_features_round_trips(tmp_path: Path) -> None:
    path = vgg16.save_vgg16_features(tmp_path / "w.pth", seed=7)
    loaded = vgg16.load_vgg16_features(path)
    assert torch.equal(loaded.features[28].bias, vgg16.VGG16Features(seed=7).features[28].bias)


# ---------------------------------------------------------------- perceptual loss


def test_perceptual_zero_for_identical_positive_otherwise() -> None:
    loss = PerceptualLoss(weights="none")
    pred, target = volumes()
    assert loss(target, target).item() == 0.0
    value = loss(pred, target)
    assert value.item() > 0
    assert loss(target + 0.01 * torch.randn_like(target), target) < value


def test_perceptual_gradients_reach_pred_only_and_vgg_is_frozen() -> None:
    loss = PerceptualLoss(weights="none")
    assert all(not p.requires_grad for p in loss.parameters())
    loss.train()
    assert loss.training and not loss.vgg.training  # VGG stays in eval mode
    pred, target = volumes()
    target.requires_grad_(True)
    loss(pred, target).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert target.grad is None
    assert all(p.grad is None for p in loss.parameters())


def test_perceptual_is_seeded_and_samples_slices() -> None:
    loss = PerceptualLoss(weights="none", slice_ratio=0.25)
    pred, target = volumes()
    torch.manual_seed(5)
    a = loss(pred, target)
    torch.manual_seed(5)
    b = loss(pred, target)
    c = loss(pred, target)  # RNG moved on: other slices
    assert a.item() == b.item()
    assert a.item() != c.item()
    full = PerceptualLoss(weights="none", slice_ratio=1.0)
    assert full(pred, target).item() == full(pred, target).item()


def test_perceptual_matches_eq3_on_one_full_axis() -> None:
    """With all slices, one layer and a cube, the loss is the mean over the three axes of eq. 3."""
    loss = PerceptualLoss(weights="none", layers=["relu1_2"], slice_ratio=1.0)
    pred, target = volumes((1, 1, 8, 8, 8))
    pred = pred.detach()
    scale = torch.maximum(pred.abs().max(), target.abs().max())
    expected = []
    for axis in (2, 3, 4):
        p = (pred / scale).movedim(axis, 0).reshape(8, 1, 8, 8)
        t = (target / scale).movedim(axis, 0).reshape(8, 1, 8, 8)
        fp = loss.vgg(loss._to_vgg(p), ["relu1_2"])["relu1_2"]
        ft = loss.vgg(loss._to_vgg(t), ["relu1_2"])["relu1_2"]
        c, h, w = fp.shape[1:]
        expected.append(((fp - ft) ** 2).sum(dim=(1, 2, 3)).div(c * h * w).mean())
    assert loss(pred, target).item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)


def test_perceptual_is_scale_invariant_per_sample() -> None:
    loss = PerceptualLoss(weights="none", slice_ratio=1.0)
    pred, target = volumes((1, 1, 8, 8, 8))
    assert loss(pred * 1000, target * 1000).item() == pytest.approx(loss(pred, target).item(), rel=1e-4)
    zeros = torch.zeros(1, 1, 8, 8, 8)
    assert loss(zeros, zeros).item() == 0.0
    assert math.isfinite(loss(torch.full_like(zeros, 1e-3), zeros).item())  # empty target: no blow-up


def test_perceptual_loads_torchvision_format_file(fake_weights: Path) -> None:
    loaded = PerceptualLoss(weights="imagenet", path=str(fake_weights), slice_ratio=1.0)
    random = PerceptualLoss(weights="none", slice_ratio=1.0)
    assert loaded.record["weights"] == "imagenet"
    assert loaded.record["path"] == str(fake_weights)
    assert loaded.record["sha256"] == vgg16.sha256_file(fake_weights)[:16]
    assert random.record == {
        "network": "vgg16",
        "requested": "none",
        "weights": "none",
        "path": None,
        "sha256": None,
        "seed": 0,
        "layers": ["relu1_2", "relu2_2", "relu3_3", "relu4_3"],
        "slice_ratio": 1.0,
    }
    assert all(not p.requires_grad for p in loaded.parameters())
    pred, target = volumes()
    assert loaded(pred, target).item() != pytest.approx(random(pred, target).item(), rel=1e-3)


def test_perceptual_finds_weights_through_env_and_hub_cache(
    fake_weights: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(vgg16.ENV_VAR, str(fake_weights))
    assert PerceptualLoss(weights="auto").record["path"] == str(fake_weights)
    monkeypatch.delenv(vgg16.ENV_VAR)
    hub = vgg16.hub_weights_path()
    assert hub.is_relative_to(tmp_path)
    hub.parent.mkdir(parents=True)
    hub.symlink_to(fake_weights)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert PerceptualLoss(weights="imagenet").record["path"] == str(hub)


def test_perceptual_missing_file_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError) as err:
        PerceptualLoss(weights="imagenet")
    message = str(err.value)
    assert "\n" not in message
    assert vgg16.VGG16_URL in message
    assert str(vgg16.hub_weights_path()) in message
    assert vgg16.ENV_VAR in message
    missing = tmp_path / "nope.pth"
    with pytest.raises(UserError, match=f"{missing}.*not found"):
        PerceptualLoss(weights="auto", path=str(missing))  # an explicit path is never silently skipped
    monkeypatch.setenv(vgg16.ENV_VAR, str(missing))
    with pytest.raises(UserError, match=rf"{missing} \(from \${vgg16.ENV_VAR}\) not found"):
        PerceptualLoss(weights="imagenet")


def test_perceptual_wrong_file_errors(tmp_path: Path) -> None:
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(UserError, match=f"{text} cannot be read by torch.load"):
        PerceptualLoss(weights="imagenet", path=str(text))
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, other)
    with pytest.raises(UserError, match=r"lacks the keys features\.0\.weight, features\.0\.bias, "):
        PerceptualLoss(weights="imagenet", path=str(other))
    wrong = tmp_path / "vgg11.pth"
    state = vgg16.VGG16Features().state_dict()
    state["features.2.weight"] = torch.zeros(128, 64, 3, 3)
    torch.save(state, wrong)
    with pytest.raises(UserError, match=r"features\.2\.weight has shape \(128, 64, 3, 3\), VGG16 needs"):
        PerceptualLoss(weights="imagenet", path=str(wrong))
    listing = tmp_path / "list.pth"
    torch.save([1, 2, 3], listing)
    with pytest.raises(UserError, match="holds a list, not a state dict"):
        PerceptualLoss(weights="imagenet", path=str(listing))
    pickled = tmp_path / "module.pth"
    torch.save(nn.Linear(2, 2), pickled)  # a whole pickled module: refused by weights_only=True
    with pytest.raises(UserError, match="cannot be read by torch.load"):
        PerceptualLoss(weights="imagenet", path=str(pickled))


def test_perceptual_auto_falls_back_to_random_with_a_warning() -> None:
    with pytest.warns(UserWarning, match="FIXED RANDOM VGG16.*download https://download.pytorch.org"):
        loss = PerceptualLoss()
    assert loss.record["requested"] == "auto"
    assert loss.record["weights"] == "none"
    assert "weights='none' (requested 'auto')" in repr(loss)


def test_perceptual_argument_errors() -> None:
    with pytest.raises(UserError, match=r"unknown VGG16 layers \['relu9_9'\]; choose from conv1_1"):
        PerceptualLoss(weights="none", layers=["relu1_2", "relu9_9"])
    with pytest.raises(UserError, match="slice_ratio=0"):
        PerceptualLoss(weights="none", slice_ratio=0.0)
    with pytest.raises(UserError, match="path='x.pth' is unused with weights: none"):
        PerceptualLoss(weights="none", path="x.pth")
    loss = PerceptualLoss(weights="none")
    with pytest.raises(UserError, match=r"\(8, 8, 6\) is too small for VGG16 layer relu4_3: every side must be >= 8"):
        loss(torch.rand(1, 1, 8, 8, 6), torch.rand(1, 1, 8, 8, 6))
    shallow = PerceptualLoss(weights="none", layers=["relu2_2"])
    assert shallow(torch.rand(1, 1, 8, 8, 2), torch.rand(1, 1, 8, 8, 2)).item() > 0
    with pytest.raises(ValueError, match=r"got \(1, 2, 8, 8, 8\)"):
        loss(torch.rand(1, 2, 8, 8, 8), torch.rand(1, 2, 8, 8, 8))


def test_l1_emphasis_weights_voxels_by_their_full_dose_activity() -> None:
    target = torch.ones(1, 1, 2, 2, 2)
    target[0, 0, 0, 0, 0] = 9.0  # one hot voxel: weights 9/16*8 = 4.5 there, 0.5 elsewhere (mean 1)
    pred = target.clone()
    pred[0, 0, 0, 0, 0] -= 1.0  # an error of 1 on the hot voxel only
    assert float(L1Loss()(pred, target)) == pytest.approx(1 / 8)
    assert float(L1Loss(emphasis=1.0)(pred, target)) == pytest.approx(4.5 / 8)
    cold = target.clone()
    cold[0, 0, 1, 1, 1] -= 1.0  # the same error on a background voxel counts less
    assert float(L1Loss(emphasis=1.0)(cold, target)) == pytest.approx(0.5 / 8)
    with pytest.raises(UserError, match=r"l1: emphasis=-1 must be in \[0, 4\]"):
        L1Loss(emphasis=-1)
