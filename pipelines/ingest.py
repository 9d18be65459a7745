"""`segshift ingest`: convert GTA5, Cityscapes or SYNTHIA from their original layout into the prepared format.

The output directory is built beside its final location and swapped in only when complete, so a
failed run (bad input in strict mode, an S3 error, Ctrl-C) leaves any previous output untouched.
"""
from __future__ import annotations

import argparse
import functools
import os
import time
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from segshift.components.data.formats import (
    DATASET_KINDS,
    STANDARD_SIZES,
    IngestError,
    RawSample,
    Size,
    check_kind,
    convert_sample,
    discover_samples,
    problems_error,
)
from segshift.components.data.manifest import (
    SKIPPED_NAME,
    SampleRecord,
    SkippedSample,
    write_manifest,
    write_skipped,
)
from segshift.components.data.storage import DatasetRoot, LocalRoot, open_root
from segshift.components.io import atomic_directory, check_output
from segshift.components.parallel import parallel_map

MIN_SIDE = 16
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000   # as params.yaml's prepare.max_image_pixels (a test keeps them equal)


@dataclass(frozen=True)
class IngestReport:
    kind: str
    out_dir: Path
    counts: dict[str, int]          # prepared samples per split
    skipped: int
    seconds: float
    skipped_reasons: list[SkippedSample] = field(default_factory=list, repr=False)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        splits = ", ".join(f"{split} {n}" for split, n in sorted(self.counts.items()))
        skipped = f"; skipped {self.skipped} (see {self.out_dir / SKIPPED_NAME})" if self.skipped else ""
        return (f"ingested {self.total} {self.kind} samples ({splits}) into {self.out_dir} "
                f"in {self.seconds:.1f} s{skipped}")


def ingest(kind: str, root: str, out_dir: str | Path, resize: Size | None, *, max_pixels: int,
           strict: bool = True, workers: int = 1, endpoint_url: str | None = None,
           progress: bool = True, full_label_splits: Collection[str] = ()) -> IngestReport:
    """Convert the raw dataset `kind` at `root` (local path or s3://bucket/prefix) into `out_dir`.

    `resize` is (width, height) or None for the native size. The labelled samples of the dataset's
    own splits in `full_label_splits` (e.g. Cityscapes "val", the reported split) also keep their
    label at native resolution when `resize` changes it: labels_full/<split>/<id>.png, the
    manifest's `label_full`, which evaluation scores against. With `strict` any bad sample is an
    IngestError naming the file; otherwise bad samples are skipped and listed in skipped.csv.
    An image or label claiming more than `max_pixels` pixels is a bad sample, refused undecoded.
    """
    started = time.perf_counter()
    check_kind(kind)
    size = _checked_size(resize)
    full_splits = _checked_splits(full_label_splits)
    if workers < 1:
        raise IngestError(f"workers must be >= 1, got {workers}")
    dataset_root = open_root(root, endpoint_url=endpoint_url)
    out_path = Path(out_dir)
    _refuse_overwriting_root(dataset_root, out_path)
    check_output(out_path)         # before discovery, which may list a whole bucket

    discovery = discover_samples(kind, dataset_root)
    if discovery.problems and strict:
        raise problems_error(kind, dataset_root, discovery.problems)
    skipped = [SkippedSample(dataset_root.describe(p.file), p.reason) for p in discovery.problems]

    with atomic_directory(out_path, writer=f"segshift ingest {kind}") as tmp:
        records, bad = _convert_all(discovery.samples, dataset_root, tmp, size, strict, workers, progress,
                                    max_pixels, full_splits)
        skipped += bad
        if not records:
            raise _nothing_prepared_error(kind, dataset_root, skipped)
        write_manifest(records, tmp)
        if skipped:
            write_skipped(skipped, tmp)

    counts = dict(Counter(record.split for record in records))
    return IngestReport(kind=kind, out_dir=out_path, counts=counts, skipped=len(skipped),
                        seconds=time.perf_counter() - started, skipped_reasons=skipped)


def _checked_size(resize: Size | None) -> Size | None:
    if resize is None:
        return None
    width, height = (int(v) for v in resize)
    if min(width, height) < MIN_SIDE:
        raise IngestError(f"resize {width}x{height} too small; both sides must be >= {MIN_SIDE}")
    return width, height


def _checked_splits(splits: Collection[str]) -> frozenset[str]:
    unknown = sorted(set(splits) - {"train", "val", "test"})
    if unknown:
        raise IngestError(f"full-resolution label split(s) {unknown} unknown; expected train, val or test")
    return frozenset(splits)


def _refuse_overwriting_root(root: DatasetRoot, out_path: Path) -> None:
    # The finished output replaces OUT wholesale: OUT containing ROOT would delete the raw data.
    if not isinstance(root, LocalRoot):
        return
    raw = Path(root.path).resolve()
    out = out_path.resolve()
    if raw == out or out in raw.parents:
        raise IngestError(f"output {out_path} would replace the dataset root {root.path}; "
                          "choose an output directory outside it")


def _convert_all(samples: list[RawSample], root: DatasetRoot, tmp: Path, size: Size | None, strict: bool,
                 workers: int, progress: bool, max_pixels: int,
                 full_splits: frozenset[str] = frozenset()) -> tuple[list[SampleRecord], list[SkippedSample]]:
    worker = functools.partial(convert_sample, root=root, out_dir=str(tmp), size=size, strict=strict,
                               max_pixels=max_pixels, full_label_splits=full_splits)
    records: list[SampleRecord] = []
    skipped: list[SkippedSample] = []
    for result in parallel_map(worker, samples, workers=workers, desc="ingest", progress=progress):
        (records if isinstance(result, SampleRecord) else skipped).append(result)
    return records, skipped


def _nothing_prepared_error(kind: str, root: DatasetRoot, skipped: list[SkippedSample]) -> IngestError:
    reasons = "\n".join(f"  {s.reason}" if s.reason.startswith(s.file) else f"  {s.file}: {s.reason}"
                        for s in skipped[:5])
    more = f"\n  ... and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    return IngestError(f"all {len(skipped)} {kind} sample(s) under {root.describe()} were skipped; "
                       f"nothing to prepare:\n{reasons}{more}")


# --- command line -----------------------------------------------------------------------------


def build_ingest_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "ingest", help="convert GTA5, Cityscapes or SYNTHIA from their original layout",
        description="Convert a raw dataset (local directory or s3://bucket/prefix) into the prepared "
                    "format: images/, labels/ (train ids) and manifest.parquet.")
    parser.add_argument("kind", choices=DATASET_KINDS)
    parser.add_argument("root", help="dataset root in its original layout: a path or s3://bucket/prefix")
    parser.add_argument("out", help="output directory (replaced only when the conversion succeeds)")
    sizes = ", ".join(f"{k} {w}x{h}" for k, (w, h) in STANDARD_SIZES.items())
    size_group = parser.add_mutually_exclusive_group()
    size_group.add_argument("--resize", nargs=2, type=int, metavar=("W", "H"),
                            help=f"output size; default: the standard size ({sizes})")
    size_group.add_argument("--no-resize", action="store_true", help="keep the native size")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="worker processes (default: %(default)s)")
    parser.add_argument("--no-strict", dest="strict", action="store_false",
                        help="skip bad samples (listed in OUT/skipped.csv) instead of failing")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS, metavar="N",
                        help="refuse any image or label larger than N pixels, before decoding it "
                             "(default: %(default)s, params.yaml's prepare.max_image_pixels)")
    parser.add_argument("--full-resolution-labels", dest="full_label_splits", action="append",
                        choices=("train", "val", "test"), default=[], metavar="SPLIT",
                        help="also keep this split's labels at native resolution (labels_full/), "
                             "for scoring at full resolution as ADVENT does; repeatable, e.g. val")
    parser.add_argument("--endpoint-url", default=None,
                        help="S3 endpoint (default: boto3's, e.g. from AWS_ENDPOINT_URL)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_ingest_command)
    return parser


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def resolve_size(kind: str, resize: list[int] | None, no_resize: bool) -> Size | None:
    if no_resize:
        return None
    if resize is not None:
        return int(resize[0]), int(resize[1])
    return STANDARD_SIZES[kind]


def run_ingest_command(args: argparse.Namespace) -> int:
    """Run `segshift ingest`; IngestError/StorageError (ValueErrors) propagate to the CLI's handler."""
    report = ingest(args.kind, args.root, args.out, resize=resolve_size(args.kind, args.resize, args.no_resize),
                    max_pixels=args.max_image_pixels, strict=args.strict, workers=args.workers,
                    endpoint_url=args.endpoint_url, progress=not args.quiet,
                    full_label_splits=args.full_label_splits)
    print(report.summary())
    return 0
