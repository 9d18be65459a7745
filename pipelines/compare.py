"""`segshift compare`: every method of `compare.entries` on the prepared data, once per seed.

An entry is a list of stages (source, oracle, inter, rank, intra), run in order, and dotted-key
settings applied on top of `compare.set`; its result is its last training stage on target test.
Each run (entry x seed) gets its own params: the repository's, then `compare.set`, then the
entry's `set`, then `engine.seed` and every output path moved under
`<compare.out_dir>/<entry>/seed-<n>/`. All of them are built and validated before anything trains.

Entries whose stage list starts with `source` and whose source-relevant settings (model, engine,
source, prepare, storage) are identical share one source training per seed, run once under
`<compare.out_dir>/_source/<hash>/seed-<n>/` and copied into each entry's run directory before
its next stage. Each finished run leaves a small record, `<compare.records>/<entry>/seed-<n>.json`
(its params' identity, the commit it ran, every stage's metrics with the val curve; no weights),
meant to be committed: a run recorded for identical params is not trained again, on any machine,
so the report can be rebuilt from the records alone and an interrupted comparison continues with
the missing runs. Without a record, a run whose result exists in its directory for identical
params is skipped too; an interrupted stage resumes from its checkpoint. Writes `compare.report` (markdown) with `compare.json`,
`compare_miou.png` and `compare_per_class.png` beside it, and logs them to an MLflow run
"compare".
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from segshift.components import derive
from segshift.components.config import CompareEntry, ConfigError, Params, load_params, load_yaml_file
from segshift.components.data.labels import CLASS_NAMES
from segshift.components.io import (atomic_copy, atomic_write_bytes, atomic_write_text, resolve_under,
                                   strict_json)
from segshift.components.stages import TRAINING as TRAINING_STAGES
from segshift.pipelines.seeds import mean_std, seed_params

SOURCE_DIR = "_source"
# What a source training depends on: entries equal on these share it.
SOURCE_KEYS = ("model", "engine", "source", "prepare", "storage")
JSON_NAME = "compare.json"
MIOU_NAME = "compare_miou.png"
PER_CLASS_NAME = "compare_per_class.png"
CURVES_NAME = "compare_curves.png"
# A run has converged when its checkpoint selected on val lies before the last quarter of its
# training, or when val rises by less than this (0.5 mIoU) over that last quarter.
CONVERGED_RISE = 0.005
MODEL_NAMES = {"deeplabv2": "DeepLab-v2", "bisenet": "BiSeNet"}
BACKBONE_NAMES = {"resnet18": "ResNet-18", "resnet50": "ResNet-50", "resnet101": "ResNet-101"}
PROFILE_WARMUP, PROFILE_REPEATS = 1, 3
ENTRY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class CompareError(ValueError):
    """A comparison that cannot run as asked (e.g. an unknown entry on the command line)."""


# -- the plan ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SourceRun:
    """One source training shared by every entry with the same source settings, for one seed."""

    key: str                # hash of the source-relevant settings (without the seed)
    params: Params          # outputs under <out_dir>/_source/<key>/seed-<n>/
    run_dir: Path


@dataclass(frozen=True)
class Run:
    """One entry for one seed."""

    entry: str
    seed: int
    stages: tuple[str, ...]
    params: Params
    run_dir: Path
    source: SourceRun | None  # the shared source training its first stage copies

    @property
    def reported(self) -> str:
        return reported_stage(self.stages)


@dataclass(frozen=True)
class Plan:
    seeds: list[int]
    entries: dict[str, CompareEntry]
    runs: list[Run]          # seed-major: every entry of seed 0, then seed 1, ...
    baselines: dict[str, str | None]
    models: dict[str, str]   # entry -> model label
    controls: dict[str, str | None]   # entry -> its budget control (see `controls`)


def reported_stage(stages: tuple[str, ...] | list[str]) -> str:
    """The entry's result: its last training stage."""
    return [s for s in stages if s in TRAINING_STAGES][-1]


def entry_params(params: Params, name: str, entry: CompareEntry) -> Params:
    """The repository params with `compare.set`, then the entry's `set`, applied and validated."""
    common = params.with_overrides(params.compare.set, where="compare.set")
    return common.with_overrides(entry.set, where=f"compare.entries.{name}.set",
                                 source=f"compare entry '{name}'")


def source_identity(params: Params) -> dict[str, Any]:
    """The settings a source training depends on (paths aside)."""
    raw = params.model_dump(mode="json")
    return {key: raw[key] for key in SOURCE_KEYS}


def source_key(params: Params) -> str:
    """The shared source directory's name: the source settings' identity, the seed aside."""
    settings = source_identity(params)
    settings["engine"] = {k: v for k, v in settings["engine"].items() if k != "seed"}
    return derive.identity(settings, 10)


def model_label(model: dict[str, Any]) -> str:
    name = MODEL_NAMES.get(model["name"], model["name"])
    backbone = BACKBONE_NAMES.get(model["backbone"], model["backbone"])
    width = "" if model["width"] == 1 else f" ×{model['width']:g}"
    return f"{name} {backbone}{width}"


def _check_stages(name: str, stages: list[str], params: Params) -> None:
    """Every stage's input comes from an earlier stage of the same entry."""
    where = f"compare.entries.{name}.stages"
    if not any(s in TRAINING_STAGES for s in stages):
        raise ConfigError(f"{where}: {stages} has no training stage ({', '.join(TRAINING_STAGES)}) "
                          "to report")
    needs = {"rank": ["inter"], "intra": ["rank"] + (["inter"] if params.intra.init == "inter" else []),
             "inter": ["source"] if params.inter.init == "source" else []}
    for i, stage in enumerate(stages):
        for need in needs.get(stage, []):
            if need not in stages[:i]:
                why = f" ({stage}.init is '{need}')" if need in ("source", "inter") and stage != "rank" else ""
                raise ConfigError(f"{where}: {stage}{why} needs {need} before it; got {stages}")


def baselines(entries: dict[str, CompareEntry], models: dict[str, str]) -> dict[str, str | None]:
    """Each entry's source-only reference: an entry that runs only `source` and sets nothing but
    `model.*`, on the same model (the one named `source-only` first)."""
    candidates = [n for n, e in entries.items()
                  if list(e.stages) == ["source"] and all(k.startswith("model.") for k in e.set)]
    candidates.sort(key=lambda n: n != "source-only")
    return {name: next((c for c in candidates if models[c] == models[name]), None) for name in entries}


def controls(entries: dict[str, CompareEntry]) -> dict[str, str | None]:
    """Each adapting entry's budget control: the entry with the same stages and settings whose
    `inter.method` is `supervised` (its `methods.*` settings aside), i.e. the same steps, batch
    and optimiser on source labels alone. An adaptation stage keeps training on source labels
    too, so part of its gain over source-only is those steps; the control measures that part.
    None where no such entry is compared (and for the controls themselves)."""
    def without_method(entry: CompareEntry) -> tuple:
        kept = {k: v for k, v in entry.set.items() if k != "inter.method" and not k.startswith("methods.")}
        return tuple(entry.stages), json.dumps(kept, sort_keys=True)
    candidates = {without_method(e): n for n, e in entries.items() if e.set.get("inter.method") == "supervised"}
    def control(name: str) -> str | None:
        entry = entries[name]
        if entry.set.get("inter.method") in (None, "supervised"):
            return None
        if entry.set.get("methods.fda.ensemble_betas"):
            return None   # one model per beta and a self-training round, each the full steps
        return candidates.get(without_method(entry))   # same settings, so the same model
    return {name: control(name) for name in entries}


def build_plan(params: Params, entries: list[str] | None = None, seeds: list[int] | None = None) -> Plan:
    """Every run's validated params, before anything trains."""
    cfg = params.compare
    if entries:
        unknown = [e for e in entries if e not in cfg.entries]
        if unknown:
            raise CompareError(f"unknown entr{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                               f"compare.entries has: {', '.join(cfg.entries)}")
    chosen = {n: cfg.entries[n] for n in (dict.fromkeys(entries) if entries else cfg.entries)}
    for name in chosen:
        if not ENTRY_NAME.fullmatch(name):
            raise ConfigError(f"compare.entries.{name}: an entry name is a directory name: letters, digits, "
                              "'.', '_' and '-', not starting with '_' or '.'")
    seeds = list(dict.fromkeys(seeds)) if seeds else list(cfg.seeds)
    out_dir = Path(cfg.out_dir)
    per_entry = {name: entry_params(params, name, entry) for name, entry in chosen.items()}
    for name, entry in chosen.items():
        _check_stages(name, list(entry.stages), per_entry[name])
    labels: dict[str, str] = {}
    models: dict[str, str] = {}
    for name, p in per_entry.items():   # one label per distinct model config
        config = json.dumps(p.model.model_dump(mode="json"), sort_keys=True)
        if config not in labels:
            label = model_label(p.model.model_dump(mode="json"))
            taken = set(labels.values())
            labels[config] = label if label not in taken else f"{label} ({len(taken) + 1})"
        models[name] = labels[config]
    runs = []
    for seed in seeds:
        for name, entry in chosen.items():
            this = per_entry[name]
            shared = None
            if entry.stages[0] == "source":
                key = source_key(this)
                shared = SourceRun(key, seed_params(this, seed, out_dir / SOURCE_DIR / key / f"seed-{seed}"),
                                   out_dir / SOURCE_DIR / key / f"seed-{seed}")
            run_dir = out_dir / name / f"seed-{seed}"
            runs.append(Run(name, seed, tuple(entry.stages), seed_params(this, seed, run_dir), run_dir, shared))
    return Plan(seeds, chosen, runs, baselines(chosen, models), models, controls(chosen))


# -- running ----------------------------------------------------------------------------------------

def metrics_path(params: Params, project_dir: Path, stage: str) -> Path:
    return resolve_under(project_dir, params.paths.metrics) / f"{stage}.json"


def read_metrics(params: Params, project_dir: Path, stage: str) -> dict:
    return json.loads(metrics_path(params, project_dir, stage).read_text())


def _identity(tree: Any) -> str:
    return yaml.safe_dump(tree, sort_keys=True)


def run_record(run: "Run") -> dict[str, Any]:
    """What a run's `params.yaml` records: its stages and its whole params."""
    return {"stages": list(run.stages), "params": run.params.model_dump(mode="json")}


def _essential(tree: Any) -> Any:
    """A run record without its `compare` section: a run's own settings from it are already
    applied to its params, and the rest (the other entries, the seeds, the report) does not
    change what this run trains, so adding an entry to the comparison must not make every
    finished run train again."""
    if not isinstance(tree, dict) or not isinstance(tree.get("params"), dict):
        return None
    return {**tree, "params": {k: v for k, v in tree["params"].items() if k != "compare"}}


def same_run(recorded: Any, record: dict[str, Any]) -> bool:
    """Whether a recorded run did what `record` asks for (`_essential` of both equal)."""
    found = _essential(recorded)
    return found is not None and found == _essential(record)


def run_identity(run: "Run") -> str:
    """What a run trains, as a hash: equal for equal stages and params (the compare section aside)."""
    return derive.identity(_essential(run_record(run)))


def record_path(run: "Run", project_dir: Path) -> Path:
    return resolve_under(project_dir, run.params.compare.records) / run.entry / f"seed-{run.seed}.json"


def read_record(run: "Run", project_dir: Path) -> dict | None:
    """The committed result of this run if it was recorded for the same params, else None."""
    path = record_path(run, project_dir)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CompareError(f"{path}: not a run record ({exc}); delete it to train the run again") from None
    if not isinstance(record, dict) or record.get("identity") != run_identity(run):
        return None
    metrics = record.get("metrics")
    if not isinstance(metrics, dict) or any(not isinstance(metrics.get(s), dict) for s in run.stages):
        raise CompareError(f"{path}: a run record without the metrics of every stage of {list(run.stages)}; "
                           "delete it to train the run again")
    return record


def write_record(run: "Run", project_dir: Path, metrics: dict[str, dict]) -> None:
    """The run's small, committed result: its identity, the code it ran, every stage's metrics
    (test and val scores, selected step, steps, val curve) — never weights."""
    from segshift.pipelines.tracking import git_commit
    record = {"entry": run.entry, "seed": run.seed, "stages": list(run.stages), "identity": run_identity(run),
              "commit": git_commit(project_dir), "metrics": metrics}
    atomic_write_text(record_path(run, project_dir), strict_json(record))


def _score(metrics: dict) -> str:
    if "test" in metrics:
        return f" ({100 * metrics['test']['miou']:.1f} mIoU)"
    if "easy" in metrics:
        return f" ({metrics['easy']} easy / {metrics['hard']} hard)"
    return ""


def _copy(src: Path, dst: Path) -> None:
    atomic_copy(src, dst)      # the times kept, as copy2 did; the mode the umask's, as any new output


def ensure_source(shared: SourceRun, project_dir: Path, progress: bool, label: str) -> tuple[dict, bool]:
    """The shared source training of one seed, run unless done before; (metrics, ran it now)."""
    from segshift.pipelines.train import train_stage
    run_dir = resolve_under(project_dir, shared.run_dir)
    used = run_dir / "source.yaml"
    identity = _identity({"seed": shared.params.engine.seed, **source_identity(shared.params),
                          "paths": shared.params.paths.model_dump(mode="json")})
    result = metrics_path(shared.params, project_dir, "source")
    model = resolve_under(project_dir, shared.params.paths.models) / "source" / "model.pt"
    if result.is_file() and model.is_file() and used.is_file() and used.read_text() == identity:
        return json.loads(result.read_text()), False
    run_dir.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)
    print(f"compare: {label}: training the shared source ({shared.run_dir})", flush=True)
    train_stage(shared.params, "source", project_dir, progress=progress)
    atomic_write_text(used, identity)
    return json.loads(result.read_text()), True


def copy_source(shared: SourceRun, params: Params, project_dir: Path) -> None:
    """The shared source's model and metrics into a run's own directories."""
    models_from = resolve_under(project_dir, shared.params.paths.models) / "source"
    models_to = resolve_under(project_dir, params.paths.models) / "source"
    metrics_from = resolve_under(project_dir, shared.params.paths.metrics)
    metrics_to = resolve_under(project_dir, params.paths.metrics)
    _copy(models_from / "model.pt", models_to / "model.pt")
    for name in ("source.json", "source_per_class.json"):
        if (metrics_from / name).is_file():
            _copy(metrics_from / name, metrics_to / name)


def execute(run: Run, project_dir: Path, progress: bool) -> dict[str, dict]:
    """Run one entry for one seed unless it was recorded or done before; every stage's metrics."""
    label = f"{run.entry} seed {run.seed}"
    recorded = read_record(run, project_dir)
    if recorded is not None:
        print(f"compare: {label}: recorded before ({record_path(run, project_dir)}); skipped", flush=True)
        return {stage: recorded["metrics"][stage] for stage in dict.fromkeys(run.stages)}
    run_dir = resolve_under(project_dir, run.run_dir)
    used = run_dir / "params.yaml"
    record = run_record(run)
    result = metrics_path(run.params, project_dir, run.reported)
    if result.is_file() and used.is_file() and same_run(load_yaml_file(used, "run record"), record):
        print(f"compare: {label}: done before ({run.run_dir}); skipped", flush=True)
    else:
        train_run(run, project_dir, progress, label)
        atomic_write_text(used, _identity(record))
    metrics = {stage: read_metrics(run.params, project_dir, stage) for stage in dict.fromkeys(run.stages)}
    write_record(run, project_dir, metrics)
    return metrics


def train_run(run: Run, project_dir: Path, progress: bool, label: str) -> None:
    """Every stage of the run in order, the shared source trained once per seed."""
    from segshift.pipelines.rank import rank_stage
    from segshift.pipelines.train import train_stage
    resolve_under(project_dir, run.run_dir).mkdir(parents=True, exist_ok=True)
    metrics_path(run.params, project_dir, run.reported).unlink(missing_ok=True)
    for i, stage in enumerate(run.stages):
        if i == 0 and run.source is not None:
            metrics, ran = ensure_source(run.source, project_dir, progress, label)
            copy_source(run.source, run.params, project_dir)
            how = "trained" if ran else "reused"
            print(f"compare: {label}: source done{_score(metrics)}, shared ({how}: "
                  f"{run.source.run_dir})", flush=True)
            continue
        if stage == "rank":
            metrics = rank_stage(run.params, project_dir, progress=progress)
        else:
            metrics = train_stage(run.params, stage, project_dir, progress=progress)
        print(f"compare: {label}: {stage} done{_score(metrics)}", flush=True)


# -- the numbers ------------------------------------------------------------------------------------

def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _nanmean(values: list[Any]) -> float | None:
    finite = [float(v) for v in values if _finite(v)]
    return sum(finite) / len(finite) if finite else None


def labelled_share(stage: str, metrics: dict) -> float:
    """Share of target-train pixels with a human label the entry used: all for the oracle, else
    what the stage reports (`labels.share`, e.g. LabOR), else none."""
    if stage == "oracle":
        return 1.0
    return float(metrics.get("labels", {}).get("share", 0.0))


def val_curve(metrics: dict, metric: str = "val_miou") -> list[tuple[int, float]]:
    """A stage's (step, val score) points in step order (a stage in rounds: on its step axis)."""
    return sorted((int(p["step"]), float(p[metric])) for p in metrics.get("val_curve") or []
                  if _finite(p.get(metric)))


def convergence(metrics: dict) -> dict | None:
    """Where a stage stood when it stopped: the step its val curve peaks at (the earliest best, as
    the engine and the rounds select), its last step, and how much val rose over the last quarter
    of training (from the last validation at or before 3/4 of it). Converged: the peak lies before
    the last quarter, or the rise is under `CONVERGED_RISE`. None without a val curve."""
    curve = val_curve(metrics)
    if not curve:
        return None
    steps = curve[-1][0]
    best = max(curve, key=lambda point: (point[1], -point[0]))
    before = [value for step, value in curve if step <= 0.75 * steps]
    rise = curve[-1][1] - before[-1] if before else None
    converged = best[0] <= 0.75 * steps or (rise is not None and rise < CONVERGED_RISE)
    return {"selected_step": best[0], "steps": steps, "last_quarter_rise": rise, "converged": converged}


def aggregate(entries: dict[str, dict], runs: dict[str, dict[int, dict[str, dict]]]) -> dict:
    """Per entry: each seed's result and their mean ± std, Δ vs its source-only reference, share
    of target pixels labelled, wall time and per-class IoU.

    `entries`: name -> {"stages", "model" (label), "baseline" (entry or None), "control" (its
    budget control, optional), "shared_source" (bool: its first stage is a source training
    shared with entries of the same source settings)};
    `runs`: name -> seed -> stage -> that stage's metrics JSON.
    """
    out: dict[str, dict] = {}
    for name, info in entries.items():
        stages = list(info["stages"])
        reported = reported_stage(stages)
        per_seed = runs[name]
        results = {s: per_seed[s][reported] for s in per_seed}
        miou = {str(s): m["test"]["miou"] for s, m in results.items()}
        mean, std = mean_std(list(miou.values()))
        shares = {str(s): labelled_share(reported, m) for s, m in results.items()}
        pooled = 1 if info.get("shared_source") and reported != "source" else 0
        total = {str(s): sum(float(per_seed[s][st].get("seconds", 0.0)) for st in stages) for s in per_seed}
        method = {str(s): sum(float(per_seed[s][st].get("seconds", 0.0)) for st in stages[pooled:])
                  for s in per_seed}
        per_class = {str(s): m["test"]["per_class_iou"] for s, m in results.items()}
        out[name] = {
            "stages": stages, "reported_stage": reported, "model": info["model"],
            "baseline": info.get("baseline"), "control": info.get("control"),
            "shared_source": bool(info.get("shared_source")),
            "miou": miou, "miou_mean": mean, "miou_std": std,
            "miou_16_mean": _nanmean([m["test"].get("miou_16") for m in results.values()]),
            "miou_13_mean": _nanmean([m["test"].get("miou_13") for m in results.values()]),
            "labelled_share": shares, "labelled_share_mean": statistics.fmean(list(shares.values())),
            "method_seconds": method, "method_seconds_mean": statistics.fmean(list(method.values())),
            "total_seconds": total, "total_seconds_mean": statistics.fmean(list(total.values())),
            "per_class_iou": per_class,
            "per_class_iou_mean": {c: _nanmean([pc.get(c) for pc in per_class.values()]) for c in CLASS_NAMES},
            "val_curve": {str(s): val_curve(m) for s, m in results.items()},
            "convergence": {str(s): convergence(m) for s, m in results.items()},
        }
    for name, entry in out.items():
        base = entry["baseline"]
        entry["delta_vs_source_only"] = (entry["miou_mean"] - out[base]["miou_mean"]
                                         if base is not None and base in out else None)
        control = entry["control"]
        entry["delta_vs_control"] = (entry["miou_mean"] - out[control]["miou_mean"]
                                     if control is not None and control in out else None)
    return out


def model_summary(result: dict, configs: dict[str, dict], profile: dict[str, dict] | None) -> dict:
    """Per model label: its config, entries, best entry by mean mIoU and (if measured) profile."""
    models = {}
    for label, config in configs.items():
        names = [n for n, e in result.items() if e["model"] == label]
        best = max(names, key=lambda n: result[n]["miou_mean"])
        models[label] = {"config": config, "entries": names, "best_entry": best,
                         "best_miou_mean": result[best]["miou_mean"],
                         "profile": (profile or {}).get(label)}
    return models


def data_size(params: Params, project_dir: Path) -> tuple[int, int]:
    """(height, width) of the prepared target test images (the most common size)."""
    from segshift.components.data.manifest import read_manifest
    from segshift.pipelines.remote import prepared_dir
    rows = [r for r in read_manifest(prepared_dir(params, project_dir) / "target").to_pylist()
            if r["split"] == "test"]
    (height, width), _ = Counter((r["height"], r["width"]) for r in rows).most_common(1)[0]
    return int(height), int(width)


def profile_configs(configs: dict[str, dict], height: int, width: int) -> dict:
    """Parameters, GFLOPs and FPS of each model config at the data's size, on this machine."""
    from segshift.components.config import ModelConfig, ProfileConfig
    from segshift.pipelines.profile import describe_device, pick_device, profile_model
    device = pick_device()
    models = {label: ModelConfig.model_validate(c) for label, c in configs.items()}
    cfg = ProfileConfig(height=height, width=width, batch_size=1, warmup=PROFILE_WARMUP,
                        repeats=PROFILE_REPEATS, models=models)
    return {"device": describe_device(device), "height": height, "width": width,
            "models": {label: profile_model(m, cfg, device) for label, m in models.items()}}


# -- the report -------------------------------------------------------------------------------------

def _pct(value: float | None, digits: int = 1) -> str:
    return "–" if value is None or not _finite(value) else f"{100 * value:.{digits}f}"


def compare_markdown(summary: dict) -> str:
    entries: dict[str, dict] = summary["entries"]
    seeds = summary["seeds"]
    lines = ["# Method comparison", "",
             (f"Target-test mIoU (%, over the classes of each entry's `model.classes`) of each entry's last training stage, over seeds "
              f"{', '.join(map(str, seeds))}; mean ± sample std."), "",
             ("| entry | mIoU mean ± std | per seed | vs source-only (Δ) | vs budget control (Δ) "
              "| share of target pixels labelled | wall time (method s, mean) | wall time (total s, mean) |"),
             "|---|---|---|---|---|---|---|---|"]
    for name, e in entries.items():
        per_seed = ", ".join(_pct(v) for v in e["miou"].values())
        if e["baseline"] is None or e["delta_vs_source_only"] is None:
            delta = "–"
        elif e["baseline"] == name:
            delta = "(reference)"
        else:
            delta = f"{100 * e['delta_vs_source_only']:+.1f}"
            if e["baseline"] != "source-only":
                delta += f" (vs {e['baseline']})"
        control = "–" if e.get("delta_vs_control") is None else f"{100 * e['delta_vs_control']:+.1f}"
        share = e["labelled_share_mean"]
        lines.append(f"| {name} | {_pct(e['miou_mean'])} ± {_pct(e['miou_std'])} | {per_seed} | {delta} "
                     f"| {control} | {100 * share:.1f} % | {e['method_seconds_mean']:.1f} | {e['total_seconds_mean']:.1f} |")
    if summary.get("missing"):
        lines += ["", f"Not yet trained (left out of the means): {missing_text(summary['missing'])}."]
    lines += ["", "Stages: " + "; ".join(f"{n}: {' → '.join(e['stages'])}" for n, e in entries.items()) + ".",
              "",
              ("Wall time is the sum of the `seconds` of the stages an entry ran. Entries whose first stage "
               "is `source` with identical model, engine, source, prepare and storage settings share one "
               "source training per seed (run once, copied into each entry's run directory): it counts "
               "once in the total of *each* entry that uses it; the method time leaves it out unless the "
               "source is the entry's reported stage. Δ is against the entry that runs only `source` on "
               "the same model. An adaptation stage keeps training on source labels too, so part of its "
               "gain over source-only is its extra steps: the budget control (`inter.method: supervised`, "
               "the same steps on source labels alone) measures that part, and the Δ against it is what "
               "the target term adds."), "",
              "## Convergence", "",
              (f"Per seed: the step the val curve peaks at / the stage's steps, and val's rise over the "
               f"last quarter of training. Converged (✓): the peak lies before the last quarter, or the "
               f"rise is under {100 * CONVERGED_RISE:.1f} mIoU. Curves: `{CURVES_NAME}`."), "",
              "| entry | per seed: selected step / steps (rise over the last quarter) | converged |",
              "|---|---|---|",
              *[convergence_row(name, e) for name, e in entries.items()], "",
              *literature_lines(summary),
              "## Per-class IoU (%, mean over seeds)", "",
              "| entry | " + " | ".join(CLASS_NAMES) + " |",
              "|---|" + "---|" * len(CLASS_NAMES)]
    for name, e in entries.items():
        lines.append(f"| {name} | " + " | ".join(_pct(e["per_class_iou_mean"].get(c)) for c in CLASS_NAMES) + " |")
    models = summary.get("models") or {}
    profile = summary.get("profile") or {}
    if models:
        size = (f" at the data's size, {profile['height']}×{profile['width']} (H×W), batch 1, on "
                f"{profile['device']}" if profile else "")
        lines += ["", "## Real-time analysis", "",
                  (f"Each model the entries use: size, FLOPs (2 per multiply-add) and speed of one forward"
                   f"{size}, next to the best entry on it (FPS depends on the machine's load)."), "",
                  "| model | entries | params (M) | GFLOPs | latency (ms) | FPS | best mIoU (entry) |",
                  "|---|---|---|---|---|---|---|"]
        for label, m in models.items():
            p = m.get("profile")
            numbers = (f"{p['params_m']:.2f} | {p['gflops']:.2f} | {p['latency_ms_mean']:.1f} ± "
                       f"{p['latency_ms_std']:.1f} | {p['fps']:.1f}" if p else "– | – | – | –")
            lines.append(f"| {label} | {', '.join(m['entries'])} | {numbers} | "
                         f"{_pct(m['best_miou_mean'])} ({m['best_entry']}) |")
    return "\n".join(lines) + "\n"


def literature_lines(summary: dict) -> list[str]:
    """Per entry with a published number: our Δ over source-only and over its budget control
    beside the published Δ over the published source-only, and whether the order of the methods
    agrees (the pairs it does not, named)."""
    published, entries = summary.get("literature") or {}, summary["entries"]
    compared = [n for n in published if n in entries]
    if not compared:
        return []
    lines = ["## Ours vs the literature", "",
             ("Published target mIoU of each method in the setting this comparison miniaturises "
              "(`compare.literature`), its Δ over the published source-only, and ours (Δ over the "
              "source-only entry, and over the entry's budget control where one is compared)."), "",
             "| entry | published mIoU | published Δ | our mIoU | our Δ vs source-only | our Δ vs control |",
             "|---|---|---|---|---|---|"]
    for name in compared:
        e = entries[name]
        base = e["baseline"]
        reference = published.get(base) if base is not None and base != name else None
        lit_delta = "–" if reference is None else f"{published[name] - reference:+.1f}"
        ours = "(reference)" if base == name else ("–" if e["delta_vs_source_only"] is None
                                                   else f"{100 * e['delta_vs_source_only']:+.1f}")
        control = "–" if e.get("delta_vs_control") is None else f"{100 * e['delta_vs_control']:+.1f}"
        lines.append(f"| {name} | {published[name]:.1f} | {lit_delta} | {_pct(e['miou_mean'])} | {ours} | {control} |")
    flipped = [(a, b) for i, a in enumerate(compared) for b in compared[i + 1:]
               if (published[a] - published[b]) * (entries[a]["miou_mean"] - entries[b]["miou_mean"]) < 0]
    lines += ["", "Order of the methods: " + ("agrees with the literature." if not flipped else
              "differs from the literature for " + ", ".join(f"{a} / {b}" for a, b in flipped) + ".")]
    missing = [n for n in published if n not in entries]
    if missing:
        lines.append(f"Published but not in this report: {', '.join(missing)}.")
    return lines + [""]


def convergence_row(name: str, entry: dict) -> str:
    cells, done = [], 0
    for seed, c in (entry.get("convergence") or {}).items():
        if c is None:
            cells.append(f"s{seed}: no val curve")
            continue
        rise = "–" if c["last_quarter_rise"] is None else f"{100 * c['last_quarter_rise']:+.1f}"
        cells.append(f"s{seed}: {c['selected_step']} / {c['steps']} ({rise}){' ✓' if c['converged'] else ''}")
        done += bool(c["converged"])
    return f"| {name} | {'; '.join(cells)} | {done} of {len(cells)} |"


def _figure_bytes(figure) -> bytes:
    from segshift.pipelines.sweep_report import figure_png
    return figure_png(figure)


def miou_picture(entries: dict[str, dict]) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(entries)
    figure, ax = plt.subplots(figsize=(max(6, 0.8 * len(names) + 2), 4.5), dpi=100)
    means = [100 * entries[n]["miou_mean"] for n in names]
    stds = [100 * entries[n]["miou_std"] for n in names]
    ax.bar(range(len(names)), means, yerr=stds, capsize=4, color="#4c72b0", zorder=2)
    references = [(n, "source-only", "#dd8452") for n in names if entries[n]["baseline"] == n]
    references += [(n, "oracle", "#55a868") for n in names if entries[n]["reported_stage"] == "oracle"]
    for style, (name, kind, colour) in zip(("--", ":", "-.", (0, (5, 1))) * 4, references):
        ax.axhline(100 * entries[name]["miou_mean"], color=colour, linestyle=style, linewidth=1.2,
                   label=f"{kind if name == kind else f'{kind}: {name}'} ({100 * entries[name]['miou_mean']:.1f})",
                   zorder=3)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("target-test mIoU (%)")
    ax.set_title("mIoU per method (mean ± std over seeds)", fontsize=10)
    ax.grid(axis="y", alpha=0.3, zorder=0)
    if references:
        ax.legend(fontsize=7, loc="upper left")
    return _figure_bytes(figure)


def per_class_picture(entries: dict[str, dict]) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    names = list(entries)
    values = np.array([[np.nan if entries[n]["per_class_iou_mean"].get(c) is None
                        else 100 * entries[n]["per_class_iou_mean"][c] for c in CLASS_NAMES] for n in names],
                      dtype=float)
    figure, ax = plt.subplots(figsize=(12, 1.2 + 0.45 * len(names)), dpi=100)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0, vmax=100, aspect="auto")
    for i in range(len(names)):
        for j in range(len(CLASS_NAMES)):
            if np.isfinite(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if values[i, j] < 50 else "black")
    ax.set_xticks(range(len(CLASS_NAMES)))
    ax.set_xticklabels(CLASS_NAMES, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    ax.set_title("per-class IoU on target test (%, mean over seeds; grey: class absent)", fontsize=10)
    figure.colorbar(image, ax=ax, label="IoU (%)")
    return _figure_bytes(figure)


def curves_picture(entries: dict[str, dict]) -> bytes:
    """Target-val mIoU against steps of each entry's reported stage, one panel per entry, a line
    per seed; the selected step marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(entries)
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    figure, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), dpi=100, squeeze=False)
    for ax, name in zip(axes.flat, names):
        for seed, curve in entries[name].get("val_curve", {}).items():
            if curve:
                steps, values = zip(*curve)
                line, = ax.plot(steps, [100 * v for v in values], marker=".", linewidth=1, label=f"seed {seed}")
                chosen = (entries[name].get("convergence", {}).get(seed) or {}).get("selected_step")
                if chosen is not None:
                    ax.axvline(chosen, color=line.get_color(), linestyle=":", linewidth=0.8)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].set_ylabel("target-val mIoU (%)", fontsize=8)
    axes.flat[0].legend(fontsize=6)
    figure.suptitle("val curves of each entry's reported stage (dotted: the step selected on val)", fontsize=10)
    figure.tight_layout()
    return _figure_bytes(figure)


def report_paths(params: Params, project_dir: Path) -> dict[str, Path]:
    md = resolve_under(project_dir, params.compare.report)
    return {"md": md, "json": md.parent / JSON_NAME, "miou": md.parent / MIOU_NAME,
            "per_class": md.parent / PER_CLASS_NAME, "curves": md.parent / CURVES_NAME}


def write_report(summary: dict, paths: dict[str, Path]) -> None:
    atomic_write_text(paths["json"], strict_json(summary))
    atomic_write_bytes(paths["miou"], miou_picture(summary["entries"]))
    atomic_write_bytes(paths["per_class"], per_class_picture(summary["entries"]))
    atomic_write_bytes(paths["curves"], curves_picture(summary["entries"]))
    atomic_write_text(paths["md"], compare_markdown(summary))


def metric_key(name: str) -> str:
    """An entry name as MLflow accepts it in a metric key (alphanumerics, _ - . / space :)."""
    return "".join(c if c.isalnum() or c in "_-. :" else "_" for c in name)


def log_to_mlflow(params: Params, project_dir: Path, summary: dict, paths: dict[str, Path]) -> None:
    from segshift.pipelines.tracking import StageTracker
    with StageTracker(params, stage="compare", project_dir=project_dir) as tracker:
        tracker.set_tags({"segshift.compare.entries": ",".join(summary["entries"]),
                          "segshift.compare.seeds": ",".join(map(str, summary["seeds"]))})
        metrics: dict[str, float] = {}
        for name, e in summary["entries"].items():
            key = metric_key(name)
            for field in ("miou_mean", "miou_std", "labelled_share_mean", "method_seconds_mean",
                          "total_seconds_mean", "delta_vs_source_only"):
                if _finite(e.get(field)):
                    metrics[f"{field}/{key}"] = e[field]
        tracker.log_metrics(metrics)
        for path in paths.values():
            tracker.log_artifact(path)


def collect_runs(plan: Plan, project_dir: Path, progress: bool, train: bool) -> tuple[dict, list[Run]]:
    """Every run's stage metrics: trained now unless recorded or done before, or (`train` off)
    from the records alone; with the runs that have none (only when not training)."""
    runs: dict[str, dict[int, dict[str, dict]]] = {name: {} for name in plan.entries}
    missing = []
    for run in plan.runs:
        if train:
            runs[run.entry][run.seed] = execute(run, project_dir, progress)
        elif (record := read_record(run, project_dir)) is not None:
            runs[run.entry][run.seed] = {stage: record["metrics"][stage] for stage in dict.fromkeys(run.stages)}
        else:
            missing.append(run)
    return {name: per_seed for name, per_seed in runs.items() if per_seed}, missing


def run_compare(params: Params, project_dir: Path, entries: list[str] | None = None,
                seeds: list[int] | None = None, progress: bool = True, profile: bool = True,
                train: bool = True) -> dict:
    """Plan (validated first), run every entry x seed (or, `train` off, read their records), write
    the report and log it; the summary."""
    project_dir = Path(project_dir).resolve()
    plan = build_plan(params, entries, seeds)
    runs, missing = collect_runs(plan, project_dir, progress, train)
    if not runs:
        raise CompareError(f"no run of the comparison is recorded in {params.compare.records}; "
                           "run `segshift compare` to train them")
    first = {r.entry: r for r in reversed(plan.runs)}
    info = {name: {"stages": list(entry.stages), "model": plan.models[name], "baseline": plan.baselines[name],
                   "control": plan.controls[name],
                   "shared_source": first[name].source is not None}
            for name, entry in plan.entries.items() if name in runs}
    result = aggregate(info, runs)
    configs = {}
    for name in result:
        configs.setdefault(plan.models[name], first[name].params.model.model_dump(mode="json"))
    measured = None
    if profile:
        height, width = data_size(params, project_dir)
        print(f"compare: profiling {len(configs)} model(s) at {width}x{height}", flush=True)
        measured = profile_configs(configs, height, width)
    summary = {"seeds": plan.seeds, "entries": result,
               "models": model_summary(result, configs, measured["models"] if measured else None),
               "profile": {k: v for k, v in measured.items() if k != "models"} if measured else None,
               "source_runs": sorted({str(r.source.run_dir.parent) for r in plan.runs if r.source}),
               "budget": dict(params.compare.set),
               "literature": dict(params.compare.literature),
               "missing": [f"{r.entry} seed {r.seed}" for r in missing]}
    paths = report_paths(params, project_dir)
    write_report(summary, paths)
    log_to_mlflow(params, project_dir, summary, paths)
    return summary


# -- the README's results table ---------------------------------------------------------------------

README_BEGIN, README_END = "<!-- compare-table:begin -->", "<!-- compare-table:end -->"


def missing_text(missing: list[str]) -> str:
    """["a seed 0", "b seed 0", "a seed 1"] -> "a (seeds 0, 1), b (seed 0)": the runs not yet trained."""
    seeds: dict[str, list[str]] = {}
    for run in missing:
        entry, _, seed = run.rpartition(" seed ")
        seeds.setdefault(entry, []).append(seed)
    return ", ".join(f"{entry} (seed{'s' if len(s) > 1 else ''} {', '.join(s)})" for entry, s in seeds.items())


def readme_table(summary: dict) -> str:
    """The README's results block: per entry mean ± std (per seed), Δ vs source-only and vs the
    budget control, share of target pixels labelled; the budget and any missing runs named."""
    budget = ", ".join(f"`{k}: {v}`" for k, v in summary.get("budget", {}).items())
    lines = [f"Target-test mIoU (%) from `segshift compare` (`reports/compare.md`; regenerate this block with "
             f"`segshift compare --report-only --readme README.md`), mean ± std over the seeds shown, 2-core "
             f"CPU, the budget of `compare.set` ({budget}; entries may set their own, see `params.yaml`).", ""]
    if summary.get("missing"):
        lines += [f"Not yet trained (left out of the means): {missing_text(summary['missing'])}.", ""]
    lines += ["| entry | mIoU mean ± std (per seed) | Δ vs source-only | Δ vs budget control | target pixels labelled |",
              "|---|---|---|---|---|"]
    for name, e in summary["entries"].items():
        per_seed = ", ".join(f"s{seed}: {_pct(v)}" for seed, v in e["miou"].items())
        if e["baseline"] is None or e["delta_vs_source_only"] is None:
            delta = "–"
        elif e["baseline"] == name:
            delta = "(reference)"
        else:
            delta = f"{100 * e['delta_vs_source_only']:+.1f}" + (
                "" if e["baseline"] == "source-only" else f" (vs {e['baseline']})")
        control = ("–" if e.get("delta_vs_control") is None
                   else f"{100 * e['delta_vs_control']:+.1f} (vs {e['control']})")
        lines.append(f"| {name} | {_pct(e['miou_mean'])} ± {_pct(e['miou_std'])} ({per_seed}) | {delta} | "
                     f"{control} | {100 * e['labelled_share_mean']:.1f} % |")
    return "\n".join(lines)


def update_readme(path: Path, summary: dict) -> None:
    """Replace what lies between the README's compare-table markers with `readme_table`."""
    text = path.read_text()
    if text.count(README_BEGIN) != 1 or text.count(README_END) != 1 or \
            text.index(README_BEGIN) > text.index(README_END):
        raise CompareError(f"{path}: expected one '{README_BEGIN}' line and, after it, one '{README_END}' line")
    head, rest = text.split(README_BEGIN)
    _, tail = rest.split(README_END)
    atomic_write_text(path, f"{head}{README_BEGIN}\n{readme_table(summary)}\n{README_END}{tail}")


def _cmd_compare(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    summary = run_compare(params, Path.cwd(), entries=args.entries, seeds=args.seeds, progress=not args.quiet,
                          train=not args.report_only)
    paths = report_paths(params, Path.cwd().resolve())
    print(compare_markdown(summary).split("\n## ")[0].rstrip())
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    if args.readme:
        update_readme(Path(args.readme), summary)
        print(f"updated the results table of {args.readme}")
    return 0


def build_compare_parser(sub, add_params) -> None:
    parser = sub.add_parser("compare", help="every method of compare.entries per seed: mIoU, per class, "
                                            "labelled share, time, real-time analysis")
    parser.add_argument("--entries", nargs="+", default=None, metavar="NAME",
                        help="entries to run (default: all of compare.entries)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, metavar="N",
                        help="engine seeds to run (default: compare.seeds)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: the report from the runs recorded in compare.records")
    parser.add_argument("--readme", default=None, metavar="PATH",
                        help="also rewrite the results table between PATH's compare-table markers")
    add_params(parser)
    parser.set_defaults(func=_cmd_compare)
