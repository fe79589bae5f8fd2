"""Batch builds: every class, checkpointed and resumable, locked, on one machine or on Ray.

Per class, ``DIR/<class>.partial.h5`` is rewritten (atomically) every
``checkpoint_every`` images with the stream position in its metadata;
``DIR/<class>.h5`` appears only when the class is complete. Because the image
order is fixed, a resumed build ends with the same bank as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import config as config_mod
from ..data import Sample, class_names, load_split
from ..engine import BankState, ClusterBank, resolve_device
from ..engine.checkpoint import atomic_write, read_bank
from ..errors import CheckpointError, DataError
from ..model.detector import Detector
from ..model.features import FEATURE_DIM, FeatureExtractor
from .lock import LOCK_NAME, build_lock

log = logging.getLogger(__name__)

SINGLE_BANK = "_all_classes"  # --single-bank writes DIR/_all_classes.h5
SUMMARY_NAME = "build_summary.json"
DEFAULT_CHECKPOINT_EVERY = 100


# ---------------------------------------------------------------------- one class
def set_threads(threads: int | None) -> None:
    """Pin torch's and faiss's CPU thread counts.

    Convolutions and FAISS's BLAS sum in a thread-count-dependent order, so banks
    are bit-identical across processes (local or Ray workers) only when these match.
    """
    if threads:
        import torch  # noqa: PLC0415

        from ..engine._faiss import faiss  # noqa: PLC0415

        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)


def config_key(cfg: config_mod.Config) -> str:
    """Hash of the settings that determine a bank (loader workers excluded)."""
    raw = json.loads(json.dumps(cfg.raw))
    raw["data"].pop("num_workers", None)
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]


def _completed(final: Path, name: str, key: str) -> dict[str, Any] | None:
    """The stored summary of a complete, valid bank for this class and config, else None."""
    if not final.is_file():
        return None
    try:
        meta = read_bank(final).metadata
    except CheckpointError as exc:
        log.warning("rebuilding %s: the existing bank is unusable (%s)", name, exc)
        return None
    if meta.get("complete") and meta.get("class") == name and meta.get("config_key") == key:
        return meta.get("summary")
    log.warning("rebuilding %s: %s was built with another config or is incomplete", name, final)
    return None


def _training_samples(cfg: config_mod.Config, name: str, samples: list[Sample] | None = None) -> list[Sample]:
    """The class's training list (or the given one); an error when it is empty."""
    if samples is None:
        samples = load_split(cfg, name).train
    if not samples:
        msg = f"class {name!r} has no training images under {cfg.data['root']}. Check data.root and the layout."
        raise DataError(msg)
    return samples


def _resume_state(partial: Path, name: str, key: str, n_images: int, device: str) -> tuple[ClusterBank, dict] | None:
    if not partial.is_file():
        return None
    try:
        bank = ClusterBank.load(partial, device=device)
    except CheckpointError as exc:
        log.warning("class %s: ignoring unusable checkpoint (%s); starting over", name, exc)
        return None
    meta = bank.metadata_
    if meta.get("class") != name or meta.get("config_key") != key or meta.get("n_images") != n_images:
        log.warning("class %s: checkpoint %s is from another config or image list; starting over", name, partial)
        return None
    return bank, meta


def build_class(
    cfg_raw: dict[str, Any],
    name: str,
    out_dir: str,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    resume: bool = False,
    progress: bool = False,
    samples: list[Sample] | None = None,
    extractor: FeatureExtractor | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Build (or resume) ``out_dir/<name>.h5``; return the class's summary row.

    ``samples`` overrides the class's training list (the single-bank job).
    """
    set_threads(threads)
    cfg = config_mod.from_dict(cfg_raw)
    out = Path(out_dir)
    final, partial = out / f"{name}.h5", out / f"{name}.partial.h5"
    key = config_key(cfg)
    if resume:
        done = _completed(final, name, key)
        if done is not None:
            return {**done, "status": "complete"}
    samples = _training_samples(cfg, name, samples)
    det = Detector(cfg, progress=progress, extractor=extractor)
    device = resolve_device(cfg.device)
    bank, start, before = None, 0, {"images_used": 0, "skipped_files": [], "seconds": 0.0}
    state = _resume_state(partial, name, key, len(samples), device) if resume else None
    if state is None:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()  # an old run's checkpoint must not outlive a fresh start
    if state is not None:
        bank, meta = state
        start = int(meta["stream_position"])
        before = meta["progress"]
        det.radius_stats_ = meta.get("radius_stats", {})
        log.info("class %s: resuming at image %d of %d", name, start, len(samples))
    began = time.perf_counter()
    last = start

    def extra(position: int, used: int, skipped: list[str], complete: bool) -> dict[str, Any]:
        return {
            "class": name,
            "config_key": key,
            "dataset": {"format": cfg.data["format"], "root": str(cfg.data["root"])},
            "n_images": len(samples),
            "stream_position": position,
            "complete": complete,
            "progress": {
                "images_used": before["images_used"] + used,
                "skipped_files": before["skipped_files"] + skipped,
                "seconds": before["seconds"] + time.perf_counter() - began,
            },
        }

    def checkpoint(d: Detector, position: int, used: int, skipped: list[str]) -> None:
        nonlocal last
        if position - last >= checkpoint_every and position < len(samples):
            d.save(partial, extra=extra(position, used, skipped, complete=False))
            last = position

    det.fit(samples, bank=bank, start=start, on_batch=checkpoint)
    fit = det.fit_summary_
    info = extra(len(samples), fit["images_used"], fit["skipped_files"], complete=True)
    prog = info["progress"]
    summary = {
        "n_centroids": len(det.bank),
        "bank_bytes": det.bank.nbytes,
        "radius": det.bank.radius,
        "images_used": prog["images_used"],
        "images_skipped": len(prog["skipped_files"]),
        "seconds": prog["seconds"],
        "vectors_per_s": det.bank.n_seen / max(prog["seconds"], 1e-9),
        "resumed_at": start,
    }
    det.save(final, extra={**info, "summary": summary})
    with contextlib.suppress(FileNotFoundError):
        partial.unlink()
    for f in fit["skipped_files"]:
        log.warning("class %s: skipped unreadable image %s", name, f)
    return {**summary, "status": "resumed" if start else "built"}


# ---------------------------------------------------------------------- shards
def shard_bank(cfg_raw: dict[str, Any], samples: list[Sample], radius: float, threads: int | None = None) -> dict[str, Any]:
    """Build one shard's bank at a fixed radius; return its arrays (small, picklable)."""
    set_threads(threads)
    cfg = config_mod.from_dict(cfg_raw)
    det = Detector(cfg)
    bank = ClusterBank(FEATURE_DIM, radius, device=resolve_device(cfg.device))
    det.fit(samples, bank=bank)
    return {
        "means": np.array(bank.means),
        "counts": np.array(bank.counts),
        "n_seen": bank.n_seen,
        "images_used": det.fit_summary_["images_used"],
        "skipped_files": det.fit_summary_["skipped_files"],
    }


def split_shards(samples: list[Sample], shards: int) -> list[list[Sample]]:
    """Contiguous, nearly equal shards in stream order."""
    bounds = np.linspace(0, len(samples), shards + 1).round().astype(int)
    return [samples[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def merge_shards(parts: list[dict[str, Any]], radius: float, device: str) -> ClusterBank:
    """Fold shard banks together in shard order with :meth:`ClusterBank.merge`."""
    merged = ClusterBank(FEATURE_DIM, radius, device=device)
    for part in parts:
        state = BankState(part["means"], part["counts"], radius, FEATURE_DIM, int(part["n_seen"]))
        merged.merge(ClusterBank.from_state(state))
    return merged


def build_class_sharded(
    cfg_raw: dict[str, Any], name: str, out_dir: str, shards: int, run_shards: Any, resume: bool = False,
    threads: int | None = None,
) -> dict[str, Any]:
    """Radius once for the class, shards built by ``run_shards(jobs)``, merged in order."""
    set_threads(threads)
    cfg = config_mod.from_dict(cfg_raw)
    out = Path(out_dir)
    final = out / f"{name}.h5"
    key = config_key(cfg)
    if resume:
        done = _completed(final, name, key)
        if done is not None:
            return {**done, "status": "complete"}
    samples = _training_samples(cfg, name)
    began = time.perf_counter()
    det = Detector(cfg)
    radius, stats = det.choose_radius(samples)
    parts = run_shards([(cfg_raw, part, radius, threads) for part in split_shards(samples, shards)])
    bank = merge_shards(parts, radius, resolve_device(cfg.device))
    seconds = time.perf_counter() - began
    skipped = [f for p in parts for f in p["skipped_files"]]
    summary = {
        "n_centroids": len(bank),
        "bank_bytes": bank.nbytes,
        "radius": radius,
        "images_used": sum(p["images_used"] for p in parts),
        "images_skipped": len(skipped),
        "seconds": seconds,
        "vectors_per_s": bank.n_seen / seconds,
        "shards": shards,
    }
    det.bank_ = bank
    det.radius_stats_ = stats
    det.save(final, extra={"class": name, "config_key": key, "complete": True, "n_images": len(samples),
                           "stream_position": len(samples), "summary": summary, "shards": shards})
    return {**summary, "status": "built"}


# ---------------------------------------------------------------------- all classes
def interleaved_samples(cfg: config_mod.Config, names: list[str]) -> list[Sample]:
    """Every class's training images, round-robin by position: a fixed, mixed order."""
    lists = [load_split(cfg, n).train for n in names]
    out: list[Sample] = []
    for i in range(max((len(x) for x in lists), default=0)):
        out += [x[i] for x in lists if i < len(x)]
    return out


def _failure(exc: BaseException) -> dict[str, Any]:
    return {"status": "failed", "error": f"{type(exc).__name__}: {exc}".replace("\n", " ")}


def _run_local(cfg: config_mod.Config, jobs: list[tuple[str, list[Sample] | None]], out: Path, opts: dict[str, Any]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    extractor: FeatureExtractor | None = None
    for name, samples in jobs:
        try:
            if opts["shards"] > 1:
                results[name] = build_class_sharded(
                    cfg.raw, name, str(out), opts["shards"], lambda js: [shard_bank(*j) for j in js], opts["resume"],
                    opts["threads"],
                )
                continue
            if extractor is None:
                set_threads(opts["threads"])
                extractor = Detector(cfg).extractor
            results[name] = build_class(
                cfg.raw, name, str(out), opts["checkpoint_every"], opts["resume"], opts["progress"], samples, extractor,
                opts["threads"],
            )
        except Exception as exc:  # noqa: BLE001  (one class failing must not stop the others)
            log.debug("class %s failed", name, exc_info=True)
            results[name] = _failure(exc)
    return results


def _run_ray(cfg: config_mod.Config, jobs: list[tuple[str, list[Sample] | None]], out: Path, opts: dict[str, Any]) -> dict[str, Any]:
    try:
        import ray  # noqa: PLC0415
    except ImportError as exc:
        msg = "--backend ray needs Ray: pip install '.[ray]' (with .[cpu] or .[gpu])."
        raise ImportError(msg) from exc
    if not ray.is_initialized():
        if opts["address"]:
            ray.init(address=opts["address"], include_dashboard=False, log_to_driver=False)
        else:
            ray.init(num_cpus=opts["ray_cpus"], include_dashboard=False, log_to_driver=False)
    gpus = 1 if resolve_device(cfg.device).startswith("cuda") else 0
    retry = {"max_retries": opts["retries"], "retry_exceptions": True, "num_gpus": gpus}
    whole = ray.remote(build_class).options(**retry)
    shard = ray.remote(shard_bank).options(**retry)

    def run_shards(js: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
        return ray.get([shard.remote(*j) for j in js])

    # Workers get the driver's thread count, so their banks equal the local backend's.
    import torch  # noqa: PLC0415

    threads = opts["threads"] or torch.get_num_threads()
    refs = {}
    for name, samples in jobs:
        if opts["shards"] == 1:
            refs[name] = whole.remote(
                cfg.raw, name, str(out), opts["checkpoint_every"], opts["resume"], False, samples, None, threads
            )
    results: dict[str, Any] = {}
    for name, _ in jobs:
        try:
            if opts["shards"] > 1:
                results[name] = build_class_sharded(
                    cfg.raw, name, str(out), opts["shards"], run_shards, opts["resume"], threads
                )
            else:
                results[name] = ray.get(refs[name])
        except Exception as exc:  # noqa: BLE001  (reported per class after Ray's retries)
            results[name] = _failure(getattr(exc, "cause", None) or exc)
    return results


def build_all(
    cfg: config_mod.Config,
    out_dir: str | Path,
    classes: list[str] | None = None,
    *,
    backend: str = "local",
    address: str | None = None,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    resume: bool = False,
    single_bank: bool = False,
    shards: int = 1,
    retries: int = 2,
    ray_cpus: int | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Build every class (or one bank over all of them); write and return the summary."""
    if backend not in ("local", "ray"):
        msg = f"backend must be 'local' or 'ray', got {backend!r}."
        raise ValueError(msg)
    if checkpoint_every < 1 or shards < 1 or retries < 0:
        msg = f"--checkpoint-every and --shards must be >= 1 and --retries >= 0, got {checkpoint_every}, {shards}, {retries}."
        raise ValueError(msg)
    if single_bank and shards > 1:
        msg = "--single-bank and --shards cannot be combined. Pick one."
        raise ValueError(msg)
    out = Path(out_dir)
    names = classes or class_names(cfg)
    jobs: list[tuple[str, list[Sample] | None]]
    jobs = [(SINGLE_BANK, interleaved_samples(cfg, names))] if single_bank else [(n, None) for n in names]
    opts = {"checkpoint_every": checkpoint_every, "resume": resume, "shards": shards, "retries": retries,
            "address": address, "ray_cpus": ray_cpus, "threads": threads, "progress": progress}
    with build_lock(out):
        began = time.perf_counter()
        results = (_run_ray if backend == "ray" else _run_local)(cfg, jobs, out, opts)
        report = {"classes": results, "backend": backend, "seconds": time.perf_counter() - began,
                  "failed": sorted(n for n, r in results.items() if r["status"] == "failed")}
        atomic_write(out / SUMMARY_NAME, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))
    return report


def format_summary(report: dict[str, Any]) -> str:
    head = f"{'class':<18}{'status':>10}{'K':>8}{'bank MB':>9}{'images':>8}{'skipped':>8}{'seconds':>9}{'vectors/s':>11}"
    lines = [head, "-" * len(head)]
    for name, r in report["classes"].items():
        if r["status"] == "failed":
            lines.append(f"{name:<18}{'failed':>10}  {r['error']}")
            continue
        lines.append(
            f"{name:<18}{r['status']:>10}{r['n_centroids']:>8}{r['bank_bytes'] / 1e6:>9.2f}{r['images_used']:>8}"
            f"{r['images_skipped']:>8}{r['seconds']:>9.1f}{r['vectors_per_s']:>11.0f}"
        )
    return "\n".join(lines)
