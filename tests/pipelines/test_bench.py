import json

import pytest

from segshift.pipelines.bench import bench_ingest, bench_train, train_cases
from segshift.pipelines.cli import main
from tests.conftest import write_params


def test_generate_benchmark_prints_machine_and_throughput(capsys):
    assert main(["bench", "generate", "--count", "4", "--height", "32", "--width", "64",
                 "--workers", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["machine"]["cpu_count"] >= 1
    (result,) = report["results"]
    assert result["benchmark"] == "generate" and result["images"] == 4 and result["images_per_s"] > 0


def test_ingest_benchmark_converts_native_size_gta5_frames():
    result = bench_ingest(count=2, workers=1)
    assert result["native_size"] == [1914, 1052] and result["images_per_s"] > 0


@pytest.mark.integration
def test_train_step_benchmark_reports_speed_and_peak_memory():
    case = {"backbone": "resnet18", "width": 0.125, "rates": [1], "size": (32, 64), "batch": 2}
    result = bench_train("tiny", case, "none", False, steps=1)
    assert result["images_per_s"] > 0 and result["peak_memory_mib"] > 50
    assert result["size"] == [64, 32] and result["device"] == "cpu"


def test_cpu_cases_cover_fp32_and_bf16_in_both_layouts_and_r101_in_bf16_only_where_native():
    small = "small_deeplabv2_r18_w0.25"
    cases = {(name, amp, cl) for name, _, amp, cl in train_cases(on_gpu=False, native_bf16=True)}
    assert cases == {(small, "none", False), (small, "none", True), (small, "bf16", False), (small, "bf16", True),
                     ("deeplabv2_r101", "none", True), ("deeplabv2_r101", "bf16", True)}
    emulated = {(name, amp) for name, _, amp, _ in train_cases(on_gpu=False, native_bf16=False)}
    assert ("deeplabv2_r101", "bf16") not in emulated and (small, "bf16") in emulated


def test_bench_names_the_cpu_capability_and_what_auto_picks(capsys):
    assert main(["bench", "generate", "--count", "2", "--height", "32", "--width", "64", "--workers", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    import torch
    assert report["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert report["auto"]["amp"] == ("bf16" if report["machine"]["native_bf16"] else "none")


@pytest.mark.integration
def test_bench_as_an_avx2_cpu_reruns_itself_with_the_isa_capped(capsys):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "segshift.pipelines.cli", "bench", "generate", "--count", "2",
                           "--height", "32", "--width", "64", "--workers", "1", "--cpu-isa", "avx2"],
                          capture_output=True, text=True, check=True)
    report = json.loads(proc.stdout)
    assert report["machine"]["cpu_capability"] == "AVX2"
    assert report["machine"]["native_bf16"] is False and report["auto"] == {"amp": "none", "channels_last": False}


@pytest.mark.integration
def test_methods_benchmark_times_a_step_of_every_method(tmp_path):
    from segshift.pipelines.bench import METHOD_CASES, bench_methods
    params = write_params(tmp_path, {"model.width": 0.125, "prepare.builtin.height": 32,
                                     "prepare.builtin.width": 64, "source.batch_size": 2, "inter.batch_size": 2})
    rows = bench_methods(str(params), steps=1)
    assert [r["method"] for r in rows] == list(METHOD_CASES)
    by_method = {r["method"]: r for r in rows}
    assert by_method["supervised"]["batch"] == {"labelled": 2}
    assert by_method["dacs"]["batch"] == {"labelled": 2, "unlabelled": 2}
    assert by_method["lse"]["batch"] == {"labelled": 2, "pseudo": 2}
    assert all(r["images_per_s"] > 0 and r["size"] == [64, 32] for r in rows)
