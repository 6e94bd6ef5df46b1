"""Post-processing of a lesion probability map: one region, its holes filled (`predict.py --postprocess`).

ISIC 2018's images hold one lesion each, so the mask keeps the largest 8-connected region and fills its
holes. Everything here is numpy on the host, at the network's resolution, before the map is resized back.
"""

from __future__ import annotations

import numpy as np


def label_regions(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Connected regions of a boolean mask (H, W): labels int64 (H, W), 0 for background, 1..n in raster order.

    Union-find over neighbouring pixel pairs, vectorised: every round hooks each root onto the smallest
    root next to it, then pointer jumping flattens the trees; a few rounds suffice for lesion shapes.
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    h, w = mask.shape
    index = np.arange(h * w).reshape(h, w)
    neighbours = [(np.s_[:, :-1], np.s_[:, 1:]), (np.s_[:-1, :], np.s_[1:, :])]  # right, down
    if connectivity == 8:
        neighbours += [(np.s_[:-1, :-1], np.s_[1:, 1:]), (np.s_[:-1, 1:], np.s_[1:, :-1])]  # both diagonals
    first, second = [], []
    for a, b in neighbours:
        both = mask[a] & mask[b]
        first.append(index[a][both])
        second.append(index[b][both])
    first, second = np.concatenate(first), np.concatenate(second)
    parent = np.arange(h * w)
    while True:
        root_a, root_b = parent[first], parent[second]
        differ = root_a != root_b
        if not differ.any():
            break
        root_a, root_b = root_a[differ], root_b[differ]
        np.minimum.at(parent, np.maximum(root_a, root_b), np.minimum(root_a, root_b))
        while True:  # parent[i] <= i throughout, so this ends with every pixel pointing at its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    labels = np.zeros((h, w), dtype=np.int64)
    roots, numbered = np.unique(parent[index[mask]], return_inverse=True)  # roots are each region's first pixel
    labels[mask] = numbered + 1
    return labels, len(roots)


def largest_region_filled(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of a boolean mask (H, W) with its holes filled; empty stays empty."""
    labels, count = label_regions(mask, connectivity=8)
    if count == 0:
        return mask.copy()
    region = labels == np.bincount(labels.ravel())[1:].argmax() + 1
    # holes: background regions (4-connected, the complement of 8-connected) that do not touch the border
    background, _ = label_regions(~region, connectivity=4)
    border = np.unique(np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]]))
    return region | ~np.isin(background, border)


def postprocess_probabilities(probs: np.ndarray, threshold: float) -> np.ndarray:
    """Probabilities (S, S) edited so that thresholding gives one filled region, at the network's resolution.

    Other regions drop to 0 and holes rise to 1, while the kept region's own probabilities stay, so its
    outline after the bilinear resize to the original size is unchanged. (A link thinner than a network
    pixel can still fall below the threshold in that resize and split the region.)
    """
    mask = probs > threshold
    kept = largest_region_filled(mask)
    out = probs.copy()
    out[mask & ~kept] = 0.0
    out[kept & ~mask] = 1.0
    return out
