"""Whole-volume prediction of a synthesis model with its dose head's verdict.

One function for validation, ``ldt evaluate RUN_DIR`` and the study: the sliding window of
``recipe["eval"]``, the model's final image (guided by its dose head when it has guidance) and the dose
head's class probabilities averaged over the windows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lowdose_toolkit.model import LowDoseModel


def predict_volume(
    model: LowDoseModel,
    low: torch.Tensor,
    eval_cfg: Mapping[str, Any],
    device: torch.device,
    amp: bool = False,
    use_refiner: bool = True,
    drf_class: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Predict a normalised volume ``[1, X, Y, Z]``; returns ``(prediction, dose probabilities)``.

    Args:
        model: The synthesis model, in eval mode.
        low: The normalised low-dose volume on the CPU.
        eval_cfg: The recipe's ``eval`` section (window, overlap, batch, blending).
        device: Where the model runs.
        amp: Autocast on CUDA.
        use_refiner: False for the coarse output (ML-Net alone).
        drf_class: Condition a guided model on this DRF class (an oracle) instead of its head's prediction.

    The probabilities ``[num_classes]`` are the dose head's softmax averaged over the windows (None
    when the model has no dose head).
    """
    from lowdose_toolkit.sliding import infer_volume

    head = model.dose_head
    votes: list[torch.Tensor] = []

    def predict(x: torch.Tensor) -> torch.Tensor:
        if head is None:
            return model.predict(x, use_refiner)
        cls = None if drf_class is None else torch.full((x.shape[0],), drf_class, device=x.device)
        out = model(x, use_refiner=use_refiner, drf_class=cls)
        votes.append(out[head].float().softmax(dim=1).cpu())
        return out["pred"]

    pred = infer_volume(low, predict, patch_size=eval_cfg["patch_size"], overlap=eval_cfg["overlap"],
                        batch_size=eval_cfg["batch_size"], blending=eval_cfg["blending"], device=device, amp=amp)
    probs = torch.cat(votes).mean(dim=0) if votes else None
    return pred, probs


def confusion_matrix(true: list[int], predicted: list[int], num_classes: int) -> list[list[int]]:
    """``matrix[t][p]``: volumes of true class ``t`` predicted as ``p``."""
    matrix = [[0] * num_classes for _ in range(num_classes)]
    for t, p in zip(true, predicted, strict=True):
        matrix[t][p] += 1
    return matrix
