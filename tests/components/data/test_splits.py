import pyarrow as pa

from segshift.components.data.splits import cityscapes_roles, hold_out_val


def _table(ids, splits):
    return pa.table({"sample_id": ids, "split": splits})


def test_hold_out_by_city_moves_whole_cities_reproducibly():
    ids = [f"{city}_000000_{i:06d}" for city in ("aachen", "bonn", "cologne", "dus") for i in range(5)]
    table = _table(ids, ["train"] * len(ids))
    out = hold_out_val(table, 0.25, seed=0, by_group=True)
    val = [i for i, s in zip(ids, out.column("split").to_pylist()) if s == "val"]
    assert len(val) == 5 and len({v.split("_")[0] for v in val}) == 1
    assert hold_out_val(table, 0.25, seed=0, by_group=True).equals(out)
    assert hold_out_val(table, 0.0, seed=0, by_group=True).equals(table)


def test_hold_out_never_empties_train():
    table = _table(["a_1", "b_1"], ["train", "train"])
    splits = hold_out_val(table, 0.5, seed=1, by_group=True).column("split").to_pylist()
    assert sorted(splits) == ["train", "val"]


def test_cityscapes_val_becomes_test_and_official_test_is_dropped():
    ids = ["aachen_0_1", "aachen_0_2", "bonn_0_1", "bonn_0_2", "frankfurt_0_1", "berlin_0_1"]
    splits = ["train", "train", "train", "train", "val", "test"]
    out = cityscapes_roles(_table(ids, splits), 0.5, seed=0)
    rows = dict(zip(out.column("sample_id").to_pylist(), out.column("split").to_pylist()))
    assert "berlin_0_1" not in rows
    assert rows["frankfurt_0_1"] == "test"
    assert sorted(rows.values()) == ["test", "train", "train", "val", "val"]
