"""`segshift gpu-check` (`make gpu-check`): every GPU path of segshift in one command.

Run it on a machine with one CUDA GPU (about 10 minutes on an H100-class GPU; nothing is
downloaded). Each part is timed and recorded as ok, failed (with its error) or skipped (with why):

1. cuda_tests: the tests marked `cuda` (fp16 with a grad scaler, bf16, channels-last, nccl).
2. method_steps: one training step of every method on the GPU, the project's model and batches.
3. main_job: prepare -> source -> oracle -> inter -> rank -> intra -> evaluate on the built-in
   data on the GPU, in a scratch directory, with each stage's wall time and test mIoU.
4. r101_steps: DeepLab-v2-R101 training steps at 1280x720 and 1024x512, fp32 and AMP: images/s,
   achieved FLOP/s against the GPU's peak, peak memory.
5. profile: `segshift profile` (parameters, FLOPs, latency) at 512x1024.

Writes `<out>/gpu_check.json` and `<out>/gpu_check.md`. Without a GPU the CUDA parts are skipped
with the reason and the `cuda` tests run (and skip), so the command itself is tested on any CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

from segshift.components.config import Params, load_params, validate_params
from segshift.components.io import atomic_write_text

NO_GPU = "no CUDA device: torch.cuda.is_available() is False"
# Dense peak TFLOP/s per precision (NVIDIA data sheets, SXM parts): fp32 = TF32 tensor cores where
# cuDNN may use them (Ampere and newer, torch's default for convolutions), else CUDA-core FP32.
PEAK_TFLOPS = {
    "H200": {"fp32": 494.7, "bf16": 989.4, "fp16": 989.4},
    "H100": {"fp32": 494.7, "bf16": 989.4, "fp16": 989.4},
    "A100": {"fp32": 156.0, "bf16": 312.0, "fp16": 312.0},
    "L4": {"fp32": 60.0, "bf16": 121.0, "fp16": 121.0},
    "V100": {"fp32": 15.7, "bf16": None, "fp16": 125.0},
    "T4": {"fp32": 8.1, "bf16": None, "fp16": 65.0},
}


def gpu_peak_tflops(name: str, amp: str) -> float | None:
    """The GPU's dense peak for `amp` (none = fp32/TF32), or None for a GPU not in the table."""
    for model, peaks in PEAK_TFLOPS.items():
        if model in name.upper():
            return peaks["fp32" if amp == "none" else amp]
    return None


def cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


# -- the parts -------------------------------------------------------------------------------------

def cuda_tests(project_dir: Path, work: Path) -> dict:
    """The tests marked `cuda`, in a fresh pytest process: counts of passed, failed and skipped."""
    report = work / "cuda-tests.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                           f"--junitxml={report}", "tests"], cwd=project_dir, capture_output=True, text=True)
    if not report.is_file():
        raise RuntimeError(f"pytest wrote no report (exit {proc.returncode}): {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    suite = ET.parse(report).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    cases = []
    for case in suite.iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        reason = next((child.get("message", "") for child in case if child.tag in ("failure", "error", "skipped")), "")
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "reason": reason[:300]})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failure", "error", "skipped")}
    if counts["failure"] or counts["error"] or proc.returncode not in (0, 5):
        raise RuntimeError(f"cuda tests: {counts}; {proc.stdout[-3000:]}")
    return {"counts": counts, "tests": cases}


def method_steps(params: Params) -> dict:
    from segshift.pipelines.bench import bench_methods_on
    import torch
    return {"rows": bench_methods_on(params, steps=5, device=torch.device("cuda"))}


def main_job_params(params: Params, work: Path, device: str = "cuda") -> Params:
    """The project's params with every output in `work`, on `device`, tracked in a scratch store."""
    raw = params.model_dump(mode="json")
    raw["engine"]["device"] = device
    raw["prepare"]["out_dir"] = str(work / "data" / "prepared")
    raw["prepare"]["workers"] = max(1, min(8, os.cpu_count() or 1))
    raw["rank"]["gpus_per_actor"] = 1 if device == "cuda" else 0
    raw["tracking"]["uri"] = f"sqlite:///{work / 'mlflow.db'}"
    raw["paths"] = {name: str(work / name) for name in raw["paths"]}
    raw["rank"]["out_dir"] = str(work / "ranking")
    raw["evaluate"]["out"] = str(work / "metrics" / "summary.json")
    return validate_params(raw, source="gpu-check main job")


def main_job(params: Params, work: Path, device: str = "cuda") -> dict:
    """The whole main job on the GPU: per-stage wall time and, per trained stage, test mIoU."""
    from segshift.pipelines.prepare import prepare
    from segshift.pipelines.seeds import run_seed
    job = main_job_params(params, work / "main-job", device)
    times: dict[str, float] = {}
    clock = [time.perf_counter()]

    def stage_done(stage: str) -> None:
        now = time.perf_counter()
        times[stage] = round(now - clock[0], 1)
        clock[0] = now
    prepare(job, progress=False, project_dir=work / "main-job")
    stage_done("prepare")
    summary = run_seed(job, work / "main-job", progress=False, stage_done=stage_done)
    return {"stage_seconds": times, "total_seconds": round(sum(times.values()), 1),
            "test_miou": {stage: round(100 * entry["miou"], 1) for stage, entry in summary.items()}}


def r101_steps(steps: int) -> dict:
    from segshift.pipelines.bench import bench_train, train_cases
    import torch
    name = torch.cuda.get_device_name(0)
    rows = []
    for case_name, case, amp, channels_last in train_cases(on_gpu=True, native_bf16=True):
        row = bench_train(case_name, case, amp, channels_last, steps, count_flops=True)
        achieved = row["train_flops"] / row["step_s"] / 1e12
        peak = gpu_peak_tflops(name, amp)
        rows.append({**row, "achieved_tflops": round(achieved, 1), "peak_tflops": peak,
                     "share_of_peak": round(achieved / peak, 3) if peak else None})
    return {"gpu": name, "rows": rows}


def profile_part(params: Params) -> dict:
    from segshift.pipelines.profile import profile_models
    return profile_models(params.profile)


# -- the check -------------------------------------------------------------------------------------

def run_part(name: str, needs_gpu: bool, fn: Callable[[], dict], has_gpu: bool) -> dict:
    if needs_gpu and not has_gpu:
        return {"status": "skipped", "reason": NO_GPU}
    start = time.perf_counter()
    try:
        result = fn()
        status, extra = "ok", {"result": result}
    except Exception as exc:   # one part failing must not hide the others' figures
        status, extra = "failed", {"error": f"{type(exc).__name__}: {exc}",
                                   "traceback": traceback.format_exc()[-4000:]}
    print(f"gpu-check {name}: {status} ({time.perf_counter() - start:.0f} s)", flush=True)
    return {"status": status, "seconds": round(time.perf_counter() - start, 1), **extra}


def gpu_check(params: Params, project_dir: Path, out_dir: Path, steps: int = 5) -> dict:
    from segshift.pipelines.bench import machine_description
    has_gpu = cuda_available()
    with tempfile.TemporaryDirectory(prefix="segshift-gpu-check-") as tmp:
        work = Path(tmp)
        parts = {
            "cuda_tests": run_part("cuda_tests", False, lambda: cuda_tests(project_dir, work), has_gpu),
            "method_steps": run_part("method_steps", True, lambda: method_steps(params), has_gpu),
            "main_job": run_part("main_job", True, lambda: main_job(params, work), has_gpu),
            "r101_steps": run_part("r101_steps", True, lambda: r101_steps(steps), has_gpu),
            "profile": run_part("profile", True, lambda: profile_part(params), has_gpu),
        }
    report = {"machine": machine_description(), "cuda": has_gpu, "parts": parts,
              "ok": all(p["status"] != "failed" for p in parts.values())}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "gpu_check.json", json.dumps(report, indent=2))
    atomic_write_text(out_dir / "gpu_check.md", gpu_check_markdown(report))
    return report


def gpu_check_markdown(report: dict) -> str:
    machine = report["machine"]
    lines = ["# segshift gpu-check", "",
             f"GPU: {machine.get('cuda') or 'none'}; CPU: {machine['cpu_model']} ({machine['cpu_count']} cores, "
             f"torch capability {machine['cpu_capability']}); torch {machine['torch']}.", "",
             "| part | status | seconds | note |", "|---|---|---|---|"]
    for name, part in report["parts"].items():
        note = part.get("reason") or part.get("error", "")
        lines.append(f"| {name} | {part['status']} | {part.get('seconds', '–')} | {note[:120]} |")
    parts = report["parts"]
    if parts["cuda_tests"].get("result"):
        counts = parts["cuda_tests"]["result"]["counts"]
        lines += ["", "CUDA tests: " + ", ".join(f"{n} {k}" for k, n in counts.items())]
    if parts["method_steps"].get("result"):
        lines += ["", "## One training step of every method on the GPU", "",
                  "| method | amp | s/step | images/s |", "|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['amp']} | {r['step_s']} | {r['images_per_s']} |"
                  for r in parts["method_steps"]["result"]["rows"]]
    if parts["main_job"].get("result"):
        job = parts["main_job"]["result"]
        lines += ["", f"## The main job on the GPU: {job['total_seconds']} s", "",
                  "| stage | seconds | test mIoU |", "|---|---|---|"]
        lines += [f"| {stage} | {s} | {job['test_miou'].get(stage, '')} |" for stage, s in job["stage_seconds"].items()]
    if parts["r101_steps"].get("result"):
        lines += ["", f"## DeepLab-v2-R101 training steps ({parts['r101_steps']['result']['gpu']})", "",
                  "| input | amp | channels-last | images/s | TFLOP/s | of peak | peak memory MiB |",
                  "|---|---|---|---|---|---|---|"]
        for r in parts["r101_steps"]["result"]["rows"]:
            share = f"{100 * r['share_of_peak']:.0f} %" if r["share_of_peak"] else "–"
            lines.append(f"| {r['size'][0]}x{r['size'][1]} | {r['amp']} | {r['channels_last']} | "
                         f"{r['images_per_s']} | {r['achieved_tflops']} | {share} | {r['peak_memory_mib']} |")
    if parts["profile"].get("result"):
        from segshift.pipelines.profile import format_table
        lines += ["", "## segshift profile", "", "```", format_table(parts["profile"]["result"]), "```"]
    return "\n".join(lines) + "\n"


def _cmd_gpu_check(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    report = gpu_check(params, Path.cwd(), Path(args.out), steps=args.steps)
    print(gpu_check_markdown(report))
    print(f"wrote {Path(args.out) / 'gpu_check.json'} and {Path(args.out) / 'gpu_check.md'}")
    return 0 if report["ok"] else 1


def build_gpu_check_parser(sub, add_params) -> None:
    parser = sub.add_parser("gpu-check", help="every GPU path in one run: cuda tests, a step of every method, "
                            "the main job, R101 throughput and FLOP/s, profile (skips without a GPU)")
    add_params(parser)
    parser.add_argument("--out", default="reports/gpu-check", help="where gpu_check.{json,md} go")
    parser.add_argument("--steps", type=int, default=5, help="timed R101 training steps per case")
    parser.set_defaults(func=_cmd_gpu_check)

