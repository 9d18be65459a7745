"""Discovery, decoding, validation and conversion of the original GTA5 / Cityscapes / SYNTHIA formats."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from segshift.components.data.formats import (
    NON_STRICT_HINT,
    STANDARD_SIZES,
    IngestError,
    Problem,
    RawSample,
    check_same_size,
    convert_sample,
    decode_image,
    decode_label_ids,
    discover_samples,
    encode_image_png,
    encode_label_png,
    label_to_train_ids,
    pair_files,
    problems_error,
    resize_image,
    resize_label,
)
from segshift.components.data.manifest import SampleRecord, SkippedSample
from segshift.components.data.storage import LocalRoot
from segshift.components.data.rawformats import (
    truncate_file,
    write_cityscapes,
    write_gta5,
    write_gta5_label,
    write_synthia_label,
)


def _png(rgb: np.ndarray) -> bytes:
    return encode_image_png(rgb)


# --- discovery -------------------------------------------------------------------------------


def test_standard_sizes_are_the_reference_training_sizes():
    assert STANDARD_SIZES == {"gta5": (1280, 720), "cityscapes": (1024, 512), "synthia": (1280, 760)}


def test_gta5_pairs_images_with_labels_and_reports_unlabelled_images():
    files = ["images/00002.png", "images/00001.png", "labels/00001.png", "labels/00002.png",
             "images/00003.png", "labels/00009.png", "README.txt", "images/notes.txt"]
    discovery = pair_files("gta5", files)
    assert [s.sample_id for s in discovery.samples] == ["gta5_00001", "gta5_00002"]
    first = discovery.samples[0]
    assert (first.image, first.label, first.split, first.domain) == (
        "images/00001.png", "labels/00001.png", "train", "source")
    assert discovery.problems == [Problem("images/00003.png", "no label file (expected labels/00003.png)")]


def test_synthia_pairs_rgb_with_gt_labels_and_ignores_colour_labels():
    files = ["RGB/0000000.png", "GT/LABELS/0000000.png", "GT/COLOR/0000000.png",
             "RGB/0000001.png", "GT/COLOR/0000001.png"]
    discovery = pair_files("synthia", files)
    assert [(s.sample_id, s.label, s.label_encoding) for s in discovery.samples] == [
        ("synthia_0000000", "GT/LABELS/0000000.png", "synthia_ids")]
    assert [p.file for p in discovery.problems] == ["RGB/0000001.png"]


def test_cityscapes_prefers_label_ids_falls_back_to_train_ids_and_leaves_test_unlabelled():
    stem = "aachen_000000_000019"
    files = [
        f"leftImg8bit/train/aachen/{stem}_leftImg8bit.png",
        f"gtFine/train/aachen/{stem}_gtFine_labelIds.png",
        f"gtFine/train/aachen/{stem}_gtFine_labelTrainIds.png",
        f"gtFine/train/aachen/{stem}_gtFine_instanceIds.png",
        f"gtFine/train/aachen/{stem}_gtFine_color.png",
        "leftImg8bit/val/lindau/lindau_000001_000019_leftImg8bit.png",
        "gtFine/val/lindau/lindau_000001_000019_gtFine_labelTrainIds.png",
        "leftImg8bit/test/berlin/berlin_000000_000019_leftImg8bit.png",
        "gtFine/test/berlin/berlin_000000_000019_gtFine_labelIds.png",
        "leftImg8bit/train/bremen/bremen_000000_000019_leftImg8bit.png",
        "leftImg8bit/train_extra/erlangen/erlangen_000000_000019_leftImg8bit.png",
    ]
    discovery = pair_files("cityscapes", files)
    by_id = {s.sample_id: s for s in discovery.samples}
    assert sorted(by_id) == ["aachen_000000_000019", "berlin_000000_000019", "lindau_000001_000019"]
    assert by_id[stem].label_encoding == "cityscapes_ids"
    assert by_id[stem].label.endswith("_gtFine_labelIds.png")
    assert by_id["lindau_000001_000019"].label_encoding == "cityscapes_train_ids"
    assert by_id["lindau_000001_000019"].split == "val"
    assert by_id["berlin_000000_000019"].label is None
    assert by_id["berlin_000000_000019"].split == "test"
    assert {s.domain for s in discovery.samples} == {"target"}
    assert [p.file for p in discovery.problems] == [
        "leftImg8bit/train/bremen/bremen_000000_000019_leftImg8bit.png"]
    assert "no gtFine label" in discovery.problems[0].reason


def test_unknown_kind_is_rejected():
    with pytest.raises(IngestError, match="unknown dataset kind 'kitti'"):
        pair_files("kitti", [])


def test_empty_root_is_an_error(tmp_path: Path):
    with pytest.raises(IngestError, match="dataset root is empty"):
        discover_samples("gta5", LocalRoot(str(tmp_path)))


def test_root_in_the_wrong_layout_names_the_expected_layout_and_what_was_found(tmp_path: Path):
    write_gta5(tmp_path / "GTA5", n=1)
    with pytest.raises(IngestError) as caught:
        discover_samples("gta5", LocalRoot(str(tmp_path)))
    message = str(caught.value)
    assert "no gta5 images found" in message
    assert "images/NNNNN.png" in message
    assert "GTA5/" in message


def test_problems_error_lists_ten_files_the_total_and_the_hint():
    root = LocalRoot("/data/gta5")
    problems = [Problem(f"images/{i:05d}.png", "no label file") for i in range(13)]
    message = str(problems_error("gta5", root, problems))
    assert message.startswith("13 gta5 image(s) under /data/gta5 cannot be paired")
    assert "/data/gta5/images/00009.png: no label file" in message
    assert "00010.png" not in message
    assert "... and 3 more" in message
    assert NON_STRICT_HINT in message


# --- decoding and validation ------------------------------------------------------------------


def test_decode_image_returns_rgb_order():
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0] = 200  # red
    decoded = decode_image(_png(rgb), "x.png")
    assert decoded.shape == (4, 6, 3)
    assert decoded[0, 0].tolist() == [200, 0, 0]


def test_truncated_image_is_an_error_naming_the_file(tmp_path: Path):
    path = tmp_path / "00001.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (36, 64, 3), dtype=np.uint8)).save(path)
    truncate_file(path)
    with pytest.raises(IngestError, match=r"images/00001\.png: cannot decode image \(corrupt or truncated"):
        decode_image(path.read_bytes(), "images/00001.png")
    with pytest.raises(IngestError, match="empty file"):
        decode_image(b"", "images/00001.png")


def test_gta5_label_decodes_palette_indices_not_colours(tmp_path: Path):
    ids = np.array([[7, 26, 0], [33, 11, 4]], np.uint8)
    path = write_gta5_label(tmp_path / "labels" / "00001.png", ids)
    with Image.open(path) as image:
        assert image.mode == "P"
    decoded = decode_label_ids(path.read_bytes(), "cityscapes_ids", "labels/00001.png")
    np.testing.assert_array_equal(decoded, ids)


def test_truncated_label_is_an_error_naming_the_file(tmp_path: Path):
    ids = np.random.default_rng(1).integers(0, 34, (36, 64), dtype=np.uint8)
    path = truncate_file(write_gta5_label(tmp_path / "00001.png", ids))
    with pytest.raises(IngestError, match=r"labels/00001\.png: cannot decode label"):
        decode_label_ids(path.read_bytes(), "cityscapes_ids", "labels/00001.png")


def test_colour_label_is_rejected_with_its_mode():
    colour = _png(np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(IngestError, match="got mode RGB"):
        decode_label_ids(colour, "cityscapes_ids", "labels/00001.png")


def test_synthia_label_takes_the_r_channel_of_a_16_bit_png(tmp_path: Path):
    ids = np.array([[3, 10, 0], [22, 8, 1]], np.uint16)
    path = write_synthia_label(tmp_path / "0000000.png", ids)
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16 and raw.shape == (2, 3, 3)
    assert (raw[:, :, 0] != ids).any()  # the other channels carry junk
    np.testing.assert_array_equal(decode_label_ids(path.read_bytes(), "synthia_ids", "x"), ids)


@pytest.mark.parametrize("raw_id, train_id", [(7, 0), (26, 13), (0, 255), (8, 1), (33, 18), (4, 255)])
def test_cityscapes_label_id_mapping(raw_id: int, train_id: int):
    ids = np.full((2, 2), raw_id, np.uint8)
    assert label_to_train_ids(ids, "cityscapes_ids", "x").tolist() == [[train_id] * 2] * 2


@pytest.mark.parametrize("raw_id, train_id", [(3, 0), (10, 11), (1, 10), (0, 255), (13, 255), (22, 255)])
def test_synthia_id_mapping(raw_id: int, train_id: int):
    ids = np.full((2, 2), raw_id, np.uint16)
    mapped = label_to_train_ids(ids, "synthia_ids", "x")
    assert mapped.dtype == np.uint8
    assert mapped.tolist() == [[train_id] * 2] * 2


def test_train_ids_pass_through_including_all_ignore():
    ids = np.array([[0, 18, 255], [5, 13, 255]], np.uint8)
    np.testing.assert_array_equal(label_to_train_ids(ids, "cityscapes_train_ids", "x"), ids)
    all_ignore = np.full((3, 3), 255, np.uint8)
    np.testing.assert_array_equal(label_to_train_ids(all_ignore, "cityscapes_train_ids", "x"), all_ignore)


@pytest.mark.parametrize("encoding, bad, expected", [
    ("cityscapes_ids", 200,
     r"labels/x\.png: label id\(s\) \[200\] outside the Cityscapes label-id table \(0\.\.33\)"),
    ("synthia_ids", 40, r"label id\(s\) \[40\] outside the SYNTHIA table \(0\.\.22\)"),
    # 259 = 256 + 3 would alias road if it were cast to 8 bits before the check.
    ("synthia_ids", 259, r"label id\(s\) \[259\] outside the SYNTHIA table"),
    ("cityscapes_train_ids", 50, r"train id\(s\) \[50\] are neither a class \(0\.\.18\) nor ignore"),
])
def test_ids_outside_the_table_are_errors(encoding: str, bad: int, expected: str):
    ids = np.array([[7, 3], [bad, 0]], np.uint16 if bad > 255 else np.uint8)
    with pytest.raises(IngestError, match=expected):
        label_to_train_ids(ids, encoding, "labels/x.png")


def test_size_mismatch_names_both_sizes():
    with pytest.raises(IngestError, match=r"labels/1\.png: label size 1914x1050 differs from image size "
                                          r"1914x1052 \(images/1\.png\)"):
        check_same_size(np.zeros((1052, 1914, 3)), np.zeros((1050, 1914)), "images/1.png", "labels/1.png")


# --- resize and encode ------------------------------------------------------------------------


def test_resize_gives_the_requested_width_and_height():
    image = np.random.default_rng(0).integers(0, 255, (36, 64, 3), dtype=np.uint8)
    label = np.random.default_rng(1).choice(np.array([0, 13, 255], np.uint8), (36, 64))
    assert resize_image(image, (32, 18)).shape == (18, 32, 3)
    assert resize_image(image, (128, 72)).shape == (72, 128, 3)
    assert resize_image(image, None) is image
    small = resize_label(label, (32, 18))
    assert small.shape == (18, 32)
    # Nearest neighbour never invents ids by blending.
    assert set(np.unique(resize_label(label, (100, 50))).tolist()) <= {0, 13, 255}


def test_png_encoders_round_trip():
    image = np.random.default_rng(0).integers(0, 255, (9, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(encode_image_png(image), "x"), image)
    label = np.array([[0, 18], [255, 7]], np.uint8)
    decoded = cv2.imdecode(np.frombuffer(encode_label_png(label), np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded.dtype == np.uint8 and decoded.ndim == 2
    np.testing.assert_array_equal(decoded, label)


# --- one sample -------------------------------------------------------------------------------


def _gta5_sample(stem: str) -> RawSample:
    return RawSample(f"gta5_{stem}", "gta5", "train", f"images/{stem}.png", f"labels/{stem}.png",
                     "cityscapes_ids")


def test_convert_sample_writes_image_label_and_returns_its_record(tmp_path: Path):
    written = write_gta5(tmp_path / "raw", n=1)[0]
    out = tmp_path / "out"
    record = convert_sample(_gta5_sample("00001"), root=LocalRoot(str(tmp_path / "raw")), out_dir=str(out),
                            size=(32, 18), strict=True, max_pixels=10**8)
    assert record == SampleRecord("gta5_00001", "gta5", "source", "train", "images/train/gta5_00001.png",
                                  "labels/train/gta5_00001.png", 18, 32)
    label = np.asarray(Image.open(out / record.label))
    assert label.shape == (18, 32) and label.dtype == np.uint8
    assert set(np.unique(label).tolist()) <= set(np.unique(written.train_ids).tolist())


def test_convert_sample_raises_when_strict_and_skips_otherwise(tmp_path: Path):
    raw = tmp_path / "raw"
    write_gta5(raw, n=1)
    truncate_file(raw / "images" / "00001.png")
    root = LocalRoot(str(raw))
    with pytest.raises(IngestError, match=r"images/00001\.png: cannot decode image"):
        convert_sample(_gta5_sample("00001"), root=root, out_dir=str(tmp_path / "out"), size=None, strict=True,
                       max_pixels=10**8)
    skipped = convert_sample(_gta5_sample("00001"), root=root, out_dir=str(tmp_path / "out"), size=None,
                             strict=False, max_pixels=10**8)
    assert isinstance(skipped, SkippedSample)
    assert skipped.file == str(raw / "images" / "00001.png")
    assert "cannot decode image" in skipped.reason
    assert not (tmp_path / "out").exists()


def test_cityscapes_fixture_discovers_all_splits(tmp_path: Path):
    written = write_cityscapes(tmp_path, per_city=2)
    discovery = discover_samples("cityscapes", LocalRoot(str(tmp_path)))
    assert discovery.problems == []
    assert sorted(s.sample_id for s in discovery.samples) == sorted(w.sample_id for w in written)
    encodings = {s.sample_id.split("_")[0]: s.label_encoding for s in discovery.samples}
    assert encodings == {"aachen": "cityscapes_ids", "bochum": "cityscapes_train_ids",
                         "frankfurt": "cityscapes_ids", "berlin": None}


# --- native-resolution labels (scoring at full resolution, as ADVENT's eval_UDA.py) -------------


def _cityscapes_val_sample(tmp_path: Path) -> tuple[RawSample, object]:
    written = [w for w in write_cityscapes(tmp_path / "raw", per_city=1, size=(128, 64)) if w.split == "val"][0]
    sample = [s for s in discover_samples("cityscapes", LocalRoot(str(tmp_path / "raw"))).samples
              if s.sample_id == written.sample_id][0]
    return sample, written


def test_convert_sample_keeps_the_native_label_of_a_requested_split(tmp_path: Path):
    sample, written = _cityscapes_val_sample(tmp_path)
    out = tmp_path / "out"
    record = convert_sample(sample, root=LocalRoot(str(tmp_path / "raw")), out_dir=str(out), size=(64, 32),
                            strict=True, max_pixels=10**8, full_label_splits=frozenset({"val"}))
    assert record.label == f"labels/val/{sample.sample_id}.png"
    assert record.label_full == f"labels_full/val/{sample.sample_id}.png"
    full = np.asarray(Image.open(out / record.label_full))
    assert full.dtype == np.uint8 and full.shape == (64, 128)
    np.testing.assert_array_equal(full, written.train_ids)          # bit-identical to the mapped raw label
    resized = np.asarray(Image.open(out / record.label))
    np.testing.assert_array_equal(resized, resize_label(written.train_ids, (64, 32)))   # as before


def test_convert_sample_keeps_no_native_label_when_not_asked_or_not_resized(tmp_path: Path):
    sample, _ = _cityscapes_val_sample(tmp_path)
    root = LocalRoot(str(tmp_path / "raw"))
    for size, splits in (((64, 32), frozenset()), ((64, 32), frozenset({"train"})),
                         (None, frozenset({"val"})), ((128, 64), frozenset({"val"}))):
        out = tmp_path / f"out-{size}-{sorted(splits)}"
        record = convert_sample(sample, root=root, out_dir=str(out), size=size, strict=True, max_pixels=10**8,
                                full_label_splits=splits)
        assert record.label_full is None and not (out / "labels_full").exists()
