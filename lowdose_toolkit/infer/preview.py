"""PNG previews: coronal maximum-intensity projections (MIPs), the way PET is looked at.

Panels are laid side by side with a label above each, on one shared intensity window (0 to the
99.5th percentile of the last panel, the full-dose reference), in inverted grey (dark = active), as
nuclear-medicine viewers show MIPs. PNG is written with zlib; no imaging library is needed.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lowdose_toolkit.core.atomic import atomic_path

# A 3x5 bitmap font: each glyph is 5 rows of 3 bits.
_FONT = {
    "A": "010101111101101", "B": "110101110101110", "C": "011100100100011", "D": "110101101101110",
    "E": "111100110100111", "F": "111100110100100", "G": "011100101101011", "H": "101101111101101",
    "I": "111010010010111", "J": "001001001101010", "K": "101101110101101", "L": "100100100100111",
    "M": "101111111101101", "N": "110101101101101", "O": "010101101101010", "P": "110101110100100",
    "Q": "010101101110011", "R": "110101110101101", "S": "011100010001110", "T": "111010010010010",
    "U": "101101101101111", "V": "101101101101010", "W": "101101111111101", "X": "101101010101101",
    "Y": "101101010010010", "Z": "111001010100111", "0": "111101101101111", "1": "010110010010111",
    "2": "110001010100111", "3": "110001010001110", "4": "101101111001001", "5": "111100110001110",
    "6": "011100111101111", "7": "111001010010010", "8": "111101111101111", "9": "111101111001110",
    "-": "000000111000000", ".": "000000000000010", "_": "000000000000111", " ": "000000000000000",
    ":": "000010000010000", "+": "000010111010000", "=": "000111000111000", "%": "101001010100101",
    "/": "001001010100100", "(": "010100100100010", ")": "010001001001010",
}


def _text(label: str, scale: int = 2) -> np.ndarray:
    """Render ``label`` (upper-cased) as a uint8 mask of height 5*scale."""
    glyphs = [_FONT.get(ch, _FONT[" "]) for ch in label.upper()]
    width = max(1, len(glyphs) * 4 - 1)
    canvas = np.zeros((5, width), dtype=np.uint8)
    for i, glyph in enumerate(glyphs):
        bits = np.array([int(b) for b in glyph], dtype=np.uint8).reshape(5, 3)
        canvas[:, i * 4:i * 4 + 3] = bits
    return np.kron(canvas, np.ones((scale, scale), dtype=np.uint8))


def mip(volume: torch.Tensor, axis: int = 1) -> np.ndarray:
    """Coronal MIP of a ``[X, Y, Z]`` (RAS) volume: max over Y, returned as rows=Z (head up), cols=X."""
    projected = volume.detach().float().amax(dim=axis).cpu().numpy()  # [X, Z]
    return np.flipud(projected.T)


def ras_mip(volume: torch.Tensor, affine: np.ndarray) -> np.ndarray:
    """Coronal MIP of a ``[I, J, K]`` (or ``[1, I, J, K]``) volume in any voxel order, read through ``affine``.

    The voxel axes are permuted and flipped to RAS+ first (views, no copy), so the MIP is coronal with
    the head up whatever order the file stores (LPS DICOM, oblique or transposed NIfTI).
    """
    import nibabel as nib

    data = volume.detach().float().cpu().numpy()
    if data.ndim == 4:
        data = data[0]
    ras = nib.orientations.apply_orientation(data, nib.orientations.io_orientation(affine))
    return np.flipud(ras.max(axis=1).T)


def write_png(image: np.ndarray, path: Path) -> None:
    """Write a 2D uint8 array as an 8-bit greyscale PNG, atomically."""
    height, width = image.shape
    raw = b"".join(b"\x00" + image[row].astype(np.uint8).tobytes() for row in range(height))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)


def save_mip_png(panels: Sequence[tuple[str, torch.Tensor]], path: Path, title: str = "", upscale: int = 2) -> None:
    """Save labelled coronal MIPs of ``[X, Y, Z]`` volumes side by side as one PNG."""
    save_mips_png([(name, mip(vol)) for name, vol in panels], path, title, upscale)


def save_mips_png(panels: Sequence[tuple[str, np.ndarray]], path: Path, title: str = "", upscale: int = 2) -> None:
    """Save labelled 2D MIPs side by side as one PNG, on the last panel's intensity window."""
    mips = [m for _, m in panels]
    vmax = float(np.percentile(mips[-1], 99.5)) or float(mips[-1].max()) or 1.0
    pad = 6
    label_h = 5 * 2 + 2 * pad
    h = max(m.shape[0] for m in mips) * upscale
    tiles = []
    for (name, _), m in zip(panels, mips, strict=True):
        img = np.clip(m / vmax, 0, 1)
        img = np.kron(img, np.ones((upscale, upscale)))
        tile = np.full((h + label_h, img.shape[1] + 2 * pad), 255, dtype=np.uint8)
        tile[label_h:label_h + img.shape[0], pad:pad + img.shape[1]] = (255 * (1 - img)).astype(np.uint8)
        text = _text(name)[:, : tile.shape[1] - pad]
        tile[pad:pad + text.shape[0], pad:pad + text.shape[1]][text > 0] = 0
        tiles.append(tile)
    canvas = np.concatenate(tiles, axis=1)
    if title:
        text = _text(title)[:, : canvas.shape[1] - 2 * pad]
        header = np.full((text.shape[0] + 2 * pad, canvas.shape[1]), 255, dtype=np.uint8)
        header[pad:pad + text.shape[0], pad:pad + text.shape[1]][text > 0] = 0
        canvas = np.concatenate([header, canvas], axis=0)
    write_png(canvas, path)
