"""Every built-in part passes the conformance checks plugin authors use (lowdose_toolkit.testing): it builds
with the small arguments it declares, honours its kind's contract on odd-sized inputs, and trains a few
steps inside a tiny recipe. Parametrized over the built-in parts only: a third-party plugin installed
beside the project must not change the project's own suite."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch import nn

from lowdose_toolkit.core.plugin_manager import get_registry
from lowdose_toolkit.testing import check_part, example_args, train_steps

KINDS = ("generator", "head", "refiner", "discriminator", "loss")


def entries(kind: str) -> list[str]:
    registry = get_registry()
    return [n for n in registry.names(kind) if registry.get(kind, n).factory.__module__.startswith("ldt_plugins.")]


PARTS = [(kind, name) for kind in KINDS for name in entries(kind)]


@pytest.mark.parametrize(("kind", "name"), PARTS, ids=[f"{k}-{n}" for k, n in PARTS])
def test_builtin_part_conforms(kind: str, name: str) -> None:
    check_part(kind, name)


def test_a_heads_whole_volume_estimate_is_checked_when_it_has_one() -> None:
    from ldt_plugins.heads.noise_level import NoiseLevelHead
    from lowdose_toolkit.core.registry import Registry

    class TwoLogits(NoiseLevelHead):
        def volume_logits(self, volume: torch.Tensor) -> torch.Tensor:
            return torch.zeros(1, 2)  # not one per class

    registry = Registry()
    registry.add("head", "two_logits", TwoLogits, "test-plugin")
    with pytest.raises(AssertionError, match=r"two_logits.*volume_logits must return finite \[1, num_classes\]"):
        check_part("head", "two_logits", {}, registry)


def test_a_heads_continuous_dose_level_is_checked_when_it_has_one() -> None:
    from ldt_plugins.heads.noise_level import NoiseLevelHead
    from lowdose_toolkit.core.registry import Registry

    class NegativeLevel(NoiseLevelHead):
        def volume_estimate(self, volume: torch.Tensor) -> tuple[torch.Tensor, float | None]:
            return super().volume_estimate(volume)[0], -1.0  # a dose level must be positive

    registry = Registry()
    registry.add("head", "negative_level", NegativeLevel, "test-plugin")
    with pytest.raises(AssertionError, match=r"negative_level.*volume_estimate must return .*-1\.0"):
        check_part("head", "negative_level", {}, registry)


TRAINED = PARTS + [("guidance", n) for n in entries("guidance")]


@pytest.mark.parametrize(("kind", "name"), TRAINED, ids=[f"{k}-{n}" for k, n in TRAINED])
def test_builtin_part_trains_in_a_tiny_recipe(kind: str, name: str) -> None:
    losses = train_steps(kind, name, steps=2)
    assert len(losses) == 2 and all(math.isfinite(v) for step in losses for v in step.values())


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
    gen = get_registry().build("generator", {"name": name, **example_args("generator", name), "residual": True},
                               "g", context={"in_channels": 1, "out_channels": 1})
    x = torch.rand(2, 1, 16, 16, 16)
    torch.testing.assert_close(gen(x), x)


class ShrinkingRefiner(nn.Module):
    """A refiner that breaks the contract: it crops its input."""

    example_args = {"crop": 1}

    def __init__(self, in_channels: int = 1, crop: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, in_channels, 3)
        self.crop = crop

    def forward(self, coarse: torch.Tensor) -> torch.Tensor:
        return self.conv(coarse)


def test_check_part_names_what_a_broken_part_gets_wrong() -> None:
    from lowdose_toolkit.core.registry import Registry

    registry = Registry()
    registry.add("refiner", "shrinking", ShrinkingRefiner, "third-party", "0.1")
    with pytest.raises(AssertionError, match=r"refiner 'shrinking': output \(2, 1, 11, 16, 19\) must have the "
                                             r"input's shape \(2, 1, 13, 18, 21\)"):
        check_part("refiner", "shrinking", registry=registry)
    assert example_args("refiner", "shrinking", registry) == {"crop": 1}
