"""OSEM reconstruction of the simulated scans, and the single-thread block the simulation runs in."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from lowdose_toolkit.data.projector import Projector

__all__ = ["osem"]


def osem(
    y: torch.Tensor,
    af: torch.Tensor,
    scale: float,
    background: torch.Tensor,
    proj: Projector,
    iterations: int,
    sens: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """OSEM for ``ybar = scale * af * P x + background``, all columns (slices) at once.

    Args:
        y: Measured prompts ``[rows, B]`` (subset-ordered rows).
        af: Attenuation factors ``[rows, B]``.
        scale: Counts per unit of ``P x`` (the dose level's ``c``); the image comes out in the units
            of ``x`` (Bq/mL) whatever the dose.
        background: Expected scatter + randoms ``[rows, B]``, > 0.
        proj: The projector.
        iterations: Full passes over the subsets.
        sens: Precomputed ``P_k^T af_k`` per subset (optional; computed otherwise).

    Returns:
        ``[npix, B]`` image columns.
    """
    with _single_thread():
        return _osem(y, af, scale, background, proj, iterations, sens)


def _osem(
    y: torch.Tensor,
    af: torch.Tensor,
    scale: float,
    background: torch.Tensor,
    proj: Projector,
    iterations: int,
    sens: list[torch.Tensor] | None,
) -> torch.Tensor:
    if sens is None:
        sens = [proj.back(af[proj.rows(k)], k) for k in range(proj.subsets)]
    total_sens = sum(s.sum(0) for s in sens) * scale
    excess = (y.sum(0) - background.sum(0)).clamp_min(1e-3 * y.sum(0).clamp_min(1.0))
    x = (excess / total_sens).expand(proj.npix, -1).contiguous()
    inv_sens = [1.0 / (s * scale).clamp_min(1e-12) for s in sens]
    a = [af[proj.rows(k)] * scale for k in range(proj.subsets)]
    ay = [ak * y[proj.rows(k)] for k, ak in enumerate(a)]
    bg = [background[proj.rows(k)] for k in range(proj.subsets)]
    for _ in range(iterations):
        for k in range(proj.subsets):
            q = torch.addcmul(bg[k], a[k], proj.forward(x, k))  # expected prompts
            ratio = torch.div(ay[k], q, out=q)
            x = proj.back(ratio, k).mul_(inv_sens[k]).mul_(x)
    return x


@contextmanager
def _single_thread() -> Iterator[None]:
    """Run torch on one thread inside the block, restoring the thread count after.

    The many small OSEM operations gain little from a second thread, and OpenMP spin-waiting makes
    them several times slower when other processes share the cores (measured 3 s vs 19 s a subject).
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
