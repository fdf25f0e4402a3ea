"""Every built-in network part builds with its defaults (small widths where it has them) and runs
forward + backward on a tiny odd-sized input. Parametrized over the built-in parts of the registry (a
third-party plugin installed beside the project must not change the project's own suite)."""

from __future__ import annotations

import inspect

import pytest
import torch

from lowdose_toolkit.core.plugin_manager import get_registry

SMALL = {"channels": 4, "depth": 2, "hidden": [8], "n_layers": 1, "num_blocks": 1, "max_channels": 16,
         "weights": "none"}


#: Parts whose examples differ from SMALL: (kind, name) -> kwargs, and heads that read the image.
EXAMPLES = {("head", "noise_level"): {"hidden": 8}}
IMAGE_HEADS = {"noise_level"}


def small_kwargs(kind: str, name: str) -> dict:
    if (kind, name) in EXAMPLES:
        return EXAMPLES[(kind, name)]
    entry = get_registry().get(kind, name)
    return {k: v for k, v in SMALL.items() if k in entry.parameters()}


def entries(kind: str) -> list[str]:
    registry = get_registry()
    return [n for n in registry.names(kind) if registry.get(kind, n).factory.__module__.startswith("ldt_plugins.")]


@pytest.mark.parametrize("name", entries("generator"))
def test_generator_forward_backward(name: str) -> None:
    gen = get_registry().build("generator", {"name": name, **small_kwargs("generator", name)}, "g",
                               context={"in_channels": 1, "out_channels": 1})
    x = torch.rand(2, 1, 13, 18, 21, requires_grad=True)
    y = gen(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert x.grad is not None and all(p.grad is not None for p in gen.parameters() if p.requires_grad)
    if hasattr(gen, "forward_features"):
        y2, feats = gen.forward_features(x)
        assert set(gen.feature_channels) <= set(feats)
        for key, channels in gen.feature_channels.items():
            assert feats[key].shape[:2] == (2, channels)


@pytest.mark.parametrize("name", entries("head"))
def test_head_forward_backward(name: str) -> None:
    channels = 1 if name in IMAGE_HEADS else 16
    head = get_registry().build("head", {"name": name, **small_kwargs("head", name)}, "h",
                                context={"in_channels": channels, "num_classes": 5})
    feature = torch.rand(3, channels, *((12, 12, 12) if name in IMAGE_HEADS else (2, 2, 2)), requires_grad=True)
    out = head(feature)
    assert out.shape[0] == 3
    out.float().sum().backward()
    assert feature.grad is not None


@pytest.mark.parametrize("name", entries("refiner"))
def test_refiner_forward_backward(name: str) -> None:
    ref = get_registry().build("refiner", {"name": name, **small_kwargs("refiner", name)}, "r",
                               context={"in_channels": 1})
    x = torch.rand(2, 1, 9, 10, 11, requires_grad=True)
    y = ref(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("name", entries("discriminator"))
def test_discriminator_forward_backward(name: str) -> None:
    disc = get_registry().build("discriminator", {"name": name, **small_kwargs("discriminator", name)}, "d",
                                context={"in_channels": 1})
    x = torch.rand(2, 1, 16, 16, 16, requires_grad=True)
    cond = torch.rand(2, 1, 16, 16, 16) if getattr(disc, "conditional", False) else None
    logits = disc(x, cond)
    assert logits.shape[0] == 2 and logits.numel() >= 2
    logits.mean().backward()
    assert x.grad is not None


@pytest.mark.parametrize("name", entries("loss"))
def test_loss_forward_backward(name: str) -> None:
    loss = get_registry().build("loss", {"name": name, **small_kwargs("loss", name)}, "l")
    if getattr(loss, "adversarial", False):
        logits = torch.rand(2, 1, 3, 3, 3, requires_grad=True)
        value = loss(logits, True) + loss(logits, False)
        value.backward()
        assert logits.grad is not None and value.ndim == 0
        return
    if "cross" in name or "entropy" in name:
        pred, target = torch.randn(4, 5, requires_grad=True), torch.tensor([0, 1, 2, 4])
    else:
        pred, target = torch.rand(2, 1, 12, 12, 12, requires_grad=True), torch.rand(2, 1, 12, 12, 12)
    value = loss(pred, target)
    assert value.ndim == 0 and torch.isfinite(value) and float(value.detach()) > 0
    value.backward()
    assert pred.grad is not None


@pytest.mark.parametrize("kind", ["generator", "head", "refiner", "discriminator", "loss", "scheme", "source"])
def test_every_part_has_a_docstring_and_typed_signature(kind: str) -> None:
    for name in entries(kind):
        entry = get_registry().get(kind, name)
        assert entry.doc, f"{kind} {name} has no docstring"
        hints = entry.annotations()
        for param, p in entry.parameters().items():
            if p.default is not inspect.Parameter.empty and p.default is not None:
                assert param in hints, f"{kind} {name}: parameter {param!r} has no type annotation"


@pytest.mark.parametrize("name", entries("generator"))
def test_residual_generators_start_as_the_identity(name: str) -> None:
    entry = get_registry().get("generator", name)
    if "residual" not in entry.parameters():
        pytest.skip(f"{name} has no residual option")
    gen = get_registry().build("generator", {"name": name, **small_kwargs("generator", name), "residual": True},
                               "g", context={"in_channels": 1, "out_channels": 1})
    x = torch.rand(2, 1, 16, 16, 16)
    torch.testing.assert_close(gen(x), x)
