"""Dice-loss training of the Improved UNet on ISIC 2018 Task 1.

    python train.py                                  # built-in synthetic lesions when no ISIC data
    python train.py --data-dir data/ISIC2018 --epochs 100
    torchrun --nproc_per_node=4 train.py ...          # several GPUs (DistributedDataParallel)

Everything a run produces goes to runs/<name>/: config.json, metrics.csv, summary.json, curves.png,
predictions.png, last.pt and best.pt. `--resume auto` continues a run from its last.pt.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import signal
import socket
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn

import budget
import dataset
import loader
import modules
import synthetic
import utils

@dataclass
class TrainConfig:
    """Every setting of a training run; each field is a --kebab-case flag of train.py."""

    # --- data ---
    data_dir: str = "data/ISIC2018"  # ISIC root (official folders or images/ + masks/); synthetic set when absent
    image_size: int = 256  # side of the square the images are resized to (multiple of 16)
    val_fraction: float = 0.1  # share of the training folder held out for validation when there is no official one
    test_fraction: float = 0.1  # share held out for testing when there is no official test ground truth
    split_seed: int = 0  # seed of the train/val/test split (kept fixed across runs to compare them)
    folds: int = 0  # K >= 2: K-fold cross-validation of the non-test images; validate on fold --fold
    fold: int = 0  # the validation fold, 0 .. K-1 (summarise the K runs with python crossval.py)
    skip_bad: bool = False  # skip and count unreadable or mismatched pairs instead of stopping
    synthetic_images: int = 400  # size of the built-in synthetic lesion set
    # --- recipe ---
    recipe: Literal["default", "paper"] = "default"  # "default": the settings below; "paper": Isensee et al.'s for the fields you do not set
    # --- model ---
    arch: Literal["improved-unet", "dynunet"] = "improved-unet"  # "improved-unet" (this network) or "dynunet" (MONAI's DynUNet baseline; needs monai)
    base_channels: int = 16  # feature maps at the first level (the paper: 16, doubling per level)
    norm: Literal["instance", "batch"] = "instance"  # "instance" (the paper's choice) or "batch"
    dropout: float = 0.0  # dropout inside the context modules (the paper: 0.3)
    sync_batchnorm: bool = False  # synchronise batch-norm statistics across GPUs under DDP
    # --- optimisation ---
    epochs: int = 100  # passes over the training split
    minutes: float = 0.0  # wall-clock budget of training plus validation: the steps and the schedule are fitted to it from the throughput measured in the first steps; with --epochs, the first limit reached ends the run; 0: off
    batch_size: int = 16  # images per step on each GPU
    lr: float = 2e-3  # peak learning rate (the paper: 5e-4)
    weight_decay: float = 1e-5  # Adam's L2 penalty (the paper: 1e-5)
    schedule: Literal["cosine", "paper"] = "cosine"  # "cosine": per-step cosine decay to 0 after warm-up; "paper": lr x lr_decay every epoch
    lr_decay: float = 0.985  # per-epoch factor of the paper schedule
    warmup_epochs: float = 0.3  # linear warm-up from 0, in epochs (fractions allowed), before either schedule
    grad_clip: float = 0.0  # clip the gradient norm to this value; 0 turns clipping off
    loss: Literal["dice+bce", "dice"] = "dice+bce"  # "dice+bce" (Dice plus binary cross-entropy) or "dice" (the paper's)
    ema: float = 0.0  # decay of an exponential moving average of the weights (e.g. 0.99); the average is validated and saved as the model; 0: off
    # --- augmentation ---
    augment: Literal["none", "flips", "light", "full"] = "flips"  # preset: none, flips (the square's 8 symmetries), light or full (see loader.AUGMENT_PRESETS)
    flips: bool | None = None  # random flips and 90-degree turns; default: the preset's
    rotate_deg: float | None = None  # rotation drawn from [-x, x] degrees; default: the preset's
    zoom: float | None = None  # zoom factor drawn from [1 - x, 1 + x]; default: the preset's
    affine_p: float | None = None  # share of images that get the rotation and zoom; default: the preset's
    brightness: float | None = None  # brightness factor drawn from [1 - x, 1 + x]; default: the preset's
    contrast: float | None = None  # contrast factor around the mean luminance, likewise; default: the preset's
    saturation: float | None = None  # saturation factor around each pixel's luminance, likewise; default: the preset's
    # --- hardware ---
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto: bf16 on CUDA from capability 8.0 (A100, H100), fp16 below (P100, V100: cuDNN has no bf16 convolutions there), off on CPU and MPS
    channels_last: bool | None = None  # NHWC activations; default: on CUDA (its bf16 kernels are NHWC) and on CPU with batch norm, off on CPU with instance norm, whose channels-last backward is slow (measured: benchmark.py fp32 vs fp32-cl)
    tune_malloc: bool = True  # CPU: glibc keeps freed activations for reuse instead of page-faulting fresh memory
    compile: bool = False  # torch.compile the model on CUDA from capability 7.0 (Triton's minimum; ignored with a warning elsewhere); the first epoch pays for compilation
    seed: int = 0  # seed for weights, shuffling and augmentation (each rank adds its rank)
    deterministic: bool = False  # deterministic kernels (slower; for exact reproduction)
    # --- run ---
    out_dir: str = "runs"  # parent folder of run folders
    name: str | None = None  # run folder name; default: date and time
    resume: str | None = None  # "auto" (this run's last.pt, if any) or a checkpoint path
    config: str | None = None  # JSON or YAML file of these settings; flags override it
    num_preview: int = 4  # validation images shown in predictions.png and wandb
    progress: bool = True  # progress display: tqdm in a terminal, a plain line every 30 s or quarter epoch in a job log
    # --- wandb ---
    wandb: Literal["online", "offline", "disabled"] | None = None  # online, offline or disabled; default: WANDB_MODE, else online with an API key, else offline
    wandb_project: str = "improved-unet-isic"  # wandb project
    wandb_entity: str | None = None  # wandb team or user
    wandb_tags: list[str] = field(default_factory=list)  # wandb tags
    # --- debugging ---
    max_steps: int = 0  # stop each epoch after this many steps; 0 means the whole epoch
    limit_samples: int = 0  # use only the first N training images; 0 means all
    overfit_batch: bool = False  # train and validate on one fixed batch (a quick check that the model can learn)


# Used for the fields a user did not set when no ISIC data is present: a run that finishes in
# about seven minutes on a 2-core CPU. 64 px keeps the lesions' shape; the higher lr makes up for
# the few steps that 320 training images give (the paper's 5e-4 plateaus below 0.90 Dice here), and
# the cosine decay settles it: with lr 1e-3 and the paper's decay the best epoch cleared 0.90 by 0.006
# and the last ten epochs spanned 0.887-0.906; with 2e-3 and cosine the last eight stayed within 0.903-0.909.
# These also keep the synthetic run's model and augmentation as they were measured (batch norm, dropout
# 0.3, every augmentation), since the real-data defaults above were chosen on real images.
SYNTHETIC_DEFAULTS = {"image_size": 64, "epochs": 30, "batch_size": 8, "lr": 2e-3, "schedule": "cosine",
                      "norm": "batch", "dropout": 0.3, "augment": "full", "loss": "dice", "warmup_epochs": 0.0}

# Named sets of settings; each fills the fields the user did not set. "paper" is Isensee et al. 2017's
# training as far as it carries over to 2D: instance norm, dropout 0.3, Adam 5e-4 with weight decay
# 1e-5 decayed x0.985 per epoch, Dice loss, and rotation, scaling, mirroring and intensity augmentation.
RECIPES = {
    "default": {},
    "paper": {"norm": "instance", "dropout": 0.3, "lr": 5e-4, "weight_decay": 1e-5, "schedule": "paper",
              "lr_decay": 0.985, "warmup_epochs": 0.0, "loss": "dice", "augment": "full"},
}

GROUPS = utils.field_groups(TrainConfig)  # from the "# --- name ---" lines above
CHOICES = utils.field_choices(TrainConfig)  # from the Literal annotations


# ----------------------------------------------------------------------------- configuration


def config_table(cls=None, groups=None) -> str:
    """The configuration reference of docs/training.md, as a Markdown table generated from the dataclass."""
    cls, groups = cls or TrainConfig, groups or GROUPS
    helps = utils.field_help(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    lines = ["| group | flag | default | meaning |", "|---|---|---|---|"]
    for title, names in groups.items():
        for name in names:
            f = fields[name]
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            meaning = helps.get(name, "").replace("|", "\\|")
            lines.append(f"| {title} | `--{name.replace('_', '-')}` | `{default!r}` | {meaning} |")
    return "\n".join(lines)


def check_config(config: TrainConfig) -> list[str]:
    """Settings that cannot work, as messages (empty when the config is usable)."""
    problems = []
    if config.image_size < 16 or config.image_size % 16:
        nearest = max(16, round(config.image_size / 16) * 16)
        problems.append(f"--image-size must be a positive multiple of 16 (the network halves it four times); "
                        f"try {nearest}")
    for name in ("batch_size", "epochs", "base_channels", "synthetic_images"):
        if getattr(config, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
    if not config.lr > 0 or not math.isfinite(config.lr):
        problems.append(f"--lr must be a positive number, got {config.lr}")
    if config.weight_decay < 0:
        problems.append(f"--weight-decay must not be negative, got {config.weight_decay}")
    if not 0 < config.lr_decay <= 1:
        problems.append(f"--lr-decay must be in (0, 1], got {config.lr_decay}")
    if not 0 <= config.minutes or not math.isfinite(config.minutes):
        problems.append(f"--minutes must be 0 (no budget) or a positive number of minutes, got {config.minutes}")
    if not 0 <= config.ema < 1:
        problems.append(f"--ema must be in [0, 1) (0 turns it off; 0.99 is a usual decay), got {config.ema}")
    if not 0 <= config.dropout < 1:
        problems.append(f"--dropout must be in [0, 1), got {config.dropout}")
    for name in ("val_fraction", "test_fraction"):
        if not 0 <= getattr(config, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(config, name)}")
    if config.folds == 1 or config.folds < 0:
        problems.append(f"--folds must be 0 (no cross-validation) or at least 2, got {config.folds}")
    elif config.folds >= 2 and not 0 <= config.fold < config.folds:
        problems.append(f"--fold must be in 0..{config.folds - 1} for --folds {config.folds}, got {config.fold}")
    if config.val_fraction + config.test_fraction >= 1:
        problems.append("--val-fraction plus --test-fraction must leave images for training")
    for name in ("grad_clip", "warmup_epochs", "max_steps", "limit_samples", "num_preview"):
        if getattr(config, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must not be negative, got {getattr(config, name)}")
    for name in ("rotate_deg", "brightness", "contrast", "saturation"):
        if getattr(config, name) is not None and getattr(config, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must not be negative, got {getattr(config, name)}")
    if config.zoom is not None and not 0 <= config.zoom < 1:
        problems.append(f"--zoom must be in [0, 1), got {config.zoom}")
    if config.affine_p is not None and not 0 <= config.affine_p <= 1:
        problems.append(f"--affine-p must be in [0, 1], got {config.affine_p}")
    return problems


def augment_config(config: TrainConfig) -> loader.AugmentConfig:
    """The --augment preset with the individual knobs that were given laid over it."""
    preset = loader.AUGMENT_PRESETS[config.augment]
    knobs = {name: getattr(config, name) for name in ("flips", "rotate_deg", "affine_p", "brightness", "contrast",
                                                        "saturation") if getattr(config, name) is not None}
    if config.zoom is not None:
        knobs["scale"] = (1.0 - config.zoom, 1.0 + config.zoom)
    return dataclasses.replace(preset, **knobs)


def apply_recipe(config: TrainConfig, explicit: set[str]) -> tuple[TrainConfig, set[str]]:
    """The config with the recipe's settings in the fields the user did not set, and those fields."""
    overrides = {k: v for k, v in RECIPES[config.recipe].items() if k not in explicit}
    return dataclasses.replace(config, **overrides), set(overrides)


# ----------------------------------------------------------------------------- run folder


class RunInUseError(RuntimeError):
    """Another live process holds the run folder."""


class RunLock:
    """A lock file in the run folder, so two runs never write the same checkpoints.

    It records host and pid; a lock left by a process that no longer exists on this host is taken
    over, so a crashed run does not block its own resumption forever.
    """

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self.held = False

    def acquire(self) -> None:
        host = socket.gethostname()
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner_host, owner_pid = self._owner()
                if owner_host == host and owner_pid is not None and not _pid_alive(owner_pid):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                raise RunInUseError(
                    f"{self.path.parent} is in use by another run (pid {owner_pid} on {owner_host}). "
                    f"Choose another --name, or wait for that run to finish; if it is no longer "
                    f"running, delete {self.path}.") from None
            with os.fdopen(fd, "w") as f:
                f.write(f"{host} {os.getpid()}\n")
            self.held = True
            return

    def _owner(self):
        try:
            host, pid = self.path.read_text().split()
            return host, int(pid)
        except (OSError, ValueError):
            return None, None

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


METRIC_COLUMNS = ["epoch", "train_loss", "val_loss", "val_dice", "val_jaccard", "val_threshold_jaccard",
                  "val_accuracy", "val_sensitivity", "val_specificity", "lr", "images_per_s", "seconds"]


def write_json(path: Path, value) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- plots


def plot_curves(history: list[dict], path: Path) -> None:
    """Loss, validation Dice and learning rate per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, [row["train_loss"] for row in history], label="train")
    axes[0].plot(epochs, [row["val_loss"] for row in history], label="validation")
    axes[0].set_title("Dice loss")
    axes[0].legend()
    axes[1].plot(epochs, [row["val_dice"] for row in history], label="Dice")
    axes[1].plot(epochs, [row["val_jaccard"] for row in history], label="Jaccard")
    axes[1].set_title("validation")
    axes[1].legend()
    axes[2].plot(epochs, [row["lr"] for row in history])
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_predictions(images, masks, predictions, path: Path, titles=None) -> None:
    """Rows of image | ground truth | prediction (uint8 images (N,H,W,3), masks (N,H,W) {0,1})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.5 * n), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(images[i])
        axes[i, 1].imshow(masks[i], cmap="gray", vmin=0, vmax=1)
        axes[i, 2].imshow(images[i])
        axes[i, 2].contour(masks[i], levels=[0.5], colors="lime", linewidths=1)
        axes[i, 2].contour(predictions[i], levels=[0.5], colors="red", linewidths=1)
        if titles:
            axes[i, 0].set_ylabel(titles[i], fontsize=8)
    for ax, title in zip(axes[0], ["image", "ground truth", "prediction (red) vs truth (green)"]):
        ax.set_title(title, fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- wandb


def wandb_mode(config: TrainConfig) -> str:
    """Flag, then WANDB_MODE, then online only when an API key is configured (else offline)."""
    if config.wandb:
        return config.wandb
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


def start_wandb(config: TrainConfig, run_dir: Path, run_id: str | None):
    """A wandb run (resumed when run_id is known), or None; never lets wandb stop training."""
    mode = wandb_mode(config)
    if mode == "disabled":
        return None
    try:
        import wandb

        return wandb.init(
            project=config.wandb_project, entity=config.wandb_entity, name=run_dir.name,
            tags=config.wandb_tags or None, config=dataclasses.asdict(config), dir=str(run_dir),
            id=run_id, resume="allow" if run_id else None, mode=mode,
        )
    except Exception as err:  # wandb raises many error types when it cannot start; none may stop training
        warnings.warn(f"wandb could not start ({type(err).__name__}: {err}); training goes on without it. "
                      f"Use --wandb offline to log locally and `wandb sync` later.", stacklevel=2)
        return None


def wandb_log(run, values: dict, step: int) -> None:
    if run is None:
        return
    try:
        run.log(values, step=step)
    except Exception as err:  # a lost connection must not stop training
        warnings.warn(f"wandb.log failed ({err}); continuing", stacklevel=2)


# ----------------------------------------------------------------------------- training


class TrainingError(RuntimeError):
    """Training cannot go on (for example the loss became NaN); the message says what to try."""


class Preemption:
    """Turns SIGUSR1/SIGTERM (SLURM's warning before a time limit or preemption) into a flag.

    The loop finishes the current step, writes last.pt and exits, so a requeued job resumes.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is None:  # under srun and torchrun the same warning can arrive twice: say it once
            print(f"received {signal.Signals(signum).name}: saving last.pt after this step", file=sys.stderr, flush=True)
        self.signum = signum

    def requested(self, distributed: bool, device: torch.device) -> bool:
        """True on every rank as soon as any rank got a signal (ranks must stop at the same step)."""
        return self.poll(distributed, device)[0]

    def poll(self, distributed: bool, device: torch.device, overrun: bool = False,
             loss_sum: torch.Tensor | None = None) -> tuple[bool, bool, bool]:
        """(a signal came, a budget ran out, the loss is not finite) on any rank, agreed by every rank, so
        that all ranks stop, or fail, at the same step.

        Under DDP this is a collective and a host sync: call it at the same steps on every rank, and
        only every few steps (SLURM warns minutes ahead, so a check every CHECK_EVERY steps is soon enough).
        """
        if not distributed:
            bad = loss_sum is not None and not torch.isfinite(loss_sum).item()
            return self.signum is not None, overrun, bad
        flags = torch.stack([torch.tensor(float(self.signum is not None), device=device),
                             torch.tensor(float(overrun), device=device),
                             (~torch.isfinite(loss_sum)).float() if loss_sum is not None
                             else torch.zeros((), device=device)])
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        signalled, overrun, bad = flags.tolist()
        return signalled > 0, overrun > 0, bad > 0


# Steps between the reads that wait for a GPU (the loss's finiteness, the preemption flag under DDP):
# each one stalls the queue of kernels the CPU has launched ahead. On a CPU there is no queue to stall.
CHECK_EVERY = {"cpu": 1}
CHECK_EVERY_DEFAULT = 25


def make_scheduler(optimizer, config: TrainConfig, steps_per_epoch: int, pace: budget.Pace | None = None):
    """Learning-rate factor per optimizer step (the scheduler steps after every batch, so warm-up and
    cosine decay are smooth even in a six-epoch run). LambdaLR multiplies the *initial* lr by the
    factor, so the paper's "lr x 0.985 every epoch" is 0.985 ** epoch, not a running product.

    The cosine decay ends at the run's last step: --epochs', or the step count that `pace` fits to a
    --minutes budget once it has measured the throughput (the factor reads it at every step)."""
    steps_per_epoch = max(1, steps_per_epoch)
    warmup = config.warmup_epochs * steps_per_epoch

    def factor(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if config.schedule == "paper":
            return config.lr_decay ** (step // steps_per_epoch)
        total = pace.total_steps if pace is not None else config.epochs * steps_per_epoch
        progress = (step - warmup) / max(1.0, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def amp_settings(amp: str, device: torch.device):
    """(autocast context factory, GradScaler or None), with the dtype that utils.hardware chooses for
    --amp auto. GradScaler only for fp16: bf16 has fp32's exponent range and needs no loss scaling."""
    dtype = utils.amp_dtype(amp, utils.hardware(device))
    if dtype is None:
        return nullcontext, None
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


class WeightAverage:
    """An exponential moving average of the weights (Polyak averaging): after every optimizer step
    average = decay x average + (1 - decay) x weights, with the decay ramped up over the first steps,
    min(decay, (1 + t) / (10 + t)), so the average does not remember its random start. Float buffers
    (batch-norm statistics) are averaged the same way. The update runs on the device with no host sync.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.source = model  # the plain model the optimizer trains (not a DDP or compile wrapper)
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def _pairs(self, model: nn.Module):
        ours = list(self.model.parameters()) + [b for b in self.model.buffers() if b.is_floating_point()]
        theirs = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]
        return ours, theirs

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ours, theirs = self._pairs(self.source)
        torch._foreach_lerp_(ours, theirs, 1.0 - decay)
        for mine, other in zip(self.model.buffers(), self.source.buffers()):
            if not mine.is_floating_point():
                mine.copy_(other)  # counters such as num_batches_tracked


def train_one_epoch(model, loader, optimizer, scheduler, loss_fn, *, autocast, scaler, config: TrainConfig, epoch: int,
                    start_step: int, loss_sum: float, images_seen: int, preemption: Preemption,
                    distributed: bool, device: torch.device, pace: budget.Pace | None = None,
                    on_measured=None, average: WeightAverage | None = None, steps_per_epoch: int | None = None) -> dict:
    """One pass over the training loader from `start_step`; stops early on a preemption signal, at the
    end of a --minutes plan, or when a budget run has fallen too far behind it.

    The loss is summed in float32 on the device (MPS has no float64) and read back only every
    CHECK_EVERY steps and for the progress bar, so the step itself never waits for the GPU. While
    `pace` is measuring, `on_measured(global_step)` is called once when its timing window closes.
    """
    model.train()
    per_epoch = steps_per_epoch or (len(loader) if config.max_steps == 0 else min(len(loader), config.max_steps))
    steps = per_epoch if pace is None else max(0, min(per_epoch, pace.total_steps - epoch * per_epoch))
    total_loss = torch.tensor(loss_sum, device=device, dtype=torch.float32)
    seen = images_seen
    check_every = CHECK_EVERY.get(device.type, CHECK_EVERY_DEFAULT)
    bar = utils.Progress(total=steps, initial=start_step, desc=f"epoch {epoch + 1}",
                         enabled=config.progress and utils.is_main_process())
    started, timed_images = time.perf_counter(), 0
    step = start_step
    stopped = overrun = False
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    loader.set_epoch(epoch, start_batch=start_step)  # mid-epoch resume: the same batches from start_step on
    for step_index, (images, masks) in enumerate(loader, start=start_step):
        if step_index >= steps:
            break
        with autocast():
            logits = model(images)
        loss = loss_fn(logits.float(), masks)  # float32 loss even under autocast
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        if average is not None:
            average.update()
        total_loss += loss.detach() * images.shape[0]
        seen += images.shape[0]
        timed_images += images.shape[0]
        step = step_index + 1
        global_step = epoch * per_epoch + step
        if pace is not None and pace.measuring and pace.observe(global_step, epoch * per_epoch + steps, sync):
            if on_measured is not None:
                paused = time.perf_counter()
                on_measured(global_step)
                started += time.perf_counter() - paused  # images/s counts training steps only, not the probe
            steps = max(0, min(per_epoch, pace.total_steps - epoch * per_epoch))  # the plan may end this epoch
            bar.total = steps
        checking = step % check_every == 0 or step >= steps
        signalled = overrun = False
        if checking or not distributed:  # without DDP a signal is a Python flag: read it every step
            signalled, overrun, bad = preemption.poll(distributed, device, pace is not None and pace.overrun(),
                                                      total_loss if checking else None)
            if bad:
                raise TrainingError(
                    f"the training loss became {total_loss.item()} at epoch {epoch + 1}, step {step} (or within "
                    f"the {check_every} steps before it). The last good checkpoint is kept. Try a lower --lr, "
                    f"--grad-clip 1.0, or --amp bf16/off instead of fp16.")
        if bar.enabled and ((step - start_step - 1) % max(10, check_every) == 0 or step >= steps):  # for a shown bar only
            rate = timed_images / max(time.perf_counter() - started, 1e-9)
            postfix = {"loss": f"{total_loss.item() / max(seen, 1):.4f}", "img_s": f"{rate:.1f}"}
            if pace is not None and pace.budgeted:
                postfix["budget"] = f"{pace.used_seconds() / 60:.1f}/{pace.minutes:g}min"
                postfix["steps"] = f"{global_step}/{pace.total_steps}"
            bar.set_postfix(**postfix)
        bar.update(1)
        if signalled or overrun:
            stopped = signalled and step < steps
            break
    bar.close()
    if not torch.isfinite(total_loss):
        raise TrainingError(f"the training loss became {total_loss.item()} during epoch {epoch + 1}. The last good "
                            f"checkpoint is kept. Try a lower --lr, --grad-clip 1.0, or --amp bf16/off.")
    seconds = time.perf_counter() - started
    return {"loss_sum": total_loss.item(), "images": seen, "step": step, "stopped": stopped, "overrun": overrun,
            "images_per_s": timed_images / max(seconds, 1e-9) * (torch.distributed.get_world_size() if distributed else 1)}


@torch.no_grad()
def evaluate(model, loader, loss_fn, *, autocast) -> dict:
    """Mean loss and ISIC metrics over a split (per image, then averaged across all ranks)."""
    model.eval()
    averager = utils.MetricAverager()
    for images, masks in loader:
        with autocast():
            logits = model(images)
        logits = logits.float()
        per_image = utils.segmentation_metrics(logits[:, 0] > 0, masks[:, 0] > 0.5)
        per_image["loss"] = loss_fn(logits, masks).detach().expand(images.shape[0])
        averager.update(per_image)
    return averager.compute()

@torch.no_grad()
def predict_preview(model, split, mean, std, count: int, device, autocast):
    """Predictions on the first `count` images of a split (uint8 images, masks, predictions)."""
    count = min(count, len(split.ids))
    images = torch.from_numpy(split.images[:count].copy())
    batch = dataset.normalize(images.to(device), mean, std)
    model.eval()
    with autocast():
        logits = model(batch).float()
    predictions = (logits[:, 0] > 0).to(torch.uint8).cpu().numpy()
    return images.numpy(), split.masks[:count].copy(), predictions, list(split.ids[:count])


# ----------------------------------------------------------------------------- the run


def resolve_data(config: TrainConfig, explicit: set[str], resuming: bool) -> tuple[TrainConfig, bool]:
    """Use the ISIC data when present; otherwise the built-in synthetic set with laptop-sized settings."""
    if Path(config.data_dir).exists():
        return config, False
    if "data_dir" in explicit or resuming:
        raise dataset.DataError(
            f"--data-dir {config.data_dir} does not exist. Get ISIC 2018 with "
            f"`python download.py --root {config.data_dir}`, or point --data-dir at your copy.")
    overrides = {k: v for k, v in SYNTHETIC_DEFAULTS.items() if k not in explicit}
    config = dataclasses.replace(config, data_dir=synthetic.SYNTHETIC_DIR, **overrides)
    utils.print0(f"No ISIC data at {TrainConfig.data_dir}: training on the built-in synthetic lesion set in "
                 f"{synthetic.SYNTHETIC_DIR} ({', '.join(f'{k}={v}' for k, v in overrides.items())}). "
                 f"For the real data run `python download.py` or pass --data-dir.")
    return config, True


def load_resume_checkpoint(config: TrainConfig, explicit: set[str], run_dir: Path | None):
    """The checkpoint to resume from (or None) and the config merged with it: the saved settings,
    overridden by the ones given now (e.g. more --epochs)."""
    if not config.resume:
        return None, config
    if config.resume == "auto":
        path = run_dir / "last.pt"
        if not path.exists():
            utils.print0(f"--resume auto: no {path} yet, starting a new run")
            return None, config
    else:
        path = Path(config.resume)
    checkpoint = utils.load_checkpoint(path)
    saved = {k: v for k, v in checkpoint["train_config"].items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    merged = TrainConfig(**{**saved, **{k: getattr(config, k) for k in explicit | {"resume"}}})
    if "name" not in explicit:
        merged = dataclasses.replace(merged, name=path.parent.name, out_dir=str(path.parent.parent))
    utils.print0(f"resuming from {path} (epoch {checkpoint['epoch'] + 1}, step {checkpoint.get('step', 0)})")
    return checkpoint, merged


def check_same_split(saved: dict | None, current: dict, config: TrainConfig) -> None:
    """A resumed run must train, validate and test on the images it started with."""
    if saved is None:
        return  # written before runs stored their split
    changes = []
    for name in dataset.SPLITS:
        before, now = set(saved.get(name, [])), set(current[name])
        if before != now:
            changes.append(f"{name}: {len(now - before)} added, {len(before - now)} gone "
                           f"(e.g. {sorted(now ^ before)[0]})")
    if changes:
        raise dataset.DataError(
            f"{config.data_dir} no longer gives the split this run started with ({'; '.join(changes)}). Restore "
            f"the folder, or start a new run (another --name) so that no test image can leak into training.")


def run_name(config: TrainConfig, distributed: bool) -> str:
    """The run folder name; ranks agree on it (rank 0's clock decides)."""
    name = [config.name or time.strftime("%Y%m%d-%H%M%S")]
    if distributed:
        torch.distributed.broadcast_object_list(name, src=0)
    return name[0]


def train(config: TrainConfig, explicit: set[str] = frozenset()) -> dict:
    """Run (or resume) training; returns the summary that is also written to summary.json."""
    dist = utils.init_distributed(config.device)  # gloo for --device cpu even on a GPU node
    try:
        return _train(config, set(explicit), dist)
    finally:
        utils.cleanup_distributed()


@dataclass
class Data:
    """The splits a run trains and validates on, their loaders and the normalisation statistics."""

    train: dataset.CachedSplit
    val: dataset.CachedSplit
    train_loader: loader.BatchLoader
    val_loader: loader.BatchLoader
    mean: tuple
    std: tuple
    split_ids: dict[str, list[str]]  # train/val/test ids of the whole data set, stored with the run
    description: str


@dataclass
class TrainState:
    """Where training stands: what a checkpoint restores besides the weights and the optimiser."""

    epoch: int = 0  # the next epoch to run
    step: int = 0  # the next step within it (a run stopped mid-epoch resumes there)
    loss_sum: float = 0.0  # the epoch's summed loss and image count so far
    images: int = 0
    best_metric: float = -1.0
    best_epoch: int = -1
    history: list = field(default_factory=list)
    wandb_id: str | None = None
    budget_plan: dict | None = None  # the --minutes plan, once decided (see budget.Pace)
    used_seconds: float = 0.0  # training and validation time so far, across resumptions


def prepare_run(config: TrainConfig, explicit: set[str], dist):
    """The run's settings (resumed, recipe, synthetic fallback), its checkpoint if resuming, and the flag
    saying whether it trains on the synthetic set."""
    config = dataclasses.replace(config, name=run_name(config, dist.is_distributed))
    checkpoint, config = load_resume_checkpoint(config, explicit, Path(config.out_dir) / config.name)
    if checkpoint is None:
        config, from_recipe = apply_recipe(config, explicit)
        explicit = explicit | from_recipe  # the synthetic set's defaults do not override a recipe
    config, on_synthetic = resolve_data(config, explicit, resuming=checkpoint is not None)
    if on_synthetic and dist.rank == 0:
        synthetic.ensure_synthetic(config.synthetic_images, seed=0, log=utils.print0)
    return config, checkpoint, on_synthetic


def setup_device(config: TrainConfig, dist) -> torch.device:
    try:
        device = utils.select_device(config.device)
    except ValueError as err:  # a device that is not there or not a device name: one line, not a traceback
        raise utils.DeviceError(str(err)) from None
    if dist.is_distributed and device.type == "cuda" and device.index != dist.local_rank:
        if config.device not in ("auto", "cuda"):
            utils.print0(f"--device {config.device} under torchrun: each process uses its own GPU, cuda:LOCAL_RANK")
        device = torch.device("cuda", dist.local_rank)  # the GPU the process group bound this rank to
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not config.deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif device.type == "cpu" and config.tune_malloc:
        utils.tune_glibc_malloc()  # about 10% faster 256x256 steps on a 2-core VM (benchmark.py --no-tune-malloc)
    utils.seed_everything(config.seed + dist.rank, deterministic=config.deterministic)
    return device


def setup_data(config: TrainConfig, checkpoint: dict | None, dist, device: torch.device) -> Data:
    """Splits from the uint8 cache (built once, by rank 0; the other ranks wait and then read it)."""
    data_config = utils.subconfig(dataset.DataConfig, config)
    if dist.rank == 0:
        splits = dataset.prepare_splits(data_config, log=utils.print0)
    if dist.is_distributed:
        torch.distributed.barrier()
    if dist.rank != 0:
        splits = dataset.prepare_splits(data_config, log=lambda *a, **k: None)
    split_ids = {name: list(getattr(splits, name).ids) for name in dataset.SPLITS}
    if checkpoint is not None:
        check_same_split(checkpoint.get("splits"), split_ids, config)
    train_split = splits.train
    if config.limit_samples:
        train_split = dataset.CachedSplit(train_split.ids[:config.limit_samples],
                                          train_split.images[:config.limit_samples],
                                          train_split.masks[:config.limit_samples])
    if config.overfit_batch:
        n = min(config.batch_size, len(train_split.ids))
        train_split = dataset.CachedSplit(train_split.ids[:n], train_split.images[:n], train_split.masks[:n])
    val_split = train_split if config.overfit_batch else splits.val
    loader_args = dict(mean=splits.mean, std=splits.std, device=device, rank=dist.rank, world_size=dist.world_size)
    train_loader = loader.make_loader(train_split, config.batch_size, train=True, seed=config.seed,
                                       augment=augment_config(config), **loader_args)
    val_loader = loader.make_loader(val_split, config.batch_size, train=False, seed=config.seed, **loader_args)
    if len(train_loader) == 0:
        raise dataset.DataError(f"{config.data_dir}: {len(train_split.ids)} training images make no full batch of "
                                f"{config.batch_size}; lower --batch-size")
    return Data(train_split, val_split, train_loader, val_loader, splits.mean, splits.std, split_ids,
                splits.description)


def setup_model(config: TrainConfig, checkpoint: dict | None, dist, device: torch.device):
    """(the model to train, wrapped for DDP or compile as asked; the plain model that checkpoints hold;
    its ModelConfig)."""
    model_config = utils.subconfig(modules.ModelConfig, config)
    model = modules.build_model(model_config)
    if checkpoint is not None:
        if utils.checkpoint_model_config(checkpoint) != dataclasses.asdict(model_config):
            raise utils.CheckpointError(
                f"{config.resume}: the checkpoint's model {utils.checkpoint_model_config(checkpoint)} differs from this run's "
                f"{dataclasses.asdict(model_config)}; drop the conflicting flags or start a new --name")
        model.load_state_dict(checkpoint.get("online_model", checkpoint["model"]))  # "model" is the average with --ema
    hardware = utils.hardware(device)
    channels_last = config.channels_last if config.channels_last is not None else hardware.channels_last(config.norm)
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    raw_model = model  # checkpoints always hold the plain model, without DDP or compile wrappers
    if dist.is_distributed:
        if config.sync_batchnorm and config.norm == "batch":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            raw_model = model
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile and not hardware.can_compile:
        utils.print0(f"--compile ignored on {hardware.name}: torch.compile's GPU kernels (Triton) need CUDA "
                     f"capability 7.0 or higher" + (f", this GPU has {hardware.capability[0]}.{hardware.capability[1]}"
                                                    if hardware.capability else ""))
    elif config.compile:
        model = torch.compile(model)
    return model, raw_model, model_config


def setup_optimisation(config: TrainConfig, raw_model: nn.Module, steps_per_epoch: int, device: torch.device,
                       pace: budget.Pace):
    """(optimizer, scheduler, autocast factory, GradScaler or None, loss)."""
    # the fused kernel updates all parameters in one pass: a third of the time of the default multi-tensor
    # Adam on CPU (9 vs 28 ms a step for this model), and the usual choice on CUDA
    optimizer = torch.optim.Adam(raw_model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                 fused=device.type in ("cpu", "cuda"))
    scheduler = make_scheduler(optimizer, config, steps_per_epoch, pace)
    autocast, scaler = amp_settings(config.amp, device)
    return optimizer, scheduler, autocast, scaler, utils.SegmentationLoss(config.loss)


def restore(checkpoint: dict | None, optimizer, scheduler, scaler, main_process: bool) -> TrainState:
    """The optimiser, scheduler, scaler and RNG states of a resumed run, and where it stood."""
    if checkpoint is None:
        return TrainState()
    optimizer.load_state_dict(checkpoint["optimizer"])
    match_parameter_layout(optimizer)
    scheduler.load_state_dict(checkpoint["scheduler"])
    if scaler is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    if main_process:  # other ranks keep their own per-rank streams
        utils.set_rng_state(checkpoint["rng"])
    loss_sum, images = checkpoint.get("epoch_loss", (0.0, 0))
    return TrainState(checkpoint["epoch"], checkpoint.get("step", 0), loss_sum, images, checkpoint["best_metric"],
                      checkpoint["best_epoch"], list(checkpoint.get("history", [])), checkpoint.get("wandb_run_id"),
                      checkpoint.get("budget_plan"), checkpoint.get("used_seconds", 0.0))


def match_parameter_layout(optimizer) -> None:
    """Give each optimizer state tensor its parameter's memory layout.

    load_state_dict keeps the strides the state was saved with, and the fused Adam kernel treats a
    parameter and its moments as flat memory: a run saved in NCHW and resumed channels-last (a CPU
    run continued on a GPU, or another --channels-last) would add each moment to the wrong weight,
    silently. Copying the state into the parameter's layout keeps every element with its weight.
    """
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def _train(config: TrainConfig, explicit: set[str], dist) -> dict:
    main_process = dist.rank == 0
    config, checkpoint, on_synthetic = prepare_run(config, explicit, dist)
    device = setup_device(config, dist)
    data = setup_data(config, checkpoint, dist, device)
    model, raw_model, model_config = setup_model(config, checkpoint, dist, device)
    steps_per_epoch = min(len(data.train_loader), config.max_steps or len(data.train_loader))
    saved = checkpoint or {}
    pace = budget.Pace(config.minutes, steps_per_epoch, config.epochs * steps_per_epoch, saved.get("budget_plan"),
                       saved.get("used_seconds", 0.0))
    optimizer, scheduler, autocast, scaler, loss_fn = setup_optimisation(config, raw_model, steps_per_epoch, device, pace)
    progress = restore(checkpoint, optimizer, scheduler, scaler, main_process)
    average = WeightAverage(raw_model, config.ema) if config.ema > 0 else None
    if average is not None and checkpoint is not None and "online_model" in checkpoint:
        average.model.load_state_dict(checkpoint["model"])
        average.updates = checkpoint.get("ema_updates", 0)
    scored_model = average.model if average is not None else raw_model  # what validation scores and best.pt holds
    norm_stats = {"mean": list(data.mean), "std": list(data.std)}

    run_dir = Path(config.out_dir) / config.name
    lock = RunLock(run_dir)
    wandb_run = None
    if main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    preemption = Preemption()
    preemption.install()
    try:
        if main_process:
            write_json(run_dir / "splits.json", {"data_dir": config.data_dir, "split_seed": config.split_seed,
                                                 "folds": config.folds, "fold": config.fold,
                                                 "description": data.description, **data.split_ids})
            write_config(run_dir, config, model_config, norm_stats, pace.plan)
            wandb_run = start_wandb(config, run_dir, progress.wandb_id)
            progress.wandb_id = wandb_run.id if wandb_run is not None else progress.wandb_id
            utils.print0(f"run folder {run_dir} | {len(data.train.ids)} train / {len(data.val.ids)} val images at "
                         f"{config.image_size}px | device {device} | {modules.count_parameters(raw_model):,} parameters"
                         + (f" | budget {config.minutes:g} min" if pace.budgeted else ""))

        def save(path: Path, epoch: int, step: int = 0, epoch_loss=(0.0, 0)) -> None:
            state = {
                "format": utils.CHECKPOINT_FORMAT, "model": scored_model.state_dict(),
                "model_config": dataclasses.asdict(model_config), "train_config": dataclasses.asdict(config),
                "image_size": config.image_size, "norm_stats": norm_stats,
                "epoch": epoch, "step": step, "epoch_loss": list(epoch_loss),
                "best_metric": progress.best_metric, "best_epoch": progress.best_epoch, "history": progress.history,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": utils.rng_state(), "wandb_run_id": progress.wandb_id, "splits": data.split_ids,
                "budget_plan": pace.plan, "used_seconds": pace.used_seconds(),
            }
            if average is not None:  # "model" is the average (what predict.py uses); training resumes from these
                state |= {"online_model": raw_model.state_dict(), "ema_updates": average.updates}
            utils.save_checkpoint(state, path)

        def epoch_end_seconds() -> float:
            """What an epoch's end costs here, timed by doing it: a validation, two checkpoints (last.pt and,
            when the score improved, best.pt) and the curves."""
            if main_process:  # once, untimed: importing matplotlib is a first-time cost, not an epoch's
                plot_curves([{"epoch": 1, "train_loss": 0.0, "val_loss": 0.0, "val_dice": 0.0, "val_jaccard": 0.0,
                              "lr": 0.0}], run_dir / "curves.png")
            started = time.perf_counter()
            evaluate(scored_model, data.val_loader, loss_fn, autocast=autocast)
            if main_process:
                probe = run_dir / ".pace-probe.pt"
                for _ in range(2):
                    save(probe, progress.epoch)
                probe.unlink()
                plot_curves(progress.history or [{"epoch": 1, "train_loss": 0.0, "val_loss": 0.0, "val_dice": 0.0,
                                                  "val_jaccard": 0.0, "lr": 0.0}], run_dir / "curves.png")
            seconds = time.perf_counter() - started
            model.train()
            return seconds

        def on_measured(global_step: int) -> None:
            """The throughput is measured: fix a --minutes plan, or say what the run will cost."""
            end_seconds = epoch_end_seconds()
            if pace.budgeted and pace.plan is None:
                plan = [pace.decide(global_step, end_seconds)]
                if dist.is_distributed:  # every rank must stop at the same step: rank 0's measurement decides
                    torch.distributed.broadcast_object_list(plan, src=0)
                    pace.plan = plan[0]
                progress.budget_plan = pace.plan
                if main_process:
                    write_config(run_dir, config, model_config, norm_stats, pace.plan)
                    utils.print0(budget_line(pace, steps_per_epoch, end_seconds))
            elif main_process and not pace.budgeted:
                warning = cost_warning(config, device, pace.estimate_seconds(end_seconds, global_step))
                if warning:
                    utils.print0(warning)

        # --- the epochs ---
        pace.restart()
        if pace.measuring and not (pace.budgeted or checkpoint is None):
            pace.step_seconds = 0.0  # a resumed run without a budget: its cost was estimated when it started
        epoch = progress.epoch
        while epoch < config.epochs and epoch * steps_per_epoch < pace.total_steps:
            epoch_started = time.perf_counter()
            result = train_one_epoch(
                model, data.train_loader, optimizer, scheduler, loss_fn, autocast=autocast, scaler=scaler,
                config=config, epoch=epoch, start_step=progress.step, loss_sum=progress.loss_sum,
                images_seen=progress.images, preemption=preemption, distributed=dist.is_distributed, device=device,
                pace=pace, on_measured=on_measured if pace.measuring else None, average=average,
                steps_per_epoch=steps_per_epoch)
            if result["stopped"]:
                if main_process:
                    save(run_dir / "last.pt", epoch, result["step"], (result["loss_sum"], result["images"]))
                    utils.print0(f"stopped by {signal.Signals(preemption.signum).name} at epoch {epoch + 1}, step "
                                 f"{result['step']}; resume with --resume auto --name {config.name}")
                raise SystemExit(128 + (preemption.signum or 0))
            progress.step, progress.loss_sum, progress.images = 0, 0.0, 0
            if dist.is_distributed:
                # Each rank updated its own batch-norm statistics; evaluate (and save) rank 0's.
                for buffer in scored_model.buffers():
                    torch.distributed.broadcast(buffer, src=0)
            # The plain model: a DDP forward is a collective, and ranks may hold unequal batch counts.
            val = evaluate(scored_model, data.val_loader, loss_fn, autocast=autocast)
            lr = optimizer.param_groups[0]["lr"]  # at the end of the epoch
            row = {"epoch": epoch + 1, "train_loss": result["loss_sum"] / max(result["images"], 1),
                   "val_loss": val["loss"], "lr": lr, "images_per_s": result["images_per_s"],
                   **{f"val_{k}": v for k, v in val.items() if k != "loss"}}
            improved = row["val_dice"] > progress.best_metric
            if improved:
                progress.best_metric, progress.best_epoch = row["val_dice"], epoch + 1
            done_steps = epoch * steps_per_epoch + result["step"]
            planned_steps = pace.total_steps if pace.plan else None  # None: the budget ran out while still timing
            finished = result["overrun"] or done_steps >= pace.total_steps or epoch + 1 >= config.epochs
            if main_process:
                row["seconds"] = round(time.perf_counter() - epoch_started, 2)
                progress.history.append(row)
                if result["overrun"]:  # the run ends here: a resumption must not go on to the old plan
                    pace.plan = {**(pace.plan or {}), "total_steps": done_steps, "planned_steps": planned_steps,
                                 "overrun": True}
                save(run_dir / "last.pt", epoch + 1)
                if improved:
                    save(run_dir / "best.pt", epoch + 1)
                utils.write_csv(run_dir / "metrics.csv", progress.history, METRIC_COLUMNS)
                plot_curves(progress.history, run_dir / "curves.png")
                limit = pace.describe(done_steps) if pace.budgeted else f"{epoch + 1:>3}/{config.epochs}"
                utils.print0(f"epoch {epoch + 1:>3}  loss {row['train_loss']:.4f}  "
                             f"val Dice {row['val_dice']:.4f}  Jaccard {row['val_jaccard']:.4f}  lr {lr:.2e}  "
                             f"{row['images_per_s']:.1f} img/s  {limit}" + ("  *best" if improved else ""))
                wandb_log(wandb_run, {k: v for k, v in row.items() if k != "epoch"} | {"epoch": epoch + 1}, epoch + 1)
            if result["overrun"]:
                utils.print0(f"the {config.minutes:g}-minute budget ran out at step {done_steps} "
                             + (f"of the {planned_steps} planned (the machine got slower than when the steps were "
                                f"timed)" if planned_steps else "before the steps could be timed (give more --minutes)")
                             + "; the run ends here with its learning rate not yet decayed")
            if not finished and preemption.requested(dist.is_distributed, device):
                utils.print0(f"stopped by a signal after epoch {epoch + 1}; resume with --resume auto --name {config.name}")
                raise SystemExit(128 + (preemption.signum or 0))
            epoch += 1
            if finished:
                break

        summary = {"run_dir": str(run_dir), "best_epoch": progress.best_epoch, "best_val_dice": progress.best_metric,
                   "epochs": len(progress.history), "data_dir": config.data_dir, "synthetic": on_synthetic,
                   "ema": config.ema, "budget": budget_summary(pace, config, progress.history, steps_per_epoch)}
        if main_process:
            finish(summary, progress, scored_model, data, config, device, autocast, wandb_run, run_dir)
        return summary
    finally:
        preemption.uninstall()
        if wandb_run is not None:
            try:
                wandb_run.finish()
            except Exception:  # a wandb failure at shutdown must not hide the run's result
                pass
        lock.release()


def write_config(run_dir: Path, config: TrainConfig, model_config, norm_stats: dict, plan: dict | None) -> None:
    write_json(run_dir / "config.json", {"train": dataclasses.asdict(config), "model": dataclasses.asdict(model_config),
                                         "norm_stats": norm_stats, "budget_plan": plan})


def budget_line(pace: budget.Pace, steps_per_epoch: int, end_seconds: float) -> str:
    plan = pace.plan
    return (f"budget {pace.minutes:g} min: {plan['step_seconds'] * 1000:.0f} ms a step and {end_seconds:.1f} s an "
            f"epoch end measured -> {plan['total_steps']} steps ({plan['total_steps'] / steps_per_epoch:.1f} epochs), "
            f"the learning-rate schedule fitted to them")


def budget_summary(pace: budget.Pace, config: TrainConfig, history: list[dict], steps_per_epoch: int) -> dict | None:
    """The budget, the time used and the steps planned against the steps done (None without --minutes)."""
    if not pace.budgeted:
        return None
    plan = pace.plan or {}
    done = min(pace.total_steps, len(history) * steps_per_epoch)
    return {"minutes": config.minutes, "used_minutes": round(pace.used_seconds() / 60, 3),  # the budget's own clock
            "planned_steps": plan.get("planned_steps", plan.get("total_steps")), "done_steps": done, "step_seconds": plan.get("step_seconds"),
            "epoch_end_seconds": plan.get("epoch_end_seconds"), "overrun": bool(plan.get("overrun"))}


# What a 2-core CPU reaches in a short budget (results/budgets.csv); printed when a CPU run will take long.
CPU_BUDGET_COMMAND = "python train.py --data-dir DATA --minutes 10 --image-size 96"
CPU_BUDGET_REACHES = "test Dice 0.89 on ISIC 2018 with 2 CPU cores"


def cost_warning(config: TrainConfig, device: torch.device, estimate_seconds: float) -> str | None:
    """A warning, printed before the run has cost much, when it will take long on this machine: over an
    hour on a CPU, or longer than the SLURM job has left (then the job requeues to finish)."""
    lines = []
    if device.type == "cpu" and estimate_seconds > 3600:
        lines.append(f"warning: this run is estimated to take {budget.format_minutes(estimate_seconds)} on this CPU "
                     f"({config.epochs} epochs at {config.image_size}px). For a short CPU budget use "
                     f"`{CPU_BUDGET_COMMAND.replace('DATA', config.data_dir)}` ({CPU_BUDGET_REACHES}); "
                     f"training goes on.")
    left = budget.slurm_seconds_left()
    if left is not None and estimate_seconds > left:
        lines.append(f"note: this run is estimated to take {budget.format_minutes(estimate_seconds)}, longer than the "
                     f"{budget.format_minutes(max(left, 0))} this SLURM job has left; it will save at the time-limit "
                     f"warning and be requeued to finish (slurm/train.sh requeues itself).")
    return "\n".join(lines) or None


def finish(summary: dict, progress: TrainState, raw_model, data: Data, config: TrainConfig, device, autocast,
           wandb_run, run_dir: Path) -> None:
    """summary.json, predictions.png (and to wandb), and where everything is."""
    best = progress.history[progress.best_epoch - 1] if 0 < progress.best_epoch <= len(progress.history) else {}
    summary["best_metrics"] = {k: v for k, v in best.items() if k.startswith("val_")}
    images, masks, predictions, ids = predict_preview(raw_model, data.val, data.mean, data.std, config.num_preview,
                                                      device, autocast)
    if len(ids):
        plot_predictions(images, masks, predictions, run_dir / "predictions.png", titles=ids)
        log_wandb_predictions(wandb_run, images, masks, predictions, ids, config.epochs)
    write_json(run_dir / "summary.json", summary)
    utils.print0(f"\nbest validation Dice {progress.best_metric:.4f} at epoch {progress.best_epoch}\n"
                 f"  checkpoints  {run_dir / 'best.pt'}, {run_dir / 'last.pt'}\n"
                 f"  metrics      {run_dir / 'metrics.csv'}, {run_dir / 'summary.json'}\n"
                 f"  figures      {run_dir / 'curves.png'}, {run_dir / 'predictions.png'}\n"
                 f"  predict with python predict.py --checkpoint {run_dir / 'best.pt'}")


def log_wandb_predictions(run, images, masks, predictions, ids, step: int) -> None:
    """Prediction images with the ground truth and the prediction as wandb mask overlays."""
    if run is None:
        return
    import wandb

    labels = {0: "background", 1: "lesion"}
    panels = [wandb.Image(image, caption=name, masks={
        "prediction": {"mask_data": prediction, "class_labels": labels},
        "ground_truth": {"mask_data": mask, "class_labels": labels}})
        for image, mask, prediction, name in zip(images, masks, predictions, ids)]
    wandb_log(run, {"predictions": panels}, step)


def main(argv=None) -> dict:
    config, explicit, parser = utils.parse_config(
        TrainConfig, argv, "Train the Improved UNet (Isensee et al. 2017) on ISIC 2018 Task 1 with a Dice loss.",
        GROUPS, CHOICES)
    problems = check_config(config)
    if problems:
        parser.error("\n  ".join(problems))
    try:
        return train(config, explicit)
    except (dataset.DataError, utils.CheckpointError, TrainingError, utils.ConfigError, RunInUseError,
            utils.DeviceError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
