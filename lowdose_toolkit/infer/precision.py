"""One precision setting for inference: ``auto | fp32 | bf16 | fp16``, honoured on CPU and CUDA.

``auto`` picks bf16 where the device runs it natively (a CPU with AVX512-BF16 or AMX, a CUDA device of
compute capability 8.0 or later) and fp32 elsewhere. bf16 and fp16 are autocast (the network's
convolutions in that type, reductions and the output float32); ``none`` is read as ``fp32``.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from functools import lru_cache
from pathlib import Path

import torch

from lowdose_toolkit.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.split(":", 1)[-1].split())


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively (so ``auto`` picks it there)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})
    return False


def resolve_precision(name: str, device: torch.device, where: str = "precision") -> str:
    """``fp32``, ``bf16`` or ``fp16`` for ``name`` on ``device`` (``auto`` decided by the hardware)."""
    name = "fp32" if name == "none" else name
    if name not in PRECISIONS:
        raise UserError(f"{where}: {name!r} is unknown; use one of {', '.join(PRECISIONS)}")
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return name


def autocast(device: torch.device, precision: str) -> AbstractContextManager[object]:
    """The autocast context of a resolved precision on ``device`` (a no-op for fp32)."""
    if precision == "fp32" or precision == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def training_precision(name: str, device: torch.device, cuda_only: bool = False) -> str:
    """The precision a run trains and validates in: as :func:`resolve_precision` (``auto``: bf16 where native,
    CPUs included: the quickstart trained in bf16 over three seeds equals fp32 within 0.07 dB at every DRF,
    1.58x faster per step, docs/BENCHMARKS.md), except that the older ``train.amp`` (``cuda_only``)
    autocasts on CUDA only, as it did."""
    if device.type != "cuda" and cuda_only:
        return "fp32"
    return resolve_precision(name, device, "train.precision")
