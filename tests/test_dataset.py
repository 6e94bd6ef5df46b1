"""dataset.py: pairing, bad-input messages, the uint8 cache, splits, loaders and augmentation."""

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

import dataset
from dataset import DataConfig, DataError

IMAGES = "ISIC2018_Task1-2_Training_Input"
MASKS = "ISIC2018_Task1_Training_GroundTruth"


def write_pair(root, i, size=(40, 30), images=IMAGES, masks=MASKS, mask_name="{}_segmentation.png", seed=None):
    """A random JPEG and a 0/255 PNG mask (a rectangle) under root; returns the id."""
    rng = np.random.default_rng(i if seed is None else seed)
    w, h = size
    ident = f"ISIC_{i:07d}"
    (root / images).mkdir(parents=True, exist_ok=True)
    (root / masks).mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / images / f"{ident}.jpg")
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4: 3 * h // 4, w // 4: w // 2] = 255
    Image.fromarray(mask).save(root / masks / mask_name.format(ident))
    return ident


def make_set(root, n, **kwargs):
    return [write_pair(root, i, **kwargs) for i in range(n)]


def config(root, tmp_path, **kwargs):
    kwargs.setdefault("image_size", 16)
    kwargs.setdefault("num_workers", 1)
    return DataConfig(data_dir=str(root), cache_dir=str(tmp_path / "cache"), **kwargs)


class Log(list):
    def __call__(self, msg):
        self.append(msg)

    def has(self, pattern):
        return any(re.search(pattern, m) for m in self)


# --- finding pairs ----------------------------------------------------------------------------


def test_official_layout_pairs_by_id_and_ignores_other_files(tmp_path):
    ids = make_set(tmp_path, 3)
    (tmp_path / IMAGES / "LICENSE.txt").write_text("licence")
    (tmp_path / IMAGES / "ATTRIBUTION.txt").write_text("credits")
    (tmp_path / "ATTRIBUTION.md").write_text("credits")
    (tmp_path / IMAGES / ".DS_Store").write_bytes(b"\0")
    (tmp_path / IMAGES / "ISIC_0000000_superpixels.png").write_bytes(b"not read")
    (tmp_path / MASKS / "LICENSE.txt").write_text("licence")
    pairs = dataset.find_pairs(tmp_path)
    assert list(pairs) == ["train"]
    assert [s.id for s in pairs["train"]] == ids
    for s in pairs["train"]:
        assert s.image.name == f"{s.id}.jpg" and s.mask.name == f"{s.id}_segmentation.png"


def test_plain_layout_and_2017_mask_suffix(tmp_path):
    make_set(tmp_path, 2, images="images", masks="masks", mask_name="{}_Segmentation.png")
    write_pair(tmp_path, 5, images="images", masks="masks", mask_name="{}.png")
    pairs = dataset.find_pairs(tmp_path)
    assert [s.id for s in pairs["train"]] == ["ISIC_0000000", "ISIC_0000001", "ISIC_0000005"]


def test_official_validation_and_unlabelled_test_folders(tmp_path):
    make_set(tmp_path, 4)
    for i in (10, 11):
        write_pair(tmp_path, i, images="ISIC2018_Task1-2_Validation_Input",
                   masks="ISIC2018_Task1_Validation_GroundTruth")
    test_dir = tmp_path / "ISIC2018_Task1-2_Test_Input"
    test_dir.mkdir()
    Image.new("RGB", (8, 8)).save(test_dir / "ISIC_0000020.jpg")
    pairs = dataset.find_pairs(tmp_path)
    assert [len(pairs[k]) for k in ("train", "val", "test")] == [4, 2, 1]
    assert pairs["test"][0].mask is None
    splits, description = dataset.split_samples(pairs, 0.1, 0.25, seed=0)
    assert [s.id for s in splits["val"]] == ["ISIC_0000010", "ISIC_0000011"]  # official folder
    assert len(splits["test"]) == 1 and splits["test"][0].mask is not None  # held out of train instead
    assert "no ground truth" in description


@pytest.mark.parametrize("n,val,test,seed", [(40, 0.1, 0.1, 0), (253, 0.2, 0.1, 3), (17, 0.3, 0.0, 1)])
def test_held_out_split_is_disjoint_complete_and_seeded(tmp_path, n, val, test, seed):
    samples = [dataset.Sample(f"ISIC_{i:07d}", tmp_path / f"{i}.jpg", tmp_path / f"{i}.png") for i in range(n)]
    a, _ = dataset.split_samples({"train": samples}, val, test, seed)
    b, _ = dataset.split_samples({"train": samples}, val, test, seed)
    c, _ = dataset.split_samples({"train": samples}, val, test, seed + 1)
    ids = {k: {s.id for s in v} for k, v in a.items()}
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    assert ids["train"] | ids["val"] | ids["test"] == {s.id for s in samples}
    for name, fraction in (("val", val), ("test", test)):  # binomial shares: within 3 standard deviations
        assert abs(len(ids[name]) - n * fraction) <= 3 * (n * fraction * (1 - fraction)) ** 0.5 + 1, name
    assert a == b and a["train"] != c["train"]


def test_adding_or_removing_images_never_moves_an_image_to_another_split(tmp_path):
    def split_of(samples):
        out, _ = dataset.split_samples({"train": samples}, 0.1, 0.1, seed=0)
        return {s.id: name for name, part in out.items() for s in part}

    samples = [dataset.Sample(f"ISIC_{i:07d}", tmp_path / f"{i}.jpg", tmp_path / f"{i}.png") for i in range(300)]
    before = split_of(samples[:200])
    grown = split_of(samples)  # 100 new images
    shrunk = split_of(samples[50:200])  # 50 images removed
    assert all(grown[i] == name for i, name in before.items())
    assert all(before[i] == name for i, name in shrunk.items())
    assert {"train", "val", "test"} == set(before.values())


def test_split_rejects_bad_fractions(tmp_path):
    samples = [dataset.Sample("a", tmp_path, tmp_path)]
    with pytest.raises(ValueError, match="sum to less than 1"):
        dataset.split_samples({"train": samples}, 0.6, 0.5, 0)


def test_same_id_in_two_splits_is_refused(tmp_path):
    write_pair(tmp_path, 1)
    write_pair(tmp_path, 1, images="ISIC2018_Task1-2_Validation_Input", masks="ISIC2018_Task1_Validation_GroundTruth")
    with pytest.raises(DataError, match="ISIC_0000001 appears twice"):
        dataset.find_pairs(tmp_path)


# --- bad input: one message naming the file and what to do ---------------------------------------


def test_missing_data_folder(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*download"):
        dataset.find_pairs(tmp_path / "nowhere")


def test_empty_data_folder(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path} is empty.*download"):
        dataset.find_pairs(tmp_path)


def test_mask_folder_given_as_data_folder(tmp_path):
    make_set(tmp_path, 2)
    with pytest.raises(DataError, match="holds mask files.*pass the folder above it"):
        dataset.find_pairs(tmp_path / MASKS)


def test_image_folder_given_as_data_folder(tmp_path):
    make_set(tmp_path, 2)
    with pytest.raises(DataError, match="holds images directly"):
        dataset.find_pairs(tmp_path / IMAGES)


def test_masks_in_the_image_folder(tmp_path):
    make_set(tmp_path, 2, images="images", masks="masks")
    for p in (tmp_path / "masks").iterdir():
        p.rename(tmp_path / "images" / p.name)
    with pytest.raises(DataError, match=r"images holds mask files.*swapped"):
        dataset.find_pairs(tmp_path)


def test_images_in_the_ground_truth_folder(tmp_path):
    make_set(tmp_path, 2)
    Image.new("RGB", (8, 8)).save(tmp_path / MASKS / "ISIC_0000001.jpg")
    with pytest.raises(DataError, match=r"ISIC_0000001.jpg in ground-truth folder.*_segmentation.png"):
        dataset.find_pairs(tmp_path)


def test_mixed_layouts(tmp_path):
    make_set(tmp_path, 2)
    make_set(tmp_path, 2, images="images", masks="masks")
    with pytest.raises(DataError, match="mixes layouts"):
        dataset.find_pairs(tmp_path)


def test_unknown_folder_lists_what_it_found(tmp_path):
    (tmp_path / "photos").mkdir()
    with pytest.raises(DataError, match=r"no ISIC data layout.*found: photos.*images/ with masks/"):
        dataset.find_pairs(tmp_path)


def test_image_without_mask_and_skip_bad(tmp_path):
    make_set(tmp_path, 3)
    (tmp_path / MASKS / "ISIC_0000001_segmentation.png").unlink()
    with pytest.raises(DataError, match=r"ISIC_0000001.jpg has no mask.*--skip-bad"):
        dataset.find_pairs(tmp_path)
    log = Log()
    pairs = dataset.find_pairs(tmp_path, skip_bad=True, log=log)
    assert [s.id for s in pairs["train"]] == ["ISIC_0000000", "ISIC_0000002"]
    assert log.has("skipped 1 unpaired")


def test_mask_without_image(tmp_path):
    make_set(tmp_path, 2)
    (tmp_path / IMAGES / "ISIC_0000000.jpg").unlink()
    with pytest.raises(DataError, match=r"mask .*ISIC_0000000_segmentation.png has no image"):
        dataset.find_pairs(tmp_path)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=r"a.jpg is empty \(0 bytes\).*re-copy"):
        dataset.load_image(path)


def test_truncated_jpeg(tmp_path):
    path = tmp_path / "a.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(DataError, match=r"a.jpg could not be decoded \(truncated"):
        dataset.load_image(path)


def test_text_file_with_image_extension(tmp_path):
    path = tmp_path / "a.png"
    path.write_text("this is not a PNG")
    with pytest.raises(DataError, match=r"a.png is not an image.*replace it"):
        dataset.load_mask(path)


def test_colour_mask_is_refused(tmp_path):
    path = tmp_path / "m.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(path)
    with pytest.raises(DataError, match=r"mask .*m.png is a colour image"):
        dataset.load_mask(path)


def test_grey_rgb_mask_and_jpeg_noise_are_binarised_at_127(tmp_path):
    values = np.zeros((6, 8), np.uint8)
    values[3:] = 255
    values[0, :4] = [3, 127, 128, 60]  # JPEG-like ringing near an edge
    values[5, :2] = [250, 200]
    Image.fromarray(np.stack([values] * 3, -1)).save(tmp_path / "rgb.png")
    expected = (values > 127).astype(np.uint8)
    np.testing.assert_array_equal(dataset.load_mask(tmp_path / "rgb.png"), expected)
    Image.fromarray(values).save(tmp_path / "l.png")
    mask, _, nonbinary = dataset._read_mask(tmp_path / "l.png")
    np.testing.assert_array_equal(mask, expected)
    assert nonbinary


def test_0_1_label_mask_is_not_emptied(tmp_path):
    Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8)).save(tmp_path / "m.png")
    np.testing.assert_array_equal(dataset.load_mask(tmp_path / "m.png"), [[0, 1], [1, 0]])


def test_photo_as_mask_is_refused(tmp_path):
    Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (8, 1))).save(tmp_path / "m.png")
    with pytest.raises(DataError, match="mostly grey values"):
        dataset.load_mask(tmp_path / "m.png")


def test_nonbinary_masks_are_counted_in_the_log(tmp_path):
    make_set(tmp_path, 3)
    path = tmp_path / MASKS / "ISIC_0000002_segmentation.png"
    mask = np.asarray(Image.open(path)).copy()
    mask[0, :5] = 200
    Image.fromarray(mask).save(path)
    log = Log()
    dataset.prepare_splits(config(tmp_path, tmp_path, val_fraction=0, test_fraction=0), log=log)
    assert log.has(r"note: 1 train masks had values other than 0/255")


def test_mask_size_mismatch(tmp_path):
    make_set(tmp_path, 2)
    Image.new("L", (41, 30)).save(tmp_path / MASKS / "ISIC_0000001_segmentation.png")
    with pytest.raises(DataError, match=r"ISIC_0000001_segmentation.png is 41x30 but its image .*ISIC_0000001.jpg "
                                        r"is 40x30"):
        dataset.prepare_splits(config(tmp_path, tmp_path, val_fraction=0, test_fraction=0))


def test_skip_bad_skips_and_counts_unreadable_pairs(tmp_path):
    make_set(tmp_path, 5)
    (tmp_path / IMAGES / "ISIC_0000003.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="ISIC_0000003.jpg is empty"):
        dataset.prepare_splits(config(tmp_path, tmp_path, val_fraction=0, test_fraction=0))
    log = Log()
    splits = dataset.prepare_splits(config(tmp_path, tmp_path, val_fraction=0, test_fraction=0, skip_bad=True),
                                    log=log)
    assert splits.train.ids == ["ISIC_0000000", "ISIC_0000001", "ISIC_0000002", "ISIC_0000004"]
    assert splits.train.images.shape == (4, 16, 16, 3)
    assert log.has(r"skipped 1 bad train pairs.*ISIC_0000003.jpg")


# --- decoding ------------------------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path):
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :10] = 255  # bright left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(img).save(tmp_path / "a.jpg", exif=exif, quality=95)
    out = dataset.load_image(tmp_path / "a.jpg")
    assert out.shape == (40, 20, 3)
    assert out[:10].mean() > 200 and out[-10:].mean() < 50  # the left edge is now on top


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "P"])
def test_gray_rgba_16bit_palette_become_rgb_uint8(tmp_path, mode):
    ramp = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (8, 1))
    if mode == "I;16":
        img = Image.fromarray(ramp.astype(np.uint16) * 257)
        assert img.mode == "I;16"
    elif mode == "RGBA":
        img = Image.fromarray(np.stack([ramp, ramp, ramp, np.full_like(ramp, 7)], -1), "RGBA")
    else:
        img = Image.fromarray(ramp).convert(mode)
    img.save(tmp_path / "a.png")
    out = dataset.load_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (8, 32, 3)
    np.testing.assert_allclose(out[..., 1].astype(int), ramp.astype(int), atol=1)


def test_huge_jpeg_is_decoded_at_reduced_scale(tmp_path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (6000, 4000), (180, 120, 90)).save(path, quality=50)
    out = dataset.load_image(path, size=256)  # 1/8 scale: the 72 MB full-size buffer is never made
    assert out.shape == (500, 750, 3)
    assert dataset.resize_image(out, 256).shape == (256, 256, 3)
    assert abs(int(out[250, 375, 0]) - 180) < 4


def test_resize_keeps_masks_binary_and_tuple_is_height_width():
    mask = (np.random.default_rng(0).random((37, 53)) > 0.5).astype(np.uint8)
    out = dataset.resize_mask(mask, (20, 30))
    assert out.shape == (20, 30) and set(np.unique(out)) <= {0, 1}
    assert dataset.resize_image(np.zeros((37, 53, 3), np.uint8), 24).shape == (24, 24, 3)


# --- cache ---------------------------------------------------------------------------------------


def test_cache_builds_once_then_is_reused(tmp_path):
    make_set(tmp_path / "data", 10)
    log = Log()
    cfg = config(tmp_path / "data", tmp_path)
    first = dataset.prepare_splits(cfg, log=log)
    assert log.has("cached 8 train pairs") and len(first.val) == 1 and len(first.test) == 1
    assert isinstance(first.train.images, np.memmap) and first.train.images.dtype == np.uint8
    assert first.train.masks.shape == (8, 16, 16) and set(np.unique(first.train.masks)) <= {0, 1}
    log.clear()
    second = dataset.prepare_splits(cfg, log=log)
    assert not log.has("cached")
    assert second.train.ids == first.train.ids and second.mean == first.mean
    np.testing.assert_array_equal(second.train.images, first.train.images)


def test_cache_build_threads_default_to_the_jobs_cpus(tmp_path, monkeypatch):
    import devices

    make_set(tmp_path / "data", 4)
    threads = []
    build = dataset._build_split
    monkeypatch.setattr(dataset, "_build_split", lambda folder, name, samples, size, workers, *rest:
                        threads.append(workers) or build(folder, name, samples, size, workers, *rest))
    monkeypatch.setattr(devices, "usable_cpus", lambda: 3)  # e.g. a SLURM job given 3 of a node's cores
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    dataset.prepare_splits(config(tmp_path / "data", tmp_path, num_workers=0), log=Log())
    assert threads == [3, 3, 3]  # train, val, test
    dataset.prepare_splits(config(tmp_path / "data", tmp_path / "other", num_workers=2), log=Log())
    assert threads[3:] == [2, 2, 2]


def test_cache_matches_direct_decoding(tmp_path):
    make_set(tmp_path, 4)
    splits = dataset.prepare_splits(config(tmp_path, tmp_path, val_fraction=0, test_fraction=0, num_workers=2))
    pairs = {s.id: s for s in dataset.find_pairs(tmp_path)["train"]}
    for i, ident in enumerate(splits.train.ids):
        image, mask, _ = dataset.load_pair(pairs[ident], 16)
        np.testing.assert_array_equal(splits.train.images[i], image)
        np.testing.assert_array_equal(splits.train.masks[i], mask)


def test_mean_and_std_come_from_the_training_split_only(tmp_path):
    make_set(tmp_path, 4)
    for i in (10, 11):
        write_pair(tmp_path, i, images="ISIC2018_Task1-2_Validation_Input",
                   masks="ISIC2018_Task1_Validation_GroundTruth")
    splits = dataset.prepare_splits(config(tmp_path, tmp_path, test_fraction=0))
    train = splits.train.images.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(splits.mean, train.mean(0), atol=1e-9)
    np.testing.assert_allclose(splits.std, train.std(0), atol=1e-9)
    both = np.concatenate([splits.train.images, splits.val.images]).reshape(-1, 3) / 255.0
    assert not np.allclose(splits.mean, both.mean(0), atol=1e-4)


def test_train_on_val_trains_on_the_validation_images_and_keeps_the_test_split_out(tmp_path):
    make_set(tmp_path / "data", 20)
    held = dataset.prepare_splits(config(tmp_path / "data", tmp_path, val_fraction=0.25, test_fraction=0.25))
    log = Log()
    final = dataset.prepare_splits(config(tmp_path / "data", tmp_path, val_fraction=0.25, test_fraction=0.25,
                                          train_on_val=True), log=log)
    assert held.val.ids and sorted(final.train.ids) == sorted(held.train.ids + held.val.ids)
    assert final.val.ids == held.val.ids and final.test.ids == held.test.ids  # still scored; the test split unseen
    assert not set(final.train.ids) & set(final.test.ids)
    assert log.has(f"the {len(held.val.ids)} validation images are trained on as well")


def test_changed_file_makes_the_cache_stale(tmp_path):
    make_set(tmp_path / "data", 4)
    cfg = config(tmp_path / "data", tmp_path, val_fraction=0, test_fraction=0)
    before = dataset.prepare_splits(cfg)
    path = tmp_path / "data" / IMAGES / "ISIC_0000002.jpg"
    Image.new("RGB", (40, 30), (255, 0, 0)).save(path)
    log = Log()
    after = dataset.prepare_splits(cfg, log=log)
    assert log.has("cache for train is stale") and log.has("cached 4 train")
    assert after.train.images[2, ..., 0].mean() > 240 and before.mean != after.mean


def test_other_image_size_gets_its_own_cache(tmp_path):
    make_set(tmp_path / "data", 3)
    dataset.prepare_splits(config(tmp_path / "data", tmp_path, val_fraction=0, test_fraction=0))
    log = Log()
    splits = dataset.prepare_splits(config(tmp_path / "data", tmp_path, val_fraction=0, test_fraction=0,
                                           image_size=32), log=log)
    assert splits.train.images.shape == (3, 32, 32, 3) and log.has("cached 3 train pairs at 32px")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "manifest", "wrong_shape"])
def test_corrupt_cache_is_detected_and_rebuilt(tmp_path, damage):
    make_set(tmp_path / "data", 4)
    cfg = config(tmp_path / "data", tmp_path, val_fraction=0, test_fraction=0)
    good = np.array(dataset.prepare_splits(cfg).train.images)
    folder = tmp_path / "cache" / "size16"
    images = folder / "train_images.npy"
    if damage == "truncate":
        with open(images, "r+b") as f:
            f.truncate(images.stat().st_size // 2)
    elif damage == "garbage":
        images.write_bytes(b"\x93NUMPY garbage")
    elif damage == "manifest":
        (folder / "manifest.json").write_text("{not json")
    else:
        stat = images.stat()
        np.save(images, np.zeros((4, 8, 8, 3), np.uint8))
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["splits"]["train"]["files"]["images"].update(bytes=images.stat().st_size,
                                                              mtime_ns=images.stat().st_mtime_ns)
        (folder / "manifest.json").write_text(json.dumps(manifest))
        assert stat.st_size != images.stat().st_size
    log = Log()
    again = dataset.prepare_splits(cfg, log=log)
    assert log.has("cached 4 train")
    np.testing.assert_array_equal(again.train.images, good)


def test_cache_leaves_no_temporary_files(tmp_path):
    make_set(tmp_path / "data", 3)
    dataset.prepare_splits(config(tmp_path / "data", tmp_path, val_fraction=0, test_fraction=0))
    names = sorted(p.name for p in (tmp_path / "cache" / "size16").iterdir())
    assert names == [".lock", "manifest.json", "train_images.npy", "train_masks.npy"]


def test_unwritable_cache_folder(tmp_path):
    make_set(tmp_path / "data", 3)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(DataError, match=r"cannot create the cache folder .*--cache-dir"):
        dataset.prepare_splits(DataConfig(data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "file" / "c")))


def test_full_disk_while_caching_is_a_clear_error(tmp_path, monkeypatch):
    make_set(tmp_path / "data", 3)

    def no_space(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space, raising=False)
    with pytest.raises(DataError, match=r"cannot write the train cache .*No space left.*--cache-dir"):
        dataset.prepare_splits(config(tmp_path / "data", tmp_path, val_fraction=0, test_fraction=0))
    assert not list((tmp_path / "cache" / "size16").glob("*.npy"))


def test_leftovers_of_a_killed_build_are_removed(tmp_path):
    make_set(tmp_path / "data", 3)
    folder = tmp_path / "cache" / "size16"
    folder.mkdir(parents=True)
    (folder / ".train_images.99999.tmp.npy").write_bytes(b"half written")
    dataset.prepare_splits(config(tmp_path / "data", tmp_path, val_fraction=0, test_fraction=0))
    assert not (folder / ".train_images.99999.tmp.npy").exists()


def test_read_only_data_folder_gets_a_user_cache(tmp_path, monkeypatch):
    data = tmp_path / "data"
    make_set(data, 3)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    folder = dataset._default_cache_dir(data)
    assert folder.is_relative_to(tmp_path / "home-cache")


# --- command line ------------------------------------------------------------------------------


def test_cache_command_and_one_line_errors(tmp_path, capsys):
    make_set(tmp_path / "data", 4)
    dataset.main(["--data-dir", str(tmp_path / "data"), "--image-size", "16", "--cache-dir",
                  str(tmp_path / "cache"), "--num-workers", "1"])
    assert "train 4, val 0, test 0" in capsys.readouterr().out  # 10% of 4 rounds to 0
    with pytest.raises(SystemExit, match=r"^error: data folder .*nowhere does not exist") as exc:
        dataset.main(["--data-dir", str(tmp_path / "nowhere")])
    assert "\n" not in str(exc.value.code)


# --- a course's read-only copy (UQ's /home/groups/comp3710/ISIC2018) ------------------------------------


def test_the_course_copy_trains_from_its_x2_folders_without_writing_into_it(tmp_path, monkeypatch, capsys,
                                                                            read_only_view):
    from conftest import write_course_copy

    source = write_course_copy(tmp_path / "course", n=12, n_test=3)
    before = sorted(p.relative_to(source) for p in source.rglob("*"))
    data = read_only_view(source)
    with pytest.raises(OSError):
        (data / "probe").write_text("x")  # truly read-only, also for root
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    dataset.main(["--data-dir", str(data), "--image-size", "16", "--num-workers", "1"])
    out = capsys.readouterr().out
    assert "train: ISIC2018_Task1-2_Training_Input_x2/: 12 images, 48x48 to 48x48 px" in out
    assert "masks in ISIC2018_Task1_Training_GroundTruth_x2/ (12)" in out
    assert "test: ISIC2018_Task1-2_Test_Input/: 3 images" in out and "; no masks" in out
    assert "ignored 2 files that are not images" in out and "ATTRIBUTION.txt, LICENSE.txt" in out
    assert f"{data} is read-only, so the cache goes to {tmp_path / 'home-cache'}" in out
    # the unlabelled official test images are not the test split: it is held out of training, with masks
    assert "the official folder has no ground truth" in out
    pairs = dataset.find_pairs(data, log=lambda *_: None)
    assert len(pairs["train"]) == 12 and all(s.mask is None for s in pairs["test"])
    assert sorted(p.relative_to(source) for p in source.rglob("*")) == before


# --- colour constancy -------------------------------------------------------------------------


def test_shades_of_gray_removes_a_colour_cast():
    rng = np.random.default_rng(0)
    scene = rng.uniform(40, 200, (48, 48, 3))
    scene[10:30, 12:36] *= (0.6, 0.45, 0.4)  # a brownish lesion on paler skin
    cast = (1.15, 0.9, 0.7)  # a warm light source
    under_cast = np.clip(scene * cast, 0, 255).astype(np.uint8)
    neutral = scene.astype(np.uint8)
    # the illuminant estimate (the channels' 6-norms) comes out gray
    out = dataset.shades_of_gray(under_cast).astype(np.float64) / 255
    illuminant = np.mean(out ** dataset.SHADES_OF_GRAY_P, axis=(0, 1)) ** (1 / dataset.SHADES_OF_GRAY_P)
    assert np.ptp(illuminant) < 0.01 * illuminant.mean()
    # the same scene under two lights gives the same colours: a cast is a gain per channel, which the
    # correction divides out (up to one brightness factor and the uint8 rounding)
    a, b = (dataset.shades_of_gray(x).astype(np.float64) + 1 for x in (under_cast, neutral))
    chroma = lambda x: x / x.sum(axis=2, keepdims=True)  # noqa: E731
    assert np.abs(chroma(a) - chroma(b)).mean() < 0.005
    assert np.abs(chroma(under_cast.astype(np.float64) + 1) - chroma(neutral.astype(np.float64) + 1)).mean() > 0.05
    assert dataset.shades_of_gray(neutral).dtype == np.uint8


def test_a_colour_constant_cache_is_built_beside_the_plain_one(tmp_path):
    make_set(tmp_path / "data", 6)
    plain = dataset.prepare_splits(config(tmp_path / "data", tmp_path, val_fraction=0, test_fraction=0))
    log = Log()
    constant = dataset.prepare_splits(config(tmp_path / "data", tmp_path, val_fraction=0, test_fraction=0,
                                             shades_of_gray=True), log=log)
    assert log.has("cached 6 train pairs")  # built, not the plain cache reused
    assert (tmp_path / "cache" / "size16").is_dir() and (tmp_path / "cache" / "size16-shades-of-gray").is_dir()
    for i, ident in enumerate(constant.train.ids):
        image = tmp_path / "data" / IMAGES / f"{ident}.jpg"
        expected = dataset.shades_of_gray(dataset.network_image(image, 16)[0])
        np.testing.assert_array_equal(constant.train.images[i], expected)
        np.testing.assert_array_equal(plain.train.images[plain.train.ids.index(ident)],
                                      dataset.network_image(image, 16)[0])
    np.testing.assert_array_equal(constant.train.masks, plain.train.masks)
    assert constant.mean != plain.mean  # the statistics are the corrected images'
    again = Log()
    dataset.prepare_splits(config(tmp_path / "data", tmp_path, val_fraction=0, test_fraction=0), log=again)
    assert not again.has("cached")  # the plain cache is still there and still valid
