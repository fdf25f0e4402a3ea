"""Patches per second of the data pipeline against the patches per second training consumes.

The pipeline (phantom source -> TorchIO SubjectsDataset with input-based normalisation -> Queue ->
DataLoader) must not be the bottleneck: its rate over the quickstart model's training rate at the
same batch size should be >= 2. Both are measured in this process::

    python benchmarks/data.py --recipe recipes/quickstart.yaml --batches 30
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lowdose_toolkit.core.device import resolve_device
from lowdose_toolkit.core.plugin_manager import get_registry
from lowdose_toolkit.core.recipe import load_recipe, resolve_recipe
from lowdose_toolkit.core.spec import run_spec
from lowdose_toolkit.data.datasets import PatchStream, pairs_dataset
from lowdose_toolkit.infer.precision import training_precision
from lowdose_toolkit.train.build import build_training

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "quickstart.yaml"))
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    registry = get_registry()
    recipe = resolve_recipe(load_recipe(args.recipe, args.set), registry, args.recipe)
    data = recipe["data"]
    source = registry.build("source", data["source"], "data.source", context={"drfs": data["drfs"]})
    records = source.records()
    dataset = pairs_dataset(records, data["drfs"], data["normalization"], sampling_map=data["sampler"] == "weighted",
                            preload=data["preload"])
    stream = PatchStream(dataset, data)
    torch.manual_seed(0)
    stream.next_batch()  # first queue fill is part of the steady state too, but exclude import/first-file costs
    t0 = time.perf_counter()
    for _ in range(args.batches):
        batch = stream.next_batch()
    load_rate = args.batches * data["batch_size"] / (time.perf_counter() - t0)

    device = resolve_device(args.device)
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
    train_rate = args.steps * data["batch_size"] / (time.perf_counter() - t0)
    print(f"recipe {recipe['name']}: {len(dataset)} (subject, DRF) volumes, patch {data['patch_size']}, "
          f"batch {data['batch_size']}, queue workers {data['num_workers']}, preload {data['preload']}, "
          f"device {device}")
    print(f"pipeline  {load_rate:8.1f} patches/s")
    print(f"training  {train_rate:8.1f} patches/s")
    print(f"ratio pipeline/training = {load_rate / train_rate:.2f} (target >= 2)")


if __name__ == "__main__":
    main()
