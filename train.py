"""Training of the Improved UNet on ISIC 2018 Task 1 with a Dice-based loss (Dice plus cross-entropy by default).

    python train.py                                  # built-in synthetic lesions when no ISIC data
    python train.py --data-dir data/ISIC2018 --epochs 100
    torchrun --nproc_per_node=4 train.py ...          # several GPUs (DistributedDataParallel)

Everything a run produces goes to runs/<name>/: config.json, metrics.csv, summary.json, curves.png,
predictions.png, last.pt and best.pt. `--resume auto` continues a run from its last.pt.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn

import budget
import checkpoint
import dataset
import devices
import loader
import losses
import modules
import record
import synthetic
import utils

@dataclass
class TrainConfig(losses.LossConfig, loader.AugmentSettings, modules.ModelConfig, dataset.DataConfig):
    """Every setting of a training run; each field is a --kebab-case flag of train.py. The data, model,
    augmentation and loss settings are declared in the files that own them (dataset.DataConfig,
    modules.ModelConfig, loader.AugmentSettings, losses.LossConfig) and taken here as they are; this class
    adds the recipe, the optimisation, the hardware and the run."""

    # --- data ---
    synthetic_images: int = 400  # size of the built-in synthetic lesion set
    # --- recipe ---
    recipe: Literal["default", "paper"] = "default"  # "default": the settings below; "paper": Isensee et al.'s for the fields you do not set
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
    ema: float = 0.0  # decay of an exponential moving average of the weights (e.g. 0.99); the average is validated and saved as the model; 0: off
    # --- hardware ---
    sync_batchnorm: bool = False  # synchronise batch-norm statistics across GPUs under DDP
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps
    amp: devices.Amp = "auto"  # auto: bf16 on CUDA from capability 8.0 (A100, H100) and on CPUs with AVX512_BF16 or AMX, fp16 on older GPUs (P100, V100: cuDNN has no bf16 convolutions there), off (fp32) elsewhere
    channels_last: bool | None = None  # NHWC activations; default: with batch norm on CUDA (cuDNN's tensor-core kernels are NHWC) and on a CPU in fp32; NCHW with instance norm, whose kernels are NCHW (an NHWC run converts at every norm), and on MPS
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
# a few minutes on a 2-core CPU. 64 px keeps the lesions' shape; the higher lr makes up for
# the few steps that 320 training images give (the paper's 5e-4 plateaus below 0.90 Dice here), and
# the cosine decay settles it: with lr 1e-3 and the paper's decay the best epoch cleared 0.90 by 0.006
# and the last ten epochs spanned 0.887-0.906; with 2e-3 and cosine the last eight stayed within 0.903-0.909.
# These also keep the synthetic run's model and augmentation as they were measured (batch norm, dropout
# 0.3, every augmentation), since the real-data defaults above were chosen on real images.
SYNTHETIC_DEFAULTS = {"image_size": 64, "epochs": 30, "batch_size": 8, "lr": 2e-3, "schedule": "cosine",
                      "norm": "batch", "dropout": 0.3, "augment": "full", "loss": "dice", "warmup_epochs": 0.0}
# The fields above in which the synthetic run departs from the real-data recipe: the run says so, and why.
SYNTHETIC_RECIPE_FIELDS = ("norm", "dropout", "augment", "loss", "warmup_epochs")

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
    """Settings that cannot work, as messages (empty when the config is usable): the data's, the model's and
    the augmentation's from the files that own them, then the run's own."""
    problems = (dataset.check_config(config) + modules.check_config(config) + loader.check_augment(config)
                + losses.check_config(config))
    if config.image_size >= 1 and config.image_size % modules.SIZE_MULTIPLE:
        nearest = max(modules.SIZE_MULTIPLE, round(config.image_size / modules.SIZE_MULTIPLE) * modules.SIZE_MULTIPLE)
        problems.append(f"--image-size must be a multiple of {modules.SIZE_MULTIPLE} (the network halves it four "
                        f"times); try {nearest}")
    if config.deep_supervision_loss and config.arch != "improved-unet":
        problems.append("--deep-supervision-loss needs --arch improved-unet, whose outputs at 1/2 and 1/4 "
                        "resolution it weighs")
    for name in ("batch_size", "epochs", "synthetic_images"):
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
    for name in ("grad_clip", "warmup_epochs", "max_steps", "limit_samples", "num_preview"):
        if getattr(config, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must not be negative, got {getattr(config, name)}")
    return problems


def apply_recipe(config: TrainConfig, explicit: set[str]) -> tuple[TrainConfig, set[str]]:
    """The config with the recipe's settings in the fields the user did not set, and those fields."""
    overrides = {k: v for k, v in RECIPES[config.recipe].items() if k not in explicit}
    return dataclasses.replace(config, **overrides), set(overrides)


# ----------------------------------------------------------------------------- training


class TrainingError(RuntimeError):
    """Training cannot go on (for example the loss became NaN); the message says what to try."""


class RunFinished(Exception):
    """`--resume auto` found a run that has already trained to its end; the message says what to do instead."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


def check_not_finished(state: dict, merged: TrainConfig, explicit: set[str], path: Path) -> None:
    """Raise RunFinished when the checkpoint ends a run whose summary.json was written after it and the flags
    given now ask for nothing more (a larger --epochs, another --minutes): resuming would train nothing."""
    summary_path = path.parent / "summary.json"
    if state.get("step", 0) or not summary_path.is_file():
        return
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError):
        return
    if summary.get("epochs") != state["epoch"]:
        return  # last.pt is newer than the summary: the run stopped between them
    if "epochs" in explicit and merged.epochs > state["epoch"]:
        return
    if "minutes" in explicit and merged.minutes != state["train_config"].get("minutes"):
        return
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(summary_path.stat().st_mtime))
    best = summary.get("best_val_dice")
    raise RunFinished(
        f"{path.parent} already finished on {when}: {state['epoch']} epoch{'s' if state['epoch'] != 1 else ''}"
        + (f", best validation Dice {best:.4f} at epoch {summary.get('best_epoch')}" if best is not None else "")
        + "; nothing to train. Use a new --name for a new run, or a larger "
        + (f"--minutes (was {merged.minutes:g})" if merged.minutes else f"--epochs (was {merged.epochs})")
        + " to train this one further", summary)


class Preemption:
    """Turns SIGUSR1/SIGTERM (SLURM's warning before a time limit or preemption) into a flag.

    The loop finishes the current step, writes last.pt and exits, so a requeued job resumes.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def install(self) -> None:
        for sig in utils.stop_signals():
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
        only every few steps (SLURM warns minutes ahead, so a check every Hardware.check_every steps is soon enough).
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


@dataclass
class EpochTrainer:
    """What every epoch of a run trains with; train_epoch() is one pass over the loader.

    The loss is summed in float32 on the device (MPS has no float64) and read back only every
    hw.check_every steps and for the progress bar, so the step itself never waits for the GPU. While
    `pace` is measuring, `on_measured(global_step)` is called once when its timing window closes.
    """

    model: nn.Module  # what the optimizer trains (the DDP or compiled wrapper, if any)
    loader: loader.BatchLoader
    optimizer: torch.optim.Optimizer
    scheduler: object
    loss_fn: nn.Module
    autocast: object  # a factory of autocast contexts
    scaler: torch.amp.GradScaler | None
    config: TrainConfig
    preemption: Preemption
    distributed: bool
    hw: devices.Hardware
    pace: budget.Pace | None = None
    on_measured: object = None  # called with the global step once the pace has been measured
    average: WeightAverage | None = None
    steps_per_epoch: int | None = None
    # fp16 (a GradScaler): steps in a row whose loss was not finite, counted on the device. GradScaler skips such
    # a step and lowers its scale, so a passing overflow costs one step; only a streak of OVERFLOW_STREAK ends the run.
    overflow_streak: torch.Tensor | None = field(default=None, init=False, repr=False)
    overflow_steps: torch.Tensor | None = field(default=None, init=False, repr=False)

    OVERFLOW_STREAK = 10

    def __post_init__(self):
        self.reset_overflows()

    def reset_overflows(self) -> None:
        self.overflow_streak = torch.zeros((), dtype=torch.int32, device=self.hw.device)
        self.overflow_steps = torch.zeros((), dtype=torch.int32, device=self.hw.device)

    def step(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """One optimizer step on a batch; returns its loss (float32, on the device, not read back). Under fp16
        a loss that is not finite counts 0 and as an overflow (see overflow_streak)."""
        config, optimizer, scaler = self.config, self.optimizer, self.scaler
        with self.autocast():
            logits = self.model(images)  # or, under --deep-supervision-loss, the segmentation at three scales
        loss = self.loss_fn(logits, masks)  # float32 loss even under autocast
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        if config.grad_clip > 0:
            if scaler is not None:
                scaler.unscale_(optimizer)  # clip the true gradients; without clipping, scaler.step unscales
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        self.scheduler.step()
        if self.average is not None:
            self.average.update()
        loss = loss.detach()
        if scaler is None:
            return loss
        finite = torch.isfinite(loss)
        self.overflow_streak = (self.overflow_streak + 1) * ~finite
        self.overflow_steps += ~finite
        return torch.where(finite, loss, torch.zeros_like(loss))

    def steps_in(self, epoch: int, per_epoch: int) -> int:
        """Steps of this epoch: all of them, or fewer where the --minutes plan ends inside it."""
        pace = self.pace
        return per_epoch if pace is None else max(0, min(per_epoch, pace.total_steps - epoch * per_epoch))

    def train_epoch(self, epoch: int, start_step: int = 0, loss_sum: float = 0.0, images_seen: int = 0) -> dict:
        """One pass over the training loader from `start_step`; stops early on a preemption signal, at the
        end of a --minutes plan, or when a budget run has fallen too far behind it."""
        config, hw, pace, preemption, distributed = self.config, self.hw, self.pace, self.preemption, self.distributed
        self.model.train()
        loader = self.loader
        per_epoch = self.steps_per_epoch or (len(loader) if config.max_steps == 0 else min(len(loader),
                                                                                             config.max_steps))
        steps = self.steps_in(epoch, per_epoch)
        total_loss = torch.tensor(loss_sum, device=hw.device, dtype=torch.float32)
        self.reset_overflows()
        seen, check_every = images_seen, hw.check_every
        bar = utils.Progress(total=steps, initial=start_step, desc=f"epoch {epoch + 1}",
                             enabled=config.progress and utils.is_main_process())
        started, timed_images = time.perf_counter(), 0
        step = start_step
        stopped = overrun = False
        loader.set_epoch(epoch, start_batch=start_step)  # mid-epoch resume: the same batches from start_step on
        for step_index, (images, masks) in enumerate(loader, start=start_step):
            if step_index >= steps:
                break
            total_loss += self.step(images, masks) * images.shape[0]
            seen += images.shape[0]
            timed_images += images.shape[0]
            step = step_index + 1
            global_step = epoch * per_epoch + step
            if pace is not None and pace.measuring and pace.observe(global_step, epoch * per_epoch + steps,
                                                                    hw.synchronize):
                if self.on_measured is not None:
                    paused = time.perf_counter()
                    self.on_measured(global_step)
                    started += time.perf_counter() - paused  # images/s counts training steps only, not the probe
                steps = self.steps_in(epoch, per_epoch)  # the plan may end this epoch
                bar.total = steps
            checking = step % check_every == 0 or step >= steps
            signalled = overrun = False
            if checking or not distributed:  # without DDP a signal is a Python flag: read it every step
                signalled, overrun, bad = preemption.poll(distributed, hw.device, pace is not None and pace.overrun(),
                                                          self.checked_loss(total_loss) if checking else None)
                if bad:
                    what = (f"the fp16 loss overflowed in {self.OVERFLOW_STREAK} steps in a row" if self.scaler is
                            not None else f"the training loss became {total_loss.item()}")
                    raise TrainingError(
                        f"{what} at epoch {epoch + 1}, step {step} (or within the {check_every} steps before it). "
                        f"The last good checkpoint is kept. Try a lower --lr, --grad-clip 1.0, or --amp bf16/off "
                        f"instead of fp16.")
            if bar.enabled and ((step - start_step - 1) % max(10, check_every) == 0 or step >= steps):  # shown bar only
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
        if not torch.isfinite(self.checked_loss(total_loss)):
            raise TrainingError(f"the training loss became {total_loss.item()} during epoch {epoch + 1}. The last good "
                                f"checkpoint is kept. Try a lower --lr, --grad-clip 1.0, or --amp bf16/off.")
        seconds = time.perf_counter() - started
        ranks = torch.distributed.get_world_size() if distributed else 1
        skipped = int(self.overflow_steps.item())
        if skipped:
            utils.print0(f"epoch {epoch + 1}: {skipped} fp16 step(s) overflowed and were skipped by the GradScaler "
                         f"(loss scale now {self.scaler.get_scale():g})")
        return {"loss_sum": total_loss.item(), "images": seen, "step": step, "stopped": stopped, "overrun": overrun,
                "images_per_s": timed_images / max(seconds, 1e-9) * ranks, "seconds": seconds,
                "timed_steps": step - start_step, "overflow_steps": skipped}

    def checked_loss(self, total_loss: torch.Tensor) -> torch.Tensor:
        """The value whose finiteness the check reads: the loss sum, made infinite by a streak of overflows."""
        if self.scaler is None:
            return total_loss
        return total_loss + torch.where(self.overflow_streak >= self.OVERFLOW_STREAK, torch.inf, 0.0)


@torch.no_grad()
def evaluate(model, loader, loss_fn, *, autocast) -> dict:
    """Mean loss and ISIC metrics over a split (per image, then averaged across all ranks)."""
    model.eval()
    averager = losses.MetricAverager()
    for images, masks in loader:
        with autocast():
            logits = model(images)
        logits = logits.float()
        per_image = losses.segmentation_metrics(logits[:, 0] > 0, masks[:, 0] > 0.5)
        per_image["failure_share"] = losses.failures(per_image["threshold_jaccard"])
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


# ----------------------------------------------------------------------------- set-up


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
    own_recipe = [k for k in SYNTHETIC_RECIPE_FIELDS if k in overrides]
    utils.print0(f"No ISIC data at {TrainConfig.data_dir}: training on the built-in synthetic lesion set in "
                 f"{synthetic.SYNTHETIC_DIR} ({', '.join(f'{k}={v}' for k, v in overrides.items())}). "
                 + (f"Its model, augmentation and loss ({', '.join(own_recipe)}) are the ones this synthetic run "
                    "was measured with, not the real-data recipe, which was chosen on ISIC images "
                    "(docs/training.md#the-zero-argument-run). " if own_recipe else "")
                 + "For the real data run `python download.py` or pass --data-dir.")
    return config, True


INPUT_SETTINGS = ("image_size", "shades_of_gray")  # what the network's input is made of, fixed for a run's life


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
    state = checkpoint.load_checkpoint(path)
    saved = {k: v for k, v in state["train_config"].items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    merged = TrainConfig(**{**saved, **{k: getattr(config, k) for k in explicit | {"resume"}}})
    if "name" not in explicit:
        merged = dataclasses.replace(merged, name=path.parent.name, out_dir=str(path.parent.parent))
    for key in INPUT_SETTINGS:  # the network's input: changed mid-run, the weights would meet images they never saw
        if key in explicit and key in saved and saved[key] != getattr(config, key):
            flag = "--" + key.replace("_", "-")
            raise utils.ConfigError(f"{path} was trained with {flag} {saved[key]}, and a resumed run keeps its input "
                                    f"as it was; drop {flag}, or start a new run with --name")
    problems = check_config(merged)  # the flags given now, checked alone in main(), may not suit the saved ones
    if problems:
        raise utils.ConfigError(f"{path}: the saved settings with the ones given now cannot work: "
                                + "; ".join(problems))
    if config.resume == "auto":
        check_not_finished(state, merged, explicit, path)
    utils.print0(f"resuming from {path} (epoch {state['epoch'] + 1}, step {state.get('step', 0)})")
    return state, merged


def follow_world_size(state: dict | None, steps_per_epoch: int, world_size: int) -> bool:
    """Re-express a checkpoint's positions in this run's steps when it was saved with another number of
    processes (a run stopped on one GPU and resumed on four): an epoch holds a different number of steps, and
    the scheduler's count, the mid-epoch step and the --minutes plan are counted in steps. Left as they were,
    the cosine schedule would stand past its end and the rest of the run would train at learning rate 0.
    Returns whether anything changed; checkpoints that do not record their steps per epoch are taken as they are."""
    saved = (state or {}).get("steps_per_epoch")
    if not saved or saved == steps_per_epoch:
        return False
    ratio = steps_per_epoch / saved
    step = min(steps_per_epoch - 1, round(state["step"] * ratio)) if state["step"] else 0
    scheduler = state["scheduler"]
    now = state["epoch"] * steps_per_epoch + step
    scheduler["_step_count"] = scheduler.get("_step_count", scheduler["last_epoch"] + 1) - scheduler["last_epoch"] + now
    scheduler["last_epoch"], state["step"] = now, step
    plan = state.get("budget_plan")
    if plan:
        state["budget_plan"] = {**plan, **{key: max(1, round(plan[key] * ratio)) for key in ("total_steps", "planned_steps")
                                           if plan.get(key)}}
    utils.print0(f"resuming with {world_size} process(es) where the checkpoint had {state.get('world_size', '?')}: "
                 f"an epoch is {steps_per_epoch} steps instead of {saved}, so the run continues at step {now} of these"
                 + (f" (epoch {state['epoch'] + 1}, step {step})" if step else "")
                 + (f" and its plan at {state['budget_plan']['total_steps']} steps" if plan else ""))
    return True


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


def prepare_run(config: TrainConfig, explicit: set[str], dist):
    """The run's settings (resumed, recipe, synthetic fallback), its checkpoint if resuming, and the flag
    saying whether it trains on the synthetic set."""
    config = dataclasses.replace(config, name=run_name(config, dist.is_distributed))
    state, config = load_resume_checkpoint(config, explicit, Path(config.out_dir) / config.name)
    if state is None:
        config, from_recipe = apply_recipe(config, explicit)
        explicit = explicit | from_recipe  # the synthetic set's defaults do not override a recipe
    config, on_synthetic = resolve_data(config, explicit, resuming=state is not None)
    if on_synthetic and dist.rank == 0:
        synthetic.ensure_synthetic(config.synthetic_images, seed=0, log=utils.print0)
    return config, state, on_synthetic


def setup_device(config: TrainConfig, dist) -> devices.Hardware:
    try:
        device = devices.select_device(config.device)
    except ValueError as err:  # a device that is not there or not a device name: one line, not a traceback
        raise devices.DeviceError(str(err)) from None
    hw = devices.hardware(device)
    if dist.is_distributed and hw.is_cuda and device.index != dist.local_rank:
        if config.device not in ("auto", "cuda"):
            utils.print0(f"--device {config.device} under torchrun: each process uses its own GPU, cuda:LOCAL_RANK")
        hw = devices.hardware(torch.device("cuda", dist.local_rank))  # the GPU the process group bound this rank to
    devices.configure_backends(hw, config.deterministic, config.tune_malloc)
    utils.seed_everything(config.seed + dist.rank, deterministic=config.deterministic)
    return hw


def setup_data(config: TrainConfig, state: dict | None, dist, device: torch.device) -> Data:
    """Splits from the uint8 cache (built once, by rank 0; the other ranks wait and then read it)."""
    data_config = utils.subconfig(dataset.DataConfig, config)
    if dist.rank == 0:
        splits = dataset.prepare_splits(data_config, log=utils.print0)
    if dist.is_distributed:
        torch.distributed.barrier()
    if dist.rank != 0:
        splits = dataset.prepare_splits(data_config, log=lambda *a, **k: None)
    split_ids = {name: list(getattr(splits, name).ids) for name in dataset.SPLITS}
    if state is not None:
        check_same_split(state.get("splits"), split_ids, config)
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
                                       augment=loader.augmentation(config), **loader_args)
    val_loader = loader.make_loader(val_split, config.batch_size, train=False, seed=config.seed, **loader_args)
    if len(train_loader) == 0:
        raise dataset.DataError(f"{config.data_dir}: {len(train_split.ids)} training images make no full batch of "
                                f"{config.batch_size}; lower --batch-size")
    return Data(train_split, val_split, train_loader, val_loader, splits.mean, splits.std, split_ids,
                splits.description)


@dataclass
class Model:
    """The network in its three roles: what the loop calls, what the optimizer trains, what is scored and saved."""

    train: nn.Module  # wrapped for DDP or compile as asked
    raw: nn.Module  # the plain model the optimizer trains: checkpoints hold it without wrapper prefixes
    config: modules.ModelConfig
    channels_last: bool
    average: WeightAverage | None = None  # --ema: validated and saved as "model"

    @property
    def scored(self) -> nn.Module:
        return self.average.model if self.average is not None else self.raw


def setup_model(config: TrainConfig, state: dict | None, dist, hw: devices.Hardware, dtype) -> Model:
    model_config = utils.subconfig(modules.ModelConfig, config)
    model = modules.build_model(model_config)
    model.scale_outputs = config.deep_supervision_loss
    if state is not None:
        checkpoint.check_model_config(state, model_config, config.resume)
        checkpoint.load_weights(state, model)
    channels_last = config.channels_last if config.channels_last is not None else \
        hw.channels_last(config.norm, training=True, dtype=dtype)
    model.to(hw.device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    raw_model = model
    if dist.is_distributed:
        if config.sync_batchnorm and config.norm == "batch":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            raw_model = model
        model = nn.parallel.DistributedDataParallel(model, device_ids=[hw.device.index] if hw.is_cuda else None)
    refusal = hw.compile_refusal(dtype) if config.compile else None
    if refusal:
        utils.print0(f"--compile ignored on {hw.name}: {refusal}")
    elif config.compile:
        model = torch.compile(model)
    average = WeightAverage(raw_model, config.ema) if config.ema > 0 else None
    if average is not None and state is not None:
        checkpoint.load_weights(state, raw_model, average)
    return Model(model, raw_model, model_config, channels_last, average)


@dataclass
class Optimisation:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    autocast: object  # a factory of autocast contexts
    scaler: torch.amp.GradScaler | None
    loss_fn: nn.Module


def setup_optimisation(config: TrainConfig, raw_model: nn.Module, steps_per_epoch: int, hw: devices.Hardware,
                       pace: budget.Pace, dtype: torch.dtype | None) -> Optimisation:
    """Adam, the schedule, autocast and GradScaler for `dtype` (--amp, resolved once a run by _train), and the loss."""
    optimizer = torch.optim.Adam(raw_model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                 fused=hw.fused_optimizer)
    scheduler = make_scheduler(optimizer, config, steps_per_epoch, pace)
    return Optimisation(optimizer, scheduler, hw.autocast(dtype), hw.grad_scaler(dtype),
                        losses.SegmentationLoss(config.loss, bce_weight=config.bce_weight))


# ----------------------------------------------------------------------------- the run


def train(config: TrainConfig, explicit: set[str] = frozenset()) -> dict:
    """Run (or resume) training; returns the summary that is also written to summary.json."""
    dist = devices.init_distributed(config.device)  # gloo for --device cpu even on a GPU node
    try:
        return _train(config, set(explicit), dist)
    finally:
        devices.cleanup_distributed()


@dataclass
class Run:
    """One training run while it trains: what every phase below reads and updates."""

    config: TrainConfig
    dist: devices.DistInfo
    hw: devices.Hardware
    data: Data
    model: Model
    optim: Optimisation
    pace: budget.Pace
    progress: checkpoint.TrainState
    writer: checkpoint.CheckpointWriter
    record: record.RunRecord
    preemption: Preemption
    steps_per_epoch: int

    @property
    def main(self) -> bool:
        return self.dist.rank == 0

    def save(self, names: tuple[str, ...], epoch: int, step: int = 0, epoch_loss=(0.0, 0), rngs=None) -> None:
        """Start writing one checkpoint to each of `names` on rank 0 (see checkpoint.BackgroundWriter; wait()
        for it). `rngs`: every rank's RNG states, gathered by all ranks together."""
        if self.main:
            self.writer.write([self.record.dir / name for name in names], self.progress, epoch=epoch, step=step,
                              epoch_loss=epoch_loss, rngs=rngs, used_seconds=self.pace.used_seconds())

    def validate(self) -> dict:
        # the plain model: a DDP forward is a collective, and ranks may hold unequal batch counts
        return evaluate(self.model.scored, self.data.val_loader, self.optim.loss_fn, autocast=self.optim.autocast)

    def write_config(self) -> None:
        self.record.write_config(self.config, self.model.config, self.writer.norm_stats, self.pace.plan)


def _train(config: TrainConfig, explicit: set[str], dist) -> dict:
    config, state, on_synthetic = prepare_run(config, explicit, dist)
    hw = setup_device(config, dist)
    dtype = devices.amp_dtype(config.amp, hw)
    data = setup_data(config, state, dist, hw.device)
    model = setup_model(config, state, dist, hw, dtype)
    steps_per_epoch = min(len(data.train_loader), config.max_steps or len(data.train_loader))
    rescaled = follow_world_size(state, steps_per_epoch, dist.world_size)
    saved = state or {}
    pace = budget.Pace(config.minutes, steps_per_epoch, config.epochs * steps_per_epoch, saved.get("budget_plan"),
                       saved.get("used_seconds", 0.0))
    optim = setup_optimisation(config, model.raw, steps_per_epoch, hw, pace, dtype)
    progress = checkpoint.restore(state, optim.optimizer, optim.scheduler, optim.scaler, dist.rank, dist.world_size)
    if rescaled:  # the restored learning rate was the old step's: take the one of the step the run stands at now
        scheduler = optim.scheduler
        for group, base, factor in zip(optim.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optim.optimizer.param_groups]
    writer = checkpoint.CheckpointWriter(model.raw, model.config, dataclasses.asdict(config),
                                         {"mean": list(data.mean), "std": list(data.std)}, data.split_ids,
                                         optim.optimizer, optim.scheduler, optim.scaler, model.average,
                                         steps_per_epoch, dist.world_size)
    run = Run(config, dist, hw, data, model, optim, pace, progress, writer,
              record.RunRecord(Path(config.out_dir) / config.name, dist.rank == 0), Preemption(), steps_per_epoch)
    try:
        progress.wandb_id = run.record.open(config, progress.wandb_id)
        run.preemption.install()
        run.record.write_splits(config, data.description, data.split_ids)
        run.write_config()
        utils.print0(f"run folder {run.record.dir} | {len(data.train.ids)} train / {len(data.val.ids)} val images at "
                     f"{config.image_size}px | device {hw.describe(dtype, model.channels_last)} | "
                     f"{modules.count_parameters(model.raw):,} parameters"
                     + (f" | budget {config.minutes:g} min" if pace.budgeted else ""))
        train_epochs(run, resumed=state is not None)
        run.writer.wait()  # last.pt and best.pt are on disk before the summary names them
        summary = {"run_dir": str(run.record.dir), "best_epoch": progress.best_epoch,
                   "best_val_dice": progress.best_metric, "epochs": len(progress.history), "data_dir": config.data_dir,
                   "synthetic": on_synthetic, "ema": config.ema,
                   "budget": pace.summary(len(progress.history))}
        if run.main:
            best = progress.history[progress.best_epoch - 1] if 0 < progress.best_epoch <= len(progress.history) else {}
            summary["best_metrics"] = {k: v for k, v in best.items() if k.startswith("val_")}
            preview = predict_preview(model.scored, data.val, data.mean, data.std, config.num_preview, hw.device,
                                      optim.autocast)
            run.record.write_summary(summary, preview, config.epochs)
        return summary
    finally:
        try:
            run.writer.wait()  # a write still in flight when something else ended the run
        except Exception as err:  # the run's own error, if any, is the one raised; this one is printed
            print(f"error: {err}", file=sys.stderr)
        run.preemption.uninstall()
        run.record.close()


def train_epochs(run: Run, resumed: bool) -> None:
    """The epochs from where the run stands to --epochs or the end of the --minutes plan."""
    config, progress, pace = run.config, run.progress, run.pace
    pace.restart()
    if pace.measuring and not (pace.budgeted or not resumed):
        pace.step_seconds = 0.0  # a resumed run without a budget: its cost was estimated when it started
    epoch = progress.epoch
    # on_measured runs only while the pace is measuring (EpochTrainer.train_epoch asks the pace first)
    trainer = EpochTrainer(
        run.model.train, run.data.train_loader, run.optim.optimizer, run.optim.scheduler, run.optim.loss_fn,
        run.optim.autocast, run.optim.scaler, config, run.preemption, run.dist.is_distributed, run.hw, pace,
        lambda step: on_measured(run, step), run.model.average, run.steps_per_epoch)
    while epoch < config.epochs and epoch * run.steps_per_epoch < pace.total_steps:
        epoch_started = time.perf_counter()
        result = trainer.train_epoch(epoch, progress.step, progress.loss_sum, progress.images)
        if result["stopped"]:
            run.save(("last.pt",), epoch, result["step"], (result["loss_sum"], result["images"]),
                     checkpoint.rank_rng_states(run.dist.is_distributed))
            run.writer.wait()  # on disk before the job's grace period ends
            utils.print0(f"stopped by {signal.Signals(run.preemption.signum).name} at epoch {epoch + 1}, step "
                         f"{result['step']}; resume with --resume auto --name {config.name}")
            raise SystemExit(128 + (run.preemption.signum or 0))
        finished = end_epoch(run, epoch, result, time.perf_counter() - epoch_started)
        if not finished and run.preemption.requested(run.dist.is_distributed, run.hw.device):
            utils.print0(f"stopped by a signal after epoch {epoch + 1}; resume with --resume auto --name {config.name}")
            raise SystemExit(128 + (run.preemption.signum or 0))
        epoch += 1
        if finished:
            break


def end_epoch(run: Run, epoch: int, result: dict, train_seconds: float) -> bool:
    """Validate, save last.pt (and best.pt on improvement), write the record; True when the run is done."""
    config, progress, pace = run.config, run.progress, run.pace
    progress.step, progress.loss_sum, progress.images = 0, 0.0, 0
    started = time.perf_counter()
    # the last epoch's checkpoints have had this epoch to reach the disk: a failed write ends the run here
    run.writer.wait()
    if run.dist.is_distributed:
        # Each rank updated its own batch-norm statistics; evaluate (and save) rank 0's.
        for buffer in run.model.scored.buffers():
            torch.distributed.broadcast(buffer, src=0)
    val = run.validate()
    lr = run.optim.optimizer.param_groups[0]["lr"]  # at the end of the epoch
    row = {"epoch": epoch + 1, "train_loss": result["loss_sum"] / max(result["images"], 1),
           "val_loss": val["loss"], "lr": lr, "images_per_s": result["images_per_s"],
           **{f"val_{k}": v for k, v in val.items() if k != "loss"}}
    improved = row["val_dice"] > progress.best_metric
    if improved:
        progress.best_metric, progress.best_epoch = row["val_dice"], epoch + 1
    done_steps = epoch * run.steps_per_epoch + result["step"]
    if not result["overrun"]:
        replan(run, done_steps, result)
    planned_steps = pace.total_steps if pace.plan else None  # None: the budget ran out while still timing
    finished = result["overrun"] or done_steps >= pace.total_steps or epoch + 1 >= config.epochs
    if result["overrun"]:  # the run ends here: a resumption must not go on to the old plan
        pace.plan = {**(pace.plan or {}), "total_steps": done_steps, "planned_steps": planned_steps, "overrun": True}
        progress.budget_plan = pace.plan
    rngs = checkpoint.rank_rng_states(run.dist.is_distributed)  # every rank's, gathered together
    if run.main:
        row["seconds"] = round(train_seconds + time.perf_counter() - started, 2)
        progress.history.append(row)
        run.record.write_epoch(progress.history)  # before the checkpoints: their thread may fill a small disk
        # best.pt first: were last.pt renamed and best.pt not (a kill, a full disk), the resumed run would hold
        # this epoch's score as its best and never rewrite best.pt
        run.save(("best.pt", "last.pt") if improved else ("last.pt",), epoch + 1, rngs=rngs)
        limit = pace.describe(done_steps) if pace.budgeted else f"{epoch + 1:>3}/{config.epochs}"
        utils.print0(f"epoch {epoch + 1:>3}  loss {row['train_loss']:.4f}  "
                     f"val Dice {row['val_dice']:.4f}  Jaccard {row['val_jaccard']:.4f}  lr {lr:.2e}  "
                     f"{row['images_per_s']:.1f} img/s  {limit}" + ("  *best" if improved else ""))
    pace.end_seconds = time.perf_counter() - started  # what this epoch's end cost: the next re-fit's figure
    if result["overrun"]:
        utils.print0(f"the {config.minutes:g}-minute budget ran out at step {done_steps} "
                     + (f"of the {planned_steps} planned (the machine got slower than when the steps were "
                        f"timed)" if planned_steps else "before the steps could be timed (give more --minutes)")
                     + "; the run ends here with its learning rate not yet decayed")
    return finished


def replan(run: Run, done_steps: int, result: dict) -> None:
    """Re-fit a --minutes plan to the pace of the last epochs (see budget.Pace.replan). Rank 0's measurement
    decides for every rank, which must all stop at the same step."""
    pace = run.pace
    if not (pace.budgeted and pace.plan):
        return
    before = pace.total_steps
    step_seconds = pace.measured_pace(done_steps, result["timed_steps"], result["seconds"])
    changed = step_seconds is not None and pace.replan(done_steps, step_seconds,
                                                       pace.end_seconds or pace.plan.get("epoch_end_seconds", 0.0))
    if run.dist.is_distributed:  # every rank takes part, whatever its own measurement said
        plan = [pace.plan]
        torch.distributed.broadcast_object_list(plan, src=0)
        changed, pace.plan = plan[0]["total_steps"] != before, plan[0]
    if changed:
        run.progress.budget_plan = pace.plan
        if run.main:
            run.write_config()
            utils.print0(pace.replan_line())


def epoch_end_seconds(run: Run) -> float:
    """What an epoch's end costs the training thread here, timed by doing it: a validation, a checkpoint's copy
    for the writer thread (the write itself goes on beside the next epoch) and the curves."""
    probe_history = run.progress.history or record.EMPTY_HISTORY
    if run.main:  # once, untimed: importing matplotlib is a first-time cost, not an epoch's
        record.plot_curves(record.EMPTY_HISTORY, run.record.dir / "curves.png")
    started = time.perf_counter()
    run.validate()
    if run.main:
        checkpoint.snapshot(run.writer.state(run.progress, epoch=run.progress.epoch))
        record.plot_curves(probe_history, run.record.dir / "curves.png")
    seconds = time.perf_counter() - started
    run.model.train.train()
    return seconds


def on_measured(run: Run, global_step: int) -> None:
    """The throughput is measured: fix a --minutes plan, or say what the run will cost."""
    pace = run.pace
    end_seconds = epoch_end_seconds(run)
    if pace.budgeted and pace.plan is None:
        plan = [pace.decide(global_step, end_seconds)]
        if run.dist.is_distributed:  # every rank must stop at the same step: rank 0's measurement decides
            torch.distributed.broadcast_object_list(plan, src=0)
            pace.plan = plan[0]
        run.progress.budget_plan = pace.plan
        if run.main:
            run.write_config()
            utils.print0(pace.line(end_seconds))
    elif run.main and not pace.budgeted:
        warning = budget.cost_warning(pace.estimate_seconds(end_seconds, global_step), run.hw.is_cpu,
                                      run.config.epochs, run.config.image_size, run.config.data_dir)
        if warning:
            utils.print0(warning)


def main(argv=None) -> dict:
    config, explicit, parser = utils.parse_config(
        TrainConfig, argv, "Train the Improved UNet (Isensee et al. 2017) on ISIC 2018 Task 1 with a Dice-based loss "
        "(Dice plus cross-entropy by default; --loss dice for the paper's Dice alone).",
        GROUPS, CHOICES)
    problems = check_config(config)
    if problems:
        parser.error("\n  ".join(problems))
    try:
        return train(config, explicit)
    except RunFinished as done:
        utils.print0(str(done))
        return done.summary
    except (dataset.DataError, checkpoint.CheckpointError, TrainingError, utils.ConfigError, record.RunInUseError,
            devices.DeviceError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
        if not devices.out_of_memory(err):
            raise
        print(f"error: the {config.device} device ran out of memory training {config.batch_size} images of "
              f"{config.image_size}px a step ({str(err).splitlines()[0][:160]}). Lower --batch-size or --image-size "
              f"(another job may share the GPU); the checkpoints written so far are kept, and --resume auto --name "
              f"{config.name or '<run name>'} continues from last.pt", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as err:  # a record file (metrics.csv, curves.png, ...) could not be written: a full disk
        where = f"{err.filename}: " if err.filename else ""
        cause = "the disk is full or your quota is exceeded" if err.errno in (errno.ENOSPC, errno.EDQUOT) else \
            err.strerror or str(err)
        print(f"error: could not write {where}{cause}. The checkpoints written so far are kept; free disk space or "
              f"choose another --out-dir, then resume with --resume auto", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
