"""A trained model on data it was never trained or selected on, and unlike it: new phantom subjects (another
seed) at the training geometry, and the same under shifts a real scanner brings — finer voxels, a more or
less sensitive scanner (counts per Bq), other units (kBq/mL), a post-filtered reconstruction. Prints, per
shift and DRF, the mean PSNR gain of the model's output over its input against the full dose (whole
volume, as the challenge scores) at full strength and at the strength fitted after training
(lowdose_toolkit/models/strength.py), the DRF the dose head names, its continuous dose level and the
strength applied (docs/RESULTS.md, "Data unlike the training data"); for a full-dose input (``full``, DRF 1)
the "gain" is the output's PSNR against that input (infinite: unchanged). Usage:

    python experiments/shift_check.py RUN_DIR [SHIFT ...]   (default: every shift; --subjects=N, default 2;
        --consistency=on|off: the local-consistency guard on or off, default: as the run's recipe says;
        --exported=FILE: predict with that `ldt export` file of the run's checkpoint instead)
"""
import sys
from pathlib import Path

import torch

from lowdose_toolkit.core.checkpoint import load_checkpoint
from lowdose_toolkit.core.plugin_manager import get_registry
from lowdose_toolkit.data.datasets import pairs_dataset
from lowdose_toolkit.data.normalize import fit_normalization
from lowdose_toolkit.evaluation.metrics import psnr
from lowdose_toolkit.infer.consistency import Consistency
from lowdose_toolkit.infer.predictor import Predictor

SEED = 1000  # subjects no run has seen (the phantom's runs use seed 0)
#: name -> (phantom source parameters, intensity factor applied to low and full)
SHIFTS: dict[str, tuple[dict, float]] = {
    "same": ({}, 1.0),
    "drf2": ({"drfs": [2]}, 1.0),  # the challenge's cleanest low dose, below the phantom recipes' DRFs
    "full": ({"drfs": [2], "full_as_input": True}, 1.0),  # a full-dose scan given as input: PSNR against itself
    "head": ({"crop_top": 32}, 1.0),  # the top 32 slices (19 cm: head and neck), as a brain scan's field of view
    "torso": ({"crop_middle": 64}, 1.0),  # 64 slices (38 cm) around the middle: one bed position
    "kBq/mL": ({}, 1e-3),
    "4mm": ({"shape": [240, 120, 120], "spacing_mm": [4, 4, 4]}, 1.0),
    "3mm": ({"shape": [320, 160, 160], "spacing_mm": [3, 3, 3]}, 1.0),
    "4x4x6mm": ({"shape": [160, 120, 120], "spacing_mm": [6, 4, 4]}, 1.0),  # finer in-plane than axially
    "6x6x3mm": ({"shape": [320, 80, 80], "spacing_mm": [3, 6, 6]}, 1.0),  # finer axially than in-plane
    "counts/4": ({"counts_per_bq": 8.0}, 1.0),
    "counts*4": ({"counts_per_bq": 128.0}, 1.0),
    "postfilter": ({"postfilter_fwhm_mm": 6.0}, 1.0),  # a 6 mm Gaussian post-filter on every reconstruction
}

args = [a for a in sys.argv[1:] if not a.startswith("--")]
subjects = int(next((a.split("=")[1] for a in sys.argv if a.startswith("--subjects=")), 2))
run = Path(args[0])
names = args[1:] or list(SHIFTS)
ckpt = load_checkpoint(run / "checkpoints" / "best.pt")
torch.set_grad_enabled(False)
predictor, recipe = Predictor.from_checkpoint(ckpt, torch.device("cpu"), "auto")
exported = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--exported=")), None)
if exported is not None:
    predictor = Predictor.from_exported(Path(exported), torch.device("cpu"), trust_torchscript=True)
guard = next((a.split("=")[1] for a in sys.argv if a.startswith("--consistency=")), None)
predictor.consistency = Consistency.override(predictor.consistency, None if guard is None else guard == "on")
drfs = list(ckpt.drfs)
for name in names:
    params, factor = SHIFTS[name]
    params = dict(params)
    levels = params.pop("drfs", drfs)
    full_as_input = params.pop("full_as_input", False)
    top, middle = params.pop("crop_top", None), params.pop("crop_middle", None)
    spec = {"name": "phantom", "subjects": subjects, "seed": SEED, **params}
    source = get_registry().build("source", spec, "data.source", context={"drfs": levels})
    ds = pairs_dataset(source.records(), levels, "none")
    rows: dict[int, list[list[float]]] = {}
    for i in range(len(ds)):
        s = ds[i]
        low, full = s["low"].data.float() * factor, s["full"].data.float() * factor
        if full_as_input:
            low = full
        if top or middle:  # a shorter field of view: axial slices are the last axis of [1, x, y, z]
            depth = low.shape[-1]
            lo, hi = (depth - top, depth) if top else ((depth - middle) // 2, (depth + middle) // 2)
            low, full = low[..., lo:hi].contiguous(), full[..., lo:hi].contiguous()
        norm = fit_normalization(low, ckpt.normalization.method, where=f"shift {name}",
                                 quantile=ckpt.normalization.quantile)
        base = 0.0 if full_as_input else psnr(full[0], low[0])  # a full-dose input: the output's PSNR against it
        row = []
        for fitted in (False, True):  # the model at full strength, then at its fitted strength (if any)
            pred, probs = predictor.predict(norm.apply(low), strength=fitted, spacing=s["low"].spacing)
            row.append(psnr(full[0], norm.invert(pred)[0]) - base)
        applied = predictor.applied
        row += [float(drfs[int(probs.argmax())]) if probs is not None else float("nan"),
                applied.get("dose_level") or float("nan"), applied.get("strength", 1.0)]
        rows.setdefault(1 if full_as_input else int(s["drf"]), []).append(row)
    shape = tuple(low.shape[1:])
    print(f"{run} · shift {name} ({params or 'training geometry'}, x{factor:g}) · {subjects} subjects, seed {SEED}, "
          f"volumes {shape}, guard {predictor.consistency.as_dict() if predictor.consistency else 'off'}")
    print("DRF  gain (dB): full strength  fitted | head's DRF  dose level  strength (per volume)")
    for drf, r in sorted(rows.items()):
        g1, g2 = (sum(x[i] for x in r) / len(r) for i in (0, 1))
        print(f"{drf:3d}   {g1:+19.2f}  {g2:+6.2f} | {[int(x[2]) for x in r]}  {[round(x[3], 1) for x in r]}  "
              f"{[round(x[4], 2) for x in r]}", flush=True)
