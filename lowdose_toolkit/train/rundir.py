"""The run directory's life: a unique name, one process at a time, its recipe first, its metrics log.

A run directory is resumable from the moment it exists: its ``recipe.yaml`` is the first file written
(atomically, before any data is read), so ``ldt run --resume DIR`` restarts a run killed at any point,
from its last checkpoint or, when it has none, from the beginning. A process that trains in a run
directory holds an exclusive ``flock`` on ``DIR/.lock`` (which records its pid); a second one is refused.
``metrics.jsonl`` is rewritten atomically, one line per epoch, and ``checkpoints/last.pt`` is the source
of truth: lines after its epoch are dropped on resume, and its own line is restored from it when missing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from lowdose_toolkit.core.atomic import atomic_path, remove_stale_temps
from lowdose_toolkit.core.lock import folder_lock
from lowdose_toolkit.errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, runs are not protected
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"


def default_run_dir(recipe: Mapping[str, Any], root: Path = Path("runs")) -> Path:
    """Create and return a new ``root/<name>-<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``, ... when taken).

    The folder is claimed with one ``mkdir`` (atomic), so two runs started in the same second get two.
    """
    base = f"{recipe['name']}-{time.strftime('%Y%m%d-%H%M%S')}"
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        path = root / (base if n == 1 else f"{base}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise UserError(f"{root}: 10000 run directories named {base}-*; pass --out DIR")


#: Who may hold a run directory's lock, as the refusal names them.
LOCK_HOLDERS = "`ldt run`, `ldt study` or `ldt evaluate` (training or writing results there)"


class RunLock:
    """The run directory's lock (:func:`lowdose_toolkit.core.lock.folder_lock` on ``run_dir/.lock``), held
    from :meth:`acquire` to :meth:`release` while this process trains there, or (``ldt evaluate RUN_DIR``)
    writes its results there. ``fix`` is the refusal's advice to the process that finds it taken."""

    def __init__(self, run_dir: Path,
                 fix: str = "wait for it to end or stop it, or use another run directory") -> None:
        self.run_dir = Path(run_dir)
        self.fix = fix
        self._stack: ExitStack | None = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> RunLock:
        """Take the lock, or raise a UserError naming the process that holds it."""
        if self._stack is None:
            stack = ExitStack()
            stack.enter_context(folder_lock(self.run_dir, LOCK_HOLDERS, self.fix, LOCK_NAME))
            self._stack = stack
        return self

    def release(self) -> None:
        """Drop the lock."""
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    @property
    def held(self) -> bool:
        return self._stack is not None


def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """Remove the temporary files a killed writer left in the run directory (call with the lock held)."""
    run_dir = Path(run_dir)
    return remove_stale_temps(run_dir, run_dir / "checkpoints", run_dir / "previews")


def first_difference(recorded: Any, given: Any, where: str = "") -> tuple[str, Any, Any] | None:
    """The first dotted key where two recipes differ, with both values; None when they are equal (the
    older ``train.amp`` folded into ``train.precision`` first, :func:`lowdose_toolkit.core.spec.canonical_recipe`)."""
    if not where and isinstance(recorded, Mapping) and isinstance(given, Mapping) and "train" in recorded:
        from lowdose_toolkit.core.spec import canonical_recipe

        recorded, given = canonical_recipe(recorded), canonical_recipe(given)
    if isinstance(recorded, Mapping) and isinstance(given, Mapping):
        for key in [*recorded, *(k for k in given if k not in recorded)]:
            path = f"{where}.{key}" if where else str(key)
            if key not in recorded or key not in given:
                return path, recorded.get(key, "<absent>"), given.get(key, "<absent>")
            found = first_difference(recorded[key], given[key], path)
            if found is not None:
                return found
        return None
    if isinstance(recorded, list | tuple) and isinstance(given, list | tuple) and len(recorded) == len(given):
        for i, (a, b) in enumerate(zip(recorded, given, strict=True)):
            found = first_difference(a, b, f"{where}.{i}" if where else str(i))
            if found is not None:
                return found
        return None
    return None if recorded == given else (where or "<recipe>", recorded, given)


def recorded_recipe(run_dir: Path, registry: Any) -> dict[str, Any] | None:
    """The resolved recipe in ``run_dir/recipe.yaml``, or None when there is none."""
    from lowdose_toolkit.core.recipe import resolve_recipe, safe_load

    path = Path(run_dir) / "recipe.yaml"
    if not path.is_file():
        return None
    return resolve_recipe(safe_load(path.read_text()), registry, str(path))


def write_recipe(run_dir: Path, recipe: Mapping[str, Any]) -> None:
    """Write ``run_dir/recipe.yaml`` atomically (the first file of a run)."""
    from lowdose_toolkit.core.recipe import dump_recipe

    with atomic_path(Path(run_dir) / "recipe.yaml") as tmp:
        tmp.write_text(dump_recipe(recipe))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The epoch records of ``metrics.jsonl``; a partial last line (a killed append) is dropped."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise UserError(f"{path}:{number}: not a JSON line; remove the broken line (the epochs after it "
                            "are still in the file) and resume again") from None
    return records


def committed_metrics(path: Path, epoch: int, line: str) -> list[dict[str, Any]]:
    """The epoch records of a run resumed at ``epoch`` (its ``last.pt``, whose own line is ``line``): those
    of ``metrics.jsonl`` up to ``epoch`` (a partial last line dropped), with ``line`` put back if it was lost."""
    records = [r for r in read_metrics(path) if r.get("epoch", 0) <= epoch]
    if line and not any(r.get("epoch") == epoch for r in records):
        records.append(json.loads(line))
    return records


def write_metrics(path: Path, records: list[Mapping[str, Any]]) -> None:
    """Rewrite ``metrics.jsonl`` atomically (never a partial line)."""
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
