"""Fault suite: hostile bytes and odd PIL modes never crash a scoring run through the loader.

Unreadable files are skipped, counted and named in a one-line warning; readable ones get
a finite score. Tiny 64x64 crops and bounded hypothesis examples keep it fast.
"""

from __future__ import annotations

import csv
import os
import tempfile
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from ocbank import Detector
from ocbank.data import Sample, unescape_path
from ocbank.jobs.predict import predict

from .conftest import tiny_config

pytestmark = pytest.mark.slow  # every test here runs the backbone on a fitted bank

FAULT_SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Real magic numbers, so random tails reach the decoders rather than the format sniffer.
MAGIC = {
    ".png": b"\x89PNG\r\n\x1a\n",
    ".jpg": b"\xff\xd8\xff\xe0",
    ".tif": b"II*\x00",
    ".bmp": b"BM",
    ".webp": b"RIFF\x00\x01\x00\x00WEBPVP8 ",
}


@pytest.fixture(scope="module")
def detector(tiny_mvtec, extractor) -> Detector:
    train = sorted((Path(tiny_mvtec) / "weave" / "train" / "good").glob("*.png"))
    det = Detector.from_config(tiny_config(tiny_mvtec, bank={"radius": 20.0}), extractor=extractor)
    return det.fit([str(p) for p in train])


def _score(det: Detector, files: list[Path]) -> tuple[dict[int, float], list[int], list[str]]:
    """Run files through the loader and the bank: (index -> score, skipped indices, warnings)."""
    scored: dict[int, float] = {}
    skipped: list[int] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for res in det.score_batches([Sample(str(f)) for f in files]):
            skipped += res.skipped
            scored.update({idx: float(s) for idx, s in zip(res.indices, res.scores, strict=True)})
            assert res.maps.shape == (len(res.indices), 64, 64) and np.isfinite(res.maps).all()
    messages = [str(w.message) for w in caught]
    return scored, skipped, messages


def _check_accounting(files: list[Path], scored: dict[int, float], skipped: list[int], messages: list[str]) -> None:
    assert sorted([*scored, *skipped]) == list(range(len(files)))  # every input accounted for once
    assert all(np.isfinite(v) for v in scored.values())
    for idx in skipped:
        named = [m for m in messages if str(files[idx]) in m and "skipping" in m]
        assert len(named) == 1 and "\n" not in named[0], messages


@FAULT_SETTINGS
@given(
    blobs=st.lists(
        st.tuples(st.sampled_from(sorted(MAGIC)), st.booleans(), st.binary(max_size=600)), min_size=1, max_size=5
    )
)
def test_random_bytes_are_skipped_and_counted(detector, blobs):
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, (suffix, with_magic, tail) in enumerate(blobs):
            path = Path(tmp) / f"blob{i}{suffix}"
            path.write_bytes((MAGIC[suffix] if with_magic else b"") + tail)
            files.append(path)
        scored, skipped, messages = _score(detector, files)
        _check_accounting(files, scored, skipped, messages)


MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "I;16", "I", "F", "CMYK", "YCbCr"]
FORMATS = {  # what PIL can write each mode as
    "1": [".png", ".bmp", ".tif"], "L": [".png", ".jpg", ".tif", ".webp"], "P": [".png", ".bmp", ".tif"],
    "RGB": [".png", ".jpg", ".bmp", ".tif", ".webp"], "RGBA": [".png", ".tif", ".webp"], "LA": [".png", ".tif"],
    "I;16": [".png", ".tif"], "I": [".tif"], "F": [".tif"], "CMYK": [".jpg", ".tif"], "YCbCr": [".tif"],
}


@st.composite
def pictures(draw: st.DrawFn) -> tuple[str, str, np.ndarray, bool]:
    """(mode, suffix, pixel array, expected readable)."""
    mode = draw(st.sampled_from(MODES))
    suffix = draw(st.sampled_from(FORMATS[mode]))
    h, w = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    channels = {"RGB": 3, "RGBA": 4, "LA": 2, "CMYK": 4, "YCbCr": 3}.get(mode, 0)
    shape = (h, w, channels) if channels else (h, w)
    readable = True
    if mode == "1":
        arr = rng.random(shape) > 0.5
    elif mode == "I;16":
        arr = rng.integers(0, 65536, shape, dtype=np.uint16)
    elif mode == "I":
        arr = rng.integers(0, 65536, shape).astype(np.int32)
    elif mode == "F":
        hi = draw(st.sampled_from([1.0, 1.5]))  # 1.5: outside the documented [0, 1] -> refused
        arr = (rng.random(shape) * hi).astype(np.float32)
        readable = float(arr.max()) <= 1.0 + 0.5 / 255
    else:
        arr = rng.integers(0, 256, shape, dtype=np.uint8)
    return mode, suffix, arr, readable


def _save(mode: str, suffix: str, arr: np.ndarray, path: Path) -> None:
    if mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LA"):
        img = Image.fromarray(arr, mode=mode) if mode != "LA" else Image.merge(
            "LA", [Image.fromarray(arr[..., 0]), Image.fromarray(arr[..., 1])]
        )
    elif mode == "P":
        img = Image.fromarray(arr).convert("P")
    else:
        img = Image.fromarray(arr)
    assert img.mode == mode, (img.mode, mode)
    img.save(path)


@FAULT_SETTINGS
@given(pics=st.lists(pictures(), min_size=1, max_size=5), cut=st.integers(0, 4))
@example(  # always run: a float TIFF outside [0, 1] is refused, a 16-bit PNG and a 1x1 image score
    pics=[("F", ".tif", np.full((5, 7), 1.5, np.float32), False),
          ("I;16", ".png", np.full((9, 4), 40000, np.uint16), True),
          ("L", ".png", np.zeros((1, 1), np.uint8), True)],
    cut=0,
)
def test_random_arrays_in_random_modes_score_finite(detector, pics, cut):
    with tempfile.TemporaryDirectory() as tmp:
        files, readable = [], []
        for i, (mode, suffix, arr, ok) in enumerate(pics):
            path = Path(tmp) / f"pic{i}_{mode.replace(';', '')}{suffix}"
            _save(mode, suffix, arr, path)
            files.append(path)
            readable.append(ok)
        if cut:  # one file truncated: it may still decode (trailing metadata) or be skipped, never crash
            victim = files[cut % len(files)]
            data = victim.read_bytes()
            victim.write_bytes(data[: max(1, len(data) * cut // 5)])
        scored, skipped, messages = _score(detector, files)
        _check_accounting(files, scored, skipped, messages)
        for i, ok in enumerate(readable):
            if cut and files[i] == files[cut % len(files)]:
                continue
            assert (i in scored) == ok, (files[i].name, messages)


def test_sixteen_bit_and_float_files_score_like_their_8bit_twin(detector, tiny_mvtec, tmp_path):
    source = sorted((Path(tiny_mvtec) / "weave" / "test" / "good").glob("*.png"))[0]
    gray8 = np.asarray(Image.open(source).convert("L"))
    Image.fromarray(gray8).save(tmp_path / "g8.png")
    Image.fromarray(gray8.astype(np.uint16) * 257).save(tmp_path / "g16.png")  # exactly the same picture
    Image.fromarray(gray8.astype(np.float32) / 255).save(tmp_path / "gf.tif")
    files = [tmp_path / "g8.png", tmp_path / "g16.png", tmp_path / "gf.tif"]
    scored, skipped, _ = _score(detector, files)
    assert not skipped
    assert scored[1] == pytest.approx(scored[0], rel=1e-5) and scored[2] == pytest.approx(scored[0], rel=1e-5)


def test_a_decompression_bomb_is_skipped_named_and_counted(detector, tiny_mvtec, tmp_path):
    from .test_images import _bomb_png

    good = sorted((Path(tiny_mvtec) / "weave" / "test" / "good").glob("*.png"))[0]
    files = [_bomb_png(tmp_path / "bomb.png", 30000), good, _bomb_png(tmp_path / "big.png", 9000)]
    scored, skipped, messages = _score(detector, files)
    _check_accounting(files, scored, skipped, messages)
    assert sorted(skipped) == [0, 2] and list(scored) == [1]
    assert all("MAX_IMAGE_PIXELS" in m for m in messages if "skipping" in m)


# ---------------------------------------------------------------------- file names
# Every character some file system or tool reserves (Windows' <>:"/\|?*, controls, CSV's
# quote and separators, shell and URL specials); POSIX itself forbids only "/" and NUL.
RESERVED = '<>:"\\|?*\t\n\r,;\'%#&$ ~\x01\x1b\x7f'
NAME_LIMIT = 255  # bytes in one name on ext4, XFS and APFS


def _stem(raw: bytes) -> bytes:
    """Bytes POSIX allows in a name, cut so that ``stem + .png`` fits the limit."""
    return raw.replace(b"/", b"_").replace(b"\0", b"_")[: NAME_LIMIT - len(b".png")] or b"_"


name_stems = st.one_of(
    st.binary(min_size=1, max_size=NAME_LIMIT).map(_stem),  # any bytes, UTF-8 or not, up to the limit
    st.text(alphabet=RESERVED + "a\u00e9\u65e5\U0001f600", min_size=1, max_size=90).map(lambda t: _stem(t.encode())),
)


@pytest.fixture(scope="module")
def saved_bank(detector, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("named") / "bank.h5"
    detector.save(path)
    return path


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=st.lists(st.tuples(name_stems, st.booleans()), min_size=1, max_size=4, unique_by=lambda e: e[0]))
@example(entries=[(b"x" * 251, True), (b"caf\xe9", True), (b"\xff" * 251, False), (b"a\nb\\x0a", False)])
def test_any_file_name_is_scored_or_counted_and_never_loses_another(detector, saved_bank, tiny_mvtec, entries):
    """predict on a folder of hostile names: every listed file has its row, output files and a reversible name."""
    picture = sorted((Path(tiny_mvtec) / "weave" / "test" / "good").glob("*.png"))[0].read_bytes()
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(Detector, "load", return_value=detector):
        folder, out = Path(tmp) / "in", Path(tmp) / "out"
        folder.mkdir()
        readable = {}
        for stem, ok in entries:
            path = Path(os.fsdecode(bytes(folder) + b"/" + stem + b".png"))
            path.write_bytes(picture if ok else b"\x89PNG\r\n\x1a\n" + stem)
            if not stem.startswith(b"."):  # dot-names are hidden files: not listed
                readable[str(path)] = ok
        if not readable:
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rows = predict(saved_bank, [str(folder)], out, save_maps=True, progress=False)
        assert all("\n" not in str(w.message) for w in caught)  # one line each, whatever the name holds
        assert {r["path"]: r["status"] == "ok" for r in rows} == readable
        assert all(np.isfinite(r["score"]) for r in rows if r["status"] == "ok")
        with open(out / "scores.csv", newline="", encoding="utf-8") as fh:  # strict UTF-8 throughout
            written = [unescape_path(r["path"]) for r in csv.DictReader(fh)]
        assert written == [r["path"] for r in rows]  # every row, each name given back byte for byte
        scored = sum(readable.values())
        for sub in ("heatmaps", "maps"):
            names = os.listdir(out / sub) if scored else []
            assert len(names) == scored and all(len(os.fsencode(n)) <= NAME_LIMIT for n in names)
