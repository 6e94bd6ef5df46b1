"""Soft Dice loss for training and the ISIC 2018 Task 1 metrics for evaluation.

The metrics follow the official scorer (`isic-challenge-scoring`, SegmentationScore): a confusion
matrix per image, six metrics per image with its conventions, then the plain mean over images;
each per-image ratio is float32 (within 2e-7 of the scorer's float64) on every device.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

METRIC_NAMES = ("accuracy", "sensitivity", "specificity", "jaccard", "threshold_jaccard", "dice")
JACCARD_THRESHOLD = 0.65  # ISIC 2018 ranking metric: per-image Jaccard counts as 0 below this
_THRESHOLD = Fraction(str(JACCARD_THRESHOLD))  # 13/20, so the comparison runs on integer counts


def failures(threshold_jaccard: torch.Tensor) -> torch.Tensor:
    """1 for each image whose Jaccard falls under JACCARD_THRESHOLD (its thresholded Jaccard is 0), else 0: the
    images that decide the ranking metric. Their mean is the share of failed images."""
    return (threshold_jaccard == 0).float()


def _target_like(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Return the target as float32 of the logits' shape (one-hot over classes when C > 1)."""
    num_classes = logits.shape[1]
    if target.shape == logits.shape:
        return target.float()
    spatial = logits.shape[:1] + logits.shape[2:]  # (B, H, W)
    labels = target.squeeze(1) if target.dim() == logits.dim() and target.shape[1] == 1 else target
    if labels.shape == spatial:
        if num_classes == 1:
            return labels.unsqueeze(1).float()  # (B, 1, H, W)
        return F.one_hot(labels.long(), num_classes).movedim(-1, 1).float()  # class indices -> (B, C, H, W)
    raise ValueError(
        f"target of shape {tuple(target.shape)} does not match logits of shape {tuple(logits.shape)}; "
        "pass a (B, 1, H, W) mask for one class, or a (B, C, H, W) one-hot / (B, H, W) class-index target"
    )


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice, computed per image and per class, then averaged.

    logits: (B, C, H, W) raw network output, any float dtype. C == 1: sigmoid, target (B, 1, H, W)
    in [0, 1]. C > 1: softmax over classes, target one-hot (B, C, H, W) or class indices (B, H, W).

    Dice_bc = (2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth). The smoothing term keeps an image
    with an empty mask defined (0/0 otherwise): an empty prediction there scores 1, as in the ISIC
    scorer, and stray positive pixels cost smooth / (sum(p) + smooth), a loss that still has a
    useful gradient. With smooth = 1 (one pixel's worth) it barely moves Dice on a real lesion of
    thousands of pixels.

    Always float32: the logits are cast before the sigmoid, so bf16/fp16 autocast cannot round the
    sums over 65k pixels (nnU-Net and MONAI cast before the loss as well).
    """
    if logits.dim() < 3:
        raise ValueError(f"logits must be (B, C, ...) with spatial dimensions, got shape {tuple(logits.shape)}")
    logits = logits.float()
    target = _target_like(logits, target)
    probs = torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)
    dims = tuple(range(2, logits.dim()))
    intersection = (probs * target).sum(dims)  # (B, C)
    denominator = probs.sum(dims) + target.sum(dims)  # (B, C)
    dice = (2 * intersection + smooth) / (denominator + smooth)
    return 1 - dice.mean()


def dice_plus_cross_entropy(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0,
                            bce_weight: float = 1.0) -> torch.Tensor:
    """Soft Dice loss plus cross-entropy times bce_weight (equal weights by default): binary (on the logits) for
    one class, softmax cross-entropy for more; both in float32. The cross-entropy term gives every pixel a
    gradient, where Dice's gradient fades once the overlap is large."""
    loss = dice_loss(logits, target, smooth)
    logits = logits.float()
    target = _target_like(logits, target)
    if logits.shape[1] == 1:
        return loss + bce_weight * F.binary_cross_entropy_with_logits(logits, target)
    return loss + bce_weight * F.cross_entropy(logits, target)  # soft-label form takes the one-hot target


def lovasz_hinge(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The Lovasz hinge (Berman et al. 2018, arXiv:1705.08790): a convex surrogate of 1 - Jaccard, per image,
    then averaged. One class only: logits (B, 1, H, W), target (B, 1, H, W) in {0, 1}.

    With signs s = 2t - 1 and hinge errors e = 1 - s * logit, the loss is the dot product of the errors sorted
    in decreasing order (through a ReLU) with the gradient of the Lovasz extension of the Jaccard loss at that
    order: each pixel is weighted by how much it moves the image's Jaccard, so a small lesion's pixels weigh as
    much as a large one's, which Dice and cross-entropy do not give.
    """
    if logits.shape[1] != 1:
        raise ValueError(f"the Lovasz hinge here is binary: logits (B, 1, H, W), got {tuple(logits.shape)}")
    truth = _target_like(logits, target).flatten(1)  # (B, N)
    logits = logits.float().flatten(1)  # (B, N)
    errors = 1.0 - logits * (2.0 * truth - 1.0)  # (B, N) hinge errors
    errors, order = errors.sort(dim=1, descending=True)
    truth = truth.gather(1, order)  # (B, N) the truth in the errors' order
    positives = truth.sum(1, keepdim=True)  # (B, 1)
    intersection = positives - truth.cumsum(1)
    union = positives + (1.0 - truth).cumsum(1)
    jaccard = 1.0 - intersection / union  # (B, N) the Jaccard loss of the first k pixels predicted positive
    weights = torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], dim=1)  # its increments
    return (F.relu(errors) * weights).sum(1).mean()


def dice_cross_entropy_lovasz(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0,
                              bce_weight: float = 1.0) -> torch.Tensor:
    """The default loss (Dice plus cross-entropy) with a Lovasz hinge term of weight 1: aimed at the images whose
    Jaccard falls under 0.65, which the challenge's ranking scores 0."""
    return dice_plus_cross_entropy(logits, target, smooth, bce_weight) + lovasz_hinge(logits, target)


def dice_only(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0, bce_weight: float = 1.0) -> torch.Tensor:
    """The paper's loss, the soft Dice loss alone (it has no cross-entropy term for bce_weight to weigh)."""
    return dice_loss(logits, target, smooth)


# The training losses by --loss name: a new loss is one entry here, a function (logits, target, smooth, bce_weight)
# -> a float32 scalar, and --loss offers it.
LOSSES = {"dice+bce": dice_plus_cross_entropy, "dice": dice_only, "dice+bce+lovasz": dice_cross_entropy_lovasz}
LossKind = typing.Literal[tuple(LOSSES)]


@dataclass
class LossConfig:
    """The training loss's settings. train.TrainConfig takes the fields as they are, so each is a flag of train.py."""

    # --- loss ---
    loss: LossKind = "dice+bce"  # "dice+bce" (Dice plus binary cross-entropy), "dice" (the paper's) or "dice+bce+lovasz" (plus a Lovasz hinge, a Jaccard surrogate)
    bce_weight: float = 1.0  # weight of the cross-entropy term of "dice+bce" and "dice+bce+lovasz" (the Dice term's is 1)
    deep_supervision_loss: bool = False  # also apply the loss to the Improved UNet's segmentation at 1/2 and 1/4 resolution, weighted 4:2:1 with the full one (nnU-Net's deep supervision); the training loss is then that weighted mean, the validation loss the full resolution's alone


def check_config(config: LossConfig) -> list[str]:
    """The loss settings that cannot work, as messages naming the flags (empty when usable)."""
    problems = []
    if config.bce_weight < 0:
        problems.append(f"--bce-weight must not be negative, got {config.bce_weight}")
    elif config.bce_weight != 1.0 and config.loss == "dice":
        problems.append("--bce-weight weighs the cross-entropy term, and --loss dice has none; use --loss dice+bce")
    return problems


# nnU-Net's deep-supervision weights: each coarser output counts half the one above it, and the weights sum to 1.
SCALE_WEIGHTS = (4 / 7, 2 / 7, 1 / 7)


class SegmentationLoss(nn.Module):
    """The training loss that --loss names (see LOSSES), as a module, in float32 whatever the logits' dtype.

    Given a tuple of logits, finest first (the Improved UNet's outputs under --deep-supervision-loss), the loss
    is SCALE_WEIGHTS' weighted sum over them, each against the mask reduced to its size (nearest, so it stays
    binary, as nnU-Net and MONAI reduce their targets)."""

    def __init__(self, kind: str = "dice", smooth: float = 1.0, bce_weight: float = 1.0):
        super().__init__()
        if kind not in LOSSES:
            raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")
        self.kind = kind
        self.smooth = smooth
        self.bce_weight = bce_weight

    def forward(self, logits: torch.Tensor | tuple[torch.Tensor, ...], target: torch.Tensor) -> torch.Tensor:
        loss = LOSSES[self.kind]
        if isinstance(logits, torch.Tensor):
            return loss(logits.float(), target, self.smooth, self.bce_weight)
        if len(logits) > len(SCALE_WEIGHTS):
            raise ValueError(f"deep supervision takes at most {len(SCALE_WEIGHTS)} outputs, got {len(logits)}")
        target = _target_like(logits[0], target)  # (B, C, H, W)
        total = 0.0
        for weight, scale in zip(SCALE_WEIGHTS, logits):
            reduced = target
            if scale.shape[2:] != target.shape[2:]:
                reduced = F.interpolate(target, size=scale.shape[2:], mode="nearest-exact")
            total = total + weight * loss(scale.float(), reduced, self.smooth, self.bce_weight)
        return total / sum(SCALE_WEIGHTS[:len(logits)])

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, smooth={self.smooth}, bce_weight={self.bce_weight}"


def _confusion_counts(pred: torch.Tensor, target: torch.Tensor):
    """True positives, false positives and false negatives per row of (B, N) boolean masks."""
    if pred.device.type == "cpu":  # where the tensor is, not a device decision: numpy can read it there
        # numpy's count_nonzero on bool is about 15x faster than torch's sum at full image size
        p, t = pred.numpy(), target.numpy()
        tp = np.count_nonzero(p & t, axis=1)
        return (torch.from_numpy(tp), torch.from_numpy(np.count_nonzero(p, axis=1) - tp),
                torch.from_numpy(np.count_nonzero(t, axis=1) - tp))
    tp = (pred & target).sum(1)
    return tp, pred.sum(1) - tp, target.sum(1) - tp


def segmentation_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image ISIC metrics of boolean masks, with the conventions of isic-challenge-scoring.

    pred, target: bool (B, H, W) (any (B, ...) shape works; each image is flattened). Returns the six
    METRIC_NAMES, each a float32 (B,) tensor on the masks' device; nothing is copied to the host.

    The scorer's conventions for empty masks (isic_challenge_scoring/metrics.py):
      sensitivity = 1 when the truth has no lesion (TP + FN == 0), "a freebie";
      specificity = 1 when the truth is all lesion (TN + FP == 0);
      jaccard = dice = 1 when truth and prediction are both empty (TP + FP + FN == 0);
      threshold_jaccard = jaccard if jaccard >= 0.65 else 0.
    An empty truth with a non-empty prediction therefore scores jaccard = dice = 0.

    Counts are exact integers; each ratio is one float32 division (MPS has no float64), identical on
    every device: the scorer's float64 value rounded to float32 when the image has fewer than 2^24
    pixels, within 2e-7 of it above. The 0.65 threshold is decided on the integer counts, so a Jaccard
    of exactly 13/20 is kept, as the scorer keeps it, and one a hair below is not.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
    if pred.dtype != torch.bool or target.dtype != torch.bool:
        raise TypeError(
            f"segmentation_metrics takes boolean masks, got {pred.dtype} and {target.dtype}; "
            "threshold first, e.g. pred = logits > 0 and target = mask > 0.5"
        )
    if pred.dim() < 2 or pred[0].numel() == 0:
        raise ValueError(f"masks must be (B, H, W) with at least one pixel, got shape {tuple(pred.shape)}")
    pred = pred.reshape(pred.shape[0], -1)
    target = target.reshape(target.shape[0], -1)
    tp, fp, fn = _confusion_counts(pred, target)  # int64 (B,)
    tn = pred.shape[1] - tp - fp - fn

    def ratio(num, den):
        # the scorer's "freebie": an undefined ratio (den == 0) counts as a perfect 1
        return torch.where(den > 0, num.float() / den.clamp(min=1).float(), 1.0)

    jaccard = ratio(tp, tp + fp + fn)
    kept = _THRESHOLD.denominator * tp >= _THRESHOLD.numerator * (tp + fp + fn)  # jaccard >= 0.65, exactly
    return {
        "accuracy": (tp + tn).float() / pred.shape[1],
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "jaccard": jaccard,
        "threshold_jaccard": torch.where(kept, jaccard, 0.0),
        "dice": ratio(2 * tp, 2 * tp + fp + fn),
    }


class MetricAverager:
    """Mean of per-image values over an evaluation, across all ranks when distributed.

    update() keeps the values on their device (no host sync per batch, no float64 there: MPS has
    none). compute() reads them back once and sums them exactly in Python floats (math.fsum); when
    torch.distributed is initialised, the ranks exchange their sums and counts, so the result equals a
    single-process mean over the same images however unevenly they are split (not a mean of per-rank
    means). Every rank must call compute(); a rank that saw no images contributes nothing.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._values: dict[str, list] = {}  # per key: detached (N,) tensors and lists of Python floats

    def update(self, per_image: dict[str, torch.Tensor]) -> None:
        for name, values in per_image.items():
            if isinstance(values, torch.Tensor):
                values = values.detach().reshape(-1)
            else:
                values = [float(v) for v in np.atleast_1d(values)]
            self._values.setdefault(name, []).append(values)

    def _local_totals(self) -> dict[str, tuple[float, int]]:
        """(exact sum, count) per key on this rank."""
        totals = {}
        for name, parts in self._values.items():
            tensors = [p for p in parts if isinstance(p, torch.Tensor)]
            floats = [v for p in parts if not isinstance(p, torch.Tensor) for v in p]
            if tensors:
                floats += torch.cat(tensors).tolist()  # one read-back per key
            totals[name] = (math.fsum(floats), len(floats))
        return totals

    def compute(self) -> dict[str, float]:
        totals = self._local_totals()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # ranks may have seen different keys (or none): a key's total sums whatever each rank holds
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, totals)
            names = sorted(set().union(*gathered))
            totals = {name: (math.fsum(g[name][0] for g in gathered if name in g),
                             sum(g[name][1] for g in gathered if name in g)) for name in names}
        return {name: total / count if count else float("nan") for name, (total, count) in sorted(totals.items())}
