"""The ``jsonl`` logger: ``metrics.jsonl``, one JSON line per epoch (the default of ``train.loggers``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lowdose_toolkit import hookimpl
from lowdose_toolkit.hookspecs import Register
from lowdose_toolkit.loggers import Logger
from lowdose_toolkit.train.rundir import read_metrics, write_metrics


class JsonlLogger(Logger):
    """metrics.jsonl in the run directory: one line per epoch, rewritten atomically, repaired on resume.

    The file is rewritten whole at each epoch (never a partial line). A resume repairs it from the
    checkpoint: it keeps the epochs up to ``last.pt``'s and gets that epoch's own line back when a kill lost it;
    a run started afresh (killed before its first checkpoint) removes what an earlier attempt left.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"

    def start(self, epoch: int, history: Sequence[Mapping[str, Any]]) -> None:
        if epoch == 0:
            self.path.unlink(missing_ok=True)
        elif history or self.path.exists():
            write_metrics(self.path, list(history))

    def log_epoch(self, record: Mapping[str, Any], pictures: Mapping[str, Path]) -> None:
        kept = (r for r in read_metrics(self.path) if r.get("epoch", 0) < record["epoch"])
        write_metrics(self.path, [*kept, record])


@hookimpl
def ldt_register_loggers(register: Register) -> None:
    register("jsonl", JsonlLogger)
