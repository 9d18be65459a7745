"""`segshift bench`: throughput figures recorded in BENCHMARKS.md."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import queue as queue_module
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
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


def random_batch(roles, batch_size: int, size: tuple[int, int], num_classes: int, device,
                 memory_format=None) -> dict:
    """One batch per role of random images and labels at `size` (height, width)."""
    import torch
    memory_format = memory_format or torch.contiguous_format
    return {role: (torch.randn(batch_size, 3, *size, device=device).contiguous(memory_format=memory_format),
                   torch.randint(0, num_classes, (batch_size, *size), device=device))
            for role in roles}


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
        batch = random_batch(method.roles, batch_size, (height, width), params.model.num_classes, device,
                             speed.memory_format)
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


# -- `segshift bench engine`: the engine's training step against a bare torch loop ----------------
#
# Three timings of one step of the Supervised method on the project's model, batch size and built-in
# image size, on the CPU: (a) a bare torch loop on pre-made tensors, (b) `Trainer.fit` fed that same
# batch from memory, (c) `Trainer.fit` reading a prepared dataset through the stage's own batch
# source. (b) - (a) is what the engine costs, (c) - (b) what data loading on the critical path costs.
# Eager variants (precision, memory format) run in this process, one after the other on fresh
# models; a torch.compile variant runs in a fresh process, so that a compilation that overruns can be
# stopped and dynamo's caches and compile workers leave no trace on the variants after it.

ENGINE_CASE = "supervised"      # the bench case (registry) whose step and stage settings are used
# fp32 FMA pipes per core x fp32 lanes per pipe, by the ISA torch dispatches to (its CPU capability)
FMA_PIPES_LANES = {"AVX512": (2, 16), "AVX2": (2, 8)}
PEAK_ASSUMPTIONS = (
    "peak = cores (torch threads) x clock (cpufreq max, else /proc/cpuinfo 'cpu MHz') x FMA pipes x fp32 "
    "lanes x 2 FLOP per FMA (AVX512: 2 x 16, AVX2: 2 x 8); bf16 twice that where native (AVX512-BF16 dot "
    "products: 2 bf16 products per fp32 lane), else the fp32 figure. AMD Zen 3/4 (family 25) runs each "
    "512-bit FMA as two 256-bit halves: 8 lanes per pipe there. Not modelled: AMX, clocks under "
    "AVX-512 load or turbo, CPUs with one FMA pipe; give --peak-gflops for the true one")
ENGINE_PHASES = ("next_batch", "forward_loss", "backward", "optimiser", "rest_of_step", "loop")
ENGINE_PATHS = ("bare", "engine", "engine_data")


@dataclass(frozen=True)
class EngineVariant:
    amp: str                # "none" | "bf16" (autocast dtype)
    channels_last: bool
    compile: bool           # torch.compile(model), inductor

    @property
    def name(self) -> str:
        return (("fp32" if self.amp == "none" else self.amp) + ("-cl" if self.channels_last else "")
                + ("-compile" if self.compile else ""))


ENGINE_VARIANTS = {v.name: v for v in (EngineVariant(amp, cl, compiled) for compiled in (False, True)
                                       for amp in ("none", "bf16") for cl in (False, True))}


def default_engine_variants(native_bf16: bool) -> list[str]:
    """Every variant where bf16 is native; fp32 only elsewhere (emulated bf16: minutes per case)."""
    return [name for name, v in ENGINE_VARIANTS.items() if native_bf16 or v.amp == "none"]


@dataclass(frozen=True)
class PeakEstimate:
    fp32_gflops: float | None
    bf16_gflops: float | None
    source: str              # "formula" | "--peak-gflops" | why there is none
    cores: int
    mhz: float | None
    isa: str

    def for_amp(self, amp: str) -> float | None:
        return self.bf16_gflops if amp == "bf16" else self.fp32_gflops

    def record(self) -> dict:
        return {**dataclasses.asdict(self), "assumptions": PEAK_ASSUMPTIONS}


def cpu_peak(cores: int, mhz: float | None, isa: str, native_bf16: bool,
             override_gflops: float | None = None, split_512: bool = False) -> PeakEstimate:
    """The CPU's theoretical peak in GFLOP/s: cores x GHz x FMA pipes x fp32 lanes x 2 FLOP per FMA.

    Assumed (PEAK_ASSUMPTIONS, printed with the figures): two FMA pipes per core, as wide as the ISA
    torch dispatches to (AVX512: 16 fp32 lanes, so 64 FLOP per cycle; AVX2: 8 lanes, 32), running at
    the given clock on every core; bf16 doubles it where native. A real CPU may fall short of this
    (AMD Zen 4 splits each 512-bit FMA in two: half; lower clocks under AVX-512) or exceed it (AMX).
    `split_512`: the CPU executes a 512-bit FMA as two 256-bit halves (AMD Zen 4), so AVX512 counts
    8 lanes per pipe. `override_gflops` replaces the fp32 figure (bf16 still doubles it where native); a CPU whose ISA
    or clock is unknown has no peak unless given one."""
    bf16_factor = 2.0 if native_bf16 else 1.0
    if override_gflops is not None:
        return PeakEstimate(override_gflops, override_gflops * bf16_factor, "--peak-gflops", cores, mhz, isa)
    pipes_lanes = FMA_PIPES_LANES.get(isa.upper())
    if pipes_lanes is None or not mhz:
        why = f"unknown ({'clock' if pipes_lanes else f'ISA {isa}'} not known): give --peak-gflops"
        return PeakEstimate(None, None, why, cores, mhz, isa)
    pipes, lanes = pipes_lanes
    if split_512 and isa.upper() == "AVX512":
        lanes //= 2
    fp32 = cores * mhz / 1000 * pipes * lanes * 2
    return PeakEstimate(fp32, fp32 * bf16_factor, "formula", cores, mhz, isa)


def cpu_clock_mhz() -> float | None:
    """The CPU's maximum clock (cpufreq, which lscpu's 'CPU max MHz' reads), else the highest
    'cpu MHz' in /proc/cpuinfo (the current clock: virtual machines often expose only that)."""
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1000
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            clocks = [float(line.split(":", 1)[1]) for line in f if line.lower().startswith("cpu mhz")]
    except (OSError, ValueError):
        return None
    return max(clocks) if clocks else None


def machine_peak(override_gflops: float | None = None) -> PeakEstimate:
    import torch

    from segshift.components.engine.precision import Hardware
    hardware = Hardware.detect(torch.device("cpu"))
    return cpu_peak(torch.get_num_threads(), cpu_clock_mhz(), hardware.cpu_capability, hardware.native_bf16,
                    override_gflops, split_512=splits_512_bit_fma())


def splits_512_bit_fma(cpuinfo: str | None = None) -> bool:
    """AMD Zen 3/4 (cpu family 25, with AVX-512 from Zen 4 on) run a 512-bit FMA as two 256-bit
    halves; Zen 5 (family 26) and Intel run it whole."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    fields = dict(line.split(":", 1) for line in cpuinfo.splitlines()[:40] if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return fields.get("vendor_id") == "AuthenticAMD" and fields.get("cpu family") == "25"


def bare_loss(out, labels, aux_weight: float):
    """The Supervised step's loss (main head + aux_weight x each auxiliary head, logits upsampled to
    label size) in plain torch, so that what segshift's own loss code costs shows in the comparison."""
    import torch.nn.functional as F

    from segshift.components.data.labels import IGNORE_INDEX
    size = labels.shape[-2:]

    def cross_entropy(logits):
        upsampled = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return F.cross_entropy(upsampled, labels, ignore_index=IGNORE_INDEX)
    loss = cross_entropy(out.main)
    for aux in out.aux:
        loss = loss + aux_weight * cross_entropy(aux)
    return loss


def train_step_flops(model, images, labels, aux_weight: float) -> int:
    """FLOPs of one training step's forward and backward, as FlopCounterMode counts them (matrix
    products and convolutions at 2 per multiply-add; element-wise work and the optimiser uncounted)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        bare_loss(model(images), labels, aux_weight).backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


class StepClock:
    """Seconds per step and per named phase, taken by wrapping callables: only the bench wraps
    them, so the engine carries no timing hooks. Phases nest (training_step holds backward)."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.phases: list[dict[str, float]] = []
        self.end: float | None = None

    @contextlib.contextmanager
    def phase(self, name: str, begins_step: bool = False):
        start = time.perf_counter()
        if begins_step:
            self.starts.append(start)
            self.phases.append({})
        current = self.phases[-1]
        try:
            yield
        finally:
            current[name] = current.get(name, 0.0) + time.perf_counter() - start

    def timed(self, name: str, fn, begins_step: bool = False):
        def wrapper(*args, **kwargs):
            with self.phase(name, begins_step):
                return fn(*args, **kwargs)
        return wrapper

    def finish(self) -> None:
        self.end = time.perf_counter()

    def summary(self, skip: int) -> dict:
        """After `skip` warm-up steps: the median and mean step (start to next start, so the loop's
        own work counts) in ms, and each phase's median in ms."""
        ends = self.starts[1:] + [self.end]
        steps = [self._breakdown(p, end - start) for p, start, end in zip(self.phases, self.starts, ends)][skip:]
        if not steps:
            raise ValueError("no timed steps after the warm-up")
        ms = [1000 * s["interval"] for s in steps]
        return {"ms_per_step": round(statistics.median(ms), 2), "mean_ms": round(statistics.mean(ms), 2),
                "steps": len(steps),
                "phases_ms": {name: round(1000 * statistics.median(s[name] for s in steps), 2)
                              for name in ENGINE_PHASES}}

    @staticmethod
    def _breakdown(p: dict[str, float], interval: float) -> dict[str, float]:
        training, backward = p.get("training_step", 0.0), p.get("backward", 0.0)
        step = p["step"]
        return {"interval": interval, "next_batch": p.get("next_batch", 0.0),
                "forward_loss": training - backward, "backward": backward, "optimiser": p.get("optimiser", 0.0),
                # the engine: poly lr, zero_grad, loss bookkeeping, the finite check; bare: zero_grad
                "rest_of_step": step - p.get("next_batch", 0.0) - training - p.get("optimiser", 0.0),
                # between steps: logging, validation and checkpoint checks, the progress bar
                "loop": interval - step}


def time_bare_loop(model, optimizer, images, labels, aux_weight: float, dtype, steps: int, warmup: int,
                   on_first_step=lambda seconds: None) -> dict:
    """zero_grad; autocast(forward, loss); backward; step — on tensors made beforehand."""
    import torch
    clock = StepClock()

    def step() -> None:
        with clock.phase("step", begins_step=True):
            optimizer.zero_grad(set_to_none=True)
            with clock.phase("training_step"):
                with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                    loss = bare_loss(model(images), labels, aux_weight)
                with clock.phase("backward"):
                    loss.backward()
            with clock.phase("optimiser"):
                optimizer.step()
    for i in range(warmup + steps):
        step()
        if i == 0:   # with torch.compile, the first step is the compilation
            on_first_step(clock.phases[0]["step"])
    clock.finish()
    return clock.summary(warmup)


@contextlib.contextmanager
def patched(obj, name: str, replacement):
    """`obj.name` replaced for the block, on the instance only."""
    had = name in vars(obj)
    original = vars(obj).get(name)
    setattr(obj, name, replacement)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, original)
        else:
            delattr(obj, name)


@contextlib.contextmanager
def instrumented(trainer, clock: StepClock):
    """The Trainer's phases timed by `clock` (see StepClock): no hook in the engine for this."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(patched(trainer, "_optimise_one_step",
                                    clock.timed("step", trainer._optimise_one_step, begins_step=True)))
        stack.enter_context(patched(trainer, "_next_batch", clock.timed("next_batch", trainer._next_batch)))
        stack.enter_context(patched(trainer, "_backward", clock.timed("backward", trainer._backward)))
        method = trainer.method
        stack.enter_context(patched(method, "training_step", clock.timed("training_step", method.training_step)))
        for spec in method.optimizers.values():
            stack.enter_context(patched(spec.optimizer, "step", clock.timed("optimiser", spec.optimizer.step)))
        yield


def time_engine(method, params, speed, batches, validate, steps: int, warmup: int) -> dict:
    """`Trainer.fit` for warmup + steps steps at the params' logging, validation and checkpoint
    intervals (checkpoints into a temporary directory; MLflow logging and the progress bar off)."""
    from segshift.components.engine.loop import Runtime, Trainer
    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix="segshift-bench-engine-") as tmp:
        # accumulation 1: one batch per optimiser step, as the bare loop
        trainer = Trainer(method, params.engine, warmup + steps, 1, checkpoint_path=Path(tmp) / "last.pt",
                          best_path=Path(tmp) / "best.pt", fingerprint="bench", runtime=Runtime(),
                          validate=validate, progress=False, speed=speed)
        with instrumented(trainer, clock):
            trainer.fit(batches)
            clock.finish()
    return clock.summary(warmup)


def in_memory_batches(batch: dict):
    """A batch source serving one pre-made batch forever: the engine's step without data loading."""
    import itertools
    return lambda role, start: itertools.repeat(batch[role])


def prepared_batches(params, data_dir: Path, iterations: int):
    """The `source` stage's own datasets (crop, flip, augmentation, cache as its settings say) and
    batch source, over the prepared domain in `data_dir`/source."""
    from segshift.components.engine.loop import Runtime
    from segshift.pipelines.runtime import StageJob, batch_source, stage_datasets
    raw = params.model_dump(mode="json")
    raw["prepare"]["out_dir"] = str(data_dir)
    job = StageJob(params=raw, stage="source", project_dir=str(data_dir), progress=False)
    datasets = stage_datasets(job, cache=params.engine.cache_images)
    return batch_source(datasets, params.source.batch_size, iterations, params.engine.seed, Runtime(),
                        params.engine.loader_workers)


def tiny_validation(params, data_dir: Path):
    """Validation as a stage runs it, on the 2-image val split of the bench's data."""
    import torch

    from segshift.components.data.dataset import PreparedSplit
    from segshift.components.evaluation import evaluate, validation_metrics
    val = PreparedSplit(data_dir / "source", "val", cache=params.engine.cache_images)
    return lambda model: validation_metrics(evaluate(model, val, params.engine.eval_batch_size, torch.device("cpu")))


def write_bench_domain(params, data_dir: Path) -> Path:
    """A prepared built-in source domain at the params' size: two batches of train images (so the
    sampler starts new epochs, as in a stage) and 2 val images."""
    from segshift.components.data.builtin import spec_from_config
    counts = {"source_train": 2 * getattr(params, _case_stage(ENGINE_CASE)).batch_size, "source_val": 2}
    write_builtin_domain(spec_from_config(params.prepare.builtin), counts, "source", data_dir / "source",
                         workers=1, progress=False)
    return data_dir


def variant_speed(variant: EngineVariant):
    import torch

    from segshift.components.engine.precision import Hardware, resolve_speed
    return resolve_speed(variant.amp, variant.channels_last, Hardware.detect(torch.device("cpu")))


def measure_variant(params, variant: EngineVariant, data_dir: Path, steps: int, warmup: int,
                    report=lambda kind, *payload: None) -> dict:
    """Bare loop, engine on an in-memory batch, engine on the prepared data: one model and optimiser
    (so a compiled model compiles once), in that order, each with its own warm-up steps."""
    import torch
    speed = variant_speed(variant)
    stage = getattr(params, _case_stage(ENGINE_CASE))
    size = (params.prepare.builtin.height, params.prepare.builtin.width)
    torch.manual_seed(0)
    method = _method_for(ENGINE_CASE, params)
    model = method.modules["model"].to(memory_format=speed.memory_format)
    if variant.compile:
        model = method.modules["model"] = torch.compile(model)
    batch = random_batch(method.roles, stage.batch_size, size, params.model.num_classes, torch.device("cpu"))
    images, labels = batch["labelled"]
    timings: dict[str, float | None] = {"compile_s": None}

    def first_step(seconds: float) -> None:
        if variant.compile:
            timings["compile_s"] = round(seconds, 1)
        report("warm", seconds)
    report("compiling")
    bare = time_bare_loop(model, method.optimizers["model"].optimizer,
                          images.contiguous(memory_format=speed.memory_format), labels, stage.aux_weight,
                          speed.autocast_dtype, steps, warmup, first_step)
    validate = tiny_validation(params, data_dir)
    engine = time_engine(method, params, speed, in_memory_batches(batch), validate, steps, warmup)
    engine_data = time_engine(method, params, speed, prepared_batches(params, data_dir, warmup + steps),
                              validate, steps, warmup)
    return {"benchmark": "engine_step", "variant": variant.name, "amp": variant.amp,
            "channels_last": variant.channels_last, "compile": variant.compile, "status": "ok",
            "batch": stage.batch_size, "size": [size[1], size[0]], "warmup": warmup,
            **timings, "bare": bare, "engine": engine, "engine_data": engine_data}


def with_rates(row: dict, flops: int, peak: PeakEstimate) -> dict:
    """Achieved GFLOP/s and share of the precision's peak for each timed path; engine/bare ratios."""
    row = {**row, "train_flops": flops}
    if row["status"] != "ok":
        return row
    peak_gflops = peak.for_amp(row["amp"])
    for path in ENGINE_PATHS:
        gflops = flops / (row[path]["ms_per_step"] / 1000) / 1e9
        row[path] = {**row[path], "gflops": round(gflops, 2),
                     "share_of_peak": round(gflops / peak_gflops, 4) if peak_gflops else None}
    bare_ms = row["bare"]["ms_per_step"]
    row["engine_over_bare"] = round(row["engine"]["ms_per_step"] / bare_ms, 3)
    row["engine_data_over_bare"] = round(row["engine_data"]["ms_per_step"] / bare_ms, 3)
    return row


def failed_variant(variant: EngineVariant, status: str) -> dict:
    return {"benchmark": "engine_step", "variant": variant.name, "amp": variant.amp,
            "channels_last": variant.channels_last, "compile": variant.compile, "status": status}


def _compiled_variant_worker(params_json: dict, name: str, data_dir: str, steps: int, warmup: int, queue) -> None:
    """Runs a torch.compile variant in a fresh process, telling the parent when its first step
    (the compilation) starts and ends; a failure is the variant's result."""
    # its own process group, so that a compile that overruns is stopped with inductor's workers
    os.setpgrp()
    from segshift.components.config import Params

    def report(kind: str, *payload) -> None:
        queue.put((kind, *payload))
    try:
        row = measure_variant(Params.model_validate(params_json), ENGINE_VARIANTS[name], Path(data_dir), steps,
                              warmup, report)
    except Exception as exc:
        message = (str(exc).strip().splitlines() or [""])[0][:300]
        report("failed", f"torch.compile failed: {type(exc).__name__}: {message}")
        return
    report("result", row)


def _stop(process) -> None:
    """The worker and what it started (inductor's compile workers), if still running."""
    import signal
    if process.is_alive():
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):   # not yet in its own group
            process.kill()
    process.join()


def run_variant(params, variant: EngineVariant, data_dir: Path, steps: int, warmup: int,
                compile_timeout: float) -> dict:
    """`measure_variant`: here for an eager variant; for a torch.compile one in a fresh process,
    where a compilation (the first step) that takes longer than `compile_timeout` seconds, or
    fails, is the variant's result, not an error. Later recompilations (validation's eval mode at
    the end of each engine run) are not bounded: they are much shorter than the first."""
    if not variant.compile:
        return measure_variant(params, variant, data_dir, steps, warmup)
    import multiprocessing
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_compiled_variant_worker,
                              args=(params.model_dump(mode="json"), variant.name, str(data_dir), steps, warmup, queue))
    process.start()
    deadline = None
    try:
        while True:
            wait = 5.0 if deadline is None else max(0.0, min(5.0, deadline - time.monotonic()))
            try:
                kind, *payload = queue.get(timeout=wait)
            except queue_module.Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    return failed_variant(variant, f"torch.compile did not finish within {compile_timeout:g} s")
                if not process.is_alive():
                    raise RuntimeError(f"engine benchmark '{variant.name}' died with exit code "
                                       f"{process.exitcode}; its error is printed above") from None
                continue
            if kind == "compiling":
                deadline = time.monotonic() + compile_timeout
            elif kind == "warm":
                deadline = None
            elif kind == "failed":
                return failed_variant(variant, payload[0])
            elif kind == "result":
                return payload[0]
    finally:
        _stop(process)


def count_train_flops(params) -> int:
    """FLOPs of one step of the bench's model and batch (the same for every variant)."""
    import torch
    stage = getattr(params, _case_stage(ENGINE_CASE))
    size = (params.prepare.builtin.height, params.prepare.builtin.width)
    torch.manual_seed(0)
    method = _method_for(ENGINE_CASE, params)
    images, labels = random_batch(method.roles, stage.batch_size, size, params.model.num_classes,
                                  torch.device("cpu"))["labelled"]
    return train_step_flops(method.modules["model"], images, labels, stage.aux_weight)


def auto_variant(params) -> str:
    """The variant a stage trains in on this CPU (engine.amp / channels_last as resolved; no compile)."""
    import torch

    from segshift.components.engine.loop import speed_settings
    speed = speed_settings(params.engine, torch.device("cpu"))
    return EngineVariant(speed.amp, speed.channels_last, False).name


def bench_engine(params, variants: list[str], steps: int, warmup: int, compile_timeout: float,
                 peak_gflops: float | None = None) -> dict:
    """Every variant's bare / engine / engine-with-data step, FLOP/s and share of the CPU's peak."""
    flops, peak, auto = count_train_flops(params), machine_peak(peak_gflops), auto_variant(params)
    rows = []
    with tempfile.TemporaryDirectory(prefix="segshift-bench-data-") as tmp:
        data_dir = write_bench_domain(params, Path(tmp))
        for name in variants:
            row = run_variant(params, ENGINE_VARIANTS[name], data_dir, steps, warmup, compile_timeout)
            rows.append({**with_rates(row, flops, peak), "auto": name == auto})
    return {"train_flops": flops, "peak": peak.record(), "rows": rows}


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f}%"


def format_engine_table(engine: dict) -> str:
    """Step times, ratios and FLOP/s per variant, then where each path's step time goes."""
    peak = engine["peak"]
    gflops = lambda value: "-" if value is None else f"{value:.1f}"
    lines = [f"one training step: {engine['train_flops'] / 1e9:.2f} GFLOP (forward + backward); CPU peak "
             f"fp32 {gflops(peak['fp32_gflops'])} / bf16 {gflops(peak['bf16_gflops'])} GFLOP/s "
             f"({peak['source']}: {peak['cores']} cores, {peak['mhz']} MHz, {peak['isa']})", ""]
    header = ("variant", "bare ms", "engine ms", "+data ms", "engine/bare", "+data/bare",
              "GFLOP/s bare", "GFLOP/s engine", "peak bare", "peak engine", "compile s")
    table = [header]
    for row in engine["rows"]:
        name = row["variant"] + (" *" if row.get("auto") else "")
        if row["status"] != "ok":
            table.append((name, row["status"]))
            continue
        bare, eng, data = row["bare"], row["engine"], row["engine_data"]
        table.append((name, f"{bare['ms_per_step']:.1f}", f"{eng['ms_per_step']:.1f}", f"{data['ms_per_step']:.1f}",
                      f"{row['engine_over_bare']:.3f}", f"{row['engine_data_over_bare']:.3f}",
                      f"{bare['gflops']:.1f}", f"{eng['gflops']:.1f}", _percent(bare["share_of_peak"]),
                      _percent(eng["share_of_peak"]), "-" if row["compile_s"] is None else f"{row['compile_s']:.1f}"))
    lines += _aligned(table) + ["* what engine.amp / engine.channels_last: auto pick here",
                                f"share of peak: of the row's precision's peak; {peak['assumptions']}", "",
                                "median ms per step by phase:"]
    phases = [("variant", "path", *ENGINE_PHASES)]
    for row in engine["rows"]:
        if row["status"] == "ok":
            phases += [(row["variant"], path, *(f"{row[path]['phases_ms'][p]:.2f}" for p in ENGINE_PHASES))
                       for path in ENGINE_PATHS]
    return "\n".join(lines + _aligned(phases))


def _aligned(rows: list[tuple[str, ...]]) -> list[str]:
    """Columns aligned on the full rows; a shorter row (a variant's failure) runs on unaligned."""
    full = [r for r in rows if len(r) == len(rows[0])]
    widths = [max(len(r[i]) for r in full) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(widths[i]) if i == 0 or len(r) < len(rows[0]) else cell.rjust(widths[i])
                      for i, cell in enumerate(r)) for r in rows]


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
    if args.what == "engine":
        from segshift.components.config import load_params
        variants = args.variants or default_engine_variants(machine["native_bf16"])
        engine = bench_engine(load_params(args.params), variants, args.engine_steps, args.engine_warmup,
                              args.compile_timeout, args.peak_gflops)
        results["results"] += engine.pop("rows")
        results["engine"] = engine
    text = json.dumps(results, indent=2)
    if args.json:
        from segshift.components.io import atomic_write_text
        atomic_write_text(Path(args.json), text + "\n")
    print(format_engine_table({**results["engine"], "rows": results["results"]}) if args.what == "engine" else text)
    return 0


def _positive(kind: type):
    """An argparse type: a finite number above 0, refused in one line otherwise."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__} above 0, got {text!r}") from None
        if not (0 < value < float("inf")):
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__} above 0, got {text!r}")
        return value
    return parse


def build_bench_parser(sub) -> None:
    parser = sub.add_parser("bench", help="measure throughput (see BENCHMARKS.md)")
    parser.add_argument("what", choices=["generate", "ingest", "train", "methods", "engine", "rank", "stages",
                                         "sweep", "all"],
                        nargs="?", default="all", help="all = generate, ingest, train; methods: a training step of "
                        "every method on the project's model; engine: the engine's training step against a bare "
                        "torch loop, with data loading, FLOP/s and share of the CPU's peak, per precision, "
                        "layout and torch.compile (a table; --json for the figures); rank, stages and sweep use "
                        "the project's pipeline outputs (run `dvc repro` first)")
    parser.add_argument("--count", type=int, default=400, help="generated images per run")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--ingest-count", type=int, default=48, help="GTA5 frames per run")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--train-steps", type=int, default=5, help="timed training steps per case")
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2], help="rank: actor pool sizes")
    parser.add_argument("--params", default="params.yaml",
                        help="methods, engine, rank, stages, sweep: the project's params")
    parser.add_argument("--variants", nargs="+", choices=list(ENGINE_VARIANTS), metavar="VARIANT",
                        help=f"engine: which of {', '.join(ENGINE_VARIANTS)} (default: all; fp32 only where bf16 "
                        "is emulated)")
    parser.add_argument("--engine-steps", type=_positive(int), default=20,
                        help="engine: timed steps per path (the median is reported)")
    parser.add_argument("--engine-warmup", type=_positive(int), default=3,
                        help="engine: untimed steps first (allocator, kernels; the compilation)")
    parser.add_argument("--compile-timeout", type=_positive(float), default=300.0,
                        help="engine: seconds torch.compile's first step may take before the variant is "
                        "reported as not compiling")
    parser.add_argument("--peak-gflops", type=_positive(float), default=None,
                        help="engine: the CPU's fp32 peak in GFLOP/s, instead of cores x clock x FMA pipes x "
                        "lanes x 2 (bf16: twice it where native)")
    parser.add_argument("--json", metavar="PATH", help="also write the report's JSON to PATH")
    parser.add_argument("--cpu-isa", choices=["native", *CPU_ISA_ENV], default="native",
                        help="avx2: measure as an AVX2-only CPU would run (ATen and oneDNN capped at "
                        "AVX2: no AVX-512, no native bf16) on a machine that has more")
    parser.add_argument("--schedulers", nargs="+", default=["asha", "fifo"], choices=["asha", "fifo"],
                        help="sweep: run the project's sweep once with each (as sweeps/bench-<name>)")
    parser.set_defaults(func=_cmd_bench)
