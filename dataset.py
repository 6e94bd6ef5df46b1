"""ISIC 2018 Task 1 data: finding and checking pairs, decoding, a uint8 cache, splits, normalisation.

    python dataset.py --data-dir data/ISIC2018 --image-size 256     # check every pair, build the cache

Batches (augmentation, shuffling, sharding) are loader.py's; the synthetic set is synthetic.py's and
the download download.py's, each with its own command.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

import devices
import utils


CACHE_FORMAT = "isic-cache/1"  # bump when the cache layout or the preprocessing changes
SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
MASK_SUFFIX = "_segmentation"  # ISIC 2018 writes _segmentation, ISIC 2016/2017 _Segmentation

# Official folders, e.g. ISIC2018_Task1-2_Training_Input and ISIC2018_Task1_Training_GroundTruth
# (ISIC 2017: ISIC-2017_Training_Data / ISIC-2017_Training_Part1_GroundTruth).
# A copy may add a suffix such as _x2 (UQ's course copy: ISIC2018_Task1-2_Training_Input_x2).
_OFFICIAL_IMAGES = re.compile(r"^IS[IB].*?(Training|Validation|Test)_(Input|Data)(_x\d+)?$", re.IGNORECASE)
_OFFICIAL_MASKS = re.compile(r"^IS[IB].*?(Training|Validation|Test).*_GroundTruth(_x\d+)?$", re.IGNORECASE)
_OTHER_TASKS = re.compile(r"task[23]_|part[23]_", re.IGNORECASE)  # lesion attributes, diagnosis
_SPLIT_OF = {"training": "train", "validation": "val", "test": "test"}


class DataError(ValueError):
    """Bad input data; the message names the file and what to do about it."""


@dataclass
class DataConfig:
    """Where the images come from, how they are resized and cached, and how they split. train.TrainConfig
    takes these fields as they are, so each is a flag of train.py as well as of this file's command."""

    # --- data ---
    data_dir: str = "data/ISIC2018"  # ISIC root (official folders or images/ + masks/); train.py uses its synthetic set when absent
    cache_dir: str | None = None  # where the resized images are cached; default <data-dir>/.cache, or ~/.cache/improved-unet-isic/ when the data folder is read-only
    image_size: int = 256  # side of the square the images are resized to (a multiple of 16 for the network)
    val_fraction: float = 0.1  # share of the training folder held out for validation when there is no official one
    test_fraction: float = 0.1  # share held out for testing when there is no official test ground truth
    split_seed: int = 0  # seed of the train/val/test split (kept fixed across runs to compare them)
    folds: int = 0  # K >= 2: K-fold cross-validation of the non-test images; validate on fold --fold
    fold: int = 0  # the validation fold, 0 .. K-1 (summarise the K runs with python crossval.py)
    train_on_val: bool = False  # also train on the validation images (a final fit, once the recipe is chosen): validation then scores images the network has seen, so only the test split tells how it does
    skip_bad: bool = False  # skip and count unreadable or mismatched pairs instead of stopping
    shades_of_gray: bool = False  # colour constancy (Shades of Gray, p = 6): each image's illuminant, estimated as its channels' 6-norm, is made gray; predict.py does the same for a model trained with it
    num_workers: int = 0  # threads decoding files when the cache is built; 0: one per CPU this job may use


def check_config(config: DataConfig) -> list[str]:
    """The data settings that cannot work, as messages naming the flags (empty when usable)."""
    problems = []
    if config.image_size < 1:
        problems.append(f"--image-size must be positive, got {config.image_size}")
    for name in ("val_fraction", "test_fraction"):
        if not 0 <= getattr(config, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(config, name)}")
    if config.val_fraction + config.test_fraction >= 1:
        problems.append("--val-fraction plus --test-fraction must leave images for training")
    if config.folds == 1 or config.folds < 0:
        problems.append(f"--folds must be 0 (no cross-validation) or at least 2, got {config.folds}")
    elif config.folds >= 2 and not 0 <= config.fold < config.folds:
        problems.append(f"--fold must be in 0..{config.folds - 1} for --folds {config.folds}, got {config.fold}")
    if config.num_workers < 0:
        problems.append(f"--num-workers must not be negative, got {config.num_workers}")
    return problems


@dataclass(frozen=True)
class Sample:
    id: str
    image: Path
    mask: Path | None


@dataclass
class CachedSplit:
    """One split held in memory-mapped uint8 arrays: images (N, S, S, 3) RGB, masks (N, S, S) in {0, 1}."""

    ids: list[str]
    images: np.ndarray
    masks: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Splits:
    train: CachedSplit
    val: CachedSplit
    test: CachedSplit
    mean: tuple[float, float, float]  # per channel, [0, 1] units, training split only
    std: tuple[float, float, float]
    description: str = ""  # how the splits were made, for logs and run folders


# ---------------------------------------------------------------------------------------------
# Reading one file


def _open(path: Path) -> Image.Image:
    try:
        nbytes = path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"{path} does not exist; check the path or re-copy the data") from None
    if nbytes == 0:
        raise DataError(f"{path} is empty (0 bytes); re-copy or re-download it, or pass --skip-bad")
    try:
        return Image.open(path)
    except UnidentifiedImageError:
        raise DataError(f"{path} is not an image Pillow can read, whatever its extension says; "
                        "replace it or pass --skip-bad") from None
    except Image.DecompressionBombError as err:
        raise DataError(f"{path} is too large to decode safely ({err}); downscale it first") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path} could not be decoded (truncated or corrupt: {err}); "
                        "re-copy or re-download it, or pass --skip-bad") from None


def _decode(img: Image.Image, path: Path) -> Image.Image:
    """Decode pixels and apply EXIF orientation; truncated or corrupt files become a DataError."""
    try:
        img.load()
        ImageOps.exif_transpose(img, in_place=True)
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path} could not be decoded (truncated or corrupt: {err}); "
                        "re-copy or re-download it, or pass --skip-bad") from None
    return img


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) at full resolution after EXIF orientation, read before any draft()."""
    w, h = img.size
    return (h, w) if img.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (w, h)


def _high_bit_depth_to_uint8(img: Image.Image) -> np.ndarray:
    a = np.asarray(img).astype(np.float32)
    if a.max() > 255:  # 16-bit data
        a = a / 257.0
    return np.clip(a + 0.5, 0, 255).astype(np.uint8)


def _read_image(path, size: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    path = Path(path)
    with _open(path) as img:
        full_size = _oriented_size(img)
        if size and img.format == "JPEG":
            # decode at 1/2, 1/4 or 1/8 scale while still >= size: a 6000x4000 photo never needs its
            # 72 MB full-resolution buffer, and decoding is several times faster
            img.draft("RGB", (size, size))
        img = _decode(img, path)
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            gray = _high_bit_depth_to_uint8(img)
            return np.repeat(gray[:, :, None], 3, axis=2), full_size
        if img.mode != "RGB":
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            img = img.convert("RGB")  # gray, RGBA (alpha dropped), CMYK, palette
        return np.asarray(img), full_size


def load_image(path, size: int | None = None) -> np.ndarray:
    """uint8 (H, W, 3) RGB, EXIF orientation applied; gray, RGBA and 16-bit inputs converted.

    With `size`, a JPEG is decoded at the smallest of 1/2, 1/4, 1/8 scale that keeps both sides
    >= size (Pillow's draft), for a later resize to size x size. Raises DataError if unreadable.
    """
    return _read_image(path, size)[0]


def _read_mask(path) -> tuple[np.ndarray, tuple[int, int], bool]:
    """(mask in {0, 1}, (width, height), whether values other than 0/255 were found)."""
    path = Path(path)
    with _open(path) as img:
        size = _oriented_size(img)
        img = _decode(img, path)
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            a = _high_bit_depth_to_uint8(img)
        elif img.mode == "1":
            a = np.asarray(img).astype(np.uint8) * 255
        elif img.mode in ("L", "LA"):
            a = np.asarray(img.getchannel(0))
        else:
            rgb = np.asarray(img.convert("RGB")).astype(np.int16)
            # a gray mask stored as RGB is fine (JPEG copies shift channels a little); colour is not
            if np.abs(rgb - rgb[:, :, :1]).max() > 16:
                raise DataError(f"mask {path} is a colour image; masks must be single-channel 0/255 PNGs "
                                "(were images and masks swapped, or the wrong folder given?)")
            a = rgb[:, :, 0].astype(np.uint8)
    nonbinary = bool(np.any((a != 0) & (a != 255)))
    if nonbinary and a.max() <= 1:
        return a.astype(np.uint8), size, True  # a 0/1 label image: >127 would empty it
    if nonbinary and np.count_nonzero((a > 32) & (a < 223)) > 0.2 * a.size:
        raise DataError(f"mask {path} is mostly grey values, not a 0/255 mask "
                        "(is it an image?); replace it or pass --skip-bad")
    return (a > 127).astype(np.uint8), size, nonbinary


def load_mask(path) -> np.ndarray:
    """uint8 (H, W) in {0, 1}, binarised at > 127 (0/1 label images are kept as they are)."""
    return _read_mask(path)[0]


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def resize_image(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Antialiased (Lanczos) resize of uint8 (H, W, 3) to (size, size, 3); a tuple is (height, width)."""
    h, w = _hw(size)
    if image.shape[:2] == (h, w):
        return np.ascontiguousarray(image)
    pil = Image.fromarray(image).resize((w, h), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(pil)


def resize_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a {0, 1} mask, so it stays binary; a tuple is (height, width)."""
    h, w = _hw(size)
    if mask.shape[:2] == (h, w):
        return np.ascontiguousarray(mask, dtype=np.uint8)
    pil = Image.fromarray(mask.astype(np.uint8)).resize((w, h), Image.Resampling.NEAREST)
    return np.asarray(pil)


SHADES_OF_GRAY_P = 6  # the Minkowski norm of Finlayson & Trezzi 2004; 6 is what they and ISIC entries found best


def shades_of_gray(image: np.ndarray, p: int = SHADES_OF_GRAY_P) -> np.ndarray:
    """Colour constancy by Shades of Gray (Finlayson & Trezzi 2004) of uint8 (H, W, 3) RGB.

    The illuminant is estimated as each channel's p-norm over the pixels, e_c = mean(I_c ** p) ** (1/p):
    p = 1 is the gray world, p = inf the white patch. Each channel is then divided by its share of it,
    I_c * |e| / (sqrt(3) e_c), which turns the illuminant gray and keeps its length; values are clipped
    to 255. Dermoscopes' light sources and cameras differ, and this removes their cast.
    """
    x = image.astype(np.float32) / 255.0
    illuminant = np.power(np.mean(np.power(x, p, dtype=np.float32), axis=(0, 1)), 1.0 / p)  # (3,)
    gain = np.linalg.norm(illuminant) / (math.sqrt(3.0) * np.maximum(illuminant, 1e-6))
    return np.clip(x * gain * 255.0 + 0.5, 0, 255).astype(np.uint8)


def network_image(path, size: int, colour_constancy: bool = False) -> tuple[np.ndarray, tuple[int, int]]:
    """The network's view of an image file: uint8 (size, size, 3) RGB, and the file's full (height, width).

    The one preprocessing chain of the project (decode at a reduced JPEG scale, EXIF orientation,
    conversion to RGB, Lanczos resize, then Shades of Gray with `colour_constancy`): the training cache
    and predict.py both call it, so a model always sees new images exactly as it saw its training
    images. normalize() does the rest on the device. The illuminant is estimated on the resized image,
    which costs a fraction of the full one's and differs from it only by the resize's smoothing.
    """
    image, (width, height) = _read_image(path, size)
    image = resize_image(image, size)
    return (shades_of_gray(image) if colour_constancy else image), (height, width)


def load_pair(sample: Sample, size: int, colour_constancy: bool = False) -> tuple[np.ndarray, np.ndarray, bool]:
    """Decode, check and resize one pair: (image (S, S, 3), mask (S, S) {0, 1}, mask had other values)."""
    image, image_hw = network_image(sample.image, size, colour_constancy)
    mask, (mask_w, mask_h), nonbinary = _read_mask(sample.mask)
    if image_hw != (mask_h, mask_w):
        raise DataError(f"mask {sample.mask} is {mask_w}x{mask_h} but its image {sample.image} "
                        f"is {image_hw[1]}x{image_hw[0]}; fix the pair or pass --skip-bad")
    return image, resize_mask(mask, size), nonbinary


# ---------------------------------------------------------------------------------------------
# Finding pairs


def _is_candidate(p: Path) -> bool:
    """Image-like files; LICENSE.txt, ATTRIBUTION.md, .DS_Store, ._ files and superpixels are not."""
    return (p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
            and not p.stem.lower().endswith("_superpixels") and p.is_file())


def _list_dir(folder: Path, log: Callable | None = None) -> list[Path]:
    """The folder's image files, sorted; `log` hears about the other files (licence and attribution texts)."""
    entries = sorted(folder.iterdir())
    files = [p for p in entries if _is_candidate(p)]
    if log is not None:
        others = [p.name for p in entries if not p.name.startswith(".") and p.is_file() and not _is_candidate(p)]
        if others:
            what = f"{len(others)} files that are not images" if len(others) > 1 else "1 file that is not an image"
            log(f"data: ignored {what} in {folder} ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''})")
    return files


def _find_layout(root: Path) -> tuple[str, dict[str, tuple[Path, Path | None]]]:
    """('official' | 'plain', {split: (image folder, mask folder or None)})."""
    official_images: dict[str, Path] = {}
    official_masks: dict[str, Path] = {}
    children = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for child in children:
        for pattern, found in ((_OFFICIAL_IMAGES, official_images), (_OFFICIAL_MASKS, official_masks)):
            m = pattern.match(child.name)
            if not m or _OTHER_TASKS.search(child.name):
                continue
            split = _SPLIT_OF[m.group(1).lower()]
            if split in found:
                raise DataError(f"{root} holds two {split} folders, {found[split].name} and {child.name}; "
                                "keep one data set per folder")
            found[split] = child
    plain: dict[str, tuple[Path, Path | None]] = {}
    if (root / "images").is_dir() or (root / "masks").is_dir():
        plain["train"] = (root / "images", root / "masks")
    for split in SPLITS:
        if (root / split / "images").is_dir():
            plain[split] = (root / split / "images", root / split / "masks")
    if (official_images or official_masks) and plain:
        raise DataError(f"{root} mixes layouts: official ISIC folders ({', '.join(p.name for p in children)}) and "
                        "images/ + masks/; keep one layout per data folder")
    if plain:
        for split, (images, masks) in plain.items():
            if not images.is_dir():
                raise DataError(f"{masks} has no matching {images} folder; put the images there")
            if not masks.is_dir():
                plain[split] = (images, None)
        return "plain", plain
    if official_images or official_masks:
        layout: dict[str, tuple[Path, Path | None]] = {}
        for split, masks in official_masks.items():
            if split not in official_images:
                raise DataError(f"{masks} has no matching image folder in {root} (e.g. "
                                f"ISIC2018_Task1-2_{masks.name.split('_')[-2]}_Input); download or copy it")
        for split, images in official_images.items():
            layout[split] = (images, official_masks.get(split))
        return "official", layout
    raise DataError(_explain_missing_layout(root))


def _explain_missing_layout(root: Path) -> str:
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    if not entries:
        return (f"data folder {root} is empty; run `python download.py --root {root}` or copy the "
                "ISIC 2018 Task 1 folders there")
    files = [p for p in entries if _is_candidate(p)]
    if files:
        if sum(p.stem.lower().endswith(MASK_SUFFIX) for p in files) > len(files) / 2:
            return (f"{root} holds mask files (e.g. {files[0].name}), not an ISIC data folder; pass the folder "
                    "above it, which holds both the image and the ground-truth folders")
        return (f"{root} holds images directly (e.g. {files[0].name}); pass the folder above it, or put "
                "images in images/ and masks in masks/")
    names = ", ".join(sorted(p.name for p in entries)[:6])
    return (f"no ISIC data layout in {root} (found: {names}); expected ISIC2018_Task1-2_Training_Input/ with "
            "ISIC2018_Task1_Training_GroundTruth/, or images/ with masks/")


def _pair_folder(images: Path, masks: Path | None, layout: str, skip_bad: bool,
                 log: Callable) -> list[Sample]:
    by_id: dict[str, Path] = {}
    image_files = _list_dir(images, log)
    if not image_files:
        raise DataError(f"image folder {images} has no images; copy or download them there")
    mask_named = [p for p in image_files if p.stem.lower().endswith(MASK_SUFFIX)]
    if mask_named:
        raise DataError(f"image folder {images} holds mask files (e.g. {mask_named[0].name}); were images and "
                        "masks swapped, or the wrong folder given? Move masks to the ground-truth folder")
    for p in image_files:
        if p.stem in by_id:
            raise DataError(f"{p} and {by_id[p.stem]} have the same id; keep one of them")
        by_id[p.stem] = p
    if masks is None:
        return [Sample(i, p, None) for i, p in sorted(by_id.items())]

    mask_of: dict[str, Path] = {}
    mask_files = _list_dir(masks, log)
    if not mask_files:
        raise DataError(f"ground-truth folder {masks} has no masks; copy or download them there")
    for p in mask_files:
        stem = p.stem
        if stem.lower().endswith(MASK_SUFFIX):
            stem = stem[: -len(MASK_SUFFIX)]
        elif layout == "official":
            raise DataError(f"{p} in ground-truth folder {masks} is not named <id>{MASK_SUFFIX}.png; "
                            "does that folder hold images? Put only the masks there")
        if stem in mask_of:
            raise DataError(f"masks {p} and {mask_of[stem]} belong to the same id; keep one of them")
        mask_of[stem] = p

    lonely_images = sorted(set(by_id) - set(mask_of))
    lonely_masks = sorted(set(mask_of) - set(by_id))
    problems = [f"image {by_id[i]} has no mask (expected {masks / (i + MASK_SUFFIX + '.png')})" for i in lonely_images]
    problems += [f"mask {mask_of[i]} has no image (expected {images / (i + '.jpg')})" for i in lonely_masks]
    if problems and not skip_bad:
        more = f" ({len(problems) - 1} more unpaired files)" if len(problems) > 1 else ""
        raise DataError(f"{problems[0]}{more}; add the missing files, remove the extras, or pass --skip-bad")
    if problems:
        log(f"data: skipped {len(problems)} unpaired files in {images.parent} (e.g. {problems[0]})")
    return [Sample(i, by_id[i], mask_of[i]) for i in sorted(set(by_id) & set(mask_of))]


def find_pairs(root, *, skip_bad: bool = False, log: Callable = print) -> dict[str, list[Sample]]:
    """Pair images with masks by id under an ISIC-layout root.

    Layouts: the official folders (ISIC2018_Task1-2_{Training,Validation,Test}_Input with
    ISIC2018_Task1_*_GroundTruth/<id>_segmentation.png; ISIC 2016/2017 names too), or images/ +
    masks/ (mask <id>.png, <id>_segmentation.png or <id>_Segmentation.png), optionally per split
    under train/, val/, test/. Returns {split: samples sorted by id}; a split without a
    ground-truth folder has Sample.mask None. Non-image files (LICENSE.txt, ATTRIBUTION.md) are ignored.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder {root} does not exist; pass --data-dir, run `python download.py "
                        f"--root {root}`, or make synthetic data with `python synthetic.py --out {root}`")
    if not root.is_dir():
        raise DataError(f"data folder {root} is a file, not a folder; pass the folder that holds the data")
    layout, folders = _find_layout(root)
    pairs = {split: _pair_folder(images, masks, layout, skip_bad, log)
             for split, (images, masks) in sorted(folders.items(), key=lambda kv: SPLITS.index(kv[0]))}
    seen: dict[str, Sample] = {}
    for samples in pairs.values():
        for s in samples:
            if s.id in seen:
                raise DataError(f"id {s.id} appears twice, as {seen[s.id].image} and {s.image}; "
                                "an image may belong to one split only")
            seen[s.id] = s
    return pairs


def describe_folders(root) -> list[str]:
    """One line per data folder: its split, image count and the images' sizes as stored (smallest, median
    and largest by area), and its ground truth; what `python dataset.py` reports before caching."""
    root = Path(root)
    _, folders = _find_layout(root)
    lines = []
    for split, (images, masks) in sorted(folders.items(), key=lambda kv: SPLITS.index(kv[0])):
        sizes = []
        for path in _list_dir(images):
            try:
                with _open(path) as img:
                    sizes.append(_oriented_size(img))
            except DataError:
                continue  # the check that follows names it
        sizes.sort(key=lambda wh: (wh[0] * wh[1], wh))
        shown = "no readable images" if not sizes else (
            f"{sizes[0][0]}x{sizes[0][1]} to {sizes[-1][0]}x{sizes[-1][1]} px, median "
            f"{sizes[len(sizes) // 2][0]}x{sizes[len(sizes) // 2][1]}")
        truth = f"masks in {masks.name}/ ({len(_list_dir(masks))})" if masks is not None else "no masks"
        lines.append(f"{split}: {images.name}/: {len(sizes)} images, {shown}; {truth}")
    return lines


# ---------------------------------------------------------------------------------------------
# Splits


def split_draw(sample_id: str, seed: int) -> float:
    """A number in [0, 1) fixed by the image's id and the seed alone (SHA-256), so that adding or removing
    other images never moves an image to another split."""
    digest = hashlib.sha256(f"{int(seed)}/{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64


def split_samples(pairs: dict[str, list[Sample]], val_fraction: float, test_fraction: float,
                  seed: int, folds: int = 0, fold: int = 0) -> tuple[dict[str, list[Sample]], str]:
    """Official labelled validation/test folders when present; otherwise seeded hold-outs of train.

    Each training image draws u = split_draw(id, seed): test when u < test_fraction, validation when
    u >= 1 - val_fraction, training otherwise. The split of an image depends on its id and the seed
    only, so the held-out shares are test_fraction and val_fraction up to sampling noise (binomial:
    214 +- 14 of 2,143 at 10%), and a changed folder never leaks training images into the test split
    (except in folders so small that a share drew no image; see below).

    folds = K >= 2: K-fold cross-validation. The test split is the same as without folds; the other
    images (the pool) fall into K folds by the same draw, and fold `fold` is the validation split
    (an official validation folder is then left out, so that every fold validates on the same kind of
    images). Every image of the pool is validated on exactly once over the K folds.
    """
    if folds == 1 or folds < 0 or (folds >= 2 and not 0 <= fold < folds):
        raise ValueError(f"folds must be 0 (no cross-validation) or at least 2, and fold in 0..folds-1; "
                         f"got folds={folds}, fold={fold}")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must be in [0, 1) "
                         "and sum to less than 1")
    if "train" not in pairs:
        raise DataError("no training folder found; the data folder needs ISIC2018_Task1-2_Training_Input "
                        "(with its ground truth) or images/ + masks/")
    train = pairs["train"]
    if any(s.mask is None for s in train):
        raise DataError(f"the training folder {train[0].image.parent} has no ground-truth folder next to it; "
                        "add ISIC2018_Task1_Training_GroundTruth (or masks/)")
    official = {name: pairs[name] for name in ("val", "test")
                if pairs.get(name) and all(s.mask is not None for s in pairs[name])}
    if folds >= 2:
        official.pop("val", None)
    draws = [split_draw(s.id, seed) for s in train]
    held = {"test": [] if "test" in official else [s for s, u in zip(train, draws) if u < test_fraction],
            "val": [] if "val" in official else [s for s, u in zip(train, draws) if u >= 1 - val_fraction]}
    if folds >= 2:
        low = 0.0 if "test" in official else test_fraction  # the pool's draws lie in [low, 1)
        held["val"] = [s for s, u in zip(train, draws)
                       if u >= low and min(folds - 1, int((u - low) / (1 - low) * folds)) == fold]
    # a tiny folder can draw no image for a share that should hold one; it gets the image whose draw is
    # nearest, so that a 10-image set still validates (from about 50 images on this practically never happens)
    for name, fraction, nearest in (("test", test_fraction, min), ("val", val_fraction, max)):
        if name not in official and round(len(train) * fraction) >= 1 and not held[name] and folds < 2:
            free = [(u, i) for i, u in enumerate(draws) if not any(train[i] in h for h in held.values())]
            held[name] = [train[nearest(free)[1]]]
    taken = {s.id for samples in held.values() for s in samples}
    out = {"train": [s for s in train if s.id not in taken]}
    if not out["train"]:
        raise DataError(f"only {len(train)} training pairs: nothing is left to train on after the hold-out; "
                        "add data or lower val_fraction/test_fraction")
    notes = []
    for name in ("val", "test"):
        out[name] = official.get(name, held[name])
        if name in official:
            notes.append(f"{name}: official folder")
        else:
            unlabelled = " (the official folder has no ground truth)" if pairs.get(name) else ""
            frac = val_fraction if name == "val" else test_fraction
            if name == "val" and folds >= 2:
                notes.append(f"val: fold {fold} of {folds} of the non-test images (split_seed {seed})")
            else:
                notes.append(f"{name}: {frac:.0%} of training held out with split_seed {seed}{unlabelled}")
    sizes = ", ".join(f"{k} {len(v)}" for k, v in out.items())
    return out, f"{sizes} ({'; '.join(notes)})"


# ---------------------------------------------------------------------------------------------
# The uint8 cache


def _fingerprint(samples: Sequence[Sample], size: int, skip_bad: bool, colour_constancy: bool = False) -> str:
    h = hashlib.sha256(f"{CACHE_FORMAT}|{size}|{skip_bad}{'|shades-of-gray' if colour_constancy else ''}\n".encode())
    for s in samples:
        for p in (s.image, s.mask):
            st = os.stat(p)
            h.update(f"{s.id}|{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _default_cache_dir(data_dir: Path) -> Path:
    cache = data_dir / ".cache"
    probe = cache if cache.exists() else data_dir
    if os.access(probe, os.W_OK):
        return cache
    # read-only data (a shared copy): keep one cache per data folder in the user's cache directory
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "improved-unet-isic"
    return base / hashlib.sha1(str(data_dir.resolve()).encode()).hexdigest()[:12]


@contextlib.contextmanager
def _locked(folder: Path):
    """Serialise cache builds (e.g. every torchrun rank calling prepare_splits); released on exit or death."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        open(folder / ".lock", "a").close()
    except OSError as err:
        raise DataError(f"cannot create the cache folder {folder}: {err.strerror or err}; pass --cache-dir "
                        "with a writable folder") from None
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; concurrent builds then just repeat work
        yield
        return
    with open(folder / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _file_record(path: Path) -> dict:
    st = path.stat()
    return {"name": path.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _open_cached(folder: Path, name: str, entry: dict, size: int) -> CachedSplit:
    """Memory-map a split's arrays; DataError says why the cache cannot be used."""
    n = len(entry["ids"])
    if n == 0:
        return _empty_split(size)
    arrays = []
    for key, shape in (("images", (n, size, size, 3)), ("masks", (n, size, size))):
        rec = entry["files"][key]
        path = folder / rec["name"]
        st = path.stat()  # FileNotFoundError is handled by the caller
        if (st.st_size, st.st_mtime_ns) != (rec["bytes"], rec["mtime_ns"]):
            raise DataError(f"{path} changed after it was written")
        arr = np.load(path, mmap_mode="c")  # copy-on-write: writable for torch, never written back
        if arr.shape != shape or arr.dtype != np.uint8:
            raise DataError(f"{path} holds {arr.dtype} {arr.shape}, expected uint8 {shape}")
        arrays.append(arr)
    return CachedSplit(list(entry["ids"]), arrays[0], arrays[1])


def _empty_split(size: int) -> CachedSplit:
    return CachedSplit([], np.zeros((0, size, size, 3), np.uint8), np.zeros((0, size, size), np.uint8))


def _build_split(folder: Path, name: str, samples: Sequence[Sample], size: int, workers: int,
                 skip_bad: bool, log: Callable, colour_constancy: bool = False) -> dict:
    """Decode and resize every pair once into <name>_images.npy / <name>_masks.npy (atomic writes)."""
    n = len(samples)
    if n == 0:
        return {"ids": [], "skipped": [], "nonbinary": 0}
    for stale in folder.glob(f".{name}_*.tmp.npy"):  # left by a build that was killed (we hold the lock)
        stale.unlink(missing_ok=True)
    tmp = {key: folder / f".{name}_{key}.{os.getpid()}.tmp.npy" for key in ("images", "masks")}
    try:
        images = np.lib.format.open_memmap(tmp["images"], mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
        masks = np.lib.format.open_memmap(tmp["masks"], mode="w+", dtype=np.uint8, shape=(n, size, size))
        if hasattr(os, "posix_fallocate"):
            # reserve the space now: a full disk under a memory map is a SIGBUS later, not an error
            for path in tmp.values():
                with open(path, "rb+") as f:
                    os.posix_fallocate(f.fileno(), 0, path.stat().st_size)
    except OSError as err:
        for path in tmp.values():
            path.unlink(missing_ok=True)
        need = n * size * size * 4 / 2**20
        raise DataError(f"cannot write the {name} cache ({need:.0f} MiB) in {folder}: {err.strerror or err}; "
                        "free some space or pass --cache-dir") from None
    kept, skipped, nonbinary = [], [], 0

    def work(sample):
        try:
            return load_pair(sample, size, colour_constancy)
        except DataError as err:
            return err

    try:
        # Pillow decodes and resizes with the GIL released, so threads scale without pickling arrays
        with ThreadPoolExecutor(max(1, workers)) as pool:
            results = pool.map(work, samples) if workers > 1 and n > 1 else map(work, samples)
            bar = tqdm(results, total=n, desc=f"caching {name} at {size}px", unit="img", mininterval=1.0,
                       dynamic_ncols=True, leave=False, disable=n < 64)
            for sample, result in zip(samples, bar):
                if isinstance(result, DataError):
                    if not skip_bad:
                        raise result
                    skipped.append([sample.id, str(result)])
                    continue
                images[len(kept)], masks[len(kept)], was_nonbinary = result
                nonbinary += was_nonbinary
                kept.append(sample.id)
        if skipped:
            log(f"data: skipped {len(skipped)} bad {name} pairs (--skip-bad), e.g. {skipped[0][1]}")
        records = {}
        for key, arr in (("images", images), ("masks", masks)):
            final = folder / f"{name}_{key}.npy"
            if len(kept) < n:  # rewrite without the rows of skipped pairs
                np.save(tmp[key], np.ascontiguousarray(arr[: len(kept)]))
            else:
                arr.flush()
            del arr
            with open(tmp[key], "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp[key], final)
            records[key] = _file_record(final)
    finally:
        del images, masks
        for p in tmp.values():
            p.unlink(missing_ok=True)
    if not kept:
        raise DataError(f"every {name} pair was bad (e.g. {skipped[0][1]})")
    return {"ids": kept, "skipped": skipped, "nonbinary": nonbinary, "files": records}


def _channel_stats(images: np.ndarray, chunk: int = 64) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std in [0, 1] units from 256-bin histograms (no float copy of the data)."""
    hist = np.zeros((3, 256), np.int64)
    for start in range(0, len(images), chunk):
        block = np.asarray(images[start:start + chunk])
        for c in range(3):
            hist[c] += np.bincount(block[..., c].ravel(), minlength=256)
    values = np.arange(256, dtype=np.float64) / 255.0
    count = hist.sum(axis=1)
    mean = (hist * values).sum(axis=1) / count
    var = (hist * values**2).sum(axis=1) / count - mean**2
    return tuple(float(m) for m in mean), tuple(float(math.sqrt(max(v, 0.0))) for v in var)


def prepare_splits(config: DataConfig, log: Callable = print) -> Splits:
    """Find pairs, split them, and return every split from the uint8 cache (built or rebuilt as needed).

    A split's cache is reused when the fingerprint of its files (paths, sizes, mtimes), the image
    size and the cache format are unchanged and its arrays load with the expected shapes;
    otherwise it is rebuilt. Mean and std come from the training split only.
    """
    data_dir = Path(config.data_dir)
    size = int(config.image_size)
    if size < 1:
        raise ValueError(f"image_size must be positive, got {size}")
    pairs = find_pairs(data_dir, skip_bad=config.skip_bad, log=log)
    assigned, description = split_samples(pairs, config.val_fraction, config.test_fraction, config.split_seed,
                                          config.folds, config.fold)
    if config.train_on_val:
        assigned = {**assigned, "train": assigned["train"] + assigned["val"]}
        description += f"; --train-on-val: the {len(assigned['val'])} validation images are trained on as well"
    log(f"data: {data_dir}: {description}")
    cache_root = Path(config.cache_dir) if config.cache_dir else _default_cache_dir(data_dir)
    # a preprocessing of its own gets a folder of its own, so runs with and without it keep both caches
    folder = cache_root / (f"size{size}-shades-of-gray" if config.shades_of_gray else f"size{size}")
    if not config.cache_dir and not cache_root.is_relative_to(data_dir):
        log(f"data: {data_dir} is read-only, so the cache goes to {folder} (--cache-dir chooses another folder)")
    workers = config.num_workers or devices.usable_cpus()  # the job's CPUs, not the whole node's
    out: dict[str, CachedSplit] = {}
    with _locked(folder):
        manifest_path = folder / "manifest.json"
        try:
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("format") != CACHE_FORMAT or manifest.get("image_size") != size:
                manifest = None
        except (OSError, ValueError):
            manifest = None
        manifest = manifest or {"format": CACHE_FORMAT, "image_size": size, "splits": {}}
        for name in SPLITS:
            samples = assigned[name]
            fingerprint = _fingerprint(samples, size, config.skip_bad, config.shades_of_gray)
            entry = manifest["splits"].get(name)
            if entry and entry.get("fingerprint") == fingerprint:
                try:
                    out[name] = _open_cached(folder, name, entry, size)
                    continue
                except (OSError, ValueError, KeyError) as err:
                    log(f"data: cache for {name} is unusable ({err}); rebuilding")
            elif entry:
                log(f"data: cache for {name} is stale (files, split or image size changed); rebuilding")
            start = time.perf_counter()
            entry = _build_split(folder, name, samples, size, workers, config.skip_bad, log, config.shades_of_gray)
            entry["fingerprint"] = fingerprint
            if name == "train":
                entry["mean"], entry["std"] = _channel_stats(np.load(folder / "train_images.npy", mmap_mode="r"))
            manifest["splits"][name] = entry
            utils.write_json(manifest_path, manifest)
            if samples:
                log(f"data: cached {len(entry['ids'])} {name} pairs at {size}px in "
                    f"{time.perf_counter() - start:.1f}s -> {folder}")
            if entry["nonbinary"]:
                log(f"data: note: {entry['nonbinary']} {name} masks had values other than 0/255 "
                    "(binarised at >127)")
            out[name] = _open_cached(folder, name, entry, size)
    train_entry = manifest["splits"]["train"]
    return Splits(out["train"], out["val"], out["test"], tuple(train_entry["mean"]), tuple(train_entry["std"]),
                  description)


# ---------------------------------------------------------------------------------------------
# Normalisation


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> float32 (B, 3, S, S) with x = (uint8 / 255 - mean) / std (see standardize)."""
    x = images.permute(0, 3, 1, 2).contiguous().float()
    return standardize(x.div_(255.0), mean, std)


def standardize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Float images (B, 3, H, W) in [0, 1] -> (x - mean) / std per channel, in place.

    mean, std: three floats each, or float32 tensors already on x's device, which are used as they are
    (per-step callers pass those: a tuple is copied to the device on every call).
    """
    mean, std = (v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=torch.float32, device=x.device)
                 for v in (mean, std))
    return x.sub_(mean.view(1, 3, 1, 1)).div_(std.view(1, 3, 1, 1))


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> tuple[DataConfig, bool]:
    """(the DataConfig the flags describe, whether only --report was asked for)."""
    parser = utils.build_parser(DataConfig, "Check every image/mask pair and build (or reuse) the cache.")
    parser.add_argument("--report", action="store_true",
                        help="only report the folders (image counts and sizes, read from the file headers) and "
                             "how the pairs split, without decoding or caching anything")
    args = parser.parse_args(argv)
    config = utils.subconfig(DataConfig, args)
    problems = check_config(config)
    if problems:
        parser.error("\n  ".join(problems))
    return config, args.report


def main(argv=None) -> None:
    config, report_only = parse_args(argv)
    try:
        for line in describe_folders(config.data_dir) if Path(config.data_dir).is_dir() else []:
            print(f"data: {line}")
        if report_only:
            pairs = find_pairs(config.data_dir, skip_bad=config.skip_bad)
            _, description = split_samples(pairs, config.val_fraction, config.test_fraction, config.split_seed,
                                           config.folds, config.fold)
            print(f"data: {description}")
            return
        start = time.perf_counter()
        splits = prepare_splits(config)
    except DataError as err:
        sys.exit(f"error: {err}")
    print(f"cache ready in {time.perf_counter() - start:.1f}s: train {len(splits.train)}, "
          f"val {len(splits.val)}, test {len(splits.test)}; "
          f"mean {[round(v, 4) for v in splits.mean]}, std {[round(v, 4) for v in splits.std]}")


if __name__ == "__main__":
    main()
