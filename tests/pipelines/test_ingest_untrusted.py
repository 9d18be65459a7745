"""`segshift ingest` on datasets built by someone else, written from the attacker's side: images
that decode to gigabytes, symlink loops, JPEG labels, file names that climb out of their folder."""
from __future__ import annotations

import os
import resource
import struct
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from segshift.components.data.formats import IngestError
from segshift.components.data.rawformats import write_gta5
from segshift.pipelines.cli import main
from segshift.pipelines.ingest import DEFAULT_MAX_IMAGE_PIXELS, ingest

PROJECT = Path(__file__).resolve().parents[2]


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def grey_png(width: int, height: int, rows: int | None = None) -> bytes:
    """A real 8-bit grey PNG of width x height zeros, compressed row by row (never held whole);
    `rows` < height writes only that many rows: the header still claims the full size."""
    compressor, body, row = zlib.compressobj(9), [], b"\x00" * (width + 1)
    for _ in range(height if rows is None else rows):
        body.append(compressor.compress(row))
    body.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", b"".join(body))
            + png_chunk(b"IEND", b""))


def gta5_root(tmp_path: Path) -> Path:
    root = tmp_path / "gta5"
    write_gta5(root, n=2)
    return root


def ingest_cli(root: Path, out: Path, *extra: str) -> int:
    return main(["ingest", "gta5", str(root), str(out), "--no-resize", "--workers", "1", "--quiet", *extra])


def one_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_a_header_claiming_100000_squared_pixels_is_refused_before_decoding(tmp_path, capsys):
    root = gta5_root(tmp_path)
    (root / "images" / "00001.png").write_bytes(grey_png(100_000, 100_000, rows=1))
    assert ingest_cli(root, tmp_path / "out") == 2
    line = one_line(capsys)
    assert "images/00001.png: 100000x100000" in line and "prepare.max_image_pixels" in line
    assert not (tmp_path / "out").exists()


def test_a_small_png_that_decodes_to_gigabytes_is_refused_without_decoding_it(tmp_path, capsys):
    root = gta5_root(tmp_path)
    bomb = grey_png(20_000, 20_000)              # 400 M pixels in about 0.4 MB
    assert len(bomb) < 2_000_000
    (root / "labels" / "00002.png").write_bytes(bomb)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    assert ingest_cli(root, tmp_path / "out") == 2
    assert time.perf_counter() - started < 30
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mib < 200                       # decoding it would take 400 MiB or more
    assert "labels/00002.png: 20000x20000 = 400,000,000 pixels" in one_line(capsys)


def test_the_pixel_limit_is_an_option_and_skips_in_non_strict_mode(tmp_path):
    root = gta5_root(tmp_path)
    with pytest.raises(IngestError, match=r"64x36 = 2,304 pixels, more than prepare.max_image_pixels \(2,303\)"):
        ingest("gta5", str(root), tmp_path / "out", resize=None, max_pixels=64 * 36 - 1, progress=False)
    (root / "images" / "00001.png").write_bytes(grey_png(200, 100))
    report = ingest("gta5", str(root), tmp_path / "out", resize=None, max_pixels=64 * 36, strict=False,
                    progress=False)
    assert report.total == 1 and report.skipped == 1
    assert "200x100" in report.skipped_reasons[0].reason


def test_the_command_lines_default_limit_is_the_params_file_default():
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    assert params["prepare"]["max_image_pixels"] == DEFAULT_MAX_IMAGE_PIXELS


def test_a_jpeg_renamed_png_is_refused_as_a_label(tmp_path, capsys):
    root = gta5_root(tmp_path)
    label = root / "labels" / "00001.png"
    ids = cv2.imread(str(label), cv2.IMREAD_GRAYSCALE)
    label.write_bytes(cv2.imencode(".jpg", ids)[1].tobytes())
    assert ingest_cli(root, tmp_path / "out") == 2
    line = one_line(capsys)
    assert "labels/00001.png: label must be a PNG file, but its content is a JPEG file" in line


@pytest.mark.timeout(60)
@pytest.mark.parametrize("loop", ["directories", "files"])
def test_a_symlink_loop_is_an_error_not_an_endless_walk(tmp_path, capsys, loop):
    root = gta5_root(tmp_path)
    if loop == "directories":     # each level doubles: 2^40 paths before the kernel gives up
        os.symlink("..", root / "images" / "again")
        os.symlink("..", root / "images" / "and-again")
    else:
        os.symlink("b.png", root / "images" / "a.png")
        os.symlink("a.png", root / "images" / "b.png")
    started = time.perf_counter()
    assert ingest_cli(root, tmp_path / "out") == 2
    assert time.perf_counter() - started < 20
    assert "symbolic link loop" in one_line(capsys)


def test_a_sample_id_that_climbs_out_is_refused_and_nothing_escapes(tmp_path, capsys):
    root = gta5_root(tmp_path)
    # GTA5 names its frames images/<id>.png: an id of '..x' is harmless, but a manifest from a
    # remote is not limited by that layout (see test_manifest for the prepared side).
    for name in ("images", "labels"):
        os.rename(root / name / "00002.png", root / name / "0 0;2.png")
    assert ingest_cli(root, tmp_path / "out") == 2
    assert "sample id" in one_line(capsys)
