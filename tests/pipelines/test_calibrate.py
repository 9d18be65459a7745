"""The built-in data's domain gap, measured the way the README reports it (at a smaller scale)."""
import json

import pytest

from segshift.pipelines.cli import main
from tests.conftest import write_params


@pytest.mark.slow
def test_source_only_stays_far_below_the_oracle(tmp_path):
    params = write_params(tmp_path, {
        "prepare.workers": 2,
        "prepare.builtin.height": 128, "prepare.builtin.width": 256,
        "prepare.builtin.counts": {"source_train": 600, "source_val": 10, "target_train": 600,
                                   "target_val": 10, "target_test": 120},
        "calibrate.iterations": 500, "calibrate.out": str(tmp_path / "calibration.json"),
    })
    assert main(["prepare", "--params", str(params), "--quiet"]) == 0
    assert main(["calibrate", "--params", str(params), "--quiet"]) == 0
    results = json.loads((tmp_path / "calibration.json").read_text())
    assert results["oracle"]["miou"] > 0.3            # the oracle really learned the target
    assert results["ratios"]["source_only"] <= 0.7
    assert results["ratios"]["source_only_colour_norm"] <= 0.7
