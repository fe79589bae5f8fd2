"""Procedural textures with synthetic defects and masks, written in MVTec AD layout.

Used by the demo and the tests, so both run without downloads. Each class is a
texture family with random variation per image; defects are blobs and scratches
of a foreign colour, with pixel-exact masks in ``ground_truth``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("weave", "dots")
DEFECTS = ("blob", "scratch")


def _weave(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(10, 12)
    phase = rng.uniform(0, 2 * np.pi, 2)
    a = np.sin(2 * np.pi * xx / period + phase[0])
    b = np.sin(2 * np.pi * yy / period + phase[1])
    base = 0.5 + 0.25 * np.sign(a * b) * np.minimum(np.abs(a), np.abs(b)) ** 0.5
    color = np.array([0.55, 0.45, 0.35]) + rng.normal(0, 0.02, 3)
    img = base[..., None] * color[None, None] * 1.6
    return img + rng.normal(0, 0.03, img.shape)


def _dots(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(15, 17)
    off = rng.uniform(0, period, 2)
    dx = (xx + off[0]) % period - period / 2
    dy = (yy + off[1]) % period - period / 2
    dot = np.exp(-(dx**2 + dy**2) / (2 * (period / 6) ** 2))
    bg = np.array([0.25, 0.35, 0.45]) + rng.normal(0, 0.02, 3)
    fg = np.array([0.85, 0.85, 0.8])
    img = bg[None, None] * (1 - dot[..., None]) + fg[None, None] * dot[..., None]
    return img + rng.normal(0, 0.03, img.shape)


TEXTURES = {"weave": _weave, "dots": _dots}


def _defect(rng: np.random.Generator, size: int, kind: str) -> np.ndarray:
    """Binary mask [size, size] of one defect."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    margin = size // 5
    cx, cy = rng.integers(margin, size - margin, 2)
    if kind == "blob":
        rx, ry = rng.integers(size // 20, size // 9, 2)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    else:
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(size / 5, size / 3)
        dx, dy = np.cos(angle) * length / 2, np.sin(angle) * length / 2
        draw.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=255, width=int(rng.integers(4, 7)))
    return np.asarray(mask) > 0


def _to_png(img: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)


def make_dataset(
    root: str | Path,
    classes: tuple[str, ...] = CLASSES,
    n_train: int = 40,
    n_good_test: int = 10,
    n_defect_test: int = 5,
    size: int = 256,
    seed: int = 0,
) -> Path:
    """Write an MVTec-layout dataset under ``root``; return ``root``."""
    root = Path(root)
    for ci, name in enumerate(classes):
        texture = TEXTURES[name]
        rng = np.random.default_rng((seed, ci))
        base = root / name
        for i in range(n_train):
            _to_png(texture(rng, size), base / "train" / "good" / f"{i:03d}.png")
        for i in range(n_good_test):
            _to_png(texture(rng, size), base / "test" / "good" / f"{i:03d}.png")
        for kind in DEFECTS:
            for i in range(n_defect_test):
                img = texture(rng, size)
                mask = _defect(rng, size, kind)
                color = rng.uniform(0, 1, 3)
                img[mask] = 0.15 * img[mask] + 0.85 * color
                _to_png(img, base / "test" / kind / f"{i:03d}.png")
                out = base / "ground_truth" / kind / f"{i:03d}_mask.png"
                out.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask.astype(np.uint8) * 255).save(out)
    return root


def main(argv: list[str] | None = None) -> None:
    """``python -m ocbank.synthetic --out DIR [--n-train N] [--n-good-test N] [--n-defect-test N]``."""
    import argparse  # noqa: PLC0415

    ap = argparse.ArgumentParser(description="Write the synthetic MVTec-layout dataset.")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-train", type=int, default=40)
    ap.add_argument("--n-good-test", type=int, default=10)
    ap.add_argument("--n-defect-test", type=int, default=5, help="per defect type")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    root = make_dataset(args.out, n_train=args.n_train, n_good_test=args.n_good_test,
                        n_defect_test=args.n_defect_test, seed=args.seed)
    print(f"wrote {root}")


if __name__ == "__main__":
    main()
