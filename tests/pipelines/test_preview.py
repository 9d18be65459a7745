import cv2

from segshift.pipelines.cli import main
from tests.conftest import write_params


def test_preview_writes_four_rows_of_six_tiles(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["preview", "--params", str(write_params(tmp_path)), "--out", str(out)]) == 0
    picture = cv2.imread(str(out))
    assert picture.shape == (4 * 64 + 3 * 2, 6 * 128 + 5 * 2, 3)
    assert str(out) in capsys.readouterr().out
