"""The (low, full) volume pairs of named subjects, as a run saw them: one helper for ``ldt evaluate``, the
study, the experiments and the benchmarks, which all re-read a checkpoint's split from its data source."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lowdose_toolkit.errors import UserError


def subject_pairs(recipe: Mapping[str, Any], subjects: Iterable[str], drfs: Sequence[int] | None = None) -> Any:
    """The pairs dataset (:func:`lowdose_toolkit.data.datasets.pairs_dataset`) of ``subjects`` at the DRFs
    ``drfs`` (default: all of the recipe's ``data.drfs``), from the recipe's data source and normalised as it
    trained; a UserError when none of ``subjects`` is in the source. ``recipe`` is resolved (e.g. a
    checkpoint's)."""
    from lowdose_toolkit.core.plugin_manager import get_registry
    from lowdose_toolkit.data.datasets import pairs_dataset

    trained = list(recipe["data"]["drfs"])
    drfs = trained if drfs is None else list(drfs)
    if not set(drfs) <= set(trained):
        raise ValueError(f"subject_pairs: DRFs {drfs} are not all among the run's data.drfs {trained}")
    # The source is built for the run's DRFs (a phantom simulated for another list is another data set).
    source = get_registry().build("source", recipe["data"]["source"], "data.source", context={"drfs": trained})
    wanted = set(subjects)
    records = [r for r in source.records() if r.subject in wanted]
    if not records:
        raise UserError(f"none of the subjects {sorted(wanted)} is in the data source ({source!r}); use the data "
                        "the run was trained on")
    return pairs_dataset(records, drfs, recipe["data"]["normalization"], classes=trained)
