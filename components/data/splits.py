"""Turning a dataset's own splits into the pipeline's roles: train, val (model selection), test (report)."""
from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.compute as pc


def _stable_key(name: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()


def city_of(sample_id: str) -> str:
    """Cityscapes stems start with the city: aachen_000000_000019 -> aachen."""
    return sample_id.split("_", 1)[0]


def hold_out_val(table: pa.Table, fraction: float, seed: int, by_group: bool) -> pa.Table:
    """Move about `fraction` of the train rows to `val`, chosen reproducibly.

    With `by_group`, whole cities move together so that val never shares a sequence with train.
    """
    if fraction <= 0:
        return table
    splits = table.column("split").to_pylist()
    ids = table.column("sample_id").to_pylist()
    train_ids = [i for i, s in zip(ids, splits) if s == "train"]
    groups = sorted({city_of(i) if by_group else i for i in train_ids},
                    key=lambda g: _stable_key(g, seed))
    target = max(1, round(fraction * len(train_ids)))
    chosen: set[str] = set()
    moved = 0
    for group in groups:
        if moved >= target or len(chosen) == len(groups) - 1:
            break
        chosen.add(group)
        moved += sum(1 for i in train_ids if (city_of(i) if by_group else i) == group)
    new_splits = ["val" if s == "train" and (city_of(i) if by_group else i) in chosen else s
                  for i, s in zip(ids, splits)]
    return table.set_column(table.schema.get_field_index("split"), "split",
                            pa.array(new_splits, pa.string()))


def cityscapes_roles(table: pa.Table, val_fraction: float, seed: int) -> pa.Table:
    """Cityscapes as target: its val split is the report (test); val is held out from train.

    The official test split has no public labels, so it is dropped.
    """
    table = table.filter(pc.not_equal(table.column("split"), "test"))
    as_test = pc.if_else(pc.equal(table.column("split"), "val"), "test", table.column("split"))
    table = table.set_column(table.schema.get_field_index("split"), "split", as_test)
    return hold_out_val(table, val_fraction, seed, by_group=True)
