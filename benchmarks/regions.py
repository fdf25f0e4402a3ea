"""Lesion and organ scoring (lowdose_toolkit/evaluation/lesions.py) on a whole-body-size volume: the bounding-box
reads it uses against scipy's labelled reductions (``ndimage.mean``/``maximum`` over the whole volume per call,
what it used before), the same rows from both. A phantom subject's label map and full-dose image are tiled to
360x360x673 (the challenge's whole body); two "methods" (the image x 0.98 and x 1.03) are scored against it, as
``ldt evaluate`` scores the input and a prediction. Run nothing else meanwhile (it times). Usage:

    python benchmarks/regions.py [PHANTOM_SUBJECT_DIR]   (default: the first cached phantom subject)
"""
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from lowdose_toolkit.data.phantom import LABELS
from lowdose_toolkit.evaluation.lesions import PHANTOM_ORGANS, label_components, lesion_rows, organ_rows

SHAPE = (360, 360, 673)


def tile(volume: np.ndarray) -> np.ndarray:
    reps = [-(-n // s) for n, s in zip(SHAPE, volume.shape, strict=True)]
    return np.tile(volume, reps)[: SHAPE[0], : SHAPE[1], : SHAPE[2]].copy()


def labelled(ref: np.ndarray, images: dict, regions: np.ndarray) -> list[tuple]:
    """The replaced path: scipy's reductions over the whole volume, per image."""
    index = np.arange(1, int(regions.max()) + 1)
    out = [tuple(ndimage.mean(ref, regions, index)) + tuple(ndimage.maximum(ref, regions, index))]
    for image in images.values():
        out.append(tuple(ndimage.mean(image, regions, index)) + tuple(ndimage.maximum(image, regions, index)))
    return out


cached = sorted(Path.home().glob(".cache/lowdose-toolkit/phantom/*/phantom_000"))
folder = Path(sys.argv[1]) if len(sys.argv) > 1 else cached[0]
labels = tile(np.asarray(nib.load(str(folder / "labels.nii.gz")).dataobj))
ref = tile(np.asarray(nib.load(str(folder / "full.nii.gz")).dataobj, np.float32))
images = {"a": ref * 0.98, "b": ref * 1.03}
ids = {name: k for k, name in LABELS.items()}
lesions, n = label_components(labels == ids["lesion"])
organs = np.zeros(labels.shape, np.uint8)
for k, name in enumerate(PHANTOM_ORGANS, start=1):
    organs[labels == ids[name]] = k
print(f"{folder}: tiled to {SHAPE}, {n} lesions, {len(PHANTOM_ORGANS)} organs, 2 images")
times = {}
paths = {"bounding boxes (ldt)": lambda: lesion_rows(ref, images, lesions, 1.0)
         + organ_rows(ref, images, organs, list(PHANTOM_ORGANS), 1.0),
         "scipy labelled reductions": lambda: labelled(ref, images, lesions) + labelled(ref, images, organs)}
for name, run in paths.items():
    t0 = time.perf_counter()
    run()
    times[name] = time.perf_counter() - t0
    print(f"{name:<28} {times[name]:6.2f} s")
rows = [r for r in lesion_rows(ref, images, lesions, 1.0) if r["method"] == "a"]
means = ndimage.mean(images["a"], lesions, np.arange(1, n + 1))
maxes = ndimage.maximum(images["a"], lesions, np.arange(1, n + 1))
same = all(np.isclose(r["mean"], means[r["lesion"] - 1], rtol=1e-5) and r["max"] == maxes[r["lesion"] - 1]
           for r in rows)
print(f"the same lesion rows: {same}; ratio {times['scipy labelled reductions'] / times['bounding boxes (ldt)']:.1f}x")
