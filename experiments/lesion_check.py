"""Lesion bias of a trained model and of the local-consistency guard, beside the whole-volume PSNR gain.

For a run's validation or test subjects (``--split=val|test``) or new phantom subjects (``--seed=S
--subjects=N [--texture=T]``), per DRF: the PSNR gain of the output over its input against the full dose, and
the lesions' mean SUVmean and SUVmax bias (signed and absolute, percent of the full dose's value;
lowdose_toolkit/evaluation/lesions.py), then each organ's SUVmean bias, of the input, of the model's output
without the guard, and of the output under each guard setting in ``--guards=z:sigma_mm,...``
(lowdose_toolkit/infer/consistency.py; default 3:3, the guided recipes'). Usage:

    python experiments/lesion_check.py RUN_DIR [--split=val|test | --seed=S --subjects=N --texture=T
        --shape=D,H,W --spacing_mm=Z,Y,X] [--counts-model=listmode|independent] [--guards=3:3,...]
"""
import sys
from pathlib import Path

import numpy as np
import torch

from lowdose_toolkit.core.checkpoint import load_checkpoint
from lowdose_toolkit.core.plugin_manager import get_registry
from lowdose_toolkit.data.datasets import pairs_dataset
from lowdose_toolkit.evaluation.lesions import LesionMasks, organ_markdown, organ_summary, summarize, volume_cases
from lowdose_toolkit.evaluation.metrics import psnr
from lowdose_toolkit.infer.consistency import Consistency
from lowdose_toolkit.infer.predictor import Predictor

opts = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
run = Path(next(a for a in sys.argv[1:] if not a.startswith("--")))
ckpt = load_checkpoint(run / "checkpoints" / "best.pt")
torch.set_grad_enabled(False)
predictor, recipe = Predictor.from_checkpoint(ckpt, torch.device("cpu"), "auto")
drfs = list(ckpt.drfs)
if "seed" in opts:
    spec = {**recipe["data"]["source"], "subjects": int(opts.get("subjects", 4)), "seed": int(opts["seed"])}
    if "texture" in opts:
        spec["texture"] = float(opts["texture"])
    if "counts-model" in opts:
        spec["counts_model"] = opts["counts-model"]
    for key in ("shape", "spacing_mm"):  # e.g. --shape=320,160,160 --spacing_mm=3,3,3 (finer voxels)
        if key in opts:
            spec[key] = [float(v) if key == "spacing_mm" else int(v) for v in opts[key].split(",")]
    records = get_registry().build("source", spec, "data.source", context={"drfs": drfs}).records()
    where = f"new subjects {spec}"
else:
    split = opts.get("split", "val")
    spec = dict(recipe["data"]["source"])
    if "counts-model" in opts:
        spec["counts_model"] = opts["counts-model"]
    source = get_registry().build("source", spec, "data.source", context={"drfs": drfs})
    records = [r for r in source.records() if r.subject in set(ckpt.split[split])]
    where = f"{split} subjects {[r.subject for r in records]}"
guards = [(float(z), float(s)) for z, s in (g.split(":") for g in opts.get("guards", "3:3").split(","))]
ds = pairs_dataset(records, drfs, recipe["data"]["normalization"])
masks = LesionMasks("phantom")
gains: dict[tuple[str, int], list[float]] = {}
lesions: list[dict] = []
for i in range(len(ds)):
    s = ds[i]
    low, full = s["low"].data.float(), s["full"].data.float()
    drf = int(s["drf"])
    predictor.consistency = None
    spacing = s["low"].spacing
    pred, _ = predictor.predict(low, spacing=spacing)
    images = {"input": low, "model": pred}
    for z, sigma in guards:
        images[f"guard z={z:g} σ={sigma:g}mm"] = Consistency(z=z, sigma_mm=sigma).apply(low, pred, spacing)
    base = psnr(full[0], low[0])
    for name, image in images.items():
        gains.setdefault((name, drf), []).append(psnr(full[0], image[0]) - base)
    lesions += volume_cases(masks, s["subject_id"], drf, s["full"].path, full[0].numpy(),
                            {k: v[0].numpy() for k, v in images.items()}, s["full"].affine)
summary = {(e["method"], e["drf"]): e for e in summarize(lesions)}
print(f"{run} · {where}")
print(f"{'method':<22} {'DRF':>4} {'gain dB':>8} {'lesions':>7} {'SUVmean %':>9} {'|mean| %':>8} {'SUVmax %':>9} "
      f"{'|max| %':>8}")
for (name, drf), values in sorted(gains.items(), key=lambda kv: (kv[0][1], list(images).index(kv[0][0]))):
    e = summary.get((name, drf))
    tail = (f"{e['lesions']:>7} {e['mean_bias_pct']:>+9.1f} {e['abs_mean_bias_pct']:>8.1f} {e['max_bias_pct']:>+9.1f} "
            f"{e['abs_max_bias_pct']:>8.1f}") if e else ""
    print(f"{name:<22} {drf:>4} {np.mean(values):>+8.2f} {tail}")
print("\norgans: SUVmean bias against the full dose (%, mean ± SD over subjects)\n")
print(organ_markdown(organ_summary(lesions)))
