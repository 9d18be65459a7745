"""Speed settings chosen by what the hardware does well: precision (AMP) and memory format.

bf16 autocast is a gain only where the device computes in bf16 natively. On a CPU without
AVX-512 BF16 or AMX (most laptops and many cloud CPUs: AVX2 only) every bf16 operation is
emulated, and a training step of the default model took 14x (here, ISA capped at AVX2) to 25x
(a real AVX2 CPU) longer than in fp32 (BENCHMARKS.md). `engine.amp: auto` therefore uses bf16 only where it is native and fp32
elsewhere; an explicit `bf16` still runs, with a warning saying what it costs.

`resolve_speed` is a pure function of the requested settings and a `Hardware` description, so
every case is testable on any machine; `Hardware.detect` reads the real machine.
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from typing import Literal

import torch

Amp = Literal["none", "bf16", "fp16"]
AUTO = "auto"
# oneDNN's ISA cap: with it set below AVX-512 (e.g. ONEDNN_MAX_CPU_ISA=AVX2) bf16 is emulated
ONEDNN_ISA_VARIABLE = "ONEDNN_MAX_CPU_ISA"
# what emulated bf16 cost on an AVX2 CPU against fp32 (BENCHMARKS.md, "Precision by machine")
EMULATED_BF16_SLOWDOWN = "14-25x"
ARM = ("aarch64", "arm64")


@dataclass(frozen=True)
class Hardware:
    """What decides the speed settings: the device and what it computes natively."""

    device_type: str                 # "cpu" | "cuda"
    arch: str                        # platform.machine(): x86_64, aarch64, ...
    cpu_capability: str              # torch.backends.cpu.get_cpu_capability(): AVX2, AVX512, ...
    cpu_bf16: bool                   # the CPU has AVX-512 BF16 or AMX (x86) / BF16 (Arm)
    onednn_bf16: bool                # oneDNN may use bf16 kernels (not capped below them)
    cuda_bf16: bool = False          # the GPU computes bf16 natively (compute capability >= 8.0)
    cuda_capability: tuple[int, int] | None = None
    name: str = ""                   # CPU model or GPU name, for the record

    @classmethod
    def detect(cls, device: torch.device) -> Hardware:
        cpu_bf16 = _cpu_has_native_bf16()
        common = {"arch": platform.machine().lower(), "cpu_bf16": cpu_bf16, "onednn_bf16": _onednn_bf16(),
                  "cpu_capability": torch.backends.cpu.get_cpu_capability()}
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            return cls(device_type="cuda", cuda_bf16=torch.cuda.is_bf16_supported(including_emulation=False),
                       cuda_capability=tuple(torch.cuda.get_device_capability(index)),
                       name=torch.cuda.get_device_name(index), **common)
        return cls(device_type=device.type, name=cpu_model_name(), **common)

    @property
    def native_bf16(self) -> bool:
        if self.device_type == "cuda":
            return self.cuda_bf16
        if self.arch in ARM:
            return self.cpu_bf16 and self.onednn_bf16
        # ATen's own bf16 kernels (softmax, losses, element-wise) need its AVX-512 dispatch too
        return self.cpu_bf16 and self.onednn_bf16 and self.cpu_capability.upper().startswith("AVX512")

    @property
    def tensor_cores(self) -> bool:
        """fp16 matrix units (Volta, compute capability 7.0, and newer)."""
        return self.device_type == "cuda" and (self.cuda_capability or (0, 0)) >= (7, 0)

    def describe(self) -> str:
        if self.device_type == "cuda":
            major, minor = self.cuda_capability or (0, 0)
            return f"CUDA {self.name} (compute {major}.{minor}, bf16 {'native' if self.cuda_bf16 else 'no'})"
        bf16 = "native bf16" if self.native_bf16 else "no native bf16"
        return f"CPU {self.name or 'unknown'} (torch capability {self.cpu_capability}, {bf16})"


@dataclass(frozen=True)
class SpeedSettings:
    """The resolved settings a training run uses, and why."""

    amp: Amp
    channels_last: bool
    reason: str                     # one line: what was chosen on which hardware
    warning: str | None = None      # an explicit choice that will run slowly here
    hardware: Hardware | None = None

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.amp)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def record(self) -> dict[str, str | bool]:
        """Flat, for MLflow params and the stage's metrics file."""
        hw = self.hardware
        return {"amp": self.amp, "channels_last": self.channels_last,
                "device": hw.describe() if hw else "unknown",
                "cpu_capability": hw.cpu_capability if hw else "unknown",
                "native_bf16": hw.native_bf16 if hw else False}


class PrecisionError(ValueError):
    """A precision the device cannot run at all."""


def resolve_amp(requested: str, hardware: Hardware) -> tuple[Amp, str, str | None]:
    """(amp, why, warning) for `engine.amp` = auto | none | bf16 | fp16 on `hardware`."""
    where = hardware.describe()
    if requested == AUTO:
        if hardware.native_bf16:
            return "bf16", f"auto -> bf16: {where}", None
        if hardware.tensor_cores:
            return "fp16", f"auto -> fp16 with a grad scaler: {where}", None
        return "none", f"auto -> fp32: {where}", None
    if requested == "fp16" and hardware.device_type != "cuda":
        raise PrecisionError("engine.amp 'fp16' needs a CUDA device; on CPU use 'auto', 'bf16' or 'none'")
    warning = None
    if requested == "bf16" and not hardware.native_bf16:
        slowdown = EMULATED_BF16_SLOWDOWN if hardware.device_type == "cpu" else "several times"
        warning = (f"engine.amp is 'bf16' but this {where} emulates bf16: training runs about {slowdown} "
                   f"slower than in fp32; set engine.amp: auto (or none) to train in fp32 here")
    return requested, f"{requested} (set in engine.amp): {where}", warning  # type: ignore[return-value]


def resolve_channels_last(requested: bool | str, hardware: Hardware, amp: Amp) -> bool:
    """`auto`: channels-last on CUDA under AMP, where tensor-core convolutions are NHWC kernels;
    NCHW on CPUs, where it was no faster in the stages of the main job (bf16 on AVX-512 BF16:
    the 600-step `source` stage took as long either way; fp32 on AVX2: ADVENT's step 5 % slower;
    BENCHMARKS.md, "Precision by machine")."""
    if requested != AUTO:
        return bool(requested)
    return hardware.device_type == "cuda" and amp != "none"


def resolve_speed(amp: str, channels_last: bool | str, hardware: Hardware) -> SpeedSettings:
    chosen, reason, warning = resolve_amp(amp, hardware)
    layout = resolve_channels_last(channels_last, hardware, chosen)
    reason += f"; {'channels-last' if layout else 'NCHW'}"
    return SpeedSettings(amp=chosen, channels_last=layout, reason=reason, warning=warning, hardware=hardware)


def _cpu_has_native_bf16() -> bool:
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    if any(getattr(cpu, name, lambda: False)() for name in checks):
        return True
    return platform.machine().lower() in ARM and _onednn_bf16()


def _onednn_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_model_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform reports."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_record() -> dict[str, str | bool | int | None]:
    """The machine facts a benchmark figure needs beside it."""
    hw = Hardware.detect(torch.device("cpu"))
    return {"cpu_model": hw.name, "cpu_capability": hw.cpu_capability, "cpu_bf16_hardware": hw.cpu_bf16,
            "native_bf16": hw.native_bf16, "onednn_isa_cap": os.environ.get(ONEDNN_ISA_VARIABLE),
            "torch_threads": torch.get_num_threads()}
