"""The README's "Next: use the demo's banks" block runs as written against the demo's output:
its predict and update commands are run, its serve command parses with options that exist and
its curl calls name files the demo wrote and routes the service has."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from ocbank import ClusterBank, demo
from ocbank.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def next_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Next: use the demo's banks\n.*?```bash\n(.*?)```", text, re.S)
    assert block, "README needs a 'Next: use the demo's banks' section with a bash block"
    return [shlex.split(line, comments=True) for line in block.group(1).splitlines() if line.strip()]


def test_the_block_comes_right_after_the_quick_start():
    headings = re.findall(r"^## (.+)$", (ROOT / "README.md").read_text(encoding="utf-8"), re.M)
    assert headings[:2] == ["Quick start", "Next: use the demo's banks"]
    programs = [argv[0] for argv in next_commands()]
    assert programs.count(".venv/bin/ocbank") == 3 and programs.count("curl") == 2
    assert [argv[1] for argv in next_commands() if argv[0] == ".venv/bin/ocbank"] == ["predict", "serve", "update"]


@pytest.mark.slow
def test_the_block_runs_against_the_demo_output(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert demo.main(["--out", "demo_out", "--smoke", "-q"]) == 0  # the demo's layout, at its smallest
    routes = re.findall(r"^\| `(GET|POST) (/v1/[^`]+)` \|", (ROOT / "docs" / "serving.md").read_text(), re.M)
    before = ClusterBank.load("demo_out/banks/dots.h5").n_seen
    for argv in next_commands():
        args = [a for a in argv if a != "&"]
        if args[0] == ".venv/bin/ocbank" and args[1] == "serve":
            parsed = build_parser().parse_args(args[1:])  # options that exist; serving itself is tested elsewhere
            assert sorted(p.name for p in Path(parsed.banks).glob("*.h5")) == ["dots.h5", "weave.h5"]
        elif args[0] == ".venv/bin/ocbank":
            assert main(args[1:]) == 0, args
        elif args[0] == "curl":
            method = "POST"  # an upload (--data-binary) or a reload (-X POST)
            files = [a[1:] for a in args if a.startswith("@")]
            assert all(Path(f).is_file() for f in files), files
            path = re.sub(r"^https?://[^/]+", "", next(a for a in args if a.startswith("http")))
            assert (method, re.sub(r"/dots(?=/|$)", "/{product}", path)) in routes, path
        else:
            pytest.fail(f"the block runs only ocbank and curl, got {args}")
    assert (tmp_path / "demo_out" / "predict" / "scores.csv").is_file()
    after = ClusterBank.load("demo_out/banks/dots.h5")
    assert after.n_seen > before and len(after.metadata_["lineage"]) == 1
    out = capsys.readouterr().out
    assert "demo_out/predict/scores.csv" in out and "wrote demo_out/banks/dots.h5" in out
