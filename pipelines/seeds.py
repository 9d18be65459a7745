"""`segshift seeds`: the pipeline's training stages repeated over seeds, reported as mean ± std.

Each seed runs source -> oracle -> inter -> rank -> intra -> evaluate on the already prepared data
with `engine.seed` set to it, writing everything under `<seeds.out_dir>/seed-<n>/` (seeds from `seeds.values` or `--seeds`) so the DVC
pipeline's own outputs are never touched. A seed whose summary exists for the same parameters is
skipped, and an interrupted stage resumes from its checkpoint, so re-running the command picks up
where it stopped. Writes `<seeds.out_dir>/seeds.json` (per stage: each seed's mIoU, mean, std,
share of the source->oracle gap closed) and `seeds.md`; every stage is an MLflow run as usual.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path

import yaml

from segshift.components.config import Params, load_params
from segshift.components.io import atomic_write_text
from segshift.components.stages import ON_PREPARED

PIPELINE = ON_PREPARED    # each seed reuses the prepared data: every later stage, in order


def seed_params(params: Params, seed: int, run_dir: Path) -> Params:
    """The params of one seed: its engine seed, and every output path inside `run_dir`."""
    return params.relocated(run_dir, seed=seed)


def run_seed(params: Params, project_dir: Path, progress: bool,
             stage_done: Callable[[str], None] = lambda stage: None) -> dict:
    """source, oracle, inter, rank, intra and evaluate for one seed's params; returns the summary."""
    from segshift.pipelines.evaluate import evaluate_stages
    from segshift.pipelines.rank import rank_stage
    from segshift.pipelines.train import train_stage
    for stage in PIPELINE:
        if stage == "rank":
            rank_stage(params, project_dir, progress=progress)
        elif stage == "evaluate":
            summary, _ = evaluate_stages(params, project_dir, progress=progress)
        else:
            train_stage(params, stage, project_dir, progress=progress)
        stage_done(stage)
    return summary


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(summaries: dict[int, dict]) -> dict:
    """Per stage: each seed's mIoU (and gap closed), their mean and sample std."""
    stages = list(next(iter(summaries.values())))
    out = {}
    for stage in stages:
        entry = {"miou": {str(s): summaries[s][stage]["miou"] for s in summaries}}
        entry["miou_mean"], entry["miou_std"] = mean_std(list(entry["miou"].values()))
        gaps = [summaries[s][stage].get("gap_closed") for s in summaries]
        if all(g is not None and math.isfinite(g) for g in gaps):
            entry["gap_closed_mean"], entry["gap_closed_std"] = mean_std(gaps)
        out[stage] = entry
    return out


def seeds_markdown(result: dict) -> str:
    lines = ["| stage | target-test mIoU (mean ± std) | per seed | gap closed (mean ± std) |",
             "|---|---|---|---|"]
    for stage, entry in result.items():
        per_seed = ", ".join(f"{100 * v:.1f}" for v in entry["miou"].values())
        gap = (f"{100 * entry['gap_closed_mean']:.0f} ± {100 * entry['gap_closed_std']:.0f} %"
               if "gap_closed_mean" in entry else "–")
        lines.append(f"| {stage} | {100 * entry['miou_mean']:.1f} ± {100 * entry['miou_std']:.1f} "
                     f"| {per_seed} | {gap} |")
    return "\n".join(lines) + "\n"


def run_seeds(params: Params, seeds: list[int], project_dir: Path, out_dir: Path,
              progress: bool = True) -> dict:
    summaries = {}
    for seed in seeds:
        run_dir = out_dir / f"seed-{seed}"
        this = seed_params(params, seed, run_dir)
        used, summary_path = run_dir / "params.yaml", Path(this.evaluate.out)
        identity = yaml.safe_dump(this.model_dump(mode="json"), sort_keys=True)
        if summary_path.is_file() and used.is_file() and used.read_text() == identity:
            print(f"seed {seed}: done before ({summary_path}); skipped")
            summaries[seed] = json.loads(summary_path.read_text())
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        summary_path.unlink(missing_ok=True)
        summaries[seed] = run_seed(this, project_dir, progress,
                                   lambda stage, s=seed: print(f"seed {s}: {stage} done", flush=True))
        atomic_write_text(used, identity)
    result = aggregate(summaries)
    atomic_write_text(out_dir / "seeds.json", json.dumps({"seeds": seeds, "stages": result}, indent=2))
    atomic_write_text(out_dir / "seeds.md", seeds_markdown(result))
    return result


def _cmd_seeds(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    project_dir = Path.cwd().resolve()
    out_dir = project_dir / params.seeds.out_dir
    result = run_seeds(params, args.seeds or params.seeds.values, project_dir, out_dir,
                       progress=not args.quiet)
    print(seeds_markdown(result))
    print(f"wrote {out_dir / 'seeds.json'} and {out_dir / 'seeds.md'}")
    return 0


def build_seeds_parser(sub, add_params) -> None:
    parser = sub.add_parser("seeds", help="repeat the training stages over seeds; mean ± std on target test")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, metavar="N",
                        help="engine seeds to run (default: seeds.values)")
    add_params(parser)
    parser.set_defaults(func=_cmd_seeds)
