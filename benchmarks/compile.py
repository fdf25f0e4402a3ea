"""Does ``torch.compile`` pay on this device? Eager against compiled, for inference and a training step.

Issue 13 asks for ``torch.compile`` behind a ``--compile`` flag only where a benchmark shows a gain.
This measures, in one process, the two places it could go:

* inference: the Predictor's per-window forward (``forward_window``: model, dose head, guidance,
  refiner; BatchNorm folded, the device's memory format) on one window of the checkpoint's size,
  eager against ``torch.compile``, at each precision asked for; the first compiled call is reported
  separately (compile time), the steady state as the median of ``--repeats`` calls, and the outputs
  compared (PSNR of compiled against eager, peak = eager's max, as the challenge's PSNR);
* training: one engine step of the recipe (its scheme; batch and patch from the recipe), eager
  against the networks wrapped in ``torch.compile`` (the scheme's ``wrap`` hook, as DDP wraps them).

    python benchmarks/compile.py --checkpoint RUN/checkpoints/best.pt --recipe recipes/quickstart.yaml
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from train_step import synthetic_batch  # this folder's training-step benchmark: the same batch

from lowdose_toolkit.core.device import resolve_device
from lowdose_toolkit.core.plugin_manager import get_registry
from lowdose_toolkit.core.recipe import load_recipe, resolve_recipe
from lowdose_toolkit.evaluation.metrics import psnr
from lowdose_toolkit.infer.precision import autocast as autocast_context
from lowdose_toolkit.infer.predictor import Predictor, forward_window
from lowdose_toolkit.train.build import build_training

REPO = Path(__file__).resolve().parents[1]


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(first call, median of ``repeats`` further calls) in seconds."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def inference(checkpoint: Path, device: torch.device, precision: str, repeats: int) -> None:
    predictor, _ = Predictor.from_checkpoint(checkpoint, device, precision)
    model = predictor.model
    assert model is not None
    size = tuple(predictor.window["patch_size"])
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(1, 1, *size, generator=g) * 2).to(device)
    if predictor.channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)

    def eager() -> torch.Tensor:
        with torch.no_grad(), autocast_context(device, predictor.precision):
            return forward_window(model, x)[0]

    compiled_fn = torch.compile(forward_window, dynamic=False)  # as Predictor(compiled=True) compiles it

    def compiled() -> torch.Tensor:
        with torch.no_grad(), autocast_context(device, predictor.precision):
            return compiled_fn(model, x)[0]

    _, e = timed(eager, repeats)
    c_first, c = timed(compiled, repeats)
    agree = psnr(eager()[0, 0].float(), compiled()[0, 0].float())
    print(f"inference {predictor.precision:>4}, window {size}: eager {e:.3f} s, compiled {c:.3f} s "
          f"(eager/compiled {e / c:.2f}x; first compiled call {c_first:.1f} s); compiled vs eager {agree:.1f} dB")


def training(recipe_path: str, device: torch.device, precision: str, steps: int) -> None:
    recipe = resolve_recipe(load_recipe(recipe_path, []), get_registry(), recipe_path)
    batch = synthetic_batch(recipe, device)
    b, size = batch["low"].shape[0], tuple(batch["low"].shape[2:])
    result = {}
    for name, wrap in (("eager", None), ("compiled", lambda m: torch.compile(m, dynamic=False))):
        torch.manual_seed(0)
        model, _, _, scheme = build_training(recipe, get_registry(), device, precision, wrap=wrap)
        model.train()
        result[name] = timed(lambda scheme=scheme: scheme.train_step(batch), steps)
    (_, e), (c_first, c) = result["eager"], result["compiled"]
    print(f"training step {precision:>4}, {recipe['name']} batch {b} x {size}: eager {1000 * e:.0f} ms, compiled "
          f"{1000 * c:.0f} ms (eager/compiled {e / c:.2f}x; first compiled step {c_first:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a run's best.pt (inference part)")
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "quickstart.yaml"), help="training part")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precisions", nargs="*", default=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"torch {torch.__version__}, {name}")
    for precision in args.precisions:
        inference(args.checkpoint, device, precision, args.repeats)
    for precision in args.precisions:
        training(args.recipe, device, precision, args.steps)


if __name__ == "__main__":
    main()
