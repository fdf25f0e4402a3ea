"""Base class of training schemes (the training algorithm: supervised, paired GAN, cycle GAN).

A scheme owns its optimizers and gradient scalers and performs one training step on a batch
``{"low", "full", "drf", "drf_class"}`` of patches. The engine owns everything around it: data,
schedulers, validation, checkpoints, distribution. Scheme factories receive the context arguments
listed in :mod:`lowdose_toolkit.parts` by name; recipe keys of ``train.scheme`` are their own.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from lowdose_toolkit.errors import RecipeError, UserError
from lowdose_toolkit.models.lowdose_model import IMAGE_OUTPUTS, LossTerm, LowDoseModel

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def set_lr_scale(module: nn.Module, scale: float) -> None:
    """Mark every parameter of ``module`` for a learning rate ``scale`` times ``train.optimizer.lr``
    (:meth:`Scheme.add_optimizer` puts them in a group of their own)."""
    for p in module.parameters():
        p.lr_scale = scale  # type: ignore[attr-defined]


def lr_scale(p: nn.Parameter) -> float:
    """The learning-rate factor of a parameter (1 unless a part set one with :func:`set_lr_scale`)."""
    return float(getattr(p, "lr_scale", 1.0))


class NonFiniteLoss(UserError):
    """A loss is NaN or infinite: :meth:`Scheme.backward_step` refuses to step on it (the weights stay as they were).

    Attributes:
        phase: The optimizer that was to step (``generator``, ``discriminator``, ...).
        value: The loss value.
        terms: The weighted terms computed in this step so far, by name.
    """

    def __init__(self, phase: str, value: float, terms: Mapping[str, float]) -> None:
        self.phase, self.value, self.terms = phase, value, dict(terms)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in self.terms.items())
        self.what = f"non-finite {phase} loss {value}" + (f" ({shown})" if shown else "")
        super().__init__(f"{self.what}; lower train.optimizer.lr or check the data")


def identity(module: nn.Module) -> nn.Module:
    """The default ``wrap``: no wrapping (single process)."""
    return module


class Scheme:
    """Shared machinery: optimizers with GradScalers, autocast, and the weighted non-adversarial losses.

    Args:
        model: Generator + heads + refiner.
        discriminator: The discriminator, or None.
        losses: The recipe's weighted loss terms.
        optimizer: Makes an optimizer (the recipe's ``train.optimizer``) for a parameter list.
        wrap: Wraps a network for distributed training (DistributedDataParallel) or returns it.
        precision: ``fp32`` (or ``none``), ``bf16`` or ``fp16``: autocast on the device, CPU or CUDA.
        device: The device batches live on.
    """

    #: Names of the optimizers, in the order the engine schedules them.
    phases: tuple[str, ...] = ("generator",)

    def __init__(
        self,
        model: LowDoseModel,
        discriminator: nn.Module | None,
        losses: list[LossTerm],
        optimizer: OptimizerFactory,
        wrap: Callable[[nn.Module], nn.Module] = identity,
        precision: str = "fp32",
        device: str | torch.device = "cpu",
    ) -> None:
        self.model = model
        self.discriminator = discriminator
        self.losses = losses
        self.device = torch.device(device)
        self.precision = "fp32" if precision == "none" else precision
        self.make_optimizer = optimizer
        self.wrap = wrap
        self.net = wrap(model)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.scalers: dict[str, torch.amp.GradScaler] = {}
        #: Extra networks a scheme owns (e.g. CycleGAN's full->low generator); checkpointed by the engine.
        self.extra_modules: dict[str, nn.Module] = {}
        #: The ``train.stages`` part (generator, discriminator, ...) of each extra module, so stages freeze it too.
        self.extra_module_parts: dict[str, str] = {}
        #: Parts the current ``train.stages`` stage freezes, and whether it trains through the refiner
        #: (given by the engine through :meth:`enter_stage`).
        self.frozen_parts: frozenset[str] = frozenset()
        self.use_refiner = True
        #: The loss terms computed since the last optimizer step (named when a loss is non-finite).
        self.step_terms: dict[str, float] = {}

    def enter_stage(self, frozen_parts: frozenset[str], use_refiner: bool) -> None:
        """Called by the engine when a ``train.stages`` stage starts (their ``requires_grad`` already set)."""
        self.frozen_parts = frozenset(frozen_parts)
        self.use_refiner = use_refiner

    # ------------------------------------------------------------------ helpers for subclasses
    def add_optimizer(self, name: str, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """Create and keep an optimizer (and its GradScaler, active for fp16 only).

        A parameter with an attribute ``lr_scale`` (set by its part, e.g. a small dose head that must
        learn faster than the generator it sits beside) goes to a group whose learning rate is
        ``train.optimizer.lr`` times that factor; the group records it as ``lr_scale``.
        """
        params = [p for p in params if p.requires_grad]
        if not params:
            raise RecipeError(f"train.scheme: optimizer {name!r} has no trainable parameters")
        scales = sorted({lr_scale(p) for p in params})
        opt = self.make_optimizer(params if scales == [1.0] else
                                  [{"params": [p for p in params if lr_scale(p) == s]} for s in scales])
        for group, scale in zip(opt.param_groups, scales, strict=True):
            group["lr_scale"] = scale
            group["lr"] = group["lr"] * scale
        self.optimizers[name] = opt
        self.scalers[name] = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        return opt

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Autocast for the configured precision (a no-op for fp32)."""
        from lowdose_toolkit.infer.precision import autocast

        return autocast(self.device, self.precision)

    def trains(self, part: str) -> bool:
        """Whether the current stage trains ``part`` (``generator``, ``heads``, ``refiner``, ``discriminator``)."""
        return part not in self.frozen_parts

    def backward_step(self, name: str, loss: torch.Tensor) -> None:
        """Zero grads, backward (scaled for fp16), step the optimizer ``name``.

        A loss that needs no gradient (the stage froze every parameter it reaches) is not stepped. A
        non-finite loss raises :class:`NonFiniteLoss` before the optimizer steps (its value is read
        after the backward pass is queued, so the check costs one synchronisation and no extra pass).
        """
        terms, self.step_terms = self.step_terms, {}
        if not loss.requires_grad:
            return
        opt, scaler = self.optimizers[name], self.scalers[name]
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        value = float(loss.detach())
        if not math.isfinite(value):
            opt.zero_grad(set_to_none=True)
            raise NonFiniteLoss(name, value, terms)
        scaler.step(opt)
        scaler.update()

    def synthesis_losses(
        self, out: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted sum of the non-adversarial terms; terms on an output not produced are skipped."""
        total = torch.zeros((), device=self.device)
        values: dict[str, float] = {}
        for term in self.losses:
            if term.adversarial or term.on not in out:
                continue
            if term.on in IMAGE_OUTPUTS:
                target = batch["full"]
            else:
                key = self.model.head_targets[term.on]
                if key not in batch:
                    raise RecipeError(f"losses: head {term.on!r} predicts {key!r}, which the data does not provide")
                target = batch[key]
            if getattr(term.loss, "uses_input", False):
                value = term.loss(out[term.on].float(), target, low=batch["low"])
            else:
                value = term.loss(out[term.on].float(), target)
            total = total + term.weight * value
            values[term.name] = float(value.detach())
        self.step_terms.update(values)
        return total, values

    @staticmethod
    @contextlib.contextmanager
    def frozen(*modules: nn.Module | None) -> Iterator[None]:
        """Switch off ``requires_grad`` of ``modules`` meanwhile (e.g. the discriminator during the
        generator's step); each parameter gets its own flag back after, so a part the stage froze stays
        frozen. The one freezing mechanism of every scheme."""
        params = [p for m in modules if m is not None for p in m.parameters()]
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, flag in zip(params, flags, strict=True):
                p.requires_grad_(flag)

    def set_trainable(self, module: nn.Module | None, flag: bool) -> None:
        """Switch ``requires_grad`` of ``module``'s parameters; a part the current stage froze stays frozen.

        Kept for schemes written against earlier versions; new code uses :meth:`frozen`.
        """
        if module is None:
            return
        if flag and any(module is m for m in self._frozen_modules()):
            flag = False
        for p in module.parameters():
            p.requires_grad_(flag)

    def _frozen_modules(self) -> list[nn.Module]:
        parts = {"discriminator": [self.discriminator], "refiner": [self.model.refiner],
                 "generator": [self.model.generator], "heads": [self.model.heads]}
        parts_extra = [m for n, m in self.extra_modules.items() if self.extra_module_parts.get(n) in self.frozen_parts]
        return [m for part in self.frozen_parts for m in parts.get(part, []) if m is not None] + parts_extra

    # ------------------------------------------------------------------ interface
    def train_step(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """One optimisation step; returns the loss values (floats) by name."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
            "scalers": {n: s.state_dict() for n, s in self.scalers.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        for name, scaler in self.scalers.items():
            if state["scalers"].get(name):
                scaler.load_state_dict(state["scalers"][name])
