"""A whole-body-size NIfTI data set for `benchmarks/data.py`: phantom subjects tiled to 360x360x673.

The challenge's volumes are 360x360x673 float32 (349 MB each, uncompressed); the embedded phantom's are
80x80x160. Each subject here is one phantom subject (full dose and the chosen DRFs) repeated along every
axis, cropped to the whole-body shape and given 20 % multiplicative noise (seeded), which breaks the
tiles' repetition so that gzip compresses it as a noisy scan (~240 MiB, seconds to read); written as
``.nii.gz`` in the ``nifti`` source's layout with a ``manifest.csv``. Mind the disk: ~240 MiB per
volume here and 349 MB more per volume in its cache::

    python benchmarks/wholebody_data.py /tmp/wb --subjects 2 --drfs 4,20,100
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from lowdose_toolkit.core.plugin_manager import get_registry
from lowdose_toolkit.data.io import read_nifti
from lowdose_toolkit.data.manifest import write_manifest
from lowdose_toolkit.data.naming import dose_filename
from lowdose_toolkit.records import FULL, SubjectRecord

SHAPE = (360, 360, 673)
SPACING_MM = (1.667, 1.667, 2.886)
PHANTOM_DRFS = [4, 10, 20, 50, 100]  # the recipes' DRFs: the phantom cache they made is reused
NOISE = 0.2


def tile(volume: np.ndarray, shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """``volume`` repeated along each axis, cropped to ``shape``, with noise (float32, Fortran order as NIfTI)."""
    reps = [-(-n // s) for n, s in zip(shape, volume.shape, strict=True)]
    out = np.asfortranarray(np.tile(volume, reps)[: shape[0], : shape[1], : shape[2]], dtype=np.float32)
    out *= 1 + np.float32(NOISE) * rng.standard_normal(shape, dtype=np.float32)
    return np.maximum(out, 0, out=out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--subjects", type=int, default=2)
    parser.add_argument("--drfs", default="4,20,100")
    parser.add_argument("--shape", default=",".join(map(str, SHAPE)))
    args = parser.parse_args()
    drfs = [int(d) for d in args.drfs.split(",")]
    shape = tuple(int(s) for s in args.shape.split(","))
    if not set(drfs) <= set(PHANTOM_DRFS):
        raise SystemExit(f"--drfs {args.drfs}: choose among {PHANTOM_DRFS}")
    phantom = get_registry().build("source", {"name": "phantom"}, "data.source",
                                   context={"drfs": PHANTOM_DRFS}).records()
    if args.subjects > len(phantom):
        raise SystemExit(f"--subjects {args.subjects}: the phantom has {len(phantom)} subjects")
    affine = np.diag([*SPACING_MM, 1.0])
    records = []
    t0 = time.perf_counter()
    for n, record in enumerate(phantom[: args.subjects]):
        folder = args.out / record.subject
        folder.mkdir(parents=True, exist_ok=True)
        paths = {}
        for k, (dose, source) in enumerate([(FULL, record.full), *((d, record.low[d]) for d in drfs)]):
            volume = tile(read_nifti(source)[0][0].numpy(), shape, np.random.default_rng([n, k]))
            paths[dose] = folder / dose_filename(dose)
            nib.save(nib.Nifti1Image(volume, affine), paths[dose])
            print(f"{paths[dose]}  {paths[dose].stat().st_size / 2**20:.0f} MiB  ({time.perf_counter() - t0:.0f} s)")
        records.append(SubjectRecord(record.subject, paths[FULL], {d: paths[d] for d in drfs}, record.suv_factor))
    write_manifest(records, args.out / "manifest.csv")
    print(f"wrote {args.out / 'manifest.csv'}: {len(records)} subjects x (full + {len(drfs)} DRFs) of {shape}")


if __name__ == "__main__":
    main()
