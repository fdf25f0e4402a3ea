"""Validation of a training run: whole-volume metrics per DRF against the input's, the selection metric,
the dose head's calibration and accuracy, and the epoch's preview picture."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowdose_toolkit.infer.predictor import Predictor
from lowdose_toolkit.models.lowdose_model import LowDoseModel

CALIBRATION_VOLUMES = 200  # whole training volumes a calibrated dose head is fitted on (evenly spaced)


#: The Ultra-Low-Dose PET challenge's ranking weights per DRF (udpet-challenge.github.io, evaluation).
CHALLENGE_DRF_WEIGHTS: dict[int, float] = {4: 0.05, 10: 0.15, 20: 0.20, 50: 0.25, 100: 0.35}


def drf_weights(drfs: Iterable[int]) -> dict[int, float]:
    """Weights of the DRFs in ``val_gain``: the challenge's (renormalised) when every DRF has one, else equal."""
    drfs = [int(d) for d in drfs]
    if all(d in CHALLENGE_DRF_WEIGHTS for d in drfs):
        total = sum(CHALLENGE_DRF_WEIGHTS[d] for d in drfs)
        return {d: CHALLENGE_DRF_WEIGHTS[d] / total for d in drfs}
    return {d: 1.0 / len(drfs) for d in drfs}


def weighted_gain(val: Mapping[str, Any]) -> float:
    """DRF-weighted mean of the validation PSNR gain over the low-dose input (dB), see :func:`drf_weights`.

    (A variant that also subtracted every DRF's loss below the input selected the first, near-identity
    epoch of every unguided ML-Net run in the CPU study and stopped plateau schedules within a few
    epochs, so it was dropped: docs/RESULTS.md.)"""
    gains = {int(d): val["per_drf"][d]["psnr"] - val["low_dose"][d]["psnr"] for d in val["per_drf"]}
    weights = drf_weights(gains)
    return float(sum(weights[d] * g for d, g in gains.items()))


def monitor_value(monitor: str, val: Mapping[str, Any]) -> float:
    """The monitored number in a validation record (see :func:`monitor_mode`)."""
    if monitor == "val_loss":
        return float(val["loss"])
    if monitor == "val_psnr":
        return float(val["psnr"])
    if monitor == "val_gain":
        return float(val["gain"])
    return float(val["per_drf"][str(int(monitor.removeprefix("val_psnr_drf")))]["psnr"])


class Validator:
    """Scores the model on the validation volumes after an epoch (and draws the preview).

    Args:
        model: The model being trained (switched to eval mode and back).
        predictor: The run's :class:`Predictor` around ``model``.
        val_set: Validation volumes (TorchIO subjects with ``low``, ``full``, ``drf``, ``drf_class``).
        train_set: Training volumes, for calibrating a dose head that can be calibrated.
        drfs: The DRFs, in class order.
        ssim_range: ``eval.ssim_range``.
        previews: Folder for ``epoch_NNN.png`` previews, or None.
    """

    def __init__(self, model: LowDoseModel, predictor: Predictor, val_set: Any, train_set: Any, drfs: list[int],
                 ssim_range: str, previews: Path | None) -> None:
        self.model, self.predictor = model, predictor
        self.val_set, self.train_set, self.drfs = val_set, train_set, drfs
        self.ssim_range, self.previews = ssim_range, previews
        self._val_inputs: dict[str, dict[str, float]] | None = None
        self._calibration: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def __call__(self, epoch: int, use_refiner: bool) -> dict[str, Any]:
        """The validation record of ``epoch`` (see :func:`weighted_gain` for ``gain``)."""
        from lowdose_toolkit.evaluation.metrics import compute_all

        self.model.eval()
        calibration = self._calibrate_dose_head()
        per_drf: dict[int, list[dict[str, float]]] = {}
        inputs: dict[int, list[dict[str, float]]] = {}
        l1: list[float] = []
        dose_hits: list[bool] = []
        preview_index = len(self.drfs) - 1  # the first validation subject at the last (highest) DRF
        for i in range(len(self.val_set)):
            subject = self.val_set[i]
            low, full = subject["low"].data.float(), subject["full"].data.float()
            pred, probs = self.predictor.predict(low, use_refiner=use_refiner)
            if probs is not None:
                dose_hits.append(int(probs.argmax()) == int(subject["drf_class"]))
            m = compute_all(full[0], pred[0], ssim_range=self.ssim_range)
            per_drf.setdefault(int(subject["drf"]), []).append(m)
            if self._val_inputs is None:  # the low-dose input's own metrics, once: the bar to clear
                inputs.setdefault(int(subject["drf"]), []).append(
                    compute_all(full[0], low[0], ssim_range=self.ssim_range))
            l1.append(float((pred - full).abs().mean()))
            if self.previews is not None and i == preview_index:
                self._preview(epoch, use_refiner, low, full, pred, subject, m)
        self.model.train()
        out: dict[str, Any] = {"per_drf": {}}
        for drf, rows in sorted(per_drf.items()):
            out["per_drf"][str(drf)] = {k: float(np.mean([r[k] for r in rows])) for k in ("psnr", "ssim", "nrmse")}
        for key in ("psnr", "ssim", "nrmse"):
            out[key] = float(np.mean([v[key] for v in out["per_drf"].values()]))
        out["loss"] = float(np.mean(l1))
        if dose_hits:
            out["dose_accuracy"] = float(np.mean(dose_hits))
        if calibration is not None:
            out["dose_calibration_accuracy"] = calibration
        if self._val_inputs is None:
            self._val_inputs = {str(d): {k: float(np.mean([r[k] for r in rows])) for k in ("psnr", "ssim", "nrmse")}
                                for d, rows in sorted(inputs.items())}
        out["low_dose"] = self._val_inputs
        out["gain"] = weighted_gain(out)
        return out

    @torch.no_grad()
    def code_gains(self) -> torch.Tensor:
        """Mean PSNR gain over the input ``[true class, code]`` of the validation volumes conditioned on every
        code of a guided model (the whole model, refiner included); NaN rows for classes without volumes."""
        from lowdose_toolkit.evaluation.metrics import psnr

        k = len(self.drfs)
        sums, counts = torch.zeros(k, k, dtype=torch.float64), torch.zeros(k, 1, dtype=torch.float64)
        self.model.eval()
        for i in range(len(self.val_set)):
            subject = self.val_set[i]
            low, full = subject["low"].data.float(), subject["full"].data.float()
            cls, base = int(subject["drf_class"]), psnr(full[0], low[0])
            for code in range(k):
                pred, _ = self.predictor.predict(low, drf_class=code)
                sums[cls, code] += psnr(full[0], pred[0]) - base
            counts[cls] += 1
        self.model.train()
        return sums / counts  # 0/0 = NaN for a class without validation volumes

    @torch.no_grad()
    def strength_terms(self, volumes: Any) -> list[dict[str, Any]]:
        """What fitting the model's strength (:mod:`lowdose_toolkit.models.strength`) needs of each of
        ``volumes`` (subjects with ``low``, ``full``, ``drf``), predicted at full strength: its dose level (the
        head's continuous estimate on the whole volume, else its predicted class's DRF, else None), ``dot`` =
        <pred - low, full - low>, ``energy`` = ||pred - low||², and for its PSNR at any strength ``a``
        (:func:`strength_psnr`) ``residual`` = ||full - low||², ``voxels`` and ``peak`` = max(full)."""
        rows = []
        self.model.eval()
        for i in range(len(volumes)):
            subject = volumes[i]
            low, full = subject["low"].data.float(), subject["full"].data.float()
            pred, _ = self.predictor.predict(low)
            level = self.predictor.applied.get("dose_level")
            d, r = (pred - low).double(), (full - low).double()
            rows.append({"subject": subject["subject_id"], "drf": int(subject["drf"]), "level": level,
                         "dot": float((d * r).sum()), "energy": float((d * d).sum()),
                         "residual": float((r * r).sum()), "voxels": r.numel(), "peak": float(full.max())})
        self.model.train()
        return rows

    def _calibrate_dose_head(self) -> float | None:
        """Calibrate a dose head that can be (``calibrate(statistics, classes)``, see ``parts.py``) on whole
        training volumes; returns its training accuracy, or None. The statistics are computed once."""
        name = self.model.dose_head
        head = self.model.heads[name] if name is not None else None
        if head is None or not callable(getattr(head, "calibrate", None)):
            return None
        if self._calibration is None:
            n = len(self.train_set)
            picks = sorted({round(i * (n - 1) / max(1, CALIBRATION_VOLUMES - 1)) for i in range(CALIBRATION_VOLUMES)}) \
                if n > CALIBRATION_VOLUMES else range(n)
            stats, classes = [], []
            for i in picks:
                subject = self.train_set[i]
                stats.append(head.statistics(subject["low"].data[None].float().to(self.predictor.device)).cpu())
                classes.append(int(subject["drf_class"]))
            self._calibration = (torch.cat(stats), torch.tensor(classes))
        return float(head.calibrate(*self._calibration))

    def _preview(self, epoch: int, use_refiner: bool, low: torch.Tensor, full: torch.Tensor, pred: torch.Tensor,
                 subject: Any, metrics: Mapping[str, float]) -> None:
        """``previews/epoch_NNN.png``: MIPs of the input, the prediction (coarse and refined) and the full dose,
        with each one's PSNR/SSIM against the full dose, the difference row and the zoomed inset."""
        from lowdose_toolkit.infer.preview import save_mips_png, subject_units, volume_panels

        assert self.previews is not None
        volumes = [("low-dose input", low)]
        if self.model.refiner is not None and use_refiner:
            volumes.append(("coarse", self.predictor.predict(low, use_refiner=False)[0]))
            volumes.append(("refined", pred))
            known = {"refined": metrics}
        else:
            volumes.append(("prediction", pred))
            known = {"prediction": metrics}
        volumes.append(("full-dose", full))
        factor, units = subject_units(subject)
        panels = volume_panels([(name, t[0]) for name, t in volumes], reference=len(volumes) - 1, factor=factor,
                               ssim_range=self.ssim_range, known=known)
        save_mips_png(panels, self.previews / f"epoch_{epoch:03d}.png", units=units, reference=len(panels) - 1,
                      difference_label="prediction − full dose",
                      title=f"{subject['subject_id']} · DRF {int(subject['drf'])} · epoch {epoch}")


def strength_psnr(row: Mapping[str, Any], a: float) -> float:
    """The PSNR against the full dose of ``low + a · (pred - low)`` from a :meth:`Validator.strength_terms` row."""
    mse = max((row["residual"] - 2.0 * a * row["dot"] + a * a * row["energy"]) / row["voxels"], 1e-30)
    return 20.0 * float(np.log10(row["peak"] / np.sqrt(mse)))
