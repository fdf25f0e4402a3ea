"""Atomic writes: modes per umask, fsync of file and folder, no temporary file left on any failure."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from lowdose_toolkit.core.atomic import atomic_dir, atomic_path
from lowdose_toolkit.records import SubjectRecord, write_manifest


@pytest.fixture
def umask() -> Iterator[None]:
    """Restore the process umask after a test that changes it."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)],
                         ids=["umask022", "umask002", "umask077"])
def test_mode_follows_umask(tmp_path: Path, umask: None, mask: int, expected: int) -> None:
    os.umask(mask)
    target = tmp_path / "out" / "pred.nii.gz"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".pred.nii.gz.") and tmp.name.endswith(".nii.gz")
        tmp.write_bytes(b"new")
    assert mode(target) == expected
    assert list((tmp_path / "out").iterdir()) == [target]  # no temporary left


def test_overwrite_takes_the_umask_mode(tmp_path: Path, umask: None) -> None:
    """A file left 0600 by an earlier version becomes readable by the group like any new output."""
    target = tmp_path / "last.pt"
    target.write_bytes(b"old")
    target.chmod(0o600)
    os.umask(0o022)
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and mode(target) == 0o644


@pytest.mark.parametrize("error", [RuntimeError("writer failed"), KeyboardInterrupt()])
def test_failure_removes_the_temporary_file(tmp_path: Path, error: BaseException) -> None:
    target = tmp_path / "results.json"
    target.write_text("old content")
    seen: list[Path] = []
    with pytest.raises(type(error)):
        with atomic_path(target) as tmp:
            seen.append(tmp)
            tmp.write_text("half of the new")
            raise error
    assert not seen[0].exists()
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
    assert target.read_text() == "old content"


def test_failed_fsync_leaves_the_target_and_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "metrics.json"
    target.write_text("old")

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        with atomic_path(target) as tmp:
            tmp.write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"] and target.read_text() == "old"


def test_file_then_folder_are_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The data reaches the disk before the rename, and the rename itself after it."""
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "best.pt"
    payload = os.urandom(1 << 16)
    with atomic_path(target) as tmp:
        tmp.write_bytes(payload)
    assert events == ["fsync file", "rename", "fsync dir"]
    assert target.read_bytes() == payload


def test_manifest_is_written_atomically(tmp_path: Path, umask: None) -> None:
    os.umask(0o022)
    (tmp_path / "s").mkdir()
    record = SubjectRecord("s", tmp_path / "s" / "full.nii.gz", {4: tmp_path / "s" / "drf_004.nii.gz"}, 2.5e-4)
    write_manifest([record], tmp_path / "manifest.csv")
    assert (tmp_path / "manifest.csv").read_text().splitlines() == [
        "subject,drf,path,suv_factor",
        "s,full,s/full.nii.gz,0.00025",
        "s,4,s/drf_004.nii.gz,0.00025",
    ]
    assert mode(tmp_path / "manifest.csv") == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.csv", "s"]


def test_stale_temporary_files_are_removed_and_nothing_else(tmp_path: Path) -> None:
    from lowdose_toolkit.core.atomic import remove_stale_temps

    (tmp_path / "previews").mkdir()
    stale = [tmp_path / ".scan.nii.gz.0a1b2c3d.tmp.nii.gz", tmp_path / "previews" / ".scan.png.deadbeef.tmp.png",
             tmp_path / ".summary.csv.01234567.tmp.csv"]
    kept = [tmp_path / "scan.nii.gz", tmp_path / ".hidden_user_file", tmp_path / ".scan.tmp.nii.gz"]
    for p in stale + kept:
        p.write_text("x")
    assert sorted(remove_stale_temps(tmp_path, tmp_path / "previews", tmp_path / "missing")) == sorted(stale)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)


# ------------------------------------------------------------------------------------------ folders


def test_folder_appears_whole_and_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file, then the folder, reach the disk before the rename; the parent after it."""
    events: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append("rename")
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    target = tmp_path / "out" / "PET"
    with atomic_dir(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".PET.") and not target.exists()
        for name in ("IM1.dcm", "IM2.dcm"):
            (tmp / name).write_bytes(b"slice")
    assert events == ["fsync file", "fsync file", "fsync dir", "rename", "fsync dir"]
    assert sorted(p.name for p in target.iterdir()) == ["IM1.dcm", "IM2.dcm"]
    assert [p.name for p in target.parent.iterdir()] == ["PET"]  # no temporary left


@pytest.mark.parametrize("error", [RuntimeError("writer failed"), KeyboardInterrupt()])
def test_a_failed_folder_leaves_the_old_one(tmp_path: Path, error: BaseException) -> None:
    target = tmp_path / "PET"
    target.mkdir()
    (target / "IM1.dcm").write_text("old")
    with pytest.raises(type(error)):
        with atomic_dir(target) as tmp:
            (tmp / "IM1.dcm").write_text("half of the new")
            raise error
    assert [p.name for p in tmp_path.iterdir()] == ["PET"] and (target / "IM1.dcm").read_text() == "old"


def test_a_folder_replaces_the_old_one_and_a_link_not_its_target(tmp_path: Path) -> None:
    target = tmp_path / "PET"
    target.mkdir()
    (target / "IM9.dcm").write_text("old")
    with atomic_dir(target) as tmp:
        (tmp / "IM1.dcm").write_text("new")
    assert [p.name for p in target.iterdir()] == ["IM1.dcm"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    link = tmp_path / "linked"
    link.symlink_to(elsewhere)
    with atomic_dir(link) as tmp:
        (tmp / "IM1.dcm").write_text("new")
    assert not link.is_symlink() and [p.name for p in link.iterdir()] == ["IM1.dcm"]
    assert (elsewhere / "keep.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["PET", "elsewhere", "linked"]


def test_a_killed_folder_write_is_cleaned_up_and_a_set_aside_output_restored(tmp_path: Path) -> None:
    from lowdose_toolkit.core.atomic import remove_stale_temps

    (tmp_path / ".series_a.0a1b2c3d.tmp").mkdir()  # a new series half written
    (tmp_path / ".series_a.0a1b2c3d.tmp" / "IM1.dcm").write_text("partial")
    (tmp_path / ".series_b.deadbeef.old").mkdir()  # killed between the two renames: series_b is missing
    (tmp_path / ".series_b.deadbeef.old" / "IM1.dcm").write_text("previous output")
    (tmp_path / "series_c").mkdir()
    (tmp_path / ".series_c.01234567.old").mkdir()  # killed after the new series_c was in place
    removed = remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == [".series_a.0a1b2c3d.tmp", ".series_c.01234567.old"]
    assert (tmp_path / "series_b" / "IM1.dcm").read_text() == "previous output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["series_b", "series_c"]
