import json
from pathlib import Path

import pytest
import torch
from torch import nn

from segshift.components.config import ModelConfig, ProfileConfig, load_params
from segshift.components.models.factory import build_model, count_parameters
from segshift.pipelines.cli import main
from segshift.pipelines.profile import count_flops, profile_models
from tests.conftest import write_params

TINY_MODELS = {
    "deeplab_tiny": {"name": "deeplabv2", "backbone": "resnet18", "width": 0.25, "rates": [1, 2],
                     "aux_head": False, "frozen_bn": False, "pretrained": None},
    "bisenet_tiny": {"name": "bisenet", "backbone": "resnet18", "width": 0.25, "rates": [1],
                     "aux_head": True, "frozen_bn": False, "pretrained": None},
}


def tiny_profile(height: int = 64, width: int = 128, models: dict = TINY_MODELS) -> ProfileConfig:
    return ProfileConfig(height=height, width=width, batch_size=1, warmup=0, repeats=2,
                         models={name: ModelConfig(**m) for name, m in models.items()})


def test_every_model_gets_positive_size_flops_and_speed():
    report = profile_models(tiny_profile())
    assert (report["height"], report["width"]) == (64, 128) and report["device"].startswith(("cpu", "cuda"))
    assert set(report["models"]) == set(TINY_MODELS)
    for name, row in report["models"].items():
        assert row["params"] == count_parameters(build_model(ModelConfig(**TINY_MODELS[name])))
        assert row["params_m"] > 0 and row["gflops"] > 0 and row["latency_ms_mean"] > 0
        assert row["latency_ms_std"] >= 0
        assert row["fps"] == pytest.approx(1000.0 / row["latency_ms_mean"], rel=1e-3)


def test_flops_of_one_convolution_are_two_per_multiply_add():
    conv = nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1)
    # 8 outputs x 3 inputs x 3x3 taps at each of 16x32 output positions, 2 FLOPs per MAC.
    assert count_flops(conv, torch.randn(1, 3, 32, 64)) == 2 * 8 * 3 * 3 * 3 * 16 * 32


def test_flops_scale_with_input_area():
    deeplab = {"deeplab_tiny": TINY_MODELS["deeplab_tiny"]}
    small = profile_models(tiny_profile(64, 64, deeplab))["models"]["deeplab_tiny"]["gflops"]
    large = profile_models(tiny_profile(128, 128, deeplab))["models"]["deeplab_tiny"]["gflops"]
    assert large / small == pytest.approx(4.0, rel=0.01)


def _tiny_params_file(tmp_path: Path) -> Path:
    return write_params(tmp_path, {"profile.height": 64, "profile.width": 64, "profile.warmup": 0,
                                   "profile.repeats": 1, "profile.models": TINY_MODELS})


def test_cli_json_output_parses_and_is_recorded(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    params = _tiny_params_file(tmp_path)
    assert load_params(params).profile.height == 64
    assert main(["profile", "--params", str(params), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["models"]) == set(TINY_MODELS) and report["width"] == 64
    table = (tmp_path / "reports" / "profile.md").read_text()
    assert all(name in table for name in TINY_MODELS)
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("segshift").experiment_id],
                              "tags.`segshift.stage` = 'profile'")
    name = next(iter(TINY_MODELS))
    assert runs[0].data.metrics[f"{name}.params"] == report["models"][name]["params"]


def test_cli_table_lists_every_model(tmp_path: Path, capsys: pytest.CaptureFixture,
                                    monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    assert main(["profile", "--params", str(_tiny_params_file(tmp_path))]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "GFLOPs" in lines[1] and "FPS" in lines[1]
    assert {line.split()[0] for line in lines[2:]} == set(TINY_MODELS)
