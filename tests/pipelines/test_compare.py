"""`segshift compare`: the plan (validated before training), the numbers, the report, a tiny run."""
import json
import statistics
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from segshift.components.config import ConfigError, load_params
from segshift.components.data.labels import CLASS_NAMES
from segshift.pipelines.cli import main
from segshift.pipelines.compare import (CompareError, aggregate, build_plan, compare_markdown,
                                        miou_picture, per_class_picture)
from tests.conftest import write_params

TINY = {f"{stage}.{key}": 2 for stage in ("source", "oracle", "inter", "intra")
        for key in ("iterations", "batch_size")}
FAST = {**TINY, "engine.val_every": 2, "engine.checkpoint_every": 2, "model.width": 0.125,
        "rank.lambda": 0.5, "ray.local_num_cpus": 1}
COMPARE_SET = {"source.iterations": 2, "oracle.iterations": 2, "inter.iterations": 2, "intra.iterations": 2}


def compare_params(directory: Path, entries: dict | None = None, common: dict | None = None) -> Path:
    overrides = {**FAST, "compare.out_dir": str(directory / "runs"),
                 "compare.report": str(directory / "reports" / "compare.md"),
                 "compare.records": str(directory / "records"),
                 "compare.set": COMPARE_SET if common is None else common,
                 "tracking.uri": f"sqlite:///{directory / 'mlflow.db'}"}
    if entries is not None:
        overrides["compare.entries"] = entries
    return write_params(directory, overrides)


# -- the plan ---------------------------------------------------------------------------------------

def test_plan_applies_the_overrides_and_moves_every_output_under_entry_and_seed(tmp_path):
    params = load_params(compare_params(tmp_path, common={"source.iterations": 7, "inter.iterations": 5}))
    plan = build_plan(params, seeds=[3, 4])
    assert [(r.entry, r.seed) for r in plan.runs[:2]] == [("source-only", 3), ("source-continued", 3)]
    assert len(plan.runs) == 2 * len(params.compare.entries)
    for run in plan.runs:
        p = run.params
        own = params.compare.entries[run.entry].set       # an entry's own setting wins over the common one
        assert p.engine.seed == run.seed and p.source.iterations == 7
        assert p.inter.iterations == own.get("inter.iterations", 5)
        assert run.run_dir == tmp_path / "runs" / run.entry / f"seed-{run.seed}"
        outputs = [*p.paths.model_dump().values(), p.rank.out_dir, p.evaluate.out]
        assert all(str(o).startswith(str(run.run_dir) + "/") for o in outputs)
        assert p.prepare == params.prepare
    runs = {(r.entry, r.seed): r for r in plan.runs}
    assert runs["dacs", 3].params.inter.method == "dacs"
    assert runs["minent", 4].params.inter.method == "minent"
    assert runs["augmentation", 3].params.source.augment is not None
    assert runs["source-only", 3].params.source.augment is None
    assert runs["bisenet-dacs", 3].params.model.name == "bisenet"
    assert runs["intrada", 3].reported == "intra" and runs["oracle", 3].reported == "oracle"
    assert runs["labor-spl", 3].params.inter.iterations == 300       # the entry's own budget
    assert plan.baselines["dacs"] == "source-only" and plan.baselines["bisenet-dacs"] == "bisenet-source-only"
    assert runs["source-continued", 3].params.inter.method == "supervised"
    # the control: the same stages and settings with inter.method supervised (methods.* aside)
    assert plan.controls["dacs"] == plan.controls["lse"] == plan.controls["advent"] == "source-continued"
    assert plan.controls["fda"] == "fda-control" and runs["fda-control", 3].params.inter.init == "scratch"
    assert plan.controls["fda-long"] == "fda-long-control"     # matched on the step budget too
    nothing = ("source-only", "augmentation", "source-continued", "fda-control", "fda-long-control", "oracle",
               "intrada",          # its intra stage is more than the control's steps
               "labor-spl",        # 300 inter steps, the control 150
               "fda-multiband",    # one model per beta and a self-training round
               "bisenet-dacs")     # no BiSeNet control is compared
    assert {e: plan.controls[e] for e in nothing} == dict.fromkeys(nothing)


def test_entries_with_the_same_source_settings_share_one_source_per_seed(tmp_path):
    plan = build_plan(load_params(compare_params(tmp_path)), seeds=[0, 1])
    runs = {(r.entry, r.seed): r for r in plan.runs}
    shared = {runs[e, 0].source.run_dir for e in ("source-only", "adaptsegnet", "minent", "advent",
                                                  "intrada", "dacs", "source-continued")}
    assert len(shared) == 1
    (source_dir,) = shared
    assert source_dir.parent.parent == tmp_path / "runs" / "_source" and source_dir.name == "seed-0"
    assert runs["minent", 1].source.run_dir == source_dir.parent / "seed-1"
    assert runs["minent", 1].source.params.paths.models == str(source_dir.parent / "seed-1" / "models")
    assert runs["augmentation", 0].source.run_dir != source_dir          # source.augment differs
    assert runs["bisenet-dacs", 0].source.run_dir == runs["bisenet-source-only", 0].source.run_dir
    assert runs["bisenet-dacs", 0].source.run_dir != source_dir          # another model
    assert runs["oracle", 0].source is None and runs["fda", 0].source is None   # FDA trains from scratch


@pytest.mark.parametrize("entries, common, expected", [
    ({"bad": {"stages": ["source", "inter"], "set": {"inter.methd": "dacs"}}}, None,
     ["compare.entries.bad.set.inter.methd", "unknown key"]),
    ({"bad": {"stages": ["source", "inter"], "set": {"inter.method": "magic"}}}, None,
     ["compare.entries.bad.set.inter.method", "compare entry 'bad'", "inter.method", "magic"]),
    ({"bad": {"stages": ["source"], "set": {"source.augment.scale": [0.5, 2.0]}}}, None,
     ["compare.entries.bad.set.source.augment.scale", "not a section"]),
    ({"ok": {"stages": ["source"]}}, {"source.iteration": 3},
     ["compare.set.source.iteration", "unknown key"]),
    ({"ok": {"stages": ["source"]}}, {"source.iterations": 0},
     ["compare.set.source.iterations", "source.iterations", "greater than or equal to 1"]),
    ({"bad": {"stages": ["inter"]}}, None, ["compare.entries.bad.stages", "needs source before it"]),
    ({"_source": {"stages": ["source"]}}, None, ["compare.entries._source: an entry name is a directory name"]),
    ({"bad": {"stages": ["source", "inter", "intra"]}}, None,
     ["compare.entries.bad.stages", "intra", "needs rank before it"]),
])
def test_bad_settings_fail_before_anything_trains_naming_entry_and_key(tmp_path, entries, common, expected):
    params = load_params(compare_params(tmp_path, entries=entries, common=common))
    with pytest.raises(ConfigError) as err:
        build_plan(params)
    for text in expected:
        assert text in str(err.value)


def test_unknown_entries_on_the_command_line_are_refused_listing_the_entries(tmp_path, capsys):
    path = compare_params(tmp_path)
    with pytest.raises(CompareError, match="unknown entry dacz; compare.entries has: source-only, source-continued, augmentation"):
        build_plan(load_params(path), entries=["minent", "dacz"])
    assert main(["compare", "--params", str(path), "--entries", "dacz", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "segshift compare: error: unknown entry dacz" in err and "bisenet-dacs" in err
    assert not (tmp_path / "runs").exists()


def test_a_restricted_plan_runs_only_the_named_entries_and_seeds(tmp_path):
    plan = build_plan(load_params(compare_params(tmp_path)), entries=["dacs", "oracle"], seeds=[5])
    assert [(r.entry, r.seed) for r in plan.runs] == [("dacs", 5), ("oracle", 5)]
    assert plan.baselines == {"dacs": None, "oracle": None}


# -- the numbers and the report ----------------------------------------------------------------------

def stage_metrics(miou: float, seconds: float, share: float | None = None, car: float = 0.5) -> dict:
    per_class = {c: miou for c in CLASS_NAMES} | {"car": car, "train": float("nan")}
    metrics = {"test": {"miou": miou, "miou_16": miou, "miou_13": miou, "per_class_iou": per_class},
               "seconds": seconds}
    if share is not None:
        metrics["labels"] = {"share": share}
    return metrics


SYNTHETIC_ENTRIES = {
    "source-only": {"stages": ["source"], "model": "M", "baseline": "source-only", "shared_source": True},
    "advent": {"stages": ["source", "inter"], "model": "M", "baseline": "source-only", "control": "continued",
               "shared_source": True},
    "continued": {"stages": ["source", "inter"], "model": "M", "baseline": "source-only", "shared_source": True},
    "labor": {"stages": ["source", "inter"], "model": "M", "baseline": "source-only", "shared_source": True},
    "oracle": {"stages": ["oracle"], "model": "M", "baseline": "source-only", "shared_source": False},
}
SYNTHETIC_RUNS = {
    "source-only": {s: {"source": stage_metrics(m, 10.0)} for s, m in [(0, 0.20), (1, 0.22), (2, 0.24)]},
    "advent": {s: {"source": stage_metrics(0.2, 10.0), "inter": stage_metrics(m, t, car=c)}
               for s, m, t, c in [(0, 0.25, 4.0, 0.6), (1, 0.26, 5.0, 0.7), (2, 0.30, 6.0, 0.8)]},
    "continued": {s: {"source": stage_metrics(0.2, 10.0), "inter": stage_metrics(0.24, 2.0)} for s in (0, 1, 2)},
    "labor": {s: {"source": stage_metrics(0.2, 10.0), "inter": stage_metrics(0.3, 3.0, share=sh)}
              for s, sh in [(0, 0.02), (1, 0.04), (2, 0.03)]},
    "oracle": {s: {"oracle": stage_metrics(m, 20.0)} for s, m in [(0, 0.5), (1, 0.52), (2, 0.54)]},
}


def test_aggregate_gives_mean_std_delta_share_time_and_per_class():
    result = aggregate(SYNTHETIC_ENTRIES, SYNTHETIC_RUNS)
    advent = result["advent"]
    assert advent["miou"] == {"0": 0.25, "1": 0.26, "2": 0.30}
    assert advent["miou_mean"] == pytest.approx(0.27)
    assert advent["miou_std"] == pytest.approx(statistics.stdev([0.25, 0.26, 0.30]))
    assert advent["delta_vs_source_only"] == pytest.approx(0.27 - 0.22)
    assert advent["delta_vs_control"] == pytest.approx(0.27 - 0.24)
    assert result["labor"]["delta_vs_control"] is None and result["continued"]["delta_vs_control"] is None
    assert result["source-only"]["delta_vs_source_only"] == pytest.approx(0.0)
    assert result["oracle"]["delta_vs_source_only"] == pytest.approx(0.52 - 0.22)
    assert advent["labelled_share_mean"] == 0.0
    assert result["oracle"]["labelled_share"] == {"0": 1.0, "1": 1.0, "2": 1.0}
    assert result["labor"]["labelled_share_mean"] == pytest.approx(0.03)
    # the shared source counts in the total, not in the method time (unless it is the result)
    assert advent["method_seconds_mean"] == pytest.approx(5.0)
    assert advent["total_seconds_mean"] == pytest.approx(15.0)
    assert result["source-only"]["method_seconds_mean"] == pytest.approx(10.0)
    assert result["oracle"]["method_seconds_mean"] == pytest.approx(20.0)
    assert advent["per_class_iou_mean"]["car"] == pytest.approx(0.7)
    assert advent["per_class_iou_mean"]["train"] is None
    assert advent["reported_stage"] == "inter"


def test_markdown_and_pictures_from_synthetic_results():
    result = aggregate(SYNTHETIC_ENTRIES, SYNTHETIC_RUNS)
    summary = {"seeds": [0, 1, 2], "entries": result,
               "models": {"M": {"config": {}, "entries": list(result), "best_entry": "oracle",
                                "best_miou_mean": 0.52,
                                "profile": {"params_m": 0.8, "gflops": 1.234, "latency_ms_mean": 12.0,
                                            "latency_ms_std": 0.5, "fps": 83.3}}},
               "profile": {"device": "cpu (2 threads)", "height": 64, "width": 128}}
    text = compare_markdown(summary)
    assert "| advent | 27.0 ± 2.6 | 25.0, 26.0, 30.0 | +5.0 | +3.0 | 0.0 % | 5.0 | 15.0 |" in text
    assert "| oracle | 52.0 ± 2.0 | 50.0, 52.0, 54.0 | +30.0 | – | 100.0 % | 20.0 | 20.0 |" in text
    assert "| labor | 30.0 ± 0.0 | 30.0, 30.0, 30.0 | +8.0 | – | 3.0 % |" in text
    assert "| source-only | 22.0 ± 2.0 | 20.0, 22.0, 24.0 | (reference) |" in text
    assert "| entry | " + " | ".join(CLASS_NAMES) + " |" in text
    row = next(line for line in text.splitlines() if line.startswith("| advent | 27.0 | 27.0"))
    assert row.split(" | ")[CLASS_NAMES.index("car") + 1] == "70.0"
    assert row.split(" | ")[CLASS_NAMES.index("train") + 1] == "–"
    assert "| M | source-only, advent, continued, labor, oracle | 0.80 | 1.23 | 12.0 ± 0.5 | 83.3 | 52.0 (oracle) |" in text
    assert "64×128 (H×W), batch 1, on cpu (2 threads)" in text
    for picture in (miou_picture(result), per_class_picture(result)):
        assert picture[:8] == b"\x89PNG\r\n\x1a\n" and len(picture) > 10_000


# -- end to end -------------------------------------------------------------------------------------

def test_two_entries_two_seeds_end_to_end_then_a_rerun_skips_everything(tmp_path, monkeypatch, capsys):
    entries = {"source-only": {"stages": ["source"]},
               "minent": {"stages": ["source", "inter"], "set": {"inter.method": "minent"}}}
    params_path = compare_params(tmp_path, entries=entries)
    monkeypatch.chdir(tmp_path)
    assert main(["prepare", "--params", str(params_path), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["compare", "--params", str(params_path), "--seeds", "0", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.count("training the shared source") == 2                 # once per seed, not per entry
    assert "compare: minent seed 1: inter done (" in out and "mIoU)" in out
    runs = tmp_path / "runs"
    (source_key,) = [p.name for p in (runs / "_source").iterdir()]
    for seed in (0, 1):
        shared = runs / "_source" / source_key / f"seed-{seed}"
        for entry in entries:
            copied = runs / entry / f"seed-{seed}" / "models" / "source" / "model.pt"
            assert copied.read_bytes() == (shared / "models" / "source" / "model.pt").read_bytes()
        assert (runs / "minent" / f"seed-{seed}" / "models" / "inter" / "model.pt").is_file()
        assert not (runs / "minent" / f"seed-{seed}" / "checkpoints" / "source").exists()

    reports = tmp_path / "reports"
    summary = json.loads((reports / "compare.json").read_text())
    assert summary["seeds"] == [0, 1] and list(summary["entries"]) == ["source-only", "minent"]
    for entry, stage in (("source-only", "source"), ("minent", "inter")):
        for seed in (0, 1):
            metrics = json.loads((runs / entry / f"seed-{seed}" / "metrics" / f"{stage}.json").read_text())
            assert summary["entries"][entry]["miou"][str(seed)] == metrics["test"]["miou"]
            assert summary["entries"][entry]["labelled_share"][str(seed)] == 0.0
    minent = summary["entries"]["minent"]
    assert minent["delta_vs_source_only"] == pytest.approx(
        minent["miou_mean"] - summary["entries"]["source-only"]["miou_mean"])
    (model,) = summary["models"].values()
    assert model["entries"] == ["source-only", "minent"] and model["profile"]["gflops"] > 0
    assert summary["profile"]["height"] == 64 and summary["profile"]["width"] == 128
    text = (reports / "compare.md").read_text()
    assert "| minent |" in text and "## Per-class IoU" in text and "## Real-time analysis" in text
    for name in ("compare_miou.png", "compare_per_class.png"):
        with Image.open(reports / name) as image:
            assert image.width > 300 and image.height > 200
        assert (reports / name).stat().st_size > 10_000

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("segshift")
    (run,) = client.search_runs([experiment.experiment_id], "tags.`segshift.stage` = 'compare'")
    assert run.info.run_name == "compare" and run.info.status == "FINISHED"
    assert run.data.metrics["miou_mean/minent"] == pytest.approx(minent["miou_mean"])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
        "compare.md", "compare.json", "compare_miou.png", "compare_per_class.png"}
    sources = client.search_runs([experiment.experiment_id], "tags.`segshift.stage` = 'source'")
    assert len(sources) == 2

    # A rerun trains nothing: every run is found done for the same params.
    models = sorted(runs.rglob("model.pt"))
    stamps = {p: p.stat().st_mtime_ns for p in models}

    def no_training(*args, **kwargs):
        raise AssertionError("a rerun must not train")
    monkeypatch.setattr("segshift.pipelines.train.train_stage", no_training)
    assert main(["compare", "--params", str(params_path), "--seeds", "0", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") == 4 and "training the shared source" not in out
    assert {p: p.stat().st_mtime_ns for p in sorted(runs.rglob("model.pt"))} == stamps
    again = json.loads((reports / "compare.json").read_text())
    assert {e: v["miou"] for e, v in again["entries"].items()} == {e: v["miou"] for e, v in summary["entries"].items()}

    # Adding an entry to the comparison leaves the finished runs finished.
    more = {**entries, "advent": {"stages": ["source", "inter"], "set": {"inter.method": "advent"}}}
    params_path = compare_params(tmp_path, entries=more)
    assert main(["compare", "--params", str(params_path), "--entries", "source-only", "minent",
                 "--seeds", "0", "1", "--quiet"]) == 0
    assert capsys.readouterr().out.count("skipped") == 4
    assert {p: p.stat().st_mtime_ns for p in sorted(runs.rglob("model.pt"))} == stamps


def test_records_rebuild_the_report_without_the_runs_and_a_changed_setting_trains_again(tmp_path, monkeypatch,
                                                                                         capsys):
    """A finished run's record (committed; no weights) is enough to report it on a machine without
    the run's directory; a record for other params is not reused."""
    import shutil

    from segshift.components.io import finite_or_none
    entries = {"source-only": {"stages": ["source"]}}
    params_path = compare_params(tmp_path, entries=entries)
    monkeypatch.chdir(tmp_path)
    assert main(["prepare", "--params", str(params_path), "--quiet"]) == 0
    assert main(["compare", "--params", str(params_path), "--seeds", "0", "--quiet"]) == 0
    capsys.readouterr()
    record = json.loads((tmp_path / "records" / "source-only" / "seed-0.json").read_text())
    metrics = json.loads((tmp_path / "runs" / "source-only" / "seed-0" / "metrics" / "source.json").read_text())
    assert record["entry"] == "source-only" and record["seed"] == 0 and record["stages"] == ["source"]
    assert len(record["identity"]) == 64 and record["metrics"]["source"] == finite_or_none(metrics)
    curve = record["metrics"]["source"]["val_curve"]
    assert [p["step"] for p in curve] == [2] and curve[0]["val_miou"] == metrics["val"]["val_miou"]
    assert not any(p.suffix == ".pt" for p in (tmp_path / "records").rglob("*"))
    before = json.loads((tmp_path / "reports" / "compare.json").read_text())

    shutil.rmtree(tmp_path / "runs")            # another machine: the records only

    def no_training(*args, **kwargs):
        raise AssertionError("a recorded run must not train")
    with monkeypatch.context() as patch:
        patch.setattr("segshift.pipelines.train.train_stage", no_training)
        assert main(["compare", "--params", str(params_path), "--seeds", "0", "--quiet"]) == 0
    assert "source-only seed 0: recorded before" in capsys.readouterr().out
    after = json.loads((tmp_path / "reports" / "compare.json").read_text())
    assert after["entries"]["source-only"]["miou"] == before["entries"]["source-only"]["miou"]

    changed = compare_params(tmp_path, entries=entries, common={**COMPARE_SET, "source.iterations": 4})
    assert main(["compare", "--params", str(changed), "--seeds", "0", "--quiet"]) == 0
    assert "training the shared source" in capsys.readouterr().out
    record = json.loads((tmp_path / "records" / "source-only" / "seed-0.json").read_text())
    assert record["metrics"]["source"]["steps"] == 4
    assert [p["step"] for p in record["metrics"]["source"]["val_curve"]] == [2, 4]


# Whole comparisons (several stages per entry and seed, through the CLI) are integration tests
# (`make test-integration`); marked here, after their definitions.
for _whole_comparison in (test_two_entries_two_seeds_end_to_end_then_a_rerun_skips_everything,
                          test_records_rebuild_the_report_without_the_runs_and_a_changed_setting_trains_again):
    pytest.mark.integration(_whole_comparison)


def test_report_only_reads_the_records_names_missing_runs_and_writes_the_readme_block(tmp_path, monkeypatch,
                                                                                      capsys):
    entries = {"source-only": {"stages": ["source"]},
               "minent": {"stages": ["source", "inter"], "set": {"inter.method": "minent"}}}
    params_path = compare_params(tmp_path, entries=entries)
    monkeypatch.chdir(tmp_path)
    assert main(["prepare", "--params", str(params_path), "--quiet"]) == 0
    assert main(["compare", "--params", str(params_path), "--entries", "source-only", "--seeds", "0",
                 "--quiet"]) == 0
    readme = tmp_path / "README.md"
    readme.write_text("# guide\n\n<!-- compare-table:begin -->\nold table\n<!-- compare-table:end -->\n\nafter\n")
    capsys.readouterr()

    def no_training(*args, **kwargs):
        raise AssertionError("--report-only trains nothing")
    monkeypatch.setattr("segshift.pipelines.train.train_stage", no_training)
    assert main(["compare", "--params", str(params_path), "--seeds", "0", "1", "--report-only",
                 "--readme", str(readme), "--quiet"]) == 0
    summary = json.loads((tmp_path / "reports" / "compare.json").read_text())
    assert list(summary["entries"]) == ["source-only"]                 # minent: no record at all
    assert summary["missing"] == ["minent seed 0", "source-only seed 1", "minent seed 1"]   # seed-major
    record = json.loads((tmp_path / "records" / "source-only" / "seed-0.json").read_text())
    miou = record["metrics"]["source"]["test"]["miou"]
    text = readme.read_text()
    assert text.startswith("# guide\n\n<!-- compare-table:begin -->\n") and text.endswith(
        "<!-- compare-table:end -->\n\nafter\n")
    assert "old table" not in text and f"| source-only | {100 * miou:.1f} ± 0.0 (s0: {100 * miou:.1f}) |" in text
    assert "Not yet trained (left out of the means): minent (seeds 0, 1), source-only (seed 1)." in text
    assert "Not yet trained" in (tmp_path / "reports" / "compare.md").read_text()

    readme.write_text("no markers\n")
    assert main(["compare", "--params", str(params_path), "--seeds", "0", "--report-only",
                 "--readme", str(readme), "--quiet"]) == 2
    assert "compare-table:begin" in capsys.readouterr().err and readme.read_text() == "no markers\n"


@pytest.mark.parametrize("curve, expected", [
    # peak at 50 of 100: before the last quarter -> converged
    ([(25, 0.10), (50, 0.20), (75, 0.19), (100, 0.18)], {"selected_step": 50, "steps": 100, "converged": True}),
    # still rising at the end by 2 points over the last quarter -> not converged
    ([(25, 0.10), (50, 0.15), (75, 0.18), (100, 0.20)], {"selected_step": 100, "steps": 100, "converged": False}),
    # peak at the end but a rise of 0.3 points over the last quarter (< 0.5) -> converged
    ([(25, 0.10), (50, 0.15), (75, 0.197), (100, 0.20)], {"selected_step": 100, "steps": 100, "converged": True}),
    # one validation at the end: nothing says it flattened
    ([(150, 0.22)], {"selected_step": 150, "steps": 150, "converged": False}),
    # a tie: the earliest best, as the engine selects
    ([(40, 0.3), (80, 0.3), (120, 0.1), (160, 0.1)], {"selected_step": 40, "steps": 160, "converged": True}),
])
def test_convergence_from_the_val_curve(curve, expected):
    from segshift.pipelines.compare import convergence
    metrics = {"val_curve": [{"step": s, "val_miou": v, "round": "r"} for s, v in reversed(curve)]}
    found = convergence(metrics)
    assert {k: found[k] for k in expected} == expected
    if len(curve) > 1:
        assert found["last_quarter_rise"] == pytest.approx(curve[-1][1] - curve[2][1])
    assert convergence({"val_curve": []}) is None and convergence({}) is None


def test_the_curves_picture_and_the_convergence_table():
    from segshift.pipelines.compare import aggregate, compare_markdown, curves_picture
    curve = [{"step": 50, "val_miou": 0.2}, {"step": 100, "val_miou": 0.25}]
    metrics = {"test": {"miou": 0.3, "per_class_iou": {c: 0.3 for c in CLASS_NAMES}}, "val_curve": curve}
    entries = {"source-only": {"stages": ["source"], "model": "m", "baseline": "source-only"}}
    result = aggregate(entries, {"source-only": {0: {"source": metrics}, 1: {"source": {**metrics, "val_curve": []}}}})
    assert result["source-only"]["val_curve"] == {"0": [(50, 0.2), (100, 0.25)], "1": []}
    text = compare_markdown({"seeds": [0, 1], "entries": result})
    assert "| source-only | s0: 100 / 100 (+5.0); s1: no val curve | 0 of 2 |" in text
    picture = curves_picture(result)
    assert picture[:8] == b"\x89PNG\r\n\x1a\n" and len(picture) > 5_000


def test_ours_vs_the_literature_deltas_and_the_pairs_whose_order_differs():
    from segshift.pipelines.compare import literature_lines

    def entry(miou, baseline="source-only", delta=None, control=None):
        return {"miou_mean": miou, "baseline": baseline, "delta_vs_source_only": delta, "delta_vs_control": control}
    summary = {"literature": {"source-only": 36.6, "advent": 43.8, "dacs": 52.1, "fda-multiband": 50.5},
               "entries": {"source-only": entry(0.183), "advent": entry(0.189, delta=0.006, control=-0.003),
                           "dacs": entry(0.195, delta=0.012, control=0.003)}}
    text = "\n".join(literature_lines(summary))
    assert "| source-only | 36.6 | – | 18.3 | (reference) | – |" in text
    assert "| advent | 43.8 | +7.2 | 18.9 | +0.6 | -0.3 |" in text
    assert "| dacs | 52.1 | +15.5 | 19.5 | +1.2 | +0.3 |" in text
    assert "Order of the methods: agrees with the literature." in text
    assert "Published but not in this report: fda-multiband." in text
    summary["entries"]["advent"]["miou_mean"] = 0.200           # advent above dacs: one pair flips
    assert "differs from the literature for advent / dacs." in "\n".join(literature_lines(summary))
    assert literature_lines({"literature": {}, "entries": summary["entries"]}) == []
