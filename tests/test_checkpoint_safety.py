"""Checkpoints are data: every load is weights_only on a torch where that holds, and a crafted file runs nothing."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch
from badinputs import crafted_checkpoint
from conftest import REPO

from lowdose_toolkit.cli.app import main
from lowdose_toolkit.core.checkpoint import load_checkpoint
from lowdose_toolkit.errors import UserError

SAFE_TORCH = (2, 6)  # weights_only=True cannot be bypassed from here on (CVE-2025-32434)


def test_torch_lower_bound_makes_weights_only_safe() -> None:
    text = (REPO / "pyproject.toml").read_text()
    bound = re.search(r'"torch>=(\d+)\.(\d+)', text)
    assert bound, "pyproject.toml must give torch a lower bound"
    assert (int(bound[1]), int(bound[2])) >= SAFE_TORCH, bound[0]
    readme = (REPO / "README.md").read_text()
    assert f"requires torch >= {bound[1]}.{bound[2]}" in readme and "CVE-2025-32434" in readme


def unsafe_loads(path: Path) -> list[str]:
    """``torch.load`` calls without ``weights_only=True``, and any ``pickle.load(s)``, as ``file:line``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
        if owner == "torch" and node.func.attr == "load":
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
        elif owner in ("pickle", "cPickle", "dill") and node.func.attr in ("load", "loads"):
            safe = False
        else:
            continue
        if not safe:
            found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_the_one_program_load_sits_behind_its_trust_flag() -> None:
    """``torch.jit.load`` runs a program: it appears once, in the TorchScript loader, after the
    ``trust_torchscript`` check (ldt infer --trust-torchscript)."""
    hits = [f"{p.relative_to(REPO)}" for folder in ("lowdose_toolkit", "plugins")
            for p in (REPO / folder).rglob("*.py") if "torch.jit.load(" in p.read_text()]
    assert hits == ["lowdose_toolkit/infer/export.py"]
    text = (REPO / hits[0]).read_text()
    assert text.index("if not trust_torchscript:") < text.index("torch.jit.load(")


def test_every_load_is_weights_only() -> None:
    """The shipped code and scripts (tests load only files they wrote; this one means to run a payload)."""
    files = [p for folder in ("lowdose_toolkit", "plugins", "benchmarks", "experiments")
             for p in (REPO / folder).rglob("*.py")]
    assert len(files) > 40
    assert [hit for p in files for hit in unsafe_loads(p)] == []


@pytest.fixture
def crafted(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "code_ran"
    path = crafted_checkpoint(tmp_path / "best.pt", marker)
    torch.load(path, weights_only=False)  # the payload is live: plain unpickling runs it
    assert marker.is_dir()
    marker.rmdir()
    return path, marker


def test_crafted_checkpoint_runs_no_code(crafted: tuple[Path, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    path, marker = crafted
    with pytest.raises(UserError) as exc:
        load_checkpoint(path)
    text = str(exc.value)
    assert "\n" not in text and text.startswith(f"{path}: not a lowdose-toolkit checkpoint (refused: it holds "
                                                "pickled code (posix.mkdir), not plain tensors and data")
    assert "will likely succeed" not in text  # torch's advice to retry without weights_only is not passed on
    assert main(["infer", str(path), str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "refused: it holds pickled code" in err
    assert not marker.exists()


def test_crafted_weights_file_runs_no_code(crafted: tuple[Path, Path]) -> None:
    from ldt_plugins.losses.perceptual import PerceptualLoss

    path, marker = crafted
    with pytest.raises(UserError, match=r"cannot be read by torch\.load \(refused: it holds pickled code") as exc:
        PerceptualLoss(weights="imagenet", path=str(path))
    assert "\n" not in str(exc.value) and not marker.exists()
