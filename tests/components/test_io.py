import pytest

from segshift.components.io import atomic_directory, atomic_write_text


def test_success_replaces_previous_output(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_directory(final) as tmp:
        assert tmp.parent == tmp_path and tmp != final
        (tmp / "new.txt").write_text("new")
        assert (final / "old.txt").exists()      # still visible while writing
    assert [p.name for p in final.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failure_keeps_previous_output_and_cleans_up(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "keep.txt").write_text("precious")
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as tmp:
            (tmp / "partial.txt").write_text("half")
            raise RuntimeError("boom")
    assert (final / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_write_text_leaves_no_temporary_files(tmp_path):
    path = atomic_write_text(tmp_path / "sub" / "a.json", "{}")
    assert path.read_text() == "{}"
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]
