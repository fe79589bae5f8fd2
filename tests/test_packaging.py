"""Packaging: import-time behaviour without FAISS, and the built wheel running the demo outside the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_without_faiss_names_the_extras():
    code = (
        "import sys; sys.modules['faiss'] = None\n"
        "try:\n    import ocbank\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "ocbank[cpu]" in out and "ocbank[gpu]" in out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """ocbank's wheel, built once from this checkout."""
    wheels = tmp_path_factory.mktemp("wheels")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(ROOT)],
        check=True,
        cwd=wheels,
    )
    return next(wheels.glob("ocbank-*.whl"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_wheel_carries_the_license(wheel):
    """The wheel's metadata names the license of LICENSE, and ships LICENSE itself."""
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
        meta = whl.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        shipped = [n for n in names if n.endswith("/LICENSE") and ".dist-info/" in n]
        assert shipped, f"LICENSE is not in the wheel: {names}"
        assert whl.read(shipped[0]).decode() == (ROOT / "LICENSE").read_text(encoding="utf-8")
    fields = {line.partition(": ")[0]: line.partition(": ")[2] for line in meta.split("\n\n")[0].splitlines()}
    declared = fields.get("License-Expression") or fields.get("License")
    assert declared == "Apache-2.0", f"METADATA declares license {declared!r}"
    assert "Apache License" in (ROOT / "LICENSE").read_text(encoding="utf-8").splitlines()[0]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_wheel_runs_the_demo_outside_the_checkout(wheel, tmp_path):
    """Install the wheel into a fresh venv, run the demo's smallest setting from elsewhere.

    The fresh venv borrows this environment's dependencies (torch, faiss, ...) through a .pth
    file, so nothing is downloaded; ocbank itself comes only from the wheel.
    """
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    (Path(site) / "borrowed_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", site, str(wheel)],
        check=True,
    )
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = subprocess.run(
        [str(py), "-c", "import ocbank, ocbank.config as c; print(ocbank.__file__); print(c.bundled_configs())"],
        capture_output=True, text=True, check=True, cwd=work, env=env,
    ).stdout
    assert where.startswith(site) and "mvtec" in where
    run = subprocess.run(
        [str(py), "-m", "ocbank.demo", "--smoke", "--quiet", "--out", "demo"],
        capture_output=True, text=True, cwd=work, env=env, timeout=540,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "img AUROC" in run.stdout and (work / "demo" / "results" / "metrics.json").is_file()
    assert "<table class=\"metrics\">" in (work / "demo" / "results" / "report.html").read_text()  # the packaged template
