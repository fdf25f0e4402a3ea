"""Time per training step: the engine's scheme against a hand-written PyTorch loop of the same parts.

Both paths use the same networks (built from the recipe, same seed), the same synthetic batch, the
same losses and weights and the same optimizers; the plain loop is what a researcher writes by hand
(pix2pix's order: G forward, D step, G step). Prints ms/step for each and the ratio engine/plain
(target <= 1.10), then a roofline: the device's dense 3D-convolution throughput at the model's shapes
(fp32 and the step's precision) and the step's achieved FLOP rate (counted by torch's FlopCounterMode,
forward and backward) as a fraction of it. Run on CPU, and on CUDA with autocast where a GPU is present::

    python benchmarks/train_step.py --recipe recipes/quickstart.yaml --steps 20
    python benchmarks/train_step.py --recipe recipes/cg3dsrgan.yaml --device cuda --amp bf16
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch

from lowdose_toolkit.core.device import resolve_device
from lowdose_toolkit.core.plugin_manager import get_registry
from lowdose_toolkit.core.recipe import load_recipe, resolve_recipe
from lowdose_toolkit.models.lowdose_model import IMAGE_OUTPUTS, build_losses, build_model
from lowdose_toolkit.train.build import build_training

REPO = Path(__file__).resolve().parents[1]


def engine_path(recipe: dict, device: torch.device, precision: str):
    torch.manual_seed(0)
    model, _, _, scheme = build_training(recipe, get_registry(), device, precision)
    model.train()
    return lambda batch: scheme.train_step(batch)


def plain_path(recipe: dict, device: torch.device, precision: str):
    """A hand-written loop over the same parts (what the engine must not be slower than)."""
    torch.manual_seed(0)  # the same initial weights as the engine path
    model, disc = build_model(recipe, get_registry())
    model.to(device)
    if disc is not None:
        disc.to(device)
    losses = build_losses(recipe, get_registry(), model, disc)
    for term in losses:
        term.to(device)
    opt_cfg = recipe["train"]["optimizer"]
    g_opt = torch.optim.Adam(model.parameters(), lr=opt_cfg["lr"], betas=tuple(opt_cfg["betas"]))
    d_opt = torch.optim.Adam(disc.parameters(), lr=opt_cfg["lr"], betas=tuple(opt_cfg["betas"])) if disc else None
    adv = next((t for t in losses if t.adversarial), None)
    pixel = [t for t in losses if not t.adversarial]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    cast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    model.train()

    def step(batch: dict) -> None:
        low, full = batch["low"], batch["full"]
        with cast():  # the model's own forward: generator, heads, guidance, refiner
            out = model(low, drf_class=batch["drf_class"])
        if disc is not None:
            for p in disc.parameters():
                p.requires_grad_(True)
            with cast():
                d_loss = 0.5 * (adv.loss(disc(full, low).float(), True) + adv.loss(disc(out["pred"].detach(), low)
                                                                                    .float(), False))
            d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            d_opt.step()
            for p in disc.parameters():
                p.requires_grad_(False)
        with cast():
            total = 0.0
            for t in pixel:
                target = full if t.on in IMAGE_OUTPUTS else batch["drf_class"]
                extra = {"low": low} if getattr(t.loss, "uses_input", False) else {}
                total = total + t.weight * t.loss(out[t.on].float(), target, **extra)
            if disc is not None:
                total = total + adv.weight * adv.loss(disc(out["pred"], low).float(), True)
        g_opt.zero_grad(set_to_none=True)
        total.backward()
        g_opt.step()

    return step


def synthetic_batch(recipe: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """One seeded random batch of the recipe's batch size and patch (low, full, drf_class) on ``device``."""
    p = recipe["data"]["patch_size"]
    size = (p, p, p) if isinstance(p, int) else tuple(p)
    b = recipe["data"]["batch_size"]
    g = torch.Generator().manual_seed(0)
    batch = {"low": torch.rand(b, 1, *size, generator=g), "full": torch.rand(b, 1, *size, generator=g),
             "drf_class": torch.randint(0, len(recipe["data"]["drfs"]), (b,), generator=g)}
    return {k: v.to(device) for k, v in batch.items()}


def timed(step, batch: dict, steps: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def conv_peak(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> tuple[float, str]:
    """Best TFLOP/s of a 3x3x3 convolution (forward + backward) over shapes ML-Net and the U-Net run."""
    shapes = [(4, 32, 64), (4, 64, 32), (4, 128, 16), (4, 256, 8)]  # batch, channels in = out, edge
    if device.type == "cpu":
        shapes = [(2, 16, 32), (2, 32, 16), (2, 64, 8)]
    best, where = 0.0, ""
    for b, c, s in shapes:
        conv = torch.nn.Conv3d(c, c, 3, padding=1).to(device)
        x = torch.randn(b, c, s, s, s, device=device, requires_grad=True)
        flops = 3 * 2 * b * c * c * 27 * s ** 3  # forward, grad input, grad weight

        def run(conv=conv, x=x) -> None:
            with torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext():
                y = conv(x)
            y.float().sum().backward()

        run()
        t = statistics.median(timed(lambda _: run(), {}, repeats, device))
        rate = flops / t / 1e12
        if rate > best:
            best, where = rate, f"{c} ch at {s}^3, batch {b}"
    return best, where


def step_flops(step, batch: dict) -> float:
    """FLOPs of one training step (forward and backward of every network), as torch counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(batch)
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "quickstart.yaml"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    parser.add_argument("--set", action="append", default=[], help="recipe override, e.g. data.patch_size=32")
    args = parser.parse_args()
    recipe = resolve_recipe(load_recipe(args.recipe, args.set), get_registry(), args.recipe)
    if recipe["model"]["discriminator"] is None:
        raise SystemExit("this benchmark's plain loop is the paired-GAN one; use a recipe with a discriminator")
    device = resolve_device(args.device)
    precision = {"none": "fp32"}.get(args.amp, args.amp)  # autocast on the CPU too
    batch = synthetic_batch(recipe, device)
    b, size = batch["low"].shape[0], tuple(batch["low"].shape[2:])
    engine, plain = engine_path(recipe, device, precision), plain_path(recipe, device, precision)
    timed(engine, batch, 2, device)
    timed(plain, batch, 2, device)
    e_all, p_all = [], []
    for _ in range(args.rounds):  # interleaved rounds so drift affects both alike
        e_all += timed(engine, batch, args.steps, device)
        p_all += timed(plain, batch, args.steps, device)
    e, pl = statistics.median(e_all), statistics.median(p_all)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"recipe {recipe['name']}: batch {b} x {size}, device {name}, precision {precision}")
    print(f"engine  {1000 * e:8.1f} ms/step (median of {len(e_all)})")
    print(f"plain   {1000 * pl:8.1f} ms/step (median of {len(p_all)})")
    print(f"ratio engine/plain = {e / pl:.3f} (target <= 1.10)")
    flops = step_flops(engine, batch)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    peak32, where32 = conv_peak(device, torch.float32)
    print(f"roofline: step {flops / 1e12:.3f} TFLOP, achieved {flops / e / 1e12:.2f} TFLOP/s")
    print(f"  dense conv3d fp32 {peak32:.2f} TFLOP/s ({where32}); step at {flops / e / 1e12 / peak32:.1%} of it")
    if dtype != torch.float32:
        peak, where = conv_peak(device, dtype)
        print(f"  dense conv3d {precision} {peak:.2f} TFLOP/s ({where}); step at {flops / e / 1e12 / peak:.1%} of it")


if __name__ == "__main__":
    main()
