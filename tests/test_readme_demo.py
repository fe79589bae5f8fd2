"""The README's Quick start stays true: CI runs its test command, and the demo runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ocbank import demo

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


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert demo.main(["--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "weights 'none'" in out and "img AUROC" in out and "FAR %" in out
    assert f"report: {tmp_path / 'results' / 'report.html'}" in out and (tmp_path / "results" / "report.html").is_file()
    report = json.loads((tmp_path / "results" / "metrics.json").read_text())
    assert set(report["classes"]) == {"dots", "weave"}
    assert report["mean"]["pixel_auroc"] > 0.6  # random features still localise the synthetic defects
    assert len(list((tmp_path / "results" / "heatmaps").rglob("*.png"))) == 6
