"""``film``: the dose head's prediction conditions the generator's decoder (FiLM) and, optionally, gates
its residual by the list-mode Bayes factor.

Why (``../shared/research/guidance-notes.md`` and docs/RESULTS.md): a single network trained over DRF 4-100
without knowing the DRF applies one DRF-independent smoothing, which makes DRF 4 inputs worse. The
Ultra-Low-Dose PET challenge entries that handled every DRF with one network either estimated the noise
level (SJTU's NLE-Net, 2023 winner) or conditioned on ln(DRF) with zero-initialised FiLM (UCM's
nnFormer, 2025, matching five per-DRF specialists). This part does the latter, driven by the head, in
ML-Net's decoder and (when the refiner declares modulation points, as Contextual-Net does) in the refiner:

* the code is the head's class probabilities ``p`` (detached by default, so the reconstruction loss does
  not bend the classifier); in training a fraction ``teacher_forcing`` of the samples use the true DRF's
  one-hot code instead, so the decoder learns what each class means before the head is reliable and
  still sees the head's own predictions (inference uses the head alone, or a DRF the user states);
* an MLP (``num_classes`` → ``hidden`` → 2·Σ channels) gives ``(gamma, beta)`` for each of the generator's
  modulation points; its last layer starts at zero, so training starts from the unguided model;
* ``gate`` scales a residual generator's correction ``y = x + g · R(x)`` per sample:
  ``learned`` (default): ``g = Σ_k p_k · 2σ(a_k)`` with one learned ``a_k`` per class, starting at 0
  (``g = 1``): a class whose inputs are already good (DRF 4) can turn the correction down to nothing,
  so the guided model can learn never to be worse than its input; ``listmode``: the fixed
  ``g = 1 - Σ_k p_k / DRF_k``. When the low-dose events are a subset of the full-dose ones (list-mode,
  as in the challenge), ``E[full | low] = low / k + (1 - 1/k) E[truth | low]``, so at DRF 4 at most
  75 % of the deviation from the input is removed, at DRF 100 99 %; with independent acquisitions that
  structure does not hold, so it is not the default; ``none``: no gate.
* ``fit_codes`` maps, at inference, each class to the code that served the validation volumes of that
  class best (fitted once after training, :meth:`FiLMGuidance.set_code_map`; the trainer does it and
  writes ``code_fit.json``). Each code learns the strength its training loss wants on patches, which
  measured one class stronger than whole-volume PSNR wants on held-out subjects (docs/RESULTS.md,
  "The DRF code"); the map corrects that on data the model was not trained on. Training never uses it.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from lowdose_toolkit import hookimpl
from lowdose_toolkit.errors import UserError
from lowdose_toolkit.guidance import Conditioning
from lowdose_toolkit.hookspecs import Register
from lowdose_toolkit.schemes import set_lr_scale

GATES = ("learned", "listmode", "none")


class PartFiLM(nn.Module):
    """The conditioning of one guided part: an MLP from the class code to its ``(gamma, beta)`` and, for a
    learned gate, one logit per class (``gate = Σ_k p_k · 2σ(a_k)``, 1 at the start)."""

    def __init__(self, channels: list[int], num_classes: int, hidden: int, learned_gate: bool) -> None:
        super().__init__()
        self.channels = list(channels)
        self.mlp = nn.Sequential(nn.Linear(num_classes, hidden), nn.SiLU(), nn.Linear(hidden, 2 * sum(channels)))
        nn.init.zeros_(self.mlp[-1].weight)  # start as the identity: the unguided model
        nn.init.zeros_(self.mlp[-1].bias)
        self.gate_logits = nn.Parameter(torch.zeros(num_classes)) if learned_gate else None

    def forward(self, probs: torch.Tensor) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None]:
        params = self.mlp(probs)
        film, start = [], 0
        for c in self.channels:
            film.append((params[:, start:start + c], params[:, start + c:start + 2 * c]))
            start += 2 * c
        gate = None if self.gate_logits is None else probs @ (2.0 * torch.sigmoid(self.gate_logits.float()))
        return film, gate


class FiLMGuidance(nn.Module):
    """Dose-class code → FiLM ``(gamma, beta)`` per decoder modulation point (+ optional list-mode gate).

    Args:
        channels: Channels of each modulation point per guided part (context argument: ``generator``'s
            ``film_channels``, and ``refiner``'s when the refiner declares them).
        drfs: The DRF of each class (context argument: ``data.drfs``).
        hidden: Width of the MLP's hidden layer.
        teacher_forcing: Fraction of training samples conditioned on their true DRF instead of the head.
        detach: Stop the reconstruction loss's gradient at the head's probabilities.
        gate: ``learned``, ``listmode`` or ``none`` (see the module docstring; a gate needs a residual
            generator); each guided part has its own.
        lr_scale: Factor on the learning rate of these parameters: the FiLM layers start at zero and
            a handful of per-class gates must move within a few hundred steps.
        fit_codes: After training, map each class to its best code on the validation split (see the
            module docstring); the map (``code_map``, identity until fitted) is saved with the model.

    Example:
        >>> g = FiLMGuidance(channels={"generator": [8, 4]}, drfs=[4, 100])
        >>> cond = g(torch.tensor([[1.0, 0.0]]))["generator"]
        >>> [tuple(t.shape) for t in cond.film[0]]
        [(1, 8), (1, 8)]
    """

    def __init__(self, channels: dict[str, list[int]], drfs: list[int], hidden: int = 64,
                 teacher_forcing: float = 0.5, detach: bool = True,
                 gate: Literal["learned", "listmode", "none"] = "learned", lr_scale: float = 10.0,
                 fit_codes: bool = False) -> None:
        super().__init__()
        if not channels or not all(channels.values()):
            raise UserError(f"film: every guided part needs modulation points, got film_channels {channels}")
        if not 0.0 <= teacher_forcing <= 1.0:
            raise UserError(f"film: teacher_forcing={teacher_forcing} must be in [0, 1] (a fraction of samples)")
        if hidden < 1:
            raise UserError(f"film: hidden={hidden} must be positive")
        if gate not in GATES:
            raise UserError(f"film: gate={gate!r} must be one of {', '.join(GATES)}")
        if len(drfs) < 2:
            raise UserError(f"film: needs at least two DRF classes, got data.drfs={list(drfs)}")
        if not lr_scale > 0:
            raise UserError(f"film: lr_scale={lr_scale} must be positive")
        self.channels = {part: list(c) for part, c in channels.items()}
        self.drfs = list(drfs)
        self.num_classes = len(drfs)
        self.hidden = hidden
        self.teacher_forcing = teacher_forcing
        self.detach = detach
        self.gate = gate
        self.lr_scale = lr_scale
        self.fit_codes = fit_codes
        #: The code each class is conditioned on at inference (identity until :meth:`set_code_map`).
        self.register_buffer("code_map", torch.arange(self.num_classes))
        self.register_buffer("codes_fitted", torch.zeros((), dtype=torch.bool))
        #: One conditioning module per guided part, named as the ``train.stages`` part it belongs to (a stage
        #: that trains only the refiner trains the refiner's conditioning, not the generator's).
        self.stage_parts = nn.ModuleDict({part: PartFiLM(c, self.num_classes, hidden, gate == "learned")
                                          for part, c in self.channels.items()})
        self.register_buffer("inverse_drf", 1.0 / torch.tensor(self.drfs, dtype=torch.float32), persistent=False)
        set_lr_scale(self, lr_scale)

    def code(self, logits: torch.Tensor, drf_class: torch.Tensor | None = None) -> torch.Tensor:
        """Class probabilities ``[B, K]`` from the head's logits; the true class where it is given.

        In training, each sample with a known class uses it with probability ``teacher_forcing``; in
        evaluation a given class is always used (oracle conditioning), else the head decides.
        """
        probs = logits.float().softmax(dim=1)
        if self.detach:
            probs = probs.detach()
        if drf_class is None:
            return probs if self.training else self._mapped(probs)
        onehot = F.one_hot(drf_class.long().view(-1), self.num_classes).float()
        if not self.training:
            return self._mapped(onehot)
        forced = torch.rand(onehot.shape[0], 1, device=onehot.device) < self.teacher_forcing
        return torch.where(forced, onehot, probs)

    def _mapped(self, probs: torch.Tensor) -> torch.Tensor:
        """Each class's probability moved to its code (:attr:`code_map`; the identity leaves ``probs``)."""
        move = F.one_hot(self.code_map.long(), self.num_classes).to(probs.dtype)  # [class, code]
        return probs @ move

    def set_code_map(self, gains: torch.Tensor) -> list[int]:
        """Map each class to the code with the highest mean gain ``gains[class, code]`` (validation volumes of
        that class conditioned on every code); a class without volumes (a NaN row) keeps its own code."""
        if tuple(gains.shape) != (self.num_classes, self.num_classes):
            raise ValueError(f"set_code_map expects gains [{self.num_classes}, {self.num_classes}], "
                             f"got {tuple(gains.shape)}")
        own = torch.arange(self.num_classes, device=self.code_map.device)
        best = torch.nan_to_num(gains.float(), nan=-torch.inf).argmax(dim=1).to(own.device)
        mapping = torch.where(torch.isnan(gains).all(dim=1).to(own.device), own, best)
        self.code_map.copy_(mapping)
        self.codes_fitted.fill_(True)
        return [int(c) for c in mapping]

    def reset_code_map(self) -> None:
        """Back to the identity (each class its own code), e.g. before measuring every code."""
        self.code_map.copy_(torch.arange(self.num_classes, device=self.code_map.device))
        self.codes_fitted.fill_(False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        for name, default in (("code_map", torch.arange(self.num_classes)), ("codes_fitted", torch.tensor(False))):
            state_dict.setdefault(prefix + name, default)  # a model saved before code maps existed: identity
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, probs: torch.Tensor) -> dict[str, Conditioning]:
        """The conditioning of each guided part (``generator``, ``refiner``) for a code ``[B, K]``."""
        probs = probs.float()
        out: dict[str, Conditioning] = {}
        for part, module in self.stage_parts.items():
            film, gate = module(probs)
            if self.gate == "listmode":
                gate = 1.0 - probs @ self.inverse_drf
            out[part] = Conditioning(film=film, gate=gate, probs=probs)
        return out

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, drfs={self.drfs}, hidden={self.hidden}, "
                f"teacher_forcing={self.teacher_forcing}, detach={self.detach}, gate={self.gate!r}, "
                f"lr_scale={self.lr_scale}, fit_codes={self.fit_codes}")


@hookimpl
def ldt_register_guidances(register: Register) -> None:
    register("film", FiLMGuidance)
