"""The stage table (pipelines/stages.py): the CLI, `seeds`, `compare`, the params schema and dvc.yaml
all follow it, and a stage's DVC deps are the code it imports — `dvc status` sees a change to it."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
import yaml

from segshift.components import stages as names
from segshift.components.config import CompareStage, EvaluatedStage
from segshift.pipelines.cli import build_parser, main
from segshift.pipelines.compare import TRAINING_STAGES
from segshift.pipelines.dvc_yaml import code_deps, render
from segshift.pipelines.imports import REPO, ImportGraph
from segshift.pipelines.runtime import STAGE_DATA
from segshift.pipelines.seeds import PIPELINE as SEEDS_PIPELINE
from segshift.pipelines.stages import STAGES

GRAPH = ImportGraph()
CODE = ("components", "pipelines", "segshift")
BIN = Path(sys.executable).parent


def deps(stage: str, root: Path = REPO) -> list[str]:
    return code_deps(STAGES[stage], ImportGraph(root))


@pytest.fixture
def code_copy(tmp_path: Path) -> Path:
    """The package's source folders and dvc.yaml, copied: free to edit."""
    for folder in CODE:
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    return tmp_path


# -- one list of stages -----------------------------------------------------------------------------

def test_the_table_holds_the_pipelines_stages_in_order():
    assert tuple(STAGES) == names.PIPELINE
    assert tuple(s for s in STAGES.values() if s.trains) == tuple(STAGES[n] for n in names.TRAINING)


def test_seeds_compare_the_schema_and_the_runtime_follow_the_stage_names():
    assert SEEDS_PIPELINE == tuple(s for s in STAGES if s != "prepare")
    assert TRAINING_STAGES == tuple(s for s, stage in STAGES.items() if stage.trains)
    assert get_args(CompareStage) == tuple(s for s in STAGES if s not in ("prepare", "evaluate"))
    assert set(get_args(EvaluatedStage)) == set(TRAINING_STAGES)
    assert tuple(STAGE_DATA) == TRAINING_STAGES


def test_each_command_runs_the_code_of_its_module():
    """DVC's command, parsed by the CLI, reaches a function of the module whose imports are its deps."""
    for name, stage in STAGES.items():
        words = shlex.split(stage.command)
        assert words[0] == "segshift", name
        args = build_parser().parse_args(words[1:])
        assert args.func.__module__ == stage.module, name
        if stage.trains:
            assert args.stage == name


def test_train_accepts_exactly_the_training_stages(capsys):
    for name in names.PIPELINE:
        if name in names.TRAINING:
            assert build_parser().parse_args(["train", "--stage", name]).stage == name
        else:
            with pytest.raises(SystemExit):
                build_parser().parse_args(["train", "--stage", name])
            assert "invalid choice" in capsys.readouterr().err


def test_each_stage_needs_only_what_earlier_stages_write():
    written: list[str] = []
    for name, stage in STAGES.items():
        for need in stage.needs:
            assert any(need == out or need.startswith(out + "/") for out in written), (name, need)
        written += stage.outs


# -- dvc.yaml ---------------------------------------------------------------------------------------

def test_the_committed_dvc_yaml_is_the_generated_one():
    assert (REPO / "dvc.yaml").read_text() == render(), "dvc.yaml is stale: run `segshift dvc-yaml`"


def test_dvc_yaml_keeps_each_stages_command_params_and_outputs():
    stages = yaml.safe_load(render())["stages"]
    assert list(stages) == list(STAGES)
    rank = stages["rank"]
    assert rank["cmd"] == "segshift rank --params params.yaml"
    assert rank["params"] == ["rank", "model", "engine.device", "engine.eval_batch_size"]
    assert rank["deps"][:2] == ["${prepare.out_dir}", "${paths.models}/inter"]
    assert rank["metrics"] == [{"${paths.metrics}/rank.json": {"cache": False}}]
    assert stages["evaluate"]["plots"] == [{"${paths.metrics}/summary_per_class.json": {
        "cache": False, "template": "bar_horizontal", "x": "iou", "y": "class"}}]


def test_deps_hold_the_code_that_was_missing_from_the_hand_written_ones():
    assert {"components/pseudo_labels.py", "components/ranking.py", "pipelines/stage_model.py"} <= set(deps("rank"))
    assert {"components/evaluation.py", "pipelines/stage_model.py", "components/models/factory.py"} \
        <= set(deps("evaluate"))
    methods = {p.relative_to(REPO).as_posix() for p in (REPO / "components" / "methods").rglob("*.py")}
    for stage in names.TRAINING:
        assert methods | {"pipelines/train.py", "pipelines/runtime.py", "pipelines/rounds.py"} <= set(deps(stage))


def test_deps_leave_out_code_a_stage_does_not_run():
    for stage in STAGES:
        assert "pipelines/cli.py" not in deps(stage) and "pipelines/sweep.py" not in deps(stage)
    assert not {"components/methods/registry.py", "pipelines/runtime.py"} & set(deps("rank") + deps("evaluate"))
    assert "components/ranking.py" not in deps("prepare")


def test_a_new_import_inside_a_function_becomes_a_dep(code_copy: Path):
    prepare = code_copy / "pipelines" / "prepare.py"
    assert "components/pseudo_labels.py" not in deps("prepare", code_copy)
    prepare.write_text(prepare.read_text() + "\n\ndef _levels():\n"
                       "    from segshift.components.pseudo_labels import LEVELS\n    return LEVELS\n")
    assert "components/pseudo_labels.py" in deps("prepare", code_copy)
    assert "components/pseudo_labels.py" in yaml.safe_load(render(code_copy))["stages"]["prepare"]["deps"]


def test_dvc_yaml_command_checks_then_writes(code_copy: Path, capsys):
    out = code_copy / "dvc.yaml"
    assert main(["dvc-yaml", "--output", str(out), "--check"]) == 0
    prepare = code_copy / "pipelines" / "prepare.py"
    prepare.write_text(prepare.read_text() + "\nimport segshift.components.ranking\n")
    assert main(["dvc-yaml", "--output", str(out), "--check"]) == 1
    assert "run `segshift dvc-yaml`" in capsys.readouterr().err
    assert main(["dvc-yaml", "--output", str(out)]) == 0
    assert main(["dvc-yaml", "--output", str(out), "--check"]) == 0
    assert "components/ranking.py" in yaml.safe_load(out.read_text())["stages"]["prepare"]["deps"]


# -- dvc status in a project ---------------------------------------------------------------------------

def _run(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _resolved(path: str, params: dict) -> str:
    """A dvc.yaml path with its `${a.b}` parts looked up in params.yaml, as DVC does."""
    def value(match: re.Match) -> str:
        node = params
        for key in match.group(1).split("."):
            node = node[key]
        return str(node)
    return re.sub(r"\$\{([^}]+)\}", value, path)


def _fake_outputs(project: Path) -> None:
    """A small file for every output of every stage: `dvc commit` records them without training."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    for stage in STAGES.values():
        for out in (*stage.outs, *stage.metrics, *(path for path, _ in stage.plots)):
            path = project / _resolved(out, params)
            file = path if path.suffix == ".json" else path / "fake.txt"
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(f"{stage.name}\n")


def _changed_stages(project: Path) -> set[str]:
    status = json.loads(_run([str(BIN / "dvc"), "status", "--json"], project) or "{}")
    return set(status)


@pytest.mark.integration
def test_dvc_status_reports_exactly_the_stages_that_import_an_edited_module(code_copy: Path):
    project = code_copy
    shutil.copy(REPO / "params.yaml", project / "params.yaml")
    _run(["git", "init", "-q"], project)
    _run([str(BIN / "dvc"), "init", "-q"], project)
    _fake_outputs(project)
    _run([str(BIN / "dvc"), "commit", "-f", "-q"], project)
    assert _changed_stages(project) == set()
    with open(project / "pipelines" / "sweep.py", "a") as f:     # no stage runs the sweep
        f.write("\n# edited\n")
    assert _changed_stages(project) == set()

    edited = "components/pseudo_labels.py"      # the hand-written dvc.yaml had it for no stage
    users = {name for name in STAGES if edited in deps(name, project)}
    assert "rank" in users and not {"prepare", "evaluate"} & users
    with open(project / edited, "a") as f:
        f.write("\n# edited\n")
    assert _changed_stages(project) == users
