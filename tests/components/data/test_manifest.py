"""A prepared manifest from a remote or a colleague names the files to read: none may lie outside."""
from pathlib import Path

import pytest

from segshift.components.data.manifest import ManifestError, SampleRecord, read_manifest, write_manifest
from segshift.components.paths import UnsafePathError, checked_id, confined


def manifest_with(tmp_path: Path, **fields) -> Path:
    record = dict(sample_id="s1", dataset="x", domain="target", split="train", image="images/train/s1.png",
                  label="labels/train/s1.png", height=4, width=4)
    write_manifest([SampleRecord(**{**record, **fields})], tmp_path)
    return tmp_path


@pytest.mark.parametrize("field, value", [
    ("image", "../../../home/user/photo.png"), ("label", "/etc/passwd"), ("sample_id", "../requests/x"),
    ("image", "images\\..\\..\\x.png"), ("sample_id", "a//b"),
])
def test_a_manifest_naming_a_file_outside_its_folder_is_refused(tmp_path, field, value):
    with pytest.raises(ManifestError, match=f"manifest.parquet: {field} .*(leaves its folder|relative path)"):
        read_manifest(manifest_with(tmp_path, **{field: value}))


def test_city_folders_in_sample_ids_are_fine(tmp_path):
    table = read_manifest(manifest_with(tmp_path, sample_id="aachen/aachen_000000_000019"))
    assert table.column("sample_id").to_pylist() == ["aachen/aachen_000000_000019"]
    assert checked_id("aachen/aachen_000000_000019") == "aachen/aachen_000000_000019"


def test_a_symlink_inside_the_root_may_not_lead_out_of_it(tmp_path):
    root, outside = tmp_path / "annotations", tmp_path / "elsewhere"
    root.mkdir(), outside.mkdir()
    (root / "labels").symlink_to(outside)
    with pytest.raises(UnsafePathError, match="a symbolic link under .* leads outside it"):
        confined(root, "labels/x.png", "label file")
    (root / "inside").mkdir()
    (root / "alias").symlink_to(root / "inside")
    assert confined(root, "alias/x.png", "label file") == root / "alias" / "x.png"


def test_an_error_never_echoes_a_huge_or_control_character_value(tmp_path):
    with pytest.raises(UnsafePathError) as error:
        checked_id("../" + "x" * 100_000 + "\x1b[2J")
    assert len(str(error.value)) < 400 and "\x1b" not in str(error.value)
