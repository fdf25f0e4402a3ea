"""The nifti source: its three layouts, naming patterns, and one-line validation errors."""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import snapshot

from ldt_plugins.sources import nifti as nifti_plugin
from ldt_plugins.sources.nifti import NiftiSource, read_manifest
from lowdose_toolkit.data import io
from lowdose_toolkit.errors import DataError, RecipeError
from lowdose_toolkit.records import SubjectRecord, write_manifest

AFFINE = np.array([[-2.0, 0, 0, 90.5], [0, 2.0, 0, -120.25], [0, 0, 3.0, -600.0], [0, 0, 0, 1]])
SHAPE = (6, 5, 4)


def put(path: Path, seed: int = 0, shape: tuple[int, ...] = SHAPE, affine: np.ndarray = AFFINE, **edit: float) -> Path:
    data = (np.random.default_rng(seed).random(shape) * 100 + 1).astype(np.float32)
    for key, value in edit.items():
        data.flat[int(key[1:])] = value  # edit={"v3": nan} sets voxel 3
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def folder_layout(root: Path, subjects: tuple[str, ...] = ("s01", "s02"), drfs=(4, 10, 100)) -> Path:
    for i, s in enumerate(subjects):
        put(root / s / "full.nii.gz", seed=i)
        for d in drfs:
            put(root / s / f"drf_{d:03d}.nii.gz", seed=100 * i + d)
    return root


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(io, "_CHECKED", {})


def test_folder_layout(tmp_path: Path) -> None:
    root = folder_layout(tmp_path / "data")
    before = snapshot(root)
    src = NiftiSource(str(root), drfs=[10, 4])
    recs = src.records()
    assert [r.subject for r in recs] == ["s01", "s02"]
    assert recs[0].full == root / "s01" / "full.nii.gz"
    assert recs[0].low == {4: root / "s01/drf_004.nii.gz", 10: root / "s01/drf_010.nii.gz"}  # only the asked DRFs
    assert src.layout == "patterns" and "s01" in repr(src.records())
    assert [sorted(r.low) for r in NiftiSource(str(root)).records()] == [[4, 10, 100]] * 2  # drfs=None: all
    assert snapshot(root) == before  # nothing written into the source folder


def test_manifest_is_preferred_and_parsed(tmp_path: Path) -> None:
    root = folder_layout(tmp_path / "data", ("a", "b", "c"))
    recs = [
        SubjectRecord("b", root / "b/full.nii.gz", {4: root / "b/drf_004.nii.gz"}, 0.00025),
        SubjectRecord("a", root / "a/full.nii.gz", {4: root / "a/drf_004.nii.gz", 10: root / "a/drf_010.nii.gz"}),
    ]
    write_manifest(recs, root / "manifest.csv")
    src = NiftiSource(str(root), drfs=[4])
    got = src.records()
    assert src.layout == "manifest"
    assert [(r.subject, r.suv_factor, sorted(r.low)) for r in got] == [("a", None, [4]), ("b", 0.00025, [4])]
    assert got[1].full == (root / "b/full.nii.gz").absolute()
    # The CSV itself may be the root; a manifest may also be named explicitly.
    assert [r.subject for r in NiftiSource(str(root / "manifest.csv")).records()] == ["a", "b"]
    (root / "other.csv").write_text("subject,drf,path\nc,full,c/full.nii.gz\nc,100,c/drf_100.nii.gz\n")
    assert [r.subject for r in NiftiSource(str(root), manifest="other.csv").records()] == ["c"]


def test_manifest_errors(tmp_path: Path) -> None:
    folder_layout(tmp_path, ("a",), (4,))
    m = tmp_path / "m.csv"
    head = "subject,drf,path\n"
    full, four = "a,full,a/full.nii.gz\n", "a,4,a/drf_004.nii.gz\n"
    cases = {
        "subject,path\n": r"m\.csv: manifest lacks column\(s\) \['drf'\]",
        head + "a,four,x.nii\n": r"m\.csv line 2: drf 'four' is neither a positive integer nor 'full'",
        head + full + full: r"m\.csv line 3: second row for subject 'a' drf full",
        "subject,drf,path,suv_factor\n" + full[:-1] + ",x\n": r"m\.csv line 2: suv_factor 'x' is not a plausible",
        head: r"m\.csv: lists no subjects",
        head + four: r"m\.csv: subject 'a' has no full-dose row",
        head + full + four: r"m\.csv: subject 'a' has no DRF 10 row \(has DRFs \[4\]\)",
        head + full + "a,10,a/drf_010.nii.gz\n": r"drf_010\.nii\.gz: file not found \(.*m\.csv line 3",
    }
    for text, message in cases.items():
        m.write_text(text)
        with pytest.raises(DataError, match=message):
            read_manifest(m, drfs=[10])


def test_flat_challenge_naming(tmp_path: Path) -> None:
    put(tmp_path / "pat1_NORMAL.nii.gz", 1)
    put(tmp_path / "pat2_full.nii", 2)  # case-insensitive, .nii as good as .nii.gz
    for s in ("pat1", "pat2"):
        for d in (4, 100):
            put(tmp_path / f"{s}_DRF-{d}.nii.gz", d)
    put(tmp_path / "pat2_DRF_10.nii.gz", 10)
    recs = NiftiSource(str(tmp_path), drfs=[4, 100]).records()
    assert [(r.subject, r.full.name, sorted(r.low)) for r in recs] == [
        ("pat1", "pat1_NORMAL.nii.gz", [4, 100]),
        ("pat2", "pat2_full.nii", [4, 100]),
    ]
    assert recs[0].low[100].name == "pat1_DRF-100.nii.gz"
    with pytest.raises(DataError, match=r"pat1_DRF-10\.nii\.gz: missing: subject 'pat1' has no DRF 10 image"):
        NiftiSource(str(tmp_path), drfs=[10]).records()


def test_custom_patterns(tmp_path: Path) -> None:
    put(tmp_path / "train" / "x7" / "PET_SD.nii.gz", 1)
    put(tmp_path / "train" / "x7" / "PET_LD_drf20.nii.gz", 2)
    src = NiftiSource(
        str(tmp_path), full_pattern="*/{subject}/pet_sd.nii.gz", low_pattern=["*/{subject}/PET_LD_drf{drf}.nii.gz"]
    )
    [rec] = src.records()
    assert rec.subject == "x7" and list(rec.low) == [20]
    with pytest.raises(DataError, match=r"low_pattern '\{subject\}\.nii': a pattern relative to root needs"):
        NiftiSource(str(tmp_path), low_pattern="{subject}.nii")


def test_empty_and_unmatched_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"holds no \.nii/\.nii\.gz files; expected .*/<subject>/full\.nii\.gz"):
        NiftiSource(str(tmp_path)).records()
    put(tmp_path / "scan.nii.gz")
    with pytest.raises(DataError, match=r"none of its 1 NIfTI files \(e\.g\. 'scan\.nii\.gz'\) matches"):
        NiftiSource(str(tmp_path)).records()
    with pytest.raises(DataError, match=r"nowhere: data folder not found"):
        NiftiSource(str(tmp_path / "nowhere"))


def test_missing_full_dose(tmp_path: Path) -> None:
    folder_layout(tmp_path, ("a",))
    put(tmp_path / "b" / "drf_004.nii.gz")
    with pytest.raises(DataError, match=r"subject 'b' has no full-dose image \(looked for .*b/full\.nii\.gz"):
        NiftiSource(str(tmp_path), drfs=[4]).records()


@pytest.mark.parametrize(
    ("make_bad", "message"),
    [
        (
            lambda f: put(f, shape=(6, 5, 3)),
            r"b/drf_010\.nii\.gz and .*b/full\.nii\.gz differ in shape: \(6, 5, 3\) vs",
        ),
        (
            lambda f: put(f, affine=AFFINE @ np.diag([1, 1, 1.2, 1])),
            r"b/drf_010\.nii\.gz and .*b/full\.nii\.gz differ in voxel spacing: \(2, 2, 3\.6\) vs \(2, 2, 3\) mm",
        ),
        (
            lambda f: put(f, affine=AFFINE + np.array([[0, 0, 0, 4.0], [0] * 4, [0] * 4, [0] * 4])),
            r"b/drf_010\.nii\.gz and .*b/full\.nii\.gz differ in affine \(max difference 4 > 0\.001\)",
        ),
        (lambda f: put(f, v3=np.nan, v7=np.inf), r"b/drf_010\.nii\.gz: 1 NaN and 1 Inf voxels \(of 120\)"),
        (lambda f: f.write_bytes(put(f, shape=(30, 30, 30)).read_bytes()[:3000]), r"b/drf_010\.nii\.gz: unreadable"),
        (lambda f: f.unlink(), r"b/drf_010\.nii\.gz: missing: subject 'b' has no DRF 10 image \(has DRFs \[4, 100\]\)"),
    ],
    ids=["shape", "spacing", "affine", "nan", "truncated", "missing"],
)
def test_bad_subject_errors_and_skip(tmp_path: Path, make_bad, message: str) -> None:
    root = folder_layout(tmp_path / "data", ("a", "b", "c"))
    make_bad(root / "b" / "drf_010.nii.gz")
    before = snapshot(root)
    with pytest.raises(DataError, match=message) as info:
        NiftiSource(str(root), drfs=[4, 10]).records()
    assert "\n" not in str(info.value)
    with pytest.warns(UserWarning, match=r"nifti: skipping subject 'b': .*" + message.split(r"\.nii\.gz")[-1][:20]):
        recs = NiftiSource(str(root), drfs=[4, 10], skip_bad=True).records()
    assert [r.subject for r in recs] == ["a", "c"]
    assert snapshot(root) == before


def test_all_bad_subjects_is_an_error(tmp_path: Path) -> None:
    put(tmp_path / "a" / "full.nii.gz")
    put(tmp_path / "a" / "drf_004.nii.gz", v0=np.nan)
    put(tmp_path / "b" / "full.nii.gz", shape=(2, 2, 2))
    put(tmp_path / "b" / "drf_004.nii.gz")
    with pytest.raises(DataError, match=r"a/drf_004\.nii\.gz: 1 NaN .*; 1 more subject with problems \(skip_bad: true"):
        NiftiSource(str(tmp_path)).records()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DataError, match=r"nifti: no usable subject left: all 2 were skipped"):
            NiftiSource(str(tmp_path), skip_bad=True).records()
    assert len(caught) == 2 and all("\n" not in str(w.message) for w in caught)


def test_validate_false_only_checks_existence(tmp_path: Path) -> None:
    root = folder_layout(tmp_path, ("a",), (4,))
    put(root / "a" / "drf_004.nii.gz", v0=np.nan)
    assert [r.subject for r in NiftiSource(str(root), validate=False).records()] == ["a"]


def test_registered_and_built_through_the_registry(tmp_path: Path) -> None:
    from lowdose_toolkit.core.plugin_manager import get_registry

    got = []
    nifti_plugin.ldt_register_sources(lambda name, factory: got.append((name, factory)))
    assert got == [("nifti", NiftiSource)]
    root = folder_layout(tmp_path, ("a",), (4, 10))
    registry = get_registry()
    spec = {"name": "nifti", "root": str(root), "low_pattern": ["{subject}/drf_{drf:03d}.nii.gz"]}
    source = registry.build("source", spec, "data.source", context={"drfs": [10]})
    assert [sorted(r.low) for r in source.records()] == [[10]]
    with pytest.raises(RecipeError, match=r"data\.source\.skip_bad: expected bool"):
        registry.build("source", {**spec, "skip_bad": "yes"}, "data.source", context={"drfs": [10]})


def test_phantom_counts_model_selects_the_noise_regime_and_its_own_cache() -> None:
    from ldt_plugins.sources.phantom import PhantomSource

    nested = PhantomSource(subjects=2, drfs=[4, 100])
    independent = PhantomSource(subjects=2, drfs=[4, 100], counts_model="independent")
    assert nested.config.counts_model == "listmode" and independent.config.counts_model == "independent"
    assert nested.key != independent.key
    assert PhantomSource(subjects=2, drfs=[4, 100], counts_model="listmode").key == nested.key
    assert "counts_model=independent" in repr(independent)
