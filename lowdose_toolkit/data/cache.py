"""The cached layout: uncompressed float32 NIfTI read through memory maps, normalisation stored once.

A whole-body ``.nii.gz`` (360x360x673) takes seconds to decompress, so a training patch drawn from it
costs a whole volume. ``ldt cache`` (and ``ldt prepare uldp --cache``) write a layout from which a patch
reads only its own voxels (:mod:`lowdose_toolkit.data.cached_patches`):

* every image as an uncompressed, native float32 ``.nii`` with the source's header (affine, codes) as
  is, memory-mapped at sampling time; an image that is already one is indexed where it is, not copied;
* ``cache.json``, the index: each file's shape, data offset and the size and modification time of its
  source (a cache older than its source is refused), each low-dose image's ``robust`` normalisation
  scale (computed once, by the same function as the volume path, so the numbers are equal) and its
  sampling map for the ``weighted`` sampler, block sums over ``BLOCK``\\ :sup:`3` voxels (``.npy``);
* ``manifest.csv`` of the cached files (a copied cache is itself a ``nifti`` data set).

Where it goes: ``ldt cache SRC`` writes ``<data root>/.ldt-cache/`` (a dot folder, which the ``nifti``
source's file scan skips), found from the records with no change to the recipe; ``ldt cache SRC OUT``
writes a standalone data set that a recipe uses with ``source: {name: nifti, root: OUT}``.
``data.layout`` (``auto`` | ``volumes`` | ``mmap``) chooses the path: ``auto`` takes the cache when one
is found (:func:`find_cache`), and a cache that is found but stale or incomplete is an error, not a
silent fall-back to the slow path.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from lowdose_toolkit.errors import DataError
from lowdose_toolkit.records import FULL, SubjectRecord

FORMAT = "ldt-cache"
VERSION = 1
INDEX = "cache.json"
DEFAULT_DIR = ".ldt-cache"
BLOCK = 8  # edge of the sampling map's blocks, in voxels
SAMPLING_FLOOR = 0.05  # the weighted sampler's floor, a fraction of the mean activity (as NormalizeByInput)
LAYOUTS = ("auto", "volumes", "mmap")
_DTYPE = "<f4"

__all__ = [
    "BLOCK", "DEFAULT_DIR", "INDEX", "LAYOUTS", "CacheIndex", "CachedSubject", "CachedVolume", "block_weights",
    "default_cache_dir", "find_cache", "resolve_layout", "write_cache",
]  # fmt: skip


# ------------------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class CachedVolume:
    """One cached image: an uncompressed float32 ``.nii`` and what the sampler needs to read it.

    Attributes:
        path: The ``.nii`` file.
        shape: Spatial shape ``(I, J, K)`` (NIfTI voxel order, stored Fortran-order).
        offset: Byte offset of the voxel data.
        scale: The ``robust`` normalisation scale of a low-dose image (``None`` for a full-dose one).
        weights: The ``weighted`` sampler's block map (``.npy``) of a low-dose image.
        scale_error: Why a low-dose image has no ``robust`` scale (an empty image), raised where it is needed.
    """

    path: Path
    shape: tuple[int, int, int]
    offset: int
    scale: float | None = None
    weights: Path | None = None
    scale_error: str | None = None

    def memmap(self) -> np.ndarray:
        """The voxels as a read-only memory map ``[I, J, K]`` (nothing is read until sliced)."""
        try:
            return np.memmap(self.path, dtype=_DTYPE, mode="r", offset=self.offset, shape=self.shape, order="F")
        except (OSError, ValueError) as exc:
            raise DataError(f"{self.path}: cannot memory-map the cached image ({exc}); "
                            "run `ldt cache` again to rewrite it") from None


@dataclass(frozen=True)
class CachedSubject:
    """A subject's cached images, keyed like :class:`~lowdose_toolkit.records.SubjectRecord`."""

    subject: str
    full: CachedVolume
    low: dict[int, CachedVolume]
    suv_factor: float | None = None
    meta: dict[str, str] = field(default_factory=dict)

    def record(self) -> SubjectRecord:
        """The subject as a record of the cached ``.nii`` files (whole-volume readers: validation)."""
        return SubjectRecord(self.subject, self.full.path, {d: v.path for d, v in self.low.items()},
                             self.suv_factor, {**self.meta, "layout": "mmap"})


def _stamp(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, timezone.utc).isoformat(timespec="seconds")


class CacheIndex:
    """A cache's ``cache.json``: look up the cached image of a record's file and check it is current."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.root = path.parent
        self.data = data
        self.command = str(data.get("command") or f"ldt cache {self.root}")
        self.files: dict[str, dict[str, Any]] = data.get("files", {})
        self._by_path: dict[Path, str] = {}
        for rel, entry in self.files.items():
            self._by_path[self.file_path(rel)] = rel
            if entry.get("source"):
                self._by_path.setdefault(Path(entry["source"]), rel)
        self._resolved: dict[Path, str] | None = None

    def _lookup(self, path: Path) -> str | None:
        """The entry of a file given by any spelling of its path (symbolic links resolved on a miss)."""
        rel = self._by_path.get(path)
        if rel is None:
            if self._resolved is None:
                self._resolved = {p.resolve(): r for p, r in self._by_path.items()}
            rel = self._resolved.get(path.resolve())
        return rel

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CacheIndex:
        """Read an index; a file that is not one raises :class:`DataError` naming it and the fix."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: unreadable cache index ({type(exc).__name__}); "
                            f"delete {path.parent} and run `ldt cache` again") from None
        found = data.get("format") if isinstance(data, dict) else None
        if found != FORMAT:
            raise DataError(f"{path}: not an ldt cache index (format {found!r}); delete it or choose another folder")
        if data.get("version") != VERSION:
            raise DataError(f"{path}: cache format version {data.get('version')!r}, this ldt reads {VERSION}; "
                            f"run `{data.get('command') or 'ldt cache'}` again")
        return cls(path, data)

    def file_path(self, rel: str) -> Path:
        """Where an indexed file is (entries are relative to the cache folder unless absolute)."""
        p = Path(rel)
        return p if p.is_absolute() else self.root / p

    def _fix(self) -> str:
        return f"run `{self.command}` again to refresh the cache, or set data.layout: volumes"

    def volume(self, path: str | os.PathLike[str], what: str) -> CachedVolume:
        """The cached image of ``path`` (a source file or a cached file), checked to be current.

        Raises:
            DataError: The file is not in the cache, its cached copy is missing or truncated, or the
                source changed after it was cached; one line naming the file and the fix.
        """
        path = Path(path).absolute()
        rel = self._lookup(path)
        if rel is None:
            raise DataError(f"{path}: not in the cache {self.root} ({what}); {self._fix()}")
        entry = self.files[rel]
        cached = self.file_path(rel)
        try:
            st = cached.stat()
        except OSError:
            raise DataError(f"{cached}: missing from the cache {self.root} ({what}); {self._fix()}") from None
        if st.st_size != entry["size"]:
            raise DataError(f"{cached}: {st.st_size} bytes where the cache recorded {entry['size']} (truncated or "
                            f"rewritten after caching, {what}); {self._fix()}")
        source = entry.get("source")
        if source:
            try:
                src = Path(source).stat()
            except OSError:
                src = None  # a copied cache outlives its source
            if src is not None and (src.st_size, src.st_mtime_ns) != (entry["source_size"], entry["source_mtime_ns"]):
                raise DataError(
                    f"{source}: changed after it was cached (modified {_stamp(src.st_mtime_ns)}, cached copy of "
                    f"{_stamp(entry['source_mtime_ns'])} in {self.root}, {what}); {self._fix()}"
                )
        weights = entry.get("weights")
        return CachedVolume(cached, tuple(entry["shape"]), int(entry["offset"]), entry.get("scale"),
                            self.file_path(weights) if weights else None, entry.get("scale_error"))

    def validated(self, record: SubjectRecord) -> bool:
        """Whether ``ldt cache`` read and checked (NaN/Inf, empty, one 3D volume) every file of ``record`` as it
        is now: a source with its cached size and modification time, or an intact cached copy."""
        for p in (record.full, *record.low.values()):
            path = Path(p).absolute()
            rel = self._lookup(path)
            if rel is None:
                return False
            entry = self.files[rel]
            is_source = path in (Path(entry.get("source") or ""), Path(entry.get("source") or "").resolve())
            try:
                st = path.stat()
            except OSError:
                return False
            if (is_source and (st.st_size, st.st_mtime_ns) != (entry["source_size"], entry["source_mtime_ns"])) \
                    or (not is_source and st.st_size != entry["size"]):
                return False
        return True

    def subject(self, record: SubjectRecord) -> CachedSubject:
        """A record's cached images (every file checked by :meth:`volume`)."""
        where = f"subject {record.subject!r}"
        full = self.volume(record.full, f"{where}, full dose")
        low = {}
        for drf, p in sorted(record.low.items()):
            vol = self.volume(p, f"{where}, DRF {drf}")
            if vol.weights is None:
                raise DataError(f"{p}: cached as a full-dose image, listed as DRF {drf} of {where}; {self._fix()}")
            low[drf] = vol
        return CachedSubject(record.subject, full, low, record.suv_factor, dict(record.meta))

    def check_quantile(self, quantile: float) -> None:
        """Refuse scales computed with another ``robust`` quantile than this version's."""
        stored = self.data.get("normalization", {}).get("quantile")
        if stored != quantile:
            raise DataError(f"{self.path}: robust scales were cached with quantile {stored!r}, this ldt uses "
                            f"{quantile}; {self._fix()}")


def _candidates(record: SubjectRecord) -> list[Path]:
    dirs = []
    for key in ("manifest", "root"):
        if record.meta.get(key):
            p = Path(record.meta[key])
            dirs.append(p.parent if key == "manifest" else p)
    full = Path(record.full).absolute()
    dirs += [full.parent, full.parent.parent]
    return list(dict.fromkeys(d.absolute() for d in dirs))


def _is_index(path: Path) -> bool:
    try:
        with path.open() as fh:
            head = fh.read(200)
    except OSError:
        return False
    return f'"format": "{FORMAT}"' in head


def find_cache(records: Sequence[SubjectRecord]) -> CacheIndex | None:
    """The cache of a data set, or ``None``: ``cache.json`` (a standalone cache used as the root) or
    ``.ldt-cache/cache.json`` in the source's root (its manifest's folder), a file's folder or the one above."""
    seen: set[Path] = set()
    for record in records[:1] or []:
        for d in _candidates(record):
            for index in (d / INDEX, d / DEFAULT_DIR / INDEX):
                if index in seen:
                    continue
                seen.add(index)
                if index.is_file() and (index.parent.name == DEFAULT_DIR or _is_index(index)):
                    return CacheIndex.load(index)
    return None


def resolve_layout(layout: str, records: Sequence[SubjectRecord], *, preload: bool = False,
                   normalization: str = "auto") -> dict[str, CachedSubject] | None:
    """The cached subjects to sample patches from, or ``None`` for the volume path.

    ``volumes``: ``None``. ``auto``: the cache when :func:`find_cache` finds one (and ``data.preload`` is
    off), else ``None``. ``mmap``: the cache, or an error naming the fix. A cache that is found must hold
    every record's files, current (:meth:`CacheIndex.volume`).
    """
    if layout not in LAYOUTS:
        raise DataError(f"data.layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    if layout == "volumes" or (layout == "auto" and preload):
        return None
    index = find_cache(records)
    if index is None:
        if layout == "mmap":
            where = _candidates(records[0])[0] if records else Path(".")
            raise DataError(f"data.layout mmap: no cache found for the data in {where} (looked for {INDEX} and "
                            f"{DEFAULT_DIR}/{INDEX}); run `ldt cache {where}` once, or set data.layout: volumes")
        return None
    if normalization in ("auto", "robust"):
        from lowdose_toolkit.data.normalize import QUANTILE

        index.check_quantile(QUANTILE)
    return {r.subject: index.subject(r) for r in records}


# ------------------------------------------------------------------------------------------------ writing


def block_weights(low: torch.Tensor, block: int = BLOCK) -> np.ndarray:
    """The ``weighted`` sampler's map of a low-dose volume summed over ``block``\\ :sup:`3` blocks.

    Per voxel the map is the volume clipped at 0 plus ``SAMPLING_FLOOR`` times its mean (as the volume
    path's ``sampling_map``, up to the normalisation scale, which cancels); edge blocks hold fewer voxels.
    """
    x = low.detach().reshape(low.shape[-3:]).float().clamp(min=0)
    shape = x.shape
    pad = [(-n) % block for n in shape]
    x = torch.nn.functional.pad(x[None, None], (0, pad[2], 0, pad[1], 0, pad[0]))[0, 0]
    nb = [(n + p) // block for n, p in zip(shape, pad, strict=True)]
    sums = x.reshape(nb[0], block, nb[1], block, nb[2], block).sum(dim=(1, 3, 5)).double().numpy()
    counts = [np.minimum(block, n - block * np.arange(b)) for n, b in zip(shape, nb, strict=True)]
    voxels = counts[0][:, None, None] * counts[1][None, :, None] * counts[2][None, None, :]
    mean = sums.sum() / math.prod(shape)
    return sums + SAMPLING_FLOOR * mean * voxels


def _signature(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _memmappable(path: Path) -> int | None:
    """The data offset when ``path`` is an uncompressed native float32 NIfTI without scaling, else ``None``."""
    if path.name.lower().endswith(".gz") or not path.name.lower().endswith(".nii"):
        return None
    try:
        img = nib.load(str(path))
        header = img.header
        slope, inter = header.get_slope_inter()
    except Exception:  # noqa: BLE001 - unreadable files are reported when read for copying
        return None
    if header.get_data_dtype() != np.dtype(_DTYPE) or slope not in (None, 1.0) or inter not in (None, 0.0):
        return None
    offset = int(img.dataobj.offset)
    if path.stat().st_size < offset + 4 * math.prod(img.shape):
        return None
    return offset


def _safe(subject: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", subject).strip(".") or "subject"
    return name


def _previous(out: Path) -> dict[str, Any]:
    index = out / INDEX
    if index.is_file():
        data = CacheIndex.load(index).data
        from lowdose_toolkit.data.normalize import QUANTILE

        same = data.get("normalization", {}).get("quantile") == QUANTILE and data.get("block") == BLOCK
        return data if same else {**data, "files": {}}
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out}: not empty and not an ldt cache (no {INDEX}); choose an empty or new folder")
    return {}


def write_cache(
    records: Sequence[SubjectRecord],
    out: str | os.PathLike[str],
    *,
    command: str,
    manifest: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    """Write (or bring up to date) the cached layout of ``records`` in ``out``; return the index path.

    Every image is read once and validated (NaN/Inf, empty, one 3D volume, low-dose on the full-dose
    grid); a ``.gz`` or scaled or non-float32 image is copied to ``out/<subject>/<name>.nii`` with its
    header, an uncompressed float32 one is indexed in place. Each low-dose image gets its ``robust``
    scale and sampling map. Files whose source is unchanged since an earlier run are kept (resume).

    Args:
        records: The subjects (any source's records).
        out: The cache folder: new, empty, or an earlier cache.
        command: The command that refreshes this cache, quoted in error messages.
        manifest: Also write ``out/manifest.csv`` listing the cached files.
        progress: Called as ``progress(subject, index, total)`` before each subject.
    """
    from lowdose_toolkit import __version__
    from lowdose_toolkit.core.atomic import atomic_path
    from lowdose_toolkit.data.io import check_same_geometry, read_info, read_nifti, save_like, validate_image
    from lowdose_toolkit.data.manifest import write_manifest
    from lowdose_toolkit.data.naming import is_nifti, nifti_stem
    from lowdose_toolkit.data.normalize import QUANTILE, fit_normalization

    out = Path(out).absolute()
    prev = _previous(out)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    state: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "ldt_version": __version__, "command": command,
        "created": prev.get("created", now), "updated": now,
        "normalization": {"method": "robust", "quantile": QUANTILE},
        "block": BLOCK, "sampling_floor": SAMPLING_FLOOR,
        "files": dict(prev.get("files", {})), "subjects": dict(prev.get("subjects", {})),
    }

    def save() -> None:
        with atomic_path(out / INDEX) as tmp:
            tmp.write_text(json.dumps(state, indent=1) + "\n")

    used: dict[str, str] = {}
    for n, record in enumerate(sorted(records, key=lambda r: r.subject)):
        if progress is not None:
            progress(record.subject, n, len(records))
        folder = _safe(record.subject)
        if used.setdefault(folder, record.subject) != record.subject:
            raise DataError(f"subjects {used[folder]!r} and {record.subject!r} map to one cache folder "
                            f"{out / folder}; rename one of them")
        items: list[tuple[int | str, Path]] = [(FULL, Path(record.full)), *sorted(record.low.items())]
        subject_files: dict[str, str] = {}
        full_info = None
        for drf, source in items:
            source = source.absolute()
            low = drf != FULL
            what = f"subject {record.subject!r}, {'full dose' if not low else f'DRF {drf}'}"
            if not source.is_file() or not is_nifti(source):
                raise DataError(f"{source}: not a NIfTI file ({what}); `ldt cache` caches NIfTI data sets "
                                "(convert DICOM with `ldt prepare uldp SRC OUT --cache`)")
            size, mtime = _signature(source)
            offset = _memmappable(source)
            rel = str(source) if offset is not None else f"{folder}/{nifti_stem(source)}.nii"
            old = state["files"].get(rel) or {}
            if (old.get("source") == str(source) and (old["source_size"], old["source_mtime_ns"]) == (size, mtime)
                    and (not low or "weights" in old) and _file_size(out, rel) == old["size"]):
                subject_files[str(drf)] = rel
                info = read_info(source)
                if full_info is None:
                    full_info = info
                else:
                    check_same_geometry(source, info, record.full, full_info)
                continue
            tensor, _ = read_nifti(source)
            validate_image(source, tensor)
            info = read_info(source)
            if full_info is None:
                full_info = info
            else:
                check_same_geometry(source, info, record.full, full_info)
            target = source if offset is not None else out / rel
            if offset is None:
                target.parent.mkdir(parents=True, exist_ok=True)
                save_like(tensor, source, target)
                offset = _memmappable(target)
                if offset is None:  # pragma: no cover - save_like writes float32 without scaling
                    raise DataError(f"{target}: written cache file cannot be memory-mapped; report this")
            entry: dict[str, Any] = {
                "source": str(source), "source_size": size, "source_mtime_ns": mtime,
                "size": target.stat().st_size, "shape": list(info.shape), "offset": offset, "dtype": _DTYPE,
                "role": "low" if low else "full",
            }
            if low:
                try:
                    entry["scale"] = fit_normalization(tensor, "robust", where=what).scale
                except DataError as exc:  # only an error where the robust normalisation is used
                    entry["scale"] = None
                    entry["scale_error"] = f"{source}: {exc}; leave the subject out or use data.normalization: suv"
                weights_rel = f"{folder}/{nifti_stem(source)}.weights.npy"
                (out / folder).mkdir(parents=True, exist_ok=True)
                with atomic_path(out / weights_rel) as tmp, tmp.open("wb") as fh:
                    np.save(fh, block_weights(tensor))
                entry["weights"] = weights_rel
            del tensor
            state["files"][rel] = entry
            subject_files[str(drf)] = rel
        state["subjects"][record.subject] = {"suv_factor": record.suv_factor, "files": subject_files}
        state["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        save()
    save()
    if manifest:
        index = CacheIndex(out / INDEX, state)
        cached = []
        for subject, item in sorted(state["subjects"].items()):
            files = {k: index.file_path(v) for k, v in item["files"].items()}
            cached.append(SubjectRecord(subject, files[FULL], {int(k): p for k, p in files.items() if k != FULL},
                                        item.get("suv_factor")))
        write_manifest(cached, out / "manifest.csv")
    return out / INDEX


def _file_size(out: Path, rel: str) -> int | None:
    p = Path(rel) if Path(rel).is_absolute() else out / rel
    try:
        return p.stat().st_size
    except OSError:
        return None


def default_cache_dir(records: Sequence[SubjectRecord]) -> Path:
    """Where ``ldt cache`` writes by default: ``.ldt-cache`` in the data's root (its manifest's folder), else
    in the folder that holds every file (:func:`find_cache` looks in both)."""
    if not records:
        raise DataError("no subjects to cache")
    meta = records[0].meta
    if meta.get("manifest"):
        return Path(meta["manifest"]).absolute().parent / DEFAULT_DIR
    if meta.get("root"):
        return Path(meta["root"]).absolute() / DEFAULT_DIR
    files = [str(Path(p).absolute().parent) for r in records for p in (r.full, *r.low.values())]
    return Path(os.path.commonpath(files)) / DEFAULT_DIR
