"""The prepared format: images, uint8 train-id label PNGs and `manifest.parquet`, one row per sample."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from segshift.components.paths import UnsafePathError, relative_parts

MANIFEST_NAME = "manifest.parquet"
SKIPPED_NAME = "skipped.csv"

MANIFEST_SCHEMA = pa.schema([
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("dataset", pa.string(), nullable=False),
    pa.field("domain", pa.string(), nullable=False),      # source | target
    pa.field("split", pa.string(), nullable=False),       # train | val | test
    pa.field("image", pa.string(), nullable=False),       # relative to the prepared directory
    pa.field("label", pa.string(), nullable=True),        # relative path; null when unlabelled
    pa.field("height", pa.int32(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("condition", pa.string(), nullable=True),    # built-in target only: weather/light
])
# Optional: the label at the dataset's native resolution, kept beside the resized `label` for the
# evaluation split(s) when `prepare.target.full_resolution_labels` is on (labels_full/<split>/<id>.png);
# null for every other sample. A manifest without this column (all older ones, and every manifest
# written with the option off) reads as if the column were all null.
LABEL_FULL_FIELD = pa.field("label_full", pa.string(), nullable=True)
PATH_COLUMNS = ("sample_id", "image", "label", LABEL_FULL_FIELD.name)

DOMAINS = ("source", "target")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SampleRecord:
    sample_id: str
    dataset: str
    domain: str
    split: str
    image: str
    label: str | None
    height: int
    width: int
    condition: str | None = None
    label_full: str | None = None   # native-resolution label (relative path), see LABEL_FULL_FIELD


@dataclass(frozen=True)
class SkippedSample:
    file: str
    reason: str


class ManifestError(ValueError):
    """A prepared directory whose manifest is missing or inconsistent."""


def write_manifest(records: list[SampleRecord], out_dir: Path) -> Path:
    rows = sorted((asdict(r) for r in records), key=lambda r: (r["split"], r["sample_id"]))
    schema = MANIFEST_SCHEMA
    if any(row[LABEL_FULL_FIELD.name] is not None for row in rows):
        schema = schema.append(LABEL_FULL_FIELD)
    else:   # no full-resolution label: the manifest stays exactly as before the column existed
        for row in rows:
            del row[LABEL_FULL_FIELD.name]
    table = pa.Table.from_pylist(rows, schema=schema)
    path = out_dir / MANIFEST_NAME
    pq.write_table(table, path)
    return path


def write_skipped(skipped: list[SkippedSample], out_dir: Path) -> Path:
    table = pa.table({"file": [s.file for s in skipped], "reason": [s.reason for s in skipped]},
                     schema=pa.schema([("file", pa.string()), ("reason", pa.string())]))
    path = out_dir / SKIPPED_NAME
    pacsv.write_csv(table, path)
    return path


def read_manifest(prepared_dir: str | Path) -> pa.Table:
    path = Path(prepared_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest; run `segshift prepare` or `segshift ingest` first")
    table = pq.read_table(path)
    missing = [name for name in MANIFEST_SCHEMA.names if name not in table.column_names]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {missing}; expected {MANIFEST_SCHEMA.names}")
    _check_paths_stay_inside(table, path)
    return table


def _check_paths_stay_inside(table: pa.Table, path: Path) -> None:
    """A manifest from a remote or a colleague names files to read: each must lie below its folder."""
    for column in PATH_COLUMNS:
        if column not in table.column_names:    # label_full is optional
            continue
        for value in table.column(column).to_pylist():
            if value is None:
                continue
            try:
                relative_parts(value, f"{column}")
            except UnsafePathError as error:
                raise ManifestError(f"{path}: {error}") from None
