"""What the round methods share (components/methods/rounds.py)."""
import pytest

from segshift.components.methods.rounds import label_file, source_and_target, split_iterations
from segshift.components.paths import UnsafePathError


def test_split_iterations_shares_every_step():
    assert split_iterations(10, 3) == [4, 3, 3]
    assert split_iterations(2, 3) == [1, 1, 1]      # every round trains at least once


def test_source_and_target_names_the_target_role():
    data = source_and_target("r/labels", ["a", "b"], "pseudo")
    assert data == {"labelled": {"domain": "source", "ids": None, "labels_dir": None},
                    "pseudo": {"domain": "target", "ids": ["a", "b"], "labels_dir": "r/labels"}}


def test_label_file_stays_under_its_folder(tmp_path):
    assert label_file(tmp_path, "city/a") == tmp_path / "city" / "a.png"
    with pytest.raises(UnsafePathError):
        label_file(tmp_path, "../escape")
