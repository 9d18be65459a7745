"""The same `dvc.yaml` runs GTA5 -> Cityscapes and SYNTHIA -> Cityscapes after `segshift preset`:
tiny trees in the datasets' exact on-disk formats, the real-data preset with `-S` overrides that keep
it small, then `dvc repro` end to end in a fresh git + DVC project."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from segshift.components.data.manifest import read_manifest
from segshift.components.data.rawformats import write_cityscapes, write_gta5, write_synthia
from segshift.components.data.splits import city_of
from tests.test_dvc_pipeline import BIN, STAGES, _fresh_project, _ran, _run

SIZE = [128, 64]              # [width, height] of every prepared image (as the tiny built-in runs)
TRAIN_CITIES = ("aachen", "bochum")
PER_TRAIN_CITY = 4
VAL_IMAGES = 3                # Cityscapes val (frankfurt) = the test split
SOURCE_IMAGES = 8


def _write_raw(kind: str, root: Path) -> tuple[Path, Path]:
    source = root / kind
    if kind == "gta5":
        write_gta5(source, n=SOURCE_IMAGES, size=(128, 72), seed=1)
    else:
        write_synthia(source, n=SOURCE_IMAGES, size=(128, 76), seed=1)
    cityscapes = root / "cityscapes"
    write_cityscapes(cityscapes, per_city=PER_TRAIN_CITY, size=(128, 64), seed=2,
                     cities={"train": TRAIN_CITIES})
    write_cityscapes(cityscapes, per_city=VAL_IMAGES, size=(128, 64), seed=3, cities={"val": ("frankfurt",)})
    write_cityscapes(cityscapes, per_city=1, size=(128, 64), seed=4, cities={"test": ("berlin",)})
    return source, cityscapes


def _tiny(source: Path, cityscapes: Path) -> list[str]:
    """-S overrides on top of the real-data preset: the raw trees, small sizes and a small CPU model."""
    values = {
        "prepare.source.root": source, "prepare.target.root": cityscapes,
        "prepare.source.resize": SIZE, "prepare.target.resize": SIZE, "prepare.workers": 1,
        "model.backbone": "resnet18", "model.width": 0.125, "model.rates": [1, 2], "model.pretrained": None,
        "inter.init": "source", "intra.init": "inter",     # no ImageNet weights here
        "engine.device": "cpu", "engine.loader_workers": 0, "engine.eval_batch_size": 4,
        "engine.workers.num_workers": 0, "engine.workers.use_gpu": False,
        "engine.workers.cpus_per_worker": 1, "engine.workers.gpus_per_worker": 0,
        "rank.gpus_per_actor": 0, "rank.cpus_per_actor": 1, "rank.batch_size": 4,
        **{f"{stage}.{key}": 2 for stage in ("source", "oracle", "inter", "intra")
           for key in ("iterations", "batch_size")},
    }
    args = []
    for key, value in values.items():
        shown = "null" if value is None else json.dumps(value) if isinstance(value, list) else str(value)
        args += ["-S", f"{key}={shown}"]
    return args


@pytest.mark.slow
@pytest.mark.parametrize("preset, kind", [("gta5-cityscapes", "gta5"), ("synthia-cityscapes", "synthia")])
def test_real_data_preset_runs_the_whole_pipeline_with_dvc_repro(tmp_path: Path, preset: str, kind: str):
    source, cityscapes = _write_raw(kind, tmp_path / "raw")
    project = _fresh_project(tmp_path)
    _run([str(BIN / "segshift"), "preset", preset, "--quiet", *_tiny(source, cityscapes)], project)
    assert f"{preset}.yaml" in (project / "params.yaml").read_text().splitlines()[0]

    out = _run([str(BIN / "dvc"), "repro"], project)
    assert _ran(out) == set(STAGES)

    # prepare: every source frame is train; Cityscapes train minus one held-out city is train, that
    # city is val (model selection), Cityscapes val is test and Cityscapes test is dropped.
    prepared = project / "data" / "prepared"
    src = read_manifest(prepared / "source").to_pylist()
    assert len(src) == SOURCE_IMAGES and {(r["dataset"], r["split"]) for r in src} == {(kind, "train")}
    assert {(r["width"], r["height"]) for r in src} == {tuple(SIZE)}
    tgt = read_manifest(prepared / "target").to_pylist()
    by_split = {s: sorted(r["sample_id"] for r in tgt if r["split"] == s) for s in ("train", "val", "test")}
    val_cities = {city_of(i) for i in by_split["val"]}
    assert len(val_cities) == 1 and val_cities < set(TRAIN_CITIES)
    assert len(by_split["val"]) == PER_TRAIN_CITY and not val_cities & {city_of(i) for i in by_split["train"]}
    assert len(by_split["train"]) == PER_TRAIN_CITY * (len(TRAIN_CITIES) - 1)
    assert len(by_split["test"]) == VAL_IMAGES and {city_of(i) for i in by_split["test"]} == {"frankfurt"}

    # every stage evaluated on Cityscapes val with the 19-, 16- and 13-class means
    summary = json.loads((project / "metrics" / "summary.json").read_text())
    assert list(summary) == ["source", "inter", "intra", "oracle"]
    for stage, entry in summary.items():
        assert {"miou", "miou_16", "miou_13"} <= set(entry), stage

    # the ranking: one row per Cityscapes train image that was not held out
    ranking = pq.read_table(project / "data" / "ranking" / "ranking.parquet").to_pylist()
    assert sorted(r["sample_id"] for r in ranking) == by_split["train"]
    rank = json.loads((project / "metrics" / "rank.json").read_text())
    assert (rank["easy"], rank["hard"]) == (2, 2)         # floor(0.67 * 4) easy
