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
