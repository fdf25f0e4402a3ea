"""The ``nifti`` source: full-dose and low-dose NIfTI volumes on disk.

Three layouts, tried in this order:

(a) A manifest CSV (``subject,drf,path[,suv_factor]``; ``drf`` an integer or ``full``; paths relative
    to the manifest), given as ``manifest``, as ``root`` itself, or found at ``<root>/manifest.csv``;
    read by :mod:`lowdose_toolkit.data.manifest`.
(b) One folder per subject, as ``ldt prepare`` and the phantom simulator write them:
    ``<root>/<subject>/full.nii.gz`` and ``<root>/<subject>/drf_004.nii.gz`` ...
(c) The challenge's flat naming: ``<root>/<subject>_DRF-100.nii.gz`` (or ``_DRF_100``) with the full
    dose as ``<root>/<subject>_NORMAL.nii.gz`` or ``<subject>_FULL.nii.gz``.

Layouts (b) and (c) are naming patterns, ``full_pattern`` and ``low_pattern`` (a string or a list of
alternatives). A pattern is a path relative to ``root`` with ``/`` between folders and these fields:

* ``{subject}``: one or more characters other than ``/`` (required, once);
* ``{drf}``: the DRF as digits, leading zeros allowed (low-dose patterns only); a format spec such
  as ``{drf:03d}`` matches the same way and is used when the pattern spells a missing file;
* ``*``: any characters other than ``/``.

Everything else is literal and case-insensitive, and ``.nii.gz`` and ``.nii`` match each other.
Example recipe: ``data: {source: nifti, root: data/uldp, low_pattern: "{subject}/pet_drf{drf}.nii.gz"}``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from lowdose_toolkit import hookimpl
from lowdose_toolkit.data.manifest import manifest_records
from lowdose_toolkit.data.naming import NIFTI_SUFFIX_RE, is_nifti
from lowdose_toolkit.errors import DataError
from lowdose_toolkit.records import SubjectRecord

FULL_PATTERNS = ("{subject}/full.nii.gz", "{subject}_NORMAL.nii.gz", "{subject}_FULL.nii.gz")
LOW_PATTERNS = ("{subject}/drf_{drf:03d}.nii.gz", "{subject}_DRF-{drf}.nii.gz", "{subject}_DRF_{drf}.nii.gz")
MANIFEST_NAME = "manifest.csv"

_FIELD_RE = re.compile(r"(\{subject\}|\{drf(?::[^}]*)?\}|\*)")


class Pattern:
    """A compiled naming pattern (see the module docstring)."""

    def __init__(self, template: str, *, low: bool, what: str) -> None:
        self.template = template
        fields = _FIELD_RE.findall(template)
        n_subject = fields.count("{subject}")
        n_drf = sum(f.startswith("{drf") for f in fields)
        if n_subject != 1 or n_drf != (1 if low else 0) or template.startswith("/"):
            need = "{subject} once and {drf} once" if low else "{subject} once and no {drf}"
            raise DataError(f"{what} {template!r}: a pattern relative to root needs {need}")
        body, end = template, ""
        match = NIFTI_SUFFIX_RE.search(template)
        if match:
            body, end = template[: match.start()], r"\.nii(?:\.gz)?"
        regex = ""
        for part in _FIELD_RE.split(body):
            if part == "{subject}":
                regex += r"(?P<subject>[^/]+?)"
            elif part.startswith("{drf"):
                regex += r"(?P<drf>\d+)"
            elif part == "*":
                regex += r"[^/]*"
            else:
                regex += re.escape(part)
        self.regex = re.compile(f"^{regex}{end}$", re.IGNORECASE)

    def match(self, rel: str) -> tuple[str, int | None] | None:
        """``(subject, drf)`` if the relative posix path ``rel`` matches, else ``None``."""
        m = self.regex.match(rel)
        if not m:
            return None
        return m.group("subject"), int(m.group("drf")) if "drf" in m.groupdict() else None

    def spell(self, subject: str, drf: int | None = None) -> str:
        """The relative path this pattern gives ``subject`` (and ``drf``)."""
        return self.template.format(subject=subject, drf=drf if drf is not None else 0)

    def __repr__(self) -> str:
        return f"Pattern({self.template!r})"


def _as_list(value: str | Sequence[str], what: str) -> list[str]:
    items = [value] if isinstance(value, str) else list(value)
    if not items or not all(isinstance(v, str) and v for v in items):
        raise DataError(f"{what} {value!r}: expected a pattern string or a list of them")
    return items


def _check_drfs(drfs: Sequence[int] | None) -> list[int] | None:
    if drfs is None:
        return None
    out = []
    for d in drfs:
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise DataError(f"drfs {list(drfs)!r}: each DRF must be a positive integer, got {d!r}")
        out.append(d)
    return sorted(set(out))


# -------------------------------------------------------------------------------------------- patterns


def _nifti_files(root: Path) -> list[str]:
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and is_nifti(name):
                rels.append((Path(dirpath) / name).relative_to(root).as_posix())
    return sorted(rels)


def scan_patterns(
    root: Path, full: Sequence[Pattern], low: Sequence[Pattern], drfs: Sequence[int] | None
) -> tuple[list[SubjectRecord], dict[str, str]]:
    """Match the NIfTI files under ``root`` against the patterns; records plus per-subject problems."""
    files = _nifti_files(root)
    looked = f"patterns {[p.template for p in full]} and {[p.template for p in low]}"
    if not files:
        raise DataError(
            f"{root}: holds no .nii/.nii.gz files; expected {root}/<subject>/full.nii.gz with "
            f"drf_004.nii.gz..., <subject>_NORMAL.nii.gz with <subject>_DRF-4.nii.gz..., or a {MANIFEST_NAME}"
        )
    fulls: dict[str, list[Path]] = {}
    lows: dict[str, dict[int, list[Path]]] = {}
    used: dict[str, set[int]] = {}
    for rel in files:
        hit = next((m for p in full if (m := p.match(rel))), None)
        if hit:
            fulls.setdefault(hit[0], []).append(root / rel)
            continue
        for i, p in enumerate(low):
            m = p.match(rel)
            if m and m[1] is not None and m[1] >= 1:
                lows.setdefault(m[0], {}).setdefault(m[1], []).append(root / rel)
                used.setdefault(m[0], set()).add(i)
                break
    subjects = sorted(set(fulls) | set(lows))
    if not subjects:
        raise DataError(
            f"{root}: none of its {len(files)} NIfTI files (e.g. {files[0]!r}) matches the {looked}; "
            "set full_pattern and low_pattern, or write a manifest.csv"
        )
    records, problems = [], {}
    for subject in subjects:
        full_files = fulls.get(subject, [])
        low_files = lows.get(subject, {})
        found = sorted(low_files)
        wanted = list(drfs) if drfs else found
        problem = None
        dupes = [v for v in [full_files, *low_files.values()] if len(v) > 1]
        if dupes:
            names = ", ".join(map(str, dupes[0]))
            problem = f"{root}: subject {subject!r} has {len(dupes[0])} files for one dose ({names}); keep one"
        elif not full_files:
            expected = ", ".join(str(root / p.spell(subject)) for p in full)
            problem = f"{root}: subject {subject!r} has no full-dose image (looked for {expected}); add it"
        elif not wanted:
            expected = ", ".join(str(root / p.spell(subject, 4)) for p in low)
            problem = f"{root}: subject {subject!r} has no low-dose image (looked for e.g. {expected})"
        else:
            absent = [d for d in wanted if d not in low_files]
            if absent:
                pats = [low[i] for i in sorted(used.get(subject, set()))] or list(low)
                expected = ", ".join(str(root / p.spell(subject, absent[0])) for p in pats)
                problem = (
                    f"{expected}: missing: subject {subject!r} has no DRF {absent[0]} image (has DRFs {found}); "
                    f"add it or drop {absent[0]} from drfs"
                )
        if problem:
            problems[subject] = problem
            continue
        records.append(
            SubjectRecord(
                subject,
                full_files[0],
                {d: low_files[d][0] for d in wanted},
                None,
                {"source": "nifti", "root": str(root)},
            )
        )
    return records, problems


# -------------------------------------------------------------------------------------------- source


class NiftiSource:
    """Full-dose and low-dose NIfTI volumes: a manifest, a folder per subject, or flat challenge names.

    Args:
        root: Data folder (or a manifest CSV).
        manifest: Manifest CSV, relative to ``root`` (or the working folder) unless absolute;
            default ``<root>/manifest.csv`` when present, else the naming patterns.
        drfs: DRFs the recipe trains on (passed by the engine); every subject must have them.
            ``None`` takes every DRF found.
        full_pattern: Full-dose naming pattern(s) (module docstring).
        low_pattern: Low-dose naming pattern(s), with ``{drf}``.
        skip_bad: Leave out a bad subject with one warning line instead of stopping.
        validate: Read every file once before training (NaN/Inf, empty, 4D, low/full grid); results
            are cached while files are unchanged, and files that ``ldt cache`` checked when it cached
            them (unchanged since) are not read again: only their headers.

    Example:
        >>> src = NiftiSource("data/uldp", drfs=[4, 10, 20, 50, 100])  # doctest: +SKIP
        >>> src.records()[0]  # doctest: +SKIP
        SubjectRecord('sub001', drfs=[4, 10, 20, 50, 100], suv_factor=0.00021)
    """

    def __init__(
        self,
        root: str,
        manifest: str | None = None,
        drfs: list[int] | None = None,
        full_pattern: str | Sequence[str] = FULL_PATTERNS,
        low_pattern: str | Sequence[str] = LOW_PATTERNS,
        skip_bad: bool = False,
        validate: bool = True,
    ) -> None:
        self.root = Path(root).expanduser()
        if self.root.is_file() and self.root.suffix.lower() == ".csv" and manifest is None:
            manifest, self.root = str(self.root), self.root.parent
        if not self.root.is_dir():
            raise DataError(f"{self.root}: data folder not found; check the source's root")
        self.manifest: Path | None = None
        if manifest is not None:
            m = Path(manifest).expanduser()
            candidates = [m] if m.is_absolute() else [self.root / m, m]
            self.manifest = next((c for c in candidates if c.is_file()), None)
            if self.manifest is None:
                raise DataError(f"{manifest}: manifest not found (looked in {self.root} and the working folder)")
        elif (self.root / MANIFEST_NAME).is_file():
            self.manifest = self.root / MANIFEST_NAME
        self.drfs = _check_drfs(drfs)
        self.full_patterns = [
            Pattern(t, low=False, what="full_pattern") for t in _as_list(full_pattern, "full_pattern")
        ]
        self.low_patterns = [Pattern(t, low=True, what="low_pattern") for t in _as_list(low_pattern, "low_pattern")]
        self.skip_bad = skip_bad
        self.validate = validate
        self._records: list[SubjectRecord] | None = None

    @property
    def layout(self) -> str:
        """``"manifest"`` or ``"patterns"``."""
        return "manifest" if self.manifest is not None else "patterns"

    def records(self) -> list[SubjectRecord]:
        """The usable subjects, sorted by subject; validated on the first call."""
        if self._records is None:
            from lowdose_toolkit.data.io import screen_records

            if self.manifest is not None:
                candidates, problems = manifest_records(self.manifest, self.drfs)
            else:
                candidates, problems = scan_patterns(self.root, self.full_patterns, self.low_patterns, self.drfs)
            self._records = screen_records(
                candidates, problems, skip_bad=self.skip_bad, validate=self.validate, source="nifti"
            )
        return list(self._records)

    def __repr__(self) -> str:
        where = self.manifest if self.manifest is not None else self.root
        return f"NiftiSource({str(where)!r}, layout={self.layout!r}, drfs={self.drfs})"


def read_manifest(path: str | os.PathLike[str], drfs: Sequence[int] | None = None) -> list[SubjectRecord]:
    """Read a manifest CSV strictly (:mod:`lowdose_toolkit.data.manifest`): any problem raises :class:`DataError`."""
    return manifest_records(path, drfs, strict=True)[0]


@hookimpl
def ldt_register_sources(register):
    """Register the ``nifti`` source."""
    register("nifti", NiftiSource)
