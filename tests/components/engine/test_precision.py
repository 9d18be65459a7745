"""Precision and memory format chosen by what the hardware does well, tested by its inputs."""
import pytest
import torch

from segshift.components.engine.precision import Hardware, PrecisionError, resolve_speed

AVX2_CPU = Hardware(device_type="cpu", arch="x86_64", cpu_capability="AVX2", cpu_bf16=False,
                    onednn_bf16=False, name="AMD EPYC 7B12")
AVX512_CPU_NO_BF16 = Hardware(device_type="cpu", arch="x86_64", cpu_capability="AVX512", cpu_bf16=False,
                              onednn_bf16=True, name="Intel Xeon (Skylake)")
AVX512_BF16_CPU = Hardware(device_type="cpu", arch="x86_64", cpu_capability="AVX512", cpu_bf16=True,
                           onednn_bf16=True, name="AMD EPYC 9B14")
# bf16 in the hardware, but oneDNN capped below it (ONEDNN_MAX_CPU_ISA=AVX2) and ATen at AVX2
CAPPED_BF16_CPU = Hardware(device_type="cpu", arch="x86_64", cpu_capability="AVX2", cpu_bf16=True,
                           onednn_bf16=False, name="AMD EPYC 9B14")
ARM_BF16_CPU = Hardware(device_type="cpu", arch="aarch64", cpu_capability="SVE256", cpu_bf16=True,
                        onednn_bf16=True, name="Neoverse-V1")
A100 = Hardware(device_type="cuda", arch="x86_64", cpu_capability="AVX512", cpu_bf16=False, onednn_bf16=True,
                cuda_bf16=True, cuda_capability=(8, 0), name="NVIDIA A100")
V100 = Hardware(device_type="cuda", arch="x86_64", cpu_capability="AVX2", cpu_bf16=False, onednn_bf16=False,
                cuda_bf16=False, cuda_capability=(7, 0), name="Tesla V100")
P100 = Hardware(device_type="cuda", arch="x86_64", cpu_capability="AVX2", cpu_bf16=False, onednn_bf16=False,
                cuda_bf16=False, cuda_capability=(6, 0), name="Tesla P100")


@pytest.mark.parametrize("hardware, amp, channels_last", [
    (AVX2_CPU, "none", False),
    (AVX512_CPU_NO_BF16, "none", False),
    (CAPPED_BF16_CPU, "none", False),
    (AVX512_BF16_CPU, "bf16", False),
    (ARM_BF16_CPU, "bf16", False),
    (A100, "bf16", True),
    (V100, "fp16", True),
    (P100, "none", False),
])
def test_auto_picks_what_the_hardware_runs_natively(hardware, amp, channels_last):
    speed = resolve_speed("auto", "auto", hardware)
    assert (speed.amp, speed.channels_last, speed.warning) == (amp, channels_last, None)
    assert speed.reason.startswith("auto -> ") and hardware.name in speed.reason


def test_explicit_bf16_on_a_cpu_without_it_runs_with_a_warning_saying_the_cost_and_the_fix():
    speed = resolve_speed("bf16", False, AVX2_CPU)
    assert (speed.amp, speed.channels_last) == ("bf16", False)
    assert "AVX2" in speed.warning and "14-25x slower" in speed.warning
    assert "engine.amp: auto" in speed.warning and "\n" not in speed.warning


@pytest.mark.parametrize("hardware", [AVX512_BF16_CPU, A100])
def test_explicit_bf16_where_native_has_no_warning(hardware):
    assert resolve_speed("bf16", "auto", hardware).warning is None


def test_explicit_choices_override_auto():
    assert resolve_speed("none", False, AVX512_BF16_CPU).amp == "none"
    assert resolve_speed("fp16", "auto", A100).amp == "fp16"
    assert resolve_speed("none", True, P100).channels_last is True
    assert resolve_speed("auto", False, A100).channels_last is False
    assert resolve_speed("auto", True, AVX2_CPU).channels_last is True


def test_fp16_on_a_cpu_is_refused_naming_the_setting():
    with pytest.raises(PrecisionError, match="engine.amp 'fp16' needs a CUDA device"):
        resolve_speed("fp16", "auto", AVX512_BF16_CPU)


def test_record_names_the_cpu_capability_for_mlflow():
    record = resolve_speed("auto", "auto", AVX2_CPU).record()
    assert record == {"amp": "none", "channels_last": False, "cpu_capability": "AVX2", "native_bf16": False,
                      "device": "CPU AMD EPYC 7B12 (torch capability AVX2, no native bf16)"}


def test_detect_reads_this_machine_consistently():
    hardware = Hardware.detect(torch.device("cpu"))
    assert hardware.cpu_capability == torch.backends.cpu.get_cpu_capability()
    expected = "bf16" if hardware.native_bf16 else "none"
    assert resolve_speed("auto", "auto", hardware).amp == expected
