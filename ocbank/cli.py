"""The ``ocbank`` command line: build, update, history, rollback, evaluate, predict, suggest-radius, export, serve,
doctor.

Exit status: 0 every input was processed; 1 the command ran but some inputs failed
(a class that did not build, an image that could not be read: outputs are written for
the rest and the failures named); 2 a usage, configuration, data or file error stopped
it before any result (one line ``ocbank: error: ...``), or no input could be used (no
class built, no image scored); 130 interrupted (Ctrl-C); 143
stopped by SIGTERM (how Docker, Kubernetes, Ray and systemd stop a process), handled
exactly like Ctrl-C: the step under way is dropped, checkpoints and banks already
written stay whole (they are replaced atomically), the build lock is released. Any
other exception is a bug in ocbank and surfaces with its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import __version__
from .errors import OcbankError
from .jobs import (
    AUTO_GATE_MULTIPLE,
    DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_KEEP_HISTORY,
    DEFAULT_MAX_NEW_CENTROIDS,
    GATE_AUTO,
    GATE_OFF,
)

EXIT_OK, EXIT_PARTIAL, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, so that it unwinds exactly like Ctrl-C."""


# Set by the SIGTERM handler: libraries that catch a KeyboardInterrupt and raise a new one
# (Ray's blocking calls do) lose the Terminated type, not the status it must give.
_sigterm_received = threading.Event()


def _on_sigterm(signum: int, frame: Any) -> None:
    _sigterm_received.set()
    raise Terminated


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` while a command runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        value = None
    if value is None or value < low:
        msg = f"must be an integer >= {low}, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def class_list(text: str) -> list[str]:
    """argparse type: comma-separated class names, each a plain name (:func:`ocbank.config.check_class_name`)."""
    from .config import check_class_name  # noqa: PLC0415

    names = [c.strip() for c in text.split(",")]
    for name in names:
        try:
            check_class_name(name, f"--classes entry {name!r} in {text!r}")
        except OcbankError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc
    return names


def port_number(text: str) -> int:
    """argparse type: a TCP port a server may listen on (:data:`ocbank.serve.options.PORTS`)."""
    from .serve.options import PORTS  # noqa: PLC0415

    low, high = PORTS
    value = _int_at_least(text, low)
    if value > high:
        msg = f"must be an integer from {low} to {high}, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _classes(value: list[str] | None) -> list[str] | None:
    return value or None


def device_arg(text: str) -> str:
    """argparse type: a device (cpu, cuda, cuda:N, auto), refused at the door before any slow start-up."""
    from .config import check_device  # noqa: PLC0415

    try:
        return check_device(text, "--device")
    except OcbankError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """``--config`` and what adjusts it, the same on every subcommand that reads a config."""
    p.add_argument("--config", required=True, help="a YAML file, or a bundled config by name (mvtec, realiad, ...)")
    p.add_argument("--data-root", metavar="DIR", help="the dataset folder (sets data.root)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                   help="override one config key, typed as in the YAML (repeatable): --set bank.radius=0.5")


def _load_config(args: argparse.Namespace) -> Any:
    """The config of ``--config`` with ``--set``, ``--data-root`` and ``--device`` on top."""
    from . import config  # noqa: PLC0415

    overrides: dict[str, Any] = dict(config.parse_assignment(text) for text in args.overrides)
    if getattr(args, "device", None):
        overrides["device"] = args.device
    return config.load(args.config, overrides=overrides, data_root=args.data_root)


def cmd_build(args: argparse.Namespace) -> int:
    from .jobs import build as jobs  # noqa: PLC0415

    plan = jobs.BuildPlan(
        config=_load_config(args),
        out_dir=args.out,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        shards=args.shards,
        threads=args.threads,
        progress=not args.quiet,
        calibration=args.calibration,
    )
    ray_opts = jobs.RayOptions(address=args.address, cpus=args.ray_cpus, retries=args.retries)
    report = jobs.build_all(
        plan, _classes(args.classes), single_bank=args.single_bank, backend=args.backend, ray_opts=ray_opts
    )
    print(jobs.format_summary(report))
    print(f"banks in {args.out}; summary: {Path(args.out) / jobs.SUMMARY_NAME}")
    for name in report["failed"]:
        print(f"ocbank: error: class {name!r} failed: {report['classes'][name]['error']}", file=sys.stderr)
    unreadable = {n: r["images_skipped"] for n, r in report["classes"].items() if r.get("images_skipped")}
    for name, count in unreadable.items():
        print(f"ocbank: error: class {name!r}: {count} training image(s) could not be read and were left out "
              f"(named in {Path(args.out) / jobs.SUMMARY_NAME})", file=sys.stderr)
    if report["failed"] and len(report["failed"]) == len(report["classes"]):
        return EXIT_ERROR  # no class built: nothing to use, like a data error
    return EXIT_PARTIAL if report["failed"] or unreadable else EXIT_OK


def gate_value(text: str) -> str | float:
    """argparse type of --gate: "auto", "off", or a multiple >= 1 of the NG threshold."""
    if text in (GATE_AUTO, GATE_OFF):
        return text
    try:
        return _float_above(text, 1.0, inclusive=True)
    except argparse.ArgumentTypeError:
        msg = f"must be 'auto', 'off' or a multiple >= 1 of the NG threshold, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None


def cmd_update(args: argparse.Namespace) -> int:
    from .jobs.update import UpdateJob, update_bank  # noqa: PLC0415

    job = UpdateJob(bank=args.bank, inputs=tuple(args.input), out=args.out, calibration=args.calibration,
                    device=args.device, gate=args.gate, max_new_centroids=args.max_new_centroids,
                    keep_history=args.keep_history, dry_run=args.dry_run,
                    progress=not args.quiet)
    row = update_bank(job)
    if row["recalibrated"] and row["written"]:
        print(f"thresholds: {_thresholds_change(row['thresholds_before'], row['thresholds'])}")
    for held in row["held_back"]:
        print(f"held back {held['normalized']:8.3f} x threshold (score {held['score']:.4f})  {held['image']}")
    verb = "would add" if row["dry_run"] else "added"
    gate = "off" if row["gate"] is None else f"{row['gate']:g} x threshold (score {row['gate_score']:.4f})"
    print(f"{verb} {row['images_added']} images, held back {row['images_held']} above the gate at {gate} "
          f"({row['images_skipped']} unreadable): K {row['n_centroids_before']} -> {row['n_centroids']}")
    if row["dry_run"]:
        print("dry run: nothing written")
        if row["refused"]:
            print(f"ocbank: error: {row['refused']}", file=sys.stderr)
            return EXIT_ERROR
    elif row["written"]:
        print(f"wrote {args.out} (sha256 {row['bank_sha256'][:12]}); parent kept as {row['history']}; report {row['report']}")
    else:
        print(f"no new version: every readable image was held back; {args.out} unchanged; report {row['report']}")
    if row["thresholds_predate_update"] and (row["written"] or row["dry_run"]):
        print("ocbank: warning: the OK/NG thresholds predate this update; pass --calibration to refresh them.",
              file=sys.stderr)
    if row["images_held"]:
        print(f"ocbank: error: {row['images_held']} new image(s) scored above the gate and were held back "
              "(listed above); check them, and pass --gate with a higher multiple only if they are normal",
              file=sys.stderr)
    if row["images_skipped"]:
        print(f"ocbank: error: {row['images_skipped']} new image(s) could not be read and were left out "
              "(see the warnings above)", file=sys.stderr)
    return EXIT_PARTIAL if row["images_held"] or row["images_skipped"] else EXIT_OK


def cmd_history(args: argparse.Namespace) -> int:
    from .jobs.versions import list_versions  # noqa: PLC0415
    from .jsonio import dumps  # noqa: PLC0415

    rows = list_versions(args.bank)
    if args.json:
        print(dumps([v.to_dict() for v in rows]), end="")
        return EXIT_OK

    def show(value: Any) -> str:
        return "-" if value is None else ("yes" if value is True else "no" if value is False else str(value))

    print(f"{'sha256':<14}{'time':<22}{'added':>6}{'held':>6}  {'recalibrated':<13}{'':<8}file")
    for v in rows:
        print(f"{v.sha256[:12]:<14}{v.time:<22}{show(v.images_added):>6}{show(v.images_held):>6}  "
              f"{show(v.recalibrated):<13}{'current' if v.current else '':<8}{v.path}")
    return EXIT_OK


def cmd_rollback(args: argparse.Namespace) -> int:
    from .jobs.versions import rollback  # noqa: PLC0415

    row = rollback(args.bank, args.to, keep=args.keep_history)
    if not row["changed"]:
        print(f"{row['bank']} already is version {row['new_sha256'][:12]}: nothing to do")
    else:
        print(f"restored {row['bank']} to {row['new_sha256'][:12]} (from {row['restored_from']}); "
              f"the replaced version {row['old_sha256'][:12] if row['old_sha256'] else 'none'} kept as {row['archived']}")
    return EXIT_OK


def _thresholds_change(before: dict[str, float] | None, after: dict[str, float] | None) -> str:
    """``image 40.53 -> 38.23, pixel 41.20 -> 39.00``: a recalibration's old and new thresholds."""

    def value(t: dict[str, float] | None, key: str) -> str:
        return "none" if t is None else f"{t[key]:.4g}"

    return ", ".join(f"{key} {value(before, key)} -> {value(after, key)}" for key in ("image", "pixel"))


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .jobs import evaluate  # noqa: PLC0415

    cfg = _load_config(args)
    report = evaluate.evaluate(
        cfg, args.banks, args.out, _classes(args.classes), heatmaps=args.heatmaps, progress=not args.quiet,
        allow_partial=args.allow_partial,
    )
    print(evaluate.format_table(report))
    print(f"metrics: {Path(args.out) / 'metrics.json'}  scores: {Path(args.out) / 'scores.csv'}  "
          f"report: {Path(args.out) / 'report.html'}")
    if report["images_skipped"]:
        print(f"ocbank: error: {report['images_skipped']} test image(s) could not be read and were left out "
              "(named in the warnings above)", file=sys.stderr)
    if report["n_nan_scores"]:
        print(f"ocbank: error: {report['n_nan_scores']} test image(s) got a NaN score (a failed computation): "
              "counted NG, the image metrics of their class are null", file=sys.stderr)
    if report["n_outputs_failed"]:
        print(f"ocbank: error: {report['n_outputs_failed']} overlay(s) could not be written (named in the warnings "
              "above); metrics.json and scores.csv hold every score", file=sys.stderr)
    if not any(row["n_test"] for row in report["classes"].values()):
        return EXIT_ERROR  # no test image scored: nothing to read the metrics from
    return EXIT_PARTIAL if report["images_skipped"] or report["n_nan_scores"] or report["n_outputs_failed"] else EXIT_OK


def cmd_predict(args: argparse.Namespace) -> int:
    from .data import escape_path  # noqa: PLC0415
    from .jobs import predict  # noqa: PLC0415

    rows = predict.predict(
        args.bank, args.input, args.out, args.save_maps, progress=not args.quiet, device=args.device,
        allow_partial=args.allow_partial, save_masks=args.save_masks, overlays=args.overlays,
    )
    for row in rows:
        if row["status"] != "ok":
            print(f"{'unreadable':>10}  {escape_path(row['path'])}")
        else:
            print(f"{row['score']:10.4f} {row.get('label') or '':>3}  {escape_path(row['path'])}")
    wrote = {"scores": "scores.csv", "heatmaps": "heatmaps" if args.overlays != "none" else None,
             "maps": "maps" if args.save_maps else None, "masks": "masks" if args.save_masks else None}
    print("  ".join(f"{what}: {Path(args.out) / name}" for what, name in wrote.items() if name))
    failed = sum(row["status"] != "ok" for row in rows)
    unwritten = sum(row.get("outputs_failed", 0) for row in rows)
    if failed:
        what = f"none of the {len(rows)} input image(s) could" if failed == len(rows) else (
            f"{failed} of the {len(rows)} input image(s) could not")
        print(f"ocbank: error: {what} be scored (see the warnings above)", file=sys.stderr)
    if unwritten:
        print(f"ocbank: error: {unwritten} output file(s) could not be written (see the warnings above); "
              "scores.csv holds every score", file=sys.stderr)
    if failed == len(rows):
        return EXIT_ERROR  # nothing scored: a caller must not read this as a partial success
    return EXIT_PARTIAL if failed or unwritten else EXIT_OK


def cmd_suggest_radius(args: argparse.Namespace) -> int:
    from .jobs import evaluate  # noqa: PLC0415

    cfg = _load_config(args)
    stats = evaluate.suggest_radius(cfg, _classes(args.classes), progress=not args.quiet)
    print(f"{'class':<16}{'p50':>8}{'p90':>8}{'p95':>8}{'p99':>8}{'suggested':>10}{'patches':>9}")
    for name, s in stats.items():
        print(
            f"{name:<16}{s['p50']:>8.2f}{s['p90']:>8.2f}{s['p95']:>8.2f}{s['p99']:>8.2f}"
            f"{s['suggested']:>10.2f}{s['n_patches']:>9}"
        )
    if args.json:
        from .jsonio import write_json  # noqa: PLC0415

        write_json(args.json, stats)
        print(f"statistics: {args.json}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from .model import export  # noqa: PLC0415

    path = export.export(args.bank, args.out, args.format)
    print(f"exported {args.bank} as {args.format}: {path}")
    return 0


def _float_above(text: str, low: float, inclusive: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value >= low if inclusive else value > low) or value == float("inf"):
        msg = f"must be a number {'>=' if inclusive else '>'} {low:g}, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _non_negative_float(text: str) -> float:
    return _float_above(text, 0.0, inclusive=True)


def _positive_float(text: str) -> float:
    return _float_above(text, 0.0, inclusive=False)


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import ServeOptions  # noqa: PLC0415
    from .serve.options import check_port_free  # noqa: PLC0415

    options = ServeOptions(
        banks=args.banks, host=args.host, port=args.port, replicas=args.replicas, max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms, address=args.address, runtime=args.runtime, max_queued=args.max_queued,
        timeout_s=args.timeout_ms / 1000.0, max_banks_per_replica=args.max_banks_per_replica, cpus=args.cpus,
        device=args.device, admin_token_file=args.admin_token_file, inspect_token_file=args.inspect_token_file,
        allow_unauthenticated=args.allow_unauthenticated,
    )
    if not options.address:
        check_port_free(options.host, options.port)  # at once, before Ray or the models are even imported
    from .serve.server import serve_forever  # noqa: PLC0415

    signum = serve_forever(options)  # returns once stopped cleanly: in-flight requests answered
    print(f"ocbank serve: stopped by {signal.Signals(signum).name}", file=sys.stderr)
    return EXIT_TERMINATED if signum == signal.SIGTERM else EXIT_INTERRUPTED


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import main as doctor  # noqa: PLC0415

    return doctor(args.json, measure=not args.no_measure)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ocbank",
        description="Online cluster memory bank anomaly detection.",
        epilog="exit status: 0 all inputs processed; 1 some inputs failed (the rest written); "
        "2 usage, configuration, data or file error, or nothing usable (no class built, no image scored); 130 interrupted; 143 stopped by SIGTERM.",
    )
    parser.add_argument("--version", action="version", version=f"ocbank {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build", help="build one bank per class (checkpointed, resumable)")
    add_config_arguments(p)
    p.add_argument("--out", required=True, help="output folder for <class>.h5")
    p.add_argument("--classes", type=class_list, help="comma-separated subset of classes")
    p.add_argument("--device", type=device_arg, help="override the config's device (cpu, cuda, cuda:N, auto)")
    p.add_argument("--checkpoint-every", type=positive_int, default=DEFAULT_CHECKPOINT_EVERY, metavar="N",
                   help=f"rewrite <class>.partial.h5 every N images (default {DEFAULT_CHECKPOINT_EVERY})")
    p.add_argument("--resume", action="store_true",
                   help="skip complete classes and continue partial ones from their checkpoint")
    p.add_argument("--single-bank", action="store_true",
                   help="one bank over every class's images, interleaved (writes _all_classes.h5)")
    p.add_argument("--backend", choices=["local", "ray"], default="local")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--shards", type=positive_int, default=1, help="build each class in N shards and merge them")
    p.add_argument("--retries", type=non_negative_int, default=2, help="Ray retries per class or shard (default 2)")
    p.add_argument("--ray-cpus", type=positive_int, help="CPUs for a local Ray (default: all)")
    p.add_argument("--threads", type=positive_int,
                   help="CPU threads for torch and faiss (default: torch's; Ray workers get the driver's)")
    p.add_argument("--calibration", metavar="DIR",
                   help="normal images for the OK/NG thresholds (default: a seeded hold-out of the training images)")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("update", help="stream new normal images into a bank (keeps learning on the line)")
    p.add_argument("--bank", required=True, help="the bank to update")
    p.add_argument("--input", required=True, nargs="+", help="new normal images: files or folders")
    p.add_argument("--out", required=True, help="the new bank file (atomic; may be the same path)")
    p.add_argument("--calibration", metavar="DIR", help="normal images to recalibrate the thresholds on")
    p.add_argument("--device", type=device_arg, help="override the bank's device (cpu, cuda, cuda:N, auto)")
    p.add_argument("--gate", type=gate_value, default=GATE_AUTO, metavar="GATE",
                   help="auto, off or a MULTIPLE: hold back new images scoring above MULTIPLE x the NG threshold; auto: "
                   f"{AUTO_GATE_MULTIPLE:g} (needs a calibrated bank); off: absorb everything (default {GATE_AUTO})")
    p.add_argument("--max-new-centroids", type=_positive_float, default=DEFAULT_MAX_NEW_CENTROIDS, metavar="FRACTION",
                   help="refuse the whole update if it would add more than FRACTION x K centroids "
                   f"(another product's images; default {DEFAULT_MAX_NEW_CENTROIDS:g})")
    p.add_argument("--keep-history", type=positive_int, default=DEFAULT_KEEP_HISTORY, metavar="N",
                   help=f"earlier versions kept in <out's folder>/history (default {DEFAULT_KEEP_HISTORY})")
    p.add_argument("--dry-run", action="store_true", help="report what would be absorbed, held back and added; write nothing")
    p.set_defaults(func=cmd_update)

    p = sub.add_parser("history", help="list a bank's versions (kept by every update)")
    p.add_argument("--bank", required=True, help="the bank file")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(func=cmd_history)

    p = sub.add_parser("rollback", help="restore a kept version of a bank (atomic; keeps the version it replaces)")
    p.add_argument("--bank", required=True, help="the bank file")
    p.add_argument("--to", required=True, metavar="SHA", help="the version's sha256 or a prefix of it (ocbank history)")
    p.add_argument("--keep-history", type=positive_int, default=DEFAULT_KEEP_HISTORY, metavar="N",
                   help=f"earlier versions kept (default {DEFAULT_KEEP_HISTORY})")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("evaluate", help="score test splits, write metrics.json and scores.csv")
    add_config_arguments(p)
    p.add_argument("--banks", required=True, help="folder with <class>.h5 banks")
    p.add_argument("--out", required=True)
    p.add_argument("--classes", type=class_list, help="comma-separated subset of classes")
    p.add_argument("--heatmaps", type=non_negative_int, default=4, help="overlay PNGs per class (default 4)")
    p.add_argument("--device", type=device_arg, help="override the config's device (cpu, cuda, cuda:N, auto)")
    p.add_argument("--allow-partial", action="store_true",
                   help="accept unfinished build checkpoints (*.partial.h5)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="score images with one bank")
    p.add_argument("--bank", required=True)
    p.add_argument("--input", required=True, nargs="+", help="image files or folders")
    p.add_argument("--out", required=True)
    p.add_argument("--save-maps", action="store_true", help="also write raw maps as .npy")
    p.add_argument("--save-masks", action="store_true", help="also write binary defect masks as PNG (calibrated banks)")
    p.add_argument("--overlays", choices=["all", "ng", "none"], default="all",
                   help="heatmap overlay PNGs for every image (default), NG images only (calibrated banks), or none")
    p.add_argument("--device", type=device_arg, help="override the bank's device (cpu, cuda, cuda:N, auto)")
    p.add_argument("--allow-partial", action="store_true",
                   help="accept an unfinished build checkpoint (*.partial.h5)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("suggest-radius", help="print the radius rule's percentiles per class")
    add_config_arguments(p)
    p.add_argument("--classes", type=class_list, help="comma-separated subset of classes")
    p.add_argument("--device", type=device_arg, help="override the config's device (cpu, cuda, cuda:N, auto)")
    p.add_argument("--json", help="also write the statistics to this JSON file")
    p.set_defaults(func=cmd_suggest_radius)

    p = sub.add_parser("export", help="export a bank as one ONNX / OpenVINO graph (backbone, 1-NN, score, map)")
    p.add_argument("--bank", required=True, help="bank file (.h5)")
    p.add_argument("--format", choices=["onnx", "openvino"], default="onnx")
    p.add_argument("--out", required=True, help="model.onnx, or model.xml for openvino")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="serve every <product>.h5 of a folder over HTTP (Ray Serve)")
    p.add_argument("--banks", required=True, help="folder with <product>.h5 banks")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=port_number, default=8000, help="HTTP port, 1 to 65535 (default 8000)")
    p.add_argument("--replicas", type=positive_int, default=1,
                   help="model replicas; the CPUs are shared out among them (default 1)")
    p.add_argument("--max-batch", type=positive_int, default=8, help="most images per model call (default 8)")
    p.add_argument("--batch-wait-ms", type=_non_negative_float, default=10.0,
                   help="how long a batch waits to fill (default 10 ms)")
    p.add_argument("--max-queued", type=positive_int, default=64,
                   help="requests queued beyond what the replicas hold; more get 503 (default 64)")
    p.add_argument("--timeout-ms", type=_positive_float, default=60000.0,
                   help="per-request timeout when X-Timeout-Ms is not sent (default 60000)")
    p.add_argument("--runtime", choices=["auto", "torch", "onnxruntime"], default="auto",
                   help="auto: onnxruntime on CPU where its graph is exact, torch otherwise")
    p.add_argument("--max-banks-per-replica", type=positive_int, default=8,
                   help="banks a replica keeps loaded; the least recently used is evicted beyond (default 8)")
    p.add_argument("--address", help="join this Ray cluster (ray://head:10001 or host:port); default: a local Ray")
    p.add_argument("--cpus", type=positive_int, help="CPUs to share among the replicas (default: all of this machine)")
    p.add_argument("--device", type=device_arg, help="override the banks' device (cpu, cuda, cuda:N, auto)")
    p.add_argument("--admin-token-file", metavar="FILE",
                   help="reload, feedback, learn and rollback need Authorization: Bearer <the token in FILE>")
    p.add_argument("--inspect-token-file", metavar="FILE",
                   help="inspection needs Authorization: Bearer <this token, or the admin one> (default: open)")
    p.add_argument("--allow-unauthenticated", action="store_true",
                   help="serve on a non-loopback --host without --admin-token-file (a trusted network only)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("doctor", help="what will run here: versions, BLAS kernels, CPU, CUDA, search rates")
    p.add_argument("--json", nargs="?", const="-", metavar="PATH",
                   help="write the report as JSON to PATH (alone: print JSON instead of text)")
    p.add_argument("--no-measure", action="store_true", help="skip the GEMM and search timings (a few seconds)")
    p.set_defaults(func=cmd_doctor)

    for p in sub.choices.values():  # -q also after the command; SUPPRESS keeps a -q given before it
        p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit status (argparse itself exits 2 on usage errors)."""
    args: argparse.Namespace | None = None
    _sigterm_received.clear()
    try:
        # From the first line: a SIGTERM while the arguments are read, or while Ray starts, exits 143 too.
        with _sigterm_as_interrupt():
            args = build_parser().parse_args(argv)
            logging.basicConfig(level=logging.WARNING, format="ocbank: %(levelname)s: %(message)s")
            return args.func(args)
    except KeyboardInterrupt as exc:
        # The status follows the signal with or without --debug (which adds the traceback).
        stopped = isinstance(exc, Terminated) or _sigterm_received.is_set()
        if args is not None and args.debug:
            traceback.print_exc()
        print(f"ocbank: {'stopped by SIGTERM' if stopped else 'interrupted'}", file=sys.stderr)
        return EXIT_TERMINATED if stopped else EXIT_INTERRUPTED
    except (OcbankError, OSError) as exc:
        if args is None or args.debug:
            raise
        # Deliberate errors and file problems the user can fix: one line. Anything else
        # is a bug in ocbank and surfaces with its traceback.
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"ocbank: error: {message} (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
