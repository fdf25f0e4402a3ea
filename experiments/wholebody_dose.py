"""A whole-body-size volume through `ldt infer`'s path: the dose head per window against once on the whole
volume (``Predictor.dose_estimate``). Each test subject's low-dose and full-dose volumes (normalised) are
tiled to 360x360x673 (the challenge's shape; the same tiling for both, so the full dose stays the
reference) and denoised with the recipe's window and the default precision, as `ldt infer` would. Prints
per (subject, DRF) the predicted DRF, the PSNR gain over the input and the seconds, and the cost of the
whole-volume estimate alone. Run nothing else meanwhile (it times). Usage:

    python experiments/wholebody_dose.py RUN_DIR [--subjects 1] [--drfs 4,20,100]
"""
import argparse
import time
from pathlib import Path

import torch

from lowdose_toolkit.core.checkpoint import load_checkpoint
from lowdose_toolkit.evaluation.metrics import psnr
from lowdose_toolkit.evaluation.subjects import subject_pairs
from lowdose_toolkit.infer.predictor import Predictor

SHAPE = (360, 360, 673)


def tile(volume: torch.Tensor) -> torch.Tensor:
    """``[1, X, Y, Z]`` repeated along each axis and cropped to :data:`SHAPE`."""
    reps = [-(-n // s) for n, s in zip(SHAPE, volume.shape[1:], strict=True)]
    return volume.repeat(1, *reps)[:, : SHAPE[0], : SHAPE[1], : SHAPE[2]].contiguous()


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("run", type=Path)
parser.add_argument("--subjects", type=int, default=1)
parser.add_argument("--drfs", default="4,20,100")
args = parser.parse_args()
ckpt = load_checkpoint(args.run / "checkpoints" / "best.pt")
predictor, recipe = Predictor.from_checkpoint(ckpt, torch.device("cpu"), "auto")
assert predictor.model is not None
drfs = [int(d) for d in args.drfs.split(",")]
ds = subject_pairs(recipe, ckpt.split["test"][: args.subjects], drfs)
torch.set_grad_enabled(False)
print(f"{args.run}: window {predictor.window['patch_size']}, {predictor.precision}, volumes {SHAPE}")
print("subject       DRF | per window: predicted  gain    s | whole volume: predicted  gain    s | estimate s")
for i in range(len(ds)):
    s = ds[i]
    low, full, drf = tile(s["low"].data.float()), tile(s["full"].data.float()), int(s["drf"])
    base = psnr(full[0], low[0])
    row = []
    for mode in ("window", "volume"):
        predictor.dose_estimate = mode
        t0 = time.perf_counter()
        pred, probs = predictor.predict(low, spacing=s["low"].spacing)
        seconds = time.perf_counter() - t0
        row += [predictor.drfs[int(probs.argmax())], psnr(full[0], pred[0]) - base, seconds]
    t0 = time.perf_counter()
    predictor.model.volume_dose(low[None])
    row.append(time.perf_counter() - t0)
    print(f"{s['subject_id']:12s} {drf:4d} | {row[0]:20d} {row[1]:+5.2f} {row[2]:4.0f} | "
          f"{row[3]:22d} {row[4]:+5.2f} {row[5]:4.0f} | {row[6]:10.1f}", flush=True)
