"""Plugin discovery through real entry points, failure isolation, strict mode and duplicates."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import write

from lowdose_toolkit.cli.app import main
from lowdose_toolkit.core import plugin_manager as plugins
from lowdose_toolkit.core.registry import Registry
from lowdose_toolkit.errors import PluginError

EDGE_HEAD = '''
"""A third-party head: predicts a coarse edge-strength map... here: its mean, from any feature."""
import torch
from torch import nn
from lowdose_toolkit import hookimpl


class EdgeHead(nn.Module):
    """Edge-strength regressor on a generator feature (third-party example)."""

    def __init__(self, in_channels: int, hidden: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv3d(in_channels, hidden, 1), nn.ReLU(), nn.Conv3d(hidden, 1, 1))

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.net(feature).mean(dim=(1, 2, 3, 4))


@hookimpl
def ldt_register_heads(register):
    register("edge_head", EdgeHead)
'''

RECIPE = """
name: thirdparty
data: {drfs: [4, 100], patch_size: 16}
model:
  generator: {name: mlnet, channels: 4, depth: 2}
  heads: [{name: edge_head, input: bottleneck, target: edge, hidden: 4}]
losses: [{name: l1, on: coarse}]
"""


def make_dist(root: Path, dist: str, module: str, code: str, ep_name: str) -> None:
    """A module plus ``<dist>-1.2.3.dist-info/entry_points.txt`` on ``root`` (what pip would install)."""
    write(root / f"{module}.py", code)
    info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"  # as pip names it
    write(info / "METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    write(info / "entry_points.txt", f"[lowdose_toolkit]\n{ep_name} = {module}\n")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    plugins.reset()
    yield root
    plugins.reset()
    for name in [m for m in sys.modules if m.startswith(("ldt_edge", "ldt_broken", "ldt_misspelt"))]:
        del sys.modules[name]


def test_third_party_head_through_entry_points(site: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    make_dist(site, "ldt-edge", "ldt_edge", EDGE_HEAD, "edge")
    assert main(["plugins", "--json"]) == 0
    parts = json.loads(capsys.readouterr().out)["parts"]
    edge = [p for p in parts if p["name"] == "edge_head"]
    assert edge == [{"kind": "head", "name": "edge_head", "plugin": "edge", "version": "1.2.3",
                     "doc": "Edge-strength regressor on a generator feature (third-party example)."}]
    assert {p["name"] for p in parts} >= {"mlnet", "dose_classifier", "contextual_net", "patchgan3d", "lsgan"}
    recipe = write(tmp_path / "r.yaml", RECIPE)
    assert main(["check", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "edge_head" in out and "is valid" in out
    assert main(["plugins"]) == 0
    assert "edge_head" in capsys.readouterr().out


def test_broken_plugin_is_reported_and_others_load(site: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    make_dist(site, "ldt-broken", "ldt_broken", "raise RuntimeError('boom at import')\n", "broken")
    make_dist(site, "ldt-edge", "ldt_edge", EDGE_HEAD, "edge")
    assert main(["check", str(write(tmp_path / "r.yaml", RECIPE))]) == 0
    err = capsys.readouterr().err
    assert "plugin 'broken' (ldt_broken) failed to load: RuntimeError: boom at import" in " ".join(err.split())
    assert "broken" in [f.name for f in plugins.get_plugin_manager().failures]


MISSPELT = """
from lowdose_toolkit import hookimpl


@hookimpl
def ldt_register_head(register):
    register("never_seen", object)
"""


def test_a_misspelt_hook_is_an_error_for_that_plugin(site: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """pluggy's check_pending: a hook without a spec is not silently ignored (the head would never register)."""
    make_dist(site, "ldt-misspelt", "ldt_misspelt", MISSPELT, "misspelt")
    make_dist(site, "ldt-edge", "ldt_edge", EDGE_HEAD, "edge")
    assert main(["check", str(write(tmp_path / "r.yaml", RECIPE))]) == 0  # the other plugins still load
    err = " ".join(capsys.readouterr().err.split())
    assert ("plugin 'misspelt' (ldt_misspelt) failed to load: PluginError: plugin 'misspelt' implements unknown "
            "hook 'ldt_register_head' (did you mean 'ldt_register_heads'?)") in err, err
    assert not plugins.get_plugin_manager().is_registered(plugins.get_plugin_manager().get_plugin("misspelt"))
    plugins.reset()
    monkeypatch.setenv("LDT_STRICT_PLUGINS", "1")
    assert main(["plugins"]) == 2
    assert "unknown hook 'ldt_register_head'" in " ".join(capsys.readouterr().err.split())


def test_strict_mode_makes_a_broken_plugin_fatal(site: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    make_dist(site, "ldt-broken", "ldt_broken", "raise RuntimeError('boom at import')\n", "broken")
    monkeypatch.setenv("LDT_STRICT_PLUGINS", "1")
    assert main(["plugins"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "plugin 'broken' (ldt_broken) failed to load: RuntimeError: boom at import (LDT_STRICT_PLUGINS is set)" \
        in err
    assert "Traceback" not in err


def test_duplicate_name_names_both_plugins() -> None:
    registry = Registry()
    registry.add("head", "dup", lambda: None, "first-plugin")
    with pytest.raises(PluginError, match="duplicate head name 'dup': registered by plugin 'first-plugin' and by "
                                          "plugin 'second-plugin'"):
        registry.add("head", "dup", lambda: None, "second-plugin")


def test_duplicate_through_hooks(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_dist(site, "ldt-edge", "ldt_edge", EDGE_HEAD.replace('"edge_head"', '"dose_classifier"'), "edge")
    assert main(["plugins"]) == 2
    assert "duplicate head name 'dose_classifier': registered by plugin 'dose_classifier' and by plugin 'edge'" \
        in " ".join(capsys.readouterr().err.split())


class InlinePlugin:
    """A plugin object registered in-process (as tests and notebooks do)."""

    @staticmethod
    @plugins.hookspecs.hookimpl
    def ldt_register_losses(register) -> None:  # noqa: ANN001
        def tv_loss(strength: float = 1.0):
            """Total variation (inline test plugin)."""
            import torch

            class TV(torch.nn.Module):
                def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
                    return strength * (pred.diff(dim=-1).abs().mean())

            return TV()

        register("tv", tv_loss)


def test_inline_plugin_registration() -> None:
    name = plugins.register_plugin(InlinePlugin(), name="inline-tv")
    try:
        entry = plugins.get_registry().get("loss", "tv")
        assert entry.plugin == "inline-tv" and entry.doc == "Total variation (inline test plugin)."
        loss = plugins.get_registry().build("loss", {"name": "tv", "strength": 2}, "losses.0")
        import torch

        x = torch.arange(8.0).reshape(1, 1, 1, 1, 8)
        assert float(loss(x, x)) == pytest.approx(2.0)
    finally:
        plugins.unregister_plugin(name)
    with pytest.raises(Exception, match="unknown loss 'tv'"):
        plugins.get_registry().get("loss", "tv")


def test_context_args_cannot_be_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = write(tmp_path / "r.yaml", RECIPE.replace("edge_head, input: bottleneck, target: edge, hidden: 4",
                                                       "dose_classifier, input: bottleneck, num_classes: 3"))
    assert main(["check", str(recipe)]) == 2
    assert "model.heads.0.num_classes: 'num_classes' is set by the engine" in capsys.readouterr().err
