"""The README stays true and short: it opens with the two commands, CI runs the test one, the demo
and the Python example run, and every CLI command has its example."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ocbank import demo
from ocbank.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\s+```bash\n(.*?)```", text, re.S)
    assert block, "README needs a '## Quick start' section with a bash block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_quick_start_has_two_commands_and_ci_runs_the_test_one():
    commands = quick_start_commands()
    assert len(commands) == 2
    assert "ocbank.demo" in commands[0] and "pytest" in commands[1]
    # CI runs every step of the test command, in order, one per line (so that a failing step
    # fails the run), and may add steps between them (the docs build).
    steps = [step.strip() for step in commands[1].split(" && ")]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    positions = [ci.index(step) if step in ci else -1 for step in steps]
    assert -1 not in positions, f".ci/run lacks the README step {steps[positions.index(-1)]!r}"
    assert positions == sorted(positions), ".ci/run runs the README's steps out of order"
    assert "set -euo pipefail" in ci


def test_readme_is_short_and_opens_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150, "the README is for a newcomer's five minutes: move reference to docs/"
    assert re.findall(r"^## (.+)$", text, re.M)[0] == "Quick start"


def test_every_cli_command_has_an_example():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Command line\s+```bash\n(.*?)```", text, re.S).group(1)
    shown = {line.split()[1] for line in block.splitlines() if line.startswith("ocbank ")}
    sub = next(a for a in build_parser()._actions if a.dest == "command")  # noqa: SLF001
    assert set(sub.choices) <= shown, f"README lacks an example of {sorted(set(sub.choices) - shown)}"


@pytest.mark.slow
def test_python_example_runs(tmp_path, monkeypatch, capsys):
    code = re.search(r"## Python\s+```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    assert 'weights="none"' in code and len(code.strip().splitlines()) <= 12
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102
    assert "(6, 64, 64)" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    assert demo.main(["--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "weights 'none'" in out and "img AUROC" in out and "FAR %" in out
    assert f"report: {tmp_path / 'results' / 'report.html'}" in out and (tmp_path / "results" / "report.html").is_file()
    report = json.loads((tmp_path / "results" / "metrics.json").read_text())
    assert set(report["classes"]) == {"dots", "weave"}
    assert report["mean"]["pixel_auroc"] > 0.6  # random features still localise the synthetic defects
    assert len(list((tmp_path / "results" / "heatmaps").rglob("*.png"))) == 6
