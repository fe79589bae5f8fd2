"""Image and mask reading: every PIL mode against its 8-bit twin, EXIF, arrays, hostile files."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from ocbank.data import images
from ocbank.data.images import Transform, open_image, open_mask
from ocbank.errors import DataError, InputTypeError

H, W = 24, 32  # not square: catches transposed axes


def _picture(seed: int = 0) -> np.ndarray:
    """RGB uint8 [H, W, 3]: a gradient plus noise, so every level region is exercised."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    base = np.stack([xx * 255 // (W - 1), yy * 255 // (H - 1), (xx + yy) * 255 // (W + H - 2)], axis=2)
    return np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)


def _read(path: Path) -> np.ndarray:
    img = open_image(path)
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def _gray3(g: np.ndarray) -> np.ndarray:
    return np.repeat(g.astype(int)[..., None], 3, axis=2)


def _twins(tmp: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """mode name -> (file saved in that mode, the same picture as 8-bit RGB, computed independently)."""
    rgb = _picture()
    rng = np.random.default_rng(1)
    v16 = rng.integers(0, 65536, (H, W), dtype=np.uint16)
    g16 = np.floor(v16 / 257 + 0.5).astype(np.uint8)  # round(v / 257)
    f32 = rng.random((H, W), dtype=np.float32)
    gf = np.floor(f32.astype(np.float64) * 255 + 0.5).astype(np.uint8)
    bits = rng.random((H, W)) > 0.5
    alpha = rng.integers(0, 256, (H, W), dtype=np.uint8)
    out: dict[str, tuple[Path, np.ndarray]] = {}
    out["1"] = (_save(Image.fromarray(bits), tmp / "bits.png"), _gray3(bits * 255))
    out["L"] = (_save(Image.fromarray(rgb[..., 0]), tmp / "l.png"), _gray3(rgb[..., 0]))
    out["I;16 png"] = (_save(Image.fromarray(v16), tmp / "g16.png"), _gray3(g16))
    out["I;16 tiff"] = (_save(Image.fromarray(v16), tmp / "g16.tif"), _gray3(g16))
    out["I;16B tiff"] = (_save(Image.fromarray(v16.astype(">u2")), tmp / "g16b.tif"), _gray3(g16))
    out["I tiff"] = (_save(Image.fromarray(v16.astype(np.int32)), tmp / "i32.tif"), _gray3(g16))
    out["F tiff"] = (_save(Image.fromarray(f32), tmp / "f32.tif"), _gray3(gf))
    out["RGB"] = (_save(Image.fromarray(rgb), tmp / "rgb.png"), rgb.astype(int))
    out["RGBA"] = (_save(Image.fromarray(np.dstack([rgb, alpha])), tmp / "rgba.png"), rgb.astype(int))
    la = Image.merge("LA", [Image.fromarray(rgb[..., 1]), Image.fromarray(alpha)])
    out["LA"] = (_save(la, tmp / "la.png"), _gray3(rgb[..., 1]))
    pal = Image.fromarray(rgb).quantize(32)
    pal_rgb = np.asarray(pal.convert("RGB")).astype(int)
    out["P"] = (_save(pal, tmp / "p.png"), pal_rgb)
    pal.info["transparency"] = 3
    out["P transparency"] = (_save(pal, tmp / "pt.png", transparency=3), pal_rgb)
    cmyk = np.dstack([255 - rgb, np.zeros((H, W), np.uint8)])  # K = 0: RGB = 255 - CMY exactly
    out["CMYK tiff"] = (_save(Image.fromarray(cmyk, mode="CMYK"), tmp / "cmyk.tif"), rgb.astype(int))
    ycc = np.asarray(Image.fromarray(rgb).convert("YCbCr")).astype(np.float64)
    y, cb, cr = ycc[..., 0], ycc[..., 1] - 128, ycc[..., 2] - 128  # JFIF's YCbCr -> RGB, in floats
    ycc_rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=2)
    out["YCbCr tiff"] = (_save(Image.fromarray(ycc.astype(np.uint8), mode="YCbCr"), tmp / "ycbcr.tif"),
                         np.clip(np.rint(ycc_rgb), 0, 255).astype(int))
    to_lab = ImageCms.buildTransformFromOpenProfiles(
        ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB"
    )
    lab = ImageCms.applyTransform(Image.fromarray(rgb), to_lab)
    # 8-bit LAB cannot hold sRGB to one level; the twin is LittleCMS's own LAB -> sRGB transform.
    from_lab = ImageCms.buildTransformFromOpenProfiles(
        ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"
    )
    out["LAB tiff"] = (_save(lab, tmp / "lab.tif"), np.asarray(ImageCms.applyTransform(lab, from_lab)).astype(int))
    return out


TWIN_MODES = ["1", "L", "I;16 png", "I;16 tiff", "I;16B tiff", "I tiff", "F tiff", "RGB", "RGBA", "LA", "P",
              "P transparency", "CMYK tiff", "YCbCr tiff", "LAB tiff"]


@pytest.mark.parametrize("mode", TWIN_MODES)
def test_every_mode_reads_like_its_8bit_twin(tmp_path, mode):
    path, expected = _twins(tmp_path)[mode]
    got = _read(path)
    assert got.shape == (H, W, 3)
    assert np.abs(got - expected).max() <= 1, mode
    if mode == "I;16 png":  # the bug: read as nearly all white
        assert abs(got.mean() - expected.mean()) < 1


def test_sixteen_bit_and_float_scale_by_range_not_clip(tmp_path):
    v = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(v).save(tmp_path / "a.png")
    assert _read(tmp_path / "a.png")[0, :, 0].tolist() == [0, 1, 128, 255]
    f = np.array([[0.0, 0.5, 1.0, 1.0 + 1e-4]], dtype=np.float32)  # within half a level of 1: clipped
    Image.fromarray(f).save(tmp_path / "f.tif")
    assert _read(tmp_path / "f.tif")[0, :, 0].tolist() == [0, 128, 255, 255]


def test_float_outside_unit_range_and_nan_are_refused(tmp_path):
    Image.fromarray(np.array([[0.0, 2.5]], dtype=np.float32)).save(tmp_path / "big.tif")
    with pytest.raises(DataError, match=r"big\.tif.*outside \[0, 1\]"):
        open_image(tmp_path / "big.tif")
    Image.fromarray(np.array([[0.0, np.nan]], dtype=np.float32)).save(tmp_path / "nan.tif")
    with pytest.raises(DataError, match="NaN"):
        open_image(tmp_path / "nan.tif")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_is_applied(tmp_path, fmt):
    upright = _picture(3)
    stored = np.rot90(upright)  # what a camera held sideways writes
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    suffix = ".png" if fmt == "PNG" else ".jpg"
    Image.fromarray(stored).save(tmp_path / f"tagged{suffix}", exif=exif.tobytes())
    Image.fromarray(stored).save(tmp_path / f"plain{suffix}")  # same pixels, same encoder, no tag
    got = _read(tmp_path / f"tagged{suffix}")
    assert got.shape == upright.shape
    np.testing.assert_array_equal(got, np.rot90(_read(tmp_path / f"plain{suffix}"), k=-1))
    if fmt == "PNG":
        np.testing.assert_array_equal(got, upright)


@pytest.mark.parametrize(
    ("arr", "expected"),
    [
        (np.array([[0, 128, 255]], np.uint8), [0, 128, 255]),
        (np.array([[0, 257, 65535]], np.uint16), [0, 1, 255]),
        (np.array([[False, True, True]]), [0, 255, 255]),
        (np.array([[0.0, 0.5, 1.0]], np.float32), [0, 128, 255]),
        (np.array([[0.0, 0.5, 1.0]], np.float64)[..., None], [0, 128, 255]),
    ],
)
def test_array_dtypes_and_shapes(arr, expected):
    got = np.asarray(open_image(arr))
    assert got.shape == (1, 3, 3) and (got == np.array(expected)[None, :, None]).all()


def test_rgb_and_rgba_arrays():
    rgb = _picture(4)
    np.testing.assert_array_equal(np.asarray(open_image(rgb)), rgb)
    rgba = np.dstack([rgb, np.full((H, W), 7, np.uint8)])
    np.testing.assert_array_equal(np.asarray(open_image(rgba)), rgb)
    np.testing.assert_array_equal(np.asarray(open_image(rgb.astype(np.uint16) * 257)), rgb)


@pytest.mark.parametrize(
    ("arr", "error", "words"),
    [
        (np.zeros((4, 4), np.int64), InputTypeError, "int64"),
        (np.zeros((4, 4), np.complex64), InputTypeError, "complex64"),
        (np.zeros((4, 4, 2), np.uint8), DataError, r"\(4, 4, 2\)"),
        (np.zeros((2, 4, 4, 3), np.uint8), DataError, r"\(2, 4, 4, 3\)"),
        (np.zeros((0, 4), np.uint8), DataError, "empty"),
        (np.full((2, 2), 3.0), DataError, r"outside \[0, 1\]"),
        (np.full((2, 2), np.inf), DataError, "NaN or infinite"),
    ],
)
def test_bad_arrays_are_refused_by_name(arr, error, words):
    with pytest.raises(error, match=words):
        open_image(arr)


def test_non_image_object_is_a_type_error():
    with pytest.raises(InputTypeError, match="list"):
        open_image([[1, 2], [3, 4]])


# ---------------------------------------------------------------------- hostile files
def _bomb_png(path: Path, side: int) -> Path:
    """A tiny PNG whose header declares side x side pixels (an IDAT that never delivers them)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    data[8:33] = struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("side", [9000, 20000, 100000])
def test_huge_declared_size_is_refused_before_decoding(tmp_path, side):
    path = _bomb_png(tmp_path / "bomb.png", side)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning may escape either
        with pytest.raises(DataError, match=r"bomb\.png.*MAX_IMAGE_PIXELS"):
            open_image(path)
    assert side * side > images.MAX_IMAGE_PIXELS


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_files_are_refused_not_half_decoded(tmp_path, suffix):
    whole = tmp_path / f"whole{suffix}"
    Image.fromarray(_picture(5)).save(whole)
    data = whole.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(DataError, match=r"cut\.(png|jpg)"):
        open_image(cut)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"nothere\.png does not exist"):
        open_image(tmp_path / "nothere.png")


# ---------------------------------------------------------------------- masks
def _mask_twins(tmp: Path) -> dict[str, Path]:
    truth = np.zeros((H, W), bool)
    truth[5:12, 7:20] = True
    truth[18, 2] = True  # a single pixel region
    u8 = truth.astype(np.uint8)
    pal = Image.fromarray(u8, mode="L").convert("P")
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[truth] = (0, 0, 9)  # only the blue channel set: any channel counts
    return {
        "0/1": _save(Image.fromarray(u8), tmp / "m01.png"),
        "0/255": _save(Image.fromarray(u8 * 255), tmp / "m255.png"),
        "16-bit": _save(Image.fromarray(u8.astype(np.uint16) * 3), tmp / "m16.png"),
        "bits": _save(Image.fromarray(truth), tmp / "m1.png"),
        "palette": _save(pal, tmp / "mp.png"),
        "rgb": _save(Image.fromarray(rgb), tmp / "mrgb.png"),
        "float": _save(Image.fromarray(u8.astype(np.float32) * 0.25), tmp / "mf.tif"),
    }, truth


@pytest.mark.parametrize("kind", ["0/1", "0/255", "16-bit", "bits", "palette", "rgb", "float"])
def test_any_nonzero_mask_pixel_is_anomalous(tmp_path, kind):
    files, truth = _mask_twins(tmp_path)
    np.testing.assert_array_equal(open_mask(files[kind]), truth)
    # Through the transform (identity geometry): still the same pixels, as 0/1.
    t = Transform(resize=W, crop=None)
    square = np.asarray(Image.fromarray(truth.astype(np.uint8) * 255).resize((W, W), Image.NEAREST)) > 0
    got = t.mask(open_mask(files[kind]), (W, H), kind)
    assert got.dtype == np.uint8 and set(np.unique(got)) <= {0, 1}
    np.testing.assert_array_equal(got.astype(bool), square)


@pytest.mark.parametrize(
    ("suffix", "options"),
    [(".png", {}), (".jpg", {}), (".jpg", {"progressive": True}), (".tif", {}), (".tif", {"compression": "tiff_lzw"}),
     (".bmp", {}), (".webp", {"lossless": True})],
)
def test_every_truncation_is_refused_or_decodes_whole(tmp_path, suffix, options):
    whole = tmp_path / f"whole{suffix}"
    Image.fromarray(_picture(6)).save(whole, **options)
    full = np.asarray(open_image(whole))
    data = whole.read_bytes()
    refused = 0
    for cut in range(1, len(data), max(1, len(data) // 40)):
        part = tmp_path / f"part{suffix}"
        part.write_bytes(data[:cut])
        try:
            got = np.asarray(open_image(part))
        except DataError as exc:
            assert "part" in str(exc) and "\n" not in str(exc)
            refused += 1
            continue
        np.testing.assert_array_equal(got, full, err_msg=f"{suffix} cut at {cut} of {len(data)}: half-decoded")
    assert refused > 0


@pytest.mark.parametrize("planar", [False, True])
def test_half_float_tiff_reads_like_its_8bit_twin(tmp_path, planar):
    tifffile = pytest.importorskip("tifffile")
    rgb = _picture(7)
    half = (rgb.astype(np.float32) / 255).astype(np.float16)  # PIL cannot open these
    path = tmp_path / "half.tif"
    if planar:
        tifffile.imwrite(path, np.moveaxis(half, -1, 0), photometric="rgb", planarconfig="separate")
    else:
        tifffile.imwrite(path, half, photometric="rgb")
    with pytest.raises(Exception):  # noqa: B017 - PIL's own failure, whichever type
        Image.open(path).load()
    assert np.abs(_read(path) - rgb.astype(int)).max() <= 1
    gray = tmp_path / "gray.tif"
    tifffile.imwrite(gray, half[..., 0])
    assert np.abs(_read(gray) - _gray3(rgb[..., 0])).max() <= 1
