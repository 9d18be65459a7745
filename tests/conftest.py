"""Shared fixtures: a tiny, valid params file derived from the repository's own params.yaml."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

TINY_BUILTIN = {
    "prepare.builtin.height": 64, "prepare.builtin.width": 128,
    "prepare.builtin.counts": {"source_train": 6, "source_val": 2, "target_train": 6,
                               "target_val": 2, "target_test": 3},
    "prepare.workers": 1,
}


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        tree = tree[key]
    tree[last] = value


def write_params(directory: Path, overrides: dict[str, Any] | None = None) -> Path:
    """params.yaml from the repo with `overrides` (dotted keys) applied, written into `directory`."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, value in {**TINY_BUILTIN, "prepare.out_dir": str(directory / "prepared"),
                          **(overrides or {})}.items():
        set_dotted(raw, dotted, value)
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def tiny_params(tmp_path: Path) -> Path:
    return write_params(tmp_path)
