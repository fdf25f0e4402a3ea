"""Loading ``.pt`` files as data only: why ``torch.load(..., weights_only=True)`` refused a file, in one line.

Every ``torch.load`` in the toolkit passes ``weights_only=True`` (tests/test_checkpoint_safety.py
checks the source): the unpickler then builds tensors and plain containers only and refuses any
pickled class or function, so a crafted file cannot run code. That restriction is sound from
torch 2.6 on (CVE-2025-32434), hence ``torch>=2.6`` in pyproject.toml.
"""

from __future__ import annotations

import re

_GLOBAL_RE = re.compile(r"(?:unsupported GLOBAL|Unsupported global:?)\s*(?:GLOBAL\s*)?([\w.]+)", re.IGNORECASE)


def load_failure(exc: BaseException) -> str:
    """One line saying why ``torch.load(path, weights_only=True)`` failed, without torch's advice to retry
    with ``weights_only=False`` (which would run whatever code the file carries).

    Example:
        >>> exc = Exception("Weights only load failed. ... Trying to load unsupported GLOBAL "
        ...                 "posix.system whose module posix is blocked.")
        >>> load_failure(exc)[:47]
        'refused: it holds pickled code (posix.system), '
    """
    text = str(exc)
    if "weights only load failed" in text.lower():
        found = _GLOBAL_RE.search(text)
        what = f"pickled code ({found.group(1)})" if found else "pickled objects"
        return (f"refused: it holds {what}, not plain tensors and data; never load it with "
                "weights_only=False unless you trust its source")
    line = " ".join(text.split()) or type(exc).__name__
    line = line if len(line) <= 200 else line[:197] + "..."
    return f"{type(exc).__name__}: {line}"
