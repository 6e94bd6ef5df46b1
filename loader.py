"""Batches on the training device: augmentation and loading straight from dataset.py's uint8 cache.

    python loader.py --data-dir data/ISIC2018      # images/s: decoding the files every epoch vs cached batches

dataset.py turns image files into cached, split uint8 arrays; this file turns those arrays into
shuffled, sharded, augmented and normalised float batches, with no DataLoader workers.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Literal

import torch
import torch.nn.functional as F

import dataset
import devices
import utils


@dataclass
class AugmentConfig:
    flips: bool = True  # random flips and 90-degree turns (the 8 symmetries of the square)
    rotate_deg: float = 15.0  # extra rotation drawn from [-rotate_deg, rotate_deg]
    scale: tuple[float, float] = (0.9, 1.1)  # zoom factor range
    affine_p: float = 1.0  # share of images that get the rotation/zoom (the rest only flips and turns)
    brightness: float = 0.2  # brightness factor drawn from [1 - x, 1 + x] per image
    contrast: float = 0.2  # contrast factor around the image's mean luminance, likewise
    saturation: float = 0.2  # saturation factor around each pixel's luminance, likewise


# --augment presets of train.py; each knob can also be set on its own
AUGMENT_PRESETS = {
    "none": AugmentConfig(flips=False, rotate_deg=0.0, scale=(1.0, 1.0), affine_p=0.0, brightness=0.0,
                          contrast=0.0, saturation=0.0),
    "flips": AugmentConfig(flips=True, rotate_deg=0.0, scale=(1.0, 1.0), affine_p=0.0, brightness=0.0,
                           contrast=0.0, saturation=0.0),
    "light": AugmentConfig(flips=True, rotate_deg=15.0, scale=(0.9, 1.1), affine_p=0.3, brightness=0.1,
                           contrast=0.1, saturation=0.1),
    "full": AugmentConfig(),
}

Augment = Literal[tuple(AUGMENT_PRESETS)]  # --augment's choices: the presets above
DEFAULT_AUGMENT = "flips"  # what train.py trains with unless --augment says otherwise (benchmark.py times it)


@dataclass
class AugmentSettings:
    """The augmentation settings of a training run: a preset, and knobs that override it one by one.
    train.TrainConfig takes these fields as they are, so each is a flag of train.py. A new augmentation
    is a field of AugmentConfig, its value in each preset, a knob here, and its draw and application below."""

    # --- augmentation ---
    augment: Augment = DEFAULT_AUGMENT  # preset: none, flips (the square's 8 symmetries), light or full (see loader.AUGMENT_PRESETS)
    flips: bool | None = None  # random flips and 90-degree turns; default: the preset's
    rotate_deg: float | None = None  # rotation drawn from [-x, x] degrees; default: the preset's
    zoom: float | None = None  # zoom factor drawn from [1 - x, 1 + x]; default: the preset's
    affine_p: float | None = None  # share of images that get the rotation and zoom; default: the preset's
    brightness: float | None = None  # brightness factor drawn from [1 - x, 1 + x]; default: the preset's
    contrast: float | None = None  # contrast factor around the mean luminance, likewise; default: the preset's
    saturation: float | None = None  # saturation factor around each pixel's luminance, likewise; default: the preset's


def check_augment(settings: AugmentSettings) -> list[str]:
    """The augmentation settings that cannot work, as messages naming the flags (empty when usable)."""
    problems = []
    if settings.augment not in AUGMENT_PRESETS:
        problems.append(f"--augment must be one of {', '.join(AUGMENT_PRESETS)}, got {settings.augment!r}")
    for name in ("rotate_deg", "brightness", "contrast", "saturation"):
        if getattr(settings, name) is not None and getattr(settings, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must not be negative, got {getattr(settings, name)}")
    if settings.zoom is not None and not 0 <= settings.zoom < 1:
        problems.append(f"--zoom must be in [0, 1), got {settings.zoom}")
    if settings.affine_p is not None and not 0 <= settings.affine_p <= 1:
        problems.append(f"--affine-p must be in [0, 1], got {settings.affine_p}")
    return problems


def augmentation(settings: AugmentSettings) -> AugmentConfig:
    """The --augment preset with the knobs that were given laid over it."""
    knobs = {f.name: getattr(settings, f.name) for f in dataclasses.fields(AugmentConfig)
             if getattr(settings, f.name, None) is not None}
    if settings.zoom is not None:
        knobs["scale"] = (1.0 - settings.zoom, 1.0 + settings.zoom)
    return dataclasses.replace(AUGMENT_PRESETS[settings.augment], **knobs)


def _mix_seed(*parts: int) -> int:
    digest = hashlib.sha256("/".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _affine_grid(theta: torch.Tensor, size: int) -> torch.Tensor:
    """F.affine_grid(theta, (B, C, size, size), align_corners=False), three times faster on CPU."""
    b = theta.shape[0]
    lin = (torch.arange(size, dtype=torch.float32, device=theta.device) * 2 + 1) / size - 1  # pixel centres
    x, y = lin.view(1, 1, size), lin.view(1, size, 1)
    t = theta.view(b, 6, 1, 1)
    grid = torch.empty(b, size, size, 2, device=theta.device)  # (B, S, S, (x, y)) in [-1, 1]
    torch.addcmul(t[:, 1] * y + t[:, 2], t[:, 0], x, out=grid[..., 0])
    torch.addcmul(t[:, 4] * y + t[:, 5], t[:, 3], x, out=grid[..., 1])
    return grid


@dataclass
class Draws:
    """One batch's random choices, made on the CPU from one generator, so they do not depend on the device.

    affine, flip_x and turns steer Python code and stay on the host; todo, theta, jitter and symmetry are
    what the device computes with (moved there by to_device, or by BatchLoader once per epoch).
    """

    affine: torch.Tensor  # bool (B,): resampled through the rotation/zoom grid
    flip_x: torch.Tensor  # bool (B,): mirrored left-right
    turns: torch.Tensor  # int64 (B,): quarter turns, 0-3
    todo: torch.Tensor  # int64 (N,): the indices of the resampled samples
    theta: torch.Tensor  # float32 (N, 2, 3): their affine_grid matrices
    jitter: torch.Tensor  # float32 (B, 3): brightness, contrast, saturation draws in [-1, 1]
    symmetry: torch.Tensor  # int64 (B,): flip + 2 x turns of the samples not resampled (0: left as they are)

    def device_parts(self) -> list[torch.Tensor]:
        return [self.todo, self.theta, self.jitter, self.symmetry]

    def with_device_parts(self, parts: list[torch.Tensor]) -> Draws:
        todo, theta, jitter, symmetry = parts
        return Draws(self.affine, self.flip_x, self.turns, todo, theta, jitter, symmetry)


def draw_augmentation(b: int, generator: torch.Generator, cfg: AugmentConfig) -> Draws:
    """Every random choice for a batch of b samples, from `generator` (CPU), all drawn up front."""
    u = torch.rand(b, 9, generator=generator)
    affine = (u[:, 0] < cfg.affine_p) & (cfg.rotate_deg > 0 or cfg.scale != (1.0, 1.0))
    flip_x = cfg.flips & (u[:, 1] < 0.5)
    turns = (u[:, 2] * 4).long() * cfg.flips  # quarter turns, 0-3
    todo = affine.nonzero().flatten()
    # affine_grid maps output to input coordinates: input = R(angle) diag(flip, 1) output / zoom
    angle = (u[todo, 3] * 2 - 1) * math.radians(cfg.rotate_deg) - turns[todo] * (math.pi / 2)
    zoom = cfg.scale[0] + u[todo, 4] * (cfg.scale[1] - cfg.scale[0])
    fx = 1.0 - 2.0 * flip_x[todo].float()
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.zeros(len(todo), 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos * fx, -sin, sin * fx, cos
    symmetry = (flip_x.long() + 2 * turns) * (~affine)  # the resampled ones get theirs inside theta
    return Draws(affine, flip_x, turns, todo, theta, u[:, 5:8] * 2 - 1, symmetry)


def to_device(groups: list[list[torch.Tensor]], device: torch.device) -> list[list[torch.Tensor]]:
    """The same tensors on `device`, moved with one host-to-device copy.

    They are flattened into one float32 buffer, copied as devices.copy_to decides (pinned and
    asynchronous to CUDA only), and cut back into their shapes and dtypes; integers must stay below
    2^24, which float32 holds exactly. A copy per tensor and step would each wait for the device.
    """
    flat = [t for group in groups for t in group]
    hw = devices.hardware(device)
    if hw.is_cpu or not flat:
        return groups
    buffer = devices.copy_to(torch.cat([t.reshape(-1).float() for t in flat]), hw)
    parts = iter(buffer.split([t.numel() for t in flat]))
    return [[next(parts).view(t.shape).to(t.dtype) for t in group] for group in groups]


def symmetry_index(flip_x: torch.Tensor, turns: torch.Tensor, size: int) -> torch.Tensor:
    """(B, S*S) source pixel of each output pixel for a left-right flip then `turns` quarter turns of a
    square (torch.rot90 over (H, W)): one gather then applies each sample's own symmetry, in one op for
    the whole batch instead of a flip and a rot90 per sample."""
    row = torch.arange(size, device=turns.device).view(1, size, 1).expand(len(turns), size, size)  # output (i, j)
    col = torch.arange(size, device=turns.device).view(1, 1, size).expand(len(turns), size, size)
    k = turns.view(-1, 1, 1) % 4
    last = size - 1
    # rot90 by k: out[i, j] = in[src_i, src_j]
    src_i = torch.where(k == 0, row, torch.where(k == 1, col, torch.where(k == 2, last - row, last - col)))
    src_j = torch.where(k == 0, col, torch.where(k == 1, last - row, torch.where(k == 2, last - col, row)))
    src_j = torch.where(flip_x.view(-1, 1, 1), last - src_j, src_j)  # the flip comes first, on the input
    return (src_i * size + src_j).reshape(len(turns), size * size)


@functools.lru_cache(maxsize=None)
def _luma(device: torch.device) -> torch.Tensor:
    """Rec. 601 luma weights per 0-255 step, (1, 3, 1, 1), copied to each device once."""
    return (torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1) / 255.0).to(device)


def apply_augmentation(images: torch.Tensor, masks: torch.Tensor, draws: Draws, cfg: AugmentConfig,
                       mean=None, std=None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (B, S, S, 3) and masks (B, S, S) -> float images (B, 3, S, S) in [0, 1] (or normalised
    with mean/std when given), masks (B, 1, S, S) in {0, 1}, with the random choices of draw_augmentation;
    draws.todo, theta, jitter and symmetry already on the images' device (to_device).

    Image and mask get the same geometry: one affine_grid per batch combines the flip, the 90-degree
    turn, the rotation and the zoom (bilinear for images; nearest for masks, so they stay exactly
    binary). mean/std are sequences or float32 tensors on the device (dataset.standardize).
    """
    b, s = images.shape[0], images.shape[1]
    if cfg.flips and not draws.affine.all():
        # samples without a resampling step get their flip and turn as exact uint8 copies: one gather
        index = symmetry_index(draws.symmetry % 2 == 1, draws.symmetry // 2, s)  # (B, S*S), on the device
        images = images.reshape(b, s * s, -1).gather(1, index[:, :, None].expand(-1, -1, images.shape[-1]))
        images, masks = images.view(b, s, s, -1), masks.reshape(b, s * s).gather(1, index).view(b, s, s)
    x = images.permute(0, 3, 1, 2).contiguous().float()  # (B, 3, S, S), 0-255
    m = masks[:, None].float()  # (B, 1, S, S)

    n = len(draws.todo)
    if n:
        grid = _affine_grid(draws.theta, s)
        # reflection padding: no black corners, and the mask is reflected with the image
        warp = lambda t, mode: F.grid_sample(t, grid, mode=mode, padding_mode="reflection",  # noqa: E731
                                             align_corners=False)
        if n == b:
            x, m = warp(x, "bilinear"), warp(m, "nearest")
        else:
            idx = draws.todo
            x[idx], m[idx] = warp(x[idx], "bilinear"), warp(m[idx], "nearest")

    # colour jitter in closed form: brightness b, contrast c around the image's mean luminance, then
    # saturation s around each pixel's luminance g gives  out = s c b x + (1 - s) c b g + (1 - c) b mean(g)
    j = draws.jitter
    bright = 1 + cfg.brightness * j[:, 0].view(b, 1, 1, 1)
    contrast = 1 + cfg.contrast * j[:, 1].view(b, 1, 1, 1)
    sat = 1 + cfg.saturation * j[:, 2].view(b, 1, 1, 1)
    gray = (x * _luma(x.device)).sum(1, keepdim=True)  # (B, 1, S, S) luminance in [0, 1]
    offset = gray * ((1 - sat) * contrast * bright) + (1 - contrast) * bright * gray.mean((2, 3), keepdim=True)
    x = x.mul_(sat * contrast * bright / 255.0).add_(offset).clamp_(0.0, 1.0)
    if mean is not None:
        x = dataset.standardize(x, mean, std)
    return x, m


class BatchLoader:
    """Batches straight from the uint8 cache, with no DataLoader workers.

    The cache is held as one tensor (on the GPU when the device is CUDA and it fits in 40% of the
    free memory, else in host memory with pinned staging buffers); a batch is an index_select, a
    copy to the device (host cache only) and batched augmentation there. Each epoch's random draws
    and sample order reach the device in one copy, so no step waits on a small host-to-device copy.
    """

    def __init__(self, split: dataset.CachedSplit, batch_size: int, mean, std, *, device, train: bool, seed: int,
                 rank: int = 0, world_size: int = 1, augment: AugmentConfig | None = None,
                 keep_on_device: str | bool = "auto"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.device = devices.canonical(device)  # "cuda" means the current GPU, and tensors there report cuda:N
        self.hw = devices.hardware(self.device)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world_size = rank, world_size
        self.augment = (augment or AugmentConfig()) if train else None
        self.mean, self.std = tuple(mean), tuple(std)
        stats = [torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in (self.mean, self.std)]
        self.mean_t, self.std_t = to_device([stats], self.device)[0]  # (1, 3, 1, 1) on the device, once
        self.ids = list(split.ids)
        self.n = len(split)
        if self.n >= 2**24:
            raise ValueError(f"{self.n} samples: to_device moves sample indices as float32, exact below 2^24")
        self.images, self.masks, self.on_device = self._place(split, keep_on_device)
        self.epoch, self.start_batch = 0, 0
        if train:
            self.per_rank = math.ceil(self.n / world_size)  # padded by wrapping, like DistributedSampler
            # drop_last, except that a tiny split still yields its one partial batch
            self.num_batches = self.per_rank // batch_size or int(self.per_rank > 0)
        else:
            self.per_rank = len(range(rank, self.n, world_size))
            self.num_batches = math.ceil(self.per_rank / batch_size)

    def _place(self, split: dataset.CachedSplit, keep_on_device) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(images, masks, whether they are on the device) of the cache."""
        images, masks = (torch.from_numpy(a if a.flags.writeable else a.copy()) for a in (split.images, split.masks))
        if self.hw.is_cpu:
            return images, masks, True
        fits = keep_on_device is True
        if keep_on_device == "auto":
            free = self.hw.free_memory()  # None: the host's memory (MPS), where the cache costs no second copy
            fits = free is None or images.nbytes + masks.nbytes < 0.4 * free
        if fits:
            return images.to(self.device), masks.to(self.device), True
        return images, masks, False

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Fix the epoch (shuffle and augmentation follow from seed, epoch, rank); start_batch resumes mid-epoch."""
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def __len__(self) -> int:
        return self.num_batches

    def indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, in batch order."""
        if not self.train or self.n == 0:
            return torch.arange(self.rank, self.n, self.world_size)
        g = torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch))  # same order on every rank
        perm = torch.randperm(self.n, generator=g)
        total = self.per_rank * self.world_size
        perm = perm.repeat(math.ceil(total / self.n))[:total]
        mine = perm[self.rank::self.world_size]
        return mine[: min(len(mine), self.num_batches * self.batch_size)]

    def _fetch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images and masks of the samples idx (on the cache's device) as a batch on the device."""
        if self.on_device:
            return self.images[idx], self.masks[idx]
        pin = self.hw.pin_memory
        img = torch.empty((len(idx), *self.images.shape[1:]), dtype=torch.uint8, pin_memory=pin)
        msk = torch.empty((len(idx), *self.masks.shape[1:]), dtype=torch.uint8, pin_memory=pin)
        torch.index_select(self.images, 0, idx, out=img)
        torch.index_select(self.masks, 0, idx, out=msk)
        # asynchronous only from these pinned buffers to CUDA (Hardware.non_blocking)
        return img.to(self.device, non_blocking=self.hw.non_blocking), msk.to(self.device, non_blocking=self.hw.non_blocking)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.indices()
        start, self.start_batch = self.start_batch, 0
        steps = range(start, self.num_batches)
        picks = [order[b * self.batch_size:(b + 1) * self.batch_size] for b in steps]
        draws = [draw_augmentation(len(pick), torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch,
                                                                                     self.rank, b)), self.augment)
                 for b, pick in zip(steps, picks)] if self.train else [None] * len(picks)
        # what the device needs for the whole epoch (the cache's indices, the augmentation's draws), in one copy
        needs = [([pick] if self.on_device else []) + (draw.device_parts() if draw is not None else [])
                 for pick, draw in zip(picks, draws)]
        for pick, draw, moved in zip(picks, draws, to_device(needs, self.device)):
            if self.on_device:
                pick, moved = moved[0], moved[1:]
            images, masks = self._fetch(pick)
            if draw is not None:
                yield apply_augmentation(images, masks, draw.with_device_parts(moved), self.augment,
                                         self.mean_t, self.std_t)
            else:
                yield dataset.normalize(images, self.mean_t, self.std_t), masks[:, None].float()


def make_loader(split: dataset.CachedSplit, batch_size: int, mean, std, *, device, train: bool, seed: int,
                rank: int = 0, world_size: int = 1, augment: AugmentConfig | None = None,
                keep_on_device: str | bool = "auto") -> BatchLoader:
    """Batches of (images float32 (B, 3, S, S) normalised, masks float32 (B, 1, S, S) {0, 1}) on `device`.

    train=True: shuffled, augmented, drop_last, sharded over ranks like DistributedSampler.
    train=False: fixed order, rank r takes samples r::world_size (no padding, no duplicates).
    """
    return BatchLoader(split, batch_size, mean, std, device=device, train=train, seed=seed, rank=rank,
                       world_size=world_size, augment=augment, keep_on_device=keep_on_device)


# ---------------------------------------------------------------------------------------------
# Command line


def bench(config: dataset.DataConfig, batch_size: int = 16, images: int = 128, rounds: int = 3, threads: int = 1,
          log: Callable = print) -> dict:
    """Images/s of (A) decoding and resizing the files as every epoch would, and (B) the cached,
    augmented batches on the CPU; measured alternately on the same samples so that noise from
    other processes hits both. One thread each by default: a per-core comparison."""
    torch.set_num_threads(threads)
    splits = dataset.prepare_splits(config, log=log)
    pairs = dataset.find_pairs(config.data_dir, skip_bad=config.skip_bad, log=log)
    by_id = {s.id: s for samples in pairs.values() for s in samples}
    samples = [by_id[i] for i in splits.train.ids[:images]]
    size = config.image_size
    loaders = {train: make_loader(splits.train, batch_size, splits.mean, splits.std, device="cpu", train=train,
                                  seed=0) for train in (True, False)}
    figures = {"decode_draft": [], "decode_full": [], "cached": [], "cached_noaug": []}

    def decode(draft: bool):
        for s in samples:
            image = dataset.load_image(s.image, size if draft else None)
            dataset.resize_image(image, size), dataset.resize_mask(dataset.load_mask(s.mask), size)
        return len(samples)

    def cached(train: bool):
        done, epoch, loader = 0, 0, loaders[train]
        while done < len(samples):
            loader.set_epoch(epoch)
            for x, _ in loader:
                done += len(x)
                if done >= len(samples):
                    break
            epoch += 1
        return done

    runs = {"decode_draft": lambda: decode(True), "cached": lambda: cached(True),
            "decode_full": lambda: decode(False), "cached_noaug": lambda: cached(False)}
    for r in range(rounds):
        for key, fn in runs.items():
            start = time.perf_counter()
            count = fn()
            figures[key].append(count / (time.perf_counter() - start))
        log(f"bench round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in figures.items()) + " img/s")
    med = {k: statistics.median(v) for k, v in figures.items()}
    log(f"bench median ({size}px, batch {batch_size}, torch threads {threads}): decode+resize "
        f"{med['decode_draft']:.0f} img/s with JPEG draft, {med['decode_full']:.0f} without; cached+augmented "
        f"{med['cached']:.0f} img/s ({med['cached'] / med['decode_draft']:.1f}x / "
        f"{med['cached'] / med['decode_full']:.1f}x); cached without augmentation {med['cached_noaug']:.0f} img/s "
        f"({med['cached_noaug'] / med['decode_draft']:.0f}x)")
    return med


def main(argv=None) -> None:
    parser = utils.build_parser(dataset.DataConfig, __doc__.split("\n\n")[0])
    bench_flags = parser.add_argument_group("benchmark")
    bench_flags.add_argument("--batch-size", type=int, default=16, help="batch size of the cached loader")
    bench_flags.add_argument("--images", type=int, default=128, help="images per measurement")
    bench_flags.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds")
    bench_flags.add_argument("--threads", type=int, default=1, help="torch CPU threads for the cached pipeline")
    args = parser.parse_args(argv)
    try:
        bench(utils.subconfig(dataset.DataConfig, args), args.batch_size, args.images, args.rounds, args.threads)
    except dataset.DataError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
