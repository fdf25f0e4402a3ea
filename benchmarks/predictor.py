"""Whole-volume inference of a trained run: ``ldt``'s Predictor against MONAI as a user writes it.

On the run's held-out test volumes (every DRF), in one process, each method warmed up and then timed
``--repeats`` times per volume (median of the per-volume sums reported):

* ``monai fp32``: the checkpoint's model in eval mode through ``monai.inferers.sliding_window_inference``
  (same window, overlap and batch; gaussian blending), as a researcher writes it;
* ``monai bf16``: the same under ``torch.autocast`` bf16 (what a careful user adds);
* ``ldt <setting>``: ``Predictor.from_checkpoint`` with each precision / BatchNorm folding /
  channels_last combination asked for (default: the shipped one, ``auto`` precision), ``/compile``
  appended for ``torch.compile`` (``ldt infer --compile``; compiled during the warm-up).

Printed: seconds per pass over the test set, speed-up against both MONAI rows, and the PSNR against
the full dose per DRF for every method (the speed must not cost image quality: target |ΔPSNR| ≤ 0.05 dB
against MONAI fp32). MONAI is a benchmark-only dependency (``pip install --no-deps monai``).

    python benchmarks/predictor.py runs/quickstart-... [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowdose_toolkit.core.checkpoint import load_checkpoint  # noqa: E402
from lowdose_toolkit.core.device import resolve_device  # noqa: E402
from lowdose_toolkit.evaluation.metrics import compute_all  # noqa: E402
from lowdose_toolkit.infer.predictor import Predictor, model_from_checkpoint  # noqa: E402


def test_volumes(run: Path, ckpt) -> list[tuple[int, torch.Tensor, torch.Tensor]]:  # noqa: ANN001
    from lowdose_toolkit.core.plugin_manager import get_registry
    from lowdose_toolkit.core.recipe import resolve_recipe
    from lowdose_toolkit.evaluation.subjects import subject_pairs

    recipe = resolve_recipe(ckpt.recipe, get_registry(), "checkpoint recipe")
    ds = subject_pairs(recipe, ckpt.split["test"], ckpt.drfs)
    return [(int(ds[i]["drf"]), ds[i]["low"].data.float(), ds[i]["full"].data.float()) for i in range(len(ds))]


def monai_method(model: torch.nn.Module, window: dict, device: torch.device, bf16: bool) -> Callable:
    from monai.inferers import sliding_window_inference

    patch = window["patch_size"]
    roi = (patch,) * 3 if isinstance(patch, int) else tuple(patch)
    overlap = window["overlap"]
    fraction = overlap if isinstance(overlap, float) else overlap / min(roi)

    def run(low: torch.Tensor) -> torch.Tensor:
        cast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with torch.inference_mode(), cast:
            out = sliding_window_inference(low[None].to(device), roi_size=roi, sw_batch_size=window["batch_size"],
                                           predictor=lambda x: model.predict(x), overlap=fraction,
                                           mode="gaussian")
        return out[0].float().cpu()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--settings", nargs="*", default=["auto/fold/cl", "fp32/fold/cl", "bf16/nofold/cf"],
                        help="ldt settings as precision/fold|nofold/cl|cf[/compile]")
    args = parser.parse_args()
    device = resolve_device(args.device)
    ckpt = load_checkpoint(args.run)
    volumes = test_volumes(args.run, ckpt)
    model, recipe = model_from_checkpoint(ckpt, device)
    window = {k: recipe["eval"][k] for k in ("patch_size", "overlap", "batch_size", "blending")}
    methods: dict[str, Callable] = {"monai fp32": monai_method(model, window, device, False),
                                    "monai bf16": monai_method(model, window, device, True)}
    for setting in args.settings:
        precision, fold, fmt, *compiled = setting.split("/")
        predictor, _ = Predictor.from_checkpoint(ckpt, device, precision, fold_bn=fold == "fold",
                                                 channels_last=fmt == "cl", compile=compiled == ["compile"])
        predictor.consistency = None  # the network's inference against MONAI's, as the user writes it: no guard,
        # and full strength (a fitted strength is applied after the network, which MONAI's row does not do)
        methods[f"ldt {setting} ({predictor.precision})"] = lambda low, p=predictor: p.predict(low, strength=False)[0]
    timings: dict[str, list[float]] = {name: [] for name in methods}
    psnr: dict[str, dict[int, list[float]]] = {name: {} for name in methods}
    for fn in methods.values():
        fn(volumes[0][1])  # warm-up
    for _ in range(args.repeats):  # interleaved, so drift affects every method alike
        for name, fn in methods.items():
            t0 = time.perf_counter()
            outs = [fn(low) for _, low, _ in volumes]
            timings[name].append(time.perf_counter() - t0)
            if not psnr[name]:
                for (drf, _, full), out in zip(volumes, outs, strict=True):
                    psnr[name].setdefault(drf, []).append(compute_all(full[0], out[0])["psnr"])
    base32, base16 = statistics.median(timings["monai fp32"]), statistics.median(timings["monai bf16"])
    drfs = sorted(psnr["monai fp32"])
    print(f"run {args.run}: {len(volumes)} test volumes {tuple(volumes[0][1].shape[1:])}, device {device}, "
          f"{torch.get_num_threads()} threads, window {window}")
    print(f"{'method':34s} {'s/pass':>7s} {'vs fp32':>8s} {'vs bf16':>8s}  " + "  ".join(f"DRF{d:>4d}" for d in drfs))
    for name in methods:
        t = statistics.median(timings[name])
        row = "  ".join(f"{statistics.mean(psnr[name][d]):7.3f}" for d in drfs)
        print(f"{name:34s} {t:7.2f} {base32 / t:7.2f}x {base16 / t:7.2f}x  {row}")


if __name__ == "__main__":
    main()
