"""Batch builds: resume after SIGKILL, locks, the single bank, shards, failures, Ray."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from ocbank import ClusterBank, config
from ocbank.cli import main
from ocbank.engine.cpu_search import resolve_cpu_search
from ocbank.errors import DataError
from ocbank.jobs import build as jobs

from .conftest import assert_close_across_runs, tiny_config


def banks_of(folder: Path) -> dict[str, ClusterBank]:
    return {p.stem: ClusterBank.load(p) for p in sorted(folder.glob("*.h5")) if ".partial" not in p.name}


def assert_same_banks(a: dict[str, ClusterBank], b: dict[str, ClusterBank], *, exact: bool = True) -> None:
    """Same banks; ``exact=False`` where the runs batched or threaded the backbone differently."""
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name].counts, b[name].counts, err_msg=name)
        if exact:
            np.testing.assert_array_equal(a[name].means, b[name].means, err_msg=name)
        else:
            assert_close_across_runs(a[name].means, b[name].means, err_msg=name)


def build_until_first_checkpoint(plan, name: str = "weave") -> None:
    """Run a class's build and stop it (KeyboardInterrupt) right after its first checkpoint is written."""
    real_save = jobs.Detector.save

    def crash_after_checkpoint(self, path, extra=None, **kwargs):
        real_save(self, path, extra, **kwargs)
        if str(path).endswith(".partial.h5"):
            raise KeyboardInterrupt

    jobs.Detector.save = crash_after_checkpoint
    try:
        with pytest.raises(KeyboardInterrupt):
            jobs.build_class(plan, jobs.ClassJob(name))
    finally:
        jobs.Detector.save = real_save


@pytest.fixture(scope="module")
def cfg_file(tmp_path_factory, tiny_mvtec) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tiny_mvtec, data={"batch_size": 2})))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cfg_file) -> Path:
    out = tmp_path_factory.mktemp("ref")
    assert main(["-q", "build", "--config", str(cfg_file), "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_build_writes_summary_and_resume_skips_complete(tmp_path, cfg_file, reference, capsys):
    summary = json.loads((reference / jobs.SUMMARY_NAME).read_text())
    assert summary["failed"] == [] and set(summary["classes"]) == {"dots", "weave"}
    row = summary["classes"]["weave"]
    # 6 training images: 1 held out (decision.holdout 0.1) to calibrate the OK/NG threshold.
    assert row["status"] == "built" and row["images_used"] == 5 and row["n_centroids"] > 0
    assert row["calibration"] == {"source": "holdout", "n_images": 1} and row["image_threshold"] > 0
    assert row["vectors_per_s"] > 0 and row["bank_bytes"] == row["n_centroids"] * (1536 * 4 + 8)
    assert row["search_backend"] == {"device": "cpu", "search": resolve_cpu_search("auto"), "precision": "fp32"}
    before = {p.name: p.stat().st_mtime_ns for p in reference.glob("*.h5")}
    assert main(["-q", "build", "--config", str(cfg_file), "--out", str(reference), "--resume"]) == 0
    assert "complete" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in reference.glob("*.h5")} == before
    assert not list(reference.glob("*.partial.h5")) and not (reference / jobs.LOCK_NAME).exists()


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(3))
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, cfg_file, reference, trial):
    out = tmp_path / "banks"
    cmd = [sys.executable, "-m", "ocbank.cli", "-q", "build", "--config", str(cfg_file), "--out", str(out),
           "--checkpoint-every", "1"]
    rng = random.Random(trial)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(rng.uniform(3.0, 9.0))  # start-up is ~4 s; the build itself a few seconds
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert_same_banks(banks_of(out), banks_of(reference))  # checkpoints fall on batch boundaries
    assert not list(out.glob("*.partial.h5")) and not (out / jobs.LOCK_NAME).exists()


@pytest.mark.slow
def test_resume_from_a_partial_checkpoint_equals_uninterrupted(tmp_path, cfg_file, reference):
    """Deterministic twin of the SIGKILL test: stop after the first checkpoint."""
    cfg = config.load(cfg_file)
    out = tmp_path / "b"
    out.mkdir()
    plan = jobs.BuildPlan(cfg, str(out), checkpoint_every=2)
    build_until_first_checkpoint(plan)
    meta = ClusterBank.load(out / "weave.partial.h5").metadata_
    # The radius sample (radius_images: 3) streams first; the first checkpoint follows it.
    assert meta["stream_position"] == 3 and meta["complete"] is False
    row = jobs.build_class(replace(plan, resume=True), jobs.ClassJob("weave"))
    assert row["status"] == "resumed" and row["resumed_at"] == 3 and row["images_used"] == 5
    assert_same_banks({"weave": ClusterBank.load(out / "weave.h5")}, {"weave": ClusterBank.load(reference / "weave.h5")})


@pytest.mark.slow
def test_second_build_on_the_same_folder_is_refused(tmp_path, cfg_file):
    out = tmp_path / "o"
    out.mkdir()
    with jobs.build_lock(out):  # a live build holds the (flock) lock
        res = subprocess.run([sys.executable, "-m", "ocbank.cli", "-q", "build", "--config", str(cfg_file),
                              "--out", str(out)], capture_output=True, text=True)
    assert res.returncode == 2 and "another ocbank build" in res.stderr and str(os.getpid()) in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_stale_lock_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "o"
    out.mkdir()
    (out / jobs.LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    with jobs.build_lock(out):
        assert json.loads((out / jobs.LOCK_NAME).read_text())["pid"] == os.getpid()
    assert "stale" in caplog.text and not (out / jobs.LOCK_NAME).exists()


@pytest.mark.slow
def test_single_bank_over_all_classes(tmp_path, cfg_file, tiny_mvtec):
    cfg = config.load(cfg_file)
    order = jobs.interleaved_samples(cfg, ["dots", "weave"])
    assert [Path(s.path).parts[-4] for s in order[:4]] == ["dots", "weave", "dots", "weave"]
    out = tmp_path / "single"
    assert main(["-q", "build", "--config", str(cfg_file), "--out", str(out), "--single-bank"]) == 0
    bank = ClusterBank.load(out / f"{jobs.SINGLE_BANK}.h5")
    assert bank.n_seen == (12 - 2) * 8 * 8  # 12 images, ceil(0.1 * 12) = 2 held out for calibration
    assert main(["-q", "evaluate", "--config", str(cfg_file), "--banks", str(out), "--out", str(tmp_path / "e")]) == 0
    report = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert {r["n_centroids"] for r in report["classes"].values()} == {len(bank)}


@pytest.mark.slow
def test_failing_class_is_reported_and_others_finish(tmp_path, tiny_mvtec):
    root = tmp_path / "data"
    root.mkdir()
    for name in ("dots", "weave"):
        (root / name).symlink_to(Path(tiny_mvtec) / name)
    (root / "empty" / "train" / "good").mkdir(parents=True)
    cfg = config.from_dict(tiny_config(root))
    report = jobs.build_all(jobs.BuildPlan(cfg, str(tmp_path / "o")))
    assert report["failed"] == ["empty"] and "no training images" in report["classes"]["empty"]["error"]
    assert report["classes"]["weave"]["status"] == "built" and (tmp_path / "o" / "weave.h5").is_file()
    assert "failed" in jobs.format_summary(report)


@pytest.mark.slow
def test_local_shards_merge_into_one_bank(tmp_path, cfg_file):
    cfg = config.load(cfg_file)
    report = jobs.build_all(jobs.BuildPlan(cfg, str(tmp_path / "s"), shards=3), ["weave"])
    row = report["classes"]["weave"]
    bank = ClusterBank.load(tmp_path / "s" / "weave.h5")
    assert row["shards"] == 3 and bank.n_seen == 5 * 8 * 8 == int(bank.counts.sum())
    assert [len(p) for p in jobs.split_shards(list(range(10)), 3)] == [3, 4, 3]


try:
    import ray
except ImportError:  # each Ray test skips on its own; the rest of this file still runs
    ray = None
needs_ray = pytest.mark.skipif(ray is None, reason="Ray backend tests need pip install '.[ray]'")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
@needs_ray
def test_starting_ray_keeps_the_process_sigterm_handler(monkeypatch):
    """ray.init swaps SIGTERM for an immediate exit(15); the CLI's handler (exit 143, lock released) must stay."""

    class Started(Exception):
        pass

    def fake_init(**_kw):  # what ray.init does to a driver's SIGTERM
        signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(signum))

    def ours(_signum, _frame):
        raise KeyboardInterrupt

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "remote", lambda _f: (_ for _ in ()).throw(Started()))  # stop right after init
    before = signal.signal(signal.SIGTERM, ours)
    try:
        with pytest.raises(Started):
            jobs.run_ray(jobs.BuildPlan(config.Config(), "unused"), [], jobs.RayOptions())
        assert signal.getsignal(signal.SIGTERM) is ours
    finally:
        signal.signal(signal.SIGTERM, before)


@needs_ray
def test_ray_backend_matches_local(tmp_path, cfg_file, reference, local_ray):
    cfg = config.load(cfg_file)
    report = jobs.build_all(jobs.BuildPlan(cfg, str(tmp_path / "r")), backend="ray")
    assert report["failed"] == [] and report["backend"] == "ray"
    # Ray workers run torch with one thread per task (OMP_NUM_THREADS), this process with all cores
    assert_same_banks(banks_of(tmp_path / "r"), banks_of(reference), exact=False)
    local = jobs.build_all(jobs.BuildPlan(cfg, str(tmp_path / "ls"), shards=2), ["weave"])
    remote = jobs.build_all(jobs.BuildPlan(cfg, str(tmp_path / "rs"), shards=2), ["weave"], backend="ray")
    assert remote["classes"]["weave"]["n_centroids"] == local["classes"]["weave"]["n_centroids"]
    assert_same_banks(banks_of(tmp_path / "rs"), banks_of(tmp_path / "ls"), exact=False)


@pytest.mark.slow
@needs_ray
def test_ray_reports_a_class_that_keeps_failing(tmp_path, tiny_mvtec, local_ray):
    root = tmp_path / "data"
    root.mkdir()
    (root / "weave").symlink_to(Path(tiny_mvtec) / "weave")
    (root / "empty" / "train" / "good").mkdir(parents=True)
    cfg = config.from_dict(tiny_config(root))
    report = jobs.build_all(jobs.BuildPlan(cfg, str(tmp_path / "o")), backend="ray", ray_opts=jobs.RayOptions(retries=1))
    assert report["failed"] == ["empty"] and "no training images" in report["classes"]["empty"]["error"]
    assert report["classes"]["weave"]["status"] == "built"


@pytest.mark.slow
def test_resume_rebuilds_when_the_training_list_changes(tmp_path, tiny_mvtec, caplog):
    """A checkpoint or final bank is identified by the ordered training list, not by its length."""
    root = tmp_path / "data"
    good = root / "weave" / "train" / "good"
    good.mkdir(parents=True)
    src = sorted((Path(tiny_mvtec) / "weave" / "train" / "good").glob("*.png"))
    for p in src:
        (good / p.name).write_bytes(p.read_bytes())
    cfg = config.from_dict(tiny_config(root, bank={"radius": 5.0}))
    out = tmp_path / "o"
    plan = jobs.BuildPlan(cfg, str(out), checkpoint_every=1)
    first = jobs.build_class(plan, jobs.ClassJob("weave"))
    assert first["status"] == "built"
    again = jobs.build_class(replace(plan, resume=True), jobs.ClassJob("weave"))
    assert again["status"] == "complete"  # same list: kept
    # Same number of images, one replaced by another picture: the old bank must not be kept.
    dots = sorted((Path(tiny_mvtec) / "dots" / "train" / "good").glob("*.png"))
    (good / src[0].name).write_bytes(dots[0].read_bytes())
    with caplog.at_level("WARNING"):
        row = jobs.build_class(replace(plan, resume=True), jobs.ClassJob("weave"))
    assert row["status"] == "built" and "training images changed" in caplog.text
    fresh = jobs.build_class(jobs.BuildPlan(cfg, str(tmp_path / "fresh")), jobs.ClassJob("weave"))
    assert fresh["n_centroids"] == row["n_centroids"]
    np.testing.assert_array_equal(ClusterBank.load(out / "weave.h5").counts,
                                  ClusterBank.load(tmp_path / "fresh" / "weave.h5").counts)


@pytest.mark.slow
def test_resume_never_continues_a_checkpoint_of_another_list(tmp_path, cfg_file, caplog):
    cfg = config.load(cfg_file)
    out = tmp_path / "b"
    out.mkdir()
    plan = jobs.BuildPlan(cfg, str(out), checkpoint_every=1)
    build_until_first_checkpoint(plan)
    assert (out / "weave.partial.h5").is_file()
    # Resume with another training list (the calibration hold-out changes it): start over, say so.
    other = replace(plan, resume=True, config=cfg.replace(decision={"holdout": 0.4}))
    with caplog.at_level("WARNING"):
        row = jobs.build_class(other, jobs.ClassJob("weave"))
    assert row["status"] == "built" and row["resumed_at"] == 0 and "starting over" in caplog.text


@pytest.mark.slow
def test_unreadable_calibration_images_keep_the_bank_and_unreadable_training_images_exit_1(tmp_path, tiny_mvtec):
    root = tmp_path / "data"
    good = root / "weave" / "train" / "good"
    good.mkdir(parents=True)
    for p in sorted((Path(tiny_mvtec) / "weave" / "train" / "good").glob("*.png")):
        (good / p.name).write_bytes(p.read_bytes())
    (good / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(tiny_config(root, bank={"radius": 5.0})))
    bad_cal = tmp_path / "cal"
    bad_cal.mkdir()
    (bad_cal / "x.png").write_bytes(b"not an image")
    out = tmp_path / "o"
    res = subprocess.run([sys.executable, "-m", "ocbank.cli", "-q", "build", "--config", str(cfg_file), "--out",
                          str(out), "--calibration", str(bad_cal)], capture_output=True, text=True)
    assert res.returncode == 1 and "1 training image(s) could not be read" in res.stderr
    row = json.loads((out / jobs.SUMMARY_NAME).read_text())["classes"]["weave"]
    assert row["status"] == "built" and row["skipped_files"][0].endswith("zz_broken.png")
    assert "could be read" in row["calibration"]["error"] and (out / "weave.h5").is_file()
    assert "decision" not in ClusterBank.load(out / "weave.h5").metadata_


def test_shards_refuse_a_memory_cap(tmp_path, cfg_file):
    cfg = config.load(cfg_file).replace(bank={"max_centroids": 50})
    with pytest.raises(config.ConfigError, match="max_centroids"):
        jobs.BuildPlan(cfg, str(tmp_path), shards=2)


def test_evaluate_refuses_a_config_that_makes_or_scores_features_differently():
    """evaluate scores with the bank's own feature and scoring settings: a config that differs in any of
    them is refused by key, while loader settings (batch size, workers, the folder) may differ."""
    import re

    from ocbank.config import from_dict
    from ocbank.jobs.evaluate import _check_compatible

    built = from_dict({"scoring": {"mode": "local_mean"}}, require_root=False)
    changes = {"scoring.window": 5, "scoring.grid_sigma": 2.0, "backbone.autocast": "fp16", "scoring.sigma": 2.0,
               "scoring.mode": "nn", "backbone.pool": "avg3", "data.resize": 300}
    for key, value in changes.items():
        section, field = key.split(".")
        with pytest.raises(DataError, match=re.escape(key)):
            _check_compatible(built, built.replace(**{section: {field: value}}), Path("b.h5"))
    _check_compatible(built, built.replace(data={"batch_size": 3, "num_workers": 1, "root": "elsewhere"}), Path("b.h5"))
