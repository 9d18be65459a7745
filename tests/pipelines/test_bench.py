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


# -- `segshift bench engine`: the engine's step against a bare torch loop ----------------------------

TINY_ENGINE = {"model.width": 0.125, "prepare.builtin.height": 32, "prepare.builtin.width": 64,
               "source.batch_size": 2}


@pytest.fixture(scope="module")
def tiny_engine_params(tmp_path_factory):
    from segshift.components.config import load_params
    return load_params(write_params(tmp_path_factory.mktemp("engine"), TINY_ENGINE))


def test_engine_bench_times_the_bare_loop_the_engine_and_the_engine_with_data(tiny_engine_params, tmp_path):
    import math

    from segshift.pipelines.bench import (ENGINE_PATHS, ENGINE_PHASES, ENGINE_VARIANTS, PeakEstimate,
                                          measure_variant, with_rates, write_bench_domain)
    data_dir = write_bench_domain(tiny_engine_params, tmp_path)
    row = measure_variant(tiny_engine_params, ENGINE_VARIANTS["fp32"], data_dir, steps=2, warmup=1)
    assert row["status"] == "ok" and row["size"] == [64, 32] and row["batch"] == 2
    for path in ENGINE_PATHS:
        timing = row[path]
        assert timing["steps"] == 2 and math.isfinite(timing["ms_per_step"]) and timing["ms_per_step"] > 0
        assert set(timing["phases_ms"]) == set(ENGINE_PHASES)
        assert timing["phases_ms"]["forward_loss"] > 0 and timing["phases_ms"]["backward"] > 0
    assert row["bare"]["phases_ms"]["next_batch"] == 0 < row["engine_data"]["phases_ms"]["next_batch"]

    peak = PeakEstimate(fp32_gflops=40.0, bf16_gflops=80.0, source="--peak-gflops", cores=2, mhz=None, isa="AVX2")
    rated = with_rates(row, flops=3 * 10**9, peak=peak)
    for path in ENGINE_PATHS:
        achieved = 3.0 / (rated[path]["ms_per_step"] / 1000)       # GFLOP per step / seconds per step
        assert rated[path]["gflops"] == pytest.approx(achieved, abs=0.01)
        # from the unrounded rate: gflops is rounded to 0.01, which /40 can move by more than 1e-4
        assert rated[path]["share_of_peak"] == pytest.approx(achieved / 40.0, abs=1e-4)
    assert rated["engine_over_bare"] == pytest.approx(row["engine"]["ms_per_step"] / row["bare"]["ms_per_step"],
                                                      abs=1e-3)


def test_train_flops_are_flop_counter_mode_s_count_of_forward_and_backward(tiny_engine_params):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from segshift.components.losses import segmentation_loss
    from segshift.components.models.factory import build_model
    from segshift.pipelines.bench import count_train_flops
    model = build_model(tiny_engine_params.model.model_copy(update={"pretrained": None}))
    images, labels = torch.randn(2, 3, 32, 64), torch.randint(0, 19, (2, 32, 64))
    with FlopCounterMode(display=False) as counter:
        segmentation_loss(model(images), labels, aux_weight=0.1)["loss"].backward()
    assert count_train_flops(tiny_engine_params) == counter.get_total_flops() > 0


def test_cpu_peak_is_cores_times_clock_times_fma_pipes_times_lanes_times_two():
    from segshift.pipelines.bench import cpu_peak, default_engine_variants
    avx512 = cpu_peak(cores=2, mhz=2600, isa="AVX512", native_bf16=True)
    assert (avx512.fp32_gflops, avx512.bf16_gflops) == pytest.approx((332.8, 665.6))   # 2 x 2.6 x 2 x 16 x 2
    avx2 = cpu_peak(cores=4, mhz=3000, isa="AVX2", native_bf16=False)
    assert (avx2.fp32_gflops, avx2.bf16_gflops) == pytest.approx((384.0, 384.0))       # 4 x 3.0 x 2 x 8 x 2
    given = cpu_peak(cores=2, mhz=2600, isa="AVX512", native_bf16=True, override_gflops=100.0)
    assert (given.fp32_gflops, given.bf16_gflops, given.source) == (100.0, 200.0, "--peak-gflops")
    zen4 = cpu_peak(cores=2, mhz=2600, isa="AVX512", native_bf16=True, split_512=True)
    assert (zen4.fp32_gflops, zen4.bf16_gflops) == pytest.approx((166.4, 332.8))       # 2 x 2.6 x 2 x 8 x 2
    assert cpu_peak(cores=4, mhz=3000, isa="AVX2", native_bf16=False, split_512=True).fp32_gflops == 384.0
    unknown = cpu_peak(cores=2, mhz=2600, isa="DEFAULT", native_bf16=False)
    assert unknown.fp32_gflops is None and "--peak-gflops" in unknown.source
    assert default_engine_variants(native_bf16=False) == ["fp32", "fp32-cl", "fp32-compile", "fp32-cl-compile"]


def test_zen_3_and_4_split_512_bit_fmas_other_cpus_do_not():
    from segshift.pipelines.bench import splits_512_bit_fma
    assert splits_512_bit_fma("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t: 17\n")
    assert not splits_512_bit_fma("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\n")
    assert not splits_512_bit_fma("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n")
    assert not splits_512_bit_fma("")


def test_engine_bench_prints_a_table_writes_json_and_reports_a_compile_over_time(tmp_path, capsys):
    params = write_params(tmp_path, TINY_ENGINE)
    out = tmp_path / "engine.json"
    assert main(["bench", "engine", "--params", str(params), "--variants", "fp32", "fp32-compile",
                 "--engine-steps", "2", "--engine-warmup", "1", "--compile-timeout", "0.01",
                 "--peak-gflops", "50", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "engine/bare" in table and "fp32-compile  torch.compile did not finish within 0.01 s" in table
    report = json.loads(out.read_text())
    assert report["engine"]["peak"]["fp32_gflops"] == 50.0 and report["engine"]["train_flops"] > 0
    fp32, compiled = report["results"]
    assert fp32["status"] == "ok" and fp32["auto"] == (not report["machine"]["native_bf16"])  # CPU auto: fp32, NCHW
    # gflops is rounded to 0.01 and the share to 1e-4: they agree within those roundings
    assert fp32["engine"]["share_of_peak"] == pytest.approx(fp32["engine"]["gflops"] / 50.0, abs=0.005 / 50 + 5e-5)
    assert compiled["status"].startswith("torch.compile did not finish") and "bare" not in compiled


@pytest.mark.parametrize("value", ["0", "-3", "nan", "many"])
def test_a_peak_that_is_not_a_number_above_zero_is_refused_in_one_line(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "engine", f"--peak-gflops={value}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "--peak-gflops" in err and "above 0" in err
