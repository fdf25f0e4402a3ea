"""Experiment tracking: the ``logger`` kind of part, a base class and the flat scalars of an epoch record.

A logger receives each epoch of a training run once it is committed (``checkpoints/last.pt`` written);
``train.loggers`` in a recipe lists them (default ``[jsonl]``: ``metrics.jsonl``). Built-ins: ``jsonl``
and ``tensorboard`` (``pip install 'lowdose-toolkit[tensorboard]'``). A third-party logger (MLflow, W&B,
...) subclasses :class:`Logger` and registers through ``ldt_register_loggers`` (README, "Writing a plugin").

An epoch record (one ``metrics.jsonl`` line) holds ``epoch``, ``stage``, ``lr`` (the first optimizer's),
``lrs`` (``{optimizer: lr}``), ``losses`` (``{term: epoch mean}``), ``val`` (empty when the epoch was not
validated; else ``psnr``/``ssim``/``nrmse`` means, ``per_drf`` and the input's ``low_dose`` as
``{drf: {psnr, ssim, nrmse}}``, ``gain``, ``loss`` and, with a dose head, ``dose_accuracy``),
``best_epoch`` and ``epoch_seconds``; :func:`scalars` flattens it into named numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


class Logger:
    """What the engine calls on a logger (rank 0 only), in this order; every method may be left as is.

    Factories receive ``run_dir`` (the run directory, a Path) and ``recipe`` (the resolved recipe) where their
    signature names them; their other keyword arguments are recipe keys. Building a logger must not
    touch the disk or the network (``ldt check`` builds it too): :meth:`start` does.
    """

    def start(self, epoch: int, history: Sequence[Mapping[str, Any]]) -> None:
        """Before the first epoch trained by this process: ``epoch`` is the last committed epoch (0 for a new
        run), ``history`` the committed records up to it (a resume repairs ``metrics.jsonl`` from them)."""

    def log_epoch(self, record: Mapping[str, Any], pictures: Mapping[str, Path]) -> None:
        """After each epoch is committed: its ``record`` and the PNG files drawn for it (``preview``: the
        validation MIPs, when the epoch was validated with previews on; ``curves``: ``curves.png``)."""

    def close(self) -> None:
        """When training ends, however it ends (after :meth:`start`)."""


def _number(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of an epoch record under flat names (non-finite values left out)::

        loss/<term>                       the epoch's mean of each loss term (and loss/total)
        val/<psnr|ssim|nrmse>/drf<N>      validation metrics per DRF (NRMSE a fraction)
        input/<psnr|ssim|nrmse>/drf<N>    the low-dose input's, the level to beat
        val/<psnr|ssim|nrmse|gain|loss>   means over the DRFs, the DRF-weighted gain, the L1 loss
        dose_head/accuracy                the dose head's accuracy on the validation volumes
        dose_head/calibration_accuracy    a calibrated head's accuracy on the training volumes
        lr/<optimizer>                    learning rates (the first group's, by optimizer)
        time/epoch_seconds
    """
    out: dict[str, float | None] = {f"loss/{k}": _number(v) for k, v in record.get("losses", {}).items()}
    val = record.get("val") or {}
    for drf, metrics in val.get("per_drf", {}).items():
        out.update({f"val/{k}/drf{drf}": _number(v) for k, v in metrics.items()})
    for drf, metrics in val.get("low_dose", {}).items():
        out.update({f"input/{k}/drf{drf}": _number(v) for k, v in metrics.items()})
    out.update({f"val/{k}": _number(val[k]) for k in ("psnr", "ssim", "nrmse", "gain", "loss") if k in val})
    if "dose_accuracy" in val:
        out["dose_head/accuracy"] = _number(val["dose_accuracy"])
    if "dose_calibration_accuracy" in val:
        out["dose_head/calibration_accuracy"] = _number(val["dose_calibration_accuracy"])
    out.update({f"lr/{k}": _number(v) for k, v in (record.get("lrs") or {}).items()})
    if "lr" in record and not record.get("lrs"):  # records written before lrs existed
        out["lr"] = _number(record["lr"])
    if "epoch_seconds" in record:
        out["time/epoch_seconds"] = _number(record["epoch_seconds"])
    return {k: v for k, v in out.items() if v is not None}


def example_record(epoch: int = 1, drfs: Sequence[int] = (4, 100)) -> dict[str, Any]:
    """An epoch record of the shape the engine logs (for a logger's tests: ``check_part("logger", ...)``)."""
    per_drf = {str(d): {"psnr": 40.0 + epoch + d / 100, "ssim": 0.95, "nrmse": 0.01} for d in drfs}
    low = {str(d): {"psnr": 38.0 + d / 100, "ssim": 0.9, "nrmse": 0.02} for d in drfs}
    return {"epoch": epoch, "stage": "train", "lr": 1e-3, "lrs": {"generator": 1e-3},
            "losses": {"l1": 0.1 / epoch, "total": 30.0 / epoch},
            "val": {"per_drf": per_drf, "psnr": 41.0 + epoch, "ssim": 0.95, "nrmse": 0.01, "loss": 0.1,
                    "dose_accuracy": 0.5, "low_dose": low, "gain": 2.0},
            "best_epoch": epoch, "epoch_seconds": 1.0}
