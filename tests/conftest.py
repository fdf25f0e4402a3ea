"""Shared fixtures: a private cache dir, deterministic torch, and small recipes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"


@pytest.fixture(autouse=True)
def _isolate(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Seed torch, keep caches out of $HOME, never use real VGG weights by accident."""
    torch.manual_seed(0)
    torch.set_num_threads(2)
    cache = os.environ.get("LDT_TEST_CACHE") or str(tmp_path_factory.getbasetemp() / "ldt-cache")
    monkeypatch.setenv("LDT_CACHE_DIR", cache)
    monkeypatch.delenv("LDT_VGG16_WEIGHTS", raising=False)
    monkeypatch.delenv("LDT_STRICT_PLUGINS", raising=False)
    monkeypatch.setenv("COLUMNS", "240")  # rich wraps tables at 80 columns when not on a terminal


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def make_tiny_dataset(root: Path, subjects: int = 5, shape: tuple[int, int, int] = (24, 24, 24),
                      drfs: tuple[int, ...] = (4, 100), seed: int = 0) -> Path:
    """A small synthetic data set in the nifti source's layout: hot blobs + count-like noise per DRF."""
    import nibabel as nib
    import numpy as np

    from lowdose_toolkit.records import SubjectRecord, write_manifest

    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float32)
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    records = []
    for s in range(subjects):
        full = np.full(shape, 100.0, dtype=np.float32)
        for _ in range(4):
            centre = rng.uniform(4, np.array(shape) - 4)
            radius = rng.uniform(2, 4)
            full += rng.uniform(200, 800) * np.exp(-((grid - centre) ** 2).sum(-1) / (2 * radius**2))
        folder = root / f"sub{s:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(full, affine), folder / "full.nii.gz")
        low = {}
        for drf in drfs:
            counts = rng.poisson(full * 0.5 / drf).astype(np.float32)
            noisy = counts * drf / 0.5
            path = folder / f"drf_{drf:03d}.nii.gz"
            nib.save(nib.Nifti1Image(noisy.astype(np.float32), affine), path)
            low[drf] = path
        records.append(SubjectRecord(f"sub{s:02d}", folder / "full.nii.gz", low))
    write_manifest(records, root / "manifest.csv")
    return root


def tiny_recipe(data_root: Path, **extra: str) -> str:
    """A recipe for the tiny data set; ``extra`` adds top-level YAML sections verbatim."""
    text = f"""
name: tiny
seed: 3
data:
  source: {{name: nifti, root: {data_root}}}
  drfs: [4, 100]
  patch_size: 16
  batch_size: 2
  samples_per_volume: 2
  queue_length: 8
  split: {{val: 1, test: 1}}
model:
  generator: {{name: mlnet, channels: 4, depth: 2}}
  heads: [{{name: dose_classifier, input: bottleneck, hidden: [8]}}]
losses:
  - {{name: l1, weight: 300, on: coarse}}
  - {{name: cross_entropy, weight: 10, on: dose_classifier}}
train:
  epochs: 3
  steps_per_epoch: 6
  optimizer: {{lr: 1.0e-3}}
eval: {{patch_size: 24, overlap: 0, batch_size: 1, val_subjects: 1}}
"""
    for key, value in extra.items():
        text += f"{key}: {value}\n"
    return text


def tiny_gan_recipe(data_root: Path, scheme: str = "paired_gan") -> str:
    """:func:`tiny_recipe` with a small conditional PatchGAN and an LSGAN term, trained by ``scheme``."""
    text = tiny_recipe(data_root)
    text = text.replace("  heads:", "  discriminator: {name: patchgan3d, channels: 4, n_layers: 1}\n  heads:")
    text = text.replace("losses:\n", "losses:\n  - {name: lsgan, weight: 1}\n")
    return text.replace("train:\n", f"train:\n  scheme: {scheme}\n")


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder below ``root`` with its mtime and size (to prove nothing was written)."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(root.rglob("*"))}
