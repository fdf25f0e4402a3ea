"""Conformance checks for plugin authors: build your part, check its contract, train a few steps.

In a plugin's own test suite (CPU, seconds)::

    from lowdose_toolkit.testing import check_part, train_steps

    def test_my_head():
        check_part("head", "maxpool_head")          # builds it, checks lowdose_toolkit.parts' contract
        losses = train_steps("head", "maxpool_head")  # a tiny recipe around it, three real steps
        assert all(math.isfinite(v) for step in losses for v in step.values())

The part's arguments come from ``args``, else from an ``example_args`` mapping the factory declares
(a class attribute, or an attribute of a factory function), else from its defaults. Small examples
keep these checks fast: ``example_args = {"channels": 4}``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch

from lowdose_toolkit.core.registry import Registry

#: A recipe small enough to train on a CPU in a second; a part under test replaces its own kind's entry.
BASE_RECIPE: dict[str, Any] = {
    "name": "conformance",
    "data": {"drfs": [4, 100], "patch_size": 16, "batch_size": 2},
    "model": {"generator": {"name": "mlnet", "channels": 4, "depth": 2}, "heads": []},
    "losses": [{"name": "l1", "weight": 1.0, "on": "pred"}],
    "train": {"epochs": 1, "optimizer": {"lr": 1.0e-3}},
    "eval": {"patch_size": 16, "overlap": 0, "batch_size": 1},
}
CONTEXT = {"generator": {"in_channels": 1, "out_channels": 1}, "refiner": {"in_channels": 1},
           "discriminator": {"in_channels": 1}, "loss": {}, "source": {"drfs": [4, 100]}}


def _registry(registry: Registry | None) -> Registry:
    if registry is not None:
        return registry
    from lowdose_toolkit.core.plugin_manager import get_registry

    return get_registry()


def example_args(kind: str, name: str, registry: Registry | None = None) -> dict[str, Any]:
    """The example keyword arguments a part declares (``example_args`` on its factory), or ``{}``."""
    factory = _registry(registry).get(kind, name).factory
    return dict(copy.deepcopy(getattr(factory, "example_args", {})))


def _fail(kind: str, name: str, what: str) -> AssertionError:
    return AssertionError(f"{kind} {name!r}: {what} (contract: lowdose_toolkit/parts.py)")


def check_part(kind: str, name: str, args: Mapping[str, Any] | None = None,
               registry: Registry | None = None) -> Any:
    """Build the part and check its contract on odd-sized inputs (forward, backward, shapes); returns it.

    Kinds checked: generator, head (reading a 16-channel feature, or the image for ``input: image``
    heads with ``reads_image = True``), refiner, discriminator, loss, source, logger (a run of two epochs
    with a picture, then a resume, in a temporary run directory). An AssertionError names the part and
    what it got wrong.
    """
    registry = _registry(registry)
    spec = {"name": name, **(example_args(kind, name, registry) if args is None else dict(args))}
    torch.manual_seed(0)
    if kind == "head":
        factory = registry.get(kind, name).factory
        channels = 1 if getattr(factory, "reads_image", False) else 16
        part = registry.build(kind, spec, name, context={"in_channels": channels, "num_classes": 5,
                                                         "drfs": [4, 10, 20, 50, 100]})
        size = (12, 12, 12) if channels == 1 else (2, 2, 2)
        feature = torch.rand(3, channels, *size, requires_grad=True)
        out = part(feature)
        if not isinstance(out, torch.Tensor) or out.shape[0] != 3:
            raise _fail(kind, name, f"forward must return [B, ...] with B=3, got {getattr(out, 'shape', type(out))}")
        out.float().sum().backward()
        if feature.grad is None:
            raise _fail(kind, name, "no gradient reaches the feature it reads")
        if callable(getattr(part, "volume_logits", None)):  # the optional whole-volume estimate (parts.py)
            was_training = part.training
            whole = part.volume_logits(torch.rand(1, 1, 13, 18, 21))
            if not isinstance(whole, torch.Tensor) or tuple(whole.shape) != (1, 5) or not whole.isfinite().all():
                raise _fail(kind, name, f"volume_logits must return finite [1, num_classes] = [1, 5] logits, got "
                                        f"{getattr(whole, 'shape', type(whole))}")
            if part.training != was_training:
                raise _fail(kind, name, "volume_logits must leave the head in the mode it found it in")
        if callable(getattr(part, "volume_estimate", None)):  # logits and a continuous dose level (parts.py)
            estimate = part.volume_estimate(torch.rand(1, 1, 13, 18, 21))
            ok = isinstance(estimate, tuple) and len(estimate) == 2 and isinstance(estimate[0], torch.Tensor) \
                and tuple(estimate[0].shape) == (1, 5) and (estimate[1] is None or (
                    isinstance(estimate[1], float) and math.isfinite(estimate[1]) and estimate[1] > 0))
            if not ok:
                raise _fail(kind, name, "volume_estimate must return ([1, num_classes] = [1, 5] logits, a positive "
                                        f"float dose level or None), got {estimate!r:.200}")
        return part
    if kind == "logger":
        return _check_logger(registry, spec, name)
    if kind == "source":
        part = registry.build(kind, spec, name, context=CONTEXT[kind])
        if not callable(getattr(part, "records", None)):
            raise _fail(kind, name, "a source needs records() -> list[SubjectRecord]")
        return part
    part = registry.build(kind, spec, name, context=CONTEXT.get(kind, {}))
    if kind in ("generator", "refiner"):
        x = torch.rand(2, 1, 13, 18, 21, requires_grad=True)
        y = part(x)
        if y.shape != x.shape:
            raise _fail(kind, name, f"output {tuple(y.shape)} must have the input's shape {tuple(x.shape)}")
        y.square().mean().backward()
        if x.grad is None:
            raise _fail(kind, name, "no gradient reaches the input")
        if kind == "generator" and hasattr(part, "forward_features"):
            _, features = part.forward_features(x)
            for key, channels in getattr(part, "feature_channels", {}).items():
                if key not in features or features[key].shape[:2] != (2, channels):
                    raise _fail(kind, name, f"feature {key!r} must be [B, {channels}, ...] as feature_channels says")
    elif kind == "discriminator":
        x = torch.rand(2, 1, 16, 16, 16, requires_grad=True)
        cond = torch.rand(2, 1, 16, 16, 16) if getattr(part, "conditional", False) else None
        logits = part(x, cond)
        if logits.shape[0] != 2:
            raise _fail(kind, name, f"patch logits must be [B, ...] with B=2, got {tuple(logits.shape)}")
        logits.mean().backward()
    elif kind == "loss":
        if getattr(part, "adversarial", False):
            logits = torch.rand(2, 1, 3, 3, 3, requires_grad=True)
            value = part(logits, True) + part(logits, False)
        elif getattr(part, "classifies", False):
            logits = torch.randn(4, 5, requires_grad=True)
            value = part(logits, torch.tensor([0, 1, 2, 4]))
        else:
            pred, target = torch.rand(2, 1, 12, 12, 12, requires_grad=True), torch.rand(2, 1, 12, 12, 12)
            value = part(pred, target, low=target) if getattr(part, "uses_input", False) else part(pred, target)
        if value.ndim != 0 or not torch.isfinite(value):
            raise _fail(kind, name, f"a loss returns a finite scalar, got {value}")
        value.backward()
    return part


def _check_logger(registry: Registry, spec: Mapping[str, Any], name: str) -> Any:
    """Build the logger in a temporary run directory; start, log two epochs (with a picture), close; resume."""
    import tempfile
    from pathlib import Path

    from lowdose_toolkit.core.figures import new_figure, save_png
    from lowdose_toolkit.loggers import example_record

    with tempfile.TemporaryDirectory(prefix="ldt-logger-") as folder:
        run_dir = Path(folder)
        context = {"run_dir": run_dir, "recipe": copy.deepcopy(BASE_RECIPE)}
        figure = new_figure(2.0, 1.5)
        figure.add_subplot().plot([1, 2], [2, 1])
        picture = save_png(figure, run_dir / "previews" / "epoch_002.png")
        part = registry.build("logger", spec, name, context=context)
        for method in ("start", "log_epoch", "close"):
            if not callable(getattr(part, method, None)):
                raise _fail("logger", name, f"a logger needs {method}() (lowdose_toolkit.loggers.Logger)")
        if list(run_dir.iterdir()) != [run_dir / "previews"]:
            raise _fail("logger", name, "building a logger must not write (ldt check builds it); start() may")
        history = [example_record(1), example_record(2)]
        part.start(0, [])
        part.log_epoch(history[0], {})
        part.log_epoch(history[1], {"preview": picture})
        part.close()
        resumed = registry.build("logger", spec, name, context=context)
        resumed.start(2, history)
        resumed.log_epoch(example_record(3), {})
        resumed.close()
    return part


def recipe_with(kind: str, name: str, args: Mapping[str, Any] | None = None,
                registry: Registry | None = None) -> dict[str, Any]:
    """:data:`BASE_RECIPE` with the part in place (heads get a loss on them; discriminators a GAN scheme)."""
    spec = {"name": name, **(example_args(kind, name, registry) if args is None else dict(args))}
    recipe = copy.deepcopy(BASE_RECIPE)
    if kind == "generator":
        recipe["model"]["generator"] = spec
    elif kind == "head":
        factory = _registry(registry).get(kind, name).factory
        recipe["model"]["heads"] = [{**spec, "input": "image" if getattr(factory, "reads_image", False)
                                     else "bottleneck"}]
        recipe["losses"].append({"name": "cross_entropy", "weight": 1.0, "on": name})
    elif kind == "refiner":
        recipe["model"]["refiner"] = spec
    elif kind == "discriminator":
        recipe["model"]["discriminator"] = spec
        recipe["losses"].append({"name": "lsgan", "weight": 1.0})
        recipe["train"]["scheme"] = {"name": "paired_gan"}
    elif kind == "loss":
        factory = _registry(registry).get(kind, name).factory
        if getattr(factory, "classifies", False):
            recipe["model"]["heads"] = [{"name": "dose_classifier", "input": "bottleneck", "hidden": [8]}]
            recipe["losses"].append({**spec, "weight": 1.0, "on": "dose_classifier"})
        elif getattr(factory, "adversarial", False):
            recipe["model"]["discriminator"] = {"name": "patchgan3d", "channels": 4, "n_layers": 1}
            recipe["losses"].append({**spec, "weight": 1.0})
            recipe["train"]["scheme"] = {"name": "paired_gan"}
        else:
            recipe["losses"].append({**spec, "weight": 1.0, "on": "pred"})
    elif kind == "scheme":
        recipe["train"]["scheme"] = spec
    elif kind == "guidance":  # driven by a small dose head, conditioning a residual ML-Net
        recipe["model"]["generator"] = {"name": "mlnet", "channels": 4, "depth": 2, "residual": True}
        recipe["model"]["heads"] = [{"name": "dose_classifier", "input": "bottleneck", "hidden": [8]}]
        recipe["model"]["guidance"] = {**spec, "head": "dose_classifier"}
        recipe["losses"].append({"name": "cross_entropy", "weight": 1.0, "on": "dose_classifier"})
    else:
        raise ValueError(f"train_steps: no tiny recipe for a {kind}; check it with check_part")
    return recipe


def train_steps(kind: str, name: str, args: Mapping[str, Any] | None = None, steps: int = 3,
                registry: Registry | None = None) -> list[dict[str, float]]:
    """Train ``steps`` real steps (CPU, random 16³ patches) of a tiny recipe around the part.

    The recipe goes through the same validation as ``ldt check`` and the same composition root as
    ``ldt run``; returns each step's loss values.
    """
    from lowdose_toolkit.core.recipe import resolve_recipe
    from lowdose_toolkit.train.build import build_training

    registry = _registry(registry)
    recipe = resolve_recipe(recipe_with(kind, name, args, registry), registry, f"tiny recipe around {kind} {name}")
    torch.manual_seed(0)
    model, _, _, scheme = build_training(recipe, registry, torch.device("cpu"))
    model.train()
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        batch = {"low": torch.rand(2, 1, 16, 16, 16, generator=g), "full": torch.rand(2, 1, 16, 16, 16, generator=g),
                 "drf": torch.tensor([4, 100]), "drf_class": torch.tensor([0, 1])}
        out.append(scheme.train_step(batch))
    return out
