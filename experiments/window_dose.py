"""Whole volumes larger than the sliding window: a guided model conditioned on its dose head per window
against on the head's estimate for the whole volume (``Predictor.dose_estimate``), and on the true DRF
(an oracle), on a split's subjects with windows smaller than the volume (docs/RESULTS.md, "Windows smaller
than the body"). Prints, per window size and DRF, the mean PSNR gain over the input and the
share of volumes (whole-volume estimate) or windows (per-window estimate, their mean probability of the
true DRF) the head names right. Usage:

    python experiments/window_dose.py RUN_DIR [val|test] [PATCH ...]   (default: test 32 48)
"""
import sys
from pathlib import Path

import torch

from lowdose_toolkit.core.checkpoint import load_checkpoint
from lowdose_toolkit.evaluation.metrics import psnr
from lowdose_toolkit.evaluation.subjects import subject_pairs
from lowdose_toolkit.infer.predictor import Predictor

run = Path(sys.argv[1])
which = sys.argv[2] if len(sys.argv) > 2 else "test"
patches = [int(p) for p in sys.argv[3:]] or [32, 48]
ckpt = load_checkpoint(run / "checkpoints" / "best.pt")
torch.set_grad_enabled(False)
for patch in patches:
    predictor, recipe = Predictor.from_checkpoint(ckpt, torch.device("cpu"), "fp32", patch_size=patch,
                                                  overlap=patch // 4)
    if not predictor.whole_volume_dose:
        sys.exit(f"{run}: the dose head has no whole-volume estimate (volume_logits); nothing to compare")
    ds = subject_pairs(recipe, ckpt.split[which], ckpt.drfs)
    rows: dict[int, list[list[float]]] = {}
    for i in range(len(ds)):
        s = ds[i]
        low, full, cls = s["low"].data.float(), s["full"].data.float(), int(s["drf_class"])
        base = psnr(full[0], low[0])
        predictor.dose_estimate = "window"
        by_window, window_probs = predictor.predict(low, spacing=s["low"].spacing)
        predictor.dose_estimate = "volume"
        by_volume, volume_probs = predictor.predict(low, spacing=s["low"].spacing)
        oracle, _ = predictor.predict(low, drf_class=cls, spacing=s["low"].spacing)
        rows.setdefault(int(s["drf"]), []).append([
            psnr(full[0], by_window[0]) - base, psnr(full[0], by_volume[0]) - base, psnr(full[0], oracle[0]) - base,
            float(window_probs[cls]), float(int(volume_probs.argmax()) == cls)])
    print(f"{run} · {which} · windows {patch}^3 (overlap {patch // 4}) on volumes {tuple(low.shape[1:])}")
    print("DRF  gain: per window  whole volume  oracle | per-window p(true)  whole-volume correct")
    for drf, r in sorted(rows.items()):
        w, v, o, p, c = torch.tensor(r).mean(0).tolist()
        print(f"{drf:3d}   {w:+12.2f}  {v:+12.2f}  {o:+6.2f} | {p:18.2f}  {c:20.0%}", flush=True)
