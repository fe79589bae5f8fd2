"""Dataset layouts, tolerant loading and config validation."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ocbank import config as config_mod
from ocbank.data import DataError, ImageDataset, Transform, class_names, load_split, make_loader

from .conftest import tiny_config


def test_mvtec_layout(tiny_mvtec):
    cfg = config_mod.from_dict(tiny_config(tiny_mvtec))
    assert class_names(cfg) == ["dots", "weave"]
    split = load_split(cfg, "weave")
    assert len(split.train) == 6 and all(s.label == 0 for s in split.train)
    bad = [s for s in split.test if s.label == 1]
    assert len(bad) == 4 and all(s.mask and Path(s.mask).is_file() for s in bad)
    assert all(s.mask is None for s in split.test if s.label == 0)


def _realiad(tmp_path: Path) -> Path:
    root = tmp_path / "realiad"
    base = root / "realiad_256" / "pcb"
    rng = np.random.default_rng(0)
    entries = {"train": [], "test": []}
    for i in range(4):
        rel = f"S{i:04d}/img_{i}.jpg"
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(base / rel)
        entries["train"].append({"image_path": rel, "mask_path": None, "anomaly_class": "OK"})
    for i, cls in enumerate(["OK", "AK"]):
        rel = f"T{i:04d}/img.jpg"
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(base / rel)
        mask = None
        if cls != "OK":
            mask = f"T{i:04d}/img.png"
            Image.fromarray(np.pad(np.full((20, 20), 255, np.uint8), 10)).save(base / mask)
        entries["test"].append({"image_path": rel, "mask_path": mask, "anomaly_class": cls})
    jdir = root / "realiad_jsons" / "realiad_jsons"
    jdir.mkdir(parents=True)
    (jdir / "pcb.json").write_text(json.dumps({"meta": {}, **entries}))
    return root


def test_realiad_layout(tmp_path):
    root = _realiad(tmp_path)
    cfg = config_mod.from_dict(tiny_config(root, data={"format": "realiad"}))
    assert class_names(cfg) == ["pcb"]
    split = load_split(cfg, "pcb")
    assert len(split.train) == 4 and [s.label for s in split.test] == [0, 1]
    assert split.test[1].mask.endswith("T0001/img.png") and split.test[0].mask is None


def test_unknown_class_and_bad_json(tmp_path, tiny_mvtec):
    cfg = config_mod.from_dict(tiny_config(tiny_mvtec, data={"classes": ["nope"]}))
    with pytest.raises(DataError, match="nope"):
        class_names(cfg)
    root = _realiad(tmp_path)
    (root / "realiad_jsons" / "realiad_jsons" / "pcb.json").write_text("[1, 2]")
    cfg = config_mod.from_dict(tiny_config(root, data={"format": "realiad"}))
    with pytest.raises(DataError, match="train"):
        load_split(cfg, "pcb")


def test_corrupt_images_are_skipped_with_a_warning(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(good)
    broken = tmp_path / "broken.png"
    broken.write_bytes(good.read_bytes()[:40])
    from ocbank.data import Sample

    cfg = config_mod.from_dict(tiny_config(tmp_path, data={"format": "folder"}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(make_loader([Sample(str(good)), Sample(str(broken))], cfg))
    assert batches[0].index == [0] and batches[0].skipped == [1]
    assert any("broken.png" in str(w.message) for w in caught)


def test_mask_of_another_size_is_resized_nearest(tmp_path, caplog):
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(img)
    mask = tmp_path / "a_mask.png"
    Image.fromarray(np.pad(np.full((10, 10), 255, np.uint8), 5)).save(mask)  # 20x20
    from ocbank.data import Sample

    item = ImageDataset([Sample(str(img), 1, str(mask), "x")], Transform(32, None), with_masks=True)[0]
    assert item["mask"].shape == (32, 32) and set(np.unique(item["mask"])) == {0, 1}
    assert item["mask"][16, 16] == 1 and item["mask"][0, 0] == 0
    assert "resized" in caplog.text


def test_unknown_config_key_is_named(tmp_path):
    with pytest.raises(config_mod.ConfigError, match="'data.rezise'"):
        config_mod.from_dict({"data": {"root": str(tmp_path), "rezise": 3}})
    with pytest.raises(config_mod.ConfigError, match="'colour'"):
        config_mod.from_dict({"colour": 1, "data": {"root": str(tmp_path)}})


def test_missing_root_and_bad_values(tmp_path):
    with pytest.raises(config_mod.ConfigError, match="does-not-exist"):
        config_mod.from_dict({"data": {"root": str(tmp_path / "does-not-exist")}})
    with pytest.raises(config_mod.ConfigError, match="data.root is not set"):
        config_mod.from_dict({})
    bad = [
        {"bank": {"radius": -1}},
        {"bank": {"radius": "big"}},
        {"data": {"crop": 300}},
        {"data": {"format": "coco"}},
        {"backbone": {"pool": "max"}},
        {"device": "tpu"},
        {"data": {"batch_size": 0}},
    ]
    for over in bad:
        cfg = {"data": {"root": str(tmp_path)}}
        for k, v in over.items():
            cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
        with pytest.raises(config_mod.ConfigError):
            config_mod.from_dict(cfg)


def test_shipped_configs_are_valid():
    for path in sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml")):
        cfg = config_mod.load(path, require_root=False)
        assert cfg.backbone.name == "wide_resnet50_2"
    real = config_mod.load(Path(__file__).resolve().parents[1] / "configs" / "realiad_512.yaml", require_root=False)
    assert real.image_size == 512


@pytest.mark.slow
def test_loader_with_spawned_workers(tiny_mvtec):
    cfg = config_mod.from_dict(tiny_config(tiny_mvtec, data={"num_workers": 1, "batch_size": 3}))
    split = load_split(cfg, "weave")
    batches = list(make_loader(split.train, cfg))
    assert [b.index for b in batches] == [[0, 1, 2], [3, 4, 5]]
    assert batches[0].image.shape == (3, 3, 64, 64)


def test_zero_one_masks_mark_anomalous_pixels(tmp_path):
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    mask = tmp_path / "a_mask.png"
    truth = np.zeros((32, 32), np.uint8)
    truth[8:20, 4:12] = 1
    Image.fromarray(truth).save(mask)  # 0/1, not 0/255
    from ocbank.data import Sample

    item = ImageDataset([Sample(str(img), 1, str(mask), "x")], Transform(32, None), with_masks=True)[0]
    np.testing.assert_array_equal(item["mask"], truth)


def _alive(proc) -> bool:  # noqa: ANN001 - psutil.Process
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE  # a zombie holds no memory
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def test_loader_workers_die_with_their_sigkilled_parent(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    import psutil

    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(img)
    cfg = tiny_config(tmp_path, data={"format": "folder", "num_workers": 2, "batch_size": 1})
    code = textwrap.dedent(f"""
        import time
        from ocbank import config
        from ocbank.data import Sample, make_loader
        loader = make_loader([Sample({str(img)!r})] * 10000, config.from_dict({cfg!r}))
        batches = iter(loader)
        next(batches)
        print("ready", flush=True)
        time.sleep(120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    workers = []
    try:
        assert parent.stdout.readline().strip() == "ready"
        workers = [p for p in psutil.Process(parent.pid).children(recursive=True)
                   if "spawn_main" in " ".join(p.cmdline())]
        assert len(workers) == 2
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 3.0  # torch's own check would take up to 5 s per worker
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(w) for w in workers)
    finally:
        parent.kill()
        for w in workers:
            if _alive(w):
                w.kill()


def test_prefetched_keeps_order_raises_in_place_and_stops_early():
    import threading

    from ocbank.data.loader import prefetched

    assert list(prefetched(iter(range(50)), depth=3)) == list(range(50))

    def broken():
        yield 1
        yield 2
        raise OSError("disk gone")

    got = []
    with pytest.raises(OSError, match="disk gone"):
        for item in prefetched(broken()):
            got.append(item)
    assert got == [1, 2]
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    before = threading.active_count()
    for item in prefetched(endless(), depth=2):
        if item == 5:
            break
    import time

    time.sleep(0.5)
    assert threading.active_count() <= before and len(produced) <= 5 + 2 + 2  # the producer stopped
    # Closed early after the producer queued its last item, or after it failed: it still ends.
    for source in (iter([1, 2]), broken()):
        gen = prefetched(source, depth=1)
        next(gen)
        time.sleep(0.3)
        gen.close()
    assert not [t for t in threading.enumerate() if t.name == "ocbank-prefetch"]
