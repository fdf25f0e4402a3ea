"""A run's fitted DRF-code map (``fit_codes``, code_fit.json) against the identity, on the validation
subjects the fit did not use (a run validates on ``eval.val_subjects`` of its validation split; the rest
are held out from training, selection and the fit; the test split is never touched). Usage:

    python experiments/code_map_check.py RUN_DIR
"""
import json
import sys
from pathlib import Path

import torch

from lowdose_toolkit.core.checkpoint import load_checkpoint
from lowdose_toolkit.evaluation.metrics import psnr
from lowdose_toolkit.evaluation.subjects import subject_pairs
from lowdose_toolkit.infer.predictor import Predictor

run = Path(sys.argv[1])
fit = json.loads((run / "code_fit.json").read_text())
ckpt = load_checkpoint(run / "checkpoints" / "best.pt")
held_out = [s for s in ckpt.split["val"] if s not in fit["subjects"]]
print(f"map fitted on {fit['subjects']}: {fit['code_of']}; checked on {held_out}")
if not held_out:
    sys.exit("every validation subject was used by the fit: nothing held out")
predictor, recipe = Predictor.from_checkpoint(ckpt, torch.device("cpu"), "fp32")
guidance = predictor.model.guidance
fitted = guidance.code_map.clone()
ds = subject_pairs(recipe, held_out, ckpt.drfs)
rows: dict[int, list[tuple[float, float]]] = {}
with torch.no_grad():
    for i in range(len(ds)):
        s = ds[i]
        low, full = s["low"].data.float(), s["full"].data.float()
        base = psnr(full[0], low[0])
        guidance.reset_code_map()
        identity = psnr(full[0], predictor.predict(low, spacing=s["low"].spacing)[0][0]) - base
        guidance.code_map.copy_(fitted)
        mapped = psnr(full[0], predictor.predict(low, spacing=s["low"].spacing)[0][0]) - base
        rows.setdefault(int(s["drf"]), []).append((identity, mapped))
for drf, r in sorted(rows.items()):
    ident, mapped = torch.tensor(r).mean(0).tolist()
    print(f"DRF {drf:3d}: identity {ident:+.2f}  fitted map {mapped:+.2f}  ({mapped - ident:+.2f})")
