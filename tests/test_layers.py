"""The package's layers: a lower layer never imports a higher one; the engine does no I/O but its file format."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ocbank"
# Lowest first. Top-level modules not listed (cli, demo, synthetic) sit above everything.
LAYERS = ["errors", "_version", "jsonio", "engine", "config", "data", "model", "jobs", "serve", "integrations"]


def _layer(module: str) -> int:
    head = module.split(".")[0]
    return LAYERS.index(head) if head in LAYERS else len(LAYERS)


def _imports(path: Path) -> list[str]:
    rel = path.relative_to(PACKAGE).with_suffix("")
    package = list(rel.parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
                found.append(target or node.names[0].name)
            elif node.module and node.module.startswith("ocbank."):
                found.append(node.module[len("ocbank.") :])
        elif isinstance(node, ast.Import):
            found += [a.name[len("ocbank.") :] for a in node.names if a.name.startswith("ocbank.")]
    return found


def test_no_layer_imports_a_higher_one():
    bad = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.name == "__init__.py" and len(rel.parts) == 1:
            continue  # the package facade re-exports the public API
        own = _layer(".".join(rel.with_suffix("").parts))
        for target in _imports(path):
            if target and _layer(target) > own:
                bad.append(f"{rel} imports {target}")
    assert not bad, bad


def test_engine_opens_no_files_but_its_format():
    for path in (PACKAGE / "engine").glob("*.py"):
        if path.name in ("checkpoint.py", "cpu_search.py"):  # the bank file; the per-machine search choice
            continue
        text = path.read_text()
        assert "open(" not in text.replace("h5py.File", "") or path.name == "checkpoint.py", path


def test_only_the_detector_sets_its_config_and_fitted_state():
    """A Detector's config and fitted attributes (names ending in ``_``) change only through its own methods
    (fit, use_fitted, restore, read_with, note_update ...): no other module assigns them or reaches into
    its ``__dict__``."""
    bad = []
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "model" / "detector.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AugAssign | ast.AnnAssign) else []
            for target in targets:
                if not isinstance(target, ast.Attribute):
                    continue
                owner = ast.unparse(target.value)
                if owner.split(".")[-1] in ("det", "detector") and (target.attr.endswith("_") or target.attr == "config"):
                    bad.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {owner}.{target.attr}")
            if isinstance(node, ast.Attribute) and node.attr == "__dict__":
                owner = ast.unparse(node.value)
                if owner.split(".")[-1] in ("det", "detector"):
                    bad.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {owner}.__dict__")
    assert not bad, bad
