"""MkDocs hook: pages quote generated text instead of hand-copied text.

Markers a page may contain (each is replaced at build time; a marker that cannot be resolved
fails the build, so a figure can never go stale silently):

- ``{{ cli }}``: the ``--help`` of ``ocbank`` and of each subcommand, from ``ocbank.cli.build_parser``.
- ``{{ source FILE }}``: where the figures next to it come from: ``benchmarks/results/FILE``,
  the machine it records and its date.
- ``{{ value FILE PATH FORMAT }}``: one number from ``benchmarks/results/FILE``. PATH is split
  on ``/`` (``classes/weave_224/bank_centroids``; a list index is a number; quote a path with
  spaces); FORMAT is a Python format spec (``,.0f``, ``.1%``, ``.2f``), ``x`` for a ratio
  (``2.6×``), ``pct`` (0.862 → ``86.2``) or ``s`` for a recorded name (a string).
- ``{{ harness DIR }}``: the mean-over-classes table that ``benchmarks/run.py`` wrote into
  ``benchmarks/results/DIR/results.md`` from its ``results.json``.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import subprocess
import sys
from contextlib import redirect_stdout
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
MARKER = re.compile(r"\{\{\s*(cli|source|value|harness)\b([^}]*)\}\}")


class MarkerError(Exception):
    """A marker that names a missing file, path or format."""


@cache
def _json(name: str) -> Any:
    path = RESULTS / name
    if not path.is_file():
        msg = f"benchmarks/results/{name} does not exist"
        raise MarkerError(msg)
    return json.loads(path.read_text(encoding="utf-8"))


def _date(name: str, data: Any) -> str:
    """The date the figures were measured: the file's own record, else the commit that added them."""
    machine = data.get("machine") if isinstance(data, dict) else None
    for where in (data, machine):
        if isinstance(where, dict) and where.get("date"):
            return str(where["date"])[:10]
    try:
        out = subprocess.run(
            ["git", "log", "-1", "--format=%cs", "--", str(RESULTS / name)],
            capture_output=True, text=True, cwd=ROOT, check=False, timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return f"committed {out}" if out else "date not recorded"


def _machine(data: Any) -> str:
    machine = data.get("machine") if isinstance(data, dict) else None
    if isinstance(machine, str):
        return machine
    if not isinstance(machine, dict):
        return "machine not recorded"
    parts = [str(machine[k]) for k in ("gpu", "cpu_model") if machine.get(k)]
    if machine.get("cpus"):
        parts.append(f"{machine['cpus']} CPUs")
    if machine.get("platform"):
        parts.append(str(machine["platform"]).split("-with-")[0])
    text = ", ".join(parts) or "machine not recorded"
    return f"{text} ({machine['note']})" if machine.get("note") else text


def source(name: str) -> str:
    folder = RESULTS / name
    data = _json(f"{name}/run_info.json") if folder.is_dir() else _json(name)
    shown = f"{name}/" if folder.is_dir() else name
    date = _date(f"{name}/results.json" if folder.is_dir() else name, data)
    return f"*Source: `benchmarks/results/{shown}`; machine: {_machine(data)}; {date}.*"


def value(name: str, path: str, fmt: str) -> str:
    node = _json(name)
    for part in path.split("/"):
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            msg = f"benchmarks/results/{name} has no {path!r} (failed at {part!r})"
            raise MarkerError(msg) from exc
    if fmt == "s" and isinstance(node, str):  # a recorded name, e.g. the BLAS kernel that ran
        return node
    if not isinstance(node, (int, float)) or isinstance(node, bool):
        msg = f"benchmarks/results/{name}: {path!r} is {node!r}, not a number"
        raise MarkerError(msg)
    if fmt == "x":
        return f"{node:.2g}×" if node < 10 else f"{node:.0f}×"
    if fmt == "pct":
        return f"{100 * node:.1f}"
    return format(node, fmt)


def harness(name: str) -> str:
    text = (RESULTS / name / "results.md").read_text(encoding="utf-8") if (RESULTS / name).is_dir() else ""
    block = re.search(r"^## mean\n\n(.*?)(?:\n\n|\Z)", text, re.S | re.M)
    if not block:
        msg = f"benchmarks/results/{name}/results.md has no '## mean' table"
        raise MarkerError(msg)
    # The harness writes 'nan' where it did not measure (e.g. e2e from cached features).
    return block.group(1).replace("| nan |", "| – |").strip() + "\n\n" + source(name)


def cli() -> str:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from ocbank.cli import build_parser  # noqa: PLC0415

    parser = build_parser()
    sections = [("ocbank", parser)]
    for action in parser._subparsers._group_actions:  # noqa: SLF001  (argparse has no public walk)
        sections += [(f"ocbank {name}", sub) for name, sub in action.choices.items()]
    out = []
    for title, p in sections:
        buffer = io.StringIO()
        with redirect_stdout(buffer):
            p.print_help()
        out.append(f"## `{title}`\n\n```text\n{buffer.getvalue().rstrip()}\n```\n")
    return "\n".join(out)


def render(match: re.Match[str]) -> str:
    kind, args = match.group(1), shlex.split(match.group(2))
    if kind == "cli":
        return cli()
    if kind == "source" and len(args) == 1:
        return source(args[0])
    if kind == "value" and len(args) == 3:
        return value(*args)
    if kind == "harness" and len(args) == 1:
        return harness(args[0])
    msg = f"malformed marker {match.group(0)!r}"
    raise MarkerError(msg)


def on_files(files: Any, config: Any) -> Any:
    """MkDocs event: publish the benchmark plots under ``benchmarks/results/`` so pages can show them."""
    from mkdocs.structure.files import File  # noqa: PLC0415

    for png in sorted(RESULTS.rglob("*.png")):
        files.append(File(str(png.relative_to(ROOT)), src_dir=str(ROOT), dest_dir=config["site_dir"],
                          use_directory_urls=config["use_directory_urls"]))
    return files


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """MkDocs event: replace every marker on the page."""
    try:
        return MARKER.sub(render, markdown)
    except MarkerError as exc:
        from mkdocs.exceptions import PluginError  # noqa: PLC0415

        msg = f"{page.file.src_uri}: {exc}"
        raise PluginError(msg) from exc
