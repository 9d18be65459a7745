from pathlib import Path

import cv2
import numpy as np

from segshift.components.data.builtin import BuiltinSpec, write_builtin_domain
from segshift.components.data.manifest import MANIFEST_SCHEMA, read_manifest
from segshift.components.data.synthetic import source_style

SPEC = BuiltinSpec(seed=3, height=64, width=128, appearance_gap=1.0,
                   conditions=(("clear", 1.0), ("night", 1.0)))
COUNTS = {"source_train": 4, "source_val": 1, "target_train": 5, "target_val": 2, "target_test": 3}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_two_workers_write_the_same_bytes_as_one(tmp_path):
    write_builtin_domain(SPEC, COUNTS, "target", tmp_path / "one", workers=1, progress=False)
    write_builtin_domain(SPEC, COUNTS, "target", tmp_path / "two", workers=2, progress=False)
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert len(one) == 2 * 10 and one == two
    assert read_manifest(tmp_path / "one").equals(read_manifest(tmp_path / "two"))


def test_manifest_rows_point_at_real_files(tmp_path):
    records = write_builtin_domain(SPEC, COUNTS, "target", tmp_path, workers=1, progress=False)
    table = read_manifest(tmp_path)
    assert table.schema.names == MANIFEST_SCHEMA.names
    assert table.num_rows == len(records) == 10
    rows = table.to_pylist()
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    assert {r["condition"] for r in rows} <= {"clear", "night"}
    for row in rows:
        assert row["dataset"] == "builtin" and row["domain"] == "target"
        image = cv2.imread(str(tmp_path / row["image"]), cv2.IMREAD_UNCHANGED)
        label = cv2.imread(str(tmp_path / row["label"]), cv2.IMREAD_UNCHANGED)
        assert image.shape == (64, 128, 3) and label.shape == (64, 128) and label.dtype == np.uint8
        assert (row["height"], row["width"]) == (64, 128)


def test_source_rows_use_the_game_weather_mix_not_the_target_params(tmp_path):
    write_builtin_domain(SPEC, COUNTS, "source", tmp_path, workers=1, progress=False)
    rows = read_manifest(tmp_path).to_pylist()
    assert len(rows) == 5 and {r["split"] for r in rows} == {"train", "val"}
    assert {r["condition"] for r in rows} <= set(source_style().conditions)
    assert not {"fog", "rain"} & set(source_style().conditions)
