"""`segshift profile`: parameters, FLOPs, latency and FPS of each model in `params.profile.models`.

FLOPs come from `torch.utils.flop_counter.FlopCounterMode`, which counts the matrix products and
convolutions of one forward at 2 FLOPs per multiply-accumulate (so GFLOPs = 2 x GMACs, the figure
papers usually quote as "FLOPs" being MACs); element-wise work (BN, ReLU, interpolation) is not
counted. Latency is wall-clock time of a forward in eval mode under `torch.inference_mode`, on CUDA
when available (synchronised before each clock read), else on the CPU with torch's thread count.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from segshift.components.config import ModelConfig, ProfileConfig, load_params
from segshift.components.io import atomic_write_text
from segshift.components.models.factory import build_model, count_parameters


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def count_flops(model: nn.Module, inputs: torch.Tensor) -> int:
    """FLOPs of one forward of `inputs`, as FlopCounterMode counts them (2 per multiply-add)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(inputs)
    return int(counter.get_total_flops())


def synchronise(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read times it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency_ms(model: nn.Module, inputs: torch.Tensor, warmup: int, repeats: int) -> list[float]:
    """Milliseconds of each of `repeats` forwards, after `warmup` untimed ones (allocator, kernels)."""
    times: list[float] = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(inputs)
        for _ in range(repeats):
            synchronise(inputs.device)
            start = time.perf_counter()
            model(inputs)
            synchronise(inputs.device)
            times.append(1000.0 * (time.perf_counter() - start))
    return times


def profile_model(model_cfg: ModelConfig, cfg: ProfileConfig, device: torch.device) -> dict:
    # Speed and size do not depend on the weights: skip downloading pretrained ones.
    model = build_model(model_cfg.model_copy(update={"pretrained": None})).eval()
    params = count_parameters(model)
    inputs = torch.randn(cfg.batch_size, 3, cfg.height, cfg.width)
    flops = count_flops(model, inputs)  # on the CPU: the count does not depend on the device
    model, inputs = model.to(device), inputs.to(device)
    times = measure_latency_ms(model, inputs, cfg.warmup, cfg.repeats)
    mean_ms = statistics.fmean(times)
    return {
        "name": model_cfg.name, "backbone": model_cfg.backbone, "width": model_cfg.width,
        "aux_head": model_cfg.aux_head,
        "params": params, "params_m": round(params / 1e6, 3),
        "gflops": round(flops / 1e9, 3),
        "latency_ms_mean": round(mean_ms, 3),
        "latency_ms_std": round(statistics.stdev(times), 3) if len(times) > 1 else 0.0,
        "fps": round(cfg.batch_size * 1000.0 / mean_ms, 3),
    }


def profile_models(cfg: ProfileConfig) -> dict:
    """Size, FLOPs and speed of every configured model at (batch_size, 3, height, width)."""
    device = pick_device()
    results = {}
    for name, model_cfg in cfg.models.items():
        results[name] = profile_model(model_cfg, cfg, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next model should not pay for this one's cached blocks
    return {"device": describe_device(device), "height": cfg.height, "width": cfg.width,
            "batch_size": cfg.batch_size, "warmup": cfg.warmup, "repeats": cfg.repeats,
            "models": results}


TABLE_HEADER = ("model", "params (M)", "GFLOPs", "latency (ms)", "FPS")


def _table_row(name: str, r: dict) -> tuple[str, ...]:
    return (name, f"{r['params_m']:.2f}", f"{r['gflops']:.1f}",
            f"{r['latency_ms_mean']:.1f} ± {r['latency_ms_std']:.1f}", f"{r['fps']:.2f}")


def format_table(report: dict) -> str:
    """Plain aligned text: names left-aligned, numbers right-aligned."""
    rows = [TABLE_HEADER] + [_table_row(name, r) for name, r in report["models"].items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_HEADER))]
    lines = [f"input {report['batch_size']}x3x{report['height']}x{report['width']} on {report['device']}; "
             f"mean ± std of {report['repeats']} forwards after {report['warmup']} warm-up"]
    for row in rows:
        cells = [cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def record_profile(params, report: dict, project_dir: Path) -> Path:
    """The table in `<reports>/profile.md`, and the numbers in an MLflow run of stage 'profile'."""
    from segshift.pipelines.tracking import StageTracker
    table_path = project_dir / params.paths.reports / "profile.md"
    atomic_write_text(table_path, f"Device: {report['device']}, input {report['width']}x{report['height']}, "
                                  f"batch {report['batch_size']}\n\n```\n{format_table(report)}\n```\n")
    with StageTracker(params, stage="profile", project_dir=project_dir) as tracker:
        for name, numbers in report["models"].items():
            tracker.log_metrics({f"{name}.{k}": float(v) for k, v in numbers.items()
                                 if isinstance(v, (int, float)) and not isinstance(v, bool)})
        tracker.log_dict(report, "profile.json")
        tracker.log_artifact(table_path)
    return table_path


def _cmd_profile(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    report = profile_models(params.profile)
    record_profile(params, report, Path.cwd())
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


def build_profile_parser(sub, add_params) -> None:
    parser = sub.add_parser("profile", help="parameters, FLOPs, latency and FPS of params.profile.models")
    add_params(parser)
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    parser.set_defaults(func=_cmd_profile)
