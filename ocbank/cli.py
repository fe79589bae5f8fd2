"""The ``ocbank`` command line: build, evaluate, predict, suggest-radius."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from . import __version__


def _classes(text: str | None) -> list[str] | None:
    if not text:
        return None
    return [c.strip() for c in text.split(",") if c.strip()]


def _load_config(args: argparse.Namespace) -> Any:
    from . import config  # noqa: PLC0415

    overrides: dict[str, Any] = {}
    if getattr(args, "device", None):
        overrides["device"] = args.device
    return config.load(args.config, overrides=overrides)


def cmd_build(args: argparse.Namespace) -> int:
    from .jobs import build as jobs  # noqa: PLC0415

    cfg = _load_config(args)
    report = jobs.build_all(
        cfg,
        args.out,
        _classes(args.classes),
        backend=args.backend,
        address=args.address,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        single_bank=args.single_bank,
        shards=args.shards,
        retries=args.retries,
        ray_cpus=args.ray_cpus,
        threads=args.threads,
        progress=not args.quiet,
    )
    print(jobs.format_summary(report))
    print(f"banks in {args.out}; summary: {Path(args.out) / jobs.SUMMARY_NAME}")
    for name in report["failed"]:
        print(f"ocbank: error: class {name!r} failed: {report['classes'][name]['error']}", file=sys.stderr)
    return 1 if report["failed"] else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .jobs import evaluate  # noqa: PLC0415

    cfg = _load_config(args)
    report = evaluate.evaluate(
        cfg, args.banks, args.out, _classes(args.classes), heatmaps=args.heatmaps, progress=not args.quiet
    )
    print(evaluate.format_table(report))
    print(f"metrics: {Path(args.out) / 'metrics.json'}  scores: {Path(args.out) / 'scores.csv'}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .jobs import predict  # noqa: PLC0415

    rows = predict.predict(args.bank, args.input, args.out, args.save_maps, progress=not args.quiet, device=args.device)
    for row in rows:
        print(f"{row['score']:10.4f}  {row['path']}" if row["status"] == "ok" else f"{'unreadable':>10}  {row['path']}")
    print(f"scores: {Path(args.out) / 'scores.csv'}  heatmaps: {Path(args.out) / 'heatmaps'}")
    return 0


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
        Path(args.json).write_text(json.dumps(stats, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .model import export  # noqa: PLC0415

    path = export.export(args.bank, args.out, args.format)
    print(f"exported {args.bank} as {args.format}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ocbank", description="Online cluster memory bank anomaly detection.")
    parser.add_argument("--version", action="version", version=f"ocbank {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build", help="build one bank per class (checkpointed, resumable)")
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True, help="output folder for <class>.h5")
    p.add_argument("--classes", help="comma-separated subset of classes")
    p.add_argument("--device", help="override the config's device")
    p.add_argument("--checkpoint-every", type=int, default=100, metavar="N",
                   help="rewrite <class>.partial.h5 every N images (default 100)")
    p.add_argument("--resume", action="store_true",
                   help="skip complete classes and continue partial ones from their checkpoint")
    p.add_argument("--single-bank", action="store_true",
                   help="one bank over every class's images, interleaved (writes _all_classes.h5)")
    p.add_argument("--backend", choices=["local", "ray"], default="local")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--shards", type=int, default=1, help="build each class in N shards and merge them")
    p.add_argument("--retries", type=int, default=2, help="Ray retries per class or shard (default 2)")
    p.add_argument("--ray-cpus", type=int, help="CPUs for a local Ray (default: all)")
    p.add_argument("--threads", type=int,
                   help="CPU threads for torch and faiss (default: torch's; Ray workers get the driver's)")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("evaluate", help="score test splits, write metrics.json and scores.csv")
    p.add_argument("--config", required=True)
    p.add_argument("--banks", required=True, help="folder with <class>.h5 banks")
    p.add_argument("--out", required=True)
    p.add_argument("--classes")
    p.add_argument("--heatmaps", type=int, default=4, help="overlay PNGs per class (default 4)")
    p.add_argument("--device")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="score images with one bank")
    p.add_argument("--bank", required=True)
    p.add_argument("--input", required=True, nargs="+", help="image files or folders")
    p.add_argument("--out", required=True)
    p.add_argument("--save-maps", action="store_true", help="also write raw maps as .npy")
    p.add_argument("--device")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("suggest-radius", help="print the radius rule's percentiles per class")
    p.add_argument("--config", required=True)
    p.add_argument("--classes")
    p.add_argument("--device")
    p.add_argument("--json", help="also write the statistics to this JSON file")
    p.set_defaults(func=cmd_suggest_radius)

    p = sub.add_parser("export", help="export a bank as one ONNX / OpenVINO graph (backbone, 1-NN, score, map)")
    p.add_argument("--bank", required=True, help="bank file (.h5)")
    p.add_argument("--format", choices=["onnx", "openvino"], default="onnx")
    p.add_argument("--out", required=True, help="model.onnx, or model.xml for openvino")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="ocbank: %(levelname)s: %(message)s")
    if args.debug:
        return args.func(args)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("ocbank: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, ImportError) as exc:
        message = str(exc).replace("\n", " ")
        print(f"ocbank: error: {message} (run with --debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
