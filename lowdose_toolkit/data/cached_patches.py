"""Training patches sliced straight from the cached layout's memory maps (:mod:`lowdose_toolkit.data.cache`).

The volume path (:class:`~lowdose_toolkit.data.datasets.PatchStream`) loads, decompresses and normalises
a whole (subject, DRF) pair for every ``samples_per_volume`` patches. Here a patch reads only its own
voxels from the ``.nii`` memory maps and is divided by the pair's scale stored at cache time, so the
numbers equal the same slice of the volume path's normalised volume.

A pass draws ``samples_per_volume`` patches from every pair, shuffled, as the volume path's queue does.
The main process only plans it: a ``(pair, seed)`` item per patch from one seed drawn from torch's RNG,
so the stream depends on the RNG state at its start alone (as checkpoints need) and not on
``data.num_workers``; the loader's workers draw each patch's corner from its seed and read it.
Samplers: ``uniform`` (every corner equally likely, as TorchIO's ``UniformSampler``) and ``weighted``
(a patch centre drawn in proportion to the cached block map, then uniformly within its block: TorchIO's
``WeightedSampler`` on the ``sampling_map`` with the map averaged over ``BLOCK``\\ :sup:`3` blocks).

Reading: in each slice along the last axis a patch's rows lie in one contiguous run of bytes. The maps are opened
with ``MADV_RANDOM`` (no read-around: the kernel would read ``read_ahead_kb`` around every fault, often
megabytes) and every run of both images is requested with ``MADV_WILLNEED`` before the copy, so the
reads of a patch go to the disk together instead of one fault at a time. From the page cache this
costs little; from the disk it is what makes a data set larger than memory usable (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import mmap
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lowdose_toolkit.core.spec import three
from lowdose_toolkit.data.cache import BLOCK, CachedSubject, CachedVolume
from lowdose_toolkit.data.datasets import PatchStreamBase
from lowdose_toolkit.data.normalize import QUANTILE, Normalization, fit_normalization
from lowdose_toolkit.errors import DataError

_OPEN_MAPS = 64  # memory maps kept open per process (each holds a file descriptor)
_SAMPLING_MAPS = 32  # weighted samplers' distributions kept per process
_MADVISE = hasattr(mmap.mmap, "madvise") and hasattr(mmap, "MADV_WILLNEED") and hasattr(mmap, "MADV_RANDOM")

__all__ = ["CachedPair", "CachedPatchStream", "CachedPatches", "cached_pairs"]


@dataclass(frozen=True)
class CachedPair:
    """One (subject, DRF) training pair of cached images and the input's normalisation."""

    subject: str
    low: CachedVolume
    full: CachedVolume
    drf: int
    drf_class: int
    norm: Normalization


def cached_pairs(subjects: Sequence[CachedSubject], drfs: Sequence[int], normalization: str) -> list[CachedPair]:
    """The (subject, DRF) pairs of ``subjects``, in the volume path's order, normalised as it does."""
    pairs = []
    for s in subjects:
        for drf in drfs:
            if drf not in s.low:
                raise DataError(f"subject {s.subject!r} has no cached DRF {drf} image (has {sorted(s.low)})")
            low = s.low[drf]
            if normalization in ("auto", "robust"):
                if low.scale is None:
                    raise DataError(low.scale_error or f"{low.path}: no robust scale cached; run `ldt cache` again")
                norm = Normalization("robust", low.scale, QUANTILE)
            else:
                norm = fit_normalization(torch.empty(0), normalization, s.suv_factor or None, where=str(low.path))
            if tuple(low.shape) != tuple(s.full.shape):
                raise DataError(f"{low.path}: shape {low.shape} differs from the full-dose {s.full.shape} "
                                f"({s.full.path}); run `ldt cache` again")
            pairs.append(CachedPair(s.subject, low, s.full, drf, list(drfs).index(drf), norm))
    return pairs


def _axis_blocks(n: int, p: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per block along one axis: the fraction of its voxels that may centre a patch, and that range."""
    lo, hi = p // 2, n - p + p // 2  # centres whose patch fits (TorchIO's clear_probability_borders)
    start = block * np.arange(-(-n // block))
    end = np.minimum(start + block, n) - 1
    first, last = np.maximum(start, lo), np.minimum(end, hi)
    valid = np.maximum(0, last - first + 1)
    return valid / (end - start + 1), first, last


class _Sampling:
    """The weighted sampler's distribution for one (map, patch size): blocks by mass, voxels uniform within."""

    def __init__(self, weights: np.ndarray, shape: Sequence[int], patch: Sequence[int], where: str) -> None:
        axes = [_axis_blocks(n, p, BLOCK) for n, p in zip(shape, patch, strict=True)]
        if weights.shape != tuple(len(a[0]) for a in axes):
            raise DataError(f"{where}: sampling map of shape {weights.shape} does not fit an image of shape "
                            f"{tuple(shape)}; run `ldt cache` again")
        mass = weights * axes[0][0][:, None, None] * axes[1][0][None, :, None] * axes[2][0][None, None, :]
        cdf = np.cumsum(mass.ravel())
        if not cdf[-1] > 0:
            raise DataError(f"{where}: no patch of {tuple(patch)} fits where the image has activity; "
                            "use a smaller data.patch_size or data.sampler: uniform")
        self.cdf = cdf / cdf[-1]
        self.grid = weights.shape
        self.ranges = [(a[1], a[2]) for a in axes]

    def corner(self, rng: np.random.Generator, patch: Sequence[int]) -> tuple[int, ...]:
        flat = min(int(np.searchsorted(self.cdf, rng.random(), side="right")), len(self.cdf) - 1)
        block = np.unravel_index(flat, self.grid)
        return tuple(int(rng.integers(first[b], last[b] + 1)) - p // 2
                     for (first, last), b, p in zip(self.ranges, block, patch, strict=True))


class _Mapped:
    """A cached volume's memory map and its ``[I, J, K]`` array view (Fortran order, as NIfTI stores it)."""

    def __init__(self, volume: CachedVolume) -> None:
        self.volume = volume
        try:
            with open(volume.path, "rb") as fh:
                self.mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            self.array = np.ndarray(volume.shape, dtype="<f4", buffer=self.mm, offset=volume.offset, order="F")
        except (OSError, ValueError, TypeError) as exc:
            raise DataError(f"{volume.path}: cannot memory-map the cached image ({exc}); "
                            "run `ldt cache` again to rewrite it") from None
        if _MADVISE:
            self.mm.madvise(mmap.MADV_RANDOM)

    def prefetch(self, corner: Sequence[int], patch: Sequence[int]) -> None:
        """Ask the kernel for the patch's runs of rows now (one request per slice), without waiting."""
        if not _MADVISE:
            return
        nx, ny, _ = self.volume.shape
        x0, y0, z0 = corner
        span = 4 * (nx * (patch[1] - 1) + patch[0])
        for z in range(z0, z0 + patch[2]):
            start = self.volume.offset + 4 * (x0 + nx * (y0 + ny * z))
            aligned = start - start % mmap.PAGESIZE
            self.mm.madvise(mmap.MADV_WILLNEED, aligned, start - aligned + span)


class CachedPatches(Dataset):
    """Patches of cached pairs; the item ``(pair index, seed)`` is one patch, its corner drawn from ``seed``.

    Returns ``{"low", "full": [1, *patch] float32 normalised, "drf", "drf_class", "location": [3] corner}``.
    Memory maps are opened lazily in the process that reads (never pickled into workers).
    """

    def __init__(self, pairs: Sequence[CachedPair], patch_size: int | Sequence[int], weighted: bool = False) -> None:
        self.pairs = list(pairs)
        self.patch = three(patch_size, "data.patch_size")
        self.weighted = weighted
        for pair in self.pairs:
            if any(n < p for n, p in zip(pair.low.shape, self.patch, strict=True)):
                raise DataError(f"{pair.low.path}: image of shape {pair.low.shape} is smaller than data.patch_size "
                                f"{self.patch}; use a smaller patch")
        self._maps: OrderedDict[str, _Mapped] = OrderedDict()
        self._sampling: OrderedDict[str, _Sampling] = OrderedDict()

    def __len__(self) -> int:
        return len(self.pairs)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": OrderedDict(), "_sampling": OrderedDict()}

    def _map(self, volume: CachedVolume) -> _Mapped:
        key = str(volume.path)
        mm = self._maps.get(key)
        if mm is None:
            mm = _Mapped(volume)
            self._maps[key] = mm
            if len(self._maps) > _OPEN_MAPS:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(key)
        return mm

    def _distribution(self, volume: CachedVolume) -> _Sampling:
        key = str(volume.weights)
        dist = self._sampling.get(key)
        if dist is None:
            try:
                weights = np.load(volume.weights)
            except (OSError, ValueError) as exc:
                raise DataError(f"{volume.weights}: unreadable sampling map ({type(exc).__name__}); "
                                "run `ldt cache` again") from None
            dist = _Sampling(weights, volume.shape, self.patch, str(volume.weights))
            self._sampling[key] = dist
            if len(self._sampling) > _SAMPLING_MAPS:
                self._sampling.popitem(last=False)
        return dist

    def corner(self, index: int, seed: int) -> tuple[int, ...]:
        """The patch corner that item ``(index, seed)`` reads."""
        pair = self.pairs[index]
        rng = np.random.default_rng(seed)
        if self.weighted:
            return self._distribution(pair.low).corner(rng, self.patch)
        return tuple(int(rng.integers(0, n - p + 1)) for n, p in zip(pair.low.shape, self.patch, strict=True))

    def read(self, volume: CachedVolume, corner: Sequence[int], norm: Normalization) -> torch.Tensor:
        """``[1, *patch]``: the patch at ``corner`` of ``volume``, normalised."""
        window = tuple(slice(c, c + p) for c, p in zip(corner, self.patch, strict=True))
        try:
            voxels = np.ascontiguousarray(self._map(volume).array[window])
        except (OSError, ValueError) as exc:
            raise DataError(f"{volume.path}: cannot read a patch ({exc}); run `ldt cache` again") from None
        return norm.apply(torch.from_numpy(voxels))[None]

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        index, seed = item
        pair = self.pairs[index]
        corner = self.corner(index, seed)
        self._map(pair.low).prefetch(corner, self.patch)
        self._map(pair.full).prefetch(corner, self.patch)
        return {
            "low": self.read(pair.low, corner, pair.norm),
            "full": self.read(pair.full, corner, pair.norm),
            "drf": pair.drf,
            "drf_class": pair.drf_class,
            "location": torch.tensor(corner),
        }


class _Plan(Sampler):
    """The current pass's items; swapped at each pass, so that one loader's workers serve every pass."""

    def __init__(self) -> None:
        self.items: list[tuple[int, int]] = []

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class CachedPatchStream(PatchStreamBase):
    """An endless, reproducible stream of training batches from :class:`CachedPatches`.

    The same interface as :class:`~lowdose_toolkit.data.datasets.PatchStream`; ``data.num_workers``
    loader workers read patches in parallel (their number does not change the patches) and persist
    from pass to pass.
    """

    def __init__(self, pairs: Sequence[CachedPair], data_cfg: dict[str, Any]) -> None:
        self.dataset = CachedPatches(pairs, data_cfg["patch_size"], data_cfg["sampler"] == "weighted")
        self.patch_size = self.dataset.patch
        self.batch_size = data_cfg["batch_size"]
        self.samples_per_volume = data_cfg["samples_per_volume"]
        self.num_workers = data_cfg["num_workers"]
        self._plan = _Plan()
        self._loader_obj: DataLoader | None = None
        self._iter: Iterator[dict[str, Any]] | None = None

    def plan(self, seed: int) -> list[tuple[int, int]]:
        """A pass's ``(pair, seed)`` items: ``samples_per_volume`` per pair, shuffled."""
        g = torch.Generator().manual_seed(seed)
        n = self.patches_per_pass
        pairs = torch.arange(len(self.dataset)).repeat_interleave(self.samples_per_volume)
        seeds = torch.randint(0, 2**62, (n,), generator=g)
        order = torch.randperm(n, generator=g)
        return list(zip(pairs[order].tolist(), seeds[order].tolist(), strict=True))

    def _loader(self) -> Iterator[dict[str, Any]]:
        seed = int(torch.randint(0, 2**62, (1,)))  # the one draw from the global RNG per pass
        self._plan.items = self.plan(seed)
        if self._loader_obj is None:  # the loader's own seed (unused: items carry theirs) leaves the global RNG alone
            self._loader_obj = DataLoader(
                self.dataset, batch_size=self.batch_size, sampler=self._plan, drop_last=True,
                num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                generator=torch.Generator().manual_seed(0))
        return iter(self._loader_obj)

    def _batch(self, item: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"low": item["low"], "full": item["full"], "drf": item["drf"], "drf_class": item["drf_class"].long()}
