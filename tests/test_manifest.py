"""One home per file format: NIfTI naming and the manifest reader (lenient and strict)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write

from lowdose_toolkit.cli.infer import expand_inputs, plan_jobs
from lowdose_toolkit.data.manifest import manifest_records, read_manifest, write_manifest
from lowdose_toolkit.data.naming import dose_filename, is_nifti, nifti_stem, nifti_suffix, strip_nifti_suffix
from lowdose_toolkit.errors import DataError
from lowdose_toolkit.records import FULL, SubjectRecord

# ------------------------------------------------------------------------------------------------ naming


@pytest.mark.parametrize(
    ("name", "nifti", "stem"),
    [("scan.nii.gz", True, "scan"), ("scan.NII.GZ", True, "scan"), ("a.b.Nii", True, "a.b"),
     ("scan.gz", False, "scan.gz"), ("notes.txt", False, "notes.txt"), ("scan.nii.gz.bak", False, "scan.nii.gz.bak")],
)  # fmt: skip
def test_nifti_naming_is_case_insensitive(name: str, nifti: bool, stem: str) -> None:
    assert is_nifti(name) is nifti and is_nifti(Path("d") / name) is nifti
    assert nifti_stem(Path("folder") / name) == stem
    assert nifti_suffix(name) == (name[len(stem):] if nifti else "")
    assert strip_nifti_suffix(f"sub/{name}") == f"sub/{stem}"
    assert (dose_filename(FULL), dose_filename(4), dose_filename("100")) == ("full.nii.gz", "drf_004.nii.gz",
                                                                             "drf_100.nii.gz")


def test_infer_accepts_upper_case_nifti_suffix(tmp_path: Path) -> None:
    """`ldt infer scan.NII.GZ` (which `ldt evaluate` always accepted) is an input, written as scan.nii.gz."""
    scan = write(tmp_path / "in" / "scan.NII.GZ", "")
    write(tmp_path / "in" / "notes.txt", "")
    for given in (scan, tmp_path / "in"):
        assert expand_inputs([str(given)]) == [scan.resolve()]
    [job] = plan_jobs([scan.resolve()], tmp_path / "out", overwrite=False)
    assert job.output == (tmp_path / "out" / "scan.nii.gz").resolve()


# ------------------------------------------------------------------------------------------------ manifest


@pytest.fixture
def data(tmp_path: Path) -> Path:
    for name in ("a/full.nii.gz", "a/drf_004.nii.gz", "b/full.nii.gz", "b/drf_004.nii.gz"):
        write(tmp_path / name, "")
    return tmp_path


def test_write_then_read_round_trip(data: Path) -> None:
    recs = [SubjectRecord("b", data / "b/full.nii.gz", {4: data / "b/drf_004.nii.gz"}, 0.00025),
            SubjectRecord("a", data / "a/full.nii.gz", {4: data / "a/drf_004.nii.gz"})]
    write_manifest(recs, data / "manifest.csv")
    assert (data / "manifest.csv").read_text().splitlines()[:2] == ["subject,drf,path,suv_factor",
                                                                   "b,full,b/full.nii.gz,0.00025"]
    rows = read_manifest(data / "manifest.csv", strict=True)
    assert [(r.line, r.subject, r.drf, r.full) for r in rows][:2] == [(2, "b", FULL, True), (3, "b", 4, False)]
    back, problems = manifest_records(data / "manifest.csv", strict=True)
    assert problems == {} and [(r.subject, r.suv_factor, r.low) for r in back] == [
        ("a", None, {4: (data / "a/drf_004.nii.gz").absolute()}),
        ("b", 0.00025, {4: (data / "b/drf_004.nii.gz").absolute()}),
    ]


STRICT_ONLY = {  # lenient reading accepts these; strict reading names the file, line, column and fix
    "subject,drf,path,scanner\na,full,a/full.nii.gz,x\n": r"m\.csv line 1: unknown column 'scanner'; the columns "
                                                           r"are subject,drf,path\[,suv_factor\]: rename or remove",
    "subject,drf,path\na,full,a/full.nii.gz\na,4,a/drf_004.nii.gz\nA,4,a/drf_004.nii.gz\na,4,a/drf_004.nii.gz\n":
        r"m\.csv line 5: second row for subject 'a' drf 4 \(first at line 3\); keep one",
    "subject,drf,path\na,full,a/full.nii.gz\na,10,a/drf_010.nii.gz\n":
        r"a/drf_010\.nii\.gz: file not found \(.*m\.csv line 3, column path, subject 'a', DRF 10\); fix the path",
    "subject,drf,path\na,full,a/full.nii.gz,extra\n": r"m\.csv line 2: more cells than the header's 3 columns",
}
ALWAYS = {
    "subject,path\n": r"m\.csv: manifest lacks column\(s\) \['drf'\] \(header line 1 is \['subject', 'path'\]\); "
                      r"the header must be subject,drf,path",
    "subject,drf,path\na,,a/full.nii.gz\n": r"m\.csv line 2: empty drf; fill in the row's subject/drf/path",
    "subject,drf,path\na,0,a/full.nii.gz\n": r"m\.csv line 2: drf '0' is neither a positive integer nor 'full'; "
                                              "write the dose reduction factor",
    "subject,drf,path,suv_factor\na,full,a/full.nii.gz,-1\n": r"m\.csv line 2: suv_factor '-1' is not a plausible",
    # g/Bq swapped for Bq/g (or kg/MBq): the range ldt infer applies to every factor
    "subject,drf,path,suv_factor\na,full,a/full.nii.gz,4000\n": (
        r"m\.csv line 2: suv_factor '4000' is not a plausible body weight \(g\) / injected activity \(Bq\) "
        r"\(about 2e-4"),
}


@pytest.mark.parametrize("text", list(STRICT_ONLY))
def test_strict_mode_errors(data: Path, text: str) -> None:
    m = write(data / "m.csv", text)
    assert read_manifest(m)  # lenient: left to the caller
    with pytest.raises(DataError, match=STRICT_ONLY[text]):
        read_manifest(m, strict=True)


@pytest.mark.parametrize("text", list(ALWAYS))
def test_errors_in_both_modes(data: Path, text: str) -> None:
    m = write(data / "m.csv", text)
    for strict in (False, True):
        with pytest.raises(DataError, match=ALWAYS[text]):
            read_manifest(m, strict=strict)


def test_lenient_callers_keep_their_leniency(data: Path) -> None:
    # `ldt infer` needs only a path column; blank lines and stray spaces are skipped everywhere.
    m = write(data / "list.csv", "path,note\n a/drf_004.nii.gz , x\n\n,\nb/drf_004.nii.gz,\n")
    rows = read_manifest(m, require=("path",))
    assert [(r.path, r.drf, r.full) for r in rows] == [(data / "a/drf_004.nii.gz", None, False),
                                                       (data / "b/drf_004.nii.gz", None, False)]
    # A subject's missing file is a problem of that subject (a source may skip it), unless strict.
    m = write(data / "m.csv", "subject,drf,path\na,full,a/full.nii.gz\na,4,a/drf_004.nii.gz\n"
                              "c,full,c/full.nii.gz\nc,4,c/drf_004.nii.gz\n")
    records, problems = manifest_records(m)
    assert [r.subject for r in records] == ["a"] and "c/full.nii.gz: file not found" in problems["c"]
    with pytest.raises(DataError, match=r"c/full\.nii\.gz: file not found \(.*m\.csv line 4"):
        manifest_records(m, strict=True)
