"""How much of its correction a model applies to a whole volume, fitted on validation after training.

A denoiser trained on patches with an L1 loss applies the correction its loss wants on patches of the
training doses; whole held-out volumes scored by PSNR measured a weaker correction better at the cleanest
DRF (DRF 4 on the phantom: 0.45-0.73 of it), and on inputs *cleaner* than any training dose (the
challenge's DRF 2, a full-dose scan, a more sensitive scanner) the full correction makes the image
worse than its input (-1.8 to -2.0 dB; docs/RESULTS.md, "Data unlike the training data"). So the
output is ``low + a(k) · (pred - low)`` with ``a`` a function of the input's dose level ``k`` (the dose
head's continuous estimate, else its class's DRF, else a stated ``--drf``):

* one anchor ``a_j`` per training DRF, linear in ``ln k`` between them, constant above the largest;
* below the smallest DRF ``k_1``, ``a_1 · (1 - 1/k) / (1 - 1/k_1)``: with list-mode data the target of a
  scan at dose level ``k`` is ``E[full | low] = low / k + (1 - 1/k) E[truth | low]``, so the share of the
  deviation a correction should remove falls as ``1 - 1/k``, to nothing for a full-dose input (k = 1);
* the anchors minimise the squared error against the full dose over each validation subject's volumes
  (the prediction is fixed, so this is linear least squares, solved once), pulled slightly towards 1
  where the volumes say little and kept in ``[0, 1]``; each anchor keeps the largest of the subjects'
  values (the correction is weakened only as far as every subject asks), and the anchors are made
  non-decreasing in ``k`` (a noisier input never gets less of the correction).

Unfitted (every model until the trainer fits it, and checkpoints from before this existed) it is the
identity: ``a = 1``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

#: Relative weight of the pull towards a = 1 (of the mean diagonal of the normal equations).
RIDGE = 1e-3


class OutputStrength(nn.Module):
    """The fitted strength ``a(k)`` of a model's correction (see the module docstring).

    Args:
        drfs: The training DRFs (the model's dose classes), in class order; empty: one anchor, no
            extrapolation (a model without DRF classes).

    Example:
        >>> s = OutputStrength([4, 100])
        >>> s.fit([4.0, 100.0], [5.0, 9.0], [10.0, 10.0])  # least squares: 5/10 and 9/10, pulled towards 1
        [0.5005, 0.9001]
        >>> round(s.factor(2.0), 2)  # below DRF 4: 0.5 * (1 - 1/2) / (1 - 1/4)
        0.33
    """

    def __init__(self, drfs: Sequence[int] = ()) -> None:
        super().__init__()
        levels = sorted(float(d) for d in drfs) or [1.0]
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.float64))
        self.register_buffer("alpha", torch.ones(len(levels), dtype=torch.float64))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def weights(self, level: float | None) -> torch.Tensor:
        """``[J]``: ``a(level) = weights(level) @ alpha`` (interpolation in ``ln k``, the list-mode factor below
        the smallest DRF); no level (no dose estimate): the anchors' mean."""
        levels = self.levels.cpu()
        j = levels.numel()
        w = torch.zeros(j, dtype=torch.float64)
        if level is None or j == 1:
            return w + 1.0 / j
        if not math.isfinite(level) or level <= 0:
            raise ValueError(f"OutputStrength: dose level {level!r} must be a positive number")
        lowest = float(levels[0])
        if level <= lowest:
            w[0] = max(0.0, (1.0 - 1.0 / level) / (1.0 - 1.0 / lowest)) if lowest > 1 else 1.0
            return w
        return log_interpolation(levels.tolist(), level)

    def factor(self, level: float | None) -> float:
        """The strength ``a`` for an input at dose level ``level`` (1.0 until fitted)."""
        if not bool(self.fitted):
            return 1.0
        return float(self.weights(level) @ self.alpha.cpu())

    def apply(self, low: torch.Tensor, pred: torch.Tensor, level: float | None) -> tuple[torch.Tensor, float]:
        """``(low + a · (pred - low), a)``, computed in ``pred``'s memory (a whole-body volume needs no copy);
        ``pred`` untouched while unfitted."""
        a = self.factor(level)
        if a == 1.0:
            return pred, a
        with torch.inference_mode(pred.is_inference()):  # a prediction made under inference mode stays one
            return pred.sub_(low).mul_(a).add_(low), a

    def fit(self, levels: Sequence[float | None], dot: Sequence[float], energy: Sequence[float],
            groups: Sequence[object] | None = None) -> list[float]:
        """Fit the anchors from validation volumes: per volume its dose level (None: unknown, see
        :meth:`weights`), ``<pred - low, full - low>`` and ``||pred - low||²`` (the prediction at full
        strength). With ``groups`` (the volumes' subjects) each group is fitted alone and every anchor keeps
        the largest of the groups' values: the correction is weakened only as far as every subject asks
        (fitted on one validation subject and applied to another, the pooled anchors above DRF 4 cost the
        other up to 0.7 dB; docs/RESULTS.md). Returns the anchors, in DRF order."""
        if not len(levels) == len(dot) == len(energy) or not levels or (groups is not None and
                                                                         len(groups) != len(levels)):
            raise ValueError(f"OutputStrength.fit: expected equal non-empty lists, got {len(levels)}, {len(dot)}, "
                             f"{len(energy)} values" + ("" if groups is None else f" and {len(groups)} groups"))
        rows = list(zip(levels, dot, energy, strict=True))
        keys = [None] * len(rows) if groups is None else list(groups)
        fits = [self._solve([r for r, k in zip(rows, keys, strict=True) if k == g]) for g in dict.fromkeys(keys)]
        alpha = torch.stack([f for f, _ in fits]).max(dim=0).values
        alpha = _non_decreasing(alpha, sum(w for _, w in fits))
        self.alpha.copy_(alpha.to(self.alpha.device))
        self.fitted.fill_(True)
        return [round(float(v), 4) for v in alpha]

    def _solve(self, rows: Sequence[tuple[float | None, float, float]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The least-squares anchors of ``rows`` (pulled towards 1 by :data:`RIDGE`), kept in ``[0, 1]``, and
        each anchor's weight of evidence (the normal equations' diagonal)."""
        j = self.levels.numel()
        a = torch.zeros(j, j, dtype=torch.float64)
        b = torch.zeros(j, dtype=torch.float64)
        for level, d, e in rows:
            w = self.weights(level)
            a += torch.outer(w, w) * e
            b += w * d
        ridge = RIDGE * max(float(a.diagonal().mean()), 1e-12)
        alpha = torch.linalg.solve(a + ridge * torch.eye(j, dtype=torch.float64), b + ridge)
        return alpha.clamp(0.0, 1.0), a.diagonal() + ridge

    def reset(self) -> None:
        """Back to the identity (before a fit measures the unscaled prediction)."""
        self.alpha.fill_(1.0)
        self.fitted.fill_(False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        for name in ("levels", "alpha", "fitted"):  # a model saved before the strength existed: the identity
            state_dict.setdefault(prefix + name, getattr(self, name).clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        anchors = ", ".join(f"{float(k):g}: {float(a):.3f}" for k, a in zip(self.levels, self.alpha, strict=True))
        return f"fitted={bool(self.fitted)}, alpha={{{anchors}}}"


def log_interpolation(levels: Sequence[float], level: float) -> torch.Tensor:
    """``[J]`` weights of ``level`` on ``levels`` (any order): linear in ``ln`` between the two that enclose it,
    all on the nearest one outside their range; they sum to 1. The strength's anchors use it, and a guided
    model's conditioning on a continuous dose level (:class:`lowdose_toolkit.infer.predictor.Predictor`)."""
    if not math.isfinite(level) or level <= 0:
        raise ValueError(f"dose level {level!r} must be a positive number")
    order = sorted(range(len(levels)), key=lambda i: levels[i])
    logs = [math.log(levels[i]) for i in order]
    w = torch.zeros(len(levels), dtype=torch.float64)
    x = min(max(math.log(level), logs[0]), logs[-1])
    j = max(k for k in range(len(logs)) if logs[k] <= x)
    if j == len(logs) - 1:
        w[order[j]] = 1.0
        return w
    t = (x - logs[j]) / (logs[j + 1] - logs[j])
    w[order[j]], w[order[j + 1]] = 1.0 - t, t
    return w


def _non_decreasing(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The weighted least-squares non-decreasing sequence closest to ``values`` (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for v, w in zip(values.tolist(), weights.tolist(), strict=True):
        blocks.append([v, w, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            v2, w2, n2 = blocks.pop()
            v1, w1, n1 = blocks.pop()
            total = w1 + w2
            blocks.append([(v1 * w1 + v2 * w2) / total, total, n1 + n2])
    return torch.tensor([v for v, _, n in blocks for _ in range(n)], dtype=values.dtype)
