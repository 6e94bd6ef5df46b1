"""postprocess.py: connected regions (against scipy), the largest region with its holes filled, and the edited
probability map; predict.py's --postprocess end to end is in test_predict.py."""

import numpy as np
import pytest

import postprocess


def test_label_regions_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    for density in (0.3, 0.5, 0.7):
        mask = rng.random((37, 53)) < density
        for connectivity, structure in ((4, None), (8, np.ones((3, 3)))):
            ours, count = postprocess.label_regions(mask, connectivity)
            theirs, their_count = ndimage.label(mask, structure=structure)
            assert count == their_count
            np.testing.assert_array_equal(ours, theirs)  # both number regions in raster order


def test_largest_region_filled_known_shapes():
    mask = np.zeros((20, 20), bool)
    mask[2:12, 2:12] = True  # a 10x10 square ring with a 4x4 hole
    mask[5:9, 5:9] = False
    mask[15:18, 15:18] = True  # a smaller square elsewhere
    mask[0, 19] = True  # a pixel touching the border
    expected = np.zeros_like(mask)
    expected[2:12, 2:12] = True
    np.testing.assert_array_equal(postprocess.largest_region_filled(mask), expected)
    empty = np.zeros((8, 8), bool)
    np.testing.assert_array_equal(postprocess.largest_region_filled(empty), empty)
    # diagonal neighbours belong to one region (8-connectivity)
    diagonal = np.eye(6, dtype=bool)
    np.testing.assert_array_equal(postprocess.largest_region_filled(diagonal), diagonal)


def test_postprocess_keeps_the_main_region_probabilities():
    probs = np.full((16, 16), 0.1, np.float32)
    probs[2:10, 2:10] = 0.9
    probs[5, 5] = 0.2  # a hole
    probs[13:15, 13:15] = 0.8  # a small second region
    edited = postprocess.postprocess_probabilities(probs, 0.5)
    assert edited[5, 5] == 1.0 and (edited[13:15, 13:15] == 0).all()
    keep = probs > 0.5
    keep[13:15, 13:15] = False
    np.testing.assert_array_equal(edited[keep], probs[keep])
