"""The synthetic lesion set: official layout, determinism, and not separable by a global threshold."""

import json
import re

import numpy as np
from PIL import Image

import dataset
import synthetic

REAL_ISIC_ID = re.compile(r"^ISIC_\d{7}$")


def otsu_threshold(gray: np.ndarray) -> int:
    """Otsu (1979): the threshold that maximises the between-class variance of a uint8 histogram."""
    hist = np.bincount(gray.ravel(), minlength=256).astype(np.float64)
    p = hist / hist.sum()
    omega = np.cumsum(p)  # weight of the class at or below t
    mu = np.cumsum(p * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * omega - mu) ** 2 / (omega * (1 - omega))
    return int(np.nanargmax(between))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * np.logical_and(a, b).sum() / total


def otsu_dice(image: np.ndarray, mask: np.ndarray) -> float:
    gray = np.asarray(Image.fromarray(image).convert("L"))
    return dice(gray <= otsu_threshold(gray), mask.astype(bool))  # lesions are darker than skin


def test_otsu_implementation_on_an_easy_image():
    yy, xx = np.mgrid[:64, :64]
    mask = (yy - 30) ** 2 + (xx - 34) ** 2 < 15**2
    rng = np.random.default_rng(0)
    gray = np.where(mask, 70, 190) + rng.normal(0, 12, mask.shape)
    image = np.repeat(np.clip(gray, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
    assert 90 < otsu_threshold(image[..., 0]) < 170
    assert otsu_dice(image, mask) > 0.95  # the check below can fail: Otsu does solve easy images


def test_layout_ids_and_mask_values(tmp_path):
    synthetic.make_synthetic(tmp_path, 3, seed=1, num_workers=1, log=lambda *_: None)
    pairs = dataset.find_pairs(tmp_path)  # read by the same code as the real data
    assert list(pairs) == ["train"] and len(pairs["train"]) == 3
    for s in pairs["train"]:
        assert re.fullmatch(r"ISIC_S\d{6}", s.id) and not REAL_ISIC_ID.match(s.id)
        assert s.image.parent.name == "ISIC2018_Task1-2_Training_Input"
        assert s.mask.name == f"{s.id}_segmentation.png"
        with Image.open(s.image) as img, Image.open(s.mask) as mask:
            assert img.format == "JPEG" and img.mode == "RGB" and 600 <= img.width < 1500
            assert 0.5 <= img.height / img.width <= 1.0 and mask.size == img.size and mask.mode == "L"
            values = set(np.unique(np.asarray(mask)).tolist())
        assert values == {0, 255}


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    for name, seed in (("a", 4), ("b", 4), ("c", 5)):
        synthetic.make_synthetic(tmp_path / name, 2, seed=seed, num_workers=2 if name == "b" else 1,
                                 log=lambda *_: None)

    def content(name):
        return [p.read_bytes() for p in sorted((tmp_path / name).rglob("ISIC_S*"))]

    assert content("a") == content("b")  # whatever the number of workers
    assert content("a") != content("c")


def test_ensure_synthetic_generates_only_when_needed(tmp_path):
    out = tmp_path / "syn"
    messages = []
    assert synthetic.ensure_synthetic(2, 0, messages.append, out_dir=out) == out
    stamp = (out / synthetic.IMAGE_FOLDER / "ISIC_S000000.jpg").stat().st_mtime_ns
    synthetic.ensure_synthetic(2, 0, messages.append, out_dir=out)  # complete: untouched
    assert (out / synthetic.IMAGE_FOLDER / "ISIC_S000000.jpg").stat().st_mtime_ns == stamp
    assert len(messages) == 1
    (out / synthetic.MASK_FOLDER / "ISIC_S000001_segmentation.png").unlink()  # incomplete: redone
    synthetic.ensure_synthetic(2, 0, messages.append, out_dir=out)
    assert len(messages) == 2 and (out / synthetic.MASK_FOLDER / "ISIC_S000001_segmentation.png").exists()
    synthetic.ensure_synthetic(1, 0, messages.append, out_dir=out)  # another size: redone, no leftovers
    assert len(list((out / synthetic.IMAGE_FOLDER).iterdir())) == 1
    assert json.loads((out / synthetic.MARKER).read_text())["n"] == 1


def test_synthetic_command(tmp_path):
    synthetic.main(["--out", str(tmp_path), "-n", "2", "--seed", "3", "--num-workers", "1"])
    assert len(dataset.find_pairs(tmp_path)["train"]) == 2


def test_otsu_on_grayscale_does_not_solve_the_synthetic_set(tmp_path):
    synthetic.make_synthetic(tmp_path, 20, seed=0, num_workers=2, log=lambda *_: None)
    scores = []
    for s in dataset.find_pairs(tmp_path)["train"]:
        image, mask, _ = dataset.load_pair(s, 256)
        scores.append(otsu_dice(image, mask))
    assert np.mean(scores) <= 0.75  # real ISIC 2018 scores about 0.68
    assert np.mean(scores) >= 0.3  # yet lesions are mostly darker than skin, as in dermoscopy
