"""The classic 3D U-Net baseline generator (Çiçek et al. 2016)."""

import pytest
import torch
from torch import nn

from ldt_plugins.generators.unet3d import UNet3D
from lowdose_toolkit.errors import UserError


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("shape", [(17, 23, 30), (1, 1, 1), (3, 5, 2), (16, 16, 16)])
@pytest.mark.parametrize("norm", ["batch", "instance", "none"])
def test_unet3d_any_size_same_shape_and_gradients(shape: tuple[int, int, int], norm: str) -> None:
    net = UNet3D(channels=4, num_levels=3, norm=norm).train()
    x = torch.rand(1, 1, *shape)  # batch 1: norms must still see more than one value
    y = net(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_unet3d_features_and_structure() -> None:
    net = UNet3D(channels=4, num_levels=3, max_channels=8)
    assert net.feature_channels == {"enc1": 4, "enc2": 8, "enc3": 8, "bottleneck": 8}
    y, feats = net.forward_features(torch.rand(2, 1, 17, 23, 30))
    assert y.shape == (2, 1, 17, 23, 30)
    for name, tensor in feats.items():
        assert tensor.shape[1] == net.feature_channels[name], name
    assert feats["enc1"].shape[2:] == (20, 24, 32)  # padded to multiples of 4
    assert feats["bottleneck"].shape[2:] == (5, 6, 8)  # two 2×2×2 max-pools
    block = net.encoder[1]
    assert [type(m) for m in block] == [nn.Conv3d, nn.BatchNorm3d, nn.ReLU] * 2
    assert all(c.kernel_size == (3, 3, 3) for c in block if isinstance(c, nn.Conv3d))
    assert all(u.kernel_size == (2, 2, 2) and u.stride == (2, 2, 2) for u in net.up)
    assert net.decoder[0][0].in_channels == 2 * 4  # skip concatenation
    assert "num_levels=3" in repr(net) and "norm='batch'" in repr(net)


def test_unet3d_fits_a_mapping_and_residual_is_identity_at_zero_projection() -> None:
    net = UNet3D(channels=4, num_levels=2)
    x = torch.rand(2, 1, 8, 8, 8)
    target = 3 * x + 1
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = (net(x) - target).abs().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0]
    res = UNet3D(channels=4, num_levels=2, residual=True).eval()
    with torch.no_grad():
        res.project.weight.zero_()
        res.project.bias.zero_()
    assert torch.allclose(res(x), x)


def test_unet3d_errors_and_registration() -> None:
    with pytest.raises(UserError, match="residual=true needs in_channels == out_channels, got 2 and 1"):
        UNet3D(in_channels=2, residual=True)
    with pytest.raises(UserError, match="num_levels=0"):
        UNet3D(num_levels=0)
    with pytest.raises(ValueError, match=r"got shape \(1, 2, 8, 8, 8\)"):
        UNet3D(channels=4, num_levels=2)(torch.rand(1, 2, 8, 8, 8))
    from ldt_plugins.generators import unet3d

    got: dict[str, object] = {}
    unet3d.ldt_register_generators(lambda name, factory: got.setdefault(name, factory))
    assert got == {"unet3d": UNet3D}
    assert sum(p.numel() for p in UNet3D(channels=32).parameters()) == 5_601_121
