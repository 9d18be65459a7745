"""`segshift prepare`: built-in and real datasets through the same code, atomically."""
from pathlib import Path

import pyarrow.parquet as pq

from segshift.pipelines.cli import main
from tests.conftest import write_params
from segshift.components.data.rawformats import write_cityscapes, write_gta5


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_builtin_prepare_writes_both_domains(tmp_path, capsys):
    params = write_params(tmp_path)
    assert main(["prepare", "--params", str(params), "--quiet"]) == 0
    out = tmp_path / "prepared"
    source = pq.read_table(out / "source" / "manifest.parquet").to_pylist()
    target = pq.read_table(out / "target" / "manifest.parquet").to_pylist()
    assert sorted({r["split"] for r in source}) == ["train", "val"] and len(source) == 8
    assert sorted({r["split"] for r in target}) == ["test", "train", "val"] and len(target) == 11
    assert all(r["condition"] for r in target) and all(r["condition"] for r in source)
    assert (out / "summary.json").is_file()
    assert "prepared" in capsys.readouterr().out


def test_prepare_is_deterministic(tmp_path):
    params = write_params(tmp_path)
    main(["prepare", "--params", str(params), "--quiet"])
    first = _snapshot(tmp_path / "prepared")
    main(["prepare", "--params", str(params), "--quiet"])
    assert _snapshot(tmp_path / "prepared") == first


def test_failed_prepare_keeps_previous_output(tmp_path, capsys):
    good = write_params(tmp_path)
    main(["prepare", "--params", str(good), "--quiet"])
    before = _snapshot(tmp_path / "prepared")
    missing = tmp_path / "no-such-cityscapes"
    bad = write_params(tmp_path, {"prepare.target.kind": "cityscapes",
                                  "prepare.target.root": str(missing)})
    assert main(["prepare", "--params", str(bad), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "error" in err and str(missing) in err
    assert _snapshot(tmp_path / "prepared") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "prepared"]  # no temp dirs


def test_invalid_params_fail_before_any_work(tmp_path, capsys):
    params = write_params(tmp_path, {"prepare.workers": 0})
    assert main(["prepare", "--params", str(params), "--quiet"]) == 2
    assert "prepare.workers" in capsys.readouterr().err
    assert not (tmp_path / "prepared").exists()


def test_real_gta5_to_cityscapes_roles(tmp_path):
    write_gta5(tmp_path / "gta5", n=6, size=(96, 54))
    write_cityscapes(tmp_path / "cityscapes", per_city=2, size=(128, 64))
    params = write_params(tmp_path, {
        "prepare.source.kind": "gta5", "prepare.source.root": str(tmp_path / "gta5"),
        "prepare.source.resize": [64, 36], "prepare.source.val_fraction": 0.34,
        "prepare.target.kind": "cityscapes", "prepare.target.root": str(tmp_path / "cityscapes"),
        "prepare.target.resize": [64, 32], "prepare.target.val_fraction": 0.3,
    })
    assert main(["prepare", "--params", str(params), "--quiet"]) == 0
    source = pq.read_table(tmp_path / "prepared" / "source" / "manifest.parquet").to_pylist()
    target = pq.read_table(tmp_path / "prepared" / "target" / "manifest.parquet").to_pylist()
    assert {r["domain"] for r in source} == {"source"} and {r["domain"] for r in target} == {"target"}
    assert [r["split"] for r in source].count("val") == 2
    assert {(r["width"], r["height"]) for r in source} == {(64, 36)}
    splits = {r["split"] for r in target}
    assert splits == {"train", "val", "test"}          # official test (unlabelled) dropped
    assert all(r["label"] for r in target)
    val_cities = {r["sample_id"].split("_")[0] for r in target if r["split"] == "val"}
    train_cities = {r["sample_id"].split("_")[0] for r in target if r["split"] == "train"}
    assert val_cities and not val_cities & train_cities


# -- outputs never destroy what segshift did not write ------------------------------------------------

def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_prepare_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    params = write_params(tmp_path)
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "thesis.tex").write_text("\\chapter{Results}")
    assert main(["prepare", "--params", str(params), "--quiet"]) == 2
    err = _one_error_line(capsys)
    assert str(tmp_path / "prepared") in err and "thesis.tex" in err and "not a folder segshift wrote" in err
    assert (tmp_path / "prepared" / "thesis.tex").read_text() == "\\chapter{Results}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "prepared"]
    assert [p.name for p in (tmp_path / "prepared").iterdir()] == ["thesis.tex"]


def test_prepare_into_the_project_directory_is_refused(tmp_path, capsys, monkeypatch):
    params = write_params(tmp_path, {"prepare.out_dir": "."})
    monkeypatch.chdir(tmp_path)
    assert main(["prepare", "--params", str(params), "--quiet"]) == 2
    assert "is the current directory" in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]   # no temporary folder


HOLDER = """
import pathlib, sys, time
from segshift.components.io import atomic_directory
final, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
with atomic_directory(final, writer="first writer") as tmp:
    (tmp / "result.txt").write_text("complete")
    print("writing", flush=True)
    while not go.exists():
        time.sleep(0.02)
"""


def test_a_second_prepare_while_another_writes_the_folder_is_refused(tmp_path, capsys):
    import subprocess
    import sys
    params = write_params(tmp_path)
    go = tmp_path / "go"
    first = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "prepared"), str(go)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "writing"
        assert main(["prepare", "--params", str(params), "--quiet"]) == 2
        err = _one_error_line(capsys)
        assert (f"{tmp_path / 'prepared'} is being written by another segshift process (pid {first.pid}); "
                "wait for it or choose another output") in err
    finally:
        go.touch()
        first.communicate(timeout=60)
    assert first.returncode == 0
    assert (tmp_path / "prepared" / "result.txt").read_text() == "complete"   # the first one's output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["go", "params.yaml", "prepared"]


def test_prepare_replaces_its_own_output_from_before_the_marker(tmp_path):
    params = write_params(tmp_path)
    assert main(["prepare", "--params", str(params), "--quiet"]) == 0
    markers = sorted((tmp_path / "prepared").rglob(".segshift-output"))
    assert markers                                  # what 0.1.0 wrote is this, without the markers
    for marker in markers:
        marker.unlink()
    assert main(["prepare", "--params", str(params), "--quiet"]) == 0
    assert (tmp_path / "prepared" / ".segshift-output").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "prepared"]


def test_prepared_files_get_the_permissions_of_the_umask(tmp_path):
    import os
    import stat
    params = write_params(tmp_path)
    previous = os.umask(0o022)
    try:
        assert main(["prepare", "--params", str(params), "--quiet"]) == 0
    finally:
        os.umask(previous)
    out = tmp_path / "prepared"
    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    assert modes["."] == 0o755 and modes["source/images"] == 0o755
    assert modes["summary.json"] == 0o644 and modes["source/manifest.parquet"] == 0o644
    assert {mode for name, mode in modes.items() if name.endswith(".png")} == {0o644}


# -- native-resolution labels for the reported split (prepare.target.full_resolution_labels) -------

def _real_params(tmp_path: Path, **extra):
    write_gta5(tmp_path / "gta5", n=4, size=(96, 54))
    written = write_cityscapes(tmp_path / "cityscapes", per_city=2, size=(128, 64))
    params = write_params(tmp_path, {
        "prepare.source.kind": "gta5", "prepare.source.root": str(tmp_path / "gta5"),
        "prepare.source.resize": [64, 36],
        "prepare.target.kind": "cityscapes", "prepare.target.root": str(tmp_path / "cityscapes"),
        "prepare.target.resize": [64, 32], "prepare.target.val_fraction": 0.3, **extra})
    return params, {w.sample_id: w for w in written}


def test_full_resolution_labels_are_kept_for_the_test_split_only(tmp_path):
    import numpy as np
    from PIL import Image
    params, written = _real_params(tmp_path, **{"prepare.target.full_resolution_labels": True})
    assert main(["prepare", "--params", str(params), "--quiet"]) == 0
    out = tmp_path / "prepared"
    target = pq.read_table(out / "target" / "manifest.parquet").to_pylist()
    test = [r for r in target if r["split"] == "test"]
    assert len(test) == 2 and {r["sample_id"].split("_")[0] for r in test} == {"frankfurt"}  # Cityscapes val
    for row in test:
        full = np.asarray(Image.open(out / "target" / row["label_full"]))
        assert full.shape == (64, 128)                                  # native, the images are 64x32
        np.testing.assert_array_equal(full, written[row["sample_id"]].train_ids)
        assert np.asarray(Image.open(out / "target" / row["label"])).shape == (32, 64)
    assert all(r["label_full"] is None for r in target if r["split"] != "test")
    assert "label_full" not in pq.read_table(out / "source" / "manifest.parquet").column_names


def test_without_full_resolution_labels_the_manifests_are_as_before(tmp_path):
    from segshift.components.data.manifest import MANIFEST_SCHEMA
    params, _ = _real_params(tmp_path)
    assert main(["prepare", "--params", str(params), "--quiet"]) == 0
    for domain in ("source", "target"):
        assert pq.read_table(tmp_path / "prepared" / domain / "manifest.parquet").schema.names == MANIFEST_SCHEMA.names
    assert not list((tmp_path / "prepared").rglob("labels_full"))


def test_full_resolution_labels_only_for_a_real_target(tmp_path, capsys):
    params = write_params(tmp_path, {"prepare.target.full_resolution_labels": True})   # builtin target
    assert main(["prepare", "--params", str(params), "--quiet"]) == 2
    assert "full_resolution_labels must be false when kind is 'builtin'" in capsys.readouterr().err
    params, _ = _real_params(tmp_path, **{"prepare.source.full_resolution_labels": True})
    assert main(["prepare", "--params", str(params), "--quiet"]) == 2
    assert "source.full_resolution_labels must be false" in capsys.readouterr().err
    assert not (tmp_path / "prepared").exists()
