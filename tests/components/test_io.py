import json
import os
import stat
import threading

import pytest

from segshift.components.io import (MARKER_NAME, OutputError, atomic_copy, atomic_directory,
                                   atomic_write_bytes, atomic_write_text)


def _segshift_output(final, files=("old.txt",)):
    """An output as segshift writes it (marker included)."""
    with atomic_directory(final) as tmp:
        for name in files:
            (tmp / name).write_text(name)
    return final


def _listing(directory):
    return sorted(p.name for p in directory.iterdir())


def _refused(final, match: str) -> str:
    """The one-line OutputError for `final`; the body must never run (the check is at entry)."""
    ran = []
    with pytest.raises(OutputError, match=match) as caught:
        with atomic_directory(final):
            ran.append(True)
    assert not ran
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_success_replaces_previous_output(tmp_path):
    final = _segshift_output(tmp_path / "out")
    with atomic_directory(final) as tmp:
        assert tmp.parent == tmp_path and tmp != final
        (tmp / "new.txt").write_text("new")
        assert (final / "old.txt").exists()      # still visible while writing
    assert _listing(final) == sorted([MARKER_NAME, "new.txt"])
    assert _listing(tmp_path) == ["out"]


@pytest.mark.parametrize("failure", [RuntimeError, KeyboardInterrupt])
def test_failure_keeps_previous_output_and_cleans_up(tmp_path, failure):
    final = _segshift_output(tmp_path / "out", ["keep.txt"])
    with pytest.raises(failure):
        with atomic_directory(final) as tmp:
            (tmp / "partial.txt").write_text("half")
            raise failure("boom")
    assert (final / "keep.txt").read_text() == "keep.txt"
    assert _listing(tmp_path) == ["out"]


def test_atomic_write_text_leaves_no_temporary_files(tmp_path):
    path = atomic_write_text(tmp_path / "sub" / "a.json", "{}")
    assert path.read_text() == "{}"
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]


# -- never replace what segshift did not write ----------------------------------------------------

def test_a_folder_segshift_did_not_write_is_refused_before_any_work(tmp_path):
    final = tmp_path / "thesis"
    final.mkdir()
    (final / "thesis.tex").write_text("\\chapter{Results}")
    message = _refused(final, "not a folder segshift wrote")
    assert str(final) in message and "thesis.tex" in message
    assert (final / "thesis.tex").read_text() == "\\chapter{Results}"
    assert _listing(tmp_path) == ["thesis"]          # no temporary folder, no lock file


def test_a_file_named_as_the_output_is_refused(tmp_path):
    final = tmp_path / "notes"
    final.write_text("my notes")
    assert str(final) in _refused(final, "is a file")
    assert final.read_text() == "my notes" and _listing(tmp_path) == ["notes"]


def test_a_file_added_to_a_segshift_output_is_refused(tmp_path):
    final = _segshift_output(tmp_path / "out")
    (final / "thesis.tex").write_text("mine")
    assert "thesis.tex" in _refused(final, "which segshift did not write")
    assert (final / "thesis.tex").read_text() == "mine" and (final / "old.txt").is_file()
    assert _listing(tmp_path) == ["out"]


def test_an_empty_folder_is_replaced_and_every_output_carries_the_marker(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    with atomic_directory(final, writer="segshift test") as tmp:
        (tmp / "a.txt").write_text("a")
    marker = json.loads((final / MARKER_NAME).read_text())
    assert marker == {"tool": "segshift", "format": 1, "writer": "segshift test", "entries": ["a.txt"]}


def test_companions_named_by_the_writer_go_with_the_output(tmp_path):
    final = _segshift_output(tmp_path / "out")
    (final / ".s3-index.json").write_text("{}")      # what push() adds to an S3 mirror
    _refused(final, r"holds \.s3-index\.json")
    with atomic_directory(final, companions=[".s3-index.json"]) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _listing(final) == sorted([MARKER_NAME, "new.txt"])


def test_the_project_and_the_current_directory_are_refused(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)
    (project / "params.yaml").write_text("prepare: {}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for cwd, final, match in ((project, ".", "is the current directory"),
                              (project, "..", "above the current directory"),
                              (elsewhere, project, "holds .git: it is a project")):
        monkeypatch.chdir(cwd)
        _refused(final, match)
    assert _listing(project) == [".git", "params.yaml"]
    assert _listing(tmp_path) == ["elsewhere", "project"]


# -- outputs of segshift 0.1.0, which had no marker -----------------------------------------------

def _legacy_prepared(final):
    """What `segshift prepare` of 0.1.0 wrote: two datasets and summary.json, no marker."""
    for domain in ("source", "target"):
        for kind in ("images", "labels"):
            (final / domain / kind / "train").mkdir(parents=True)
            (final / domain / kind / "train" / "a.png").write_bytes(b"png")
        (final / domain / "manifest.parquet").write_bytes(b"parquet")
    (final / "summary.json").write_text("{}")
    return final


def test_an_unmarked_output_of_segshift_0_1_0_is_replaced(tmp_path):
    legacy_ranking = tmp_path / "ranking"
    (legacy_ranking / "pseudo_labels").mkdir(parents=True)
    (legacy_ranking / "pseudo_labels" / "a.png").write_bytes(b"png")
    (legacy_ranking / "ranking.parquet").write_bytes(b"parquet")
    for final in (_legacy_prepared(tmp_path / "prepared"), legacy_ranking):
        with atomic_directory(final) as tmp:
            (tmp / "new.txt").write_text("new")
        assert _listing(final) == sorted([MARKER_NAME, "new.txt"])
    assert _listing(tmp_path) == ["prepared", "ranking"]


@pytest.mark.parametrize("stray", ["thesis.tex", "source/thesis.tex", "source/images/train/thesis.tex"])
def test_an_unmarked_output_holding_anything_else_is_refused(tmp_path, stray):
    final = _legacy_prepared(tmp_path / "prepared")
    (final / stray).write_text("mine")
    _refused(final, "not a folder segshift wrote")
    assert (final / stray).read_text() == "mine" and (final / "summary.json").is_file()


# -- one writer at a time -------------------------------------------------------------------------

def test_a_second_writer_is_refused_and_the_first_completes(tmp_path):
    final = tmp_path / "out"
    entered, release, failures = threading.Event(), threading.Event(), []

    def first_writer():
        try:
            with atomic_directory(final) as tmp:
                (tmp / "first.txt").write_text("complete")
                entered.set()
                release.wait(30)
        except BaseException as exc:   # noqa: BLE001 - reported by the main thread
            failures.append(exc)
            entered.set()

    thread = threading.Thread(target=first_writer)
    thread.start()
    try:
        assert entered.wait(30)
        message = _refused(final, r"is being written by another segshift process \(pid \d+\); wait for it "
                                  "or choose another output")
        assert str(final) in message and f"pid {os.getpid()}" in message
    finally:
        release.set()
        thread.join(30)
    assert not failures
    assert (final / "first.txt").read_text() == "complete"
    assert _listing(tmp_path) == ["out"]                  # the lock file goes with its writer


def test_a_lock_file_left_by_a_killed_writer_does_not_block(tmp_path):
    final = tmp_path / "out"
    (tmp_path / ".out.segshift-lock").write_text("999999\n")   # its holder died: nobody holds the lock
    with atomic_directory(final) as tmp:
        (tmp / "a.txt").write_text("a")
    assert _listing(tmp_path) == ["out"]


def test_what_a_killed_writer_left_is_cleared_and_its_previous_output_restored(tmp_path):
    final = _segshift_output(tmp_path / "out", ["keep.txt"])
    final.rename(tmp_path / f".out.old-{'1' * 16}")         # killed between the two renames
    (tmp_path / f".out.tmp-{'2' * 16}").mkdir()
    (tmp_path / f".out.tmp-{'2' * 16}" / "half.png").write_bytes(b"x")
    (tmp_path / ".out.tmp-mine").mkdir()                    # not a name segshift makes: left alone
    with pytest.raises(RuntimeError):
        with atomic_directory(final):
            raise RuntimeError("boom")
    assert (final / "keep.txt").read_text() == "keep.txt"
    assert _listing(tmp_path) == [".out.tmp-mine", "out"]


def test_a_file_system_without_locks_writes_with_a_warning(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="the file system has no locks"):
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "a.txt").write_text("a")
    assert (tmp_path / "out" / "a.txt").is_file() and _listing(tmp_path) == ["out"]


# -- failures during the swap ---------------------------------------------------------------------

@pytest.mark.parametrize("failure", [OSError, KeyboardInterrupt])
def test_a_failure_during_the_swap_restores_the_previous_output_and_leaves_no_temporary(tmp_path, monkeypatch,
                                                                                          failure):
    final = _segshift_output(tmp_path / "out", ["keep.txt"])
    real_rename, real_replace = os.rename, os.replace

    def failing(real):
        def move(src, dst, *args, **kwargs):
            if ".tmp-" in os.fspath(src) and os.fspath(dst) == os.fspath(final):
                raise failure("interrupted while swapping")
            return real(src, dst, *args, **kwargs)
        return move

    monkeypatch.setattr(os, "rename", failing(real_rename))
    monkeypatch.setattr(os, "replace", failing(real_replace))
    with pytest.raises(failure):
        with atomic_directory(final) as tmp:
            (tmp / "new.txt").write_text("new")
    monkeypatch.undo()
    assert (final / "keep.txt").read_text() == "keep.txt"
    assert _listing(tmp_path) == ["out"]


# -- permissions ------------------------------------------------------------------------------------

def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_outputs_get_the_permissions_of_the_umask(tmp_path):
    for umask, folder, file in ((0o022, 0o755, 0o644), (0o077, 0o700, 0o600)):
        previous = os.umask(umask)
        try:
            final = tmp_path / f"out-{umask:o}"
            with atomic_directory(final) as tmp:
                atomic_write_bytes(tmp / "sub" / "a.bin", b"a")
            alone = atomic_write_text(tmp_path / f"alone-{umask:o}.json", "{}")
            copied = atomic_copy(alone, tmp_path / f"copy-{umask:o}.json")
        finally:
            os.umask(previous)
        assert _mode(final) == folder and _mode(final / "sub") == folder
        assert _mode(final / "sub" / "a.bin") == file and _mode(final / MARKER_NAME) == file
        assert _mode(alone) == file and _mode(copied) == file


def test_atomic_copy_keeps_content_and_times_and_leaves_no_temporary(tmp_path):
    src = tmp_path / "model.pt"
    src.write_bytes(b"weights" * 1000)
    os.utime(src, ns=(1_000_000_000, 2_000_000_000))
    dst = atomic_copy(src, tmp_path / "runs" / "model.pt")
    assert dst.read_bytes() == src.read_bytes()
    assert dst.stat().st_mtime_ns == 2_000_000_000
    assert _listing(dst.parent) == ["model.pt"]


def test_write_png_round_trips_rgb_and_labels_and_is_deterministic(tmp_path):
    import cv2
    import numpy as np

    from segshift.components.io import write_png
    rgb = np.random.default_rng(0).integers(0, 255, (8, 12, 3), dtype=np.uint8)
    label = np.full((8, 12), 255, np.uint8)
    write_png(tmp_path / "a.png", rgb)
    write_png(tmp_path / "b.png", rgb)
    write_png(tmp_path / "l.png", label)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert np.array_equal(cv2.cvtColor(cv2.imread(str(tmp_path / "a.png")), cv2.COLOR_BGR2RGB), rgb)
    assert np.array_equal(cv2.imread(str(tmp_path / "l.png"), cv2.IMREAD_UNCHANGED), label)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "l.png"]


def test_strict_json_writes_nan_and_inf_as_null_at_any_depth():
    import json
    import math

    from segshift.components.io import strict_json
    text = strict_json({"a": math.nan, "b": [1.0, math.inf, (2, -math.inf)], "c": {"d": 0.5}})
    assert json.loads(text) == {"a": None, "b": [1.0, None, [2, None]], "c": {"d": 0.5}}
