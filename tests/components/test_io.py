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
