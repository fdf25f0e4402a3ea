"""The model: generator, heads, refiner and discriminator built from a resolved recipe."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lowdose_toolkit.core.registry import Registry
from lowdose_toolkit.core.spec import RunSpec
from lowdose_toolkit.errors import RecipeError
from lowdose_toolkit.guidance import Conditioning
from lowdose_toolkit.models.strength import OutputStrength

IMAGE_OUTPUTS = ("coarse", "refined", "pred")


def head_volume_dose(head: nn.Module, volume: torch.Tensor) -> tuple[torch.Tensor, float | None]:
    """A dose head that reads whole volumes (``volume_logits``) on ``volume`` ``[1, 1, X, Y, Z]``: its
    ``volume_estimate`` (class logits and continuous dose level) where it has one, else ``(volume_logits, None)``."""
    if callable(getattr(head, "volume_estimate", None)):
        return head.volume_estimate(volume)
    return head.volume_logits(volume), None


class LowDoseModel(nn.Module):
    """Generator (+ heads reading its features) (+ guidance) (+ refiner): everything that synthesises.

    The discriminator is kept apart (see :func:`build_model`) so that each network can be wrapped in
    its own DistributedDataParallel and stepped by its own optimizer.

    ``forward(low)`` returns ``{"coarse", "refined" (if a refiner), "pred", <head name>: ...}``;
    ``pred`` is the final image (the refined one when there is a refiner). ``predict(low)`` returns
    only ``pred`` and is what inference uses. Heads read a generator feature or ``image`` (the input).

    With ``guidance``, the head it names (``guide_head``) runs on the features the generator hands over
    after its encoder, and the guidance part's conditioning modulates the decoder: the head's
    prediction reaches the image. ``drf_class`` (the true class) is used for teacher forcing in
    training and as an oracle DRF in evaluation; without it the head alone decides. ``dose_logits``
    (``[1 or B, K]``) are the guiding head's logits computed elsewhere, e.g. on the whole volume a window
    belongs to (:meth:`volume_dose`): the head is then not run on the window.
    """

    def __init__(
        self,
        generator: nn.Module,
        heads: Mapping[str, nn.Module] | None = None,
        head_inputs: Mapping[str, str] | None = None,
        head_targets: Mapping[str, str] | None = None,
        refiner: nn.Module | None = None,
        guidance: nn.Module | None = None,
        guide_head: str | None = None,
        drfs: Sequence[int] = (),
    ) -> None:
        super().__init__()
        self.generator = generator
        self.heads = nn.ModuleDict(dict(heads or {}))
        self.head_inputs = dict(head_inputs or {})
        self.head_targets = dict(head_targets or {})
        self.refiner = refiner
        self.guidance = guidance
        self.guide_head = guide_head
        #: How much of its correction the model applies to a whole volume (identity until fitted after
        #: training on validation; :mod:`lowdose_toolkit.models.strength`). Inference applies it.
        self.strength = OutputStrength(drfs)

    @property
    def dose_head(self) -> str | None:
        """The head that predicts the DRF class (the guiding one first), or None."""
        if self.guide_head is not None:
            return self.guide_head
        return next((n for n, t in self.head_targets.items() if t == "drf_class"), None)

    @property
    def classifies_volumes(self) -> bool:
        """Whether the dose head can classify a whole volume (``volume_logits``, see ``parts.py``)."""
        name = self.dose_head
        return name is not None and callable(getattr(self.heads[name], "volume_logits", None))

    def volume_dose(self, volume: torch.Tensor) -> tuple[torch.Tensor | None, float | None]:
        """``(class logits [1, K], continuous dose level)`` of a whole volume ``[1, 1, X, Y, Z]``: the head's
        ``volume_estimate`` where it has one, else ``(volume_logits, None)``; ``(None, None)`` when the head
        cannot classify whole volumes (see ``parts.py``)."""
        if not self.classifies_volumes:
            return None, None
        assert self.dose_head is not None
        return head_volume_dose(self.heads[self.dose_head], volume)

    def forward(self, low: torch.Tensor, use_refiner: bool = True,
                drf_class: torch.Tensor | None = None,
                dose_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}

        def run_head(name: str, features: Mapping[str, torch.Tensor]) -> None:
            feature = self.head_inputs[name]
            out[name] = self.heads[name](low if feature == "image" else features[feature])

        conditions: dict[str, Conditioning] = {}
        if self.guidance is not None:
            guidance, guide_head = self.guidance, self.guide_head

            def guide(features: dict[str, torch.Tensor]) -> Conditioning:
                if dose_logits is None:
                    run_head(guide_head, features)
                else:
                    out[guide_head] = dose_logits.to(low.device).expand(low.shape[0], -1)
                conditions.update(guidance(guidance.code(out[guide_head], drf_class)))
                out["guide_probs"] = conditions["generator"].probs
                return conditions["generator"]

            coarse, features = self.generator.forward_features(low, guide=guide)
            for name in self.heads:
                if name != guide_head:
                    run_head(name, features)
        elif len(self.heads):
            coarse, features = self.generator.forward_features(low)
            for name in self.heads:
                run_head(name, features)
        else:
            coarse = self.generator(low)
        out["coarse"] = coarse
        if self.refiner is not None and use_refiner:
            if "refiner" in conditions:
                out["refined"] = self.refiner(coarse, cond=conditions["refiner"])
            else:
                out["refined"] = self.refiner(coarse)
            out["pred"] = out["refined"]
        else:
            out["pred"] = coarse
        return out

    def predict(self, low: torch.Tensor, use_refiner: bool = True,
                drf_class: torch.Tensor | None = None) -> torch.Tensor:
        """The final image only (heads run only when guidance needs them)."""
        if self.guidance is not None:
            return self.forward(low, use_refiner, drf_class)["pred"]
        pred = self.generator(low)
        return self.refiner(pred) if self.refiner is not None and use_refiner else pred

    def generator_parameters(self) -> list[nn.Parameter]:
        """Parameters of generator, heads, guidance and refiner (what the generator optimizer steps)."""
        params = list(self.generator.parameters()) + list(self.heads.parameters())
        if self.guidance is not None:
            params += list(self.guidance.parameters())
        if self.refiner is not None:
            params += list(self.refiner.parameters())
        return params


def build_model(recipe: Mapping[str, Any], registry: Registry) -> tuple[LowDoseModel, nn.Module | None]:
    """Build every model part of a resolved recipe: the synthesis model and the discriminator (or None)."""
    spec = recipe["model"]
    drfs = list(recipe["data"]["drfs"])
    num_classes = len(drfs)
    generator = registry.build("generator", spec["generator"], "model.generator",
                               context={"in_channels": 1, "out_channels": 1})
    feature_channels: dict[str, int] = {"image": 1, **dict(getattr(generator, "feature_channels", {}))}
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
                f"available: {', '.join(feature_channels)}"
            )
        heads[name] = registry.build("head", head_spec, where, engine_keys=("input", "target"),
                                     context={"in_channels": feature_channels[feature], "num_classes": num_classes,
                                              "drfs": drfs})
        inputs[name] = feature
        targets[name] = head_spec["target"]
    refiner = None
    if spec["refiner"] is not None:
        refiner = registry.build("refiner", spec["refiner"], "model.refiner", context={"in_channels": 1})
    guidance = None
    guide_head = None
    if spec.get("guidance") is not None:
        guide_head = spec["guidance"]["head"]
        if guide_head not in heads:
            raise RecipeError(f"model.guidance.head: no head {guide_head!r} in model.heads; "
                              f"heads: {', '.join(heads) or 'none (add a dose head, e.g. noise_level)'}")
        if targets[guide_head] != "drf_class":
            raise RecipeError(f"model.guidance.head: head {guide_head!r} predicts {targets[guide_head]!r}; "
                              "guidance needs a head with target: drf_class")
        film_channels = getattr(generator, "film_channels", None)
        if not film_channels:
            raise RecipeError(f"model.guidance: generator {spec['generator']['name']!r} cannot be guided (it "
                              "declares no film_channels); use mlnet or remove model.guidance")
        channels = {"generator": list(film_channels)}
        if refiner is not None and getattr(refiner, "film_channels", None):
            channels["refiner"] = list(refiner.film_channels)
        guidance = registry.build("guidance", spec["guidance"], "model.guidance", engine_keys=("head",),
                                  context={"channels": channels, "drfs": drfs, "num_classes": num_classes})
        if getattr(guidance, "gate", "none") not in ("none", False) and not getattr(generator, "residual", False):
            raise RecipeError("model.guidance.gate: the gate scales a residual; set model.generator.residual: "
                              "true or gate: none")
    discriminator = None
    if spec["discriminator"] is not None:
        discriminator = registry.build("discriminator", spec["discriminator"], "model.discriminator",
                                       context={"in_channels": 1})
    return LowDoseModel(generator, heads, inputs, targets, refiner, guidance, guide_head, drfs), discriminator


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


def _meta_limit(exc: Exception) -> bool:
    """A part that reads values (``.item()``, data-dependent shapes) cannot run on meta: not the recipe's fault."""
    return isinstance(exc, NotImplementedError) or "meta" in str(exc)


def dry_run(model: LowDoseModel, discriminator: nn.Module | None, spec: RunSpec, batch_size: int,
            eval_batch_size: int) -> None:
    """Run a training batch and a validation window through copies of the networks on the meta device.

    No memory is allocated and no arithmetic is done, but every shape is checked, so a patch too small
    for the network's depth or a head's window is a RecipeError naming the key before any data loads.
    """
    import copy

    meta = torch.device("meta")
    net = copy.deepcopy(model).to(meta)
    disc = copy.deepcopy(discriminator).to(meta) if discriminator is not None else None
    train_shape = (batch_size, 1, *spec.patch_size)
    try:
        with torch.no_grad():
            net.train()
            low = torch.empty(train_shape, device=meta)
            out = net(low, drf_class=torch.zeros(batch_size, dtype=torch.long, device=meta))
            if disc is not None:
                disc(out["pred"], low) if getattr(disc, "conditional", True) else disc(out["pred"])
    except Exception as exc:  # noqa: BLE001 - any failure of the networks on this shape is the recipe's
        if _meta_limit(exc):
            return
        raise RecipeError(f"data.patch_size: the model cannot train on a {list(train_shape)} batch ({exc}); "
                          f"use a larger data.patch_size or a shallower network") from None
    eval_shape = (eval_batch_size, 1, *spec.window.patch_size)
    try:
        with torch.no_grad():
            net.eval()
            net.predict(torch.empty(eval_shape, device=meta))
    except Exception as exc:  # noqa: BLE001
        if _meta_limit(exc):
            return
        raise RecipeError(f"eval.patch_size: the model cannot predict a {list(eval_shape)} window ({exc}); "
                          f"use a larger eval.patch_size") from None
