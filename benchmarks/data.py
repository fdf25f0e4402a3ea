"""Patches per second of the data pipeline against the patches per second training consumes.

The pipeline must not be the bottleneck: its rate over the training rate at the same batch size should
be >= 2. It is the path training takes (``data.layout``): the volume path (source -> TorchIO
SubjectsDataset with input-based normalisation -> Queue -> DataLoader) or, for data cached by
``ldt cache``, patches sliced from memory maps (``lowdose_toolkit.data.cached_patches``). The training
rate is measured in this process from the recipe's training step, or given (``--train-rate``, e.g. the
63 patches/s of CG-3DSRGAN at 64^3 in bf16 on an H100)::

    python benchmarks/data.py --recipe recipes/quickstart.yaml --batches 30
    python benchmarks/wholebody_data.py /tmp/wb && ldt cache /tmp/wb
    python benchmarks/data.py --recipe recipes/cg3dsrgan.yaml --data /tmp/wb --train-rate 63 \\
        --set data.preload=false --set data.num_workers=2 --set data.layout=volumes   # or =mmap [--cold 8]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from lowdose_toolkit.core.device import resolve_device
from lowdose_toolkit.core.plugin_manager import get_registry
from lowdose_toolkit.core.recipe import load_recipe, resolve_recipe
from lowdose_toolkit.core.spec import run_spec
from lowdose_toolkit.data.cache import resolve_layout
from lowdose_toolkit.data.cached_patches import CachedPatchStream, cached_pairs
from lowdose_toolkit.data.datasets import PatchStream, pairs_dataset
from lowdose_toolkit.infer.precision import training_precision
from lowdose_toolkit.train.build import build_training

REPO = Path(__file__).resolve().parents[1]


def evict(paths: list[Path]) -> None:
    """Drop ``paths`` from the page cache (POSIX_FADV_DONTNEED): the next reads come from the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "quickstart.yaml"))
    parser.add_argument("--data", help="a NIfTI data folder or manifest instead of the recipe's source")
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--train-rate", type=float, help="patches/s training consumes (skips measuring it)")
    parser.add_argument("--cold", type=int, default=0, metavar="N",
                        help="evict the data's files from the page cache before timing and after every N batches "
                             "(reads come from the disk, as for a data set much larger than memory)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    registry = get_registry()
    overrides = list(args.set)
    if args.data:
        overrides.insert(0, f"data.source={{name: nifti, root: {args.data}, validate: false}}")
    recipe = resolve_recipe(load_recipe(args.recipe, overrides), registry, args.recipe)
    data = recipe["data"]
    source = registry.build("source", data["source"], "data.source", context={"drfs": data["drfs"]})
    records = source.records()
    cached = resolve_layout(data["layout"], records, preload=data["preload"], normalization=data["normalization"])
    if cached is None:
        dataset = pairs_dataset(records, data["drfs"], data["normalization"],
                                sampling_map=data["sampler"] == "weighted", preload=data["preload"])
        stream: PatchStream | CachedPatchStream = PatchStream(dataset, data)
        files = [Path(p) for r in records for p in (r.full, *r.low.values())]
        n_pairs = len(dataset)
    else:
        subjects = [cached[r.subject] for r in records]
        stream = CachedPatchStream(cached_pairs(subjects, data["drfs"], data["normalization"]), data)
        files = [v.path for s in subjects for v in (s.full, *s.low.values())]
        n_pairs = len(stream.dataset)
    if args.cold:
        evict(files)
    load_before = os.getloadavg()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    stream.next_batch()  # the first fill (TorchIO's queue loads queue_length patches' volumes first)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(args.batches):
        batch = stream.next_batch()
        if args.cold and (i + 1) % args.cold == 0:
            evict(files)
    load_rate = args.batches * data["batch_size"] / (time.perf_counter() - t0)
    load_after = os.getloadavg()

    device = resolve_device(args.device)
    if args.train_rate:
        train_rate, trained = args.train_rate, "given"
    else:
        spec = run_spec(recipe)
        precision = training_precision(spec.precision, device, spec.precision_cuda_only)
        _, _, _, scheme = build_training(recipe, registry, device, precision)
        batch = {k: v.to(device) for k, v in batch.items()}
        scheme.train_step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            scheme.train_step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_rate, trained = args.steps * data["batch_size"] / (time.perf_counter() - t0), f"measured on {device}"
    shape = _shape(records[0].full)
    cold = f" (evicted from the page cache every {args.cold} batches)" if args.cold else ""
    print(f"recipe {recipe['name']}: {n_pairs} (subject, DRF) volumes of {shape}, layout "
          f"{'volumes' if cached is None else 'mmap'}{cold}, patch "
          f"{data['patch_size']}, batch {data['batch_size']}, samples_per_volume {data['samples_per_volume']}, "
          f"workers {data['num_workers']}, preload {data['preload']}, sampler {data['sampler']}")
    print(f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; cpus {os.cpu_count()}")
    print(f"first batch {first:8.2f} s")
    print(f"pipeline  {load_rate:8.1f} patches/s ({args.batches} batches)")
    print(f"training  {train_rate:8.1f} patches/s ({trained})")
    print(f"ratio pipeline/training = {load_rate / train_rate:.2f} (target >= 2)")


def _shape(path: Path) -> tuple[int, ...]:
    import nibabel as nib

    return tuple(int(s) for s in nib.load(str(path)).shape[:3])


if __name__ == "__main__":
    main()
