"""``ocbank doctor``: what runs here, with optional parts absent, and the generic-kernel warning."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from ocbank import doctor
from ocbank.cli import main
from ocbank.engine import cpu_search
from ocbank.engine._faiss import faiss


@pytest.fixture
def bare_machine(monkeypatch):
    """No CUDA, no faiss GPU build, no onnxruntime, no Ray: each import fails as when not installed."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delattr(faiss, "StandardGpuResources", raising=False)


def test_doctor_names_each_absent_part(bare_machine):
    report = doctor.collect(measure=False)
    versions = report["versions"]
    assert versions["onnxruntime"] is None and versions["ray"] is None
    assert set(versions["absent"]) == {"onnxruntime", "ray"}
    assert versions["torch"] == torch.__version__ and versions["faiss"] == faiss.__version__
    assert report["cuda"]["available"] is False and report["cuda"]["faiss_gpu_build"] is False
    text = doctor.render(report)
    assert "onnxruntime: absent (not installed" in text and "ray: absent (not installed" in text
    assert "cuda: absent" in text and "faiss GPU build: absent" in text
    assert "search" not in report  # measure=False: no timings


def test_doctor_lists_the_blas_libraries_and_cpu():
    report = doctor.collect(measure=False)
    names = [lib["library"] for lib in report["blas"]]
    assert names and all(lib["version"] for lib in report["blas"])
    # Which package bundled each BLAS, never this machine's paths (the report goes into committed benchmark JSON).
    assert any(lib["bundled_in"].startswith("faiss") for lib in report["blas"])
    assert os.sep not in json.dumps(report["blas"])
    assert report["torch"]["threads"] == torch.get_num_threads()
    info = cpu_search.cpu_info()
    assert report["cpu"]["model"] == info["model"]
    assert set(report["cpu"]["vector_extensions"]) <= set(info["flags"])


def test_a_generic_kernel_on_an_avx2_cpu_is_warned_once_per_library():
    avx512 = {"vector_extensions": ["avx2", "avx512f"]}
    blas = [
        {"library": "libopenblaso-0.3.15.so", "version": "0.3.15", "architecture": "Prescott"},
        {"library": "libopenblaso-0.3.15.so", "version": "0.3.15", "architecture": "Barcelona"},
        {"library": "libscipy_openblas.so", "version": "0.3.31", "architecture": "SkylakeX"},
        {"library": "libmkl.so", "version": "2024", "architecture": None},
    ]
    warned = doctor.warnings_for(blas, avx512)
    assert len(warned) == 2 and "Prescott" in warned[0] and "Barcelona" in warned[1]
    assert all("\n" not in w and "AVX512F/AVX2" in w for w in warned)
    assert doctor.warnings_for(blas, {"vector_extensions": ["sse4_2", "avx"]}) == []  # an old CPU: the kernel fits


def test_cpu_info_without_proc_cpuinfo(monkeypatch):
    class Missing:
        def __init__(self, *a):
            pass

        def read_text(self, *a, **k):
            raise FileNotFoundError("/proc/cpuinfo")

    monkeypatch.setattr(cpu_search, "Path", Missing)
    info = cpu_search.cpu_info()
    assert info["flags"] == [] and info["vendor"] is None
    report = doctor.collect(measure=False)
    assert report["cpu"]["vector_extensions"] == [] and report["warnings"] == []
    assert "unknown (the OS lists no CPU flags)" in doctor.render(report)


def test_cli_doctor_writes_strict_json_and_measures(bare_machine, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(cpu_search.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(cpu_search.CHOICE_ENV, raising=False)
    monkeypatch.setattr(cpu_search, "MEASURE_SHAPE", (16, 64, 32))
    monkeypatch.setattr(doctor, "GEMM_SHAPE", (16, 64, 32))
    out = tmp_path / "doctor.json"
    assert main(["doctor", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    s = report["search"]
    assert min(s[f"{name}_knn_gflops"] for name in ("faiss", "torch", "numpy")) > 0 and s["numpy_gemm_gflops"] > 0
    assert s["auto_picks"] in ("faiss", "torch", "numpy") and f"cpu_search auto picks {s['auto_picks']}" in printed
    assert f"numpy {s['numpy_knn_gflops']:.0f} GFLOP/s" in printed
    assert main(["doctor", "--json", "--no-measure"]) == 0
    assert "search" not in json.loads(capsys.readouterr().out)
