"""Whole-volume sliding-window inference with TorchIO's ``GridSampler`` and ``GridAggregator``.

The grid of patch locations comes from :class:`torchio.GridSampler` and the blending from
:class:`torchio.GridAggregator`; patches are sliced straight from the volume tensor (TorchIO's
per-patch ``Crop`` would copy the whole subject for every patch), run through ``predict`` one batch
at a time under ``torch.inference_mode`` and added to the aggregator, so only one batch of patches
is alive at a time. A whole-body uEXPLORER volume (360 x 360 x 673) needs the input plus two
float32 output-sized buffers (sum and weights), about 1.1 GiB.

Blending modes (TorchIO's names):

- ``"hann"``: each patch weighted by a separable Hann window whose end samples are dropped, so no
  weight is zero and voxels covered by a single patch (the volume's border) come back exactly.
- ``"average"``: overlapping predictions averaged with equal weights.
- ``"crop"``: half the overlap cropped from each patch side inside the volume; no averaging.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal, TypeAlias

import torch
import torch.nn.functional as F

from lowdose_toolkit.errors import UserError

__all__ = ["Blending", "infer_volume", "parse_overlap", "parse_patch_size"]

Blending = Literal["hann", "average", "crop"]
BLENDINGS = ("hann", "average", "crop")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    # A rich ``Progress`` (a task is added to it), a ``(Progress, TaskID)`` pair, or ``callback(done, total)``.
    ProgressLike: TypeAlias = Progress | tuple[Progress, TaskID] | Callable[[int, int], None]


def _three(value: object) -> tuple:
    return tuple(value) if isinstance(value, Sequence) else (value,) * 3


def parse_patch_size(patch_size: int | Sequence[int]) -> tuple[int, int, int]:
    """Return the patch size as three positive ints.

    Raises:
        UserError: If it is not one or three positive integers.
    """
    try:
        values = tuple(operator.index(v) for v in _three(patch_size))
    except TypeError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise UserError(f"patch_size must be one or three positive integers, got {patch_size!r}")
    return values  # type: ignore[return-value]


def parse_overlap(overlap: int | float | Sequence[int], patch: tuple[int, int, int]) -> tuple[int, int, int]:
    """Return the overlap in voxels per axis: even and smaller than the patch.

    Args:
        overlap: Voxels (one int or three; a whole float >= 1 counts as voxels), or a fraction of the
            patch in [0, 1) (a float), rounded to the nearest even number of voxels below the patch.
        patch: Patch size per axis.

    Raises:
        UserError: If an int overlap is odd, negative or not smaller than the patch.
    """
    if isinstance(overlap, float) and overlap >= 1 and overlap.is_integer():
        overlap = int(overlap)  # "--overlap 4" parsed as a float: voxels
    if isinstance(overlap, float):
        if not 0 <= overlap < 1:
            raise UserError(f"overlap fraction must be in [0, 1), got {overlap}; pass voxels as an int")
        out = []
        for p in patch:
            v = 2 * round(overlap * p / 2)
            out.append(min(v, p - 1 - (p - 1) % 2))
        return tuple(out)  # type: ignore[return-value]
    try:
        values = tuple(operator.index(v) for v in _three(overlap))
    except TypeError:
        values = ()
    if len(values) != 3:
        raise UserError(f"overlap must be one or three ints (voxels) or a float fraction, got {overlap!r}")
    for v, p in zip(values, patch, strict=True):
        if v < 0 or v % 2 or v >= p:
            raise UserError(
                f"overlap {values} is invalid for patch size {patch}: each value must be even, >= 0 and "
                f"smaller than the patch (TorchIO crops half of it from each side); e.g. use {p // 4 * 2}"
            )
    return values  # type: ignore[return-value]


class _Reporter:
    """Adapts the ``progress`` argument of :func:`infer_volume` to ``start(total)`` / ``advance(n)``."""

    def __init__(self, progress: ProgressLike | None) -> None:
        self.progress = progress
        self.done = 0
        self.total = 0
        self._rich: object | None = None
        self._task: object | None = None

    def start(self, total: int) -> None:
        self.total = total
        p = self.progress
        if p is None:
            return
        if isinstance(p, tuple) and len(p) == 2 and hasattr(p[0], "update"):
            self._rich, self._task = p
            self._rich.update(self._task, total=total, completed=0)  # type: ignore[attr-defined]
        elif hasattr(p, "add_task") and hasattr(p, "advance"):
            self._rich = p
            self._task = p.add_task("inference", total=total)
        elif not callable(p):
            raise UserError(f"progress must be a rich Progress, a (Progress, TaskID) pair or a callback, got {type(p)}")

    def advance(self, n: int) -> None:
        self.done += n
        if self._rich is not None:
            self._rich.advance(self._task, n)  # type: ignore[attr-defined]
        elif callable(self.progress):
            self.progress(self.done, self.total)


def _pad_to_patch(volume: torch.Tensor, patch: tuple[int, int, int]) -> tuple[torch.Tensor, list[int]]:
    """Replicate-pad axes shorter than the patch, split evenly between both ends."""
    before_after: list[int] = []
    for size, p in zip(volume.shape[1:], patch, strict=True):
        total = max(0, p - size)
        before_after.append(total // 2)
        before_after.append(total - total // 2)
    if not any(before_after):
        return volume, before_after
    # F.pad lists the last axis first.
    pad = [before_after[4], before_after[5], before_after[2], before_after[3], before_after[0], before_after[1]]
    padded = F.pad(volume.unsqueeze(0), pad, mode="replicate").squeeze(0)
    return padded, before_after


def infer_volume(
    volume: torch.Tensor,
    predict: Callable[[torch.Tensor], torch.Tensor],
    patch_size: int | Sequence[int],
    overlap: int | float | Sequence[int],
    batch_size: int,
    blending: Blending = "hann",
    device: torch.device | str = "cpu",
    amp: bool | Literal["none", "bf16", "fp16"] = False,
    amp_dtype: Literal["bf16", "fp16"] = "bf16",
    progress: ProgressLike | None = None,
) -> torch.Tensor:
    """Predict a whole volume patch by patch and blend the patches back together.

    Args:
        volume: Input ``[C, D, H, W]`` on the CPU (any size; axes shorter than the patch are
            replicate-padded and the padding is cropped from the output).
        predict: Maps a batch ``[B, C, d, h, w]`` (on ``device``) to ``[B, C_out, d, h, w]``; usually
            a model in eval mode. Called under ``torch.inference_mode``.
        patch_size: Patch size in voxels, one int or three.
        overlap: Overlap between neighbouring patches: voxels (even, one int or three) or a float
            fraction of the patch in [0, 1).
        batch_size: Patches per call of ``predict``.
        blending: ``"hann"``, ``"average"`` or ``"crop"`` (see the module docstring).
        device: Where batches are sent before ``predict``.
        amp: Autocast ``predict`` on CUDA (ignored on other devices): ``True`` for ``amp_dtype``,
            ``"bf16"`` / ``"fp16"`` for that dtype, ``False`` / ``"none"`` for full precision.
        amp_dtype: Autocast dtype when ``amp is True``: ``"bf16"`` or ``"fp16"``.
        progress: A rich ``Progress`` (a task is added), a ``(Progress, TaskID)`` pair, or a callback
            ``callback(patches_done, patches_total)``; ``None`` for silence.

    Returns:
        A float32 CPU tensor ``[C_out, D, H, W]`` (``C_out`` is 1 for the usual predictor).

    Example:
        >>> vol = torch.rand(1, 40, 37, 50)
        >>> out = infer_volume(vol, lambda x: 2 * x, patch_size=16, overlap=4, batch_size=8)
        >>> torch.allclose(out, 2 * vol, atol=1e-5)
        True
    """
    import torchio as tio

    if not isinstance(volume, torch.Tensor) or volume.ndim != 4:
        shape = tuple(volume.shape) if isinstance(volume, torch.Tensor) else type(volume)
        raise UserError(f"volume must be a [C, D, H, W] tensor, got {shape}")
    if blending not in BLENDINGS:
        raise UserError(f"blending {blending!r} is unknown; use one of {list(BLENDINGS)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(amp, str):
        if amp not in (*AMP_DTYPES, "none"):
            raise UserError(f"amp {amp!r} is unknown; use True/False, 'none', 'bf16' or 'fp16'")
        amp, amp_dtype = amp != "none", (amp if amp != "none" else amp_dtype)  # type: ignore[assignment]
    if amp_dtype not in AMP_DTYPES:
        raise UserError(f"amp_dtype {amp_dtype!r} is unknown; use one of {sorted(AMP_DTYPES)}")
    patch = parse_patch_size(patch_size)
    ovl = parse_overlap(overlap, patch)
    device = torch.device(device)
    if not volume.dtype.is_floating_point:
        volume = volume.float()
    volume = volume.cpu()
    shape = tuple(volume.shape[1:])

    padded, pads = _pad_to_patch(volume, patch)
    subject = tio.Subject(image=tio.ScalarImage(tensor=padded))
    sampler = tio.GridSampler(subject, patch_size=patch, patch_overlap=ovl)
    aggregator = tio.GridAggregator(sampler, overlap_mode=blending)
    locations = torch.as_tensor(sampler.locations, dtype=torch.int64)

    use_amp = amp and device.type == "cuda"
    autocast = torch.autocast(device_type="cuda", dtype=AMP_DTYPES[amp_dtype]) if use_amp else contextlib.nullcontext()
    reporter = _Reporter(progress)
    reporter.start(len(locations))
    with torch.inference_mode():
        for start in range(0, len(locations), batch_size):
            locs = locations[start : start + batch_size]
            batch = torch.stack([padded[:, a:d, b:e, c:f] for a, b, c, d, e, f in locs.tolist()])
            batch = batch.to(device, non_blocking=True)
            with autocast:
                out = predict(batch)
            if (
                not isinstance(out, torch.Tensor)
                or out.ndim != 5
                or out.shape[0] != len(locs)
                or (tuple(out.shape[2:]) != patch)
            ):
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out)
                raise UserError(
                    f"predict must map [B, C, *{patch}] to [B, C_out, *{patch}] with B={len(locs)}, got {got}"
                )
            aggregator.add_batch(out.detach().float().cpu(), locs)
            reporter.advance(len(locs))
    output = aggregator.get_output_tensor()
    d0, h0, w0 = pads[0], pads[2], pads[4]
    output = output[:, d0 : d0 + shape[0], h0 : h0 + shape[1], w0 : w0 + shape[2]]
    return output.float().contiguous()
