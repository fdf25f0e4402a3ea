"""README.md tells the truth: its plugin example works when copied; its commands exist."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, write

from lowdose_toolkit.cli.app import main
from lowdose_toolkit.core import plugin_manager as plugins
from lowdose_toolkit.core.recipe import safe_load
from lowdose_toolkit.testing import check_part, train_steps

README = (REPO / "README.md").read_text()


def block_after(marker: str, lang: str) -> str:
    start = README.index(marker)
    match = re.compile(rf"```{lang}\n(.*?)```", re.S).search(README, start)
    assert match, marker
    return match.group(1)


def test_plugin_example_installs_and_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    pyproject = block_after("`pyproject.toml`", "toml")
    module = block_after("`ldt_maxpool_head.py`", "python")
    snippet = block_after("a recipe names it", "yaml")
    name = re.search(r'name = "(.+?)"', pyproject).group(1)
    version = re.search(r'version = "(.+?)"', pyproject).group(1)
    entry = pyproject.split("[project.entry-points.lowdose_toolkit]\n", 1)[1]
    site = tmp_path / "site"
    write(site / "ldt_maxpool_head.py", module)
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    write(info / "METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    write(info / "entry_points.txt", "[lowdose_toolkit]\n" + entry.replace('"', ""))
    monkeypatch.syspath_prepend(str(site))
    plugins.reset()
    try:
        text = safe_load(snippet)
        text.update(name="readme", data={"drfs": [4, 100]})
        text["model"]["generator"] = {"name": "mlnet", "channels": 4, "depth": 2}
        recipe = write(tmp_path / "r.yaml", yaml.safe_dump(text))
        assert main(["check", str(recipe)]) == 0, capsys.readouterr().err
        assert "maxpool_head" in capsys.readouterr().out
        assert main(["plugins", "--json"]) == 0
        assert '"plugin": "maxpool_head"' in capsys.readouterr().out
        # ... and trains: the README's plugin through the conformance helper plugin authors use.
        check_part("head", "maxpool_head", {"hidden": 16})
        losses = train_steps("head", "maxpool_head", {"hidden": 16}, steps=2)
        assert all(math.isfinite(v) for step in losses for v in step.values())
    finally:
        plugins.reset()
        sys.modules.pop("ldt_maxpool_head", None)


def test_readme_commands_exist(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    listed = capsys.readouterr().out
    for command in re.findall(r"^\| `ldt (\w+)", README, re.M):
        assert command in listed, command
    assert "ldt run recipes/quickstart.yaml" in README and (REPO / "recipes" / "quickstart.yaml").is_file()
    assert 'pip install -e ".[test]" && pytest' in README
    assert 'pip install -e ".[test]"' in (REPO / ".ci" / "run").read_text()
