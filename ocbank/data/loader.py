"""The ordered DataLoader over samples: unreadable images are skipped and reported."""

from __future__ import annotations

import functools
import os
import queue
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..config import Config
from ..errors import OcbankError
from .datasets import Sample, escape_path
from .images import Transform, open_image, open_mask
from .workers import worker_init

T = TypeVar("T")


class ImageDataset(Dataset):
    """Samples -> dicts with ``image``, ``rgb``, ``mask``, ``index``; ``None`` for unreadable images."""

    def __init__(self, samples: Sequence[Sample], transform: Transform, with_masks: bool = False):
        self.samples = list(samples)
        self.transform = transform
        self.with_masks = with_masks

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        sample = self.samples[index]
        try:
            img = open_image(sample.path)
            tensor, rgb = self.transform.image(img)
        except (OcbankError, OSError) as exc:
            # One line naming the file; the caller counts the skipped index.
            name = _name(sample.path)
            text = f"skipping image: {exc}" if name in str(exc) else f"skipping unreadable image {name}: {exc}"
            warnings.warn(_one_line(text, sample.path), stacklevel=1)
            return {"index": index, "skipped": True}
        item: dict[str, Any] = {"index": index, "skipped": False, "image": tensor, "rgb": rgb}
        if self.with_masks:
            size = self.transform.size
            mask = np.zeros((size, size), dtype=np.uint8)
            if sample.mask:
                try:
                    mask = self.transform.mask(open_mask(sample.mask), img.size, str(sample.mask))
                except (OcbankError, OSError) as exc:
                    text = f"skipping {_name(sample.path)}: unreadable mask: {exc}"
                    warnings.warn(_one_line(text, sample.path, sample.mask), stacklevel=1)
                    return {"index": index, "skipped": True}
            elif sample.label == 1:
                text = f"anomalous image {_name(sample.path)} has no mask: counted as all-normal pixels"
                warnings.warn(_one_line(text, sample.path), stacklevel=1)
            item["mask"] = mask
        return item


def _one_line(text: str, *sources: Any) -> str:
    """``text`` with each file name among ``sources`` escaped (:func:`escape_path`): one line, valid UTF-8."""
    for source in sources:
        if isinstance(source, (str, os.PathLike)) and (name := os.fspath(source)):
            text = text.replace(name, escape_path(name))
    return text


def _name(source: Any) -> str:
    """A file path as given; an in-memory image by its type (the message stays one line)."""
    return str(source) if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__") else type(source).__name__


@dataclass
class Batch:
    """One loader batch: its readable images, and the input positions it could not read."""

    index: list[int]  # input positions of the readable images, in order
    skipped: list[int] = field(default_factory=list)  # input positions of the unreadable ones
    image: torch.Tensor | None = None  # [B, 3, S, S] ImageNet-normalised (None when nothing was readable)
    rgb: np.ndarray | None = None  # [B, S, S, 3] uint8 crops, for overlays
    mask: np.ndarray | None = None  # [B, S, S] uint8 ground truth, when the loader was asked for masks

    @property
    def end(self) -> int:
        """The input position just after this batch."""
        return max(self.index + self.skipped) + 1


def _collate(items: list[dict[str, Any]]) -> Batch:
    good = [it for it in items if not it["skipped"]]
    batch = Batch([it["index"] for it in good], [it["index"] for it in items if it["skipped"]])
    if good:
        batch.image = torch.stack([it["image"] for it in good])
        batch.rgb = np.stack([it["rgb"] for it in good])
        if "mask" in good[0]:
            batch.mask = np.stack([it["mask"] for it in good])
    return batch


def make_loader(samples: Sequence[Sample], cfg: Config, with_masks: bool = False) -> DataLoader:
    """Ordered loader (no shuffling: the stream order is part of the bank's identity)."""
    workers = cfg.data.num_workers
    return DataLoader(
        ImageDataset(samples, Transform(cfg.data.resize, cfg.data.crop), with_masks),
        batch_size=cfg.data.batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        # Single-threaded workers that die with their parent (see workers.py).
        worker_init_fn=functools.partial(worker_init, parent_pid=os.getpid()) if workers else None,
        # spawn, not fork: forking after faiss/OpenMP use can deadlock.
        multiprocessing_context="spawn" if workers else None,
        persistent_workers=False,
    )


_DONE = object()


def prefetched(batches: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yield ``batches`` while a daemon thread produces up to ``depth`` ahead.

    With ``num_workers: 0`` this overlaps image decoding (PIL releases the GIL) with the
    backbone. Order is kept; an exception in the producer is raised here, at its place
    in the stream; leaving early stops the producer.
    """
    buffer: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def hand_over(entry: tuple[bool, Any]) -> bool:
        """Queue an entry unless the consumer has left; False when it has."""
        while not stop.is_set():
            try:
                buffer.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in batches:
                if not hand_over((True, item)):
                    return
            hand_over((True, _DONE))
        except BaseException as exc:  # handed to the consumer, raised in its thread
            hand_over((False, exc))

    thread = threading.Thread(target=produce, name="ocbank-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = buffer.get()
            if not ok:
                raise item
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=5.0)
