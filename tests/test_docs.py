"""The docs site cannot drift from the code: the config table matches the dataclasses, and every
generated figure resolves against benchmarks/results/."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from ocbank import config

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _config_table() -> dict[str, list[str]]:
    """Rows of the configuration page's key table: key -> its cells."""
    rows: dict[str, list[str]] = {}
    for line in (DOCS / "configuration.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        match = re.fullmatch(r"`([a-z_.]+)`", cells[0]) if line.startswith("|") else None
        if match:
            assert match.group(1) not in rows, f"{match.group(1)} appears twice in docs/configuration.md"
            rows[match.group(1)] = cells[1:]
    return rows


def test_every_config_key_is_documented_with_its_default():
    defaults = _flatten(config.Config().to_dict())
    rows = _config_table()
    assert set(rows) == set(defaults), (
        f"docs/configuration.md is out of step with ocbank/config.py: missing {sorted(set(defaults) - set(rows))}, "
        f"unknown {sorted(set(rows) - set(defaults))}"
    )
    for key, cells in rows.items():
        shown = re.fullmatch(r"`(.*)`", cells[0])
        assert shown, f"{key}: the default column must be one `value`, got {cells[0]!r}"
        assert yaml.safe_load(shown.group(1)) == defaults[key], f"{key}: documented default {cells[0]}"
        assert all(cells[1:]), f"{key}: say what it accepts and what it means"


def _hook():
    spec = importlib.util.spec_from_file_location("docs_hook", DOCS / "hooks" / "generated.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_generated_text_resolves(page):
    hook = _hook()
    text = (DOCS / page).read_text(encoding="utf-8")
    out = hook.MARKER.sub(hook.render, text)  # raises MarkerError on a missing file, key or format
    assert "{{" not in out, f"docs/{page} has a marker the hook does not know"


def test_benchmark_figures_come_from_the_json():
    hook = _hook()
    assert hook.value("build_cpu.json", "final_centroids", ",d") == f"{hook._json('build_cpu.json')['final_centroids']:,d}"
    assert "2 CPUs" in hook.source("build_cpu.json")
    with pytest.raises(hook.MarkerError, match="no 'nope'"):
        hook.value("build_cpu.json", "nope", ".1f")
    with pytest.raises(hook.MarkerError, match="does not exist"):
        hook.source("missing.json")
