"""The model: generator, heads, refiner and discriminator built from a resolved recipe."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lowdose_toolkit.errors import RecipeError
from lowdose_toolkit.registry import Registry

IMAGE_OUTPUTS = ("coarse", "refined", "pred")


class LowDoseModel(nn.Module):
    """Generator (+ heads reading its features) (+ refiner): everything that synthesises.

    The discriminator is kept apart (see :func:`build_model`) so that each network can be wrapped in
    its own DistributedDataParallel and stepped by its own optimizer.

    ``forward(low)`` returns ``{"coarse", "refined" (if a refiner), "pred", <head name>: ...}``;
    ``pred`` is the final image (the refined one when there is a refiner). ``predict(low)`` returns
    only ``pred`` and is what inference uses.
    """

    def __init__(
        self,
        generator: nn.Module,
        heads: Mapping[str, nn.Module] | None = None,
        head_inputs: Mapping[str, str] | None = None,
        head_targets: Mapping[str, str] | None = None,
        refiner: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.generator = generator
        self.heads = nn.ModuleDict(dict(heads or {}))
        self.head_inputs = dict(head_inputs or {})
        self.head_targets = dict(head_targets or {})
        self.refiner = refiner

    def forward(self, low: torch.Tensor, use_refiner: bool = True) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if len(self.heads):
            coarse, features = self.generator.forward_features(low)
            for name, head in self.heads.items():
                out[name] = head(features[self.head_inputs[name]])
        else:
            coarse = self.generator(low)
        out["coarse"] = coarse
        if self.refiner is not None and use_refiner:
            out["refined"] = self.refiner(coarse)
            out["pred"] = out["refined"]
        else:
            out["pred"] = coarse
        return out

    def predict(self, low: torch.Tensor) -> torch.Tensor:
        """The final image only (no heads)."""
        pred = self.generator(low)
        return self.refiner(pred) if self.refiner is not None else pred

    def generator_parameters(self) -> list[nn.Parameter]:
        """Parameters of generator, heads and refiner (what the generator optimizer steps)."""
        params = list(self.generator.parameters()) + list(self.heads.parameters())
        if self.refiner is not None:
            params += list(self.refiner.parameters())
        return params


def build_model(recipe: Mapping[str, Any], registry: Registry) -> tuple[LowDoseModel, nn.Module | None]:
    """Build every model part of a resolved recipe: the synthesis model and the discriminator (or None)."""
    spec = recipe["model"]
    num_classes = len(recipe["data"]["drfs"])
    generator = registry.build("generator", spec["generator"], "model.generator",
                               context={"in_channels": 1, "out_channels": 1})
    feature_channels: dict[str, int] = dict(getattr(generator, "feature_channels", {}))
    heads: dict[str, nn.Module] = {}
    inputs: dict[str, str] = {}
    targets: dict[str, str] = {}
    for i, head_spec in enumerate(spec["heads"]):
        where = f"model.heads.{i}"
        name = head_spec["name"]
        if name in heads:
            raise RecipeError(f"{where}.name: head {name!r} is listed twice; each head may appear once")
        feature = head_spec["input"]
        if feature not in feature_channels:
            raise RecipeError(
                f"{where}.input: generator {spec['generator']['name']!r} has no feature {feature!r}; "
                f"available: {', '.join(feature_channels) or 'none (it exposes no features)'}"
            )
        heads[name] = registry.build("head", head_spec, where, engine_keys=("input", "target"),
                                     context={"in_channels": feature_channels[feature], "num_classes": num_classes})
        inputs[name] = feature
        targets[name] = head_spec["target"]
    refiner = None
    if spec["refiner"] is not None:
        refiner = registry.build("refiner", spec["refiner"], "model.refiner", context={"in_channels": 1})
    discriminator = None
    if spec["discriminator"] is not None:
        discriminator = registry.build("discriminator", spec["discriminator"], "model.discriminator",
                                       context={"in_channels": 1})
    return LowDoseModel(generator, heads, inputs, targets, refiner), discriminator


class LossTerm(nn.Module):
    """One weighted loss term of the recipe, reading output ``on``."""

    def __init__(self, name: str, loss: nn.Module, weight: float, on: str) -> None:
        super().__init__()
        self.name = name
        self.loss = loss
        self.weight = weight
        self.on = on
        self.adversarial = bool(getattr(loss, "adversarial", False))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, weight={self.weight}, on={self.on!r}"


def build_losses(
    recipe: Mapping[str, Any], registry: Registry, model: LowDoseModel, discriminator: nn.Module | None
) -> list[LossTerm]:
    """Build the loss terms; each ``on`` must name an output the model produces."""
    outputs = {"coarse", "pred"} | ({"refined"} if model.refiner is not None else set()) | set(model.heads)
    terms: list[LossTerm] = []
    counts: dict[str, int] = {}
    for spec in recipe["losses"]:
        counts[spec["name"]] = counts.get(spec["name"], 0) + 1
    for i, spec in enumerate(recipe["losses"]):
        where = f"losses.{i}"
        loss = registry.build("loss", spec, where, engine_keys=("weight", "on"))
        term = LossTerm(spec["name"], loss, spec["weight"], spec["on"])
        if not term.adversarial and term.on not in outputs:
            raise RecipeError(f"{where}.on: the model has no output {term.on!r}; outputs: {', '.join(sorted(outputs))}")
        if term.adversarial and discriminator is None:
            raise RecipeError(f"{where}: loss {term.name!r} is adversarial but model.discriminator is not set")
        if counts[term.name] > 1:  # the same loss on several outputs: l1_coarse, l1_refined
            term.name = f"{term.name}_{term.on}"
        terms.append(term)
    return terms


def count_parameters(module: nn.Module | None) -> int:
    """Number of trainable parameters."""
    return 0 if module is None else sum(p.numel() for p in module.parameters() if p.requires_grad)
