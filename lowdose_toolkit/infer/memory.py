"""Memory checks for ``ldt infer``: what a volume needs, from its header, against what the machine has.

A header that declares a huge volume (damaged, crafted, or just a bigger scan than the machine holds)
is refused with the numbers before anything is allocated, as that volume's failure, instead of a
MemoryError (or the kernel's OOM killer) ending the whole batch.
"""

from __future__ import annotations

import os
from pathlib import Path

from lowdose_toolkit.errors import DataError

WORKING_COPIES = 3
"""Float32 copies of a volume the pipeline (:mod:`lowdose_toolkit.infer.pipeline`) holds at once while it
denoises it: the input as read, its normalised copy and the blended output of the sliding window. When
the prediction returns the normalised copy is freed and the output de-normalised into a new copy (the
one handed to the writer), so there are three again until the input and the normalised output go."""


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation now (``None`` if the system does not say).

    psutil's ``available`` where psutil is installed, else Linux's ``MemAvailable`` (free memory plus
    reclaimable caches), else free pages (``os.sysconf``).
    """
    try:
        import psutil
    except ImportError:
        pass
    else:
        return int(psutil.virtual_memory().available)
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``: binary units, three significant digits."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def memory_needed(path: str | os.PathLike[str], extra_copies: int = 0) -> tuple[int, str] | None:
    """Bytes denoising one volume needs, from its header, and how they add up (``None``: unknown).

    The data as stored (shape x on-disk type: the reader's buffer) plus :data:`WORKING_COPIES` float32
    copies of the volume, plus ``extra_copies`` (the local-consistency guard's,
    :data:`lowdose_toolkit.infer.consistency.WORKING_COPIES`, when it runs).
    """
    from lowdose_toolkit.data.io import declared_volume

    declared = declared_volume(path)
    if declared is None:
        return None
    shape, dtype, stored = declared
    copy = 4 * shape[0] * shape[1] * shape[2]
    copies = WORKING_COPIES + extra_copies
    need = stored + copies * copy
    how = (f"{'x'.join(map(str, shape))} {dtype} voxels: {format_bytes(stored)} to read plus {copies} "
           f"float32 working copies of {format_bytes(copy)}")
    return need, how


def check_memory(path: str | os.PathLike[str], available: int | None = None, extra_copies: int = 0) -> None:
    """Raise :class:`DataError` with the numbers if ``path``'s volume needs more memory than is available.

    ``available`` defaults to :func:`available_memory` now; when the system does not say, nothing is checked.
    ``extra_copies``: see :func:`memory_needed`.
    """
    needed = memory_needed(path, extra_copies)
    free = available_memory() if available is None else available
    if needed is None or free is None or needed[0] <= free:
        return
    need, how = needed
    raise DataError(
        f"{Path(path)}: needs about {format_bytes(need)} of memory ({how}) but {format_bytes(free)} is available; "
        "free memory or use a machine with more (a shape this machine cannot hold may also be a damaged header: "
        "check the file)"
    )
