"""Synthetic dermoscopy-like lesions in the official ISIC 2018 folder layout (the built-in data set).

    python synthetic.py --out data/synthetic -n 400 --seed 0

Each image is drawn from its own generator seeded by (seed, index), so a seed always gives the same
files whatever the number of threads. Ids are ISIC_S<6 digits>, which no real ISIC id (ISIC_<7
digits>) can equal.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

import utils

SYNTHETIC_DIR = "data/synthetic"
SYNTHETIC_VERSION = 1  # bump when the generator changes, so ensure_synthetic regenerates
IMAGE_FOLDER = "ISIC2018_Task1-2_Training_Input"
MASK_FOLDER = "ISIC2018_Task1_Training_GroundTruth"
MARKER = "synthetic.json"

# RGB in [0, 1]: very light to dark skin, and lesion pigments (light/dark brown, black, blue-grey, red)
SKIN_TONES = np.array([[0.93, 0.80, 0.74], [0.89, 0.71, 0.62], [0.80, 0.60, 0.49],
                       [0.66, 0.47, 0.36], [0.50, 0.34, 0.25], [0.38, 0.25, 0.18]], np.float32)
PIGMENTS = np.array([[0.62, 0.40, 0.25], [0.42, 0.25, 0.15], [0.22, 0.13, 0.10],
                     [0.40, 0.40, 0.50], [0.70, 0.33, 0.30], [0.52, 0.30, 0.22]], np.float32)
ASPECTS = (0.75, 0.75, 0.75, 0.667, 0.5625, 1.0)  # height / width of typical ISIC photos


def sample_id(index: int) -> str:
    return f"ISIC_S{index:06d}"


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Zero-mean, unit-ish smooth noise: a cells x cells random grid upsampled bicubically."""
    h, w = shape
    grid = rng.standard_normal((cells, max(2, round(cells * w / h)))).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((w, h), Image.Resampling.BICUBIC))


def _render(index: int, seed: int) -> tuple[Image.Image, Image.Image]:
    """One (RGB image, L mask 0/255) pair, drawn from default_rng([seed, index])."""
    rng = np.random.default_rng([seed, index])
    width = int(rng.integers(600, 1500))
    height = int(width * rng.choice(ASPECTS))
    # colour fields are smooth, so they are drawn at 1/4 resolution and upsampled
    h, w = height // 4, width // 4
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy = (yy - h / 2) / (min(h, w) / 2)  # 1.0 = half the shorter side
    xx = (xx - w / 2) / (min(h, w) / 2)

    # skin: base tone with mottling and a faint reddish blotch field
    tone = SKIN_TONES[rng.integers(len(SKIN_TONES))] * rng.uniform(0.93, 1.05, 3).astype(np.float32)
    skin = tone * (1 + 0.04 * _smooth_noise(rng, (h, w), 6)[..., None])
    redness = np.clip(_smooth_noise(rng, (h, w), 4), 0, None)[..., None]
    skin = skin + 0.05 * redness * np.array([1.0, -0.5, -0.5], np.float32)

    # lesion: an irregular star-shaped outline plus noise; level < 1 inside
    cy, cx = rng.uniform(-0.25, 0.25, 2)
    radius = rng.uniform(0.22, 0.75)
    r = np.hypot(yy - cy, xx - cx)
    theta = np.arctan2(yy - cy, xx - cx)
    table = np.linspace(-math.pi, math.pi, 721)  # outline radius per angle, looked up per pixel
    outline = sum(rng.uniform(0, 0.22 / math.sqrt(k)) * np.cos(k * table + rng.uniform(0, 2 * math.pi))
                  for k in range(2, 8))
    wobble = np.interp(theta, table, outline)
    level = r / (radius * (1 + wobble)) + rng.uniform(0.05, 0.2) * _smooth_noise(rng, (h, w), 10)
    softness = rng.uniform(0.03, 0.18)  # fuzzy border width
    alpha = np.clip((1 - level) / softness + 0.5, 0, 1)[..., None]

    # pigment: two or three tones mixed by smooth fields, a darker or lighter core, a network texture
    k = rng.integers(2, 4)
    tones = PIGMENTS[rng.choice(len(PIGMENTS), k, replace=False)] * rng.uniform(0.85, 1.15, (k, 3)).astype(np.float32)
    mix = np.stack([_smooth_noise(rng, (h, w), 5) * 2 for _ in range(k)], -1)
    mix = np.exp(mix - mix.max(-1, keepdims=True))
    lesion = (mix / mix.sum(-1, keepdims=True)) @ tones
    lesion = lesion * (1 + rng.uniform(-0.25, 0.25) * np.clip(1 - level, 0, 1))[..., None]
    # pigment network: the zero crossings of fine noise form an irregular mesh; plus scattered dots
    fine = _smooth_noise(rng, (h, w), int(min(h, w) / rng.uniform(4, 8)))
    net = np.exp(-((fine / 0.35) ** 2))
    dots = np.clip(_smooth_noise(rng, (h, w), int(min(h, w) / 5)) - 1.2, 0, None)
    lesion = lesion * (1 - rng.uniform(0.1, 0.3) * net - 0.5 * dots)[..., None]
    if rng.random() < 0.3:  # low contrast: pulled towards the skin, set apart mostly by hue and texture
        pull = rng.uniform(0.35, 0.6)
        lesion = pull * tone + (1 - pull) * lesion
    img = skin * (1 - alpha) + lesion * alpha

    # uneven illumination (a gradient and a broad bump), then the dermoscope's dark circular vignette
    angle = rng.uniform(0, 2 * math.pi)
    light = 1 + rng.uniform(0.05, 0.4) * (np.cos(angle) * xx + np.sin(angle) * yy) / 2
    light = light + 0.08 * _smooth_noise(rng, (h, w), 3)
    img = img * light[..., None]
    if rng.random() < 0.5:
        corner = math.hypot(w, h) / min(h, w)  # radius of the frame's corners
        rv = rng.uniform(0.8, 1.05) * corner
        edge = rng.uniform(0.03, 0.12)
        dark = rng.uniform(0.02, 0.2)
        vig = dark + (1 - dark) / (1 + np.exp((np.hypot(yy, xx) - rv) / edge))
        img = img * vig[..., None]
    img = img * (1 + 0.03 * rng.standard_normal(img.shape, dtype=np.float32))
    small = Image.fromarray(np.clip(img * 255, 0, 255).astype(np.uint8))
    image = small.resize((width, height), Image.Resampling.BILINEAR)

    # mask from the same level field, upsampled so its outline stays smooth
    level_full = Image.fromarray(level.astype(np.float32), mode="F").resize((width, height), Image.Resampling.BILINEAR)
    mask = Image.fromarray(((np.asarray(level_full) < 1) * 255).astype(np.uint8))

    _draw_artefacts(rng, image, (cx, cy, radius), min(height, width))
    return image, mask


def _draw_artefacts(rng: np.random.Generator, image: Image.Image, lesion: tuple, short: int) -> None:
    """Hair strands crossing the lesion, gel bubbles and ruler ticks, drawn at full resolution."""
    width, height = image.size
    cx = width / 2 + lesion[0] * short / 2
    cy = height / 2 + lesion[1] * short / 2
    draw = ImageDraw.Draw(image, "RGBA")
    if rng.random() < 0.6:
        for _ in range(int(rng.integers(1, 25))):
            # a quadratic Bezier through a point near the lesion
            through = np.array([cx, cy]) + rng.normal(0, lesion[2] * short / 2, 2)
            ang = rng.uniform(0, math.pi)
            half = rng.uniform(0.3, 0.9) * short
            p0 = through - half * np.array([math.cos(ang), math.sin(ang)])
            p2 = through + half * np.array([math.cos(ang), math.sin(ang)])
            p1 = through + rng.normal(0, 0.15 * short, 2)
            t = np.linspace(0, 1, 24)[:, None]
            pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
            shade = int(rng.integers(10, 70))
            draw.line([tuple(p) for p in pts], fill=(shade, int(shade * 0.8), int(shade * 0.7), 230),
                      width=int(rng.integers(2, 6)))
    if rng.random() < 0.3:
        for _ in range(int(rng.integers(1, 6))):
            x, y = rng.uniform(0, width), rng.uniform(0, height)
            rad = rng.uniform(0.02, 0.08) * short
            draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=(255, 255, 255, 25),
                         outline=(255, 255, 255, 170), width=max(2, int(rad / 12)))
    if rng.random() < 0.2:
        y = rng.uniform(0.05, 0.15) * height if rng.random() < 0.5 else rng.uniform(0.85, 0.95) * height
        x0, step = rng.uniform(0.1, 0.3) * width, rng.uniform(0.012, 0.02) * width
        for i in range(int(rng.integers(10, 30))):
            tick = (0.04 if i % 5 else 0.07) * height
            draw.line([(x0 + i * step, y), (x0 + i * step, y + tick)], fill=(20, 20, 20, 220), width=2)


def _write_pair(out: Path, index: int, seed: int) -> None:
    image, mask = _render(index, seed)
    name = sample_id(index)
    image.save(out / IMAGE_FOLDER / f"{name}.jpg", quality=90)
    mask.save(out / MASK_FOLDER / f"{name}_segmentation.png", compress_level=1)


def make_synthetic(out_dir, n: int, seed: int = 0, log: Callable = print, num_workers: int = 0) -> Path:
    """Write n pairs under out_dir in the official layout; a marker file records (n, seed) when complete."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    out = Path(out_dir)
    for folder in (IMAGE_FOLDER, MASK_FOLDER):
        (out / folder).mkdir(parents=True, exist_ok=True)
        for old in (out / folder).glob("ISIC_S*"):  # leftovers of a larger or different set
            old.unlink()
    (out / MARKER).unlink(missing_ok=True)
    workers = num_workers or os.cpu_count() or 1
    log(f"synthetic: writing {n} ISIC-style pairs (seed {seed}) to {out}")
    # processes, not threads: the numpy drawing holds the GIL. fork where there is one: the children only
    # draw with numpy and Pillow, and spawn would re-import the caller's __main__ (and torch) in each
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) if workers > 1 else \
            contextlib.nullcontext() as pool:
        jobs = (pool.map if pool else map)(_write_pair, [out] * n, range(n), [seed] * n)
        for _ in tqdm(jobs, total=n, desc="synthetic", unit="img", leave=False, mininterval=1.0, disable=n < 64):
            pass
    marker = {"version": SYNTHETIC_VERSION, "n": n, "seed": seed}
    utils.write_json(out / MARKER, marker)  # last, and whole: its presence says the set is complete
    return out


def ensure_synthetic(n: int, seed: int = 0, log: Callable = print, out_dir=SYNTHETIC_DIR) -> Path:
    """The synthetic set at out_dir, generated only when it is missing, incomplete or of other (n, seed)."""
    out = Path(out_dir)
    try:
        marker = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        marker = None
    if marker == {"version": SYNTHETIC_VERSION, "n": n, "seed": seed}:
        images = list((out / IMAGE_FOLDER).glob("ISIC_S*.jpg"))
        masks = list((out / MASK_FOLDER).glob("ISIC_S*_segmentation.png"))
        if len(images) == len(masks) == n:
            return out
    return make_synthetic(out, n, seed, log)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic ISIC-style set (official folder layout).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default=SYNTHETIC_DIR, help="output root")
    parser.add_argument("-n", type=int, default=400, help="number of image/mask pairs")
    parser.add_argument("--seed", type=int, default=0, help="seed; the same seed gives the same files")
    parser.add_argument("--num-workers", type=int, default=0, help="generating processes (0: one per CPU)")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"-n must be at least 1, got {args.n}")
    make_synthetic(args.out, args.n, args.seed, num_workers=args.num_workers)


if __name__ == "__main__":
    main()
