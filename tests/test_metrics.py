"""Dice loss and ISIC metrics: known values, the empty-mask conventions, and the official scorer."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import losses


def masks(*rows_per_image):
    """Bool (B, H, W) from lists of strings like "1100" (1 = lesion)."""
    return torch.tensor([[[c == "1" for c in row] for row in image] for image in rows_per_image])


# --- dice_loss -------------------------------------------------------------------------------


def test_dice_loss_hand_computed():
    logits = torch.zeros(1, 1, 2, 2)  # p = 0.5 everywhere
    target = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    # intersection 0.5, sum(p) + sum(t) = 2 + 1: Dice = (1 + 1) / (3 + 1) = 0.5
    assert losses.dice_loss(logits, target).item() == pytest.approx(0.5)
    # without smoothing: Dice = 1 / 3
    assert losses.dice_loss(logits, target, smooth=0.0).item() == pytest.approx(2 / 3)


def test_dice_loss_is_a_mean_over_images():
    target = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[1.0, 1.0], [0.0, 0.0]]]])
    logits = torch.zeros(2, 1, 2, 2)
    logits[1] = (target[1] * 2 - 1) * 40  # second image predicted perfectly
    # image 0: 0.5 as above; image 1: Dice (4 + 1) / (4 + 1) = 1, loss 0; mean 0.25 (not pooled pixels)
    assert losses.dice_loss(logits, target).item() == pytest.approx(0.25)


def test_dice_loss_softmax_hand_computed_and_target_forms():
    logits = torch.zeros(1, 2, 2, 2)  # p = 0.5 for both classes
    labels = torch.tensor([[[1, 0], [0, 0]]])
    # class 0: (2*1.5 + 1) / (2 + 3 + 1) = 2/3; class 1: (2*0.5 + 1) / (2 + 1 + 1) = 1/2
    expected = 1 - (2 / 3 + 1 / 2) / 2
    one_hot = F.one_hot(labels, 2).permute(0, 3, 1, 2).float()
    for target in (labels, labels[:, None], one_hot):
        assert losses.dice_loss(logits, target).item() == pytest.approx(expected)


def test_dice_loss_empty_mask_needs_the_smoothing():
    target = torch.zeros(1, 1, 4, 4)
    logits = torch.full((1, 1, 4, 4), -40.0, requires_grad=True)
    loss = losses.dice_loss(logits, target)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)  # empty prediction of an empty mask is perfect
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    # without it the same near-perfect prediction (sigmoid(-40) > 0) scores the worst loss, 1
    assert losses.dice_loss(logits.detach(), target, smooth=0.0).item() == pytest.approx(1.0)


def test_dice_loss_is_float32_under_bf16_autocast():
    logits = torch.randn(2, 1, 16, 16).bfloat16()
    target = (torch.rand(2, 1, 16, 16) > 0.5).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = losses.dice_loss(logits, target)
        bce = losses.SegmentationLoss("dice+bce")(logits, target)
    assert loss.dtype == torch.float32 and bce.dtype == torch.float32
    assert loss.item() == pytest.approx(losses.dice_loss(logits.float(), target).item(), abs=1e-7)


def test_dice_loss_matches_hard_dice_metric():
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(3, 1, 8, 8, generator=gen) > 0.5
    pred = torch.rand(3, 1, 8, 8, generator=gen) > 0.5
    logits = (pred.float() * 2 - 1) * 40  # sigmoid = 0 or 1 to float precision
    hard = losses.segmentation_metrics(pred[:, 0], target[:, 0])["dice"].mean().item()
    assert losses.dice_loss(logits, target.float(), smooth=0.0).item() == pytest.approx(1 - hard, abs=1e-6)


@pytest.mark.slow  # importing monai takes over 10 s
def test_dice_loss_matches_monai():
    monai_losses = pytest.importorskip("monai.losses")
    logits = torch.randn(2, 1, 8, 8)
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    reference = monai_losses.DiceLoss(sigmoid=True, smooth_nr=1.0, smooth_dr=1.0)(logits, target)
    assert losses.dice_loss(logits, target).item() == pytest.approx(reference.item(), abs=1e-6)


@pytest.mark.slow  # importing monai takes over 10 s
def test_dice_plus_bce_loss_matches_monai():
    monai_losses = pytest.importorskip("monai.losses")
    logits = torch.randn(3, 1, 16, 16) * 3
    target = (torch.rand(3, 1, 16, 16) > 0.6).float()
    reference = monai_losses.DiceCELoss(sigmoid=True, smooth_nr=1.0, smooth_dr=1.0)(logits, target)
    assert losses.SegmentationLoss("dice+bce")(logits, target).item() == pytest.approx(reference.item(), abs=1e-5)


def test_bce_weight_scales_the_cross_entropy_term_as_monai_lambda_ce_does():
    monai_losses = pytest.importorskip("monai.losses")
    logits = torch.randn(3, 1, 16, 16) * 3
    target = (torch.rand(3, 1, 16, 16) > 0.6).float()
    for weight in (0.5, 2.0):
        reference = monai_losses.DiceCELoss(sigmoid=True, smooth_nr=1.0, smooth_dr=1.0, lambda_ce=weight)(logits, target)
        ours = losses.SegmentationLoss("dice+bce", bce_weight=weight)(logits, target)
        assert ours.item() == pytest.approx(reference.item(), abs=1e-5)
    assert losses.check_config(losses.LossConfig(loss="dice", bce_weight=2.0))  # no cross-entropy term to weigh
    assert "--bce-weight must not be negative" in losses.check_config(losses.LossConfig(bce_weight=-1))[0]


def test_deep_supervision_loss_is_monais_deep_supervision_loss_normalised():
    monai_losses = pytest.importorskip("monai.losses")
    target = (torch.rand(2, 1, 32, 32) > 0.6).float()
    scales = tuple(torch.randn(2, 1, s, s) * 3 for s in (32, 16, 8))  # finest first, as the network returns them
    reference = monai_losses.DeepSupervisionLoss(
        monai_losses.DiceCELoss(sigmoid=True, smooth_nr=1.0, smooth_dr=1.0), weight_mode="exp")(list(scales), target)
    ours = losses.SegmentationLoss("dice+bce")(scales, target)
    assert ours.item() == pytest.approx(reference.item() / 1.75, abs=1e-5)  # MONAI sums 1 + 1/2 + 1/4 unnormalised
    assert losses.SegmentationLoss("dice+bce")(scales[:1], target).item() == pytest.approx(
        losses.SegmentationLoss("dice+bce")(scales[0], target).item())
    lovasz = losses.SegmentationLoss("dice+bce+lovasz")(scales, target)  # the reduced masks stay binary
    assert torch.isfinite(lovasz) and lovasz > ours


def test_dice_loss_rejects_mismatched_target():
    with pytest.raises(ValueError, match="does not match logits"):
        losses.dice_loss(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 4, 4))


def test_segmentation_loss_kinds():
    logits = torch.randn(2, 1, 8, 8, requires_grad=True)
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    dice = losses.SegmentationLoss("dice")(logits, target)
    both = losses.SegmentationLoss("dice+bce")(logits, target)
    bce = F.binary_cross_entropy(torch.sigmoid(logits), target)  # from probabilities, not logits
    assert dice.item() == pytest.approx(losses.dice_loss(logits, target).item())
    assert both.item() == pytest.approx(dice.item() + bce.item(), abs=1e-6)
    both.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError, match="dice\\+bce, dice"):
        losses.SegmentationLoss("focal")


# --- segmentation_metrics ----------------------------------------------------------------------


def test_metrics_known_values():
    truth = masks(["1100", "1100"], ["1100", "0000"], ["1111", "0000"])
    pred = masks(["1100", "1100"], ["0011", "0000"], ["1100", "0000"])
    m = losses.segmentation_metrics(pred, truth)
    assert set(m) == set(losses.METRIC_NAMES)
    assert all(v.shape == (3,) and v.dtype == torch.float32 for v in m.values())  # MPS has no float64
    # perfect
    assert [m[k][0].item() for k in losses.METRIC_NAMES] == [1.0] * 6
    # disjoint: TP 0, FP 2, FN 2, TN 4
    assert m["dice"][1].item() == 0 and m["jaccard"][1].item() == 0 and m["sensitivity"][1].item() == 0
    assert m["specificity"][1].item() == pytest.approx(4 / 6) and m["accuracy"][1].item() == pytest.approx(0.5)
    # prediction covers half the lesion: Dice 2/3, Jaccard 1/2, so thresholded Jaccard 0
    assert m["dice"][2].item() == pytest.approx(2 / 3)
    assert m["jaccard"][2].item() == pytest.approx(0.5) and m["threshold_jaccard"][2].item() == 0
    assert m["sensitivity"][2].item() == pytest.approx(0.5) and m["specificity"][2].item() == 1


def test_metrics_empty_mask_conventions():
    empty, some, full = ["0000", "0000"], ["0110", "0000"], ["1111", "1111"]
    truth = masks(empty, empty, some, full)
    pred = masks(empty, some, empty, full)
    m = {k: v.tolist() for k, v in losses.segmentation_metrics(pred, truth).items()}
    # both empty: a perfect score in every metric
    assert [m[k][0] for k in losses.METRIC_NAMES] == [1.0] * 6
    # empty truth, lesion predicted: Jaccard and Dice 0, sensitivity a "freebie" 1
    assert (m["jaccard"][1], m["dice"][1], m["sensitivity"][1]) == (0.0, 0.0, 1.0)
    assert m["specificity"][1] == pytest.approx(6 / 8)
    # lesion missed entirely: Dice 0, sensitivity 0, specificity 1
    assert (m["dice"][2], m["sensitivity"][2], m["specificity"][2]) == (0.0, 0.0, 1.0)
    # all-lesion truth: specificity (no negatives) is the freebie 1
    assert m["specificity"][3] == 1.0 and m["dice"][3] == 1.0


def test_threshold_jaccard_keeps_exactly_065():
    # Jaccard 13/20 = 0.65 is kept (the scorer tests >= 0.65); 12/20 = 0.6 counts as 0, and so does a Jaccard
    # 2.5e-8 below 0.65, which float32 rounds to 0.65: the comparison runs on the integer counts
    pixels = 2_000_017
    truth = torch.zeros(3, pixels, dtype=torch.bool)
    pred = torch.ones(3, pixels, dtype=torch.bool)
    for i, lesion in enumerate([1_300_000, 1_200_000, 1_300_011]):
        truth[i, :lesion] = True
        pred[i, 2_000_000:] = i == 2  # the third image's union is every pixel: Jaccard (13 * pixels - 1) / (20 * pixels)
    m = losses.segmentation_metrics(pred, truth)
    assert m["jaccard"][2].item() == m["jaccard"][0].item() == np.float32(0.65)
    assert m["threshold_jaccard"].tolist() == [np.float32(0.65), 0.0, 0.0]


def test_metrics_accept_channel_dim_and_reject_non_bool():
    truth = torch.rand(2, 1, 8, 8) > 0.5
    flat = losses.segmentation_metrics(truth[:, 0], truth[:, 0])
    with_channel = losses.segmentation_metrics(truth, truth)
    assert all(torch.equal(flat[k], with_channel[k]) for k in flat)
    with pytest.raises(TypeError, match="threshold first"):
        losses.segmentation_metrics(truth.float(), truth)
    with pytest.raises(ValueError, match="differs"):
        losses.segmentation_metrics(truth, truth[:, :, :4])


# --- the official scorer -----------------------------------------------------------------------


def cross_check_cases(height=24, width=40, n_random=6, seed=0):
    """Truth/prediction pairs covering every convention, plus random blobs with shifted predictions."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]

    def blob():
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(3, height / 2), rng.uniform(3, width / 2)
        return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1

    empty, full = np.zeros((height, width), bool), np.ones((height, width), bool)
    left = xx < width // 3
    right = xx >= 2 * width // 3
    exact = np.zeros(height * width, bool)
    exact[:13] = True
    exact_pred = np.zeros(height * width, bool)
    exact_pred[:20] = True  # Jaccard exactly 0.65
    cases = [
        (left, left),  # perfect
        (left, right),  # disjoint
        (empty, left),  # empty truth
        (left, empty),  # empty prediction
        (empty, empty),  # both empty
        (full, full),  # no negatives at all
        (full, left),
        (exact.reshape(height, width), exact_pred.reshape(height, width)),
    ]
    for _ in range(n_random):
        truth = blob()
        shifted = np.roll(truth, (rng.integers(-3, 4), rng.integers(-4, 5)), axis=(0, 1))
        pred = shifted | (rng.random(truth.shape) > 0.97)  # plus scattered false positives
        cases.append((truth, pred))
    return cases


def write_scorer_folders(cases, root):
    """The layout the scorer reads: ISIC_<7 digits>_segmentation.png, greyscale 0/255, per folder."""
    truth_dir, pred_dir = root / "truth", root / "pred"
    truth_dir.mkdir()
    pred_dir.mkdir()
    for i, (truth, pred) in enumerate(cases):
        name = f"ISIC_{1000000 + i}_segmentation.png"
        Image.fromarray(truth.astype(np.uint8) * 255, mode="L").save(truth_dir / name)
        Image.fromarray(pred.astype(np.uint8) * 255, mode="L").save(pred_dir / name)
    return truth_dir, pred_dir


@pytest.mark.filterwarnings("ignore::DeprecationWarning:isic_challenge_scoring.*")  # its pandas use
def test_metrics_equal_official_isic_scorer(tmp_path):
    scoring = pytest.importorskip("isic_challenge_scoring.segmentation")
    load_image = pytest.importorskip("isic_challenge_scoring.load_image")
    cases = cross_check_cases()
    truth_dir, pred_dir = write_scorer_folders(cases, tmp_path)

    truth = torch.from_numpy(np.stack([t for t, _ in cases]))
    pred = torch.from_numpy(np.stack([p for _, p in cases]))
    ours = losses.segmentation_metrics(pred, truth)

    # per image: the scorer's own SegmentationScore on one image pair at a time
    pairs = list(load_image.iter_image_pairs(truth_dir, pred_dir))
    assert len(pairs) == len(cases)
    for i, pair in enumerate(pairs):
        theirs = scoring.SegmentationScore([pair]).macro_average
        for name in losses.METRIC_NAMES:
            # the scorer's float64 ratio rounded to float32: half a float32 step of a value <= 1 at most
            assert ours[name][i].item() == pytest.approx(theirs[name], rel=0, abs=2**-25), (i, name)

    # means: the scorer's result for the whole folder against MetricAverager over uneven batches
    theirs = scoring.SegmentationScore.from_dir(truth_dir, pred_dir).macro_average
    averager = losses.MetricAverager()
    for start, stop in [(0, 5), (5, 6), (6, len(cases))]:
        averager.update(losses.segmentation_metrics(pred[start:stop], truth[start:stop]))
    means = averager.compute()
    assert set(means) == set(losses.METRIC_NAMES)
    for name in losses.METRIC_NAMES:
        assert means[name] == pytest.approx(theirs[name], rel=0, abs=2**-25), name
    # the random cases must span the threshold, or the thresholded Jaccard check proves little
    assert 0 < means["threshold_jaccard"] < means["jaccard"]


# --- MetricAverager ----------------------------------------------------------------------------


def test_metric_averager_means_over_images_not_batches():
    averager = losses.MetricAverager()
    averager.update({"dice": torch.tensor([1.0, 1.0, 1.0]), "loss": torch.tensor([0.5])})
    averager.update({"dice": torch.tensor([0.0]), "loss": torch.tensor([1.5])})
    assert averager.compute() == {"dice": 0.75, "loss": 1.0}
    averager.reset()
    assert averager.compute() == {}


def test_metric_averager_sums_float32_values_exactly():
    # a float32 running sum of 0.1 drifts by about 1e-4 over 100 000 values; the exact sum does not
    averager = losses.MetricAverager()
    tenth = torch.full((1000,), 0.1)
    for _ in range(100):
        averager.update({"dice": tenth, "python": [0.25, 0.75]})
    assert averager.compute() == {"dice": float(np.float32(0.1)), "python": 0.5}
    assert torch.stack([tenth] * 100).sum().item() / 100_000 != float(np.float32(0.1))  # the drift is real


WORKER = """
import json, sys, torch, devices, losses
info = devices.init_distributed()
assert info.is_distributed and info.world_size == 2 and torch.distributed.get_backend() == "gloo", info
gen = torch.Generator().manual_seed(0)
pred, truth = torch.rand(10, 8, 8, generator=gen) > 0.5, torch.rand(10, 8, 8, generator=gen) > 0.6
batches = [(0, 3), (3, 6), (6, 7)] if info.rank == 0 else [(7, 9), (9, 10)]  # 7 images and 3
averager = losses.MetricAverager()
for start, stop in batches:
    averager.update(losses.segmentation_metrics(pred[start:stop], truth[start:stop]))
if info.rank == 1:
    averager.update({"extra": torch.tensor([2.0, 4.0])})  # a key the other rank never saw
result = averager.compute()
devices.cleanup_distributed()
json.dump({"rank": info.rank, "means": result}, open(sys.argv[1], "w"))
"""


@pytest.mark.slow  # two fresh Python processes importing torch
def test_metric_averager_all_reduces_across_two_gloo_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(root), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / f"rank{rank}.json")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], outputs

    gen = torch.Generator().manual_seed(0)
    pred, truth = torch.rand(10, 8, 8, generator=gen) > 0.5, torch.rand(10, 8, 8, generator=gen) > 0.6
    single = {k: math.fsum(v.tolist()) / len(v) for k, v in losses.segmentation_metrics(pred, truth).items()}
    single["extra"] = 3.0
    for rank in range(2):
        means = json.loads((tmp_path / f"rank{rank}.json").read_text())["means"]
        assert means.keys() == single.keys()
        for name in single:
            assert means[name] == pytest.approx(single[name], rel=1e-12), (rank, name)
    # a mean of the two ranks' means would differ: the split is uneven and the ranks' values are not equal
    first = losses.segmentation_metrics(pred[:7], truth[:7])["dice"].mean().item()
    second = losses.segmentation_metrics(pred[7:], truth[7:])["dice"].mean().item()
    assert (first + second) / 2 != pytest.approx(single["dice"], rel=1e-6)


@pytest.mark.gpu
def test_loss_and_metrics_on_cuda_match_cpu():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 32, 32, generator=gen)
    target = (torch.rand(2, 1, 32, 32, generator=gen) > 0.5).float()
    with torch.autocast("cuda", dtype=torch.float16):
        loss = losses.dice_loss(logits.cuda().half(), target.cuda())
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(losses.dice_loss(logits.half().float(), target).item(), abs=1e-6)
    pred, truth = logits[:, 0] > 0, target[:, 0] > 0.5
    on_gpu = losses.segmentation_metrics(pred.cuda(), truth.cuda())
    on_cpu = losses.segmentation_metrics(pred, truth)
    averager = losses.MetricAverager()
    averager.update(on_gpu)
    means = averager.compute()
    for name in losses.METRIC_NAMES:
        assert torch.equal(on_gpu[name].cpu(), on_cpu[name])
        assert means[name] == pytest.approx(on_cpu[name].mean().item())


def test_lovasz_hinge_equals_segmentation_models_pytorchs():
    """The Lovasz hinge, written from Berman et al. 2018, against smp's LovaszLoss (binary, per image), which
    nobody here wrote: random logits, lesions of every size, and an image without a lesion."""
    smp_losses = pytest.importorskip("segmentation_models_pytorch.losses")
    torch.manual_seed(0)
    logits = torch.randn(4, 1, 24, 24) * 3
    target = (torch.rand(4, 1, 24, 24) > torch.tensor([0.2, 0.6, 0.97, 2.0]).view(4, 1, 1, 1)).float()
    assert target[3].sum() == 0 and 0 < target[2].sum() < 60
    ours = losses.lovasz_hinge(logits, target)
    theirs = smp_losses.LovaszLoss("binary", per_image=True)(logits, target)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    # the --loss entry adds it to the default, and a perfect prediction costs it nothing
    both = losses.SegmentationLoss("dice+bce+lovasz")(logits, target)
    assert both.item() == pytest.approx(losses.SegmentationLoss("dice+bce")(logits, target).item() + ours.item(), rel=1e-5)
    assert losses.lovasz_hinge((2 * target - 1) * 5, target).item() == 0.0
