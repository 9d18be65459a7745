"""Every failure a user can cause ends as ONE line `segshift <cmd>: error: ...` (exit 2), a bug as
one `internal error` line (exit 1); SEGSHIFT_TRACEBACK=1 adds the traceback. The inputs are what a
careless user or an attacker hands over: bombs, huge files, typos that YAML happily parses."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml

from segshift.pipelines.cli import build_parser, main
from tests.components.test_config import alias_bomb
from tests.conftest import REPO, write_params


def fail(argv: list[str], capsys) -> tuple[int, list[str]]:
    """(exit code, stderr lines) of a command expected to fail."""
    code = main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


def prepare_fails(path: Path, capsys) -> tuple[int, str]:
    """`segshift prepare` on `path`; its single stderr line (the params file is read first)."""
    code, err = fail(["prepare", "--params", str(path), "--quiet"], capsys)
    assert len(err) == 1, err
    return code, err[0]


def with_compare_set(params: Path, block: str) -> None:
    """Insert `block` (YAML lines, already indented) into the file's `compare.set` mapping."""
    text = params.read_text()
    at = text.index("\n  set:\n", text.index("\ncompare:\n")) + len("\n  set:\n")
    params.write_text(text[:at] + block + text[at:])


# --- the params file ------------------------------------------------------------------------------

def test_an_alias_bomb_as_the_params_file_is_one_line_fast_and_small(tmp_path, capsys):
    path = tmp_path / "params.yaml"
    path.write_text(alias_bomb())
    from segshift.pipelines.cli import _user_errors
    from segshift.pipelines.tracking import mask_text
    build_parser(), _user_errors(), mask_text("")     # the imports an error needs, outside the measurement
    tracemalloc.start()
    started = time.perf_counter()
    try:
        code, line = prepare_fails(path, capsys)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 5 and peak < 20 * 2**20      # measured: 0.2 s, 1 MiB
    assert code == 2 and line.startswith(f"segshift prepare: error: {path}: line 2: aliases expand")


def test_an_alias_bomb_under_compare_set_is_refused_before_any_work(tmp_path, capsys):
    params = write_params(tmp_path)
    with_compare_set(params, alias_bomb(indent="    "))
    code, line = prepare_fails(params, capsys)
    assert code == 2 and str(params) in line and "aliases expand to more than 20000 YAML nodes" in line
    assert not (tmp_path / "prepared").exists()


def test_a_two_mib_params_file_is_refused_by_size(tmp_path, capsys):
    params = write_params(tmp_path)
    params.write_text(params.read_text() + ("#" * 99 + "\n") * 21_000)    # valid YAML, 2.0 MiB
    code, line = prepare_fails(params, capsys)
    assert code == 2 and f"{params}: the params file is" in line and "over the 1.0 MiB limit" in line


def test_duplicate_keys_name_file_key_and_both_lines(tmp_path, capsys):
    params = write_params(tmp_path)
    lines = params.read_text().splitlines()
    workers = next(i for i, line in enumerate(lines) if line.startswith("  workers:")) + 1
    lines.insert(workers, "  workers: 1")
    params.write_text("\n".join(lines) + "\n")
    code, line = prepare_fails(params, capsys)
    assert code == 2
    assert line == (f"segshift prepare: error: {params}: duplicate key 'workers' at lines {workers} and "
                    f"{workers + 1} (YAML would silently keep the second); remove one")


def test_a_params_file_in_another_encoding_is_named(tmp_path, capsys):
    params = write_params(tmp_path)
    params.write_bytes(params.read_bytes() + "# r\u00e9glages\n".encode("latin-1"))
    code, line = prepare_fails(params, capsys)
    assert code == 2 and line.startswith(f"segshift prepare: error: {params}: the params file is not UTF-8")


@pytest.mark.parametrize("override, key", [
    ({"source.iterations": True}, "source.iterations: Input should be a valid integer (got True)"),
    ({"source.optimizer.lr": float("inf")}, "source.optimizer.lr: Input should be a finite number"),
    ({"source.crop": [-512, 512]}, "source.crop.0: Input should be greater than or equal to 16"),
    ({"inter.crop": [512, 1 << 40]}, "inter.crop.1: Input should be less than or equal to 8192"),
    ({"model.rates": [0, 10**6]}, "model.rates.0: Input should be greater than or equal to 1"),
    ({"model.rates": []}, "model.rates: List should have at least 1 item"),
])
def test_values_yaml_accepts_but_the_schema_does_not_are_one_line(tmp_path, capsys, override, key):
    params = write_params(tmp_path, override)
    code, line = prepare_fails(params, capsys)
    assert code == 2 and line.startswith(f"segshift prepare: error: {params}: invalid configuration; ")
    assert key in line
    assert not (tmp_path / "prepared").exists()


def test_the_error_line_is_bounded_whatever_the_file_holds(tmp_path, capsys):
    params = write_params(tmp_path, {f"prepare.k{i}": "v" * 1_000 for i in range(150)}
                          | {"source.iterations": "x" * 500_000})
    code, line = prepare_fails(params, capsys)
    assert code == 2 and "invalid configuration; prepare.k0: unknown key" in line
    assert "x" * 1_000 not in line and len(line) < 2_200


# --- presets and -S overrides read with the same bounds ---------------------------------------------

def test_a_preset_that_is_an_alias_bomb_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = write_params(tmp_path)
    before = params.read_text()
    preset = tmp_path / "bomb.yaml"
    preset.write_text(alias_bomb())
    code, err = fail(["preset", str(preset), "--params", str(params)], capsys)
    assert code == 2 and len(err) == 1 and str(preset) in err[0] and "aliases expand" in err[0]
    assert params.read_text() == before


def test_an_override_value_that_is_an_alias_bomb_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = write_params(tmp_path)
    value = alias_bomb().replace("\n", ", ").rstrip(", ")
    code, err = fail(["preset", "gta5-cityscapes", "--params", str(params), "-S", f"compare.set={{{value}}}"],
                     capsys)
    assert code == 2 and len(err) == 1 and "override 'compare.set=" in err[0] and "aliases expand" in err[0]


def test_a_directory_as_the_params_file_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = fail(["preset", "gta5-cityscapes", "--params", str(tmp_path)], capsys)
    assert code == 2 and err == [f"segshift preset: error: {tmp_path}: not a regular file, so not a "
                                 "params file"]


# --- errors raised anywhere in a command ----------------------------------------------------------

def _raising(exc: BaseException):
    def prepare(*args, **kwargs):
        raise exc
    return prepare


@pytest.mark.parametrize("exc, expected", [
    (IsADirectoryError(21, "Is a directory", "/data/out"), "segshift prepare: error: /data/out: Is a directory"),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "segshift prepare: error: 'utf-8' codec"),
    (yaml.YAMLError("bad\nyaml"), "segshift prepare: error: not valid YAML: bad yaml"),
])
def test_user_errors_raised_by_a_stage_are_one_line(tmp_path, capsys, monkeypatch, exc, expected):
    monkeypatch.setattr("segshift.pipelines.prepare.prepare", _raising(exc))
    code, line = prepare_fails(write_params(tmp_path), capsys)
    assert code == 2 and line.startswith(expected), line


def test_a_validation_error_raised_by_a_stage_is_one_line(tmp_path, capsys, monkeypatch):
    from pydantic import ValidationError
    from segshift.components.config import Params
    try:
        Params.model_validate({"prepare": {"workers": "x" * 100_000}})
    except ValidationError as exc:
        error = exc
    monkeypatch.setattr("segshift.pipelines.prepare.prepare", _raising(error))
    code, line = prepare_fails(write_params(tmp_path), capsys)
    assert code == 2 and line.startswith("segshift prepare: error: invalid Params settings: ")
    assert "prepare.workers" in line and len(line) < 2_200


def test_a_bug_is_one_internal_error_line_bounded_and_masked(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SEGSHIFT_TRACEBACK", raising=False)
    message = "lost https://ann:hunter2@tracking.example.com\n" + "x" * 1_000_000
    monkeypatch.setattr("segshift.pipelines.prepare.prepare", _raising(RuntimeError(message)))
    code, line = prepare_fails(write_params(tmp_path), capsys)
    assert code == 1
    assert line.startswith("segshift prepare: internal error: RuntimeError: lost https://")
    assert line.endswith("(run with SEGSHIFT_TRACEBACK=1 for the traceback and report it)")
    assert "hunter2" not in line and len(line) < 2_200


def test_segshift_traceback_keeps_the_traceback_of_a_bug(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SEGSHIFT_TRACEBACK", "1")
    monkeypatch.setattr("segshift.pipelines.prepare.prepare", _raising(KeyError("model")))
    code = main(["prepare", "--params", str(write_params(tmp_path))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[0] == "Traceback (most recent call last):"
    assert err[-1].startswith("segshift prepare: internal error: KeyError: 'model'")


def test_a_usage_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["prepare", "--params"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1
    assert err[0].startswith("segshift prepare: error: argument --params: expected one argument")


@pytest.mark.integration
def test_the_real_command_line_prints_one_line_for_an_alias_bomb(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(alias_bomb())
    env = {k: v for k, v in os.environ.items() if k != "SEGSHIFT_TRACEBACK"}
    done = subprocess.run([sys.executable, "-m", "segshift.pipelines.cli", "prepare", "--params", str(path)],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"segshift prepare: error: {path}: ")
