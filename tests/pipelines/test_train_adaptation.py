"""`segshift train --stage inter|intra`: adaptation stages, their inputs and the errors before training."""
import json
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from segshift.components.data.manifest import MANIFEST_NAME, read_manifest
from segshift.components.io import write_png
from segshift.components.ranking import (build_ranking_table, file_sha256, pseudo_label_name,
                                         write_ranking)
from segshift.pipelines.cli import main
from tests.conftest import write_params

FAST = {**{f"{stage}.{key}": 2 for stage in ("source", "inter", "intra")
           for key in ("iterations", "batch_size")},
        "engine.val_every": 2, "engine.checkpoint_every": 2, "engine.log_every": 1,
        "model.width": 0.125}


def run(project: Path, stage: str, overrides: dict | None = None) -> int:
    params = write_params(project, {**FAST, **(overrides or {})})
    return main(["train", "--params", str(params), "--stage", stage, "--quiet"])


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapt")
    assert main(["prepare", "--params", str(write_params(root, FAST)), "--quiet"]) == 0
    return root


def fake_ranking(project: Path, easy: int, drop: int = 0) -> Path:
    """A ranking of target train as `segshift rank` writes it, with the first `easy` ids easy."""
    target = project / "prepared" / "target"
    rows = sorted((r for r in read_manifest(target).to_pylist() if r["split"] == "train"),
                  key=lambda r: r["sample_id"])[drop:]
    records = [{"sample_id": r["sample_id"], "score": float(i), "normaliser": 1.0, "mean_confidence": 0.9,
                "class_histogram": np.zeros(19, np.float32), "condition": r["condition"]}
               for i, r in enumerate(rows)]
    lam = (easy + 0.5) / len(rows)
    table = build_ranking_table(records, lam, False, None, file_sha256(target / MANIFEST_NAME), "x")
    out = project / "data" / "ranking"
    for r in rows[:easy]:
        write_png(out / pseudo_label_name(r["sample_id"]),
                  np.full((r["height"], r["width"]), 13, np.uint8))   # everything "car"
    write_ranking(table, out)
    return out


def test_inter_needs_the_source_model(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    assert run(project, "inter") == 2
    err = capsys.readouterr().err
    assert "inter.init is 'source'" in err and "models/source/model.pt" in err and "dvc repro source" in err


def test_inter_then_intra_train_from_the_previous_stage(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    assert run(project, "source") == 0
    assert run(project, "inter") == 0
    metrics = json.loads((project / "metrics" / "inter.json").read_text())
    assert metrics["steps"] == 2 and 0 <= metrics["test"]["miou"] <= 1
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("segshift")
    inter = client.search_runs([experiment.experiment_id], "tags.`segshift.stage` = 'inter'")[0]
    assert {"adv_main", "adv_aux", "d_main", "d_aux", "seg_main"} <= set(inter.data.metrics)

    assert run(project, "intra") == 2
    assert "ranking.parquet: missing; run `dvc repro rank`" in capsys.readouterr().err
    fake_ranking(project, easy=3)
    assert run(project, "intra") == 0
    assert (project / "models" / "intra" / "model.pt").is_file()


def test_intra_refuses_a_ranking_of_other_data(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    if not (project / "models" / "inter" / "model.pt").is_file():
        pytest.skip("needs the inter model of the previous test")
    fake_ranking(project, easy=3, drop=1)
    assert run(project, "intra") == 2
    assert "not ranked" in capsys.readouterr().err


def test_intra_refuses_an_easy_split_smaller_than_a_batch(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    if not (project / "models" / "inter" / "model.pt").is_file():
        pytest.skip("needs the inter model of the previous test")
    fake_ranking(project, easy=1)
    assert run(project, "intra") == 2
    err = capsys.readouterr().err
    assert "intra (target train, easy split + pseudo-labels): 1 training images is fewer than " \
           "intra.batch_size = 2" in err


@pytest.mark.parametrize("model", ["deeplabv2", "bisenet"])
@pytest.mark.parametrize("method", ["dacs", "fda"])
def test_dacs_and_fda_train_the_inter_stage_with_either_model(tmp_path, monkeypatch, method, model):
    """The image-level methods run through the engine with DeepLab-v2 and BiSeNet alike."""
    monkeypatch.chdir(tmp_path)
    overrides = {"model.name": model, "inter.method": method, "inter.init": "scratch",
                 "methods.fda.entropy_start": 1}
    assert main(["prepare", "--params", str(write_params(tmp_path, {**FAST, **overrides})), "--quiet"]) == 0
    assert run(tmp_path, "inter", overrides) == 0
    metrics = json.loads((tmp_path / "metrics" / "inter.json").read_text())
    assert metrics["steps"] == 2 and 0 <= metrics["test"]["miou"] <= 1
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_ = next(r for r in client.search_runs([client.get_experiment_by_name("segshift").experiment_id])
                if r.data.tags.get("segshift.stage") == "inter")
    # DACS logs its mixed loss every step; FDA's entropy term starts at entropy_start (0-based 1)
    name, steps = {"dacs": ("mixed", [1, 2]), "fda": ("entropy", [2])}[method]
    assert [m.step for m in client.get_metric_history(run_.info.run_id, name)] == steps
    assert run_.data.params["inter.method"] == method


def test_supervised_inter_is_the_source_recipe_on_more_steps(tmp_path, monkeypatch):
    """`inter.method: supervised` (the budget control) trains on source labels alone: given the
    source stage's recipe and a scratch start it reproduces the source stage's model exactly,
    and it logs no target term."""
    import torch
    monkeypatch.chdir(tmp_path)
    recipe = {"inter.batch_size": 2, "inter.iterations": 2, "inter.aux_weight": 0.1,
              "inter.optimizer": {"name": "adam", "lr": 0.002, "momentum": 0.9, "betas": [0.9, 0.99],
                                  "weight_decay": 0.0, "head_lr_mult": 1, "poly_power": 0.9}}
    overrides = {"inter.method": "supervised", "inter.init": "scratch", **recipe}
    assert main(["prepare", "--params", str(write_params(tmp_path, {**FAST, **overrides})), "--quiet"]) == 0
    assert run(tmp_path, "source", overrides) == 0
    assert run(tmp_path, "inter", overrides) == 0
    source = torch.load(tmp_path / "models" / "source" / "model.pt", weights_only=False)
    inter = torch.load(tmp_path / "models" / "inter" / "model.pt", weights_only=False)
    assert source["model"].keys() == inter["model"].keys()
    assert all(torch.equal(source["model"][k], inter["model"][k]) for k in source["model"])
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_ = next(r for r in client.search_runs([client.get_experiment_by_name("segshift").experiment_id])
                if r.data.tags.get("segshift.stage") == "inter")
    assert run_.data.params["inter.method"] == "supervised"
    assert not {"entropy", "adv", "mixed"} & {k.split("/")[-1] for k in run_.data.metrics}
