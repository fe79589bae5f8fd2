"""benchmarks.gpu_check: --smoke runs every part's code on the CPU at tiny sizes, so the GPU check cannot rot."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import gpu_check


def _strict(path) -> dict:
    def refuse(token: str) -> None:
        raise AssertionError(f"non-strict JSON token {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def _targets(tree):
    """Every {"value", "target", "met"} record in the report."""
    if isinstance(tree, dict):
        if set(tree) == {"value", "target", "met"}:
            yield tree
        for v in tree.values():
            yield from _targets(v)


@pytest.mark.slow
def test_smoke_runs_every_part_and_every_check_passes(tmp_path, capsys):
    assert gpu_check.main(["--smoke", "--out", str(tmp_path)]) == 0
    report = _strict(tmp_path / "gpu_check.json")
    assert report["smoke"] is True and report["device"] == "cpu" and report["all_checks_passed"] is True
    assert report["parts_with_errors"] == []
    assert set(report["parts"]) == {name for name, _, _ in gpu_check.PARTS}
    for name, part in report["parts"].items():
        assert part["status"] in ("ran", "partial", "skipped"), (name, part)
        if part["status"] != "ran":
            assert part["notes"], f"{name} is {part['status']} without a note"
    checks = report["parts"]["tests"]["checks"]
    expected = {f"{op}_{p}" for op in ("add", "search") for p in ("fp32", "fp16", "bf16")}
    expected |= {"cap", "m2", "checkpoint_device_to_cpu", "checkpoint_cpu_to_device", "detector_fit_predict"}
    assert set(checks) == expected and all(checks.values())
    # The torch store ran (the code path of a CUDA machine with faiss-cpu), in each precision.
    assert report["parts"]["tests"]["figures"]["add_bf16_backend"] == {"device": "cpu", "search": "torch", "precision": "bf16"}
    # Targets sit next to their figures; a smoke run meets or misses none of them.
    records = list(_targets(report["parts"]))
    assert {r["target"] for r in records} >= {gpu_check.TARGETS["half_search_recall_at_1"],
                                              gpu_check.TARGETS["bank_vectors_per_s"]}
    assert all(r["met"] is None for r in records)
    assert report["parts"]["search_140k"]["figures"]["bf16_recall_at_1"]["value"] >= 0.99
    # Peak device memory is present as null with a note on the CPU.
    mem = report["parts"]["e2e_224"]["figures"]["fp32_score_peak_device_memory"]
    assert mem["torch_max_allocated_bytes"] is None and mem["nvml_process_bytes"] is None and "CUDA" in mem["note"]
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("wrote ")  # the table comes last


def test_a_spent_budget_skips_parts_by_name(tmp_path):
    assert gpu_check.main(["--smoke", "--out", str(tmp_path), "--parts", "search_140k,jpeg", "--budget", "1e-9"]) == 1
    report = _strict(tmp_path / "gpu_check.json")
    assert set(report["parts"]) == {"search_140k", "jpeg"} and report["all_checks_passed"] is None
    for part in report["parts"].values():
        assert part["status"] == "skipped" and "budget" in part["notes"][0]


@pytest.mark.parametrize(
    "argv",
    [["--parts", "tests,warp"], ["--budget", "0"], pytest.param(["--device", "cuda"], marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="CUDA is present"))],
)
def test_usage_errors_exit_2_and_write_nothing(tmp_path, argv):
    assert gpu_check.main(["--out", str(tmp_path), "--smoke", *argv]) == 2
    assert not (tmp_path / "gpu_check.json").exists()


def test_peak_memory_reads_torch_and_the_pids_nvml_share(monkeypatch):
    """PeakMemory on 'cuda:1' with fake torch.cuda and pynvml: CUDA_VISIBLE_DEVICES maps to NVML's numbering."""
    import os
    import sys
    import types

    from benchmarks.common import PeakMemory

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append(("reset", device)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 123_456)
    proc = types.SimpleNamespace
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: calls.append(("nvml index", i)) or f"gpu{i}",
        nvmlDeviceGetHandleByUUID=lambda u: f"uuid:{u}",
        nvmlDeviceGetComputeRunningProcesses=lambda h: [proc(pid=os.getpid(), usedGpuMemory=7_000_000),
                                                        proc(pid=-1, usedGpuMemory=9_000_000_000)],
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    with PeakMemory("cuda:1", interval=0.001) as peak:
        torch.zeros(10)
    out = peak.to_dict()
    assert out == {"torch_max_allocated_bytes": 123_456, "nvml_process_bytes": 7_000_000, "note": None}
    assert ("reset", "cuda:1") in calls and ("nvml index", 5) in calls
    monkeypatch.delitem(sys.modules, "pynvml")
    monkeypatch.setattr("builtins.__import__", _refuse("pynvml"))
    with PeakMemory("cuda:0") as peak:
        pass
    out = peak.to_dict()
    assert out["torch_max_allocated_bytes"] == 123_456 and out["nvml_process_bytes"] is None
    assert "pynvml is not installed" in out["note"]


def _refuse(name):
    import builtins

    real = builtins.__import__

    def guarded(mod, *args, **kwargs):
        if mod == name:
            raise ImportError(mod)
        return real(mod, *args, **kwargs)

    return guarded
