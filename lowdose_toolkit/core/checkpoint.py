"""The checkpoint file: the one place that knows its keys, their meaning and its format version.

On disk a checkpoint is a plain mapping of tensors, numbers, strings, lists and dicts (no pickled code;
it is read with ``torch.load(weights_only=True)``). In memory it is a :class:`Checkpoint`. Format 1 is
the only one written; an older file that lacks keys added since (the normalisation quantile) is read
with the value it was trained under, and a foreign or truncated file gets a one-line error naming what
is missing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowdose_toolkit.core.atomic import atomic_path
from lowdose_toolkit.core.safeload import load_failure
from lowdose_toolkit.data.normalize import LEGACY_QUANTILE
from lowdose_toolkit.errors import UserError

FORMAT = 1
#: Keys every checkpoint has (also the oldest of format 1); the rest have defaults.
REQUIRED = ("format", "recipe", "epoch", "drfs", "model", "normalization")


@dataclass(frozen=True)
class Normalization:
    """How inputs were normalised in training (``robust``, ``suv`` or ``none``) and the body quantile."""

    method: str
    quantile: float = LEGACY_QUANTILE


@dataclass(frozen=True)
class Checkpoint:
    """A training state: enough to resume training, and (``recipe``, ``model``, ...) to predict."""

    recipe: dict[str, Any]
    epoch: int
    drfs: list[int]
    model: dict[str, torch.Tensor]
    normalization: Normalization
    version: str = ""
    discriminator: dict[str, torch.Tensor] | None = None
    scheme: dict[str, Any] = field(default_factory=dict)
    scheme_modules: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    schedulers: dict[str, Any] = field(default_factory=dict)
    rng: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"epoch": -1, "value": None})
    split: dict[str, list[str]] = field(default_factory=dict)
    world_size: int = 1
    #: Training seconds through this epoch, over every resume (``train.max_minutes`` counts them), and
    #: the part of them spent in the current ``train.stages`` stage (its ``max_minutes``).
    elapsed: float = 0.0
    stage_elapsed: float = 0.0
    #: This epoch's ``metrics.jsonl`` line (JSON text), restored from here when a kill lost it.
    metrics: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The on-disk mapping (format :data:`FORMAT`)."""
        out = {"format": FORMAT, **{k: getattr(self, k) for k in self.__dataclass_fields__}}
        out["normalization"] = asdict(self.normalization)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "checkpoint") -> Checkpoint:
        """Check and type a loaded mapping; a missing key is a UserError naming it."""
        if not isinstance(data, Mapping):
            raise UserError(f"{where}: not a lowdose-toolkit checkpoint (a {type(data).__name__}, not a mapping)")
        missing = [k for k in REQUIRED if k not in data]
        if missing:
            raise UserError(f"{where}: not a lowdose-toolkit checkpoint, or a truncated one: missing "
                            f"{', '.join(missing)}")
        if data["format"] != FORMAT:
            raise UserError(f"{where}: checkpoint format {data['format']!r}; this version of ldt reads format "
                            f"{FORMAT} (install the version that wrote it)")
        norm = data["normalization"]
        if not isinstance(norm, Mapping) or "method" not in norm:
            raise UserError(f"{where}: checkpoint normalization must name its method, got {norm!r}")
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        known["normalization"] = Normalization(str(norm["method"]), float(norm.get("quantile", LEGACY_QUANTILE)))
        known["epoch"], known["drfs"] = int(data["epoch"]), [int(d) for d in data["drfs"]]
        for key in ("elapsed", "stage_elapsed"):
            if key in known:
                known[key] = float(known[key])
        return cls(**known)

    def save(self, path: Path) -> None:
        """``torch.save`` to a temporary file, then rename (an interrupted write leaves the old file)."""
        with atomic_path(path) as tmp:
            torch.save(self.to_dict(), tmp)


def find_checkpoint(path: Path) -> Path:
    """The checkpoint file of ``path``: itself, or a run directory's ``best.pt`` (else ``last.pt``)."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "checkpoints" / "best.pt", path / "checkpoints" / "last.pt", path / "last.pt"):
            if candidate.is_file():
                return candidate
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint here (expected a .pt file or a run directory with checkpoints/)")
    return path


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint (or a run directory's best) with ``weights_only=True``: data, never code."""
    path = find_checkpoint(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise UserError(f"{path}: not a lowdose-toolkit checkpoint ({load_failure(exc)})") from None
    return Checkpoint.from_dict(data, str(path))
