"""`dvc repro` in a fresh git repository runs the pipeline, and running it again is a no-op."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO, TINY_BUILTIN, set_dotted

TINY_TRAINING = {"source.iterations": 2, "oracle.iterations": 2, "source.batch_size": 2,
                 "oracle.batch_size": 2, "engine.val_every": 2, "engine.checkpoint_every": 2,
                 "model.width": 0.125}

BIN = Path(sys.executable).parent


def _run(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def _fresh_project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    for name in ("components", "pipelines", ".dvc", "dvc.yaml", ".dvcignore"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, project / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
        else:
            shutil.copy(src, project / name)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, value in {**TINY_BUILTIN, **TINY_TRAINING}.items():
        set_dotted(raw, dotted, value)
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    _run(["git", "init", "-q"], project)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A"], project)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], project)
    return project


def test_dvc_repro_runs_the_pipeline_then_is_a_no_op(tmp_path):
    project = _fresh_project(tmp_path)
    _run([str(BIN / "dvc"), "repro"], project)
    manifest = project / "data" / "prepared" / "target" / "manifest.parquet"
    assert manifest.is_file() and (project / "dvc.lock").is_file()
    for stage in ("source", "oracle"):
        assert (project / "models" / stage / "model.pt").is_file()
    shown = _run([str(BIN / "dvc"), "metrics", "show"], project)
    assert "metrics/source.json" in shown and "test.miou" in shown
    stamp = manifest.stat().st_mtime_ns
    second = _run([str(BIN / "dvc"), "repro"], project)
    assert "didn't change" in second or "up to date" in second
    assert manifest.stat().st_mtime_ns == stamp
    status = _run([str(BIN / "dvc"), "status"], project)
    assert "up to date" in status


def test_changing_a_prepare_param_reruns_the_stage(tmp_path):
    project = _fresh_project(tmp_path)
    _run([str(BIN / "dvc"), "repro", "prepare"], project)
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["prepare"]["builtin"]["seed"] = 1
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert "prepare" in _run([str(BIN / "dvc"), "status", "prepare"], project)
    out = _run([str(BIN / "dvc"), "repro", "prepare"], project)
    assert "Running stage 'prepare'" in out
