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


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
