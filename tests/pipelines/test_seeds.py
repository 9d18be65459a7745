"""`segshift seeds`: per-seed params stay inside their run directory; mean ± std are right."""
import json
import statistics

import pytest

from segshift.components.config import load_params
from segshift.pipelines.cli import main
from segshift.pipelines.seeds import aggregate, seed_params, seeds_markdown
from tests.conftest import write_params


def test_seed_params_move_every_output_into_the_run_directory(tiny_params, tmp_path):
    params = load_params(tiny_params)
    run = tmp_path / "runs" / "seed-3"
    seeded = seed_params(params, 3, run)
    assert seeded.engine.seed == 3
    outputs = [*seeded.paths.model_dump().values(), seeded.rank.out_dir, seeded.evaluate.out]
    assert all(str(p).startswith(str(run)) for p in outputs)
    assert seeded.prepare == params.prepare and seeded.inter == params.inter


def test_aggregate_gives_mean_sample_std_and_gap():
    summaries = {s: {"source": {"miou": m, "gap_closed": 0.0}, "inter": {"miou": i, "gap_closed": g}}
                 for s, m, i, g in [(0, 0.20, 0.24, 0.1), (1, 0.22, 0.25, 0.2), (2, 0.21, 0.26, 0.3)]}
    result = aggregate(summaries)
    assert result["inter"]["miou_mean"] == pytest.approx(0.25)
    assert result["inter"]["miou_std"] == pytest.approx(statistics.stdev([0.24, 0.25, 0.26]))
    assert result["inter"]["gap_closed_mean"] == pytest.approx(0.2)
    table = seeds_markdown(result)
    assert "| inter | 25.0 ± 1.0 | 24.0, 25.0, 26.0 | 20 ± 10 % |" in table


@pytest.mark.slow
def test_two_seeds_run_end_to_end_and_a_rerun_skips_them(tmp_path, monkeypatch):
    tiny = {f"{stage}.{key}": 2 for stage in ("source", "oracle", "inter", "intra")
            for key in ("iterations", "batch_size")}
    params = write_params(tmp_path, {**tiny, "engine.val_every": 2, "engine.checkpoint_every": 2,
                                     "model.width": 0.125, "rank.lambda": 0.5, "ray.local_num_cpus": 1,
                                     "seeds.out_dir": str(tmp_path / "runs"),
                                     "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    monkeypatch.chdir(tmp_path)
    assert main(["prepare", "--params", str(params), "--quiet"]) == 0
    assert main(["seeds", "--seeds", "0", "1", "--params", str(params), "--quiet"]) == 0
    result = json.loads((tmp_path / "runs" / "seeds.json").read_text())
    assert result["seeds"] == [0, 1]
    assert set(result["stages"]) == {"source", "inter", "intra", "oracle"}
    for seed in (0, 1):
        assert (tmp_path / "runs" / f"seed-{seed}" / "models" / "intra" / "model.pt").is_file()
    stamp = (tmp_path / "runs" / "seed-0" / "metrics" / "summary.json").stat().st_mtime_ns
    assert main(["seeds", "--seeds", "0", "--params", str(params), "--quiet"]) == 0
    assert (tmp_path / "runs" / "seed-0" / "metrics" / "summary.json").stat().st_mtime_ns == stamp
