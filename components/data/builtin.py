"""Writing the built-in street scenes in the prepared format (images, labels, manifest)."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from segshift.components.data.manifest import SampleRecord, write_manifest
from segshift.components.data.synthetic import (choose_condition, render_sample, sample_rng,
                                                source_style, target_style)
from segshift.components.io import write_png
from segshift.components.parallel import parallel_map

DATASET_NAME = "builtin"
# (domain, split, counts field) for every split the generator writes.
BUILTIN_SPLITS: tuple[tuple[str, str, str], ...] = (
    ("source", "train", "source_train"), ("source", "val", "source_val"),
    ("target", "train", "target_train"), ("target", "val", "target_val"),
    ("target", "test", "target_test"),
)


@dataclass(frozen=True)
class BuiltinSpec:
    """What the generator needs, detached from the pydantic config so it pickles cheaply."""

    seed: int
    height: int
    width: int
    appearance_gap: float
    conditions: tuple[tuple[str, float], ...]


def spec_from_config(cfg) -> BuiltinSpec:
    return BuiltinSpec(seed=cfg.seed, height=cfg.height, width=cfg.width,
                       appearance_gap=cfg.appearance_gap,
                       conditions=tuple(sorted(cfg.conditions.items())))


def render_one(spec: BuiltinSpec, out_dir: str, job: tuple[str, str, int]) -> SampleRecord:
    domain, split, index = job
    rng = sample_rng(spec.seed, domain, split, index)
    if domain == "source":
        style = source_style()
        condition = choose_condition(style.conditions, rng)
    else:
        style = target_style(spec.appearance_gap)
        condition = choose_condition(dict(spec.conditions), rng)
    image, label = render_sample(style, spec.height, spec.width, condition, rng)
    sample_id = f"{domain}_{split}_{index:06d}"
    image_rel, label_rel = f"images/{split}/{sample_id}.png", f"labels/{split}/{sample_id}.png"
    write_png(Path(out_dir) / image_rel, image)
    write_png(Path(out_dir) / label_rel, label)
    return SampleRecord(sample_id=sample_id, dataset=DATASET_NAME, domain=domain, split=split,
                        image=image_rel, label=label_rel, height=spec.height, width=spec.width,
                        condition=condition)


def write_builtin_domain(spec: BuiltinSpec, counts: dict[str, int], domain: str, out_dir: Path,
                         workers: int, progress: bool = True) -> list[SampleRecord]:
    """Render every split of one domain into `out_dir` and write its manifest."""
    jobs = [(d, split, i) for d, split, key in BUILTIN_SPLITS if d == domain
            for i in range(counts[key])]
    render = functools.partial(render_one, spec, str(out_dir))
    records = list(parallel_map(render, jobs, workers, desc=f"builtin {domain}", progress=progress))
    write_manifest(records, out_dir)
    return records
