"""Lost activity or spilled activity? A denoiser lowers the mean of lesions and hot organs (docs/RESULTS.md,
"Lesions", "Organs"); this tells whether that activity left the volume or moved next door. For a run's
validation or test subjects and the given DRFs, per region (the phantom's lesions pooled, liver, kidney,
myocardium, spleen): the bias of the region's total activity against the full dose's, in percent, in the region
itself and in the region dilated by 1, 2 and 3 voxels (its surroundings included), for the input and for the
run's output as ``ldt infer`` gives it (fitted strength and guard as the recipe says). A total that comes back
within the input's spread once the region is dilated is blurring (spill-out, a resolution loss); one that does
not is lost activity.

``--organ-guard=z:sigma_mm,...`` also applies, after the shipped output, a second guard pass at an organ's
scale whose noise yardstick is robust to a smooth bias (the spread of differences of the normalised local-mean
residual at 3 sigma apart, instead of the residual's own spread; infer/consistency.py's formula otherwise),
and prints its PSNR gain and region biases. Usage:

    python experiments/spill_check.py RUN_DIR [--split=val|test] [--drfs=50,100] [--organ-guard=3:24,2:24]
"""
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from lowdose_toolkit.core.checkpoint import load_checkpoint
from lowdose_toolkit.core.plugin_manager import get_registry
from lowdose_toolkit.data.datasets import pairs_dataset
from lowdose_toolkit.data.phantom import LABELS
from lowdose_toolkit.evaluation.classical import gaussian
from lowdose_toolkit.evaluation.metrics import psnr
from lowdose_toolkit.infer.consistency import BODY_THRESHOLD, FLOOR
from lowdose_toolkit.infer.predictor import Predictor

REGIONS = ("lesion", "liver", "kidney", "myocardium", "spleen")
SHELLS = (0, 1, 2, 3)


def organ_guard(low: torch.Tensor, pred: torch.Tensor, spacing, z: float, sigma_mm: float) -> torch.Tensor:
    sigma = [sigma_mm / float(v) for v in spacing]
    scale = gaussian(pred.clamp(min=0), sigma)
    body = scale > BODY_THRESHOLD
    scale = (scale + FLOOR).sqrt()
    t = gaussian(low - pred, sigma) / scale
    shift = max(1, round(3 * sigma_mm / float(spacing[0])))
    pair = body[:, shift:] & body[:, :-shift]
    spread = 1.4826 * float((t[:, shift:] - t[:, :-shift])[pair].abs().median()) / 2**0.5
    return pred + (t.abs() - z * spread).clamp(min=0) * t.sign() * scale


opts = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
run = Path(next(a for a in sys.argv[1:] if not a.startswith("--")))
ckpt = load_checkpoint(run / "checkpoints" / "best.pt")
torch.set_grad_enabled(False)
predictor, recipe = Predictor.from_checkpoint(ckpt, torch.device("cpu"), "auto")
drfs = [int(d) for d in opts.get("drfs", "50,100").split(",")]
guards = [tuple(float(v) for v in g.split(":")) for g in opts.get("organ-guard", "").split(",") if g]
source = get_registry().build("source", dict(recipe["data"]["source"]), "data.source",
                              context={"drfs": list(ckpt.drfs)})
split = opts.get("split", "val")
records = [r for r in source.records() if r.subject in set(ckpt.split[split])]
ds = pairs_dataset(records, drfs, recipe["data"]["normalization"])
ids = {name: k for k, name in LABELS.items()}
bias: dict[tuple, list[float]] = {}
gains: dict[tuple, list[float]] = {}
for i in range(len(ds)):
    s = ds[i]
    low, full, drf, spacing = s["low"].data.float(), s["full"].data.float(), int(s["drf"]), s["low"].spacing
    pred, _ = predictor.predict(low, spacing=spacing)
    images = {"input": low, "output": pred}
    for z, sigma_mm in guards:
        images[f"+organ guard {z:g}:{sigma_mm:g}mm"] = organ_guard(low, pred, spacing, z, sigma_mm)
    labels = np.asarray(nib.load(str(Path(s["full"].path).parent / "labels.nii.gz")).dataobj)
    ref = full[0].numpy()
    for name, image in images.items():
        gains.setdefault((name, drf), []).append(psnr(full[0], image[0]) - psnr(full[0], low[0]))
    for region in REGIONS:
        mask = labels == ids[region]
        if not mask.any():
            continue
        for shell in SHELLS:
            grown = ndimage.binary_dilation(mask, iterations=shell) if shell else mask
            for name, image in images.items():
                total = float(image[0].numpy()[grown].sum(dtype=np.float64))
                bias.setdefault((name, drf, region, shell), []).append(100 * (total / ref[grown].sum() - 1))
print(f"{run} · {split} subjects · total activity bias against the full dose (%), region / dilated by 1, 2, 3 "
      "voxels; mean over subjects")
print(f"{'image':<24}{'DRF':>4}{'gain dB':>8}  " + "  ".join(f"{r:>23}" for r in REGIONS))
for drf in drfs:
    for name in images:
        cells = ["/".join(f"{np.mean(bias[(name, drf, r, k)]):+.1f}" for k in SHELLS) for r in REGIONS]
        print(f"{name:<24}{drf:>4}{np.mean(gains[(name, drf)]):>+8.2f}  " + "  ".join(f"{c:>23}" for c in cells))
