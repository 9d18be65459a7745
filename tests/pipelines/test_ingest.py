"""`segshift ingest`: GTA5, Cityscapes and SYNTHIA, local and on S3, good and bad input."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from segshift.components.data.formats import NON_STRICT_HINT, IngestError
from segshift.components.data.manifest import MANIFEST_SCHEMA, ManifestError, read_manifest
from segshift.components.data.storage import StorageError
from segshift.pipelines.ingest import (
    DEFAULT_MAX_IMAGE_PIXELS,
    build_ingest_parser,
    ingest,
    resolve_size,
    run_ingest_command,
)
from segshift.components.data.rawformats import (
    WrittenSample,
    render_rgb,
    truncate_file,
    write_cityscapes,
    write_cityscapes_frame,
    write_gta5,
    write_gta5_frame,
    write_synthia,
    write_synthia_frame,
)
from tests.fixtures.s3 import S3Endpoint, moto_endpoint, s3, use_credentials  # noqa: F401


def _run(kind: str, root: Path | str, out: Path, resize: tuple[int, int] | None = None, strict: bool = True,
         workers: int = 1, **kwargs):
    kwargs.setdefault("max_pixels", DEFAULT_MAX_IMAGE_PIXELS)
    return ingest(kind, str(root), out, resize=resize, strict=strict, workers=workers, progress=False, **kwargs)


def _manifest_rows(out: Path) -> list[dict]:
    return read_manifest(out).to_pylist()


def _png_array(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _check_labels(out: Path, written: list[WrittenSample]) -> None:
    rows = {row["sample_id"]: row for row in _manifest_rows(out)}
    for sample in written:
        row = rows[sample.sample_id]
        if sample.train_ids is None:
            assert row["label"] is None
            continue
        label = _png_array(out / row["label"])
        assert label.dtype == np.uint8 and label.ndim == 2
        np.testing.assert_array_equal(label, sample.train_ids)


# --- good input -------------------------------------------------------------------------------


def test_gta5_native_size_gives_exact_train_ids_pixels_and_manifest(tmp_path: Path):
    written = write_gta5(tmp_path / "raw", n=3)
    out = tmp_path / "out"
    report = _run("gta5", tmp_path / "raw", out)
    assert (report.counts, report.skipped, report.out_dir) == ({"train": 3}, 0, out)
    assert "ingested 3 gta5 samples (train 3)" in report.summary()
    table = read_manifest(out)
    assert table.schema.equals(MANIFEST_SCHEMA)
    assert table.to_pylist()[0] == {
        "sample_id": "gta5_00001", "dataset": "gta5", "domain": "source", "split": "train",
        "image": "images/train/gta5_00001.png", "label": "labels/train/gta5_00001.png",
        "height": 36, "width": 64, "condition": None}
    _check_labels(out, written)
    for sample in written:
        np.testing.assert_array_equal(_png_array(out / "images" / "train" / f"{sample.sample_id}.png"),
                                      _png_array(sample.image))
    assert not (out / "skipped.csv").exists()


def test_gta5_known_ids_map_to_the_right_train_ids(tmp_path: Path):
    ids = np.array([[7, 26, 0, 8], [24, 33, 11, 4]], np.uint8)
    write_gta5_frame(tmp_path / "raw", "00001", render_rgb(np.random.default_rng(0), ids), ids)
    _run("gta5", tmp_path / "raw", tmp_path / "out")
    label = _png_array(tmp_path / "out" / "labels" / "train" / "gta5_00001.png")
    assert label.tolist() == [[0, 13, 255, 1], [11, 18, 2, 255]]


def test_synthia_ids_map_from_the_r_channel(tmp_path: Path):
    written = write_synthia(tmp_path / "raw", n=2)
    ids = np.array([[3, 10, 0], [1, 8, 22]], np.uint16)
    write_synthia_frame(tmp_path / "raw", "0000099", render_rgb(np.random.default_rng(0), ids), ids)
    out = tmp_path / "out"
    report = _run("synthia", tmp_path / "raw", out)
    assert report.counts == {"train": 3}
    _check_labels(out, written)
    label = _png_array(out / "labels" / "train" / "synthia_0000099.png")
    assert label.tolist() == [[0, 11, 255], [10, 13, 255]]
    assert {row["domain"] for row in _manifest_rows(out)} == {"source"}


def test_cityscapes_keeps_splits_maps_label_ids_passes_train_ids_and_leaves_test_unlabelled(tmp_path: Path):
    written = write_cityscapes(tmp_path / "raw", per_city=2)
    out = tmp_path / "out"
    report = _run("cityscapes", tmp_path / "raw", out)
    assert report.counts == {"train": 4, "val": 2, "test": 2}
    rows = _manifest_rows(out)
    assert {row["domain"] for row in rows} == {"target"}
    test_rows = [row for row in rows if row["split"] == "test"]
    assert [row["label"] for row in test_rows] == [None, None]
    assert not (out / "labels" / "test").exists()
    assert (out / "images" / "test" / "berlin_000000_000019.png").is_file()
    assert any(row["sample_id"] == "bochum_000000_000019" for row in rows)  # labelTrainIds only
    _check_labels(out, written)
    assert sorted(p.name for p in (out / "labels" / "val").iterdir()) == [
        "frankfurt_000000_000019.png", "frankfurt_000000_000020.png"]


def test_resize_sets_image_label_and_manifest_sizes(tmp_path: Path):
    write_gta5(tmp_path / "raw", n=2, size=(64, 36))
    out = tmp_path / "out"
    _run("gta5", tmp_path / "raw", out, resize=(32, 18))
    for row in _manifest_rows(out):
        assert (row["width"], row["height"]) == (32, 18)
        assert _png_array(out / row["image"]).shape == (18, 32, 3)
        label = _png_array(out / row["label"])
        assert label.shape == (18, 32)
        assert set(np.unique(label).tolist()) <= set(range(19)) | {255}
    _run("gta5", tmp_path / "raw", out, resize=(128, 72))
    assert _png_array(out / "images" / "train" / "gta5_00001.png").shape == (72, 128, 3)


def test_label_with_only_ignore_pixels_is_fine(tmp_path: Path):
    ids = np.zeros((36, 64), np.uint8)  # unlabelled everywhere -> 255
    write_gta5_frame(tmp_path / "raw", "00001", render_rgb(np.random.default_rng(0), ids), ids)
    _run("gta5", tmp_path / "raw", tmp_path / "out")
    assert (_png_array(tmp_path / "out" / "labels" / "train" / "gta5_00001.png") == 255).all()


def test_two_workers_give_byte_identical_output(tmp_path: Path):
    write_gta5(tmp_path / "raw", n=6)
    _run("gta5", tmp_path / "raw", tmp_path / "one", resize=(32, 18), workers=1)
    _run("gta5", tmp_path / "raw", tmp_path / "two", resize=(32, 18), workers=2)
    assert _snapshot(tmp_path / "one") == _snapshot(tmp_path / "two")


# --- bad input, strict and not ----------------------------------------------------------------


def _assert_intact(out: Path, before: dict[str, bytes]) -> None:
    assert _snapshot(out) == before
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []


@pytest.fixture
def previous_out(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """An OUT directory from an earlier good run, to check that a failed run leaves it alone."""
    write_gta5(tmp_path / "good", n=2)
    out = tmp_path / "out"
    _run("gta5", tmp_path / "good", out)
    return out, _snapshot(out)


def test_truncated_image_strict_fails_naming_it_and_keeps_previous_output(tmp_path: Path, previous_out):
    out, before = previous_out
    write_gta5(tmp_path / "raw", n=3)
    bad = truncate_file(tmp_path / "raw" / "images" / "00002.png")
    with pytest.raises(IngestError, match=rf"{bad}: cannot decode image \(corrupt or truncated"):
        _run("gta5", tmp_path / "raw", out)
    _assert_intact(out, before)


def test_truncated_image_non_strict_is_skipped_and_listed(tmp_path: Path):
    write_gta5(tmp_path / "raw", n=3)
    bad = truncate_file(tmp_path / "raw" / "images" / "00002.png")
    out = tmp_path / "out"
    report = _run("gta5", tmp_path / "raw", out, strict=False)
    assert (report.counts, report.skipped) == ({"train": 2}, 1)
    assert [row["sample_id"] for row in _manifest_rows(out)] == ["gta5_00001", "gta5_00003"]
    assert not (out / "images" / "train" / "gta5_00002.png").exists()
    skipped = pacsv.read_csv(out / "skipped.csv").to_pylist()
    assert [row["file"] for row in skipped] == [str(bad)]
    assert "cannot decode image" in skipped[0]["reason"]
    assert "skipped 1" in report.summary()


def _bad_ids(kind: str, root: Path) -> tuple[Path, str]:
    """Write one good and one bad frame of `kind`; the bad label's path and the expected message."""
    rng = np.random.default_rng(0)
    if kind == "gta5":
        write_gta5(root, n=1)
        ids = np.full((36, 64), 7, np.uint8)
        ids[3, 3] = 200
        written = write_gta5_frame(root, "00002", render_rgb(rng, ids), ids)
        return written.label, r"label id\(s\) \[200\] outside the Cityscapes label-id table"
    if kind == "synthia":
        write_synthia(root, n=1)
        ids = np.full((38, 64), 3, np.uint16)
        ids[0, 0] = 40
        written = write_synthia_frame(root, "0000002", render_rgb(rng, ids), ids)
        return written.label, r"label id\(s\) \[40\] outside the SYNTHIA table"
    write_cityscapes(root, per_city=1, cities={"train": ("aachen",)})
    train_ids = np.full((32, 64), 0, np.uint8)
    train_ids[1, 1] = 50
    written = write_cityscapes_frame(root, "train", "bochum", 0, 19, render_rgb(rng, train_ids), None)
    label = root / "gtFine" / "train" / "bochum" / "bochum_000000_000019_gtFine_labelTrainIds.png"
    label.parent.mkdir(parents=True)
    Image.fromarray(train_ids).save(label)
    return label, r"train id\(s\) \[50\] are neither a class"


@pytest.mark.parametrize("kind", ["gta5", "synthia", "cityscapes"])
def test_label_ids_outside_the_table(tmp_path: Path, kind: str, previous_out):
    out, before = previous_out
    label, message = _bad_ids(kind, tmp_path / "raw")
    with pytest.raises(IngestError, match=rf"{label}: {message}"):
        _run(kind, tmp_path / "raw", out)
    _assert_intact(out, before)

    report = _run(kind, tmp_path / "raw", tmp_path / "lenient", strict=False)
    assert (sum(report.counts.values()), report.skipped) == (1, 1)
    reason = pacsv.read_csv(tmp_path / "lenient" / "skipped.csv").to_pylist()[0]["reason"]
    assert str(label) in reason


def _unlabelled_images(kind: str, root: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    rgb = render_rgb(rng, np.zeros((8, 8), np.uint8))
    for i in range(count):
        if kind == "gta5":
            write_gta5_frame(root, f"{90000 + i:05d}", rgb, None)
        elif kind == "synthia":
            write_synthia_frame(root, f"{9000000 + i:07d}", rgb, None)
        else:
            write_cityscapes_frame(root, "val", "lindau", 0, i, rgb, None)


@pytest.mark.parametrize("kind", ["gta5", "synthia", "cityscapes"])
def test_images_without_labels_strict_lists_them_with_count_and_hint(tmp_path: Path, kind: str, previous_out):
    out, before = previous_out
    root = tmp_path / "raw"
    {"gta5": write_gta5, "synthia": write_synthia, "cityscapes": write_cityscapes}[kind](root, 1)
    _unlabelled_images(kind, root, 12)
    with pytest.raises(IngestError) as caught:
        _run(kind, root, out)
    message = str(caught.value)
    assert message.startswith(f"12 {kind} image(s) under {root} cannot be paired with a label")
    assert message.count(str(root)) == 11  # the root, then ten files
    assert "... and 2 more" in message
    assert NON_STRICT_HINT in message
    _assert_intact(out, before)


def test_images_without_labels_non_strict_are_skipped(tmp_path: Path):
    root = tmp_path / "raw"
    write_cityscapes(root, per_city=1)
    _unlabelled_images("cityscapes", root, 2)
    report = _run("cityscapes", root, tmp_path / "out", strict=False)
    assert report.skipped == 2
    assert report.counts == {"train": 2, "val": 1, "test": 1}
    skipped = pacsv.read_csv(tmp_path / "out" / "skipped.csv").to_pylist()
    assert all("lindau" in row["file"] and "no gtFine label" in row["reason"] for row in skipped)


def test_size_mismatch_names_both_sizes(tmp_path: Path, previous_out):
    out, before = previous_out
    root = tmp_path / "raw"
    write_gta5(root, n=1)
    rng = np.random.default_rng(0)
    ids = np.full((35, 64), 7, np.uint8)
    written = write_gta5_frame(root, "00002", render_rgb(rng, np.zeros((36, 64), np.uint8)), ids)
    with pytest.raises(IngestError, match=rf"{written.label}: label size 64x35 differs from image size 64x36"):
        _run("gta5", root, out)
    _assert_intact(out, before)
    assert _run("gta5", root, tmp_path / "lenient", strict=False).skipped == 1


def test_every_sample_skipped_is_an_error(tmp_path: Path, previous_out):
    out, before = previous_out
    root = tmp_path / "raw"
    write_gta5(root, n=2)
    for path in (root / "images").iterdir():
        truncate_file(path)
    with pytest.raises(IngestError, match=r"all 2 gta5 sample\(s\) under .* were skipped; nothing to prepare"):
        _run("gta5", root, out, strict=False)
    _assert_intact(out, before)


def test_empty_and_missing_roots_are_errors(tmp_path: Path, previous_out):
    out, before = previous_out
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match="dataset root is empty"):
        _run("gta5", tmp_path / "empty", out)
    with pytest.raises(StorageError, match="dataset root does not exist"):
        _run("gta5", tmp_path / "missing", out)
    _assert_intact(out, before)


def test_output_that_would_replace_the_root_is_refused(tmp_path: Path):
    write_gta5(tmp_path / "raw", n=1)
    with pytest.raises(IngestError, match="would replace the dataset root"):
        _run("gta5", tmp_path / "raw", tmp_path / "raw")
    with pytest.raises(IngestError, match="would replace the dataset root"):
        _run("gta5", tmp_path / "raw", tmp_path)
    assert (tmp_path / "raw" / "images" / "00001.png").is_file()


def test_bad_arguments_are_rejected(tmp_path: Path):
    write_gta5(tmp_path / "raw", n=1)
    with pytest.raises(IngestError, match="too small"):
        _run("gta5", tmp_path / "raw", tmp_path / "out", resize=(8, 8))
    with pytest.raises(IngestError, match="workers must be >= 1"):
        _run("gta5", tmp_path / "raw", tmp_path / "out", workers=0)
    with pytest.raises(IngestError, match="unknown dataset kind"):
        _run("kitti", tmp_path / "raw", tmp_path / "out")


# --- S3 ---------------------------------------------------------------------------------------


def test_s3_root_gives_the_same_output_as_the_local_copy(s3: S3Endpoint, tmp_path: Path):
    write_cityscapes(tmp_path / "raw", per_city=1)
    bucket = s3.new_bucket()
    s3.upload_tree(tmp_path / "raw", bucket, "datasets/cityscapes")
    _run("cityscapes", tmp_path / "raw", tmp_path / "local", resize=(32, 16))
    # Two workers: each spawned process unpickles the root and opens its own S3 client.
    report = _run("cityscapes", f"s3://{bucket}/datasets/cityscapes", tmp_path / "remote", resize=(32, 16),
                  endpoint_url=s3.url, workers=2)
    assert report.counts == {"train": 2, "val": 1, "test": 1}
    assert _snapshot(tmp_path / "local") == _snapshot(tmp_path / "remote")


def test_s3_bad_sample_is_named_by_its_uri(s3: S3Endpoint, tmp_path: Path):
    write_gta5(tmp_path / "raw", n=2)
    truncate_file(tmp_path / "raw" / "images" / "00002.png")
    bucket = s3.new_bucket()
    s3.upload_tree(tmp_path / "raw", bucket, "gta5")
    with pytest.raises(IngestError, match=rf"s3://{bucket}/gta5/images/00002\.png: cannot decode image"):
        _run("gta5", f"s3://{bucket}/gta5", tmp_path / "out", endpoint_url=s3.url)
    report = _run("gta5", f"s3://{bucket}/gta5", tmp_path / "out", endpoint_url=s3.url, strict=False)
    skipped = pacsv.read_csv(tmp_path / "out" / "skipped.csv").to_pylist()
    assert report.skipped == 1 and skipped[0]["file"] == f"s3://{bucket}/gta5/images/00002.png"


def test_s3_missing_bucket_and_prefix_are_errors(s3: S3Endpoint, tmp_path: Path, previous_out):
    out, before = previous_out
    with pytest.raises(StorageError, match="s3://no-such-bucket/gta5: bucket 'no-such-bucket' does not exist"):
        _run("gta5", "s3://no-such-bucket/gta5", out, endpoint_url=s3.url)
    bucket = s3.new_bucket()
    with pytest.raises(IngestError, match=rf"s3://{bucket}/gta5: dataset root is empty \(or the prefix"):
        _run("gta5", f"s3://{bucket}/gta5", out, endpoint_url=s3.url)
    _assert_intact(out, before)


def test_s3_forbidden_bucket_says_access_denied(s3: S3Endpoint, tmp_path: Path, previous_out,
                                                monkeypatch: pytest.MonkeyPatch):
    out, before = previous_out
    write_gta5(tmp_path / "raw", n=1)
    bucket = s3.new_bucket()
    s3.upload_tree(tmp_path / "raw", bucket, "gta5")
    with s3.user_without_permissions() as (access_key, secret_key):
        use_credentials(monkeypatch, access_key, secret_key)
        with pytest.raises(StorageError, match=rf"access denied to s3://{bucket}/gta5"):
            _run("gta5", f"s3://{bucket}/gta5", out, endpoint_url=s3.url)
    _assert_intact(out, before)


# --- command line -----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segshift")
    build_ingest_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_defaults_to_the_standard_size_and_strict():
    args = _parser().parse_args(["ingest", "gta5", "/raw", "/out"])
    assert (args.kind, args.root, args.out) == ("gta5", "/raw", "/out")
    assert (args.strict, args.endpoint_url) == (True, None)
    assert args.workers >= 1
    assert args.func is run_ingest_command
    assert resolve_size(args.kind, args.resize, args.no_resize) == (1280, 720)
    assert resolve_size("cityscapes", None, False) == (1024, 512)
    assert resolve_size("synthia", None, False) == (1280, 760)
    assert resolve_size("gta5", None, True) is None
    assert resolve_size("gta5", [32, 18], False) == (32, 18)


def test_cli_resize_and_no_resize_exclude_each_other(capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit):
        _parser().parse_args(["ingest", "gta5", "/raw", "/out", "--resize", "32", "18", "--no-resize"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_cli_runs_and_prints_a_one_line_summary(tmp_path: Path, capsys: pytest.CaptureFixture):
    write_gta5(tmp_path / "raw", n=2)
    (tmp_path / "raw" / "images" / "00003.png").write_bytes(b"")
    args = _parser().parse_args(["ingest", "gta5", str(tmp_path / "raw"), str(tmp_path / "out"),
                                 "--resize", "32", "18", "--workers", "1", "--no-strict"])
    assert run_ingest_command(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"ingested 2 gta5 samples (train 2) into {tmp_path / 'out'} in ")
    assert lines[0].endswith(f"; skipped 1 (see {tmp_path / 'out' / 'skipped.csv'})")
    assert pq.read_table(tmp_path / "out" / "manifest.parquet").num_rows == 2


# --- outputs never destroy what segshift did not write -----------------------------------------


def _cli_error(capsys: pytest.CaptureFixture, *argv: str) -> str:
    from segshift.pipelines.cli import main
    assert main(["ingest", "gta5", *argv, "--workers", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_cli_refuses_an_output_folder_it_did_not_write_before_reading_the_dataset(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    write_gta5(tmp_path / "raw", n=2)
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "thesis.tex").write_text("\\chapter{Results}")

    def no_discovery(*args, **kwargs):
        raise AssertionError("the output must be checked before the dataset is read")
    monkeypatch.setattr("segshift.pipelines.ingest.discover_samples", no_discovery)
    err = _cli_error(capsys, str(tmp_path / "raw"), str(out))
    assert str(out) in err and "thesis.tex" in err and "not a folder segshift wrote" in err
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]
    assert (out / "thesis.tex").read_text() == "\\chapter{Results}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw", "thesis"]


def test_cli_refuses_the_current_directory_as_output(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch):
    write_gta5(tmp_path / "raw", n=2)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert "is the current directory" in _cli_error(capsys, str(tmp_path / "raw"), ".")
    assert list(work.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["raw", "work"]


def test_an_output_from_before_the_marker_is_replaced_unless_it_holds_anything_else(tmp_path: Path):
    write_gta5(tmp_path / "raw", n=2)
    out = tmp_path / "out"
    _run("gta5", tmp_path / "raw", out)
    (out / ".segshift-output").unlink()           # as segshift 0.1.0 left it
    _run("gta5", tmp_path / "raw", out)
    assert (out / ".segshift-output").is_file() and len(_manifest_rows(out)) == 2
    (out / ".segshift-output").unlink()
    (out / "images" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a folder segshift wrote"):
        _run("gta5", tmp_path / "raw", out)
    assert (out / "images" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]


# --- native-resolution labels for the evaluation split ------------------------------------------


def test_full_resolution_labels_are_kept_for_the_asked_split_at_native_size(tmp_path: Path):
    written = {w.sample_id: w for w in write_cityscapes(tmp_path / "raw", per_city=2, size=(128, 64))}
    out = tmp_path / "out"
    _run("cityscapes", tmp_path / "raw", out, resize=(64, 32), full_label_splits=("val",))
    table = read_manifest(out)
    assert table.schema.names == MANIFEST_SCHEMA.names + ["label_full"]
    rows = table.to_pylist()
    val = [row for row in rows if row["split"] == "val"]
    assert len(val) == 2
    for row in val:
        assert row["label_full"] == f"labels_full/val/{row['sample_id']}.png"
        full = _png_array(out / row["label_full"])
        assert full.dtype == np.uint8 and full.shape == (64, 128)                # native, not 32x64
        np.testing.assert_array_equal(full, written[row["sample_id"]].train_ids)  # bit-identical
        assert _png_array(out / row["label"]).shape == (32, 64)                   # the resized one stays
    assert all(row["label_full"] is None for row in rows if row["split"] != "val")
    assert sorted(p.name for p in (out / "labels_full").iterdir()) == ["val"]


def test_without_full_resolution_labels_the_output_is_as_before(tmp_path: Path):
    write_cityscapes(tmp_path / "raw", per_city=2, size=(128, 64))
    _run("cityscapes", tmp_path / "raw", tmp_path / "off", resize=(64, 32))
    _run("cityscapes", tmp_path / "raw", tmp_path / "on", resize=(64, 32), full_label_splits=("val",))
    off, on = _snapshot(tmp_path / "off"), _snapshot(tmp_path / "on")
    assert pq.read_table(tmp_path / "off" / "manifest.parquet").schema.equals(MANIFEST_SCHEMA)  # no new column
    assert not any(name.startswith("labels_full/") for name in off)
    # images and resized labels are byte-identical; the option only adds labels_full/ and the column
    changed = ("manifest.parquet", ".segshift-output")      # the marker lists the output's entries
    same = {n: b for n, b in on.items() if not n.startswith("labels_full/") and n not in changed}
    assert same == {n: b for n, b in off.items() if n not in changed}
    assert read_manifest(tmp_path / "on").drop(["label_full"]).equals(read_manifest(tmp_path / "off"))


def test_full_resolution_labels_split_must_be_known_and_manifest_paths_stay_inside(tmp_path: Path):
    write_cityscapes(tmp_path / "raw", per_city=1, size=(128, 64))
    with pytest.raises(IngestError, match=r"\['validation'\] unknown"):
        _run("cityscapes", tmp_path / "raw", tmp_path / "out", resize=(64, 32), full_label_splits=("validation",))
    out = tmp_path / "out"
    _run("cityscapes", tmp_path / "raw", out, resize=(64, 32), full_label_splits=("val",))
    table = read_manifest(out)
    bad = table.set_column(table.schema.get_field_index("label_full"), "label_full",
                           pa.array(["../../etc/passwd"] * table.num_rows, pa.string()))
    pq.write_table(bad, out / "manifest.parquet")
    with pytest.raises(ManifestError, match="label_full"):
        read_manifest(out)


def test_cli_full_resolution_labels_flag(tmp_path: Path):
    args = _parser().parse_args(["ingest", "cityscapes", "/raw", "/out"])
    assert args.full_label_splits == []
    args = _parser().parse_args(["ingest", "cityscapes", "/raw", "/out", "--full-resolution-labels", "val"])
    assert args.full_label_splits == ["val"]
    write_cityscapes(tmp_path / "raw", per_city=1, size=(128, 64))
    args = _parser().parse_args(["ingest", "cityscapes", str(tmp_path / "raw"), str(tmp_path / "out"),
                                 "--resize", "64", "32", "--workers", "1", "--quiet",
                                 "--full-resolution-labels", "val"])
    assert run_ingest_command(args) == 0
    assert [p.name for p in (tmp_path / "out" / "labels_full" / "val").iterdir()] == [
        "frankfurt_000000_000019.png"]
