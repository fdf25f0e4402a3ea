"""Networks of CG-3DSRGAN: ML-Net (+ dose classifier head), Contextual-Net, 3D PatchGAN."""

import pytest
import torch
from torch import nn

from ldt_plugins.discriminators.patchgan3d import PatchGAN3D
from ldt_plugins.generators.mlnet import MLNet
from ldt_plugins.generators.shapes import pad_to_multiple
from ldt_plugins.heads.dose_classifier import DoseClassifier
from ldt_plugins.refiners.contextual_net import ContextualNet
from lowdose_toolkit.errors import UserError


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- ML-Net


@pytest.mark.parametrize("shape", [(17, 23, 30), (8, 8, 8), (3, 5, 2), (32, 16, 9)])
def test_mlnet_any_size_gives_same_shape_and_gradients(shape: tuple[int, int, int]) -> None:
    net = MLNet(channels=4, depth=3).train()
    x = torch.rand(2, 1, *shape)
    y = net(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert net.encoder[0][0].weight.grad.abs().sum() > 0


def test_mlnet_trains_with_batch_one_and_tiny_patch() -> None:
    """BatchNorm must never see a single value per channel (1×1×1 bottleneck, batch 1)."""
    net = MLNet(channels=4, depth=3).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x = torch.rand(1, 1, 4, 4, 4)  # padded to 8³: bottleneck is 1×1×1
    target = 2 * x
    losses = []
    for _ in range(15):
        opt.zero_grad()
        _, feats = net.forward_features(x)
        assert feats["bottleneck"].shape[2:] == (1, 1, 1)
        loss = (net(x) - target).abs().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_mlnet_features_match_feature_channels() -> None:
    net = MLNet(channels=4, depth=3, max_channels=8)
    assert net.feature_channels == {"enc1": 4, "enc2": 8, "enc3": 8, "bottleneck": 8}
    x = torch.rand(1, 1, 17, 23, 30)
    y, feats = net.forward_features(x)
    assert set(feats) == set(net.feature_channels)
    for name, tensor in feats.items():
        assert tensor.shape[1] == net.feature_channels[name], name
    assert feats["bottleneck"] is feats["enc3"]
    # padded to a multiple of 8: 24 × 24 × 32, halved per level
    assert feats["enc1"].shape[2:] == (12, 12, 16)
    assert feats["bottleneck"].shape[2:] == (3, 3, 4)
    net.eval()
    assert torch.equal(net(x), net.forward_features(x)[0])


def test_mlnet_follows_pix2pix_block_conventions() -> None:
    net = MLNet(channels=4, depth=4)
    outermost, middle, innermost = net.encoder[0], net.encoder[1], net.encoder[3]
    assert [type(m) for m in outermost] == [nn.Conv3d]
    assert [type(m) for m in middle] == [nn.LeakyReLU, nn.Conv3d, nn.BatchNorm3d]
    assert [type(m) for m in innermost] == [nn.LeakyReLU, nn.Conv3d]
    conv = middle[1]
    assert (conv.kernel_size, conv.stride, conv.padding) == ((3, 3, 3), (2, 2, 2), (1, 1, 1))
    assert middle[0].negative_slope == 0.2
    for block in net.decoder[1:]:
        assert [type(m) for m in block] == [nn.ReLU, nn.ConvTranspose3d, nn.BatchNorm3d]
        assert block[1].output_padding == (1, 1, 1)
    # pix2pix's outermost up block, minus its Tanh: no norm, straight to out_channels, with bias
    assert [type(m) for m in net.decoder[0]] == [nn.ReLU, nn.ConvTranspose3d]
    assert net.output_layer is net.decoder[0][1]
    assert (net.output_layer.out_channels, net.output_layer.bias is not None) == (1, True)
    assert len(net.encoder) == len(net.decoder) == 4


def test_mlnet_output_is_linear_not_tanh() -> None:
    """PET is non-negative and unbounded: outputs far above 1 must be reachable."""
    net = MLNet(channels=4, depth=2).eval()
    with torch.no_grad():
        net.output_layer.bias.fill_(50.0)
    assert net(torch.rand(1, 1, 8, 8, 8)).min() > 10


def test_mlnet_residual_adds_input() -> None:
    net = MLNet(channels=4, depth=2, residual=True).eval()
    with torch.no_grad():
        net.output_layer.weight.zero_()
        net.output_layer.bias.zero_()
    x = torch.rand(1, 1, 7, 9, 8)
    assert torch.allclose(net(x), x)


def test_mlnet_dropout_only_in_inner_decoder_blocks() -> None:
    net = MLNet(channels=4, depth=3, dropout=0.5)
    has_dropout = [any(isinstance(m, nn.Dropout) for m in block) for block in net.decoder]
    assert has_dropout == [False, True, True]
    net.eval()
    x = torch.rand(1, 1, 8, 8, 8)
    assert torch.equal(net(x), net(x))


def test_mlnet_errors_name_values() -> None:
    with pytest.raises(UserError, match="residual=true needs in_channels == out_channels, got 2 and 1"):
        MLNet(in_channels=2, out_channels=1, residual=True)
    with pytest.raises(UserError, match="depth=0"):
        MLNet(depth=0)
    with pytest.raises(ValueError, match=r"got shape \(1, 2, 8, 8, 8\)"):
        MLNet(channels=4, depth=2)(torch.rand(1, 2, 8, 8, 8))


def test_mlnet_repr_and_paper_width_size() -> None:
    net = MLNet()
    assert "channels=32, depth=5, max_channels=256" in repr(net)
    assert net.feature_channels["bottleneck"] == 256
    assert 6_000_000 < n_params(net) < 8_000_000


def test_pad_to_multiple_crops_back() -> None:
    x = torch.arange(3 * 5 * 6, dtype=torch.float).view(1, 1, 3, 5, 6)
    padded, crop = pad_to_multiple(x, 4)
    assert padded.shape[2:] == (4, 8, 8)
    assert torch.equal(padded[crop], x)
    assert padded[0, 0, 0, 0, 0] == x[0, 0, 0, 0, 0]  # replicate padding: no artificial zero edge


# ---------------------------------------------------------------- dose classifier head


@pytest.mark.parametrize("pool", ["avg", "max", "std", "avgmax", "avgstd"])
def test_dose_classifier_reads_the_bottleneck(pool: str) -> None:
    net = MLNet(channels=4, depth=3)
    head = DoseClassifier(in_channels=net.feature_channels["bottleneck"], num_classes=5, pool=pool)
    _, feats = net.forward_features(torch.rand(3, 1, 9, 10, 11))
    logits = head(feats["bottleneck"])
    assert logits.shape == (3, 5)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 3, 4])).backward()
    assert net.encoder[0][0].weight.grad.abs().sum() > 0  # the head guides the shared encoder


def test_dose_classifier_learns_to_separate_classes() -> None:
    head = DoseClassifier(in_channels=4, num_classes=3, hidden=[16, 8], dropout=0.1)
    feats = torch.randn(30, 4, 2, 2, 2) + torch.arange(30).remainder(3).view(-1, 1, 1, 1, 1).float() * 3
    labels = torch.arange(30).remainder(3)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(feats), labels).backward()
        opt.step()
    head.eval()
    assert (head(feats).argmax(1) == labels).float().mean() > 0.9


def _fit_head(pool: str, feats: torch.Tensor, labels: torch.Tensor) -> float:
    torch.manual_seed(0)
    head = DoseClassifier(in_channels=feats.shape[1], num_classes=3, hidden=[16], pool=pool)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(feats), labels).backward()
        opt.step()
    return (head(feats).argmax(1) == labels).float().mean().item()


def test_std_pooling_reads_the_noise_level_that_average_pooling_cannot() -> None:
    """Same mean, different spread (what a dose reduction does to a feature map): only std/avgstd see it."""
    labels = torch.arange(60).remainder(3)
    gen = torch.Generator().manual_seed(1)
    feats = 5 + torch.randn(60, 4, 4, 4, 4, generator=gen) * (0.5 + labels.float()).view(-1, 1, 1, 1, 1)
    feats = feats - feats.mean(dim=(2, 3, 4), keepdim=True) + 5  # exactly the same mean per channel
    assert _fit_head("avg", feats, labels) < 0.5  # chance is 1/3
    assert _fit_head("std", feats, labels) > 0.95
    assert _fit_head("avgstd", feats, labels) > 0.95


@pytest.mark.parametrize("scale", [0.0, 0.25, 1.0])
def test_encoder_grad_scales_only_the_guidance_into_the_encoder(scale: float) -> None:
    torch.manual_seed(0)
    net = MLNet(channels=4, depth=3)
    x, labels = torch.rand(3, 1, 9, 10, 11), torch.tensor([0, 3, 4])
    grads = {}
    for s in (1.0, scale):
        torch.manual_seed(1)
        head = DoseClassifier(in_channels=net.feature_channels["bottleneck"], num_classes=5, encoder_grad=s)
        net.zero_grad()
        _, feats = net.forward_features(x)
        torch.nn.functional.cross_entropy(head(feats["bottleneck"]), labels).backward()
        enc = net.encoder[0][0].weight
        grads[s] = (torch.zeros_like(enc) if enc.grad is None else enc.grad.clone(), head.mlp[0].weight.grad.clone())
    torch.testing.assert_close(grads[scale][0], scale * grads[1.0][0])  # the encoder gets the scaled gradient
    torch.testing.assert_close(grads[scale][1], grads[1.0][1])  # the head itself learns as before


def test_dose_classifier_structure_and_errors() -> None:
    linear = DoseClassifier(in_channels=8, num_classes=5, hidden=[], pool="avgmax")
    assert [type(m) for m in linear.mlp] == [nn.Linear]
    assert linear.mlp[0].in_features == 16
    assert "hidden=[]" in repr(linear)
    with pytest.raises(ValueError, match=r"\[B, 8, \.\.\.\], got shape \(2, 4, 2, 2, 2\)"):
        linear(torch.rand(2, 4, 2, 2, 2))
    with pytest.raises(UserError, match="num_classes=1"):
        DoseClassifier(in_channels=8, num_classes=1)
    assert DoseClassifier(in_channels=8, num_classes=5, pool="avgstd").mlp[0].in_features == 16
    with pytest.raises(UserError, match=r"encoder_grad=-1.0 must be >= 0 \(1 = the paper, 0 = a probe\)"):
        DoseClassifier(in_channels=8, num_classes=5, encoder_grad=-1.0)
    with pytest.raises(UserError, match="pool='var' must be one of 'avg', 'max', 'std', 'avgmax', 'avgstd'"):
        DoseClassifier(in_channels=8, num_classes=5, pool="var")  # type: ignore[arg-type]


# ---------------------------------------------------------------- Contextual-Net


def test_contextual_net_shape_and_structure() -> None:
    net = ContextualNet(channels=4)
    x = torch.rand(2, 1, 9, 10, 11, requires_grad=True)
    y = net(x)
    assert y.shape == x.shape
    y.mean().backward()
    assert x.grad is not None
    convs = [m for m in net.modules() if isinstance(m, nn.Conv3d)]
    assert len(convs) == 1 + 2 * 2 + 2  # Conv - RB - RB - Conv - Conv
    assert all(c.kernel_size == (3, 3, 3) and c.stride == (1, 1, 1) for c in convs)
    assert "num_blocks=2" in repr(net)


def test_contextual_net_is_identity_when_last_conv_is_zero() -> None:
    net = ContextualNet(channels=4, num_blocks=3)
    with torch.no_grad():
        net.last_conv.weight.zero_()
        net.last_conv.bias.zero_()
    x = torch.rand(1, 1, 6, 7, 8)
    assert torch.equal(net(x), x)


def test_contextual_net_residual_block_adds_its_input() -> None:
    net = ContextualNet(channels=4, num_blocks=1)
    block = net.blocks[0]
    with torch.no_grad():
        block.body[-1].weight.zero_()
        block.body[-1].bias.zero_()
    h = torch.rand(1, 4, 5, 5, 5)
    assert torch.equal(block(h), h)


def test_contextual_net_learns_a_correction() -> None:
    net = ContextualNet(channels=4)
    x = torch.rand(2, 1, 8, 8, 8)
    target = x + 0.5
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = (net(x) - target).abs().mean()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < 0.5 * first


# ---------------------------------------------------------------- PatchGAN


@pytest.mark.parametrize(
    ("size", "n_layers", "out"),
    [(32, 3, 2), (24, 3, 1), (64, 3, 6), (16, 2, 2), (12, 2, 1)],
)
def test_patchgan_output_shape(size: int, n_layers: int, out: int) -> None:
    d = PatchGAN3D(channels=4, n_layers=n_layers).train()
    x = torch.rand(1, 1, size, size, size)
    logits = d(x, condition=x)
    assert logits.shape == (1, 1, out, out, out)
    assert d.min_size == 3 * 2**n_layers


def test_patchgan_is_pix2pix_in_3d() -> None:
    d = PatchGAN3D(channels=4, n_layers=3)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv3d)]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert all(c.kernel_size == (4, 4, 4) and c.padding == (1, 1, 1) for c in convs)
    assert [c.out_channels for c in convs] == [4, 8, 16, 32, 1]
    assert convs[0].in_channels == 2  # condition + image
    assert [c.bias is not None for c in convs] == [True, False, False, False, True]
    assert not any(isinstance(m, nn.Sigmoid) for m in d.modules())  # LSGAN: raw logits
    assert sum(isinstance(m, nn.BatchNorm3d) for m in d.modules()) == 3
    assert PatchGAN3D(channels=4, conditional=False).model[0].in_channels == 1
    assert sum(isinstance(m, nn.InstanceNorm3d) for m in PatchGAN3D(channels=4, norm="instance").modules()) == 3
    assert "min_size=24" in repr(d)


def test_patchgan_condition_matters_and_gradients_flow() -> None:
    d = PatchGAN3D(channels=4, n_layers=2, norm="instance")
    image = torch.rand(2, 1, 16, 16, 16, requires_grad=True)
    a = d(image, condition=torch.zeros_like(image))
    b = d(image, condition=torch.ones_like(image))
    assert not torch.allclose(a, b)
    a.mean().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0


def test_patchgan_errors() -> None:
    d = PatchGAN3D(channels=4)
    x = torch.rand(1, 1, 16, 16, 16)
    with pytest.raises(ValueError, match="needs the low-dose condition"):
        d(x)
    with pytest.raises(UserError, match=r"\(16, 16, 16\) is too small for n_layers=3; every side must be >= 24"):
        d(x, condition=x)
    with pytest.raises(ValueError, match="got a condition"):
        PatchGAN3D(channels=4, conditional=False)(x, condition=x)
    with pytest.raises(ValueError, match=r"condition shape \(1, 1, 8, 8, 8\)"):
        d(x, condition=torch.rand(1, 1, 8, 8, 8))
    with pytest.raises(UserError, match="norm='group'"):
        PatchGAN3D(norm="group")  # type: ignore[arg-type]


def test_paper_width_parameter_counts() -> None:
    """Sizes at the paper's widths (reported in the docs; guards against silent architecture drift)."""
    assert n_params(MLNet(channels=32)) == 7_027_329
    assert n_params(ContextualNet(channels=32)) == 140_161
    assert n_params(PatchGAN3D(channels=64)) == 11_052_865
    assert n_params(DoseClassifier(in_channels=256, num_classes=5)) == 33_541


def test_parts_register_through_the_public_hook() -> None:
    from ldt_plugins.discriminators import patchgan3d
    from ldt_plugins.generators import mlnet
    from ldt_plugins.heads import dose_classifier
    from ldt_plugins.refiners import contextual_net

    got: dict[str, object] = {}
    mlnet.ldt_register_generators(lambda name, factory: got.setdefault(name, factory))
    dose_classifier.ldt_register_heads(lambda name, factory: got.setdefault(name, factory))
    contextual_net.ldt_register_refiners(lambda name, factory: got.setdefault(name, factory))
    patchgan3d.ldt_register_discriminators(lambda name, factory: got.setdefault(name, factory))
    assert got == {
        "mlnet": MLNet,
        "dose_classifier": DoseClassifier,
        "contextual_net": ContextualNet,
        "patchgan3d": PatchGAN3D,
    }
