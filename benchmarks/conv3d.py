"""Dense 3D convolution and whole-model inference throughput per precision and memory format.

The roofline's ceiling (see benchmarks/train_step.py) and the evidence for issue 13's memory-format
choice: a 3x3x3 convolution (forward and backward) at the shapes ML-Net runs, and the full model's
whole-volume forward, in fp32 and bf16 autocast, channels-first and channels_last_3d::

    python benchmarks/conv3d.py --device cuda
    python benchmarks/conv3d.py --device cpu --recipe recipes/quickstart.yaml
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def bench(fn, device: torch.device, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "cg3dsrgan.yaml"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    shapes = [(4, 32, 64), (4, 64, 32), (4, 128, 16), (8, 64, 64)] if device.type == "cuda" else \
        [(2, 16, 32), (2, 32, 16)]
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}")
    print("conv3d 3x3x3 fwd+bwd TFLOP/s: shape | fp32 cf | fp32 cl | bf16 cf | bf16 cl")
    for b, c, s in shapes:
        row = []
        for precision in ("fp32", "bf16"):
            for fmt in (torch.contiguous_format, torch.channels_last_3d):
                conv = torch.nn.Conv3d(c, c, 3, padding=1).to(device).to(memory_format=fmt)
                x = torch.randn(b, c, s, s, s, device=device).to(memory_format=fmt).requires_grad_(True)

                def run(conv=conv, x=x, precision=precision) -> None:
                    with cast(device, precision):
                        y = conv(x)
                    y.float().sum().backward()

                t = bench(run, device, args.repeats)
                row.append(3 * 2 * b * c * c * 27 * s ** 3 / t / 1e12)
        print(f"  {b}x{c}ch x {s}^3 | " + " | ".join(f"{r:6.2f}" for r in row))
    from lowdose_toolkit.core.plugin_manager import get_registry
    from lowdose_toolkit.core.recipe import load_recipe, resolve_recipe
    from lowdose_toolkit.models.lowdose_model import build_model

    recipe = resolve_recipe(load_recipe(args.recipe, []), get_registry(), args.recipe)
    model, _ = build_model(recipe, get_registry())
    model.to(device).eval()
    x = torch.rand(1, 1, 80, 80, 160, device=device)
    print(f"{recipe['name']} whole-volume forward 80x80x160, ms: fp32 cf | fp32 cl | bf16 cf | bf16 cl")
    row = []
    for precision in ("fp32", "bf16"):
        for fmt in (torch.contiguous_format, torch.channels_last_3d):
            model.to(memory_format=fmt)
            xi = x.to(memory_format=fmt)

            def fwd(xi=xi, precision=precision) -> None:
                with torch.inference_mode(), cast(device, precision):
                    model.predict(xi)

            row.append(1000 * bench(fwd, device, args.repeats))
    print("  " + " | ".join(f"{r:8.1f}" for r in row))


if __name__ == "__main__":
    main()
