"""Sliding-window inference speed: ``ldt``'s ``infer_volume`` (TorchIO grid) vs MONAI's ``sliding_window_inference``.

Same small 3D conv model, volume, patch size, overlap and batch size, in one process; each method is
warmed up, then timed ``--repeats`` times (median reported). Blending differs by design: ``ldt`` offers
``hann`` / ``average`` / ``crop`` (TorchIO), MONAI ``gaussian`` / ``constant``. ``average`` and MONAI's
``constant`` weight patches identically, so their outputs are compared as a correctness check; ``hann``
and ``gaussian`` are the two libraries' recommended smooth blendings, timed side by side.

On the CPU the model's own time is also measured (the predictor is wrapped in a timer), so the
sliding-window machinery's cost, total minus model, is printed separately: the model is the same
for both libraries, and on a 2-core machine it is ~99% of the time, which hides the machinery in
noise. (On CUDA the model is not timed: synchronising would undo ldt's overlap of host blending with
device compute.)

Peak memory: host RSS above the pre-call baseline, sampled every 2 ms from /proc/self/statm (torch's
allocations are invisible to tracemalloc), and ``torch.cuda.max_memory_allocated`` on CUDA.

MONAI is a benchmark-only dependency (``pip install monai``), never a project dependency.

Usage:
    python benchmarks/infer.py                              # 128 x 128 x 200 on the CPU
    python benchmarks/infer.py --shape 360 360 673 --device cuda   # whole-body uEXPLORER size
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowdose_toolkit.infer.sliding import infer_volume, parse_overlap  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE


class PeakRSS:
    """Context manager: the peak resident set size above the entry value, sampled in a thread."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = 0

    def __enter__(self) -> PeakRSS:
        self.base = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss() - self.base)
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss() - self.base)


def make_model(channels: int, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv3d(1, channels, 3, padding=1), nn.ReLU(),
        nn.Conv3d(channels, channels, 3, padding=1), nn.ReLU(),
        nn.Conv3d(channels, 1, 3, padding=1),
    ).to(device).eval()  # fmt: skip


class Timed:
    """Wraps a model and adds up the seconds spent inside it (CPU only: no CUDA synchronisation)."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.seconds = model, 0.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        y = self.model(x)
        self.seconds += time.perf_counter() - t0
        return y


def run_ldt(vol: torch.Tensor, model: Callable, args: argparse.Namespace, blending: str) -> torch.Tensor:
    return infer_volume(vol, model, args.patch, args.overlap, args.batch_size, blending=blending, device=args.device)


def run_monai(vol: torch.Tensor, model: Callable, args: argparse.Namespace, mode: str) -> torch.Tensor:
    from monai.inferers import sliding_window_inference

    with torch.inference_mode():
        out = sliding_window_inference(
            vol[None], roi_size=(args.patch,) * 3, sw_batch_size=args.batch_size, predictor=model,
            overlap=args.overlap, mode=mode, sw_device=args.device, device=args.monai_device,
        )  # fmt: skip
    return out[0].cpu()


def measure(
    fn: Callable[[], torch.Tensor], timer: Timed, repeats: int, cuda: bool
) -> tuple[float, int, int, torch.Tensor, float]:
    """Median seconds, peak host bytes, peak CUDA bytes, the last output, median seconds outside the model."""
    fn()  # warm-up (cuDNN autotuning, allocator)
    times, peaks, cuda_peaks, outside = [], [], [], []
    out = torch.empty(0)
    for _ in range(repeats):
        timer.seconds = 0.0
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            out = fn()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        outside.append(times[-1] - timer.seconds)
        peaks.append(mem.peak)
        cuda_peaks.append(torch.cuda.max_memory_allocated() if cuda else 0)
        del out
        out = torch.empty(0)
    out = fn()
    return statistics.median(times), max(peaks), max(cuda_peaks), out, statistics.median(outside)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(128, 128, 200))
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--overlap", type=float, default=0.25, help="fraction of the patch")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--monai-device", default="cpu", help="where MONAI aggregates (ldt: always the CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    try:
        import monai
    except ImportError:
        sys.exit("MONAI is not installed: `pip install monai` (benchmark only) to compare.")

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    vol = torch.rand(1, *args.shape, generator=torch.Generator().manual_seed(0))
    model = make_model(args.channels, device)
    timer = Timed(model)
    predictor = model if cuda else timer
    voxels = vol[0].numel()
    ovl = parse_overlap(args.overlap, (args.patch,) * 3)
    print(f"torch {torch.__version__}, MONAI {monai.__version__}, device {device}, threads {torch.get_num_threads()}")
    print(f"volume {tuple(args.shape)}, patch {args.patch}, overlap {args.overlap} ({ovl[0]} voxels), "
          f"batch {args.batch_size}, conv channels {args.channels}, MONAI aggregates on {args.monai_device}, "
          f"median of {args.repeats}")  # fmt: skip

    results = {}
    for name, fn in (
        ("ldt average", lambda: run_ldt(vol, predictor, args, "average")),
        ("MONAI constant", lambda: run_monai(vol, predictor, args, "constant")),
        ("ldt hann", lambda: run_ldt(vol, predictor, args, "hann")),
        ("MONAI gaussian", lambda: run_monai(vol, predictor, args, "gaussian")),
        ("ldt crop", lambda: run_ldt(vol, predictor, args, "crop")),
    ):
        results[name] = measure(fn, timer, args.repeats, cuda)
    print(f"\n{'method':<16} {'seconds':>8} {'Mvoxel/s':>9} {'peak host MiB':>14} {'peak CUDA MiB':>14}"
          + ("" if cuda else f" {'outside model s':>16}"))  # fmt: skip
    for name, (sec, host, dev, _, outside) in results.items():
        print(f"{name:<16} {sec:8.2f} {voxels / sec / 1e6:9.2f} {host / 2**20:14.0f} {dev / 2**20:14.0f}"
              + ("" if cuda else f" {outside:16.3f}"))  # fmt: skip
    for ours, theirs in (("ldt average", "MONAI constant"), ("ldt hann", "MONAI gaussian")):
        ratio = results[theirs][0] / results[ours][0]
        line = f"speed {ours} / {theirs}: {ratio:.2f}x (>1: ldt faster)"
        if not cuda:
            line += f"; outside the model: {results[theirs][4] / max(results[ours][4], 1e-9):.2f}x"
        print(line)
    diff = (results["ldt average"][3] - results["MONAI constant"][3]).abs().max().item()
    print(f"max |ldt average - MONAI constant| = {diff:.2e} (same grid and weighting: should be ~0)")
    diff = (results["ldt hann"][3] - results["MONAI gaussian"][3]).abs().mean().item()
    print(f"mean |ldt hann - MONAI gaussian| = {diff:.2e} (different window weights: small but not 0)")


if __name__ == "__main__":
    main()
