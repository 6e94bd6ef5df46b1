"""Segment dermoscopy images with a trained Improved UNet, at their original size, and score them.

    python predict.py                                  # the last run's best.pt on that run's held-out test split
    python predict.py --input photos/ --output masks/  # a file, a folder or a glob of any images Pillow reads
    python predict.py --input imgs/ --masks truth/     # also metrics.csv, metrics.json and cases.png
    python predict.py --checkpoint runs/cv-*/best.pt   # several models (folds, seeds): their probabilities averaged
    python predict.py --export-onnx model.onnx         # write an ONNX model (dynamic batch and size) and exit
    python predict.py --input big/ --parts 4 --part 2  # the second quarter of a folder (one task of an array job)

A mask is written whole (to a hidden file, then renamed), and the output folder records the checkpoint
and settings that wrote it (predictions.json). Run the same command again, after an interruption or a
preempted job, and the images whose files are already there are skipped; the parts of a split folder
fill one output folder, and a last run without --parts scores all of it. An output folder written by
another checkpoint or with other settings is refused, never mixed.

Exit status: 0 when every file was segmented (and scored), 1 when some files failed (each is named),
2 when nothing could run (a missing or foreign checkpoint, no inputs, an unusable flag).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import re
import signal
import sys
import threading
import time
import warnings
from collections import defaultdict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import checkpoint
import dataset
import devices
import losses
import outputs
import postprocess
import utils

METRICS = losses.METRIC_NAMES  # accuracy, sensitivity, specificity, jaccard, threshold_jaccard, dice: the scorer's names
ISIC_ID = re.compile(r"ISIC_\d{7}")
MASK_SUFFIX = re.compile(r"_segmentation$", re.IGNORECASE)  # ISIC 2016/2017 wrote _Segmentation


@dataclass
class PredictConfig:
    """Every setting of predict.py; each field is a --kebab-case flag."""

    # --- model ---
    checkpoint: list[str] = dataclasses.field(default_factory=list)  # checkpoint(s) of train.py; several are averaged; default: best.pt of the newest run in --runs-dir, else the shipped weights (weights/)
    runs_dir: str = "runs"  # folder of train.py's run folders, searched when --checkpoint is not given
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps
    batch_size: int = 8  # images per forward pass
    workers: int | None = None  # DataLoader processes that decode and resize, and threads that write files, beside the network; default: 4 on a GPU, 0 on CPU
    # --- data ---
    input: str | None = None  # image file, folder or glob; default: the --split of the checkpoint's run
    split: Literal["test", "val"] = "test"  # without --input: the run's held-out "test" split, or its "val" split (cross-validation)
    masks: str | None = None  # ground truth to score against: a folder of <id>_segmentation.png, or an ISIC root
    output: str | None = None  # output folder; default: predictions/ in the checkpoint's run folder, else predict_out (with --split val: predictions-val/, predict_out-val)
    # --- inference ---
    threshold: float = 0.5  # a pixel is lesion where the predicted probability is above this
    tta: bool = True  # test-time augmentation: the mean over the image and its horizontal, vertical and double flip (chosen on validation in the recipe study); --no-tta does a quarter of the forward passes (3-4x faster end to end)
    postprocess: bool = False  # keep only the largest region, holes filled (at network resolution; lesions are one region)
    amp: devices.Amp = "auto"  # autocast dtype of the forward pass; auto: bf16 on CUDA from compute capability 8.0 and on CPUs with AVX512_BF16 or AMX, fp16 on older GPUs, off (float32) elsewhere
    # --- extra outputs ---
    overlay: bool = False  # also write overlays/<id>_overlay.jpg: predicted contour in red, ground truth in green
    save_probabilities: bool = False  # also write probabilities/<id>_probability.png: the map that is thresholded, 0-255
    worst: int = 0  # with ground truth, also draw worst.png: the N images of lowest Jaccard, each as image, ground truth and prediction, to see what fails
    export_onnx: str | None = None  # write the model to this ONNX file (dynamic batch, height and width) and exit
    export_weights: str | None = None  # write the model alone, in float16, to this file (as weights/ ships it) and exit
    # --- batch jobs ---
    parts: int = 1  # split the inputs (in file-name order) into this many parts of nearly equal size, and segment one: --part
    part: int = 1  # which part to segment, 1 to --parts (slurm/predict.sh takes it from the array task)
    overwrite: bool = False  # segment every image again and replace the output folder's files; default: skip the images whose files a run of the same checkpoint and settings already wrote there


GROUPS = utils.field_groups(PredictConfig)  # from the "# --- name ---" lines above
METAVARS = {"checkpoint": "FILE", "runs_dir": "DIR", "input": "PATH", "masks": "DIR", "output": "DIR",
            "export_onnx": "FILE", "export_weights": "FILE", "device": "NAME"}


class PredictError(RuntimeError):
    """Nothing can be predicted as asked; the message says why and what to do."""


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """argparse generated from PredictConfig: one --kebab-case flag per field, grouped."""
    return utils.build_parser(PredictConfig, __doc__.split("\n\n")[0], GROUPS, metavars=METAVARS,
                              epilog="\n\n".join(__doc__.split("\n\n")[1:]), prog="predict.py")


def check_config(config: PredictConfig) -> list[str]:
    """Settings that cannot work, as messages (empty when the config is usable)."""
    problems = []
    if config.batch_size < 1:
        problems.append(f"--batch-size must be at least 1, got {config.batch_size}")
    if config.workers is not None and config.workers < 0:
        problems.append(f"--workers must not be negative, got {config.workers}")
    if not 0 < config.threshold < 1:
        problems.append(f"--threshold must be between 0 and 1 (exclusive), got {config.threshold}")
    if config.parts < 1:
        problems.append(f"--parts must be at least 1, got {config.parts}")
    elif not 1 <= config.part <= config.parts:
        problems.append(f"--part must be between 1 and --parts ({config.parts}), got {config.part}")
    if config.worst < 0:
        problems.append(f"--worst must be 0 (off) or a number of images, got {config.worst}")
    return problems


def main(argv=None) -> PredictResult:
    """Run predict.py with command-line arguments; exits with status 1 or 2 on failure (see the docstring)."""
    parser = build_parser()
    config = PredictConfig(**vars(parser.parse_args(argv)))
    problems = check_config(config)
    if problems:
        parser.error("; ".join(problems))
    try:
        with stop_on_signals():
            result = run(config)
    except (PredictError, checkpoint.CheckpointError, dataset.DataError) as err:
        print(f"predict.py: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
        if not devices.out_of_memory(err):
            raise
        print(f"predict.py: error: out of device memory even at one image a forward pass "
              f"({str(err).splitlines()[0][:160]}); use a smaller checkpoint's --image-size or another device (masks "
              f"written so far are kept and skipped when the same command runs again)", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except Stopped as stop:
        # the masks in flight were finished by Segmenter's clean-up; a half mask never has its final name
        print(f"predict.py: stopped by {stop.name}; every mask written so far is whole and is skipped when the same "
              f"command runs again", flush=True)
        raise SystemExit(128 + stop.signum) from None
    if result.failures:
        print(f"predict.py: {len(result.failures)} of {result.total} files failed: "
              + ", ".join(name for name, _ in result.failures), file=sys.stderr, flush=True)
        raise SystemExit(1)
    return result


class Stopped(Exception):
    """A signal (SLURM's warning USR1, preemption's TERM) asked the run to stop."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum, self.name = signum, signal.Signals(signum).name


@contextmanager
def stop_on_signals():
    """USR1 and TERM raise Stopped in the main thread, so the writes in flight finish before the exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Stopped(signum)

    previous = {sig: signal.signal(sig, stop) for sig in utils.stop_signals()}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------- model


@dataclass
class LoadedModel:
    model: torch.nn.Module  # in eval mode, on its device (ImprovedUNet, or a baseline)
    image_size: int  # side of the square the network sees (from the checkpoint)
    mean: tuple[float, float, float]  # normalisation statistics of the training split, [0, 1] units
    std: tuple[float, float, float]
    train_config: dict  # the run's settings (data_dir locates its test split)
    path: Path
    splits: dict[str, list[str]] | None = None  # the run's train/val/test ids, as stored in the checkpoint
    num_classes: int = 1  # output channels
    mixed_test_splits: bool = False  # an ensemble whose runs held out different test splits
    shades_of_gray: bool = False  # trained on colour-constant images (train.py --shades-of-gray): so is its input


# The trained weights that ship with the repository (weights/README.md: how they were made, the data's licence).
SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "weights" / "improved-unet-isic2018.pt"


def latest_checkpoint(runs_dir: str | Path) -> Path | None:
    """best.pt of the most recently updated run under runs_dir, or None."""
    candidates = [p for p in Path(runs_dir).rglob("best.pt") if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def default_checkpoint(runs_dir: str | Path) -> tuple[Path, str]:
    """(checkpoint, the line that says which) without --checkpoint: the newest run's best.pt, else the shipped
    weights, so that segmenting one's own images needs no training first."""
    latest = latest_checkpoint(runs_dir)
    if latest is not None:
        return latest, f"No --checkpoint: using {latest} (the most recent run under {runs_dir}/)"
    if SHIPPED_WEIGHTS.is_file():
        return SHIPPED_WEIGHTS, (f"No --checkpoint and no run under {runs_dir}/: using the shipped weights "
                                 f"{SHIPPED_WEIGHTS.relative_to(SHIPPED_WEIGHTS.parent.parent)} (see weights/README.md)")
    raise PredictError(f"no --checkpoint given, no best.pt under {runs_dir}/ and no {SHIPPED_WEIGHTS}; train a model "
                       f"first (python train.py) or pass --checkpoint FILE")


def load_model(path: str | Path, device: torch.device, amp: torch.dtype | None = None) -> LoadedModel:
    """Rebuild the network from a checkpoint: architecture, weights, normalisation and image size."""
    path = Path(path)
    state = checkpoint.load_checkpoint(path, map_location="cpu")  # CheckpointError: missing, truncated, foreign
    model, image_size, mean, std = checkpoint.model_from_checkpoint(state, path)
    # the inference memory format that devices.py chooses for this device, norm, precision and input size
    norm = state["model_config"].get("norm", "instance")
    channels_last = devices.hardware(device).channels_last(norm, training=False, dtype=amp, size=image_size)
    model.eval().to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    splits = state.get("splits")
    train_config = dict(state.get("train_config") or {})
    return LoadedModel(model, image_size, mean, std, train_config, path,
                       None if splits is None else {k: list(v) for k, v in splits.items()},
                       int(state["model_config"].get("num_classes", 1)),
                       shades_of_gray=bool(train_config.get("shades_of_gray", False)))


class Ensemble(torch.nn.Module):
    """Several trained networks as one: logits of their mean lesion probability (one output channel).

    Each was trained with its own split's normalisation statistics, so the input, normalised with the
    first model's, is renormalised for every other one: the ensemble sees exactly the preprocessing
    each of its members was trained with.
    """

    def __init__(self, members: list[LoadedModel]):
        super().__init__()
        self.models = torch.nn.ModuleList(m.model for m in members)
        stats = [(torch.tensor(m.mean).view(1, 3, 1, 1), torch.tensor(m.std).view(1, 3, 1, 1)) for m in members]
        self.register_buffer("mean", torch.stack([m for m, _ in stats]))  # (M, 1, 3, 1, 1)
        self.register_buffer("std", torch.stack([s for _, s in stats]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raw = x.float() * self.std[0] + self.mean[0]  # (B, 3, H, W) in [0, 1]
        total = 0.0
        for model, mean, std in zip(self.models, self.mean, self.std):
            total = total + model((raw - mean) / std).float().sigmoid()  # (B, 1, H, W)
        return torch.logit(total / len(self.models), eps=1e-6)


def load_ensemble(paths: list[Path], device: torch.device, amp: torch.dtype | None = None) -> LoadedModel:
    """One checkpoint as it is; several as an Ensemble, refused unless they see the same input size and
    preprocessing (Shades of Gray or not)."""
    members = [load_model(path, device, amp) for path in paths]
    if len(members) == 1:
        return members[0]
    first = members[0]
    for other in members[1:]:
        if other.image_size != first.image_size:
            raise PredictError(f"{other.path} was trained at {other.image_size}px and {first.path} at "
                               f"{first.image_size}px; an ensemble needs one input size: pass checkpoints of one size")
        if other.shades_of_gray != first.shades_of_gray:
            raise PredictError(f"{first.path} and {other.path} differ in --shades-of-gray ({first.shades_of_gray} and "
                               f"{other.shades_of_gray}); an ensemble needs one preprocessing: pass checkpoints "
                               f"trained alike")
        if other.splits is None or first.splits is None or sorted(other.splits["test"]) != sorted(first.splits["test"]):
            first = dataclasses.replace(first, mixed_test_splits=True)
    for member in members:
        if member.num_classes != 1:
            raise PredictError(f"{member.path} predicts {member.num_classes} classes; an ensemble averages one "
                               f"lesion probability: pass checkpoints with one output channel")
    model = Ensemble(members).eval().to(device)
    return dataclasses.replace(first, model=model)


@torch.no_grad()
def predict_probabilities(model: torch.nn.Module, images: torch.Tensor, tta: bool = False,
                          amp: torch.dtype | None = None, hw: devices.Hardware | None = None) -> torch.Tensor:
    """Lesion probabilities in [0, 1], float32 (B, S, S), for normalised images float32 (B, 3, S, S).

    With tta, the mean over the image and its horizontal, vertical and double flip (each mapped back).
    The network runs under autocast to `amp` when given (devices.amp_dtype chooses it); the sigmoid and the
    mean run in float32.
    """
    autocast = (hw or devices.hardware(images.device)).autocast(amp)()
    flips = [(), (-1,), (-2,), (-2, -1)] if tta else [()]
    total = None
    for dims in flips:
        with autocast:
            logits = model(images.flip(dims) if dims else images)  # (B, K, S, S)
        logits = logits.float()
        # one output channel: sigmoid; several (background first): softmax, lesion = channel 1
        probs = logits[:, 0].sigmoid() if logits.shape[1] == 1 else logits.softmax(1)[:, 1]  # (B, S, S)
        probs = probs.flip(dims) if dims else probs
        total = probs if total is None else total + probs
    return total / len(flips)


def resize_probabilities(probs: torch.Tensor, size: tuple[int, int], antialias_here: bool = True) -> torch.Tensor:
    """A probability map (S, S) resized to the original (H, W), bilinear (antialiased when shrinking).

    Where the device has no antialiased resize (antialias_here False: Hardware.antialias_resize, MPS
    before PyTorch 2.7) a shrink runs on the CPU."""
    shrink = size[0] < probs.shape[0] or size[1] < probs.shape[1]  # antialiasing costs 2x and changes no upsampling
    if shrink and not antialias_here:
        probs = probs.cpu()
    return F.interpolate(probs[None, None], size=size, mode="bilinear", align_corners=False, antialias=shrink)[0, 0]


# ----------------------------------------------------------------------------- inputs


@dataclass
class Item:
    id: str  # output name: the ISIC id in the file name, else the file's stem
    image: Path
    mask: Path | None = None  # ground truth, when known


def image_suffixes() -> set[str]:
    """File extensions of every format Pillow can open."""
    Image.init()
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def image_id(path: Path) -> str:
    """The ISIC id in a file name (ISIC_0000123_segmentation.png -> ISIC_0000123), else its stem."""
    stem = MASK_SUFFIX.sub("", path.stem)
    match = ISIC_ID.search(stem)
    return match.group(0) if match else stem


def find_inputs(spec: str) -> list[Path]:
    """Image files named by --input: one file (any extension), a folder's images, or a glob's images."""
    path = Path(spec)
    suffixes = image_suffixes()

    def images(paths):  # ground-truth masks next to the images are not inputs
        return sorted(p for p in paths if p.is_file() and p.suffix.lower() in suffixes
                      and not MASK_SUFFIX.search(p.stem))

    if path.is_file():
        return [path]
    if path.is_dir():
        found = images(path.iterdir())
        if not found:
            inside = [p.name for p in sorted(path.iterdir()) if p.is_dir() and images(p.iterdir())]
            hint = f"subfolders with images: {', '.join(inside)}" if inside else "nor in its subfolders"
            raise PredictError(f"--input {spec}: no image files in this folder ({hint}); pass the folder that holds "
                               f"the images, e.g. --input {path / (inside[0] if inside else 'images')}")
        return found
    if any(c in spec for c in "*?["):
        found = images(Path(p) for p in glob.glob(spec, recursive=True))
        if not found:
            raise PredictError(f"--input {spec}: the pattern matches no image files")
        return found
    raise PredictError(f"--input {spec}: no such file or folder")


def find_masks(spec: str) -> dict[str, Path]:
    """Ground-truth masks by image id, from a folder of <id>_segmentation.png files or an ISIC root."""
    path = Path(spec)
    if not path.is_dir():
        raise PredictError(f"--masks {spec}: no such folder; pass the folder of <id>_segmentation.png files "
                           f"or the ISIC root that holds the ground truth")
    suffixes = image_suffixes()
    masks = {image_id(p): p for p in sorted(path.iterdir()) if p.is_file() and p.suffix.lower() in suffixes}
    if not masks:
        pairs = dataset.find_pairs(path, log=lambda *a: None)  # an ISIC root: the ground truth of every split
        masks = {s.id: Path(s.mask) for split in pairs.values() for s in split if s.mask is not None}
    if not masks:
        raise PredictError(f"--masks {spec}: no ground-truth masks found; expected <id>_segmentation.png files "
                           f"or an ISIC root with ground-truth folders")
    return masks


def stored_split(loaded: LoadedModel, name: str = "test") -> tuple[list[Item], str]:
    """A split of the checkpoint's run (the held-out test split by default), with its ground truth, and
    the data folder it lives in.

    The run stored its split's ids in the checkpoint: those images are taken, and a missing one is an
    error, so a folder that changed since training can never pass training images off as test images.
    """
    config = loaded.train_config
    data_dir = config.get("data_dir")
    if loaded.mixed_test_splits:
        raise PredictError("no --input given and these checkpoints' runs held out different test splits, so no "
                           "image is unseen by all of them; pass --input and --masks")
    if not data_dir or not Path(data_dir).is_dir():
        raise PredictError(f"no --input given and the data {loaded.path} was trained on ({data_dir}) is not here; "
                           f"pass --input FILE, FOLDER or GLOB")
    defaults = dataset.DataConfig()
    pairs = dataset.find_pairs(data_dir, skip_bad=config.get("skip_bad", defaults.skip_bad), log=lambda *a: None)
    if loaded.splits is not None:
        ids = loaded.splits[name]
        found = {s.id: s for samples in pairs.values() for s in samples}
        missing = [i for i in ids if i not in found or found[i].mask is None]
        if missing:
            raise PredictError(f"{len(missing)} of the {len(ids)} {name} images of {loaded.path} are no longer in "
                               f"{data_dir} with their masks (e.g. {missing[0]}); restore them, or pass --input "
                               f"and --masks")
        chosen = [found[i] for i in ids]
    else:  # a checkpoint from before runs stored their split: the same seeded hold-out, recomputed
        assigned, _ = dataset.split_samples(pairs, config.get("val_fraction", defaults.val_fraction),
                                            config.get("test_fraction", defaults.test_fraction),
                                            config.get("split_seed", defaults.split_seed))
        chosen = assigned[name]
    if not chosen:
        raise PredictError(f"no --input given and the run of {loaded.path} held out no {name} images in "
                           f"{data_dir}; pass --input FILE, FOLDER or GLOB")
    return [Item(s.id, Path(s.image), None if s.mask is None else Path(s.mask)) for s in chosen], data_dir


def gather_items(config: PredictConfig, loaded: LoadedModel) -> list[Item]:
    """What to segment (and the ground truth to score it against), from --input and --masks."""
    if config.input is None:
        items, data_dir = stored_split(loaded, config.split)
        print(f"No --input: segmenting the {len(items)} {config.split} images held out from {data_dir} by that run")
    else:
        items = [Item(image_id(p), p) for p in find_inputs(config.input)]
    if config.masks is not None:
        masks = find_masks(config.masks)
        items = [dataclasses.replace(item, mask=masks.get(item.id)) for item in items]
        missing = [item.image.name for item in items if item.mask is None]
        if missing:
            print(f"warning: {len(missing)} of {len(items)} images have no ground truth in {config.masks} and are "
                  f"not scored: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}", file=sys.stderr)
    seen: dict[str, Path] = {}
    for item in items:
        if item.id in seen:
            raise PredictError(f"{seen[item.id]} and {item.image} would both be written as "
                               f"{item.id}_segmentation.png; rename one or predict them separately")
        seen[item.id] = item.image
    return items


def default_output(checkpoints: list[Path], runs_dir: str, split: str = "test") -> Path:
    """predictions/ in the run folder of a single checkpoint that lies in one, else predict_out (an ensemble, or a
    checkpoint elsewhere). The record does not hold the split, so the validation split's masks (--split val without
    --input) go to predictions-val/ and predict_out-val, beside the test split's."""
    suffix = "-val" if split == "val" else ""
    if len(checkpoints) == 1 and checkpoints[0].resolve().is_relative_to(Path(runs_dir).resolve()):
        return checkpoints[0].parent / f"predictions{suffix}"
    return Path(f"predict_out{suffix}")


# ----------------------------------------------------------------------------- the pipeline


class StageTimer:
    """Seconds spent per stage, summed over threads (so with --workers they can exceed wall time)."""

    def __init__(self, hw: devices.Hardware):
        self.seconds: dict[str, float] = defaultdict(float)
        self.hw = hw  # GPUs run asynchronously: wait so time lands on the right stage
        self.lock = threading.Lock()

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        yield
        if stage in ("forward", "resize back"):
            self.hw.synchronize()
        self.add(stage, time.perf_counter() - start)

    def add(self, stage: str, seconds: float) -> None:
        with self.lock:
            self.seconds[stage] += seconds

    def summary(self) -> str:
        return ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in self.seconds.items())


@dataclass
class Loaded:
    item: Item
    size: tuple[int, int] | None = None  # original (H, W)
    small: np.ndarray | None = None  # uint8 (S, S, 3): what the network sees
    image: np.ndarray | None = None  # uint8 (H, W, 3), kept only for overlays
    truth: np.ndarray | None = None  # uint8 (H, W) {0, 1}
    error: str | None = None  # why the image could not be read
    truth_error: str | None = None  # why its ground truth could not be used
    seconds: float = 0.0  # spent decoding and resizing


def load_item(item: Item, image_size: int, keep_image: bool, shades_of_gray: bool = False) -> Loaded:
    """Decode and resize one image (and decode its ground truth); errors are recorded, not raised."""
    start = time.perf_counter()
    out = Loaded(item)
    try:
        # the training cache's own chain (reduced-scale JPEG decode, then the same resize)
        out.small, out.size = dataset.network_image(item.image, image_size, shades_of_gray)
        # overlays need full resolution: a second, full decode, since resizing that one instead of the
        # draft would give the network slightly different input than training did
        out.image = dataset.load_image(item.image) if keep_image else None
        if item.mask is not None:
            try:
                out.truth = dataset.load_mask(item.mask)
                if out.truth.shape != out.size:
                    out.truth_error = (f"ground truth {item.mask} is {out.truth.shape[1]}x{out.truth.shape[0]} but "
                                       f"the image is {out.size[1]}x{out.size[0]}; pair each image with its own mask")
                    out.truth = None
            except (dataset.DataError, OSError, ValueError) as err:
                out.truth_error = str(err) or type(err).__name__
    except (dataset.DataError, OSError, ValueError) as err:
        out.error = str(err) or type(err).__name__
    out.seconds = time.perf_counter() - start
    return out


class ImageFiles(torch.utils.data.Dataset):
    """The items, each decoded and resized by load_item (in DataLoader workers with --workers)."""

    def __init__(self, items: list[Item], image_size: int, keep_image: bool, shades_of_gray: bool = False):
        self.items, self.image_size, self.keep_image = items, image_size, keep_image
        self.shades_of_gray = shades_of_gray

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Loaded:
        return load_item(self.items[index], self.image_size, self.keep_image, self.shades_of_gray)


class Writer:
    """Writes files on the pool (PNG encoding releases the GIL), a bounded number in flight."""

    def __init__(self, pool: ThreadPoolExecutor | None, timer: StageTimer, max_pending: int = 8):
        self.pool, self.timer, self.max_pending = pool, timer, max_pending
        self.pending: deque[tuple[str, Future]] = deque()
        self.failures: list[tuple[str, str]] = []

    def _write(self, save, path: Path):
        # whole or not at all: a run stopped mid-write leaves a hidden .tmp file, never a half mask under its name
        with self.timer("write"), utils.atomic_write(path) as tmp:
            save(tmp)

    def submit(self, name: str, save, path: Path) -> None:
        if self.pool is None:
            try:
                self._write(save, path)
            except OSError as err:
                self.failures.append((name, f"could not write {path}: {err}"))
            return
        self.pending.append((name, self.pool.submit(self._write, save, path)))
        while len(self.pending) > self.max_pending:
            self._collect()

    def _collect(self) -> None:
        name, future = self.pending.popleft()
        try:
            future.result()
        except OSError as err:
            self.failures.append((name, f"could not write: {err}"))

    def close(self) -> list[tuple[str, str]]:
        while self.pending:
            self._collect()
        return self.failures


def save_png(array: np.ndarray):
    """A saver writing a uint8 (H, W) array as a single-channel 8-bit PNG (fast zlib level: masks compress well)."""
    return lambda path: Image.fromarray(array).save(path, format="PNG", compress_level=1)


def outline(mask: torch.Tensor, width: int) -> torch.Tensor:
    """The edge of a boolean mask (H, W) as a band about `width` pixels wide, for drawing.

    The edge (a 3x3 dilation differing from the 3x3 erosion) is found on every width-th pixel and
    each hit drawn as a width x width block: a 12-megapixel overlay costs milliseconds, not seconds.
    """
    height, full_width = mask.shape
    x = mask[::width, ::width][None, None].float()
    edge = (F.max_pool2d(x, 3, stride=1, padding=1) > -F.max_pool2d(-x, 3, stride=1, padding=1))[0, 0]
    return edge.repeat_interleave(width, 0).repeat_interleave(width, 1)[:height, :full_width]


def overlay_image(image: np.ndarray, prediction: np.ndarray, truth: np.ndarray | None) -> np.ndarray:
    """The image (H, W, 3) with the predicted contour in red over the ground truth's in green."""
    from torchvision.utils import draw_segmentation_masks  # imported here: only --overlay draws

    width = max(1, round(max(image.shape[:2]) / 400))
    bands, colours = [], []
    if truth is not None:
        bands.append(outline(torch.from_numpy(truth.astype(bool)), width))
        colours.append((0, 255, 0))
    bands.append(outline(torch.from_numpy(prediction.astype(bool)), width))
    colours.append((255, 0, 0))
    canvas = torch.from_numpy(image.copy()).permute(2, 0, 1)  # (3, H, W) uint8
    # alpha 1 paints the bands opaque; later masks are drawn over earlier ones
    drawn = draw_segmentation_masks(canvas, torch.stack(bands), alpha=1.0, colors=colours)
    return drawn.permute(1, 2, 0).contiguous().numpy()


@dataclass
class PredictResult:
    output_dir: Path | None
    total: int  # input files
    written: list[Path]  # masks written
    failures: list[tuple[str, str]]  # (file name, reason), one per problem
    metrics: dict[str, float] | None = None  # means over the scored images, keyed as the scorer names them
    per_image: list[dict] = dataclasses.field(default_factory=list)  # image_id and the six metrics per image
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # per stage (summed over threads) and total
    skipped: list[Path] = dataclasses.field(default_factory=list)  # masks an earlier run wrote, kept as they were


class Segmenter:
    """Runs the pipeline over a list of items: decode, resize, forward, resize back, write, score."""

    def __init__(self, loaded: LoadedModel, config: PredictConfig, output_dir: Path, device: torch.device,
                 amp: torch.dtype | None = None):
        self.loaded, self.config, self.output_dir, self.amp = loaded, config, output_dir, amp
        # normalisation statistics on the device once, not copied with every batch
        self.mean, self.std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1).to(device)
                               for v in (loaded.mean, loaded.std))
        # on CPU the network already uses every core: file threads beside it slowed it (2 cores: 2 vs 4 images/s)
        self.hw = devices.hardware(device)
        self.workers = config.workers if config.workers is not None else (0 if self.hw.is_cpu else 4)
        self.timer = StageTimer(self.hw)
        self.device = device
        self.failures: list[tuple[str, str]] = []
        self.written: list[Path] = []
        self.rows: list[dict] = []
        self.averager = losses.MetricAverager()
        self.chunk = config.batch_size  # images a forward pass; halved when the device runs out of memory

    def fail(self, name: str, reason: str) -> None:
        self.failures.append((name, reason))
        tqdm.write(f"skipped {name}: {reason}", file=sys.stderr)

    def __call__(self, items: list[Item]) -> None:
        files = ImageFiles(items, self.loaded.image_size, self.config.overlay, self.loaded.shades_of_gray)
        # collate_fn=list: a batch is the list of Loaded records (sizes differ, failures ride along)
        batches = torch.utils.data.DataLoader(files, batch_size=self.config.batch_size, num_workers=self.workers,
                                              collate_fn=list)
        pool = ThreadPoolExecutor(self.workers) if self.workers else None
        self.writer = Writer(pool, self.timer, max_pending=2 * max(1, self.workers))
        try:
            with tqdm(total=len(items), unit="img", desc="predict", disable=None) as bar:
                for batch in batches:
                    self.timer.add("decode", sum(entry.seconds for entry in batch))
                    self.segment_batch(batch)
                    bar.update(len(batch))
        finally:
            self.failures += self.writer.close()
            if pool is not None:
                pool.shutdown()

    def score_written(self, items: list[Item]) -> None:
        """Score masks that an earlier run wrote (skipped now) against their ground truth, as finish() does."""
        for item in items:
            if item.mask is None:
                continue
            path = outputs.mask_path(item, self.output_dir)
            try:
                prediction, truth = dataset.load_mask(path) > 0, dataset.load_mask(item.mask)
            except (dataset.DataError, OSError, ValueError) as err:
                self.fail(item.image.name, str(err) or type(err).__name__)
                continue
            if prediction.shape != truth.shape:
                self.fail(item.image.name, f"ground truth {item.mask} is {truth.shape[1]}x{truth.shape[0]} but "
                                           f"{path} is {prediction.shape[1]}x{prediction.shape[0]}")
                continue
            self.score(item, prediction, truth)

    def score(self, item: Item, prediction: np.ndarray, truth: np.ndarray) -> None:
        """One image's six metrics, at the original resolution as the challenge scores, on the host."""
        with self.timer("score"):
            scores = losses.segmentation_metrics(torch.from_numpy(prediction)[None], torch.from_numpy(truth > 0)[None])
        self.averager.update(scores)
        self.rows.append({"image_id": item.id, **{key: scores[key].item() for key in METRICS}})

    def segment_batch(self, batch: list[Loaded]) -> None:
        good = []
        for entry in batch:
            if entry.error is not None:
                self.fail(entry.item.image.name, entry.error)
            else:
                good.append(entry)
        if not good:
            return
        images = torch.from_numpy(np.stack([entry.small for entry in good]))  # (B, S, S, 3) uint8
        # uint8 to the device (a quarter of the float32 bytes; pinned and asynchronous on CUDA), normalised there
        x = dataset.normalize(devices.copy_to(images, self.hw), self.mean, self.std)  # (B, 3, S, S)
        with self.timer("forward"):
            probs = self.forward(x)  # (B, S, S)
        if self.config.postprocess:
            with self.timer("postprocess"):
                edited = [postprocess.postprocess_probabilities(p, self.config.threshold) for p in probs.cpu().numpy()]
                probs = torch.from_numpy(np.stack(edited)).to(self.device)
        for entry, prob in zip(good, probs):
            self.finish(entry, prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities for a batch, in passes of self.chunk images. Out of device memory (a smaller card, a
        shared GPU), the passes halve and the batch runs again; at one image a pass the error stands."""
        while True:
            try:
                parts = [predict_probabilities(self.loaded.model, part, self.config.tta, self.amp, self.hw)
                         for part in x.split(self.chunk)]
                return parts[0] if len(parts) == 1 else torch.cat(parts)  # one pass: no copy
            except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
                if not devices.out_of_memory(err) or self.chunk == 1:
                    raise
                self.chunk = max(1, min(self.chunk, len(x)) // 2)
                self.hw.empty_cache()
                tqdm.write(f"out of device memory: going on with {self.chunk} image(s) a forward pass "
                           f"(--batch-size {self.chunk} next time)", file=sys.stderr)

    def finish(self, entry: Loaded, prob: torch.Tensor) -> None:
        """Resize one probability map (S, S) back to the original size, threshold, queue its files, score."""
        config, item, name = self.config, entry.item, entry.item.image.name
        with self.timer("resize back"):
            full = resize_probabilities(prob, entry.size, self.hw.antialias_resize)  # (H, W) float32
            predicted = full > config.threshold  # (H, W) bool, on the device
            prediction = predicted.cpu().numpy()
            probability = (full * 255).round().to(torch.uint8).cpu().numpy() if config.save_probabilities else None
        path = outputs.mask_path(item, self.output_dir)
        self.writer.submit(name, save_png(prediction.astype(np.uint8) * 255), path)
        self.written.append(path)
        if probability is not None:
            self.writer.submit(name, save_png(probability),
                               self.output_dir / "probabilities" / f"{item.id}_probability.png")
        if config.overlay:
            with self.timer("overlay"):
                picture = overlay_image(entry.image, prediction, entry.truth)
            self.writer.submit(name, lambda p: Image.fromarray(picture).save(p, format="JPEG", quality=90),
                               self.output_dir / "overlays" / f"{item.id}_overlay.jpg")
        if entry.truth_error is not None:
            self.fail(name, entry.truth_error)
        elif entry.truth is not None:
            self.score(item, prediction, entry.truth)


def export_weights(config: PredictConfig) -> PredictResult:
    """--export-weights: the model of one checkpoint alone, in float16 (checkpoint.export_weights); no network is
    built for it."""
    if len(config.checkpoint) > 1:
        raise PredictError("--export-weights writes one checkpoint's model; pass one --checkpoint")
    source = Path(config.checkpoint[0]) if config.checkpoint else default_checkpoint(config.runs_dir)[0]
    checkpoint.export_weights(checkpoint.load_checkpoint(source), config.export_weights, str(source))
    size = Path(config.export_weights).stat().st_size
    print(f"Wrote {config.export_weights}: the model of {source} in float16 ({size / 1e6:.1f} MB); "
          f"python predict.py --checkpoint {config.export_weights} --input IMAGES uses it")
    return PredictResult(None, 0, [Path(config.export_weights)], [])


def run(config: PredictConfig) -> PredictResult:
    """Everything main() does after parsing: returns what was written, what failed and the scores."""
    if config.export_weights:
        return export_weights(config)
    try:
        device = devices.select_device(config.device)
        hw = devices.hardware(device)
        amp = devices.amp_dtype(config.amp, hw)
    except (ValueError, devices.DeviceError) as err:
        raise PredictError(str(err)) from None
    devices.configure_backends(hw)  # cuDNN autotuning as in training: images of one size, batch after batch
    if not config.checkpoint:
        first, line = default_checkpoint(config.runs_dir)
        print(line, flush=True)
        loaded, checkpoint_paths = load_model(first, device, amp), [first]
    else:
        checkpoint_paths = [Path(c) for c in config.checkpoint]
        first = checkpoint_paths[0]
        loaded = load_ensemble(checkpoint_paths, device, amp)

    if config.export_onnx:
        export_onnx(loaded, config.export_onnx)
        print(f"Wrote {config.export_onnx}: input 'image' float32 (batch, 3, height, width), normalised with "
              f"mean {loaded.mean} and std {loaded.std} (also in its metadata); output 'logits' (batch, 1, height, "
              f"width); height and width multiples of 16, trained at {loaded.image_size}"
              + ("; trained on colour-constant images: apply dataset.shades_of_gray before normalising"
                 if loaded.shades_of_gray else ""))
        return PredictResult(None, 0, [Path(config.export_onnx)], [])

    items = gather_items(config, loaded)
    if config.parts > 1:
        try:
            whole, items = len(items), outputs.part_of(items, config.parts, config.part)
        except outputs.OutputError as err:
            raise PredictError(str(err)) from None
        print(f"Part {config.part} of {config.parts}: {len(items)} of the {whole} images, {items[0].id} to {items[-1].id}")
    output_dir = Path(config.output) if config.output else default_output(
        checkpoint_paths, config.runs_dir, config.split if config.input is None else "test")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        for sub, wanted in (("overlays", config.overlay), ("probabilities", config.save_probabilities)):
            if wanted:
                (output_dir / sub).mkdir(exist_ok=True)
        outputs.claim_output(output_dir, outputs.output_record(checkpoint_paths, loaded, config), config.overwrite)
    except outputs.OutputError as err:
        raise PredictError(str(err)) from None
    except OSError as err:
        raise PredictError(f"cannot write in the output folder {output_dir}: {err}; choose another --output") from None
    done = [] if config.overwrite else [item for item in items
                                        if all(p.is_file() for p in outputs.output_paths(item, output_dir, config))]
    skipped = {item.id for item in done}
    todo = [item for item in items if item.id not in skipped]
    if done:
        print(f"{len(done)} of the {len(items)} images were segmented into {output_dir}/ by an earlier run of this "
              f"checkpoint and settings: skipped (--overwrite redoes them)")
    models = f"{len(config.checkpoint)} models (mean probability)" if len(config.checkpoint) > 1 else first
    precision = {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}.get(amp, "float32")
    print(f"Segmenting {len(todo)} images on {device} ({hw.name}, {precision}) with {models} "
          f"(network input {loaded.image_size}x{loaded.image_size}{', flip TTA' if config.tta else ''}"
          f"{', post-processing' if config.postprocess else ''}) into {output_dir}/")

    start = time.perf_counter()
    segmenter = Segmenter(loaded, config, output_dir, device, amp)
    if todo:
        segmenter(todo)
    segmenter.score_written(done)
    seconds = dict(segmenter.timer.seconds, total=time.perf_counter() - start)
    segmented = len(todo) - len({name for name, _ in segmenter.failures})
    print(f"Segmented {segmented} of {len(todo)} images in {seconds['total']:.1f} s "
          f"({segmented / seconds['total']:.2f} images/s); per stage, summed over threads: {segmenter.timer.summary()}")

    order = {item.id: index for index, item in enumerate(items)}
    rows = sorted(segmenter.rows, key=lambda row: order[row["image_id"]])
    metrics = report_scores(rows, segmenter.averager, items, output_dir, config)
    return PredictResult(output_dir, len(items), segmenter.written, segmenter.failures, metrics, rows, seconds,
                         skipped=[outputs.mask_path(item, output_dir) for item in done])


def report_scores(rows: list[dict], averager: losses.MetricAverager, items: list[Item], output_dir: Path,
                  config: PredictConfig) -> dict[str, float] | None:
    """Print the scores, and write metrics.csv, metrics.json, cases.png (and worst.png) for a whole folder;
    returns the means, or None without ground truth."""
    if not rows:
        if config.worst:
            print("--worst draws nothing here: it needs ground truth (--masks, or the run's own split without --input)")
        return None
    metrics = averager.compute()
    print(metrics_table(rows, metrics))
    if config.parts > 1:
        print(f"These are the scores of part {config.part} of {config.parts} only; once every part is done, run "
              f"the command again without --parts to score the whole folder (its masks are skipped, not redone)")
        return metrics
    write_metrics(rows, metrics, output_dir)
    by_id = {item.id: item for item in items}
    plot_cases(rows, by_id, output_dir)
    print(f"Wrote metrics.csv, metrics.json and cases.png to {output_dir}/ ({len(rows)} images scored)")
    if config.worst:
        worst = plot_worst(rows, by_id, output_dir, config.worst)
        print(f"Wrote worst.png: the {len(worst)} images of lowest Jaccard, worst first: {', '.join(worst)}")
    return metrics


# ----------------------------------------------------------------------------- evaluation outputs


def write_metrics(rows: list[dict], means: dict[str, float], output_dir: Path) -> None:
    """metrics.csv (one row per image) and metrics.json (the means, keyed as the ISIC scorer names them, and the
    failures: the count and share of images under Jaccard 0.65, which the ranking counts as 0)."""
    # the per-image values are float32: each as the shortest decimal of its float32 (0.65, not 0.6499999761581421)
    utils.write_csv(output_dir / "metrics.csv", [{**row, **{key: str(np.float32(row[key])) for key in METRICS}}
                                                 for row in rows], ["image_id", *METRICS])
    failed = failure_count(rows)
    utils.write_json(output_dir / "metrics.json", {**{key: means[key] for key in METRICS}, "failures": failed,
                                                   "failure_share": failed / max(len(rows), 1)})


def failure_count(rows: list[dict]) -> int:
    """Images whose Jaccard is under the challenge's 0.65 (thresholded Jaccard 0)."""
    return int(losses.failures(torch.tensor([row["threshold_jaccard"] for row in rows])).sum()) if rows else 0


def metrics_table(rows: list[dict], means: dict[str, float]) -> str:
    """The means (the challenge's numbers) with the median and range over images, as printable text."""
    lines = [f"{'metric':<18}{'mean':>8}{'median':>8}{'min':>8}{'max':>8}"]
    for key in METRICS:
        values = np.array([row[key] for row in rows])
        lines.append(f"{key:<18}{means[key]:>8.4f}{np.median(values):>8.4f}{values.min():>8.4f}{values.max():>8.4f}")
    failed = failure_count(rows)
    lines.append(f"{len(rows)} images; the challenge ranks by the mean threshold_jaccard. {failed} of them "
                 f"({100 * failed / max(len(rows), 1):.1f}%) fail: Jaccard under {losses.JACCARD_THRESHOLD}, counted as 0")
    return "\n".join(lines)


def plot_cases(rows: list[dict], items: dict[str, Item], output_dir: Path, max_side: int = 600) -> None:
    """cases.png: the best, median and worst image by Jaccard, each as image, ground truth, prediction."""
    ranked = sorted(rows, key=lambda row: (row["jaccard"], row["image_id"]))
    picks = {"best": ranked[-1], "median": ranked[(len(ranked) - 1) // 2], "worst": ranked[0]}
    shown: dict[str, dict] = {}
    for label, row in picks.items():  # fewer than three images: show each once
        if all(row is not other for other in shown.values()):
            shown[label] = row
    _plot_rows(list(shown.items()), items, output_dir, output_dir / "cases.png", max_side)


def plot_worst(rows: list[dict], items: dict[str, Item], output_dir: Path, count: int, max_side: int = 400) -> list[str]:
    """worst.png: the `count` images of lowest Jaccard, worst first, to look at what fails; returns their ids."""
    ranked = sorted(rows, key=lambda row: (row["jaccard"], row["image_id"]))[:count]
    _plot_rows([(f"worst {rank}", row) for rank, row in enumerate(ranked, 1)], items, output_dir,
               output_dir / "worst.png", max_side)
    return [row["image_id"] for row in ranked]


def _plot_rows(shown: list[tuple[str, dict]], items: dict[str, Item], output_dir: Path, path: Path,
               max_side: int) -> None:
    """One row per (label, metrics row): the image, its ground truth and the prediction written for it."""
    from matplotlib.figure import Figure  # Figure without pyplot draws with Agg: no display needed

    fig = Figure(figsize=(9, 3 * len(shown)), layout="constrained")
    axes = fig.subplots(len(shown), 3, squeeze=False)
    for (label, row), ax in zip(shown, axes):
        item = items[row["image_id"]]
        image = dataset.load_image(item.image)
        step = max(1, -(-max(image.shape[:2]) // max_side))  # subsample large images for the figure
        prediction = dataset.load_mask(outputs.mask_path(item, output_dir)) > 0
        panels = [image, dataset.load_mask(item.mask) > 0, prediction]
        titles = [f"{label}: {item.id}", "ground truth", f"prediction (Jaccard {row['jaccard']:.3f})"]
        for axis, panel, title in zip(ax, panels, titles):
            # fixed grey scale: an all-lesion or empty mask must not be stretched to another colour
            axis.imshow(panel[::step, ::step], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            axis.set_title(title, fontsize=9)
            axis.set_axis_off()
    with utils.atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=100)


# ----------------------------------------------------------------------------- export


def export_onnx(loaded: LoadedModel, path: str | Path) -> None:
    """Write the network as ONNX with dynamic batch, height and width, and its preprocessing as metadata."""
    path = Path(path)
    model = loaded.model.cpu().float().eval()
    example = torch.zeros(1, 3, loaded.image_size, loaded.image_size)  # RGB
    axes = {0: "batch", 2: "height", 3: "width"}
    try:
        with warnings.catch_warnings():
            # the tracer warns about the size check in forward(); sizes stay dynamic (the tests check that)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # the TorchScript exporter is deprecated, but the newer one needs onnxscript, not a requirement here
            warnings.simplefilter("ignore", DeprecationWarning)
            # without gradients the layers take their plain forms, which all have ONNX equivalents
            with torch.no_grad():
                torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["image"],
                                  output_names=["logits"], dynamic_axes={"image": axes, "logits": axes},
                                  opset_version=17)
    except OSError as err:
        raise PredictError(f"cannot write {path}: {err}; choose another --export-onnx path") from None
    import onnx

    exported = onnx.load(str(path))
    metadata = {"format": checkpoint.CHECKPOINT_FORMAT, "image_size": str(loaded.image_size),
                "mean": json.dumps(loaded.mean), "std": json.dumps(loaded.std),
                "preprocessing": "RGB uint8 resized to image_size x image_size, "
                                 + ("then Shades of Gray colour constancy (p = 6, dataset.shades_of_gray), "
                                    if loaded.shades_of_gray else "") + "x = (uint8 / 255 - mean) / std",
                "shades_of_gray": json.dumps(loaded.shades_of_gray),
                "output": "logits; sigmoid gives the lesion probability"}
    for key, value in metadata.items():
        exported.metadata_props.add(key=key, value=value)
    with utils.atomic_write(path) as tmp:
        onnx.save(exported, str(tmp))


if __name__ == "__main__":
    main()
