"""loader.py: shuffling, sharding and resuming batches, and augmentation that keeps masks aligned and binary."""

import numpy as np
import pytest
import torch

import dataset
import loader
from loader import AUGMENT_PRESETS, AugmentConfig, _affine_grid, apply_augmentation, draw_augmentation, make_loader
from test_dataset import config, make_set


def tiny_split(n=10, s=16, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8)
    masks = (rng.random((n, s, s)) > 0.5).astype(np.uint8)
    return dataset.CachedSplit([f"id{i}" for i in range(n)], images, masks)


MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def augment_batch(images, masks, generator, cfg, mean=None, std=None):
    """One batch augmented as BatchLoader does it, on the CPU: draws from `generator`, then the application."""
    return apply_augmentation(images, masks, draw_augmentation(images.shape[0], generator, cfg), cfg, mean, std)


def test_normalize_matches_the_formula():
    images = torch.from_numpy(tiny_split(2).images)
    out = dataset.normalize(images, MEAN, STD)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32 and out.is_contiguous()
    expected = (images.permute(0, 3, 1, 2).double() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1).double()) \
        / torch.tensor(STD).view(1, 3, 1, 1).double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)


def test_eval_loader_is_fixed_order_and_unaugmented():
    split = tiny_split(10)
    loader = make_loader(split, 4, MEAN, STD, device="cpu", train=False, seed=0)
    batches = list(loader)
    assert len(loader) == 3 and [len(x) for x, _ in batches] == [4, 4, 2]
    images = torch.cat([x for x, _ in batches])
    masks = torch.cat([m for _, m in batches])
    torch.testing.assert_close(images, dataset.normalize(torch.from_numpy(split.images), MEAN, STD))
    assert masks.shape == (10, 1, 16, 16) and masks.dtype == torch.float32
    torch.testing.assert_close(masks[:, 0], torch.from_numpy(split.masks).float())


@pytest.mark.parametrize("world_size", [2, 3])
def test_eval_sharding_has_no_padding_or_duplicates(world_size):
    split = tiny_split(10)
    seen = []
    for rank in range(world_size):
        loader = make_loader(split, 3, MEAN, STD, device="cpu", train=False, seed=0, rank=rank,
                                     world_size=world_size)
        seen += loader.indices().tolist()
        assert sum(len(x) for x, _ in loader) == len(range(rank, 10, world_size))
    assert sorted(seen) == list(range(10))


def test_train_sharding_like_distributed_sampler():
    split = tiny_split(10)
    per_rank = []
    for rank in range(3):
        loader = make_loader(split, 2, MEAN, STD, device="cpu", train=True, seed=5, rank=rank,
                                     world_size=3)
        loader.set_epoch(1)
        per_rank.append(loader.indices().tolist())
        assert len(loader) == 2  # ceil(10 / 3) = 4 per rank, drop_last at batch 2
    flat = sum(per_rank, [])
    assert all(len(r) == 4 for r in per_rank)
    assert sorted(set(flat)) == list(range(10))  # every sample once, padded by 2 repeats as DistributedSampler does


def test_train_order_and_augmentation_depend_only_on_seed_epoch_rank():
    split = tiny_split(12)

    def run(seed, epoch, rank=0, start_batch=0, noise=0):
        torch.manual_seed(noise)  # the global RNG must not matter
        loader = make_loader(split, 4, MEAN, STD, device="cpu", train=True, seed=seed, rank=rank,
                                     world_size=2)
        loader.set_epoch(epoch, start_batch=start_batch)
        return [(x.clone(), m.clone()) for x, m in loader]

    a = run(1, 0)
    b = run(1, 0, noise=123)
    assert len(a) == 1 and all(torch.equal(x, y) for (x, _), (y, _) in zip(a, b))
    assert not torch.equal(a[0][0], run(1, 1)[0][0])  # another epoch
    assert not torch.equal(a[0][0], run(2, 0)[0][0])  # another seed
    assert not torch.equal(a[0][0], run(1, 0, rank=1)[0][0])  # another rank


def test_resume_mid_epoch_sees_the_same_batches():
    split = tiny_split(16)
    loader = make_loader(split, 4, MEAN, STD, device="cpu", train=True, seed=7)
    loader.set_epoch(2)
    full = [x for x, _ in loader]
    loader.set_epoch(2, start_batch=2)
    tail = [x for x, _ in loader]
    assert len(full) == 4 and len(tail) == 2
    assert all(torch.equal(x, y) for x, y in zip(full[2:], tail))
    assert len([x for x, _ in loader]) == 4  # start_batch applies to one pass only


def test_tiny_train_split_still_yields_a_batch():
    loader = make_loader(tiny_split(3), 8, MEAN, STD, device="cpu", train=True, seed=0)
    assert len(loader) == 1 and [len(x) for x, _ in loader] == [3]


def test_loaders_from_prepared_splits(tmp_path):
    make_set(tmp_path / "data", 10)
    splits = dataset.prepare_splits(config(tmp_path / "data", tmp_path))
    loaders = {name: make_loader(getattr(splits, name), 4 if name == "train" else 8, splits.mean, splits.std,
                                 device="cpu", train=name == "train", seed=0) for name in dataset.SPLITS}
    assert {k: (len(v), v.train) for k, v in loaders.items()} == {"train": (2, True), "val": (1, False),
                                                                 "test": (1, False)}
    x, m = next(iter(loaders["train"]))
    assert x.shape == (4, 3, 16, 16) and m.shape == (4, 1, 16, 16) and set(m.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("train", [True, False])
def test_empty_split_gives_an_empty_loader(train):
    loader = make_loader(tiny_split(0), 4, MEAN, STD, device="cpu", train=train, seed=0)
    assert len(loader) == 0 and list(loader) == []


def test_loader_rejects_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(tiny_split(3), 0, MEAN, STD, device="cpu", train=True, seed=0)
    with pytest.raises(ValueError, match="rank 2 is outside world_size 2"):
        make_loader(tiny_split(3), 1, MEAN, STD, device="cpu", train=True, seed=0, rank=2, world_size=2)


def aligned_batch(b=8, s=32):
    """Images whose every channel equals the mask, so any misalignment shows up."""
    rng = np.random.default_rng(0)
    masks = np.zeros((b, s, s), np.uint8)
    for i in range(b):  # an off-centre, asymmetric blob per sample
        y, x = rng.integers(4, s // 2, 2)
        masks[i, y:y + s // 3, x:x + s // 4] = 1
        masks[i, y:y + 3, x:x + s // 2] = 1
    images = np.repeat(masks[..., None] * 255, 3, axis=-1).astype(np.uint8)
    return torch.from_numpy(images), torch.from_numpy(masks)


def no_colour(**kwargs):
    return AugmentConfig(brightness=0, contrast=0, saturation=0, **kwargs)


def test_affine_grid_matches_torch():
    theta = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.affine_grid(theta, [5, 1, 12, 12], align_corners=False)
    torch.testing.assert_close(_affine_grid(theta, 12), expected)


def test_flips_and_turns_move_image_and_mask_together_exactly():
    images, masks = aligned_batch()
    x, m = augment_batch(images, masks, torch.Generator().manual_seed(0), no_colour(rotate_deg=0, scale=(1, 1)))
    assert torch.equal(x[:, 0], m[:, 0]) and torch.equal(x[:, 1], x[:, 2])
    assert not torch.equal(m[:, 0], masks.float())  # something did move
    for i in range(len(m)):  # each result is one of the 8 symmetries of the original
        src = masks[i].float()
        options = [torch.rot90(t, k) for t in (src, src.T) for k in range(4)]
        assert any(torch.equal(m[i, 0], o) for o in options)


def test_affine_path_without_rotation_or_zoom_gives_the_8_symmetries():
    images, masks = aligned_batch(16)
    cfg = no_colour(rotate_deg=1e-7, scale=(1, 1))  # resampled, but with nothing but flips and turns
    x, m = augment_batch(images, masks, torch.Generator().manual_seed(2), cfg)
    found = set()
    for i in range(len(m)):
        src = masks[i].float()
        options = [torch.rot90(t, k) for t in (src, src.T) for k in range(4)]
        hits = [j for j, o in enumerate(options) if torch.equal(m[i, 0], o)]
        assert hits, f"sample {i} is not a symmetry of its mask"
        torch.testing.assert_close(x[i, 0], m[i, 0], atol=1e-4, rtol=0)
        found.add(hits[0])
    assert len(found) >= 5  # the draws reach most of the 8


def test_affine_keeps_mask_binary_and_aligned():
    images, masks = aligned_batch()
    x, m = augment_batch(images, masks, torch.Generator().manual_seed(1), no_colour())
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(m[:, 0], masks.float())
    agree = ((x[:, 0] > 0.5).float() == m[:, 0]).float().mean()
    assert agree > 0.98  # bilinear image edges vs nearest mask edges differ by at most a pixel rim


def test_colour_jitter_changes_images_per_sample_and_stays_in_range():
    split = tiny_split(6, seed=3)
    images, masks = torch.from_numpy(split.images), torch.from_numpy(split.masks)
    cfg = AugmentConfig(flips=False, rotate_deg=0, scale=(1, 1), brightness=0.3, contrast=0.3,
                                saturation=0.3)
    x, m = augment_batch(images, masks, torch.Generator().manual_seed(0), cfg)
    plain = images.permute(0, 3, 1, 2).float() / 255
    assert x.min() >= 0 and x.max() <= 1
    torch.testing.assert_close(m[:, 0], masks.float())
    ratio = (x.mean((1, 2, 3)) / plain.mean((1, 2, 3)))
    assert ratio.std() > 0.01  # a different factor per sample
    # the closed form equals brightness, contrast and saturation applied one after the other
    j = torch.rand(6, 9, generator=torch.Generator().manual_seed(0))[:, 5:8] * 2 - 1
    b, c, s = (1 + 0.3 * j[:, k].view(6, 1, 1, 1) for k in range(3))
    gray = lambda t: (t * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)  # noqa: E731
    y = plain * b
    mean = gray(y).mean((2, 3), keepdim=True)
    y = (y - mean) * c + mean
    y = ((y - gray(y)) * s + gray(y)).clamp(0, 1)
    torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_cuda_loader_keeps_cache_on_device_and_matches_cpu():
    split = tiny_split(8)
    cpu = make_loader(split, 4, MEAN, STD, device="cpu", train=True, seed=0)
    gpu = make_loader(split, 4, MEAN, STD, device="cuda", train=True, seed=0)
    host = make_loader(split, 4, MEAN, STD, device="cuda", train=True, seed=0, keep_on_device=False)
    assert gpu.images.is_cuda and not host.images.is_cuda
    for (a, ma), (b, mb), (c, mc) in zip(cpu, gpu, host):
        assert b.is_cuda and c.is_cuda
        torch.testing.assert_close(a, b.cpu(), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(b, c)
        assert torch.equal(ma, mb.cpu())


def test_augment_preset_none_leaves_the_batch_unchanged():
    split = tiny_split(6, seed=3)
    images, masks = torch.from_numpy(split.images), torch.from_numpy(split.masks)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    x, m = augment_batch(images, masks, torch.Generator().manual_seed(0), AUGMENT_PRESETS["none"],
                                 mean, std)
    torch.testing.assert_close(x, dataset.normalize(images, mean, std))
    assert torch.equal(m[:, 0], masks.float())


def test_augment_preset_flips_gives_only_the_8_symmetries_and_no_colour_change():
    images, masks = aligned_batch(16)
    x, m = augment_batch(images, masks, torch.Generator().manual_seed(4), AUGMENT_PRESETS["flips"])
    moved = 0
    for i in range(len(m)):
        src = masks[i].float()
        options = [torch.rot90(t, k) for t in (src, src.T) for k in range(4)]
        assert any(torch.equal(m[i, 0], o) for o in options)
        assert torch.equal(x[i, 0], m[i, 0])  # the image is the mask x 255 / 255: no jitter, no resampling
        moved += not torch.equal(m[i, 0], src)
    assert moved >= 8


@pytest.mark.parametrize("preset", ["light", "full"])
def test_augment_presets_resample_and_jitter_while_masks_stay_binary(preset):
    split = tiny_split(16, seed=5)
    images, masks = torch.from_numpy(split.images), torch.from_numpy(split.masks)
    cfg = AUGMENT_PRESETS[preset]
    x, m = augment_batch(images, masks, torch.Generator().manual_seed(0), cfg)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert x.min() >= 0 and x.max() <= 1
    plain = images.permute(0, 3, 1, 2).float() / 255
    resampled = sum(not any(torch.equal(m[i, 0], torch.rot90(t, k)) for t in (s, s.T) for k in range(4))
                    for i, s in enumerate(masks.float()))
    expected = cfg.affine_p * len(m)
    assert resampled >= expected / 3  # rotation and zoom reach about affine_p of the images
    assert resampled <= len(m) if preset == "full" else resampled < len(m)
    assert not torch.allclose(x.mean((1, 2, 3)), plain.mean((1, 2, 3)), atol=1e-3)  # colour jitter



def test_flips_and_turns_of_a_batch_equal_each_samples_own_flip_and_rot90():
    """One gather for the batch, as the per-sample torch.flip and torch.rot90 would make each image."""
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (16, 12, 12, 3), dtype=np.uint8))
    masks = torch.from_numpy(rng.integers(0, 2, (16, 12, 12), dtype=np.uint8))
    cfg = loader.AUGMENT_PRESETS["flips"]
    draws = loader.draw_augmentation(16, torch.Generator().manual_seed(3), cfg)
    assert len(set(zip(draws.flip_x.tolist(), draws.turns.tolist()))) >= 6  # most of the 8 symmetries drawn
    x, m = loader.apply_augmentation(images, masks, draws, cfg)
    for i in range(16):
        img, msk = images[i], masks[i]
        if draws.flip_x[i]:
            img, msk = img.flip(1), msk.flip(1)
        k = int(draws.turns[i])
        torch.testing.assert_close(x[i], torch.rot90(img, k, (0, 1)).permute(2, 0, 1).float() / 255)
        assert torch.equal(m[i, 0], torch.rot90(msk, k, (0, 1)).float())
