"""Bad DICOM inputs (tests/badinputs.py): one line naming the series, its value and the fix; --skip-bad skips them.

Every case ran through today's reader or SUV code before these checks: series with missing, duplicate
or misplaced slices and CT series were read as if whole; zero dates raised ValueError, an injection
90 days before the scan ZeroDivisionError, and 30 days gave an SUV factor of 6e114.
"""

from __future__ import annotations

import csv
import json
import re
import warnings
from pathlib import Path

import pytest

pytest.importorskip("pydicom")
from badinputs import BAD_DICOM_SERIES, BAD_SUV_HEADERS, BadInput, good_series  # noqa: E402

from ldt_plugins.sources.uldp import UldpSource  # noqa: E402
from lowdose_toolkit.cli.app import main  # noqa: E402
from lowdose_toolkit.data import io  # noqa: E402
from lowdose_toolkit.data.prepare import prepare_uldp, suv_from_dicom  # noqa: E402
from lowdose_toolkit.errors import DataError  # noqa: E402


def one_line(exc: pytest.ExceptionInfo[DataError]) -> str:
    text = str(exc.value)
    assert "\n" not in text and len(text) < 600, text
    return text


@pytest.mark.parametrize("case", BAD_DICOM_SERIES, ids=repr)
def test_reader_refuses_bad_series(case: BadInput, tmp_path: Path) -> None:
    folder = case.make(tmp_path / "PET")
    with pytest.raises(DataError) as exc:
        io.load_array(folder)
    text = one_line(exc)
    assert re.search(case.error, text), text
    assert text.startswith(str(folder)), text  # the folder, or a file in it, comes first


@pytest.mark.parametrize("case", BAD_SUV_HEADERS, ids=repr)
def test_suv_refuses_implausible_header(case: BadInput, tmp_path: Path) -> None:
    folder = case.make(tmp_path / "Full_dose")
    assert io.load_array(folder)[0].shape == (1, 6, 5, 4)  # the series itself is sound
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pydicom's own warnings about the bad value stay quiet
        with pytest.raises(DataError) as exc:
            suv_from_dicom(folder)
    text = one_line(exc)
    assert re.search(case.error, text), text
    assert re.match(rf"{re.escape(str(folder))}/IM\d+\.dcm: ", text), text
    assert text.endswith("correct the DICOM header, or convert without SUV factors "
                         "(`ldt prepare uldp --no-suv`; `suv: false` for the uldp source)")


def bad_release(root: Path) -> dict[str, BadInput]:
    """Subject ``good`` and one subject per bad case: bad series as the low dose, bad SUV headers as the full dose."""
    good_series(root / "good" / "Full_dose", seed=1)
    good_series(root / "good" / "1-4 dose", seed=2)
    cases = {}
    for case in BAD_DICOM_SERIES:
        good_series(root / case.name / "Full_dose", seed=3)
        case.make(root / case.name / "1-4 dose")
        cases[case.name] = case
    for case in BAD_SUV_HEADERS:
        case.make(root / case.name / "Full_dose")
        good_series(root / case.name / "1-4 dose", seed=4)
        cases[case.name] = case
    return cases


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, BadInput]]:
    root = tmp_path_factory.mktemp("bad") / "release"
    return root, bad_release(root)


def test_prepare_skip_bad_converts_the_rest(release: tuple[Path, dict[str, BadInput]], tmp_path: Path) -> None:
    src, cases = release
    with pytest.raises(DataError) as exc:  # strict: the first bad subject (by name) stops it, in one line
        prepare_uldp(src, tmp_path / "strict", drfs=[4])
    first = sorted(cases)[0]
    assert re.search(cases[first].error, one_line(exc))

    out = tmp_path / "out"
    with pytest.warns(UserWarning) as record:
        manifest = prepare_uldp(src, out, drfs=[4], skip_bad=True)
    with manifest.open() as fh:
        assert [(r["subject"], r["drf"]) for r in csv.DictReader(fh)] == [("good", "full"), ("good", "4")]
    skipped = json.loads((out / "prepare.json").read_text())["skipped"]
    assert sorted(skipped) == sorted(cases)
    for name, case in cases.items():
        assert re.search(case.error, skipped[name]), (name, skipped[name])
        assert not (out / name).exists() or not any((out / name).iterdir()), name  # nothing half-written
    lines = [str(w.message) for w in record if "skipping subject" in str(w.message)]
    assert len(lines) == len(cases) and all("\n" not in line for line in lines)


def test_prepare_no_suv_converts_bad_headers(release: tuple[Path, dict[str, BadInput]], tmp_path: Path) -> None:
    src, cases = release
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="skipping subject"):
        manifest = prepare_uldp(src, out, drfs=[4], skip_bad=True, suv=False)
    with manifest.open() as fh:
        rows = list(csv.DictReader(fh))
    converted = sorted({r["subject"] for r in rows})
    assert converted == sorted(["good", *(c.name for c in BAD_SUV_HEADERS)])
    assert all(r["suv_factor"] == "" for r in rows)
    assert sorted(json.loads((out / "prepare.json").read_text())["skipped"]) == sorted(c.name for c in BAD_DICOM_SERIES)


def test_uldp_source_skips_bad_series_and_headers(release: tuple[Path, dict[str, BadInput]]) -> None:
    src, cases = release
    with pytest.warns(UserWarning) as record:
        records = UldpSource(str(src), drfs=[4], skip_bad=True).records()
    assert [r.subject for r in records] == ["good"] and records[0].suv_factor > 0
    text = "\n".join(str(w.message) for w in record)
    for name, case in cases.items():
        assert re.search(rf"uldp: skipping subject '{name}': .*{case.error}", text), name
    with pytest.raises(DataError) as exc:
        UldpSource(str(src), drfs=[4]).records()
    assert "more subjects with problems (skip_bad: true leaves them out)" in one_line(exc)


def test_prepare_command_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    good_series(src / "good" / "Full_dose", seed=1)
    good_series(src / "good" / "1-4 dose", seed=2)
    BAD_SUV_HEADERS[0].make(src / "zero" / "Full_dose")  # SeriesDate 00000000
    good_series(src / "zero" / "1-4 dose", seed=5)
    assert main(["prepare", "uldp", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()  # (the progress bar leaves an empty line)
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert f"{src / 'zero' / 'Full_dose'}/IM" in err and "SeriesDate is '00000000'" in err
    assert main(["prepare", "uldp", str(src), str(tmp_path / "out"), "--skip-bad"]) == 0
    assert "(1 subject, 1 skipped)" in " ".join(capsys.readouterr().err.split())
    assert main(["prepare", "uldp", str(src), str(tmp_path / "all"), "--no-suv"]) == 0
    with (tmp_path / "all" / "manifest.csv").open() as fh:
        assert sorted({r["subject"] for r in csv.DictReader(fh)}) == ["good", "zero"]
