"""The composition root of training: device, optimizer factory, and the model, losses and scheme of a recipe.

``ldt check``, ``ldt run`` and the benchmarks build through :func:`build_training`, so what one checks
is what the other trains.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from lowdose_toolkit.core.registry import Registry
from lowdose_toolkit.models.lowdose_model import LossTerm, LowDoseModel, build_losses, build_model
from lowdose_toolkit.schemes import Scheme, identity


def make_optimizer_factory(cfg: Mapping[str, Any]) -> Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]:
    """Optimizer factory from ``train.optimizer`` (paper: Adam, lr 2e-4; betas as pix2pix)."""
    name, lr, wd = cfg["name"], cfg["lr"], cfg["weight_decay"]
    betas = tuple(cfg["betas"])  # two values in [0, 1) (checked by spec.run_spec)

    def factory(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        if name == "adam":
            return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=wd)  # type: ignore[arg-type]
        if name == "adamw":
            return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=wd)  # type: ignore[arg-type]
        return torch.optim.SGD(params, lr=lr, momentum=betas[0], weight_decay=wd)

    return factory


def build_training(
    recipe: Mapping[str, Any],
    registry: Registry,
    device: torch.device,
    precision: str = "fp32",
    wrap: Callable[[nn.Module], nn.Module] | None = None,
) -> tuple[LowDoseModel, nn.Module | None, list[LossTerm], Scheme]:
    """Build the model, discriminator, loss terms (on ``device``) and the scheme that trains them."""
    model, discriminator = build_model(recipe, registry)
    model.to(device)
    if discriminator is not None:
        discriminator.to(device)
    losses = build_losses(recipe, registry, model, discriminator)
    for term in losses:
        term.to(device)
    scheme = registry.build(
        "scheme", recipe["train"]["scheme"], "train.scheme",
        context={"model": model, "discriminator": discriminator, "losses": losses,
                 "optimizer": make_optimizer_factory(recipe["train"]["optimizer"]), "wrap": wrap or identity,
                 "precision": precision, "device": device, "registry": registry},
    )
    return model, discriminator, losses, scheme
