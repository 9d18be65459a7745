"""`segshift bench`: throughput figures recorded in BENCHMARKS.md."""
from __future__ import annotations

import argparse
import json
import os
import platform
import queue as queue_module
import shutil
import tempfile
import time
from pathlib import Path

from segshift.components.data.builtin import BuiltinSpec, write_builtin_domain


def machine_description() -> dict:
    """The machine beside every figure: CPU model, torch's CPU capability and bf16 support."""
    import torch

    from segshift.components.engine.precision import cpu_record
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), **cpu_record(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


# What an AVX2-only CPU runs: ATen's kernels dispatched at AVX2 and oneDNN capped at AVX2 (no
# AVX-512, no native bf16), so that a machine with AVX-512 can measure both.
CPU_ISA_ENV = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}


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
    from segshift.pipelines.ingest import DEFAULT_MAX_IMAGE_PIXELS, ingest
    work = Path(tempfile.mkdtemp(prefix="segshift-bench-ingest-"))
    try:
        write_gta5(work / "gta5", count, size=(1914, 1052), seed=0)
        start = time.perf_counter()
        ingest("gta5", str(work / "gta5"), work / "out", resize=(1280, 720),
               max_pixels=DEFAULT_MAX_IMAGE_PIXELS, strict=True, workers=workers, progress=False)
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"benchmark": "ingest_gta5", "images": count, "native_size": [1914, 1052],
            "resize": [1280, 720], "workers": workers, "seconds": round(seconds, 2),
            "images_per_s": round(count / seconds, 2)}


TRAIN_CASES: dict[str, dict] = {
    "small_deeplabv2_r18_w0.25": {"backbone": "resnet18", "width": 0.25, "rates": [1, 2, 3, 4],
                                  "size": (128, 256), "batch": 8},
    "deeplabv2_r101": {"backbone": "resnet101", "width": 1.0, "rates": [6, 12, 18, 24],
                       "size": (256, 512), "batch": 2},
}
GPU_SIZES = {"gta5_1280x720": (720, 1280), "cityscapes_1024x512": (512, 1024)}


def _train_step_worker(case: dict, amp: str, channels_last: bool, steps: int, queue,
                       count_flops: bool = False) -> None:
    """Runs in a fresh process so that its peak memory is its own."""
    import resource

    import torch

    from segshift.components.config import ModelConfig, OptimizerConfig, SupervisedStageConfig
    from segshift.components.methods.supervised import Supervised
    from segshift.components.models.factory import build_model
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_cfg = ModelConfig(name="deeplabv2", backbone=case["backbone"], width=case["width"],
                            rates=case["rates"], aux_head=True, frozen_bn=False, pretrained=None)
    stage = SupervisedStageConfig(iterations=steps, batch_size=case["batch"], accumulation=1,
                                  aux_weight=0.1, crop=None, flip=False, augment=None,
                                  optimizer=OptimizerConfig(name="sgd", lr=2.5e-4, momentum=0.9,
                                                            betas=(0.9, 0.99), weight_decay=5e-4,
                                                            head_lr_mult=10, poly_power=0.9))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    method = Supervised(build_model(model_cfg).to(device, memory_format=fmt), stage)
    optimizer = method.optimizers["model"].optimizer
    h, w = case["size"]
    images = torch.randn(case["batch"], 3, h, w, device=device).to(memory_format=fmt)
    labels = torch.randint(0, 19, (case["batch"], h, w), device=device)
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            method.training_step({"labelled": (images, labels)}, 0,
                                 lambda loss: (scaler.scale(loss) if scaler else loss).backward())
        (scaler.step(optimizer), scaler.update()) if scaler else optimizer.step()
    step()   # warm-up: allocator, kernels, autotuning
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak_mib = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    result = {"device": str(device), "images_per_s": round(case["batch"] * steps / seconds, 2),
              "peak_memory_mib": round(peak_mib), "step_s": round(seconds / steps, 3)}
    if count_flops:     # one more, untimed step: forward and backward convolutions and matmuls
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as counter:
            step()
        result["train_flops"] = int(counter.get_total_flops())
    queue.put(result)


def bench_train(name: str, case: dict, amp: str, channels_last: bool, steps: int,
                count_flops: bool = False) -> dict:
    import multiprocessing
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_train_step_worker,
                              args=(case, amp, channels_last, steps, queue, count_flops))
    process.start()
    while True:     # a worker that dies (bad config, out of memory) must not leave us waiting
        try:
            result = queue.get(timeout=5)
            break
        except queue_module.Empty:
            if not process.is_alive():
                raise RuntimeError(f"train-step benchmark '{name}' ({amp}) died with exit code "
                                   f"{process.exitcode}; its error is printed above") from None
    process.join()
    return {"benchmark": "train_step", "model": name, "size": list(case["size"])[::-1],
            "batch": case["batch"], "amp": amp, "channels_last": channels_last, **result}


def auto_choice(on_gpu: bool) -> dict[str, str | bool]:
    """What `engine.amp: auto` and `engine.channels_last: auto` pick on this machine."""
    import torch

    from segshift.components.engine.precision import Hardware, resolve_speed
    device = torch.device("cuda" if on_gpu else "cpu")
    speed = resolve_speed("auto", "auto", Hardware.detect(device))
    return {"amp": speed.amp, "channels_last": speed.channels_last}


def train_cases(on_gpu: bool, native_bf16: bool) -> list[tuple[str, dict, str, bool]]:
    """CPU: fp32 and bf16, NCHW and channels-last (bf16 of the reference network only where it is
    native: emulated it takes minutes a step); GPU: DeepLab-v2-R101 at the paper sizes with and
    without AMP/channels-last."""
    if not on_gpu:
        small = [("small_deeplabv2_r18_w0.25", TRAIN_CASES["small_deeplabv2_r18_w0.25"], amp, cl)
                 for amp in ("none", "bf16") for cl in (False, True)]
        r101 = [("deeplabv2_r101", TRAIN_CASES["deeplabv2_r101"], amp, True)
                for amp in (("none", "bf16") if native_bf16 else ("none",))]
        return small + r101
    cases = []
    for size_name, size in GPU_SIZES.items():
        case = {**TRAIN_CASES["deeplabv2_r101"], "size": size, "batch": 1}
        cases += [(f"deeplabv2_r101@{size_name}", case, amp, cl)
                  for amp, cl in (("none", False), ("fp16", False), ("bf16", True), ("fp16", True))]
    return cases


def bench_rank(params_path: str, concurrency: list[int]) -> list[dict]:
    """Ranking throughput (images/s, actor start-up included) of the Ray Data job per pool size.

    Needs the prepared data and models/inter/model.pt of the project (run `dvc repro rank` first).
    """
    from segshift.components.config import load_params
    from segshift.pipelines.rank import check_inputs, run_inference
    results = []
    for actors in concurrency:
        params = load_params(params_path, {"rank.concurrency": actors})
        inputs = check_inputs(params, Path.cwd())
        with tempfile.TemporaryDirectory(prefix="segshift-bench-rank-") as staging:
            start = time.perf_counter()
            run_inference(params, inputs, Path(staging), progress=False)
            seconds = time.perf_counter() - start
        results.append({"benchmark": "rank", "actors": actors, "images": len(inputs.rows),
                        "batch_size": params.rank.batch_size, "seconds": round(seconds, 2),
                        "images_per_s": round(len(inputs.rows) / seconds, 1)})
    return results


def bench_stages(params_path: str) -> list[dict]:
    """Wall time of each stage of the latest pipeline run, from its MLflow runs (stage command
    start-up, a few seconds each, is not included)."""
    from mlflow.tracking import MlflowClient

    from segshift.components.config import load_params
    from segshift.pipelines.tracking import TAG_PARENT, TAG_ROLE, TAG_STAGE, resolve_tracking_uri
    params = load_params(params_path)
    client = MlflowClient(resolve_tracking_uri(params.tracking, Path.cwd()))
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    latest = client.search_runs([experiment.experiment_id],
                                f"attributes.status = 'FINISHED' and tags.`{TAG_ROLE}` = 'stage'",
                                order_by=["attributes.end_time DESC"], max_results=1) if experiment else []
    if not latest or TAG_PARENT not in latest[0].data.tags:
        return []
    children = client.search_runs([experiment.experiment_id],
                                  f"tags.`{TAG_PARENT}` = '{latest[0].data.tags[TAG_PARENT]}' "
                                  "and attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"])
    stages: dict[str, object] = {}
    for run in children:
        stages.setdefault(run.data.tags.get(TAG_STAGE, run.info.run_name), run)
    return [{"benchmark": "stage_wall_time", "stage": stage,
             "seconds": round((run.info.end_time - run.info.start_time) / 1000, 1)}
            for stage, run in sorted(stages.items(), key=lambda kv: kv[1].info.start_time)]


def _bench_cases() -> dict[str, tuple[str, str | None, str]]:
    """Every method's throughput cases, from the registry: case -> (method, step, settings' stage)."""
    from segshift.components.methods.registry import METHODS
    return {case: (spec.name, step, stage) for spec in METHODS.values() for case, step, stage in spec.bench_cases}


def __getattr__(name: str):
    # METHOD_CASES (every case's name, in the registry's order) is computed when asked for: the
    # registry imports torch and every method, which `segshift bench` without methods never needs
    if name == "METHOD_CASES":
        return tuple(_bench_cases())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _case_stage(case: str) -> str:
    """The stage whose settings (and batch size) a case is built with."""
    return _bench_cases()[case][2]


def _method_for(case: str, params):
    """A method over a fresh `params.model` with the project's stage settings (inter for the
    adaptation methods, source for the others, as the method's `MethodSpec.bench` says) and the
    image roles it trains on."""
    from segshift.components.methods.registry import method_spec
    from segshift.components.models.factory import build_model
    name, step, stage = _bench_cases()[case]
    model = build_model(params.model.model_copy(update={"pretrained": None}))
    cfg = getattr(params, stage)
    if "method" in type(cfg).model_fields:
        cfg = cfg.model_copy(update={"method": name})
    return method_spec(name).step_builder(step)(model, cfg, params)


def bench_methods(params_path: str, steps: int) -> list[dict]:
    """Training-step throughput of every method on the project's model, at the built-in image
    size, with the project's batch sizes, precision and memory format as the engine resolves them
    on this CPU; images/s counts every image a step reads."""
    import torch

    from segshift.components.config import load_params
    return bench_methods_on(load_params(params_path), steps, torch.device("cpu"))


def bench_methods_on(params, steps: int, device) -> list[dict]:
    import torch

    from segshift.components.engine.loop import speed_settings
    from segshift.pipelines.profile import synchronise
    height, width = params.prepare.builtin.height, params.prepare.builtin.width
    speed = speed_settings(params.engine, device)
    rows = []
    for case in _bench_cases():
        torch.manual_seed(0)
        method = _method_for(case, params)
        for module in method.modules.values():
            module.to(device, memory_format=speed.memory_format)
        batch_size = getattr(params, _case_stage(case)).batch_size
        batch = {role: (torch.randn(batch_size, 3, height, width, device=device).contiguous(
                            memory_format=speed.memory_format),
                        torch.randint(0, params.model.num_classes, (batch_size, height, width), device=device))
                 for role in method.roles}
        optimizers = [spec.optimizer for spec in method.optimizers.values()]
        scaler = torch.amp.GradScaler(device.type) if speed.amp == "fp16" else None

        def step(i: int) -> None:
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            dtype = speed.autocast_dtype
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                method.training_step(batch, i, lambda loss: (scaler.scale(loss) if scaler else loss).backward())
            for optimizer in optimizers:
                scaler.step(optimizer) if scaler else optimizer.step()
            if scaler:
                scaler.update()
        step(0)    # warm-up
        synchronise(device)
        start = time.perf_counter()
        for i in range(1, steps + 1):
            step(i)
        synchronise(device)
        seconds = time.perf_counter() - start
        images = batch_size * len(method.roles) * steps
        rows.append({"benchmark": "method_step", "method": case, "batch": {r: batch_size for r in method.roles},
                     "size": [width, height], "amp": speed.amp, "channels_last": speed.channels_last,
                     "step_s": round(seconds / steps, 3), "images_per_s": round(images / seconds, 1)})
    return rows


def bench_sweep(params_path: str, schedulers: list[str]) -> list[dict]:
    """The project's sweep once per scheduler (same space, seed and trial count, fresh each time):
    wall time, intra steps run and the best trial, to weigh ASHA's savings against its result."""
    from segshift.components.config import load_params
    from segshift.pipelines.sweep import run_sweep
    params = load_params(params_path)
    rows = []
    for name in schedulers:
        cfg = params.sweep.model_copy(update={
            "name": f"bench-{name}", "scheduler": params.sweep.scheduler.model_copy(update={"name": name})})
        summary = run_sweep(params.model_copy(update={"sweep": cfg}), Path.cwd(), fresh=True, progress=False)
        rows.append({"benchmark": "sweep", "scheduler": name, "trials": summary["trials"],
                     "concurrent": cfg.max_concurrent_trials, "stopped": summary["stopped"],
                     "seconds": summary["seconds"], "steps_run": summary["steps_run"],
                     "steps_budget": summary["steps_budget"],
                     "best_val_miou": round(summary["best"]["val_miou"], 4),
                     "best_test_miou": round(summary["best"]["test"]["miou"], 4),
                     "best_config": summary["best"]["config"]})
    return rows


def isa_capped(isa: str) -> bool:
    return all(os.environ.get(k) == v for k, v in CPU_ISA_ENV[isa].items())


def _rerun_with_isa(argv: list[str], isa: str) -> int:
    """Run this same command again with the CPU's instruction set capped at `isa`: ATen and oneDNN
    read their caps once, at start-up, so it takes a fresh process."""
    import subprocess
    import sys
    env = {**os.environ, **CPU_ISA_ENV[isa]}
    return subprocess.run([sys.executable, "-m", "segshift.pipelines.cli", *argv], env=env).returncode


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch
    if args.cpu_isa != "native" and not isa_capped(args.cpu_isa):
        return _rerun_with_isa(args.argv, args.cpu_isa)
    machine = machine_description()
    results = {"machine": machine, "auto": auto_choice(torch.cuda.is_available()), "results": []}
    for workers in args.workers:
        if args.what in ("generate", "all"):
            results["results"].append(bench_generate(args.count, args.height, args.width, workers))
        if args.what in ("ingest", "all"):
            results["results"].append(bench_ingest(args.ingest_count, workers))
    if args.what in ("train", "all"):
        for name, case, amp, channels_last in train_cases(torch.cuda.is_available(), machine["native_bf16"]):
            results["results"].append(bench_train(name, case, amp, channels_last, args.train_steps))
    if args.what == "rank":
        results["results"] += bench_rank(args.params, args.actors)
    if args.what == "stages":
        results["results"] += bench_stages(args.params)
    if args.what == "sweep":
        results["results"] += bench_sweep(args.params, args.schedulers)
    if args.what == "methods":
        results["results"] += bench_methods(args.params, args.train_steps)
    print(json.dumps(results, indent=2))
    return 0


def build_bench_parser(sub) -> None:
    parser = sub.add_parser("bench", help="measure throughput (see BENCHMARKS.md)")
    parser.add_argument("what", choices=["generate", "ingest", "train", "methods", "rank", "stages", "sweep", "all"],
                        nargs="?", default="all", help="all = generate, ingest, train; methods: a training step of "
                        "every method on the project's model; rank, stages and sweep use the project's "
                        "pipeline outputs (run `dvc repro` first)")
    parser.add_argument("--count", type=int, default=400, help="generated images per run")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--ingest-count", type=int, default=48, help="GTA5 frames per run")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--train-steps", type=int, default=5, help="timed training steps per case")
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2], help="rank: actor pool sizes")
    parser.add_argument("--params", default="params.yaml", help="rank, stages, sweep: the project's params")
    parser.add_argument("--cpu-isa", choices=["native", *CPU_ISA_ENV], default="native",
                        help="avx2: measure as an AVX2-only CPU would run (ATen and oneDNN capped at "
                        "AVX2: no AVX-512, no native bf16) on a machine that has more")
    parser.add_argument("--schedulers", nargs="+", default=["asha", "fifo"], choices=["asha", "fifo"],
                        help="sweep: run the project's sweep once with each (as sweeps/bench-<name>)")
    parser.set_defaults(func=_cmd_bench)
