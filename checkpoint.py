"""The checkpoint format, written and read in this one file: training state for resume, the model for prediction.

A checkpoint is a dict of tensors and plain values (torch.load(weights_only=True) reads it without running
code). It holds everything needed to use the model without the training flags (model config, image size,
normalisation statistics) and everything a resumed run needs to continue as an uninterrupted one (optimizer,
scheduler, scaler, every rank's RNG states, where in the epoch it stopped, the --minutes plan).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import os
import pickle
import random
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import devices
import modules
import utils

CHECKPOINT_FORMAT = "improved-unet-isic/1"
# what torch.load(weights_only=True) rebuilds without running code (exact types: a defaultdict, a namedtuple
# or an IntEnum is refused when loading); anything else is refused at save time, not when resuming
_PLAIN_TYPES = (str, bytes, int, float, complex, bool, type(None), torch.Size, torch.dtype, torch.device)
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file and what to do."""


# ----------------------------------------------------------------------------- writing


def _check_plain(value, where: str, path: Path) -> None:
    if type(value) in (dict, collections.OrderedDict):
        for key, item in value.items():
            _check_plain(key, f"{where} key {key!r}", path)
            _check_plain(item, f"{where}[{key!r}]", path)
    elif type(value) in (list, tuple, set):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]", path)
    elif not (isinstance(value, torch.Tensor) or type(value) in _PLAIN_TYPES):
        raise TypeError(
            f"checkpoint{where} holds a {type(value).__module__}.{type(value).__qualname__}, so {path} was not "
            "written; store plain python values and tensors only (str(path), float(x), array.tolist()) so that "
            "torch.load(weights_only=True) can read it"
        )


def _write_failure(err: Exception, folder: Path) -> str:
    """Why a write failed, in words. torch.save's zip writer reports a full disk as a RuntimeError
    ("unexpected pos 64 vs 0") without the errno, so the free space is asked for as well."""
    if isinstance(err, OSError) and err.errno in _DISK_FULL:
        return f"the disk is full or your quota is exceeded ({err.strerror})"
    with contextlib.suppress(OSError):
        if shutil.disk_usage(folder).free < 1 << 20:
            return "the disk is full or your quota is exceeded (under 1 MiB free)"
    if isinstance(err, OSError):
        return err.strerror or str(err)
    return " ".join(str(err).split())[:160]


def save_checkpoint(state: dict, path) -> None:
    """Write `state` to `path` atomically: a reader sees the old file or the new one, never half of one.

    torch.save goes through utils.atomic_write: a temporary file in the same folder, fsynced, then renamed
    over `path`. A failed write (a full disk, an
    exceeded quota, a lost mount, no permission) raises CheckpointError naming the path and the cause;
    the temporary file is removed and the previous checkpoint stays as it was. A process killed
    mid-write can leave a hidden `.<stem>.<pid>.tmp.pt` file behind, never a damaged `path`.
    """
    path = Path(path)
    _check_plain(state, "", path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with utils.atomic_write(path) as tmp:
            torch.save(state, tmp)
    except (OSError, RuntimeError) as err:  # RuntimeError: torch.save's own report of a failed write
        raise CheckpointError(
            f"could not write checkpoint {path}: {_write_failure(err, path.parent)}. The previous checkpoint there "
            "(if any) is unchanged; free disk space or choose another --out-dir, then resume with --resume auto"
        ) from None


def snapshot(value):
    """A copy of a checkpoint's state that later training cannot change: every tensor copied to the CPU, every
    dict and list rebuilt (the run appends to its history while the copy is written)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if type(value) in (dict, collections.OrderedDict):
        copy = type(value)((key, snapshot(item)) for key, item in value.items())
        if hasattr(value, "_metadata"):  # a state_dict's per-module versions, which load_state_dict reads
            copy._metadata = snapshot(value._metadata)
        return copy
    if type(value) in (list, tuple, set):
        return type(value)(snapshot(item) for item in value)
    return value


class BackgroundWriter:
    """Writes checkpoints on a thread of their own, so that a fast GPU's next epoch need not wait for the disk.

    save() takes a snapshot() on the calling thread (a copy to the CPU, milliseconds) and returns; the thread
    writes it with save_checkpoint, atomically as ever, to each path in turn. One write is in flight at a
    time: save() and wait() first let the previous one finish, and wait() raises its CheckpointError, if any,
    on the training thread. The thread is not a daemon, so Python finishes a write before it exits, whatever
    ended the run; a process killed during one keeps the previous checkpoint (save_checkpoint's rename)."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, state: dict, paths: list[Path]) -> None:
        self.wait()
        _check_plain(state, "", Path(paths[0]))  # refused here, on the training thread, naming the value
        job = snapshot(state)
        self._thread = threading.Thread(target=self._write, args=(job, list(paths)), name="checkpoint-writer")
        self._thread.start()

    def _write(self, state: dict, paths: list[Path]) -> None:
        try:
            for path in paths:
                save_checkpoint(state, path)
        except BaseException as err:  # raised again on the training thread by wait()
            self._error = err

    def wait(self) -> None:
        """Until the write in flight is on disk; raises the error that stopped it."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


# ----------------------------------------------------------------------------- reading


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a checkpoint written by save_checkpoint, safely (weights_only: a checkpoint cannot run code).

    Raises CheckpointError naming the file when it is missing, unreadable, truncated, not a
    PyTorch file, holds objects other than tensors and plain values, or is not a checkpoint of
    this project (state["format"] != CHECKPOINT_FORMAT).
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a checkpoint file" if path.is_dir() else "does not exist"
        raise CheckpointError(f"checkpoint {path} {what}; pass the path of a last.pt or best.pt written by train.py")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except PermissionError as err:
        raise CheckpointError(f"could not read checkpoint {path}: permission denied; check its permissions") from err
    except Exception as err:  # damaged files raise RuntimeError, EOFError, KeyError, OSError(EINVAL), ...
        if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err):
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
            raise CheckpointError(
                f"refused to load checkpoint {path}: it holds {found.group(1) if found else 'objects'} besides "
                "tensors and plain values, and loading it could run code. Use a checkpoint written by train.py; "
                "load this one only if you trust its source, with torch.load(weights_only=False)"
            ) from err
        raise CheckpointError(
            f"checkpoint {path} is truncated or not a PyTorch file ({type(err).__name__}: {str(err)[:120]}); "
            "if it was copied, copy it again, otherwise use the run's other checkpoint (last.pt or best.pt)"
        ) from err
    found = state.get("format") if isinstance(state, dict) else None
    if found != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a checkpoint of this project (format {found!r}, expected {CHECKPOINT_FORMAT!r}); "
            "pass a last.pt or best.pt written by train.py"
        )
    return state


def checkpoint_model_config(state: dict) -> dict:
    """The ModelConfig fields a checkpoint stores. Checkpoints written while the memory format was a model
    setting also hold channels_last, which the model no longer takes (devices.py chooses it)."""
    return {k: v for k, v in state["model_config"].items() if k != "channels_last"}


def model_from_checkpoint(state: dict, path) -> tuple[torch.nn.Module, int, tuple, tuple]:
    """(network with the checkpoint's weights, image size, normalisation mean, std) from a checkpoint
    that load_checkpoint returned: all that is needed to use the model, without the training flags.
    With --ema the weights are the average, the model that was validated."""
    try:
        model = modules.build_model(modules.ModelConfig(**checkpoint_model_config(state)))
        model.load_state_dict(state["model"])
        image_size = int(state["image_size"])
        mean = tuple(float(v) for v in state["norm_stats"]["mean"])
        std = tuple(float(v) for v in state["norm_stats"]["std"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        detail = " ".join(str(err).split())[:300]
        raise CheckpointError(
            f"{path} does not fit this version of the model ({type(err).__name__}: {detail}); use a checkpoint "
            f"written by this train.py, or retrain") from None
    return model, image_size, mean, std


def export_weights(state: dict, path, source: str) -> dict:
    """Write the model of a checkpoint alone, its floating-point weights in float16: what prediction needs
    (architecture, weights, image size, normalisation) and the ids of the run's splits (so that its held-out
    test images can still be scored), without the optimizer or the random states: 6.5 MB against best.pt's
    38 MB for the default network. Loading converts the weights back to float32 (load_state_dict copies
    into the network's parameters); a float16 weight is within 2^-11 (relative) of its float32 value
    (weights/README.md gives what that moved on the shipped model's test split). Returns what was written
    besides the weights."""
    weights = {k: v.half() if v.is_floating_point() else v for k, v in state["model"].items()}
    best = state.get("best_metric")
    meta = {"format": CHECKPOINT_FORMAT, "model_config": checkpoint_model_config(state),
            "image_size": int(state["image_size"]), "norm_stats": state["norm_stats"],
            "train_config": state.get("train_config") or {}, "splits": state.get("splits"),
            "exported_from": {"checkpoint": source, "epoch": state.get("epoch"),
                              "best_val_dice": None if best is None else float(best)}}
    save_checkpoint({**meta, "model": weights}, path)
    return meta


# ----------------------------------------------------------------------------- random number generators


def rng_state() -> dict:
    """States of the Python, NumPy and torch CPU generators and of the accelerators' (devices.py), as plain
    values and tensors."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(mt), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        **devices.accelerator_rng_states(),
    }


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() returned; missing entries (and an accelerator's, without it) are left alone."""
    if state.get("python") is not None:
        version, mt, gauss = state["python"]
        random.setstate((version, tuple(mt), gauss))
    if state.get("numpy") is not None:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if state.get("torch") is not None:
        torch.set_rng_state(state["torch"].cpu())
    devices.set_accelerator_rng_states(state)


def rank_rng_states(distributed: bool) -> list[dict]:
    """Every rank's rng_state(), in rank order (a collective under DDP: call it on every rank at once).

    Each rank draws its own dropout masks; a resumed multi-GPU run continues each rank's stream only if
    each one was saved."""
    own = rng_state()
    if not distributed:
        return [own]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, own)
    return gathered


# ----------------------------------------------------------------------------- training state


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


@dataclass
class CheckpointWriter:
    """What every checkpoint of one run holds; write() adds where the run stands.

    "model" is the model that validation scores (the average with --ema: what predict.py uses); with
    --ema the weights the optimizer trains go to "online_model", and a resumed run continues from them.
    """

    model: torch.nn.Module  # the plain model (no DDP or compile wrapper): keys without prefixes
    model_config: modules.ModelConfig
    train_config: dict
    norm_stats: dict  # {"mean": [3 floats], "std": [3 floats]}
    splits: dict  # train/val/test ids, so a resumed run can check its data
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: object = None
    average: object = None  # train.WeightAverage or None
    steps_per_epoch: int = 0  # the units of "step", the scheduler's count and the budget plan: they depend on
    world_size: int = 1  # the number of processes, which a resumed run may change (train.follow_world_size)
    background: BackgroundWriter = field(default_factory=BackgroundWriter)

    def state(self, progress: TrainState, *, epoch: int, step: int = 0, epoch_loss=(0.0, 0),
              rngs: list[dict] | None = None, used_seconds: float = 0.0) -> dict:
        rngs = rngs or [rng_state()]
        scored = self.average.model if self.average is not None else self.model
        state = {
            "format": CHECKPOINT_FORMAT, "model": scored.state_dict(),
            "model_config": dataclasses.asdict(self.model_config), "train_config": self.train_config,
            "image_size": self.train_config["image_size"], "norm_stats": self.norm_stats,
            "epoch": epoch, "step": step, "epoch_loss": list(epoch_loss),
            "best_metric": progress.best_metric, "best_epoch": progress.best_epoch, "history": progress.history,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rngs[0], "rng_ranks": rngs, "wandb_run_id": progress.wandb_id, "splits": self.splits,
            "budget_plan": progress.budget_plan, "used_seconds": used_seconds,
            "steps_per_epoch": self.steps_per_epoch, "world_size": self.world_size,
        }
        if self.average is not None:
            state |= {"online_model": self.model.state_dict(), "ema_updates": self.average.updates}
        return state

    def write(self, paths, progress: TrainState, **where) -> None:
        """One state to each of `paths` (last.pt, and best.pt when it improved), written in the background; call
        wait() before reading them or exiting."""
        self.background.save(self.state(progress, **where), [Path(p) for p in paths])

    def wait(self) -> None:
        self.background.wait()


def check_model_config(state: dict, model_config: modules.ModelConfig, path) -> None:
    """A resumed run must build the network its checkpoint holds."""
    saved = checkpoint_model_config(state)
    if saved != dataclasses.asdict(model_config):
        raise CheckpointError(
            f"{path}: the checkpoint's model {saved} differs from this run's {dataclasses.asdict(model_config)}; "
            "drop the conflicting flags or start a new --name")


def load_weights(state: dict, model: torch.nn.Module, average=None) -> None:
    """The trained weights into `model` (the online ones with --ema) and the average into `average`."""
    model.load_state_dict(state.get("online_model", state["model"]))  # "model" is the average with --ema
    if average is not None and "online_model" in state:
        average.model.load_state_dict(state["model"])
        average.updates = state.get("ema_updates", 0)


def restore(state: dict | None, optimizer, scheduler, scaler, rank: int = 0, world_size: int = 1) -> TrainState:
    """The optimiser, scheduler, scaler and this rank's RNG states of a resumed run, and where it stood.

    Each rank takes its own saved RNG state; a checkpoint from a run with another number of ranks (or
    from before every rank's was saved) gives rank 0 its state and leaves the others on seed + rank."""
    if state is None:
        return TrainState()
    chosen = [{key: group[key] for key in IMPLEMENTATION_KEYS if key in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    keep_implementation(optimizer, chosen)
    match_parameter_layout(optimizer)
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    ranks = state.get("rng_ranks") or []
    if len(ranks) == world_size:
        set_rng_state(ranks[rank])
    elif rank == 0:
        set_rng_state(state["rng"])
    loss_sum, images = state.get("epoch_loss", (0.0, 0))
    return TrainState(state["epoch"], state.get("step", 0), loss_sum, images, state["best_metric"],
                      state["best_epoch"], list(state.get("history", [])), state.get("wandb_run_id"),
                      state.get("budget_plan"), state.get("used_seconds", 0.0))


# How an optimizer's update runs: the hardware's choice (devices.Hardware.fused_optimizer), not a setting of the
# run. load_state_dict would bring back the saved run's, so a run started on MPS (unfused) and resumed on CUDA
# would stay unfused, and under fp16 GradScaler would then wait for the host at every step.
IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable")


def keep_implementation(optimizer, chosen: list[dict]) -> None:
    """Give each param group back the implementation it was built with, and put Adam's step counters where
    that implementation reads them: float32 on the parameter's device for the fused and capturable kernels,
    on the CPU otherwise (a counter on the GPU would be read back to the host at every step)."""
    for group, keep in zip(optimizer.param_groups, chosen):
        group.update(keep)
        on_device = bool(group.get("fused") or group.get("capturable"))
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            step = state.get("step")
            if torch.is_tensor(step):
                state["step"] = step.to(dtype=torch.float32, device=param.device) if on_device else \
                    step.to(dtype=torch.float32, device="cpu")


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
