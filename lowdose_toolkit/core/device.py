"""The device a command runs on: ``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda``, ``cuda:N``."""

from __future__ import annotations

import torch

from lowdose_toolkit.errors import RecipeError


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; a clear error for unusable devices."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise RecipeError(f"train.device: {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"train.device: {spec!r} asked for but CUDA is not available; use auto or cpu")
    return device
