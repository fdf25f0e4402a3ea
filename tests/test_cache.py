"""The cached layout (ldt cache): round trip, stored normalisation, patches from memory maps, errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import make_tiny_dataset, tiny_recipe, write

from lowdose_toolkit.cli.app import main
from lowdose_toolkit.core.plugin_manager import get_registry
from lowdose_toolkit.core.recipe import load_recipe, resolve_recipe
from lowdose_toolkit.data.cache import DEFAULT_DIR, INDEX, block_weights, find_cache, resolve_layout, write_cache
from lowdose_toolkit.data.cached_patches import CachedPatches, CachedPatchStream, cached_pairs
from lowdose_toolkit.data.datasets import pairs_dataset
from lowdose_toolkit.data.io import read_nifti
from lowdose_toolkit.errors import DataError
from lowdose_toolkit.records import SubjectRecord

DRFS = [4, 100]


def nifti_records(root: Path, drfs: list[int] | None = DRFS) -> list[SubjectRecord]:
    return get_registry().build("source", {"name": "nifti", "root": str(root)}, "data.source",
                                context={"drfs": drfs}).records()


@pytest.fixture(scope="module")
def cached_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny data set (24^3, .nii.gz) with its default cache, written by the command."""
    root = make_tiny_dataset(tmp_path_factory.mktemp("cached") / "data", subjects=4)
    assert main(["cache", str(root)]) == 0
    return root


def test_cache_round_trip_keeps_values_affine_and_normalisation(cached_root: Path) -> None:
    records = nifti_records(cached_root)
    cached = resolve_layout("auto", records)
    assert cached is not None and set(cached) == {r.subject for r in records}
    for record in records:
        subject = cached[record.subject]
        for source, volume in [(record.full, subject.full), *((record.low[d], subject.low[d]) for d in DRFS)]:
            assert volume.path.parent.parent == cached_root / DEFAULT_DIR and volume.path.suffix == ".nii"
            a, affine_a = read_nifti(source)
            b, affine_b = read_nifti(volume.path)
            assert torch.equal(a, b) and np.array_equal(affine_a, affine_b)
            assert np.array_equal(np.asarray(volume.memmap()), a[0].numpy())
            src_header, header = nib.load(source).header, nib.load(volume.path).header
            assert (header["sform_code"], header["qform_code"]) == (src_header["sform_code"], src_header["qform_code"])
    # The stored scales are the volume path's, computed the same way from the same voxels.
    volumes = pairs_dataset(records, DRFS, "auto")
    pairs = cached_pairs([cached[r.subject] for r in records], DRFS, "auto")
    assert len(pairs) == len(volumes)
    for i, pair in enumerate(pairs):
        item = volumes[i]
        assert (pair.subject, pair.drf, pair.drf_class) == (item["subject_id"], item["drf"], item["drf_class"])
        assert pair.norm.scale == item["scale"] and pair.norm.method == item["norm_method"]


def test_cache_again_keeps_unchanged_files_and_refreshes_changed_ones(tmp_path: Path) -> None:
    root = make_tiny_dataset(tmp_path / "data", subjects=2)
    assert main(["cache", str(root)]) == 0
    cache = root / DEFAULT_DIR
    stamps = {p: p.stat().st_mtime_ns for p in cache.rglob("*.nii")}
    before = resolve_layout("auto", nifti_records(root))["sub01"].low[4].scale
    assert main(["cache", str(root)]) == 0
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.nii")} == stamps
    # A source rewritten after caching: training refuses the stale cache, naming the file and the fix.
    source = root / "sub01" / "drf_004.nii.gz"
    data = nib.load(source).get_fdata(dtype=np.float32) * 2
    nib.save(nib.Nifti1Image(data, nib.load(source).affine), source)
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    with pytest.raises(DataError) as err:
        resolve_layout("auto", nifti_records(root))
    message = str(err.value)
    assert "\n" not in message and str(source) in message and "changed after it was cached" in message
    assert f"ldt cache {root}" in message and "data.layout: volumes" in message
    assert resolve_layout("volumes", nifti_records(root)) is None
    assert main(["cache", str(root)]) == 0  # the fix
    cached = resolve_layout("auto", nifti_records(root))
    assert cached is not None
    assert np.array_equal(np.asarray(cached["sub01"].low[4].memmap()), data)
    assert cached["sub01"].low[4].scale == pytest.approx(2 * before, rel=1e-6)


def test_cache_errors_name_the_file_and_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_tiny_dataset(tmp_path / "data", subjects=2)
    records = nifti_records(root)
    with pytest.raises(DataError, match=rf"no cache found for the data in {root}.*run `ldt cache {root}` once"):
        resolve_layout("mmap", records)
    assert resolve_layout("auto", records) is None  # no cache: the volume path
    assert main(["cache", str(root), "--drfs", "4"]) == 0
    with pytest.raises(DataError, match=r"drf_100.nii.gz: not in the cache .*DRF 100\); run `ldt cache"):
        resolve_layout("auto", records)
    assert main(["cache", str(root)]) == 0
    cached_file = root / DEFAULT_DIR / "sub00" / "full.nii"
    cached_file.unlink()
    with pytest.raises(DataError, match=rf"{cached_file}: missing from the cache .*full dose\); run `ldt cache"):
        resolve_layout("auto", records)
    assert main(["cache", str(root)]) == 0
    with cached_file.open("r+b") as fh:
        fh.truncate(1000)
    with pytest.raises(DataError, match=r"full.nii: 1000 bytes where the cache recorded \d+ \(truncated"):
        resolve_layout("auto", records)
    # The command: one line, exit 2.
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["cache", str(root), str(tmp_path / "busy")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "busy: not empty and not an ldt cache" in err and "empty or new folder" in err
    (tmp_path / "dicom").mkdir()
    dicom = SubjectRecord("s", tmp_path / "dicom", {4: tmp_path / "dicom"})
    with pytest.raises(DataError, match="dicom: not a NIfTI file .*ldt prepare uldp SRC OUT --cache"):
        write_cache([dicom], tmp_path / "out", command="ldt cache x")


def test_standalone_cache_is_a_nifti_data_set_and_in_place_files_are_checked(cached_root: Path,
                                                                              tmp_path: Path) -> None:
    out = tmp_path / "cache"
    assert main(["cache", str(cached_root / "manifest.csv"), str(out)]) == 0
    assert (out / INDEX).is_file() and (out / "manifest.csv").is_file()
    records = nifti_records(out)  # source: nifti, root: OUT
    assert records[0].full == out / "sub00" / "full.nii"
    cached = resolve_layout("mmap", records)
    assert cached is not None and cached["sub00"].low[4].path == out / "sub00" / "drf_004.nii"
    # Its uncompressed float32 files are indexed where they are, not copied again.
    again = tmp_path / "again"
    assert main(["cache", str(out / "manifest.csv"), str(again)]) == 0
    assert not list(again.rglob("*.nii"))
    index = json.loads((again / INDEX).read_text())
    assert str(out / "sub00" / "full.nii") in index["files"]
    moved = shutil.copytree(out, tmp_path / "moved")  # a copied cache works where it lands
    assert resolve_layout("mmap", nifti_records(moved))["sub01"].full.path == moved / "sub01" / "full.nii"


def cfg(**kw: object) -> dict:
    base = {"patch_size": 8, "batch_size": 3, "samples_per_volume": 2, "num_workers": 0, "sampler": "uniform"}
    return {**base, **kw}


@pytest.mark.parametrize("normalization", ["auto", "suv", "none"])
@pytest.mark.parametrize("sampler", ["uniform", "weighted"])
def test_mmap_patches_equal_slices_of_the_normalised_volume(cached_root: Path, tmp_path: Path, sampler: str,
                                                            normalization: str) -> None:
    records = nifti_records(cached_root)
    if normalization == "suv":  # a manifest with SUV factors, cached again
        records = [SubjectRecord(r.subject, r.full, r.low, 1e-3 * (i + 1), r.meta) for i, r in enumerate(records)]
    cached = resolve_layout("auto", records, normalization=normalization)
    pairs = cached_pairs([cached[r.subject] for r in records], DRFS, normalization)
    volumes = pairs_dataset(records, DRFS, normalization)
    patches = CachedPatches(pairs, [8, 6, 10], weighted=sampler == "weighted")
    for i in range(len(pairs)):
        item = volumes[i]
        for seed in (1, 2, 3):
            patch = patches[(i, seed)]
            x, y, z = patch["location"].tolist()
            window = (0, slice(x, x + 8), slice(y, y + 6), slice(z, z + 10))
            assert torch.equal(patch["low"], item["low"].data[window][None])
            assert torch.equal(patch["full"], item["full"].data[window][None])
            assert patch["drf"] == item["drf"] and patch["drf_class"] == item["drf_class"]
            assert patches[(i, seed)]["location"].tolist() == [x, y, z]  # the seed decides the corner


def test_stream_is_reproducible_and_independent_of_workers(cached_root: Path) -> None:
    records = nifti_records(cached_root)
    cached = resolve_layout("auto", records)
    pairs = cached_pairs([cached[r.subject] for r in records], DRFS, "auto")

    def draw(workers: int, sampler: str) -> list[torch.Tensor]:
        torch.manual_seed(11)
        stream = CachedPatchStream(pairs, cfg(num_workers=workers, sampler=sampler))
        assert stream.default_steps() == len(pairs) * 2 // 3
        return [stream.next_batch()["low"] for _ in range(7)]  # crosses a pass (5 batches)

    for sampler in ("uniform", "weighted"):
        first = draw(0, sampler)
        assert all(torch.equal(a, b) for a, b in zip(first, draw(0, sampler), strict=True))
        assert all(torch.equal(a, b) for a, b in zip(first, draw(2, sampler), strict=True))
        assert first[0].shape == (3, 1, 8, 8, 8)
    # An epoch start mid-pass (reset) starts a fresh pass; persistent workers serve it the same.
    def with_reset(workers: int) -> list[torch.Tensor]:
        torch.manual_seed(5)
        stream = CachedPatchStream(pairs, cfg(num_workers=workers))
        first = [stream.next_batch()["full"] for _ in range(2)]
        stream.reset()
        return first + [stream.next_batch()["full"] for _ in range(6)]

    assert all(torch.equal(a, b) for a, b in zip(with_reset(0), with_reset(2), strict=True))
    torch.manual_seed(12)
    batch = CachedPatchStream(pairs, cfg()).next_batch()
    assert batch["drf_class"].dtype == torch.long and set(batch) == {"low", "full", "drf", "drf_class"}
    assert not torch.equal(batch["low"], draw(0, "uniform")[0])


def test_weighted_sampler_follows_the_block_map(tmp_path: Path) -> None:
    """Activity in one corner: weighted patches centre there (within the patch's valid range), uniform ones don't."""
    volume = np.ones((40, 40, 40), np.float32)
    volume[24:32, 0:8, 16:24] = 1e4  # one block of activity, at the border along y
    affine = np.eye(4)
    (tmp_path / "s").mkdir()
    for name in ("full", "drf_004"):
        nib.save(nib.Nifti1Image(volume + (name == "full"), affine), tmp_path / "s" / f"{name}.nii.gz")
    records = nifti_records(tmp_path, [4])
    write_cache(records, tmp_path / DEFAULT_DIR, command="ldt cache")
    weights = np.load(tmp_path / DEFAULT_DIR / "s" / "drf_004.weights.npy")
    assert weights.shape == (5, 5, 5) and weights.argmax() == np.ravel_multi_index((3, 0, 2), (5, 5, 5))
    np.testing.assert_allclose(weights.sum(), block_weights(torch.from_numpy(volume)).sum())
    np.testing.assert_allclose(weights.sum(), volume.sum() * (1 + 0.05), rtol=1e-6)
    pairs = cached_pairs(list(resolve_layout("mmap", records).values()), [4], "auto")
    weighted, uniform = CachedPatches(pairs, 10, weighted=True), CachedPatches(pairs, 10)
    centres = np.array([weighted.corner(0, s) for s in range(400)]) + 5
    assert centres.min() >= 5 and centres.max() <= 35  # TorchIO's valid centres for a 10^3 patch in 40^3
    hot = ((centres >= [24, 5, 16]) & (centres < [32, 8, 24])).all(axis=1).mean()
    assert hot > 0.85  # 3 of the block's 8 rows along y may centre a patch: 3/8 of its mass vs ~3 % elsewhere
    corners = np.array([uniform.corner(0, s) for s in range(400)])
    assert corners.min() == 0 and corners.max() == 30


def test_training_runs_through_the_cached_layout(cached_root: Path, tmp_path: Path) -> None:
    from lowdose_toolkit.train.engine import Trainer

    path = write(tmp_path / "recipe.yaml", tiny_recipe(cached_root))
    recipe = resolve_recipe(load_recipe(path, ["train.epochs=2", "data.num_workers=2", "data.layout=mmap"]),
                            get_registry(), str(path))
    trainer = Trainer(recipe, tmp_path / "run", get_registry())
    assert isinstance(trainer.stream, CachedPatchStream) and trainer.layout == "mmap"
    assert str(trainer.val_set[0]["low"].path).endswith(".nii")  # validation reads the cached volumes too
    trainer.fit()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2] and np.isfinite(metrics[-1]["losses"]["l1"])
    assert json.loads((tmp_path / "run" / "run.json").read_text())["data_layout"] == "mmap"
    volumes = resolve_recipe(load_recipe(path, ["data.layout=volumes"]), get_registry(), str(path))
    assert Trainer(volumes, tmp_path / "run2", get_registry()).layout == "volumes"


def test_find_cache_ignores_foreign_index_files(tmp_path: Path) -> None:
    root = make_tiny_dataset(tmp_path / "data", subjects=2)
    (root / INDEX).write_text(json.dumps({"format": "something else"}))
    assert find_cache(nifti_records(root)) is None
    (root / DEFAULT_DIR).mkdir()
    (root / DEFAULT_DIR / INDEX).write_text("{not json")
    with pytest.raises(DataError, match=rf"{DEFAULT_DIR}/{INDEX}: unreadable cache index .*run `ldt cache` again"):
        find_cache(nifti_records(root))


def test_prepare_uldp_cache_writes_uncompressed_files_indexed_in_place(tmp_path: Path) -> None:
    from test_uldp import release

    src = release(tmp_path / "release")
    out = tmp_path / "prepared"
    assert main(["prepare", "uldp", str(src), str(out), "--cache"]) == 0
    assert sorted(p.name for p in (out / "Anonymous_01").iterdir()) == [
        "drf_002.nii", "drf_004.nii", "drf_010.nii", "drf_100.nii", "full.nii"]
    records = nifti_records(out, DRFS)
    cached = resolve_layout("mmap", records)
    assert cached["Patient_02"].low[100].path == out / "Patient_02" / "drf_100.nii"
    assert not list((out / DEFAULT_DIR).rglob("*.nii"))  # indexed where prepare wrote them, not copied
    volumes = pairs_dataset(records, DRFS, "auto")
    pairs = cached_pairs([cached[r.subject] for r in records], DRFS, "auto")
    assert [p.norm.scale for p in pairs] == [volumes[i]["scale"] for i in range(len(volumes))]
    assert json.loads((out / "prepare.json").read_text())["cache"] is True
    # Converting again without --cache goes back to .nii.gz and drops the index of the removed files.
    assert main(["prepare", "uldp", str(src), str(out)]) == 0
    assert sorted(p.name for p in (out / "Patient_02").iterdir()) == [
        "drf_004.nii.gz", "drf_010.nii.gz", "drf_100.nii.gz", "full.nii.gz"]
    assert not (out / DEFAULT_DIR).exists() and resolve_layout("auto", nifti_records(out, DRFS)) is None


def test_an_empty_low_dose_image_fails_only_where_its_robust_scale_is_used(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    nib.save(nib.Nifti1Image(np.ones((16, 16, 16), np.float32), np.eye(4)), tmp_path / "s" / "full.nii.gz")
    empty = np.zeros((16, 16, 16), np.float32)
    empty[0, 0, 0] = -1.0  # not all zero (the source's check), but nothing positive to normalise by
    nib.save(nib.Nifti1Image(empty, np.eye(4)), tmp_path / "s" / "drf_004.nii.gz")
    records = [SubjectRecord("s", tmp_path / "s" / "full.nii.gz", {4: tmp_path / "s" / "drf_004.nii.gz"}, 1e-3)]
    write_cache(records, tmp_path / DEFAULT_DIR, command="ldt cache x")
    subjects = list(resolve_layout("mmap", records).values())
    assert cached_pairs(subjects, [4], "suv")[0].norm.scale == pytest.approx(1e3)
    with pytest.raises(DataError, match=r"drf_004.nii.gz: cannot normalise an image whose 99.0% quantile is"):
        cached_pairs(subjects, [4], "auto")


def test_the_source_does_not_read_voxels_that_ldt_cache_checked(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from lowdose_toolkit.data import io

    root = make_tiny_dataset(tmp_path / "data", subjects=3)
    assert main(["cache", str(root)]) == 0
    loaded: list[str] = []
    real = io.load_array
    monkeypatch.setattr(io, "load_array", lambda path, **kw: (loaded.append(Path(path).name), real(path, **kw))[1])
    source = root / "sub02" / "full.nii.gz"
    data = nib.load(source)
    nib.save(nib.Nifti1Image(data.get_fdata(dtype=np.float32) + 1, data.affine), source)  # changed since
    io._CHECKED.clear()
    assert len(nifti_records(root)) == 3
    # Only the changed subject's files were read; the others' only by their headers.
    assert sorted(loaded) == ["drf_004.nii.gz", "drf_100.nii.gz", "full.nii.gz"]
