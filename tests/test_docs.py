"""The docs cannot drift from the code: the config table matches the dataclasses, and the CLI
reference and every figure written into docs/*.md match the parser and benchmarks/results/."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from ocbank import cli, config

from .test_layers import LAYERS, PACKAGE

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


def test_generated_docs_are_current():
    """The figures and the CLI reference written into docs/*.md match their sources."""
    hook = _hook()
    stale = hook.stale_pages()
    assert not stale, f"{', '.join(f'docs/{n}' for n in stale)}: generated text is stale. Run `{hook.REGENERATE}`."
    assert hook.REGENERATE == "python docs/hooks/generated.py --write"


def test_pages_read_right_as_plain_markdown():
    """No raw template marker, and no region marker opening a line where GitHub would show the line as raw HTML."""
    hook = _hook()
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text(encoding="utf-8")
        assert "{{" not in text, f"docs/{page.name} has a template marker GitHub shows as is"
        for number, line in enumerate(text.splitlines(), 1):
            if line.lstrip().startswith(hook.OPEN):
                kind = line.lstrip()[len(hook.OPEN):].split()[0]
                assert kind in hook.BLOCK_KINDS and line.rstrip().endswith("-->"), (
                    f"docs/{page.name}:{number}: an inline region starts the line; move a word in front of it"
                )


def test_a_stale_region_is_found_and_rewritten(tmp_path):
    hook = _hook()
    wanted = hook.value("build_cpu.json", "final_centroids", ",d")
    page = tmp_path / "page.md"
    page.write_text(
        "K is <!-- generated:value build_cpu.json final_centroids ,d -->12<!-- /generated --> here.\n\n"
        "<!-- generated:source build_cpu.json -->\n\nold\n\n<!-- /generated -->\n",
        encoding="utf-8",
    )
    (tmp_path / "fresh.md").write_text(f"K <!-- generated:value build_cpu.json final_centroids ,d -->{wanted}<!-- /generated -->")
    assert hook.stale_pages(tmp_path) == ["page.md"]
    assert hook.write(tmp_path) == ["page.md"]
    assert hook.stale_pages(tmp_path) == []
    text = page.read_text(encoding="utf-8")
    assert f"-->{wanted}<!--" in text and f"\n\n{hook.source('build_cpu.json')}\n\n" in text
    assert hook.strip(text).startswith(f"K is {wanted} here.")


def test_the_site_build_refuses_a_stale_or_broken_page():
    from mkdocs.exceptions import PluginError

    hook = _hook()
    page = SimpleNamespace(file=SimpleNamespace(src_uri="x.md"))
    current = hook.regenerate("n = <!-- generated:value build_cpu.json dim d -->0<!-- /generated -->")
    assert hook.on_page_markdown(current, page) == f"n = {hook.value('build_cpu.json', 'dim', 'd')}"
    with pytest.raises(PluginError, match=re.escape(hook.REGENERATE)):
        hook.on_page_markdown("n = <!-- generated:value build_cpu.json dim d -->0<!-- /generated -->", page)
    with pytest.raises(PluginError, match="needs one"):
        hook.on_page_markdown("n = <!-- generated:value build_cpu.json dim d -->0", page)
    with pytest.raises(PluginError, match="no 'nope'"):
        hook.on_page_markdown("<!-- generated:value build_cpu.json nope d -->0<!-- /generated -->", page)


def test_the_cli_reference_covers_every_command_and_option():
    """Walk the parser independently of the hook: every subcommand has its section, every option its row."""
    from ocbank.cli import build_parser

    text = _hook().cli()
    parser = build_parser()

    def walk(title, p):
        assert f"## `{title}`" in text, f"no section for {title}"
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(f"{title} {name}", sub)
            elif not isinstance(action, argparse._HelpAction):
                for option in action.option_strings:
                    assert re.search(rf"`{re.escape(option)}[ `]", text), f"{title}: {option} is missing"

    walk("ocbank", parser)
    assert f"| `--checkpoint-every N` | `{cli.DEFAULT_CHECKPOINT_EVERY}` |" in text
    assert "&lt;class&gt;.h5" in text  # angle brackets escaped: a table cell would swallow them as a tag


def test_the_cli_reference_shows_defaults_and_escapes_help():
    hook = _hook()
    parser = argparse.ArgumentParser(prog="x")
    parser.add_argument("--n", type=int, default=0, help="a count (default %(default)s)")
    parser.add_argument("--on", action="store_true", help="a | b <c>")
    parser.add_argument("bank", help="the bank")
    sub = parser.add_subparsers()
    sub.add_parser("undo", help="undo it").add_argument("--to", required=True)
    text = "\n\n".join(hook._walk("x", parser, ""))
    assert "| `--n N` | `0` | a count (default 0) |" in text  # a zero default is still shown
    assert "| `--on` |  | a \\| b &lt;c&gt; |" in text
    assert "| `bank` | required | the bank |" in text and "x [options] bank COMMAND ..." in text
    assert "## `x undo`" in text and "x undo --to TO" in text and "[`undo`](#x-undo)" in text


def test_the_regenerate_command_runs_from_the_checkout():
    done = subprocess.run(
        [sys.executable, "docs/hooks/generated.py", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr


def test_benchmark_figures_come_from_the_json():
    hook = _hook()
    assert hook.value("build_cpu.json", "final_centroids", ",d") == f"{hook._json('build_cpu.json')['final_centroids']:,d}"
    assert "2 CPUs" in hook.source("build_cpu.json")
    assert f"committed {hook._json('build_cpu.json')['committed']}" in hook.source("build_cpu.json")
    measured = hook._json("anomalib_compare_cpu.json")["machine"]["date"]
    assert hook.source("anomalib_compare_cpu.json").endswith(f"; {measured[:10]}.*")
    with pytest.raises(hook.MarkerError, match="no 'nope'"):
        hook.value("build_cpu.json", "nope", ".1f")
    with pytest.raises(hook.MarkerError, match="does not exist"):
        hook.source("missing.json")


def _api_members() -> dict[str, list[str]]:
    """docs/api.md: object path -> its explicit ``members`` list (the order the page shows them in)."""
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    out = {}
    for match in re.finditer(r"^::: (\S+)\n((?:    .*\n)+)", text, re.M):
        options = yaml.safe_load(textwrap.dedent(match.group(2)))["options"]
        if "members" in options:
            out[match.group(1)] = options["members"]
    return out


@pytest.mark.parametrize(
    ("path", "first"),
    [
        ("ocbank.model.detector.Detector", ["fit", "predict"]),
        ("ocbank.engine.bank.ClusterBank", ["fit"]),
        pytest.param("ocbank.integrations.anomalib.OCBank", ["from_bank"], marks=pytest.mark.slow),  # imports anomalib
    ],
)
def test_the_api_page_lists_every_public_member(path, first):
    """The page orders members by hand (what a user calls first), so a new or renamed one must be listed."""
    module, _, name = path.rpartition(".")
    if module.endswith("anomalib"):
        pytest.importorskip("anomalib")
    cls = getattr(importlib.import_module(module), name)
    public = {n for n in vars(cls) if not n.startswith("_")}
    listed = _api_members()[path]
    assert len(listed) == len(set(listed)), f"docs/api.md lists a member of {name} twice"
    assert set(listed) == public, (
        f"docs/api.md's members of {name}: add {sorted(public - set(listed))}, remove {sorted(set(listed) - public)}"
    )
    assert listed[: len(first)] == first
    for title in ("Prediction", "Decision", "OCBank", "ServeOptions"):
        assert f"\n## {title}" in (DOCS / "api.md").read_text(encoding="utf-8")


def test_architecture_page_matches_the_layers_test():
    """docs/architecture.md gives test_layers.py's order and names every module under its layer."""
    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    order = " < ".join(f"`{name}`" for name in LAYERS)
    assert order in text, f"docs/architecture.md must give the layers in test_layers.py's order: {order}"
    tree = re.search(r"^```\n(.*?)^```", text, re.S | re.M).group(1)
    sections: dict[str, str] = {}
    for line in tree.splitlines():
        if line and not line[0].isspace():
            head = re.split(r"[/.,\s]", line, maxsplit=1)[0]
            sections[head] = ""
        sections[head] += line + "\n"
    below_cli = [name for name in reversed(sections) if name in LAYERS]
    assert below_cli == LAYERS and list(sections)[0] not in LAYERS, (
        f"docs/architecture.md's tree must list the layers highest first: {list(reversed(LAYERS))} under the top-level modules"
    )
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.name == "__init__.py":
            continue
        if len(rel.parts) == 1:
            section, name = sections.get(rel.stem) or next(iter(sections.values())), rel.name
        else:
            section, name = sections.get(rel.parts[0], ""), rel.stem
        # listed as an item: "name," / "name (what it does)" / "name" at a line's end
        if not re.search(rf"(?<![\w.]){re.escape(name)}(?=[\s,(]|$)", section, re.M):
            missing.append(str(rel))
    assert not missing, f"docs/architecture.md does not list {missing} under their layer"


def test_the_paper_is_cited_the_same_way_everywhere():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    paper = cff["preferred-citation"]
    authors = " and ".join(f"{a['given-names']} {a['family-names']}" for a in paper["authors"])
    assert cff["license"] == "Apache-2.0" and {a["affiliation"] for a in paper["authors"]} == {"Soongsil University"}
    for page in (ROOT / "README.md", DOCS / "index.md"):
        text = " ".join(page.read_text(encoding="utf-8").replace(">", " ").split())
        assert f"{authors}, *{paper['title']}*, Soongsil University." in text, f"{page.name} does not cite the paper as CITATION.cff does"
