"""The `prepare` stage: the prepared source and target domains, built-in or ingested, written atomically."""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from segshift.components.config import DomainConfig, Params, load_params
from segshift.components.data.builtin import spec_from_config, write_builtin_domain
from segshift.components.data.manifest import MANIFEST_NAME, read_manifest
from segshift.components.data.splits import cityscapes_roles, hold_out_val
from segshift.components.io import atomic_directory, atomic_write_text
from segshift.pipelines.ingest import ingest
from segshift.pipelines.remote import INDEX_NAME, mirror_path, push

SUMMARY_NAME = "summary.json"


@dataclass
class PrepareReport:
    out_dir: str
    uploaded: int = 0     # files sent to S3 (an s3:// out_dir)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # domain -> split -> n
    seconds: float = 0.0


def full_label_splits(cfg: DomainConfig, role: str) -> tuple[str, ...]:
    """The dataset's own splits whose labels ingest keeps at native resolution: with
    `full_resolution_labels`, those that become the reported test split (Cityscapes val)."""
    if not cfg.full_resolution_labels or role != "target":
        return ()
    return ("val",) if cfg.kind == "cityscapes" else ()


def _prepare_real_domain(cfg: DomainConfig, role: str, out_dir: Path, params: Params,
                         progress: bool) -> None:
    p = params.prepare
    ingest(cfg.kind, cfg.root, out_dir, resize=cfg.resize, max_pixels=p.max_image_pixels, strict=p.strict,
           workers=p.workers, endpoint_url=params.storage.s3_endpoint_url, progress=progress,
           full_label_splits=full_label_splits(cfg, role))
    table = read_manifest(out_dir)
    if cfg.kind == "cityscapes" and role == "target":
        table = cityscapes_roles(table, cfg.val_fraction, p.builtin.seed)
    else:
        table = hold_out_val(table, cfg.val_fraction, p.builtin.seed, by_group=cfg.kind == "cityscapes")
    # The role, not the dataset, decides the domain (Cityscapes may also serve as a source).
    table = table.set_column(table.schema.get_field_index("domain"), "domain",
                             pa.array([role] * table.num_rows, pa.string()))
    pq.write_table(table, out_dir / MANIFEST_NAME)


def _split_counts(prepared: Path) -> dict[str, int]:
    splits = read_manifest(prepared).column("split").to_pylist()
    return {s: splits.count(s) for s in ("train", "val", "test") if s in splits}


def prepare(params: Params, progress: bool = True, project_dir: str | Path = ".") -> PrepareReport:
    """Build `prepare.out_dir/{source,target}`; a failure leaves the previous output as it was.

    An s3:// out_dir is built in its local mirror, then the files that changed are uploaded.
    """
    start = time.perf_counter()
    p = params.prepare
    report = PrepareReport(out_dir=p.out_dir)
    with atomic_directory(mirror_path(params, project_dir, p.out_dir), writer="segshift prepare",
                          companions=(INDEX_NAME,)) as tmp:    # push() adds the index to an S3 mirror
        for role in ("source", "target"):
            cfg: DomainConfig = getattr(p, role)
            if cfg.kind == "builtin":
                counts = p.builtin.counts.model_dump()
                write_builtin_domain(spec_from_config(p.builtin), counts, role, tmp / role,
                                     p.workers, progress)
            else:
                _prepare_real_domain(cfg, role, tmp / role, params, progress)
            report.counts[role] = _split_counts(tmp / role)
        atomic_write_text(tmp / SUMMARY_NAME, json.dumps(report.counts, indent=2, sort_keys=True))
    report.uploaded = push(params, project_dir, p.out_dir)
    report.seconds = time.perf_counter() - start
    return report


def _cmd_prepare(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    report = prepare(params, progress=not args.quiet)
    counts = ", ".join(f"{domain}: " + " ".join(f"{s}={n}" for s, n in splits.items())
                       for domain, splits in report.counts.items())
    uploaded = f"; {report.uploaded} files uploaded" if report.uploaded else ""
    print(f"prepared {report.out_dir} in {report.seconds:.1f}s ({counts}){uploaded}")
    return 0


def build_prepare_parser(sub, add_params) -> None:
    parser = sub.add_parser("prepare", help="build the prepared source and target datasets (DVC stage)")
    add_params(parser)
    parser.set_defaults(func=_cmd_prepare)
