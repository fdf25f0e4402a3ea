"""Local consistency with the input: give back what a denoiser took away that its input's noise cannot explain.

A low-dose scan is the truth plus noise of mean zero, so over any small region its mean is an unbiased
estimate of the truth's; a denoiser trained for the voxel-wise error is not: it pulls small hot lesions towards
their background (on the phantom's test subjects every network in the study lowered the lesions' mean uptake
by 5-19 % where the input was within 0.5-5 %, docs/RESULTS.md, "Lesions"). This guard compares the two at the
scale of a small lesion. With ``r = low - pred`` (what the model removed), ``R = G_σ * r`` (its local mean over a
Gaussian of ``sigma_mm``, so the same physical width at any voxel size) and ``s = sqrt(G_σ * pred)``
(Poisson-like noise grows with the square root of the activity), ``t = R / s`` is pure noise of one spread ``c``
wherever the model removed only noise; ``c`` is measured on the volume itself (the median absolute ``t`` over
the body, scaled to a standard deviation), so nothing depends on the training data's noise level. Where ``|t|``
exceeds ``z · c`` the excess is given back:

    pred' = pred + sign(R) · max(|t| - z·c, 0) · s

so a lesion flattened by more than the noise allows gets its local mean back, and voxels whose local mean the
model kept (within ``z`` spreads) are not changed at all. Works in normalised units (the body's mean activity
about 1) on ``[1, X, Y, Z]`` tensors; float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lowdose_toolkit.errors import UserError

#: Normalised activity above which a voxel's local mean counts as body (as the dose head's statistics).
BODY_THRESHOLD = 0.3
#: The noise scale's floor, in normalised units: keeps ``s`` away from 0 in cold regions.
FLOOR = 0.05
#: Float32 copies of the volume the guard holds beside ``low`` and ``pred`` at its peak (benchmarks/consistency.py:
#: 4.5 on a whole-body 360x360x673 volume at 1.65 x 1.65 x 2.89 mm, 4.5 s on 2 CPU cores); ``ldt infer``'s
#: memory check counts them.
WORKING_COPIES = 5
#: Body voxels used for the robust spread (a strided subsample beyond this many).
MAX_SAMPLES = 2**22


@dataclass(frozen=True)
class Consistency:
    """The guard's settings: ``z`` (spreads of noise allowed before anything is given back) and ``sigma_mm``
    (the local mean's Gaussian, mm). Chosen on validation at 6 mm voxels as 0.5 voxel; as half a voxel at 3 mm
    voxels it gave back noise (−0.4 dB at DRF 100), as the same 3 mm it changed PSNR by ≤ 0.02 dB
    (docs/RESULTS.md, "Lesions")."""

    z: float = 3.0
    sigma_mm: float = 3.0

    def __post_init__(self) -> None:
        if not self.z > 0:
            raise UserError(f"z={self.z} must be positive (spreads of the input's noise; e.g. 3)")
        if not self.sigma_mm > 0:
            raise UserError(f"sigma_mm={self.sigma_mm} must be positive (mm; e.g. 3)")

    @classmethod
    def from_spec(cls, spec: Any, where: str = "eval.consistency") -> Consistency | None:
        """From a recipe value: null/false (off), true (defaults) or ``{z, sigma_mm}``."""
        if spec is None or spec is False:
            return None
        if spec is True:
            return cls()
        if not isinstance(spec, dict) or set(spec) - {"z", "sigma_mm"}:
            raise UserError(f"{where}: {spec!r}; use null (off), true, or a mapping with z and sigma_mm")
        try:
            values = {k: float(v) for k, v in spec.items()}
        except (TypeError, ValueError):
            raise UserError(f"{where}: {spec!r}; z and sigma_mm must be numbers") from None
        try:
            return cls(**values)
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None

    @classmethod
    def override(cls, current: Consistency | None, flag: bool | None) -> Consistency | None:
        """A command line's ``--consistency/--no-consistency`` over a model's setting: None keeps ``current``,
        True the guard (``current``'s settings, else the defaults), False none."""
        if flag is None:
            return current
        return (current or cls()) if flag else None

    def as_dict(self) -> dict[str, float]:
        return {"z": self.z, "sigma_mm": self.sigma_mm}

    @torch.no_grad()
    def apply(self, low: torch.Tensor, pred: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor:
        """``pred`` with the local means it changed beyond the noise given back (``[1, X, Y, Z]``, float32;
        ``spacing``: the voxel size along X, Y, Z in mm)."""
        return self.apply_with_share(low, pred, spacing)[0]

    @torch.no_grad()
    def apply_with_share(self, low: torch.Tensor, pred: torch.Tensor, spacing: Sequence[float]
                         ) -> tuple[torch.Tensor, float]:
        """:meth:`apply`, and the share of body voxels it changed (for summaries)."""
        from lowdose_toolkit.evaluation.classical import gaussian

        if low.shape != pred.shape:
            raise ValueError(f"consistency: low {tuple(low.shape)} and pred {tuple(pred.shape)} differ in shape")
        if len(spacing) != 3 or not all(float(v) > 0 for v in spacing):
            raise ValueError(f"consistency: spacing {tuple(spacing)} must be three positive voxel sizes (mm)")
        sigma = [self.sigma_mm / float(v) for v in spacing]
        low, pred = low.float(), pred.float()
        removed = low - pred
        removed = gaussian(removed, sigma)  # the difference's local mean (the old copy is freed)
        scale = gaussian(pred.clamp(min=0), sigma)
        body = scale > BODY_THRESHOLD
        scale = scale.add_(FLOOR).sqrt_()
        t = removed.div_(scale)  # in place: three float32 copies beside low and pred at most
        inside = t[body]
        if inside.numel() < 100:  # no body to measure the noise on: leave the prediction alone
            return pred, 0.0
        if inside.numel() > MAX_SAMPLES:
            inside = inside[:: inside.numel() // MAX_SAMPLES + 1]
        spread = 1.4826 * float(inside.abs().median())
        del inside
        excess = t.abs().sub_(self.z * spread).clamp_(min=0)
        changed = float((excess[body] > 0).float().mean())
        return excess.mul_(t.sign_()).mul_(scale).add_(pred), changed
