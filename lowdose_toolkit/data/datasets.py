"""The data pipeline: subject split, TorchIO subjects with input-based normalisation, patch queues.

One training sample is a (subject, DRF) pair: its low-dose image at that DRF, the subject's
full-dose image, the DRF and its class index (for dose heads). The split is by subject, so all DRFs
of a subject land in the same split.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torchio as tio
from torch.utils.data import DataLoader

from lowdose_toolkit.core.spec import three
from lowdose_toolkit.data.cache import SAMPLING_FLOOR
from lowdose_toolkit.data.io import read_image
from lowdose_toolkit.data.normalize import fit_normalization
from lowdose_toolkit.errors import DataError, RecipeError
from lowdose_toolkit.records import SubjectRecord


@dataclass(frozen=True)
class Split:
    """Subject-level split (no subject in two splits)."""

    train: list[SubjectRecord]
    val: list[SubjectRecord]
    test: list[SubjectRecord]

    def summary(self) -> dict[str, list[str]]:
        return {k: [r.subject for r in getattr(self, k)] for k in ("train", "val", "test")}


def _count(spec: float | int, n: int, key: str) -> int:
    if isinstance(spec, float) and spec < 1:
        return max(1, round(spec * n)) if spec > 0 else 0
    if spec < 0 or int(spec) != spec:
        raise RecipeError(f"data.split.{key}: expected a fraction < 1 or a whole number of subjects, got {spec!r}")
    return int(spec)


def split_records(records: Sequence[SubjectRecord], val: float | int, test: float | int, seed: int) -> Split:
    """Shuffle subjects with ``seed`` and cut val / test / train (deterministic, by subject)."""
    ids = sorted({r.subject for r in records})
    if len(ids) != len(records):
        raise DataError("the data source lists a subject twice; subject ids must be unique")
    n = len(ids)
    n_val, n_test = _count(val, n, "val"), _count(test, n, "test")
    if n - n_val - n_test < 1:
        raise RecipeError(
            f"data.split: {n} subjects cannot give {n_val} validation + {n_test} test subjects and leave one to train"
        )
    order = ids[:]
    random.Random(seed).shuffle(order)
    by_id = {r.subject: r for r in records}
    pick = lambda names: [by_id[s] for s in sorted(names)]  # noqa: E731
    return Split(
        train=pick(order[n_val + n_test:]), val=pick(order[:n_val]), test=pick(order[n_val:n_val + n_test])
    )


class NormalizeByInput(tio.Transform):
    """Scale ``low`` and ``full`` by the normalisation computed from ``low`` alone; record it.

    With ``sampling_map=True`` also adds a ``sampling_map`` image (the normalised input, clipped at 0,
    plus a floor) for TorchIO's ``WeightedSampler``: patches are drawn towards activity.
    """

    def __init__(self, method: str = "auto", sampling_map: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.method = method
        self.sampling_map = sampling_map
        self.args_names = ["method", "sampling_map"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        low = subject["low"]
        suv = subject.get("suv_factor") or None
        norm = fit_normalization(low.data, self.method, suv, where=str(low.path))
        low.set_data(norm.apply(low.data.float()))
        if "full" in subject:
            subject["full"].set_data(norm.apply(subject["full"].data.float()))
        subject["scale"] = norm.scale
        subject["norm_method"] = norm.method
        if self.sampling_map:
            weights = low.data.clamp(min=0) + SAMPLING_FLOOR * low.data.clamp(min=0).mean()
            subject.add_image(tio.ScalarImage(tensor=weights, affine=low.affine), "sampling_map")
        return subject


def make_subject(record: SubjectRecord, drf: int, drfs: Sequence[int]) -> tio.Subject:
    """The TorchIO subject of one (subject, DRF) pair (images load lazily)."""
    if drf not in record.low:
        raise DataError(f"subject {record.subject!r} has no DRF {drf} image (has {sorted(record.low)})")
    return tio.Subject(
        low=read_image(record.low[drf]),
        full=read_image(record.full),
        drf=drf,
        drf_class=list(drfs).index(drf),
        subject_id=record.subject,
        suv_factor=float(record.suv_factor or 0.0),
    )


def pairs_dataset(records: Sequence[SubjectRecord], drfs: Sequence[int], normalization: str,
                  sampling_map: bool = False, preload: bool = False,
                  classes: Sequence[int] | None = None) -> tio.SubjectsDataset:
    """A SubjectsDataset with one item per (subject, DRF), ``drf_class`` the DRF's index in ``classes``
    (default ``drfs``; the model's DRF list when ``drfs`` is a subset of it).

    Images load lazily and are normalised each time a subject is drawn; with ``preload`` every pair
    is read and normalised once and kept in memory (fast patch queues for small data sets such as the
    phantom; a whole-body challenge set needs hundreds of GB, so the default is lazy).
    """
    subjects = [make_subject(r, d, drfs if classes is None else classes) for r in records for d in drfs]
    transform = NormalizeByInput(normalization, sampling_map)
    if not preload:
        return tio.SubjectsDataset(subjects, transform=transform)
    loaded = []
    for subject in subjects:
        subject.load()
        done = transform(subject)
        for name, image in done.get_images_dict(intensity_only=False).items():
            done[name] = tio.ScalarImage(tensor=image.data, affine=image.affine)
        loaded.append(done)
    return tio.SubjectsDataset(loaded)


class PatchStreamBase:
    """An endless stream of training batches: a pass is ``samples_per_volume`` patches of every
    (subject, DRF) pair; a subclass gives one pass's loader (``_loader``) and how a loader item becomes a
    batch (``_batch``)."""

    dataset: Any
    samples_per_volume: int
    batch_size: int
    _iter: Iterator[Any] | None

    def _loader(self) -> Iterator[Any]:
        raise NotImplementedError

    def _batch(self, item: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def reset(self) -> None:
        """Start a fresh pass at the next batch (called at each epoch start)."""
        self._iter = None

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next batch ``{low, full, drf, drf_class}``; a new pass starts when one ends."""
        for _ in range(2):
            if self._iter is None:
                self._iter = self._loader()
            try:
                return self._batch(next(self._iter))
            except StopIteration:
                self._iter = None
        raise DataError("the patch stream yields no batch: fewer patches in a pass than data.batch_size")

    @property
    def patches_per_pass(self) -> int:
        return len(self.dataset) * self.samples_per_volume

    def default_steps(self) -> int:
        """Steps in one pass over every (subject, DRF) pair's patches."""
        return max(1, self.patches_per_pass // self.batch_size)


class PatchStream(PatchStreamBase):
    """An endless, reproducible stream of training batches from a TorchIO ``Queue``.

    A fresh Queue is made whenever the previous one is exhausted, so the stream depends only on the
    RNG state at its start (which checkpoints save): a resumed run draws the same patches.
    """

    def __init__(self, dataset: tio.SubjectsDataset, data_cfg: dict[str, Any]) -> None:
        self.dataset = dataset
        self.patch_size = three(data_cfg["patch_size"], "data.patch_size")
        self.batch_size = data_cfg["batch_size"]
        self.samples_per_volume = data_cfg["samples_per_volume"]
        self.queue_length = max(data_cfg["queue_length"], self.batch_size)
        self.num_workers = data_cfg["num_workers"]
        if data_cfg["sampler"] == "weighted":
            self.sampler: tio.data.PatchSampler = tio.WeightedSampler(self.patch_size, "sampling_map")
        else:
            self.sampler = tio.UniformSampler(self.patch_size)
        self._iter: Iterator[dict[str, Any]] | None = None

    def _loader(self) -> Iterator[dict[str, Any]]:
        queue = tio.Queue(
            self.dataset,
            max_length=self.queue_length,
            samples_per_volume=self.samples_per_volume,
            sampler=self.sampler,
            num_workers=self.num_workers,
            shuffle_subjects=True,
            shuffle_patches=True,
            verbose=False,
        )
        # The outer loader must use num_workers=0: the queue has its own workers (TorchIO #288).
        return iter(DataLoader(queue, batch_size=self.batch_size, num_workers=0, drop_last=True))

    def _batch(self, item: dict[str, Any]) -> dict[str, torch.Tensor]:
        return to_batch(item)


def to_batch(item: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A TorchIO batch as plain tensors: low, full [B,1,...], drf, drf_class [B]."""
    return {
        "low": item["low"][tio.DATA].float(),
        "full": item["full"][tio.DATA].float(),
        "drf": torch.as_tensor(item["drf"]),
        "drf_class": torch.as_tensor(item["drf_class"]).long(),
    }


def shard(items: Sequence[Any], rank: int, world: int) -> list[Any]:
    """Items of one rank: every ``world``-th item starting at ``rank`` (all ranks get equal counts)."""
    per_rank = math.floor(len(items) / world)
    if per_rank == 0:
        raise RecipeError(f"{len(items)} training subjects cannot be shared by {world} processes")
    return list(items[rank::world])[:per_rank]
