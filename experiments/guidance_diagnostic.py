"""Where a guided run's gain comes from, on its held-out subjects (docs/RESULTS.md, guidance reading).

For every (subject, DRF) volume of a split: the dose head's class probabilities, and per DRF the PSNR
gain over the input of the model conditioned on its head (what `ldt infer` does), conditioned on the
true DRF (an oracle), and of ML-Net's coarse output alone; then, for a guided model, the gain of every
volume conditioned on every DRF code (rows: true DRF, columns: the code), which shows whether the code
of the true DRF is the one that serves the image best (docs/RESULTS.md, "The DRF code"). Usage:

    python experiments/guidance_diagnostic.py RUN_DIR [test|val|train] [best|last]
"""
import sys
from pathlib import Path

import numpy as np
import torch

from lowdose_toolkit.core.checkpoint import load_checkpoint
from lowdose_toolkit.evaluation.metrics import compute_all
from lowdose_toolkit.evaluation.subjects import subject_pairs
from lowdose_toolkit.infer.predictor import Predictor

run = Path(sys.argv[1])
which = sys.argv[2] if len(sys.argv) > 2 else "test"
ck = sys.argv[3] if len(sys.argv) > 3 else "best"
ckpt = load_checkpoint(run / "checkpoints" / f"{ck}.pt")
predictor, recipe = Predictor.from_checkpoint(ckpt, torch.device("cpu"), "fp32")
model = predictor.model
drfs = list(ckpt.drfs)
ds = subject_pairs(recipe, ckpt.split[which], drfs)
res: dict[int, list] = {}
codes: dict[int, list] = {}
with torch.no_grad():
    for i in range(len(ds)):
        s = ds[i]
        low, full, d = s["low"].data.float(), s["full"].data.float(), int(s["drf"])
        ph, probs = predictor.predict(low, spacing=s["low"].spacing)
        row = [compute_all(full[0], low[0])["psnr"], compute_all(full[0], ph[0])["psnr"]]
        if model.guidance is not None:
            po, _ = predictor.predict(low, drf_class=drfs.index(d), spacing=s["low"].spacing)
            row.append(compute_all(full[0], po[0])["psnr"])
            coded = [predictor.predict(low, drf_class=k, spacing=s["low"].spacing)[0][0] for k in range(len(drfs))]
            codes.setdefault(d, []).append([compute_all(full[0], c)["psnr"] - row[0] for c in coded])
        if model.refiner is not None:
            pc, _ = predictor.predict(low, use_refiner=False)
            row.append(compute_all(full[0], pc[0])["psnr"])
        res.setdefault(d, []).append(row)
        print(s["subject_id"], d, "probs", None if probs is None else [round(float(p), 2) for p in probs], flush=True)
print("DRF | gain head-cond | gain oracle | gain coarse(head)")
for d, rows in sorted(res.items()):
    r = np.array(rows)
    g = r[:, 1:] - r[:, :1]
    print(d, " ".join(f"{x:+.2f}" for x in g.mean(0)))
if codes:
    print("gain by DRF code: true DRF \\ conditioned on", drfs)
    for d, rows in sorted(codes.items()):
        print(d, " ".join(f"{x:+.2f}" for x in np.array(rows).mean(0)))
