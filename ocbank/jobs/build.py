"""Batch builds: every class, checkpointed and resumable, locked, on one machine or on Ray.

Per class, ``DIR/<class>.partial.h5`` is rewritten (atomically) every
``checkpoint_every`` images with the stream position in its metadata;
``DIR/<class>.h5`` appears only when the class is complete. Both record a hash of
the config and of the ordered training list (paths, sizes, modification times), so
``--resume`` never continues or keeps a bank built from other input. Because the
image order is fixed, a resumed build ends with the same bank as an uninterrupted one.

Local and Ray backends run the same :func:`build_class` / :func:`build_shard`, and
every class ends in :func:`finish_class`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config, check_class_name
from ..data import Sample, SharedImage, calibration_images, class_names, escape_path, load_split, shared_images
from ..engine import BankState, ClusterBank, resolve_device
from ..engine.checkpoint import bank_file_path
from ..engine.threads import set_compute_threads
from ..errors import CheckpointError, ConfigError, DataError, DependencyError
from ..jsonio import write_json
from ..model.builder import FittedBank, training_order
from ..model.detector import Detector
from ..model.features import FEATURE_DIM, FeatureExtractor
from ..model.progress import FitProgress, progress_bar
from ..model.radius import RadiusStats
from ..model.record import BuildIdentity, open_bank
from . import DEFAULT_CHECKPOINT_EVERY
from .lock import LOCK_NAME, build_lock

log = logging.getLogger(__name__)

SINGLE_BANK = "_all_classes"  # --single-bank writes DIR/_all_classes.h5
SUMMARY_NAME = "build_summary.json"
MAX_NAMED = 5  # images a warning names before it says "and N more"

__all__ = [
    "LOCK_NAME",
    "SINGLE_BANK",
    "SUMMARY_NAME",
    "BuildPlan",
    "ClassJob",
    "RayOptions",
    "build_all",
    "build_class",
    "build_lock",
]


@dataclass(frozen=True)
class BuildPlan:
    """How every class of one build is made (picklable: it travels to Ray workers)."""

    config: Config
    out_dir: str
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY
    resume: bool = False
    shards: int = 1
    threads: int | None = None  # CPU threads for torch and faiss; None: torch's default
    progress: bool = False
    calibration: str | None = None  # a folder of normal images for the OK/NG thresholds

    def __post_init__(self) -> None:
        if self.shards > 1 and self.config.bank.max_centroids is not None:
            msg = (
                f"--shards {self.shards} cannot keep bank.max_centroids={self.config.bank.max_centroids}: each "
                "shard's radius would grow on its own and the shards could not be merged. Drop one of them."
            )
            raise ConfigError(msg)
        if self.checkpoint_every < 1 or self.shards < 1 or (self.threads is not None and self.threads < 1):
            msg = (
                f"checkpoint_every, shards and threads must be >= 1, got {self.checkpoint_every}, {self.shards}, "
                f"{self.threads}."
            )
            raise ConfigError(msg)
        object.__setattr__(self, "out_dir", str(self.out_dir))

    @property
    def out(self) -> Path:
        return Path(self.out_dir)


@dataclass(frozen=True)
class ClassJob:
    """One bank to build: a class, or the single bank over all classes (``samples`` given)."""

    name: str
    samples: tuple[Sample, ...] | None = None  # None: the class's training list from the dataset

    def __post_init__(self) -> None:
        if self.name != SINGLE_BANK:
            check_class_name(self.name)


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: start a local Ray
    cpus: int | None = None  # CPUs of a local Ray (None: all)
    retries: int = 2  # retries per class or shard

    def __post_init__(self) -> None:
        if self.cpus is not None and self.cpus < 1:
            msg = f"--ray-cpus must be >= 1, got {self.cpus}. Omit it to use every CPU."
            raise ConfigError(msg)
        if self.retries < 0:
            msg = f"--retries must be >= 0, got {self.retries}."
            raise ConfigError(msg)


# ---------------------------------------------------------------------- identity
def set_threads(threads: int | None) -> None:
    """Pin the process's compute threads (:func:`~ocbank.engine.threads.set_compute_threads`), if given:
    banks are bit-identical across processes (local or Ray workers) only when these match."""
    if threads:
        set_compute_threads(threads)


def config_key(cfg: Config) -> str:
    """Hash of the settings that determine a bank (loader workers, device and search backend excluded)."""
    raw = cfg.to_dict()
    raw["data"].pop("num_workers", None)
    raw["data"].pop("batch_size", None)
    raw.pop("device", None)
    raw["bank"].pop("gpu_search", None)  # every backend builds the same bank
    raw["bank"].pop("cpu_search", None)
    if raw["bank"].get("gpu_search_precision") == "fp32":  # the default leaves earlier keys unchanged
        raw["bank"].pop("gpu_search_precision")
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]


def input_key(samples: list[Sample], calibration: list[Sample] | None = None) -> str:
    """Hash of the ordered training (and calibration) list: path, size and mtime of each file."""
    h = hashlib.sha256()
    for group in (samples, calibration or []):
        for s in group:
            try:
                st = os.stat(s.path)
                h.update(os.fsencode(f"{s.path}\0{st.st_size}\0{st.st_mtime_ns}\n"))  # any name's bytes
            except OSError:
                h.update(os.fsencode(f"{s.path}\0missing\n"))
        h.update(b"--\n")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class ClassInputs:
    """The images one class is built and calibrated from."""

    train: list[Sample]
    calibration: list[Sample] = field(default_factory=list)
    calibration_source: str = "none"  # "holdout", "folder" or "none"


def class_inputs(plan: BuildPlan, job: ClassJob) -> ClassInputs:
    """The class's training list, minus a seeded hold-out for calibration when no folder is given."""
    cfg = plan.config
    samples = list(job.samples) if job.samples is not None else load_split(cfg, job.name).train
    if not samples:
        msg = f"class {job.name!r} has no training images under {cfg.data.root}. Check data.root and the layout."
        raise DataError(msg)
    if plan.calibration:
        calibration = calibration_images(plan.calibration)
        warn_calibration_in_bank(shared_images(calibration, samples), len(calibration), f"class {job.name}")
        return ClassInputs(samples, calibration, "folder")
    train, held = holdout_split(samples, cfg)
    return ClassInputs(train, held, "holdout") if held else ClassInputs(samples)


def holdout_split(samples: list[Sample], cfg: Config) -> tuple[list[Sample], list[Sample]]:
    """(training images, held-out calibration images): a seeded ``decision.holdout`` share is
    held out when no calibration folder is given (none when either part would be empty)."""
    n_hold = math.ceil(cfg.decision.holdout * len(samples))
    if len(samples) - n_hold < 1 or n_hold < 1:
        return samples, []
    rng = np.random.default_rng(cfg.bank.seed)
    held = set(rng.choice(len(samples), size=n_hold, replace=False).tolist())
    return [s for i, s in enumerate(samples) if i not in held], [samples[i] for i in sorted(held)]


def training_images(det: Detector) -> list[Sample] | None:
    """The training list a built bank streamed, read again from its dataset, or None when it cannot be.

    A bank file records its class, config (with ``data.root``) and calibration source, not
    its file list: the list is rebuilt as :func:`class_inputs` made it (without the hold-out
    when the build held one out). None for a bank made in Python or whose dataset is gone.
    """
    built = det.record().build
    name, cfg = built.class_name, det.config
    if not name or not cfg.data.root or not Path(cfg.data.root).is_dir():
        return None
    try:
        samples = interleaved_samples(cfg, class_names(cfg)) if name == SINGLE_BANK else load_split(cfg, name).train
    except DataError:
        return None
    if (built.summary or {}).get("calibration", {}).get("source") == "holdout":
        samples = holdout_split(samples, cfg)[0]
    return samples


def warn_calibration_in_bank(shared: list[SharedImage], n_calibration: int, where: str) -> None:
    """Name the calibration images the bank was trained on: their scores, and so the thresholds, are biased low."""
    if not shared:
        return
    named = "; ".join(str(s) for s in shared[:MAX_NAMED])
    more = f"; and {len(shared) - MAX_NAMED} more" if len(shared) > MAX_NAMED else ""
    log.warning(
        "%s: %d of the %d calibration image(s) are already in the bank, so the OK/NG thresholds computed on them "
        "are biased low (the bank fits its own training images closely): %s%s. Calibrate on normal images the bank "
        "never saw.", where, len(shared), n_calibration, named, more,
    )


# ---------------------------------------------------------------------- one class
def _completed(final: Path, identity: BuildIdentity) -> dict[str, Any] | None:
    """The stored summary of a complete, valid bank for this class, config and input, else None."""
    if not final.is_file():
        return None
    try:
        record = open_bank(final, allow_partial=True).record
    except (CheckpointError, ConfigError, DataError) as exc:
        log.warning("rebuilding %s: the existing bank is unusable (%s)", identity.class_name, exc)
        return None
    built, updates = record.build, len(record.lineage)
    if built.complete and built.class_name == identity.class_name and built.config_key == identity.config_key:
        if built.input_key == identity.input_key:
            if updates:  # ocbank update extended this training list: the bank is kept, updates and all
                log.warning("keeping %s: built from this training list and extended by %d update(s) (its lineage)",
                            final, updates)
            return None if built.summary is None else dict(built.summary)
        lost = f"; this drops the {updates} update(s) in its lineage" if updates else ""
        log.warning("rebuilding %s: its training images changed since %s was built%s", identity.class_name, final, lost)
        return None
    log.warning("rebuilding %s: %s was built with another config or is incomplete", identity.class_name, final)
    return None


def _resume_state(
    partial: Path, identity: BuildIdentity, device: str, extractor: FeatureExtractor | None
) -> Detector | None:
    if not partial.is_file():
        return None
    name = identity.class_name
    try:
        det = Detector.from_opened(open_bank(partial, allow_partial=True, device=device), extractor)
    except (CheckpointError, ConfigError, DataError) as exc:
        log.warning("class %s: ignoring unusable checkpoint (%s); starting over", name, exc)
        return None
    built = det.record().build
    if (built.class_name, built.config_key, built.input_key) != (name, identity.config_key, identity.input_key):
        log.warning("class %s: checkpoint %s is from another config or image list; starting over", name, partial)
        return None
    if built.stream_position is None or built.progress is None:
        log.warning("class %s: checkpoint %s does not say how far it got; starting over", name, partial)
        return None
    return det


def _identity(plan: BuildPlan, job: ClassJob, inputs: ClassInputs) -> BuildIdentity:
    cfg = plan.config
    return BuildIdentity(
        class_name=job.name,
        config_key=config_key(cfg),
        input_key=input_key(inputs.train, inputs.calibration),
        dataset={"format": cfg.data.format, "root": str(cfg.data.root)},
        n_images=len(inputs.train),
    )


def finish_class(plan: BuildPlan, job: ClassJob, det: Detector, inputs: ClassInputs, progress: FitProgress) -> dict[str, Any]:
    """Calibrate, write ``<class>.h5`` atomically, remove the checkpoint; return the summary row."""
    calibration_error = None
    if inputs.calibration:
        try:
            with progress_bar(f"{job.name} calibration", len(inputs.calibration), plan.progress):
                det.calibrate(inputs.calibration, source=inputs.calibration_source)
        except DataError as exc:  # the bank is good; say why it has no thresholds rather than lose it
            calibration_error = str(exc)
            log.warning("class %s: written without OK/NG thresholds: %s", job.name, exc)
    bank = det.bank
    summary = {
        "n_centroids": len(bank),
        "bank_bytes": bank.nbytes,
        "radius": bank.radius_,
        **progress.to_dict(),  # images_used, images_skipped, skipped_files, seconds
        "skipped_files": [escape_path(f) for f in progress.skipped_files],  # JSON any reader takes
        "vectors_per_s": bank.n_seen / max(progress.seconds, 1e-9),
        "search_backend": bank.search_backend,
        "calibration": {"source": inputs.calibration_source, "n_images": len(inputs.calibration)},
    }
    if calibration_error is not None:
        summary["calibration"]["error"] = calibration_error
    if det.decision is not None:
        summary["image_threshold"] = det.decision.image_threshold
    identity = replace(_identity(plan, job, inputs), stream_position=len(inputs.train), complete=True, progress=progress,
                       summary=summary)
    det.save(bank_file_path(plan.out, job.name), build=identity)
    with contextlib.suppress(FileNotFoundError):
        bank_file_path(plan.out, job.name, partial=True).unlink()
    for f in progress.skipped_files:
        log.warning("class %s: skipped unreadable image %s", job.name, f)
    return summary


def build_class(plan: BuildPlan, job: ClassJob, extractor: FeatureExtractor | None = None) -> dict[str, Any]:
    """Build (or resume) ``out_dir/<name>.h5``; return the class's summary row."""
    set_threads(plan.threads)
    cfg = plan.config
    final, partial = bank_file_path(plan.out, job.name), bank_file_path(plan.out, job.name, partial=True)
    inputs = class_inputs(plan, job)
    identity = _identity(plan, job, inputs)
    if plan.resume:
        stored = _completed(final, identity)
        if stored is not None:
            return {**stored, "status": "complete"}
    device = resolve_device(cfg.device)
    det = _resume_state(partial, identity, device, extractor) if plan.resume else None
    before, start = FitProgress(), 0
    if det is None:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()  # an old run's checkpoint must not outlive a fresh start
        det = Detector.from_config(cfg, extractor=extractor)
    else:
        built = det.record().build
        start, before = int(built.stream_position or 0), built.progress or FitProgress()
        log.info("class %s: resuming at image %d of %d", job.name, start, len(inputs.train))
    last = start
    with progress_bar(job.name, len(inputs.train), plan.progress, initial=start):
        for step in det.fit_steps(inputs.train, start=start):
            if step.phase == "bank" and step.position - last >= plan.checkpoint_every and step.position < step.n_images:
                at = replace(identity, stream_position=step.position, complete=False, progress=before + step.so_far)
                det.save(partial, build=at)
                last = step.position
    row = finish_class(plan, job, det, inputs, before + det.fit_summary_)
    return {**row, "resumed_at": start, "status": "resumed" if start else "built"}


# ---------------------------------------------------------------------- shards
@dataclass(frozen=True)
class ShardResult:
    """One shard's bank as arrays (small, picklable: it comes back from a Ray worker) and its fit."""

    means: np.ndarray  # [K, 1536]
    counts: np.ndarray  # [K]
    m2: np.ndarray  # [K]
    n_seen: int
    progress: FitProgress

    def state(self, radius: float) -> BankState:
        return BankState(self.means, self.counts, radius, FEATURE_DIM, int(self.n_seen), m2=self.m2)


def build_shard(plan: BuildPlan, samples: list[Sample], radius: float) -> ShardResult:
    """Build one shard's bank at a fixed radius; return its arrays."""
    set_threads(plan.threads)
    det = Detector.from_config(plan.config.replace(bank={"radius": radius}))
    det.fit(samples)
    bank = det.bank
    return ShardResult(np.array(bank.means), np.array(bank.counts), np.array(bank.m2), bank.n_seen, det.fit_summary_)


def split_shards(samples: list[Any], shards: int) -> list[list[Any]]:
    """Contiguous, nearly equal shards in stream order."""
    bounds = np.linspace(0, len(samples), shards + 1).round().astype(int)
    return [samples[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def merge_shards(parts: list[ShardResult], radius: float, device: str, **search: str) -> ClusterBank:
    """Fold shard banks together in shard order with :meth:`ClusterBank.merge` (``search``: the bank's search options)."""
    merged = ClusterBank(FEATURE_DIM, radius, device=device, **search)
    for part in parts:
        merged.merge(ClusterBank.from_state(part.state(radius)))
    return merged


ShardRunner = Callable[[list[tuple[BuildPlan, list[Sample], float]]], list[ShardResult]]


def build_class_sharded(plan: BuildPlan, job: ClassJob, run_shards: ShardRunner) -> dict[str, Any]:
    """Radius once for the class, shards built by ``run_shards``, merged in order, then finished."""
    set_threads(plan.threads)
    inputs = class_inputs(plan, job)
    identity = _identity(plan, job, inputs)
    if plan.resume:
        stored = _completed(bank_file_path(plan.out, job.name), identity)
        if stored is not None:
            return {**stored, "status": "complete"}
    began = time.perf_counter()
    det = Detector.from_config(plan.config)
    if plan.config.bank.radius == "auto":
        stats = det.radius_statistics(inputs.train)  # the shards need r before they start
    else:
        stats = RadiusStats(float(plan.config.bank.radius))
    radius = stats.suggested
    ordered = [inputs.train[i] for i in training_order(len(inputs.train), plan.config)]
    parts = run_shards([(plan, part, radius) for part in split_shards(ordered, plan.shards)])
    merged = merge_shards(parts, radius, resolve_device(plan.config.device), **plan.config.bank.search_options)
    det.use_fitted(FittedBank(merged, stats))
    progress = sum((p.progress for p in parts), FitProgress())
    row = finish_class(plan, job, det, inputs, replace(progress, seconds=time.perf_counter() - began))
    return {**row, "shards": plan.shards, "status": "built"}


# ---------------------------------------------------------------------- all classes
def interleaved_samples(cfg: Config, names: list[str]) -> list[Sample]:
    """Every class's training images, round-robin by position: a fixed, mixed order."""
    lists = [load_split(cfg, n).train for n in names]
    out: list[Sample] = []
    for i in range(max((len(x) for x in lists), default=0)):
        out += [x[i] for x in lists if i < len(x)]
    return out


def _failure(exc: BaseException) -> dict[str, Any]:
    return {"status": "failed", "error": f"{type(exc).__name__}: {exc}".replace("\n", " ")}


def run_local(plan: BuildPlan, jobs: list[ClassJob]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    extractor: FeatureExtractor | None = None
    for job in jobs:
        try:
            if plan.shards > 1:
                results[job.name] = build_class_sharded(plan, job, lambda js: [build_shard(*j) for j in js])
                continue
            if extractor is None:
                set_threads(plan.threads)
                extractor = Detector.from_config(plan.config).extractor
            results[job.name] = build_class(plan, job, extractor)
        except Exception as exc:  # noqa: BLE001  (one class failing must not stop the others)
            log.debug("class %s failed", job.name, exc_info=True)
            results[job.name] = _failure(exc)
    return results


def run_ray(plan: BuildPlan, jobs: list[ClassJob], ray_opts: RayOptions) -> dict[str, Any]:
    try:
        import ray  # noqa: PLC0415
    except ImportError as exc:
        msg = "--backend ray needs Ray: pip install '.[ray]' (with .[cpu] or .[gpu])."
        raise DependencyError(msg) from exc
    if not ray.is_initialized():
        # ray.init installs a SIGTERM handler that exits with status 15 at once; keep this
        # process's own (the CLI's turns SIGTERM into Ctrl-C: step dropped, exit 143).
        sigterm = signal.getsignal(signal.SIGTERM)
        try:
            if ray_opts.address:
                ray.init(address=ray_opts.address, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(num_cpus=ray_opts.cpus, include_dashboard=False, log_to_driver=False)
        finally:
            if sigterm is not None and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, sigterm)
    gpus = 1 if resolve_device(plan.config.device).startswith("cuda") else 0
    retry = {"max_retries": ray_opts.retries, "retry_exceptions": True, "num_gpus": gpus}
    whole = ray.remote(build_class).options(**retry)
    shard = ray.remote(build_shard).options(**retry)

    def run_shards(js: list[tuple[BuildPlan, list[Sample], float]]) -> list[ShardResult]:
        return ray.get([shard.remote(*j) for j in js])

    # Workers get the driver's thread count, so their banks equal the local backend's.
    import torch  # noqa: PLC0415

    plan = replace(plan, threads=plan.threads or torch.get_num_threads(), progress=False)
    refs = {job.name: whole.remote(plan, job) for job in jobs} if plan.shards == 1 else {}
    results: dict[str, Any] = {}
    for job in jobs:
        try:
            results[job.name] = ray.get(refs[job.name]) if refs else build_class_sharded(plan, job, run_shards)
        except Exception as exc:  # noqa: BLE001  (reported per class after Ray's retries)
            results[job.name] = _failure(getattr(exc, "cause", None) or exc)
    return results


def build_all(
    plan: BuildPlan,
    classes: list[str] | None = None,
    *,
    single_bank: bool = False,
    backend: str = "local",
    ray_opts: RayOptions | None = None,
) -> dict[str, Any]:
    """Build every class (or one bank over all of them); write and return the summary."""
    if backend not in ("local", "ray"):
        msg = f"backend must be 'local' or 'ray', got {backend!r}."
        raise ConfigError(msg)
    if single_bank and plan.shards > 1:
        msg = "--single-bank and --shards cannot be combined. Pick one."
        raise ConfigError(msg)
    for name in classes or []:
        check_class_name(name, "--classes entry")
    names = classes or class_names(plan.config)
    jobs = [ClassJob(SINGLE_BANK, tuple(interleaved_samples(plan.config, names)))] if single_bank else [
        ClassJob(n) for n in names
    ]
    with build_lock(plan.out):
        began = time.perf_counter()
        if backend == "ray":
            results = run_ray(plan, jobs, ray_opts or RayOptions())
        else:
            results = run_local(plan, jobs)
        report = {
            "classes": results,
            "backend": backend,
            "seconds": time.perf_counter() - began,
            "failed": sorted(n for n, r in results.items() if r["status"] == "failed"),
        }
        write_json(plan.out / SUMMARY_NAME, report)
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
