"""The data pipeline: subject-level split, DRF classes, input-based normalisation, patch stream."""

from __future__ import annotations

import nibabel as nib
import pytest
import torch
from conftest import make_tiny_dataset

from lowdose_toolkit.core.plugin_manager import get_registry
from lowdose_toolkit.data.datasets import PatchStream, pairs_dataset, shard, split_records
from lowdose_toolkit.data.normalize import fit_normalization
from lowdose_toolkit.errors import RecipeError


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> list:
    root = make_tiny_dataset(tmp_path_factory.mktemp("data"), subjects=6)
    return get_registry().build("source", {"name": "nifti", "root": str(root)}, "data.source",
                                context={"drfs": [4, 100]}).records()


def test_split_is_by_subject_deterministic_and_disjoint(records: list) -> None:
    a = split_records(records, 0.2, 2, seed=5)
    b = split_records(records, 0.2, 2, seed=5)
    assert a == b
    assert (len(a.train), len(a.val), len(a.test)) == (3, 1, 2)
    names = [set(r.subject for r in part) for part in (a.train, a.val, a.test)]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert set().union(*names) == {r.subject for r in records}
    assert split_records(records, 0.2, 2, seed=6) != a  # another seed, another split
    with pytest.raises(RecipeError, match="cannot give 3 validation \\+ 3 test subjects"):
        split_records(records, 3, 3, seed=0)


def test_pairs_carry_drf_class_and_normalisation_from_the_input(records: list) -> None:
    ds = pairs_dataset(records[:2], [4, 100], "auto")
    assert len(ds) == 4
    item = ds[1]
    assert item["drf"] == 100 and item["drf_class"] == 1 and item["subject_id"] == records[0].subject
    raw_low = torch.from_numpy(nib.load(records[0].low[100]).get_fdata()).float()
    raw_full = torch.from_numpy(nib.load(records[0].full).get_fdata()).float()
    norm = fit_normalization(raw_low)
    assert item["scale"] == pytest.approx(norm.scale)
    torch.testing.assert_close(item["low"].data[0], raw_low / norm.scale)
    torch.testing.assert_close(item["full"].data[0], raw_full / norm.scale)  # the input's scale, not its own


def test_preload_gives_the_same_items(records: list) -> None:
    lazy = pairs_dataset(records[:2], [4, 100], "auto")
    eager = pairs_dataset(records[:2], [4, 100], "auto", preload=True)
    for i in range(len(lazy)):
        for key in ("low", "full"):
            torch.testing.assert_close(lazy[i][key].data, eager[i][key].data)
        assert lazy[i]["drf_class"] == eager[i]["drf_class"] and lazy[i]["scale"] == eager[i]["scale"]


@pytest.mark.parametrize("sampler", ["uniform", "weighted"])
def test_patch_stream_is_reproducible(records: list, sampler: str) -> None:
    cfg = {"patch_size": 8, "batch_size": 3, "samples_per_volume": 2, "queue_length": 6, "num_workers": 0,
           "sampler": sampler}
    ds = pairs_dataset(records[:3], [4, 100], "auto", sampling_map=sampler == "weighted")

    def draw() -> list[torch.Tensor]:
        torch.manual_seed(11)
        stream = PatchStream(ds, cfg)
        return [stream.next_batch()["low"] for _ in range(5)]  # crosses a queue refill

    first, second = draw(), draw()
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    batch = PatchStream(ds, cfg).next_batch()
    assert batch["low"].shape == (3, 1, 8, 8, 8) and batch["drf_class"].dtype == torch.long


def test_weighted_sampler_prefers_activity(records: list) -> None:
    cfg = {"patch_size": 6, "batch_size": 8, "samples_per_volume": 8, "queue_length": 16, "num_workers": 0}
    torch.manual_seed(0)
    uni = PatchStream(pairs_dataset(records[:2], [4], "auto"), {**cfg, "sampler": "uniform"})
    wei = PatchStream(pairs_dataset(records[:2], [4], "auto", sampling_map=True), {**cfg, "sampler": "weighted"})
    mean_u = torch.stack([uni.next_batch()["full"].mean() for _ in range(6)]).mean()
    mean_w = torch.stack([wei.next_batch()["full"].mean() for _ in range(6)]).mean()
    assert mean_w > mean_u


def test_shard_gives_equal_disjoint_parts() -> None:
    items = list(range(7))
    parts = [shard(items, r, 2) for r in range(2)]
    assert parts == [[0, 2, 4], [1, 3, 5]]
    with pytest.raises(RecipeError, match="cannot be shared by 8 processes"):
        shard(items, 0, 8)


def test_robust_scale_is_the_body_mean_when_a_hot_organ_sets_the_top_quantile() -> None:
    """Whole-body scans: a bladder of 0.2 % of the voxels at 40x the body made the 99.9th percentile the
    bladder, so '5 % of it' left only hot organs (the phantom's body means ranged over SUV 1.1-6.0)."""
    from lowdose_toolkit.data.normalize import LEGACY_QUANTILE

    volume = torch.zeros(40, 40, 40)
    volume[5:35, 5:35, 5:35] = 1.0  # the body, 42 % of the voxels
    volume[18:23, 18:23, 18:23] = 40.0  # a bladder (0.2 % of the voxels)
    volume[10:13, 10:13, 10:30] = 3.0  # liver-like warm organ
    body = volume[volume > 0].mean()
    norm = fit_normalization(volume)
    assert norm.scale == pytest.approx(float(body), rel=0.01) and norm.quantile == 0.99
    legacy = fit_normalization(volume, quantile=LEGACY_QUANTILE)
    assert legacy.scale > 2 * norm.scale  # the old threshold missed the body
