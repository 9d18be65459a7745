"""`dvc repro` in a fresh git repository runs the whole pipeline, running it again is a no-op, and a
changed `rank.lambda` reruns only rank, intra and evaluate (`dvc exp run -S`)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, TINY_BUILTIN, set_dotted

pytestmark = pytest.mark.integration     # the whole pipeline under `dvc repro`, in subprocesses

TINY_TRAINING = {**{f"{stage}.{key}": 2 for stage in ("source", "oracle", "inter", "intra")
                    for key in ("iterations", "batch_size")},
                 "engine.val_every": 2, "engine.checkpoint_every": 2, "model.width": 0.125,
                 "rank.lambda": 0.5, "ray.local_num_cpus": 1}
STAGES = ("prepare", "source", "oracle", "inter", "rank", "intra", "evaluate")

BIN = Path(sys.executable).parent


def _run(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def _fresh_project(tmp_path: Path, overrides: dict | None = None) -> Path:
    project = tmp_path / "project"
    project.mkdir(parents=True)
    for name in ("components", "pipelines", ".dvc", "dvc.yaml", ".dvcignore", "segshift/__init__.py"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, project / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
        else:   # segshift/__init__.py: a dep of every stage (the package the stages import)
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, project / name)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, value in {**TINY_BUILTIN, **TINY_TRAINING, **(overrides or {})}.items():
        set_dotted(raw, dotted, value)
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    _run(["git", "init", "-q"], project)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A"], project)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], project)
    return project


def _ran(output: str) -> set[str]:
    return {stage for stage in STAGES if f"Running stage '{stage}'" in output}


def test_dvc_repro_runs_the_pipeline_is_a_no_op_again_and_lambda_reruns_only_its_stages(tmp_path):
    project = _fresh_project(tmp_path)
    first = _run([str(BIN / "dvc"), "repro"], project)
    assert _ran(first) == set(STAGES)
    manifest = project / "data" / "prepared" / "target" / "manifest.parquet"
    assert manifest.is_file() and (project / "dvc.lock").is_file()
    for stage in ("source", "oracle", "inter", "intra"):
        assert (project / "models" / stage / "model.pt").is_file()
    summary = json.loads((project / "metrics" / "summary.json").read_text())
    assert list(summary) == ["source", "inter", "intra", "oracle"]
    shown = _run([str(BIN / "dvc"), "metrics", "show"], project)
    assert "metrics/source.json" in shown and "test.miou" in shown and "metrics/summary.json" in shown

    stamp = manifest.stat().st_mtime_ns
    second = _run([str(BIN / "dvc"), "repro"], project)
    assert _ran(second) == set()
    assert manifest.stat().st_mtime_ns == stamp
    assert "up to date" in _run([str(BIN / "dvc"), "status"], project)

    before = json.loads((project / "metrics" / "rank.json").read_text())
    assert (before["easy"], before["hard"]) == (3, 3)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A"], project)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "ran"], project)
    out = _run([str(BIN / "dvc"), "exp", "run", "-S", "rank.lambda=0.34"], project)
    assert _ran(out) == {"rank", "intra", "evaluate"}
    after = json.loads((project / "metrics" / "rank.json").read_text())
    assert (after["easy"], after["hard"]) == (2, 4)
    table = _run([str(BIN / "dvc"), "exp", "show", "--no-pager", "--csv"], project)
    assert "rank.lambda" in table and "0.34" in table
