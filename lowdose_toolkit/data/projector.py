"""The 2D parallel-beam system matrix of the simulated scans (sparse, split into OSEM subsets)."""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import torch

from lowdose_toolkit.data.simulation_config import SimulationConfig

__all__ = ["Projector", "projector_for"]


class Projector:
    """2D parallel-beam system matrix of one slice geometry, split into OSEM subsets.

    Pixels inside the inscribed circle are the unknowns (``npix`` of them, in ``pixels`` order).
    Subset ``k`` holds views ``k, k + K, k + 2K, ...``; the rows of a sinogram are ordered subset by
    subset, so ``rows(k)`` is a contiguous block. ``forward`` / ``back`` act on ``[npix, B]`` /
    ``[rows, B]`` matrices, B = any number of slices (and dose levels).
    """

    def __init__(self, hw: tuple[int, int], pixel_mm: tuple[float, float], n_angles: int, subsets: int):
        h, w = hw
        sy, sx = pixel_mm
        self.hw, self.pixel_mm, self.n_angles, self.subsets = (h, w), (sy, sx), n_angles, subsets
        ys = (np.arange(h) - (h - 1) / 2) * sy
        xs = (np.arange(w) - (w - 1) / 2) * sx
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        radius = min(h * sy, w * sx) / 2
        inside = (yy**2 + xx**2) <= radius**2
        self.fov = torch.from_numpy(inside)
        self.pixels = torch.from_numpy(np.flatnonzero(inside))
        self.npix = int(inside.sum())
        self.bin_mm = min(sy, sx)
        self.n_bins = 2 * math.ceil(radius / self.bin_mm) + 1
        self.views_per_subset = n_angles // subsets
        self.rows_per_subset = self.views_per_subset * self.n_bins
        px, py = xx[inside], yy[inside]
        scale = sy * sx / self.bin_mm  # linear interpolation of a pixel's area onto bins
        self._fwd: list[torch.Tensor] = []
        self._back: list[torch.Tensor] = []
        cols = np.arange(self.npix)
        for k in range(subsets):
            r_all, c_all, v_all = [], [], []
            for j, a in enumerate(range(k, n_angles, subsets)):
                theta = math.pi * a / n_angles
                u = (px * math.cos(theta) + py * math.sin(theta)) / self.bin_mm + (self.n_bins - 1) / 2
                i0 = np.floor(u).astype(np.int64)
                f = u - i0
                for b, wgt in ((i0, 1.0 - f), (i0 + 1, f)):
                    ok = (b >= 0) & (b < self.n_bins) & (wgt > 0)
                    r_all.append(j * self.n_bins + b[ok])
                    c_all.append(cols[ok])
                    v_all.append(wgt[ok] * scale)
            rows = np.concatenate(r_all)
            cls = np.concatenate(c_all)
            vals = np.concatenate(v_all).astype(np.float32)
            self._fwd.append(_csr(rows, cls, vals, (self.rows_per_subset, self.npix)))
            self._back.append(_csr(cls, rows, vals, (self.npix, self.rows_per_subset)))

    @property
    def n_rows(self) -> int:
        """Sinogram rows (views x bins) of one slice."""
        return self.rows_per_subset * self.subsets

    def rows(self, k: int) -> slice:
        """Row block of subset ``k``."""
        return slice(k * self.rows_per_subset, (k + 1) * self.rows_per_subset)

    def forward(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Line integrals ``P x`` (of subset ``k``, or all rows): ``[npix, B] -> [rows, B]``."""
        if k is not None:
            return self._fwd[k] @ x
        return torch.cat([m @ x for m in self._fwd])

    def back(self, y: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Back-projection ``P^T y`` (of subset ``k``, or all rows): ``[rows, B] -> [npix, B]``."""
        if k is not None:
            return self._back[k] @ y
        out = self._back[0] @ y[self.rows(0)]
        for j in range(1, self.subsets):
            out += self._back[j] @ y[self.rows(j)]
        return out

    def to_columns(self, vol: torch.Tensor) -> torch.Tensor:
        """``[D, H, W]`` volume -> ``[npix, D]`` matrix of its field-of-view pixels."""
        d = vol.shape[0]
        return vol.reshape(d, -1)[:, self.pixels].T.contiguous()

    def to_volume(self, cols: torch.Tensor) -> torch.Tensor:
        """``[npix, D]`` -> ``[D, H, W]``, zero outside the field of view."""
        d = cols.shape[1]
        out = torch.zeros(d, self.hw[0] * self.hw[1], dtype=cols.dtype)
        out[:, self.pixels] = cols.T
        return out.reshape(d, *self.hw)

    def __repr__(self) -> str:
        return (
            f"Projector(hw={self.hw}, pixel_mm={self.pixel_mm}, npix={self.npix}, "
            f"views={self.n_angles}, bins={self.n_bins}, subsets={self.subsets})"
        )


def _csr(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    """torch CSR matrix from COO triplets (duplicates summed)."""
    order = np.lexsort((cols, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    crow = np.zeros(shape[0] + 1, np.int64)
    np.add.at(crow, rows + 1, 1)
    crow = np.cumsum(crow)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            torch.from_numpy(crow), torch.from_numpy(cols.astype(np.int64)), torch.from_numpy(vals),
            size=shape, check_invariants=True,
        )


@functools.lru_cache(maxsize=4)
def _projector(hw: tuple[int, int], pixel_mm: tuple[float, float], n_angles: int, subsets: int) -> Projector:
    return Projector(hw, pixel_mm, n_angles, subsets)


def projector_for(config: SimulationConfig) -> Projector:
    """The (cached) projector of a configuration's slice geometry."""
    _, h, w = config.shape
    return _projector((h, w), config.spacing_mm[1:], config.n_angles, config.subsets)
