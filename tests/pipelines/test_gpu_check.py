"""`segshift gpu-check` on a machine without a GPU: the CUDA parts skip with the reason, the
cuda-marked tests run (and skip), and the summary is written."""
import json

import pytest
import torch

from segshift.pipelines.cli import main
from segshift.pipelines.gpu_check import NO_GPU, gpu_check_markdown, gpu_peak_tflops, main_job_params
from segshift.components.config import load_params
from tests.conftest import write_params


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU side; on a GPU run make gpu-check")
@pytest.mark.integration
def test_without_a_gpu_every_cuda_part_skips_with_its_reason(tmp_path, monkeypatch, capsys):
    from tests.conftest import REPO
    monkeypatch.chdir(REPO)     # the cuda tests run from the project root
    out = tmp_path / "gpu-check"
    assert main(["gpu-check", "--params", str(write_params(tmp_path)), "--out", str(out)]) == 0
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["cuda"] is False and report["ok"] is True
    parts = report["parts"]
    for name in ("method_steps", "main_job", "r101_steps", "profile"):
        assert parts[name] == {"status": "skipped", "reason": NO_GPU}
    tests = parts["cuda_tests"]["result"]
    assert parts["cuda_tests"]["status"] == "ok" and tests["counts"]["passed"] == 0
    assert tests["counts"]["skipped"] >= 5 and all(t["outcome"] == "skipped" for t in tests["tests"])
    assert any("no CUDA device" in t["reason"] for t in tests["tests"])
    md = (out / "gpu_check.md").read_text()
    assert "| main_job | skipped |" in md and report["machine"]["cpu_capability"] in md


def test_peak_table_and_markdown_of_a_gpu_report():
    assert gpu_peak_tflops("NVIDIA H200", "bf16") == pytest.approx(989.4)
    assert gpu_peak_tflops("Tesla V100-SXM2-16GB", "none") == pytest.approx(15.7)
    assert gpu_peak_tflops("Some Future GPU", "fp16") is None
    report = {"machine": {"cuda": "NVIDIA H200", "cpu_model": "x", "cpu_count": 16, "cpu_capability": "AVX512",
                          "torch": "2.13.0"},
              "parts": {"cuda_tests": {"status": "ok", "seconds": 9, "result": {"counts": {"passed": 5}}},
                        "method_steps": {"status": "failed", "seconds": 1, "error": "RuntimeError: boom"},
                        "main_job": {"status": "ok", "seconds": 70, "result": {
                            "stage_seconds": {"prepare": 10.0, "source": 20.0}, "total_seconds": 30.0,
                            "test_miou": {"source": 22.1}}},
                        "r101_steps": {"status": "ok", "seconds": 60, "result": {"gpu": "NVIDIA H200", "rows": [
                            {"size": [1280, 720], "amp": "bf16", "channels_last": True, "images_per_s": 20.0,
                             "achieved_tflops": 300.0, "share_of_peak": 0.303, "peak_memory_mib": 9000}]}},
                        "profile": {"status": "skipped", "reason": "x"}}}
    md = gpu_check_markdown(report)
    assert "| method_steps | failed | 1 | RuntimeError: boom |" in md
    assert "| source | 20.0 | 22.1 |" in md and "| 1280x720 | bf16 | True | 20.0 | 300.0 | 30 % | 9000 |" in md


def test_the_main_job_runs_in_a_scratch_directory_on_the_gpu(tmp_path):
    params = main_job_params(load_params(write_params(tmp_path)), tmp_path / "job")
    assert params.engine.device == "cuda" and params.rank.gpus_per_actor == 1
    assert params.prepare.out_dir.startswith(str(tmp_path / "job"))
    assert all(str(tmp_path / "job") in v for v in params.paths.model_dump().values())
    assert params.tracking.uri == f"sqlite:///{tmp_path / 'job' / 'mlflow.db'}"


@pytest.mark.integration
def test_the_main_job_part_times_every_stage_and_reads_the_test_miou(tmp_path):
    """The orchestration of the GPU main job, run here on the CPU on tiny data."""
    from segshift.pipelines.gpu_check import main_job
    params = load_params(write_params(tmp_path, {
        "source.iterations": 2, "oracle.iterations": 2, "inter.iterations": 2, "intra.iterations": 2,
        "engine.val_every": 2, "engine.checkpoint_every": 2, "model.width": 0.125,
        "source.batch_size": 2, "oracle.batch_size": 2, "inter.batch_size": 2, "intra.batch_size": 2}))
    result = main_job(params, tmp_path / "work", device="cpu")
    assert list(result["stage_seconds"]) == ["prepare", "source", "oracle", "inter", "rank", "intra", "evaluate"]
    assert all(s > 0 for s in result["stage_seconds"].values())
    assert set(result["test_miou"]) == {"source", "inter", "intra", "oracle"}
    summary = json.loads((tmp_path / "work" / "main-job" / "metrics" / "summary.json").read_text())
    assert result["test_miou"] == {stage: round(100 * entry["miou"], 1) for stage, entry in summary.items()}
    # 2 supervised steps on the tiny data: measured 5.3 % (source) and 5.4 % (oracle) on target test;
    # the best constant prediction (road everywhere) scores 1.36 %
    assert result["test_miou"]["source"] > 3.4 and result["test_miou"]["oracle"] > 3.4
