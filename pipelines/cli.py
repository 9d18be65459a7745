"""`segshift`: one sub-command per pipeline stage, plus tools (ingest, calibrate, bench)."""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from segshift import __version__
from segshift.components.config import ConfigError, load_params

# Errors a user can fix; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, FileNotFoundError, PermissionError)


def _user_errors() -> tuple[type[Exception], ...]:
    from segshift.components.data.manifest import ManifestError
    from segshift.components.data.storage import StorageError
    from segshift.components.data.formats import IngestError
    from segshift.components.engine.checkpoint import CheckpointError
    from segshift.components.engine.loop import EngineError, TrainingDiverged
    from segshift.components.models.factory import ModelError
    from segshift.pipelines.train import StageInputError
    from segshift.components.ranking import RankingError
    from segshift.pipelines.cluster import ClusterError
    from segshift.pipelines.sweep import SweepError
    from segshift.pipelines.compare import CompareError
    return USER_ERRORS + (ManifestError, StorageError, IngestError, ModelError, CheckpointError,
                          EngineError, TrainingDiverged, StageInputError, RankingError, SweepError,
                          ClusterError, CompareError)


def _add_params(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", metavar="PATH",
                        help="params file (default: params.yaml)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _cmd_prepare(args: argparse.Namespace) -> int:
    from segshift.pipelines.prepare import prepare
    params = load_params(args.params)
    report = prepare(params, progress=not args.quiet)
    counts = ", ".join(f"{domain}: " + " ".join(f"{s}={n}" for s, n in splits.items())
                       for domain, splits in report.counts.items())
    uploaded = f"; {report.uploaded} files uploaded" if report.uploaded else ""
    print(f"prepared {report.out_dir} in {report.seconds:.1f}s ({counts}){uploaded}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from segshift.pipelines.bench import build_bench_parser
    from segshift.pipelines.calibrate import build_calibrate_parser
    from segshift.pipelines.compare import build_compare_parser
    from segshift.pipelines.ingest import build_ingest_parser
    from segshift.pipelines.preview import build_preview_parser
    from segshift.pipelines.train import build_train_parser
    from segshift.pipelines.profile import build_profile_parser
    from segshift.pipelines.rank import build_rank_parser
    from segshift.pipelines.evaluate import build_evaluate_parser
    from segshift.pipelines.gpu_check import build_gpu_check_parser
    from segshift.pipelines.preset import build_preset_parser
    from segshift.pipelines.seeds import build_seeds_parser
    from segshift.pipelines.sweep import build_sweep_parser

    parser = argparse.ArgumentParser(
        prog="segshift", description="Domain-adaptive semantic segmentation pipelines.")
    parser.add_argument("--version", action="version", version=f"segshift {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prep = sub.add_parser("prepare", help="build the prepared source and target datasets (DVC stage)")
    _add_params(prep)
    prep.set_defaults(func=_cmd_prepare)

    build_train_parser(sub, _add_params)
    build_rank_parser(sub, _add_params)
    build_evaluate_parser(sub, _add_params)
    build_seeds_parser(sub, _add_params)
    build_compare_parser(sub, _add_params)
    build_sweep_parser(sub, _add_params)
    build_ingest_parser(sub)
    build_calibrate_parser(sub, _add_params)
    build_preview_parser(sub, _add_params)
    build_bench_parser(sub)
    build_profile_parser(sub, _add_params)
    build_gpu_check_parser(sub, _add_params)
    build_preset_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)   # for a command that re-runs itself
    try:
        return int(args.func(args) or 0)
    except _user_errors() as exc:
        if os.environ.get("SEGSHIFT_TRACEBACK"):     # where a user error came from, for bug reports
            traceback.print_exc()
        print(f"segshift {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"segshift {args.command}: interrupted{f'; {exc}' if str(exc) else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
