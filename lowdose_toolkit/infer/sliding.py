"""Whole-volume sliding-window inference: TorchIO's grid, one normalised output buffer.

The patch locations come from :class:`torchio.GridSampler` (its grid, its order). Patches are
sliced straight from the volume tensor (TorchIO's per-patch ``Crop`` would copy the whole subject for
every patch), run through ``predict`` one batch at a time under ``torch.inference_mode``, and blended
into the output by :class:`Blender`, so only one batch of patches is alive at a time.

:class:`Blender` gives the same result as :class:`torchio.GridAggregator` (tested to 1e-6) with one
output-sized buffer instead of three: the grid is a Cartesian product of per-axis starts and the
windows are separable, so the sum of window weights at a voxel is a product of three 1D sums. Each
patch is multiplied by its window divided by that sum before it is added (on the inference device),
and nothing is left to divide at the end. TorchIO keeps a sum and a weight volume and divides them
into a third; MONAI keeps an output and a count volume. A whole-body uEXPLORER volume
(360 x 360 x 673, 87 M voxels) needs the input plus one float32 output buffer, about 0.7 GiB.

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
from typing import TYPE_CHECKING, Literal, NamedTuple, TypeAlias

import torch
import torch.nn.functional as F

from lowdose_toolkit.errors import UserError

__all__ = ["Blender", "Blending", "infer_volume", "parse_overlap", "parse_patch_size"]

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


def window_1d(size: int, blending: Blending) -> torch.Tensor:
    """The 1D window of one patch axis in float64: TorchIO's Hann (end samples dropped) or ones."""
    if blending == "hann":
        return torch.hann_window(size + 2, periodic=False, dtype=torch.float64)[1:-1]
    return torch.ones(size, dtype=torch.float64)


class Staged(NamedTuple):
    """A batch of predictions on its way to the host: the host tensor and the CUDA event to wait for."""

    tensor: torch.Tensor
    ready: torch.cuda.Event | None


class Blender:
    """Blends patch predictions on a regular grid into one output volume, normalising as they arrive.

    Args:
        shape: Spatial shape of the volume ``(D, H, W)``.
        patch: Patch size per axis.
        overlap: Overlap per axis (even voxels), as given to the grid sampler.
        locations: ``[N, 6]`` patch locations ``(i0, j0, k0, i1, j1, k1)`` on a Cartesian grid.
        blending: ``"hann"``, ``"average"`` or ``"crop"``.
        device: Where patches are weighted before they are copied to the CPU output.
    """

    def __init__(
        self,
        shape: tuple[int, int, int],
        patch: tuple[int, int, int],
        overlap: tuple[int, int, int],
        locations: torch.Tensor,
        blending: Blending,
        device: torch.device,
    ) -> None:
        self.shape, self.patch, self.overlap, self.blending = shape, patch, overlap, blending
        self.device = device
        self.weigh_on_device = device.type != "cpu"  # else addcmul_ into the output: no temporary
        self.output: torch.Tensor | None = None
        # factors[axis][start]: the 1D window divided by the 1D weight sum over that patch's span.
        self.factors: list[dict[int, torch.Tensor]] = []
        for axis, (size, p) in enumerate(zip(shape, patch, strict=True)):
            starts = sorted(set(locations[:, axis].tolist()))
            window = window_1d(p, blending)
            total = torch.zeros(size, dtype=torch.float64)
            for s in starts:
                total[s : s + p] += window
            self.factors.append({s: (window / total[s : s + p]).float().to(device) for s in starts})
        n_grid = len(self.factors[0]) * len(self.factors[1]) * len(self.factors[2])
        if blending != "crop" and n_grid != len(locations):
            raise RuntimeError(f"patch locations are not a Cartesian grid: {len(locations)} patches, {n_grid} starts")

    def weight(self, i: int, j: int, k: int) -> torch.Tensor:
        """The ``[1, d, h, w]`` weight of the patch starting at ``(i, j, k)``: window / weight sum."""
        fd, fh, fw = self.factors[0][i], self.factors[1][j], self.factors[2][k]
        return (fd[:, None, None] * fh[None, :, None] * fw[None, None, :]).unsqueeze(0)

    def stage(self, batch: torch.Tensor, locations: list[list[int]]) -> Staged:
        """Start moving a batch ``[B, C, d, h, w]`` of predictions to the host, weighted where it is.

        On CUDA the copy goes to pinned memory without waiting, so the host can blend the previous
        batch while the device computes the next one; :meth:`add` waits for it.
        """
        batch = batch.float()
        if self.weigh_on_device and self.blending != "crop":  # one multiply on the accelerator
            weights = torch.stack([self.weight(*loc[:3]) for loc in locations]).to(batch.device)
            batch = batch * weights
        if batch.device.type != "cuda":
            return Staged(batch.cpu(), None)
        host = torch.empty(batch.shape, dtype=batch.dtype, pin_memory=True)
        host.copy_(batch, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return Staged(host, event)

    def add(self, batch: torch.Tensor | Staged, locations: list[list[int]]) -> None:
        """Blend a batch of predictions (any device, or :meth:`stage`'s result for them) at ``locations``."""
        if isinstance(batch, torch.Tensor):
            batch = self.stage(batch, locations)
        if batch.ready is not None:
            batch.ready.synchronize()
        patches = batch.tensor
        if self.output is None:
            self.output = torch.zeros(patches.shape[1], *self.shape, dtype=torch.float32)
        out = self.output
        if self.blending == "crop":
            for patch, loc in zip(patches, locations, strict=True):
                (i0, j0, k0, i1, j1, k1), (ci, cj, ck, fi, fj, fk) = loc, self._crop(loc)
                out[:, i0 + ci : i1 - fi, j0 + cj : j1 - fj, k0 + ck : k1 - fk] = patch[
                    :, ci : self.patch[0] - fi, cj : self.patch[1] - fj, ck : self.patch[2] - fk
                ]
            return
        for patch, (i0, j0, k0, i1, j1, k1) in zip(patches, locations, strict=True):
            region = out[:, i0:i1, j0:j1, k0:k1]
            if self.weigh_on_device:
                region.add_(patch)
            else:
                region.addcmul_(patch, self.weight(i0, j0, k0).cpu())

    def _crop(self, loc: list[int]) -> tuple[int, ...]:
        """Voxels cropped at the start and end of each axis: half the overlap, none at the volume's border."""
        half = [o // 2 for o in self.overlap]
        ini = [h if loc[a] > 0 else 0 for a, h in enumerate(half)]
        fin = [h if loc[3 + a] != self.shape[a] else 0 for a, h in enumerate(half)]
        return (*ini, *fin)

    def result(self) -> torch.Tensor:
        """The blended volume ``[C, D, H, W]`` (float32, CPU)."""
        if self.output is None:
            raise RuntimeError("no patches were added")
        return self.output


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
    amp: bool | Literal["none", "fp32", "bf16", "fp16"] = False,
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
        amp: Autocast ``predict`` on ``device`` (CPU or CUDA): ``True`` for ``amp_dtype``, ``"bf16"`` /
            ``"fp16"`` for that dtype, ``False`` / ``"none"`` / ``"fp32"`` for full precision. The blending
            and the output stay float32.
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
        if amp not in (*AMP_DTYPES, "none", "fp32"):
            raise UserError(f"amp {amp!r} is unknown; use True/False, 'fp32', 'bf16' or 'fp16'")
        amp, amp_dtype = amp in AMP_DTYPES, (amp if amp in AMP_DTYPES else amp_dtype)  # type: ignore[assignment]
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
    locations = torch.as_tensor(sampler.locations, dtype=torch.int64)
    blender = Blender(tuple(padded.shape[1:]), patch, ovl, locations, blending, device)

    autocast = torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp_dtype]) if amp else contextlib.nullcontext()
    reporter = _Reporter(progress)
    reporter.start(len(locations))
    pin = device.type == "cuda"
    pending: tuple[Staged, list[list[int]]] | None = None  # blended while the device runs the next batch
    with torch.inference_mode():
        for start in range(0, len(locations), batch_size):
            locs = locations[start : start + batch_size].tolist()
            batch = torch.stack([padded[:, a:d, b:e, c:f] for a, b, c, d, e, f in locs])
            if pin:
                batch = batch.pin_memory()
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
            staged = blender.stage(out.detach(), locs)
            if pending is not None:
                blender.add(*pending)
                reporter.advance(len(pending[1]))
            pending = (staged, locs)
        if pending is not None:
            blender.add(*pending)
            reporter.advance(len(pending[1]))
    output = blender.result()
    if any(pads):
        d0, h0, w0 = pads[0], pads[2], pads[4]
        output = output[:, d0 : d0 + shape[0], h0 : h0 + shape[1], w0 : w0 + shape[2]].contiguous()
    return output
