"""`segshift bench`: throughput figures recorded in BENCHMARKS.md."""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from segshift.components.data.builtin import BuiltinSpec, write_builtin_domain


def machine_description() -> dict:
    import torch
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def bench_generate(count: int, height: int, width: int, workers: int) -> dict:
    """Built-in generator throughput (images/s) writing target-domain scenes (the costlier style)."""
    spec = BuiltinSpec(seed=0, height=height, width=width, appearance_gap=1.0,
                       conditions=(("clear", 1.0), ("fog", 1.0), ("night", 1.0), ("rain", 1.0)))
    out = Path(tempfile.mkdtemp(prefix="segshift-bench-gen-"))
    try:
        start = time.perf_counter()
        write_builtin_domain(spec, {"target_train": count, "target_val": 0, "target_test": 0},
                             "target", out, workers, progress=False)
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"benchmark": "generate", "images": count, "size": [width, height], "workers": workers,
            "seconds": round(seconds, 2), "images_per_s": round(count / seconds, 1)}


def bench_ingest(count: int, workers: int) -> dict:
    """GTA5 ingestion throughput on native-size (1914x1052) frames, resized to 1280x720."""
    from segshift.components.data.rawformats import write_gta5
    from segshift.pipelines.ingest import ingest
    work = Path(tempfile.mkdtemp(prefix="segshift-bench-ingest-"))
    try:
        write_gta5(work / "gta5", count, size=(1914, 1052), seed=0)
        start = time.perf_counter()
        ingest("gta5", str(work / "gta5"), work / "out", resize=(1280, 720), strict=True,
               workers=workers, progress=False)
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"benchmark": "ingest_gta5", "images": count, "native_size": [1914, 1052],
            "resize": [1280, 720], "workers": workers, "seconds": round(seconds, 2),
            "images_per_s": round(count / seconds, 2)}


def _cmd_bench(args: argparse.Namespace) -> int:
    results = {"machine": machine_description(), "results": []}
    for workers in args.workers:
        if args.what in ("generate", "all"):
            results["results"].append(bench_generate(args.count, args.height, args.width, workers))
        if args.what in ("ingest", "all"):
            results["results"].append(bench_ingest(args.ingest_count, workers))
    print(json.dumps(results, indent=2))
    return 0


def build_bench_parser(sub) -> None:
    parser = sub.add_parser("bench", help="measure throughput (see BENCHMARKS.md)")
    parser.add_argument("what", choices=["generate", "ingest", "all"], nargs="?", default="all")
    parser.add_argument("--count", type=int, default=400, help="generated images per run")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--ingest-count", type=int, default=48, help="GTA5 frames per run")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.set_defaults(func=_cmd_bench)
