"""postprocess.py: connected regions (against scipy), the region kept (most probability near the centre), its
holes filled, the fallback for an empty mask, and the edited probability map; predict.py's --postprocess end to
end is in test_predict.py."""

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


def test_the_region_kept_is_filled_and_others_dropped():
    mask = np.zeros((20, 20), bool)
    mask[4:14, 4:14] = True  # a 10x10 square ring with a 4x4 hole, about the centre
    mask[7:11, 7:11] = False
    mask[16:19, 16:19] = True  # a smaller square elsewhere
    mask[0, 19] = True  # a pixel touching the border
    expected = np.zeros_like(mask)
    expected[4:14, 4:14] = True
    kept = postprocess.fill_holes(postprocess.lesion_region(mask, mask.astype(np.float32)))
    np.testing.assert_array_equal(kept, expected)
    empty = np.zeros((8, 8), bool)
    np.testing.assert_array_equal(postprocess.lesion_region(empty, np.zeros((8, 8), np.float32)), empty)
    # diagonal neighbours belong to one region (8-connectivity)
    diagonal = np.eye(6, dtype=bool)
    np.testing.assert_array_equal(postprocess.lesion_region(diagonal, np.ones((6, 6), np.float32)), diagonal)
    # a hole touching the border through a 4-connected gap is not a hole
    open_ring = mask.copy()
    open_ring[9, 4:9] = False
    open_ring[16:19, 16:19] = False
    assert not postprocess.fill_holes(open_ring)[8, 8]


def test_a_large_dark_corner_loses_to_a_smaller_lesion_at_the_centre():
    # a dermoscope's vignette: a large confident region in a corner, the lesion smaller at the centre
    probs = np.full((32, 32), 0.05, np.float32)
    probs[:11, :11] = 0.95  # 121 pixels
    probs[12:20, 12:20] = 0.9  # 64 pixels, centred, one pixel apart from the corner's region
    kept = postprocess.postprocess_probabilities(probs, 0.5) > 0.5
    assert kept[16, 16] and not kept[:11, :11].any()
    # by area alone the corner would win: the weight by distance to the centre decides
    assert (probs[:11, :11] > 0.5).sum() > (probs[12:20, 12:20] > 0.5).sum()
    weights = postprocess.centre_weights((32, 32))
    assert weights[15:17, 15:17].min() > 0.95 and weights[0, 0] < 0.05 and weights.min() >= 0


def test_an_empty_mask_keeps_the_most_probable_region():
    probs = np.full((16, 16), 0.05, np.float32)
    probs[6:10, 6:10] = 0.3  # below the threshold everywhere
    probs[1, 1] = 0.2
    edited = postprocess.postprocess_probabilities(probs, 0.5)
    kept = edited > 0.5
    expected = np.zeros((16, 16), bool)
    expected[6:10, 6:10] = True
    np.testing.assert_array_equal(kept, expected)
    # a map with a lesion above the threshold is not rescaled: the rest of the block stays below it
    probs[6:10, 6:10] = 0.4
    probs[7, 7] = 0.9
    np.testing.assert_array_equal(postprocess.postprocess_probabilities(probs, 0.5) > 0.5, probs > 0.5)


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
