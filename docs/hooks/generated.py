"""Generated text in the docs: figures and the CLI reference live in the Markdown itself.

A page marks each generated region with two HTML comments, which GitHub and MkDocs both hide, so
the page reads right as plain Markdown as well as on the site::

    K = <!-- generated:value build_cpu.json final_centroids ,d -->1,234<!-- /generated -->

    <!-- generated:cli -->

    ...the CLI reference...

    <!-- /generated -->

Regions (KIND and its arguments, after ``generated:``):

- ``cli``: the reference of ``ocbank`` and of each subcommand, from ``ocbank.cli.build_parser``.
- ``source FILE``: where the figures next to it come from: ``benchmarks/results/FILE``, the
  machine it records and its date.
- ``value FILE PATH FORMAT``: one number from ``benchmarks/results/FILE``. PATH is split on ``/``
  (``classes/weave_224/bank_centroids``; a list index is a number; quote a path with spaces);
  FORMAT is a Python format spec (``,.0f``, ``.1%``, ``.2f``), ``x`` for a ratio (``2.6×``),
  ``pct`` (0.862 → ``86.2``) or ``s`` for a recorded name (a string).
- ``harness DIR``: the mean-over-classes table that ``benchmarks/run.py`` wrote into
  ``benchmarks/results/DIR/results.md`` from its ``results.json``.

``python docs/hooks/generated.py --write`` rewrites every region from its source (run it after
changing the CLI or a committed result); ``--check`` lists the stale pages. ``tests/test_docs.py``
runs the check, and as an MkDocs hook this module fails the build on a stale page or a region that
cannot be resolved, so a figure can never go stale silently.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
RESULTS = ROOT / "benchmarks" / "results"
# The one command that brings every generated region up to date.
REGENERATE = "python docs/hooks/generated.py --write"
OPEN = "<!-- generated:"
CLOSE = "<!-- /generated -->"
REGION = re.compile(re.escape(OPEN) + r"(\w+)(.*?)-->(.*?)" + re.escape(CLOSE), re.S)
# Kinds whose text is whole paragraphs or tables: their markers stand on lines of their own.
BLOCK_KINDS = frozenset({"cli", "source", "harness"})


class MarkerError(Exception):
    """A region that names a missing file, path or format, or is malformed."""


@cache
def _json(name: str) -> Any:
    path = RESULTS / name
    if not path.is_file():
        msg = f"benchmarks/results/{name} does not exist"
        raise MarkerError(msg)
    return json.loads(path.read_text(encoding="utf-8"))


def _date(data: Any) -> str:
    """When the figures were measured (the file's own record), else when they were committed."""
    machine = data.get("machine") if isinstance(data, dict) else None
    for where in (data, machine):
        if isinstance(where, dict) and where.get("date"):
            return str(where["date"])[:10]
    if isinstance(data, dict) and data.get("committed"):
        return f"committed {data['committed']}"
    return "date not recorded"


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
    return f"*Source: `benchmarks/results/{shown}`; machine: {_machine(data)}; {_date(data)}.*"


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


# --- the CLI reference: Markdown tables built from the parser's actions, so the text does not
# depend on argparse's help layout (which changes with the Python version and terminal width).


def _escape(text: str) -> str:
    """Plain text -> Markdown that shows it as written, also inside a table cell."""
    text = re.sub(r"([\\|*_\[\]`])", r"\\\1", text)
    return text.replace("<", "&lt;").replace(">", "&gt;")


def _metavar(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    if action.metavar is not None:
        name = " ".join(action.metavar) if isinstance(action.metavar, tuple) else str(action.metavar)
    elif action.choices is not None:
        name = "{" + ",".join(map(str, action.choices)) + "}"
    else:
        name = action.dest.upper() if action.option_strings else action.dest
    nargs = action.nargs
    if nargs == "?":
        return f"[{name}]"
    if nargs == "*":
        return f"[{name} ...]"
    if nargs == "+":
        return f"{name} [{name} ...]"
    if isinstance(nargs, int):
        return " ".join([name] * nargs)
    return name


def _call(action: argparse.Action) -> str:
    """How the action is written on a command line: ``--out OUT``, ``--debug``, ``BANK``."""
    metavar = _metavar(action)
    if not action.option_strings:
        return metavar
    return f"{action.option_strings[-1]} {metavar}".strip()


def _shown(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The actions a reader types: not -h/--help, not hidden, not the subcommand choice."""
    return [
        a for a in parser._actions  # noqa: SLF001  (argparse has no public walk)
        if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))  # noqa: SLF001
        and a.help is not argparse.SUPPRESS
    ]


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser, str]]:
    out = []
    for action in parser._actions:  # noqa: SLF001
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}  # noqa: SLF001
            seen: set[int] = set()
            for name, sub in action.choices.items():
                if id(sub) not in seen:  # an alias maps to the same parser
                    seen.add(id(sub))
                    out.append((name, sub, helps.get(name, "")))
    return out


def _usage(title: str, parser: argparse.ArgumentParser) -> str:
    actions = _shown(parser)
    words = [title]
    words += [_call(a) for a in actions if a.option_strings and a.required]
    if any(a.option_strings and not a.required for a in actions):
        words.append("[options]")
    words += [_call(a) for a in actions if not a.option_strings]
    if _subcommands(parser):
        words.append("COMMAND ...")
    return " ".join(words)


def _help(action: argparse.Action, prog: str) -> str:
    text = action.help or ""
    if "%(" in text:  # argparse's own substitutions, e.g. %(default)s
        text = text % {**vars(action), "prog": prog}
    return _escape(" ".join(text.split()))


def _section(title: str, parser: argparse.ArgumentParser, summary: str) -> Iterator[str]:
    yield f"## `{title}`"
    about = summary or parser.description or ""
    if about:
        yield _escape(about)
    yield f"```text\n{_usage(title, parser)}\n```"
    rows = []
    for action in _shown(parser):
        names = [f"`{s}`" for s in action.option_strings[:-1]] + [f"`{_call(action)}`"]
        flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._VersionAction))  # noqa: SLF001
        if action.required:
            default = "required"
        elif flag or action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            default = ""
        else:
            default = "`" + str(action.default).replace("|", "\\|") + "`"
        rows.append(f"| {', '.join(names)} | {default} | {_help(action, parser.prog)} |")
    if rows:
        yield "| option | default | description |\n| --- | --- | --- |\n" + "\n".join(rows)
    commands = _subcommands(parser)
    if commands:
        yield "| command | description |\n| --- | --- |\n" + "\n".join(
            f"| [`{name}`](#{_anchor(f'{title} {name}')}) | {_escape(text)} |" for name, _, text in commands
        )


def _anchor(title: str) -> str:
    """The heading id of ``## `title` `` on GitHub and in MkDocs (both lower-case, dashes for spaces)."""
    return re.sub(r"[^a-z0-9_\- ]", "", title.lower()).replace(" ", "-")


def _walk(title: str, parser: argparse.ArgumentParser, summary: str) -> Iterator[str]:
    yield "\n\n".join(_section(title, parser, summary))
    for name, sub, text in _subcommands(parser):
        yield from _walk(f"{title} {name}", sub, text)


def cli() -> str:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from ocbank.cli import build_parser  # noqa: PLC0415

    parser = build_parser()
    return "\n\n".join(_walk(parser.prog, parser, ""))


# --- regions


def render(kind: str, arguments: str) -> str:
    """The text of one region from its kind and arguments (``value build_cpu.json final_centroids ,d``)."""
    args = shlex.split(arguments)
    if kind == "cli" and not args:
        return cli()
    if kind == "source" and len(args) == 1:
        return source(args[0])
    if kind == "value" and len(args) == 3:
        return value(*args)
    if kind == "harness" and len(args) == 1:
        return harness(args[0])
    msg = f"malformed region {OPEN}{kind}{arguments}-->"
    raise MarkerError(msg)


def _regions(markdown: str) -> list[re.Match[str]]:
    found = list(REGION.finditer(markdown))
    if len(found) != markdown.count(OPEN) or len(found) != markdown.count(CLOSE):
        msg = f"every '{OPEN}KIND ARGS -->' needs one '{CLOSE}' after it"
        raise MarkerError(msg)
    return found


def regenerate(markdown: str) -> str:
    """The page with every region's text rendered afresh (block regions keep a blank line around the text)."""
    _regions(markdown)

    def one(match: re.Match[str]) -> str:
        kind, arguments = match.group(1), match.group(2)
        text = render(kind, arguments)
        if kind in BLOCK_KINDS:
            text = f"\n\n{text}\n\n"
        return f"{OPEN}{kind}{arguments}-->{text}{CLOSE}"

    return REGION.sub(one, markdown)


def stale_pages(docs: Path = DOCS) -> list[str]:
    """Pages under ``docs`` whose generated text differs from what :func:`regenerate` writes."""
    stale = []
    for page in sorted(docs.glob("*.md")):
        text = page.read_text(encoding="utf-8")
        try:
            if regenerate(text) != text:
                stale.append(page.name)
        except MarkerError as exc:
            msg = f"docs/{page.name}: {exc}"
            raise MarkerError(msg) from exc
    return stale


def write(docs: Path = DOCS) -> list[str]:
    """Rewrite the stale pages under ``docs``; return their names."""
    stale = stale_pages(docs)
    for name in stale:
        page = docs / name
        page.write_text(regenerate(page.read_text(encoding="utf-8")), encoding="utf-8")
    return stale


def strip(markdown: str) -> str:
    """The page without its region markers (what the site renders)."""
    return REGION.sub(lambda m: m.group(3), markdown)


def on_files(files: Any, config: Any) -> Any:
    """MkDocs event: publish the benchmark plots under ``benchmarks/results/`` so pages can show them."""
    from mkdocs.structure.files import File  # noqa: PLC0415

    for png in sorted(RESULTS.rglob("*.png")):
        files.append(File(str(png.relative_to(ROOT)), src_dir=str(ROOT), dest_dir=config["site_dir"],
                          use_directory_urls=config["use_directory_urls"]))
    return files


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """MkDocs event: refuse a page whose generated text is stale; render it without the markers."""
    from mkdocs.exceptions import PluginError  # noqa: PLC0415

    try:
        current = regenerate(markdown) == markdown
    except MarkerError as exc:
        msg = f"{page.file.src_uri}: {exc}"
        raise PluginError(msg) from exc
    if not current:
        msg = f"{page.file.src_uri}: its generated text is stale. Run `{REGENERATE}`."
        raise PluginError(msg)
    return strip(markdown)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Rewrite or check the generated regions of docs/*.md.")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite every stale page")
    mode.add_argument("--check", action="store_true", help="list the stale pages; exit 1 if any")
    args = ap.parse_args(argv)
    try:
        if args.write:
            for name in write():
                print(f"rewrote docs/{name}")
            return 0
        stale = stale_pages()
    except MarkerError as exc:
        print(f"generated.py: error: {exc}", file=sys.stderr)
        return 2
    if stale:
        print(f"stale: {', '.join(f'docs/{n}' for n in stale)}. Run `{REGENERATE}`.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
