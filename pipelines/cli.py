"""`segshift`: one sub-command per pipeline stage, plus tools (ingest, calibrate, bench)."""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

import yaml
from pydantic import ValidationError

from segshift import __version__
from segshift.components.config import ConfigError, truncated, validation_problems, yaml_problem

# Errors a user can fix (a file, a setting, the environment); anything else is a bug. OSError
# covers missing, unreadable and directory paths, a full disk and an unreachable endpoint;
# UnicodeDecodeError a text file in another encoding.
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, OSError, UnicodeDecodeError, yaml.YAMLError,
                                            ValidationError)
MAX_MESSAGE = 2000   # characters of one error line: a message quoting a huge value stays readable
TRACEBACK_ENV = "SEGSHIFT_TRACEBACK"


def _user_errors() -> tuple[type[Exception], ...]:
    # Imported here: the modules pull in torch, Ray and MLflow, which `segshift --help` need not.
    from segshift.components.data.manifest import ManifestError
    from segshift.components.data.storage import StorageError
    from segshift.components.data.formats import IngestError
    from segshift.components.engine.checkpoint import CheckpointError
    from segshift.components.engine.loop import EngineError, TrainingDiverged
    from segshift.components.engine.precision import PrecisionError
    from segshift.components.io import OutputError
    from segshift.components.models.factory import ModelError
    from segshift.components.paths import UnsafePathError
    from segshift.components.methods.rounds import StageInputError
    from segshift.components.ranking import RankingError
    from segshift.pipelines.cluster import ClusterError
    from segshift.pipelines.sweep import SweepError
    from segshift.pipelines.compare import CompareError
    return USER_ERRORS + (ManifestError, StorageError, IngestError, ModelError, CheckpointError,
                          EngineError, TrainingDiverged, PrecisionError, UnsafePathError, StageInputError,
                          RankingError, SweepError, ClusterError, CompareError, OutputError)


def _os_message(exc: OSError) -> str:
    # "[Errno 2] No such file or directory: 'x'" -> "x: No such file or directory"
    if exc.filename is None or not exc.strerror:
        return str(exc)
    where = f"{exc.filename} -> {exc.filename2}" if exc.filename2 is not None else str(exc.filename)
    return f"{where}: {exc.strerror}"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        return f"invalid {exc.title} settings: " + "; ".join(validation_problems(exc, model=None))
    if isinstance(exc, yaml.YAMLError):
        return f"not valid YAML: {yaml_problem(exc)}"
    if isinstance(exc, OSError):
        return _os_message(exc)
    return str(exc) or type(exc).__name__


def one_line(text: str) -> str:
    """`text` as one bounded line with credentials masked: the last thing a failed command prints."""
    from segshift.pipelines.tracking import mask_text
    joined = "; ".join(line.strip() for line in str(text).splitlines() if line.strip())
    return truncated(mask_text(joined), MAX_MESSAGE)


def _wants_traceback() -> bool:
    return os.environ.get(TRACEBACK_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _report_failure(command: str, exc: Exception) -> int:
    """One line on stderr for a failed command: exit 2 for an error the user can fix, 1 for a bug."""
    if _wants_traceback():     # where it came from, for a bug report
        traceback.print_exc()
    try:
        user_errors = _user_errors()
    except Exception:       # a module that fails to import must not hide the error being reported
        user_errors = USER_ERRORS
    if isinstance(exc, user_errors):
        print(f"segshift {command}: error: {one_line(_describe(exc))}", file=sys.stderr)
        return 2
    print(f"segshift {command}: internal error: {one_line(f'{type(exc).__name__}: {exc}')} "
          f"(run with {TRACEBACK_ENV}=1 for the traceback and report it)", file=sys.stderr)
    return 1


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line like every other error (`sub.add_parser` makes
    the sub-commands' parsers of this class too)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def _add_params(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", metavar="PATH",
                        help="params file (default: params.yaml)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from segshift.pipelines.bench import build_bench_parser
    from segshift.pipelines.calibrate import build_calibrate_parser
    from segshift.pipelines.compare import build_compare_parser
    from segshift.pipelines.dvc_yaml import build_dvc_yaml_parser
    from segshift.pipelines.ingest import build_ingest_parser
    from segshift.pipelines.prepare import build_prepare_parser
    from segshift.pipelines.preview import build_preview_parser
    from segshift.pipelines.train import build_train_parser
    from segshift.pipelines.profile import build_profile_parser
    from segshift.pipelines.rank import build_rank_parser
    from segshift.pipelines.evaluate import build_evaluate_parser
    from segshift.pipelines.gpu_check import build_gpu_check_parser
    from segshift.pipelines.preset import build_preset_parser
    from segshift.pipelines.seeds import build_seeds_parser
    from segshift.pipelines.sweep import build_sweep_parser

    parser = _Parser(
        prog="segshift", description="Domain-adaptive semantic segmentation pipelines.")
    parser.add_argument("--version", action="version", version=f"segshift {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    build_prepare_parser(sub, _add_params)
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
    build_dvc_yaml_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)   # for a command that re-runs itself
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:
        print(f"segshift {args.command}: interrupted{f'; {exc}' if str(exc) else ''}", file=sys.stderr)
        return 130
    except Exception as exc:    # the last resort: one line, never a raw traceback
        return _report_failure(args.command, exc)


if __name__ == "__main__":
    sys.exit(main())
