"""Scoring of prediction/reference pairs: PSNR, SSIM and NRMSE per pair, on the whole volume as the challenge
does (or inside a body mask).

Example:
    >>> pairs = pair_by_filename("preds/", "full_dose/", method="cg3dsrgan")  # doctest: +SKIP
    >>> rows = evaluate_pairs(pairs)  # doctest: +SKIP
    >>> write_results(rows, "eval/")  # doctest: +SKIP

(:func:`~lowdose_toolkit.evaluation.pairing.pair_by_filename` pairs the files;
:func:`~lowdose_toolkit.evaluation.summary.write_results` writes a pair evaluation's files, its
``results.json`` through :mod:`lowdose_toolkit.evaluation.results`, the one results format.)
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lowdose_toolkit.errors import DataError, UserError
from lowdose_toolkit.evaluation.pairing import Pair

__all__ = ["evaluate_pairs"]


def _load(path: Path) -> np.ndarray:
    """One volume's voxels as a 3D float32 array (through :func:`~lowdose_toolkit.data.io.load_array`)."""
    from lowdose_toolkit.data.io import load_array

    return load_array(path, validate=False)[0][0].numpy()


def evaluate_pairs(
    pairs: Sequence[Pair],
    ssim_range: str = "challenge",
    mask: bool = False,
    mask_threshold: float = 0.01,
    progress: bool = True,
    failures: list[dict[str, str]] | None = None,
    allow_misaligned: bool = False,
    lesions: Any = None,
    lesion_cases: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Compute PSNR, SSIM and NRMSE for every pair, on the whole volume as the challenge does.

    References are loaded once for all the pairs that share them. A pair whose files cannot be read,
    or whose prediction is not on its reference's grid (shape, or affine unless ``allow_misaligned``),
    raises a DataError, or, when a ``failures`` list is given, is appended to it
    (``{pred, ref, error}``) and left out while the other pairs are scored.

    Args:
        pairs: Prediction/reference pairs.
        ssim_range: ``"challenge"`` (SSIM data range 2) or ``"standard"`` (1).
        mask: Restrict the metrics to a body mask of the reference
            (:func:`lowdose_toolkit.evaluation.metrics.body_mask` at ``mask_threshold``).
        mask_threshold: Fraction of the reference maximum for the body mask.
        progress: Show a rich progress bar.
        lesions: A :class:`~lowdose_toolkit.evaluation.lesions.LesionMasks`: every pair's lesions are also
            quantified, their rows (with ``subject`` and ``drf``) appended to ``lesion_cases``.

    Returns:
        One dict per pair, in the pairs' order: ``method, subject, drf, psnr, ssim, nrmse`` (fraction),
        ``rmse, ssim_range, ssim_data_range, masked, pred, ref``.

    Raises:
        DataError: If a pair fails and no ``failures`` list is given.
    """
    import torch
    from rich.progress import Progress

    from lowdose_toolkit.evaluation.lesions import volume_cases
    from lowdose_toolkit.evaluation.metrics import body_mask, check_ssim_range, compute_all

    check_ssim_range(ssim_range)
    if lesions is not None and lesion_cases is None:
        raise ValueError("evaluate_pairs: lesions given without a lesion_cases list to append their rows to")

    def fail(pair: Pair, error: str) -> None:
        if failures is None:
            raise DataError(error)
        failures.append({"pred": str(pair.pred), "ref": str(pair.ref), "error": error})

    from lowdose_toolkit.data.io import volume_grid

    shapes: dict[Path, tuple[tuple[int, ...], np.ndarray] | DataError] = {}
    good: list[int] = []
    for i, pair in enumerate(pairs):
        for p in (pair.pred, pair.ref):
            if p not in shapes:
                try:
                    shapes[p] = volume_grid(p)
                except DataError as exc:
                    shapes[p] = exc
        bad = next((shapes[p] for p in (pair.pred, pair.ref) if isinstance(shapes[p], DataError)), None)
        if bad is not None:
            fail(pair, str(bad))
            continue
        (ps, pa), (rs, ra) = shapes[pair.pred], shapes[pair.ref]  # type: ignore[misc]
        if ps != rs:
            fail(pair, f"shape mismatch: prediction {pair.pred} is {ps} but reference {pair.ref} is {rs}; "
                       "predictions must be on the reference's grid")
            continue
        if not np.allclose(pa, ra, atol=1e-3):
            if not allow_misaligned:
                fail(pair, f"{pair.pred} and its reference {pair.ref} have different affines (voxel grids or "
                           "orientations), so their voxels are not the same places; resample the prediction onto "
                           "the reference, or pass --allow-misaligned to score the arrays as they are")
                continue
            warnings.warn(f"{pair.pred} and {pair.ref} have different affines; scored as arrays "
                          "(--allow-misaligned)", stacklevel=2)
        good.append(i)

    order = sorted(good, key=lambda i: str(pairs[i].ref))
    rows: list[dict[str, Any] | None] = [None] * len(pairs)
    cached_ref: tuple[Path, torch.Tensor, torch.Tensor | None] | None = None
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("evaluating", total=len(pairs))
        for i in order:
            pair = pairs[i]
            bar.update(task, description=f"{pair.method} {pair.subject} DRF {pair.drf}")
            try:
                if cached_ref is None or cached_ref[0] != pair.ref:
                    ref = torch.from_numpy(_load(pair.ref))
                    cached_ref = (pair.ref, ref, body_mask(ref, mask_threshold) if mask else None)
                _, ref, ref_mask = cached_ref
                image = _load(pair.pred)
                m = compute_all(ref, torch.from_numpy(image), ssim_range=ssim_range, mask=ref_mask)
            except Exception as exc:  # noqa: BLE001 - a truncated or corrupt file fails its pair, not the rest
                detail = str(exc) if isinstance(exc, UserError) else f"cannot read: {type(exc).__name__}: {exc}"
                named = isinstance(exc, UserError) and (str(pair.pred) in detail or str(pair.ref) in detail)
                fail(pair, detail if named else f"{pair.pred} vs {pair.ref}: {detail}")  # each file named once
                bar.advance(task)
                continue
            rows[i] = {
                "method": pair.method,
                "subject": pair.subject,
                "drf": pair.drf,
                **{k: m[k] for k in ("psnr", "ssim", "nrmse", "rmse", "ssim_range", "ssim_data_range", "masked")},
                "pred": str(pair.pred),
                "ref": str(pair.ref),
            }
            if lesions is not None:  # a missing or misaligned mask fails the lesions, not the pair's scores
                try:
                    lesion_cases += volume_cases(lesions, pair.subject, pair.drf, pair.ref, ref.numpy(),
                                                 {pair.method: image}, shapes[pair.ref][1])  # type: ignore[index]
                except DataError as exc:
                    fail(pair, f"{pair.pred} vs {pair.ref}: lesions not scored: {exc}")
            bar.advance(task)
    return [r for r in rows if r is not None]
