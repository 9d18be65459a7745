import numpy as np

from segshift.components.visualize import colorize, grid


def test_colorize_uses_cityscapes_colours_and_black_for_ignore():
    rgb = colorize(np.array([[0, 13, 255]], np.uint8))
    assert rgb.tolist() == [[[128, 64, 128], [0, 0, 142], [0, 0, 0]]]


def test_grid_tiles_with_gaps():
    tile = np.zeros((4, 6, 3), np.uint8)
    picture = grid([[tile, tile, tile], [tile]], gap=2)
    assert picture.shape == (4 * 2 + 2, 6 * 3 + 2 * 2, 3)
    assert (picture[4:6] == 255).all() and (picture[:4, :6] == 0).all()
