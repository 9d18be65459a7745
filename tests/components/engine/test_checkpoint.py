"""Checkpoints from others run no code: crafted pickles are refused, our own payloads round-trip.

Written from the attacker's side: a `model.pt` / `last.pt` whose unpickling would create a marker
file must be refused with one line naming the file, and the marker must never appear.
"""
import pickle
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from segshift.components.config import load_params
from segshift.components.engine.checkpoint import (CheckpointError, OutdatedCheckpointError,
                                                   capture_rng_state, load_checkpoint,
                                                   restore_rng_state, save_checkpoint)
from segshift.components.models.factory import ModelError, load_pretrained_backbone
from segshift.components.models.deeplab import DeepLabV2
from segshift.pipelines.cli import main
from segshift.pipelines.stage_model import load_stage_model
from tests.conftest import write_params

UNSAFE = "contains objects other than tensors and plain data"


class MarkerOnLoad:
    """Unpickling it creates `path`: the stand-in for any code a hostile file would run."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def write_with_torch(path: Path, payload) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


def write_with_pickle(path: Path, payload) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(payload, protocol=4))
    return path


WRITERS = [write_with_torch, write_with_pickle]


def crafted(path: Path, marker: Path, writer=write_with_torch) -> Path:
    """A checkpoint-shaped file whose loading would create `marker`."""
    return writer(path, {"model": {"weight": torch.zeros(2)}, "step": 1, "extra": MarkerOnLoad(marker)})


def assert_refused_without_running(error_text: str, path: Path, marker: Path) -> None:
    assert "\n" not in error_text.strip()
    assert str(path) in error_text and UNSAFE in error_text
    assert not marker.exists(), "loading ran code from the file"


# -- the loader ----------------------------------------------------------------------------------

@pytest.mark.parametrize("writer", WRITERS, ids=["torch.save", "pickle.dump"])
@pytest.mark.parametrize("name", ["model.pt", "last.pt"])
def test_crafted_checkpoint_is_refused_without_running_it(tmp_path: Path, writer, name: str):
    marker = tmp_path / "marker"
    path = crafted(tmp_path / name, marker, writer)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    assert_refused_without_running(str(caught.value), path, marker)
    assert "io.open" in str(caught.value)   # names what it refused (open pickles as io.open)


def test_crafted_pretrained_weights_are_refused_without_running_them(tmp_path: Path):
    marker = tmp_path / "marker"
    path = crafted(tmp_path / "resnet18.pth", marker)
    with pytest.raises(ModelError) as caught:
        load_pretrained_backbone(DeepLabV2(19, "resnet18", 0.25), str(path))
    assert_refused_without_running(str(caught.value), path, marker)


def test_checkpoint_of_an_older_segshift_says_so_in_one_line(tmp_path: Path):
    """Before weights-only loading the RNG state held numpy's uint32 key array."""
    old_rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    path = write_with_torch(tmp_path / "last.pt", {"format": 1, "step": 2, "rng": old_rng})
    with pytest.raises(OutdatedCheckpointError,
                       match=re.escape(str(path)) + ": written by an older segshift.*delete it") as caught:
        load_checkpoint(path)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("content, reason", [(b"", "empty or cut short"),
                                             (b"not a checkpoint", "not a file written by torch.save")])
def test_unreadable_file_gives_one_line_without_unsafe_advice(tmp_path: Path, content: bytes, reason: str):
    path = tmp_path / "last.pt"
    path.write_bytes(content)
    expected = re.escape(f"{path}: not a readable checkpoint ({reason}")
    with pytest.raises(CheckpointError, match=expected) as caught:
        load_checkpoint(path)
    assert "weights_only" not in str(caught.value) and "\n" not in str(caught.value)


def test_a_payload_that_is_not_a_dict_is_refused(tmp_path: Path):
    path = write_with_torch(tmp_path / "model.pt", [torch.zeros(1)])
    with pytest.raises(CheckpointError, match="not a segshift checkpoint .*list"):
        load_checkpoint(path)


@pytest.mark.parametrize("value", [Path("models"), np.float64(0.5), np.zeros(2)],
                         ids=["Path", "numpy scalar", "numpy array"])
def test_save_refuses_a_payload_loading_would_refuse(tmp_path: Path, value):
    path = tmp_path / "last.pt"
    with pytest.raises(TypeError, match=re.escape(str(path)) + ": the checkpoint would hold"):
        save_checkpoint(path, {"value": value})
    assert not path.exists()


# -- what we save round-trips through the weights-only loader -------------------------------------

def draws() -> tuple:
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.normal(),
            torch.rand(3).tolist())


def test_rng_state_round_trips_exactly(tmp_path: Path):
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    # half of a gauss pair cached in python and numpy: part of the state that must survive too
    random.gauss(0, 1), np.random.normal()
    save_checkpoint(tmp_path / "last.pt", {"rng": capture_rng_state()})
    expected = draws()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(load_checkpoint(tmp_path / "last.pt")["rng"])
    assert draws() == expected


def test_optimizer_and_grad_scaler_state_round_trip(tmp_path: Path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for optimizer in (sgd, adamw):
        optimizer.zero_grad()
        scaler.scale(model(torch.randn(3, 4)).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
    payload = {"optimizers": {"sgd": sgd.state_dict(), "adamw": adamw.state_dict()},
               "scaler": scaler.state_dict(), "history": [{"step": 1, "loss": 0.5}],
               "selection": {"metric": "val_miou", "value": None, "step": None}}
    loaded = load_checkpoint(save_checkpoint(tmp_path / "last.pt", payload))
    for name, optimizer in (("sgd", sgd), ("adamw", adamw)):
        fresh = type(optimizer)(model.parameters(), lr=0.5)
        fresh.load_state_dict(loaded["optimizers"][name])
        assert_same_state(fresh.state_dict(), optimizer.state_dict())
    restored = torch.amp.GradScaler("cpu")
    restored.load_state_dict(loaded["scaler"])
    assert restored.state_dict() == scaler.state_dict() and scaler.state_dict()["_growth_tracker"] == 2
    assert loaded["history"] == payload["history"] and loaded["selection"] == payload["selection"]


def assert_same_state(got, expected) -> None:
    if isinstance(expected, torch.Tensor):
        assert torch.equal(got, expected)
    elif isinstance(expected, dict):
        assert got.keys() == expected.keys()
        for key in expected:
            assert_same_state(got[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert type(got) is type(expected) and len(got) == len(expected)
        for a, b in zip(got, expected):
            assert_same_state(a, b)
    else:
        assert got == expected


# -- the user's paths: `segshift evaluate` and a resumed `segshift train` ------------------------

FAST = {"model.width": 0.125, "engine.device": "cpu", "source.iterations": 2, "source.batch_size": 2}


@pytest.fixture
def project(tiny_project) -> Path:
    """A copy of the session's prepared project: the CLI gets as far as loading checkpoints."""
    write_params(tiny_project, {**FAST, "tracking.uri": f"sqlite:///{tiny_project / 'mlflow.db'}"})
    return tiny_project


def run_cli(project: Path, monkeypatch, *args: str) -> int:
    monkeypatch.chdir(project)
    return main([*args, "--params", "params.yaml", "--quiet"])


def error_line(stderr: str, command: str) -> str:
    """The CLI's one-line error (MLflow may log to stderr too)."""
    errors = [line for line in stderr.splitlines() if line.startswith(f"segshift {command}: error: ")]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr
    return errors[0]


def test_evaluate_refuses_a_crafted_model_without_running_it(project: Path, monkeypatch, capsys):
    marker = project / "marker-evaluate"
    stages = load_params(project / "params.yaml").evaluate.stages
    for stage in stages:
        crafted(project / "models" / stage / "model.pt", marker)
    assert run_cli(project, monkeypatch, "evaluate") == 2
    err = error_line(capsys.readouterr().err, "evaluate")
    first = Path("models") / stages[0] / "model.pt"
    assert_refused_without_running(err, project / first, marker)


def test_stage_model_loader_refuses_a_crafted_model(project: Path):
    marker = project / "marker-stage-model"
    path = crafted(project / "models" / "inter" / "model.pt", marker)
    with pytest.raises(CheckpointError) as caught:
        load_stage_model(path, load_params(project / "params.yaml"))
    assert_refused_without_running(str(caught.value), path, marker)


def test_train_resume_refuses_a_crafted_last_checkpoint_without_running_it(project: Path, monkeypatch,
                                                                          capsys):
    marker = project / "marker-train"
    path = crafted(project / "checkpoints" / "source" / "last.pt", marker)
    try:
        assert run_cli(project, monkeypatch, "train", "--stage", "source") == 2
    finally:
        path.unlink()
    err = error_line(capsys.readouterr().err, "train")
    assert_refused_without_running(err, path, marker)


def test_train_resume_from_an_older_segshift_checkpoint_starts_afresh(project: Path, monkeypatch, capsys):
    # a resume point of an older segshift holds numpy arrays: not loaded, and not worth stopping for
    old_rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    path = write_with_torch(project / "checkpoints" / "source" / "last.pt",
                            {"format": 1, "fingerprint": "old", "step": 2, "rng": old_rng})
    assert run_cli(project, monkeypatch, "train", "--stage", "source") == 0
    assert f"{path}: written by an older segshift; starting afresh" in capsys.readouterr().out
    assert isinstance(torch.load(path, weights_only=True)["rng"]["numpy"]["key"], torch.Tensor)


def test_loading_a_checkpoint_of_an_older_segshift_says_delete_it(tmp_path: Path):
    old_rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    path = write_with_torch(tmp_path / "model.pt", {"model": {}, "rng": old_rng})
    with pytest.raises(OutdatedCheckpointError, match="written by an older segshift .*delete it"):
        load_checkpoint(path)

def test_a_model_file_without_weights_is_one_line_naming_it(tmp_path: Path):
    from segshift.pipelines.stage_model import load_stage_model
    path = tmp_path / "model.pt"
    torch.save({"step": 3}, path)
    with pytest.raises(CheckpointError, match=f"{re.escape(str(path))}: no 'model' entry"):
        load_stage_model(path, load_params(Path(__file__).resolve().parents[3] / "params.yaml"))
