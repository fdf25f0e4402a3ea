"""Another phantom: the same bodies with heterogeneous uptake. Real organs are not uniform (the embedded
phantom's are, docs/DATA.md), so a model trained on it may take true texture for noise. Each new subject
(seed 1000, never trained, validated or tested on) gets its activity multiplied by ``exp(sigma * G)``,
``G`` a smooth Gaussian random field of unit variance (correlation FWHM ``--fwhm`` mm), before the same
count-based simulation; prints per DRF the model's PSNR gain over its input against the full dose, at full
and at fitted strength, and the dose level the head reads (docs/RESULTS.md, "Data unlike the training
data"). Usage:

    python experiments/texture_check.py RUN_DIR [SIGMA ...]   (default 0.1 0.2; --fwhm=15, --subjects=2,
        --consistency=on|off: the local-consistency guard on or off, default: as the run's recipe says)
"""
import sys
from pathlib import Path

import numpy as np
import torch

from lowdose_toolkit.core.checkpoint import load_checkpoint
from lowdose_toolkit.data.normalize import fit_normalization
from lowdose_toolkit.data.phantom import add_texture, make_phantom
from lowdose_toolkit.data.scans import simulate_scans
from lowdose_toolkit.data.simulation_config import SimulationConfig
from lowdose_toolkit.evaluation.metrics import psnr
from lowdose_toolkit.infer.consistency import Consistency
from lowdose_toolkit.infer.predictor import Predictor

SEED = 1000
options = dict(a[2:].split("=") for a in sys.argv[1:] if a.startswith("--"))
args = [a for a in sys.argv[1:] if not a.startswith("--")]
fwhm, subjects = float(options.get("fwhm", 15)), int(options.get("subjects", 2))
run = Path(args[0])
sigmas = [float(s) for s in args[1:]] or [0.1, 0.2]
ckpt = load_checkpoint(run / "checkpoints" / "best.pt")
torch.set_grad_enabled(False)
predictor, recipe = Predictor.from_checkpoint(ckpt, torch.device("cpu"), "auto")
guard = options.get("consistency")
predictor.consistency = Consistency.override(predictor.consistency, None if guard is None else guard == "on")
drfs = list(ckpt.drfs)
config = SimulationConfig()
for sigma in sigmas:
    rows: dict[int, list[list[float]]] = {}
    for i in range(subjects):
        ss_phantom, ss_noise, ss_texture = np.random.SeedSequence([SEED, i]).spawn(3)
        ph = make_phantom(config.shape, config.spacing_mm, ss_phantom, config.supersample)
        activity = add_texture(ph.activity, sigma, fwhm, config.spacing_mm, ss_texture)  # one fixed spread
        images = simulate_scans(activity, ph.mu, drfs, config, ss_noise)
        full = images["full"][None]
        for drf in drfs:
            low = images[drf][None]
            norm = fit_normalization(low, ckpt.normalization.method, quantile=ckpt.normalization.quantile)
            base = psnr(full[0], low[0])
            row = []
            for fitted in (False, True):  # at full strength, then at the fitted strength (if any)
                pred, _ = predictor.predict(norm.apply(low), strength=fitted, spacing=config.spacing_mm)
                row.append(psnr(full[0], norm.invert(pred)[0]) - base)
            row += [predictor.applied.get("dose_level") or float("nan"), predictor.applied.get("strength", 1.0)]
            rows.setdefault(drf, []).append(row)
    print(f"{run} · texture sigma {sigma:g} (FWHM {fwhm:g} mm) · {subjects} subjects, seed {SEED}, guard "
          f"{predictor.consistency.as_dict() if predictor.consistency else 'off'}")
    print("DRF  gain (dB): full strength  fitted | dose level  strength (per volume)")
    for drf, r in sorted(rows.items()):
        g1, g2 = (sum(x[i] for x in r) / len(r) for i in (0, 1))
        print(f"{drf:3d}   {g1:+19.2f}  {g2:+6.2f} | {[round(x[2], 1) for x in r]}  {[round(x[3], 2) for x in r]}",
              flush=True)
