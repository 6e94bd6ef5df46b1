"""Small pieces shared by every script: seeding, devices, losses and metrics, checkpoints, DDP set-up.

The loss and metric code lives in losses.py and is re-exported here, so scripts only import utils.
Nothing in this file knows about data layouts or the network.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import ctypes
import dataclasses
import datetime
import difflib
import inspect
import json
import math
import os
import pickle
import platform
import random
import re
import sys
import tempfile
import time
from pathlib import Path
import typing
import warnings
from typing import NamedTuple

import numpy as np
import torch

import modules
from losses import METRIC_NAMES, MetricAverager, SegmentationLoss, dice_loss, segmentation_metrics

__all__ = [
    "METRIC_NAMES", "MetricAverager", "SegmentationLoss", "dice_loss", "segmentation_metrics",
    "seed_everything", "select_device", "available_devices", "usable_cpus", "tune_glibc_malloc",
    "DeviceError", "Hardware", "hardware", "amp_dtype", "check_cuda_build",
    "get_rank", "is_main_process", "print0", "Progress",
    "CHECKPOINT_FORMAT", "CheckpointError", "save_checkpoint", "load_checkpoint", "model_from_checkpoint",
    "rng_state", "set_rng_state",
    "DistInfo", "init_distributed", "cleanup_distributed",
]


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and PyTorch (all devices); optionally force deterministic kernels.

    Each distributed rank should pass ``seed + rank`` so that augmentation differs across ranks.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds CUDA and MPS generators as well
    if deterministic:
        # cuBLAS needs this workspace setting before deterministic matmuls are allowed
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


class DeviceError(RuntimeError):
    """The device cannot run this PyTorch build; the message names the device and what to install."""


def select_device(name: str = "auto") -> torch.device:
    """The device to run on, with its index: ``auto`` picks cuda > mps > cpu; otherwise the named one.

    CUDA devices always carry an index (torch.device("cuda") != torch.device("cuda:0")): the GPU of
    LOCAL_RANK under torchrun, else the current one. Under a multi-process torchrun every process
    takes the GPU of its LOCAL_RANK, whatever index was named. A named device that is not available
    raises a ValueError that says what is available, and a GPU this PyTorch build has no kernels for
    raises DeviceError, rather than failing later inside the first tensor copy.
    """
    name = name.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            return torch.device("mps")
        else:
            return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r} is not a device name; use auto, cpu, cuda, cuda:N or mps") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name} was asked for but CUDA is not available here; {available_devices()}")
        device = _cuda_device(device.index)
        check_cuda_build(device)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device mps was asked for but MPS is not available here; {available_devices()}")
    return device


def _cuda_device(index: int | None) -> torch.device:
    """cuda:N for a named or unnamed index: LOCAL_RANK's GPU under torchrun, else the current device."""
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None and (index is None or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        if index is not None and index != int(local_rank):
            warnings.warn(f"--device cuda:{index} ignored for this process: under torchrun each process uses the "
                          f"GPU of its LOCAL_RANK, here cuda:{local_rank}")  # once per process: one source line
        index = int(local_rank)
        if index >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={index} but this node has {torch.cuda.device_count()} visible GPU(s); "
                             "start at most that many processes per node (torchrun --nproc_per_node)")
    elif index is None:
        index = torch.cuda.current_device()
    elif index >= torch.cuda.device_count():
        raise ValueError(f"--device cuda:{index}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device("cuda", index)


def _arch_fits(arch: str, capability: tuple[int, int]) -> bool:
    """Whether one entry of torch.cuda.get_arch_list() runs on a GPU of this compute capability.

    sm_XY is machine code for major X, minor >= Y (sm_XYa only for exactly X.Y); compute_XY is PTX,
    which the driver compiles for any capability >= X.Y.
    """
    match = re.fullmatch(r"(sm|compute)_(\d+)(\d)([a-z]?)", arch)
    if match is None:
        return False
    kind, built = match.group(1), (int(match.group(2)), int(match.group(3)))
    if kind == "compute":
        return capability >= built
    if match.group(4) == "a":
        return capability == built
    return capability[0] == built[0] and capability[1] >= built[1]


def _build_advice(capability: tuple[int, int]) -> str:
    """What to install for a compute capability. PyTorch's CUDA 12.6 wheels are the ones with Maxwell, Pascal
    and Volta kernels (sm_50-sm_90); its CUDA 12.8 and 13.0 wheels cover sm_75-sm_120."""
    major, minor = capability
    if capability < (5, 0):
        return "no current PyTorch build has kernels for it: run on the CPU with --device cpu"
    if capability < (7, 5):
        return (f"install a PyTorch build with sm_{major}{minor} kernels, e.g. a CUDA 12.6 build: "
                "pip install torch --index-url https://download.pytorch.org/whl/cu126 (or run on the CPU with "
                "--device cpu)")
    return ("install a newer PyTorch build, e.g. pip install --upgrade torch --index-url "
            "https://download.pytorch.org/whl/cu130 (or run on the CPU with --device cpu)")


def check_cuda_build(device: torch.device) -> None:
    """Raise DeviceError unless this PyTorch build has kernels (or PTX) for the GPU `device` names.

    Without them the first kernel fails with "no kernel image is available for execution on the
    device"; this says instead which GPU, which kernels the build has, and what to install.
    """
    arch_list = torch.cuda.get_arch_list()
    if not arch_list or getattr(torch.version, "hip", None):  # no CUDA build, or ROCm (gfx90a...: not checked here)
        return
    capability = tuple(torch.cuda.get_device_capability(device))
    if any(_arch_fits(arch, capability) for arch in arch_list):
        return
    raise DeviceError(
        f"{torch.cuda.get_device_name(device)} ({device}) has compute capability {capability[0]}.{capability[1]}, "
        f"but this PyTorch {torch.__version__} has kernels only for {', '.join(arch_list)}: "
        f"{_build_advice(capability)}")


@dataclasses.dataclass(frozen=True)
class Hardware:
    """What one device can do; the single place where training and prediction settings follow the device."""

    device: torch.device  # normalised: cuda:N with its index
    name: str  # "NVIDIA A100-SXM4-80GB", "Apple MPS", "CPU"
    capability: tuple[int, int] | None  # CUDA compute capability, None off CUDA
    amp_dtype: torch.dtype | None  # what --amp auto uses: bf16 from CUDA 8.0, fp16 below, None (off) on CPU and MPS
    can_compile: bool  # torch.compile is possible and worth it: CUDA from capability 7.0 (Triton's minimum)

    def channels_last(self, norm: str, training: bool = True) -> bool:
        """The default memory format of the network's activations: NHWC (True) or NCHW.

        CUDA: NHWC (cuDNN's tensor-core kernels are NHWC). CPU: NHWC for inference and for training with
        batch norm (18-19% faster in training, benchmark.py), NCHW for training with instance norm, whose
        NHWC backward is 9-19% slower. MPS: NCHW, its best-supported layout (channels-last is not measured there).
        """
        if self.device.type == "cuda":
            return True
        if self.device.type == "cpu":
            return norm == "batch" or not training
        return False


def hardware(device: torch.device) -> Hardware:
    """The Hardware of a device that select_device returned (its CUDA build already checked)."""
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        capability = tuple(torch.cuda.get_device_capability(device))
        # cuDNN has bf16 convolutions only from Ampere (8.0); below, bf16 falls back to slow kernels
        amp = torch.bfloat16 if capability >= (8, 0) else torch.float16
        return Hardware(device, torch.cuda.get_device_name(device), capability, amp, capability >= (7, 0))
    if device.type == "mps":
        return Hardware(device, "Apple MPS", None, None, False)
    return Hardware(device, "CPU", None, None, False)


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def amp_dtype(amp: str, hw: Hardware) -> torch.dtype | None:
    """The autocast dtype for an --amp choice: "auto" takes the device's (hw.amp_dtype); bf16, fp16, off as named."""
    if amp == "auto":
        return hw.amp_dtype
    if amp not in AMP_DTYPES:
        raise ValueError(f"--amp {amp!r}: choose auto, bf16, fp16 or off")
    if amp == "bf16" and hw.capability is not None and hw.capability < (8, 0):
        warnings.warn(f"--amp bf16 on {hw.name} (compute capability {hw.capability[0]}.{hw.capability[1]}): cuDNN "
                      "has bf16 convolutions only from 8.0, so this runs slower than fp32; use --amp fp16 or auto",
                      stacklevel=2)
    return AMP_DTYPES[amp]


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # mallopt parameters from glibc's <malloc.h>
DEFAULT_MMAP_MAX = 65536  # glibc's own default for M_MMAP_MAX


def mallopt(param: int, value: int) -> bool:
    """glibc's mallopt(param, value); False where the C library is not glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(param, value))
    except (OSError, AttributeError):
        return False


def tune_glibc_malloc() -> bool:
    """Keep freed memory in the process: large blocks from the heap instead of fresh mmap pages, never trimmed.

    Every CPU training step frees and re-allocates the same activations; with glibc's defaults each large
    one comes back as new zeroed pages whose first touch faults (on a 2-core VM, 256x256 steps ran about
    10% faster tuned; no change at 64x64). The resident set then stays at its high-water mark.
    Process-wide, Linux/glibc only; returns whether it took effect.
    """
    return mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, 2**31 - 1)


def available_devices() -> str:
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        found.append("mps")
    return "available: " + ", ".join(found)


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (which SLURM, taskset and cpusets set), else
    SLURM_CPUS_PER_TASK, else every core of the machine. os.cpu_count() counts the whole node, so a job
    given 4 of 64 cores would start 64 threads."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        pass
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        return int(slurm)
    return os.cpu_count() or 1


def get_rank() -> int:
    """Global rank under torchrun (0 when not distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", 0))


def is_main_process() -> bool:
    return get_rank() == 0


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only, so a multi-GPU run prints each line once."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


class Progress:
    """A progress bar over `total` steps: tqdm when stderr (where tqdm draws) is a terminal; otherwise,
    as in a SLURM job log, a plain line on stdout at each quarter and at least every `interval` seconds,
    because tqdm's carriage-return redraws make a log file unreadable. It offers the part of tqdm's
    interface the training loop uses: n, set_postfix, update, close.
    """

    def __init__(self, total: int, initial: int = 0, desc: str = "", enabled: bool = True, interval: float = 30.0,
                 terminal: bool | None = None, stream=None, clock=time.monotonic):
        self.total, self.n, self.desc, self.interval = total, initial, desc, interval
        self.enabled, self.stream, self.clock = enabled, stream, clock
        self.postfix: dict[str, str] = {}
        self._bar = None
        if enabled and (sys.stderr.isatty() if terminal is None else terminal):
            from tqdm import tqdm
            self._bar = tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True, unit="step")
        self._initial = initial
        self._started = self._last_line = clock()
        self._quarters = [math.ceil(total * k / 4) for k in (1, 2, 3)]

    def set_postfix(self, **values) -> None:
        self.postfix = {k: str(v) for k, v in values.items()}
        if self._bar is not None:
            self._bar.set_postfix(values)

    def update(self, steps: int = 1) -> None:
        before, self.n = self.n, self.n + steps
        if self._bar is not None:
            self._bar.update(steps)
            return
        if not self.enabled or self.n >= self.total:  # the epoch's summary line follows the last step
            return
        now = self.clock()
        if any(before < mark <= self.n for mark in self._quarters) or now - self._last_line >= self.interval:
            self._last_line = now
            print(self.line(now), file=self.stream or sys.stdout, flush=True)

    def line(self, now: float) -> str:
        """'epoch 2/8  step 15/30 (50%)  loss 0.4123  img_s 3.2  ETA 0:00:04'; the rate counts only the
        steps of this process, so a resumed epoch's ETA is not thrown off by the steps done before it."""
        rate = (self.n - self._initial) / max(now - self._started, 1e-9)
        eta = time.strftime("%H:%M:%S", time.gmtime((self.total - self.n) / rate)) if rate > 0 else "?"
        parts = [self.desc, f"step {self.n}/{self.total} ({100 * self.n // max(self.total, 1)}%)",
                 *(f"{k} {v}" for k, v in self.postfix.items()), f"ETA {eta}"]
        return "  ".join(part for part in parts if part)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# --- checkpoints --------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "improved-unet-isic/1"
# what torch.load(weights_only=True) rebuilds without running code (exact types: a defaultdict, a namedtuple
# or an IntEnum is refused when loading); anything else is refused at save time, not when resuming
_PLAIN_TYPES = (str, bytes, int, float, complex, bool, type(None), torch.Size, torch.dtype, torch.device)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file and what to do."""


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


def save_checkpoint(state: dict, path) -> None:
    """Write `state` to `path` atomically: a reader sees the old file or the new one, never half of one.

    torch.save goes to a temporary file in the same folder (so os.replace is a rename on one file
    system), which is flushed and fsynced before it replaces `path`. Any OSError (a full disk, a lost
    mount, no permission) raises CheckpointError naming the path; the temporary file is removed and
    the previous checkpoint stays as it was. A process killed mid-write can leave a hidden
    `.<name>.*.tmp` file behind, never a damaged `path`.
    """
    path = Path(path)
    _check_plain(state, "", path)
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
        _fsync_dir(path.parent)  # make the rename itself durable
    except OSError as err:
        raise CheckpointError(
            f"could not write checkpoint {path}: {err.strerror or err}. The previous checkpoint there (if any) is "
            "unchanged; free disk space or choose another --out-dir, then resume"
        ) from err
    finally:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)


def _fsync_dir(folder: Path) -> None:
    """Best effort: Windows cannot open folders, and some network file systems refuse to fsync them."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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
    setting also hold channels_last, which the model no longer takes (train.py and predict.py choose it)."""
    return {k: v for k, v in state["model_config"].items() if k != "channels_last"}


def model_from_checkpoint(state: dict, path) -> tuple[torch.nn.Module, int, tuple, tuple]:
    """(network with the checkpoint's weights, image size, normalisation mean, std) from a checkpoint
    that load_checkpoint returned: all that is needed to use the model, without the training flags."""
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


def rng_state() -> dict:
    """States of the Python, NumPy, torch CPU and current CUDA generators, as plain values and tensors.

    Only the current CUDA device is saved: get_rng_state_all() would create a context on every GPU
    in every torchrun process.
    """
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {
        "python": [version, list(mt), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() returned; missing entries (and CUDA's, without a GPU) are left alone."""
    if state.get("python") is not None:
        version, mt, gauss = state["python"]
        random.setstate((version, tuple(mt), gauss))
    if state.get("numpy") is not None:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if state.get("torch") is not None:
        torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


# --- distributed --------------------------------------------------------------------------------


class DistInfo(NamedTuple):
    rank: int  # global rank, 0 .. world_size - 1
    local_rank: int  # rank within this node: the GPU index
    world_size: int  # number of processes
    is_distributed: bool  # False for a plain single-process run


DIST_TIMEOUT_MINUTES = 60  # rank 0 builds the data cache while the others wait (NCCL's own default is 10)


def dist_timeout() -> datetime.timedelta:
    """How long a collective may wait for the other ranks: DIST_TIMEOUT_MINUTES from the environment, else 60."""
    value = os.environ.get("DIST_TIMEOUT_MINUTES", str(DIST_TIMEOUT_MINUTES))
    try:
        minutes = float(value)
    except ValueError:
        minutes = -1.0
    if minutes <= 0:
        raise ValueError(f"DIST_TIMEOUT_MINUTES={value!r} is not a positive number of minutes")
    return datetime.timedelta(minutes=minutes)


def init_distributed(device: str | torch.device | None = None) -> DistInfo:
    """Join the process group that torchrun describes in RANK, LOCAL_RANK and WORLD_SIZE.

    A no-op returning DistInfo(0, 0, 1, False) when WORLD_SIZE is unset or 1. Otherwise the backend
    follows `device` (as for select_device; None means auto): NCCL for CUDA, each process on the GPU
    of its LOCAL_RANK (select_device warns when another index was named), gloo for cpu, so a CPU run
    on a GPU node uses gloo. Collectives wait up to dist_timeout(), long enough for rank 0's first
    cache build while the others wait at a barrier. Calling it again returns the same information.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(0, 0, 1, False)
    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    except (KeyError, ValueError) as err:
        raise RuntimeError(
            f"WORLD_SIZE={world_size} is set but RANK or LOCAL_RANK is missing or not a number; "
            "launch with torchrun --nproc_per_node=N train.py ..., or unset WORLD_SIZE for one process"
        ) from err
    info = DistInfo(rank, local_rank, world_size, True)
    if not torch.distributed.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed; run one process")
    if torch.distributed.is_initialized():
        return info
    chosen = select_device("auto" if device is None else str(device))
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)  # before NCCL starts, so each rank owns one GPU
        torch.distributed.init_process_group("nccl", device_id=chosen, timeout=dist_timeout())
    else:
        torch.distributed.init_process_group("gloo", timeout=dist_timeout())
    return info


def cleanup_distributed(barrier_timeout: float = 600.0) -> None:
    """Leave the process group (if any), so the process exits without NCCL warnings.

    Under gloo the ranks first meet at a barrier: a gloo worker thread may still hold the last
    collective's tensors and need the GIL to free them, and a rank that went straight on to exit
    would finalise Python under it and abort ("terminate called without an active exception", seen
    in 2-process CPU runs under SLURM). The barrier releases the GIL while it waits; its timeout
    bounds the wait when another rank failed and never arrives.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_backend() == "gloo":
        try:
            torch.distributed.monitored_barrier(timeout=datetime.timedelta(seconds=barrier_timeout))
        except RuntimeError:
            pass  # a rank that failed; leave anyway
    torch.distributed.destroy_process_group()


# Configuration: argparse generated from a dataclass, with an optional JSON/YAML file.


class ConfigError(ValueError):
    """A configuration file or flag that cannot be used; the message says which and why."""


def field_help(cls) -> dict[str, str]:
    """The one-line comment after each field of a dataclass, used as that flag's help text."""
    helps = {}
    for line in inspect.getsource(cls).splitlines():
        match = re.match(r"\s+(\w+):[^#]*#\s*(.+)$", line)
        if match:
            helps[match.group(1)] = match.group(2).strip()
    return helps


def write_csv(path, rows: list[dict], columns: list[str]) -> None:
    """Write rows as CSV atomically (a temporary file, then os.replace): a reader never sees half a table."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def field_groups(cls) -> dict[str, list[str]]:
    """Help groups of a dataclass's fields, from its own `# --- name ---` comment lines (fields in order)."""
    names = {f.name for f in dataclasses.fields(cls)}
    groups, current = {}, "options"
    for line in inspect.getsource(cls).splitlines():
        marker = re.match(r"\s+# --- (.+?) ---", line)
        if marker:
            current = marker.group(1)
            continue
        match = re.match(r"\s+(\w+):", line)
        if match and match.group(1) in names:
            groups.setdefault(current, []).append(match.group(1))
    return groups


def field_choices(cls) -> dict[str, list]:
    """The allowed values of the fields annotated with typing.Literal (or Literal | None)."""
    choices = {}
    for name, hint in typing.get_type_hints(cls).items():
        options = [h for h in typing.get_args(hint) if h is not type(None)] if typing.get_origin(hint) is not \
            typing.Literal else [hint]
        literal = [h for h in options if typing.get_origin(h) is typing.Literal]
        if literal:
            choices[name] = list(typing.get_args(literal[0]))
    return choices


def subconfig(cls, config, **overrides):
    """An instance of dataclass `cls` with the fields it shares with `config` copied over (then overrides)."""
    shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(cls) if hasattr(config, f.name)}
    return cls(**{**shared, **overrides})


def _base_type(annotation: str) -> str:
    parts = [p.strip() for p in str(annotation).split("|") if p.strip() != "None"]
    return parts[0]


def _coerce(name: str, annotation: str, value, source: str):
    """Check a value from a config file against the field's type (ints are accepted as floats)."""
    kind = _base_type(annotation)
    if value is None and "None" in str(annotation):
        return None
    if kind.startswith("Literal["):
        allowed = re.findall(r"'([^']*)'|\"([^\"]*)\"", kind)
        allowed = [a or b for a, b in allowed]
        if value not in allowed:
            raise ConfigError(f"{source}: {name} must be one of {', '.join(allowed)}, got {value!r}")
        return value
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "list[str]": isinstance(value, list) and all(isinstance(v, str) for v in value),
    }.get(kind, True)
    if not ok:
        raise ConfigError(f"{source}: {name} must be {kind}, got {value!r} ({type(value).__name__})")
    return float(value) if kind == "float" else value


def read_config_file(path: str | os.PathLike, cls) -> dict:
    """Settings from a JSON or YAML file, checked against the dataclass (unknown keys, types)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix.lower() in {".yaml", ".yml"}:
            import yaml  # only YAML configs need it (wandb depends on PyYAML anyway)

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except Exception as err:  # both parsers raise their own error types
        raise ConfigError(f"config file {path} could not be parsed: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of setting names to values")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    checked = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"config file {path}: unknown setting {key!r}{hint}")
        checked[name] = _coerce(name, fields[name].type, value, f"config file {path}")
    return checked


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults and keeps the description's own line breaks."""


def build_parser(cls, description: str, groups: dict[str, list[str]] | None = None,
                 choices: dict[str, list[str]] | None = None,
                 suppress_defaults: bool = False, metavars: dict[str, str] | None = None,
                 epilog: str | None = None, prog: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser generated from a dataclass: one --kebab-case flag per field, grouped, with
    the field's comment as help and BooleanOptionalAction for switches. Groups default to the class's
    `# --- name ---` sections and choices to its Literal annotations."""
    groups = groups or field_groups(cls)
    choices, metavars = {**field_choices(cls), **(choices or {})}, metavars or {}
    parser = argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog, formatter_class=_HelpFormatter,
        argument_default=argparse.SUPPRESS if suppress_defaults else None,
    )
    helps = field_help(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    missing = set(fields) - {name for names in groups.values() for name in names}
    assert not missing, f"fields without a help group: {missing}"
    for title, names in groups.items():
        group = parser.add_argument_group(title)
        for name in names:
            f = fields[name]
            kind = _base_type(f.type)
            flag = "--" + name.replace("_", "-")
            kwargs = {"help": helps.get(name, "").replace("%", "%%")}  # argparse %-formats help strings
            if not suppress_defaults:
                kwargs["default"] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if kind == "bool":
                kwargs["action"] = argparse.BooleanOptionalAction
            elif kind == "list[str]":
                kwargs["nargs"] = "*"
                kwargs["metavar"] = metavars.get(name, "VALUE")
            else:
                kwargs["type"] = {"int": int, "float": float}.get(kind, str)
                kwargs["metavar"] = metavars.get(name, kind.upper() if kind != "str" else name.split("_")[-1].upper())
            if name in choices:
                kwargs["choices"] = choices[name]
                kwargs.pop("metavar", None)
            group.add_argument(flag, **kwargs)
    return parser


def parse_config(cls, argv, description: str, groups=None, choices=None):
    """Two-stage parse: a --config file sets defaults, flags override them.

    Returns the config and the set of fields the user set (in the file or as flags).
    """
    parser = build_parser(cls, description, groups, choices)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    file_values = {}
    if known.config:
        try:
            file_values = read_config_file(known.config, cls)
        except ConfigError as err:
            parser.error(str(err))
        parser.set_defaults(**file_values)
    args = parser.parse_args(argv)
    given = vars(build_parser(cls, description, groups, choices, suppress_defaults=True).parse_args(argv))
    return cls(**vars(args)), set(file_values) | set(given), parser


# ----------------------------------------------------------------------------- machine


def _machine_busy_seconds() -> float | None:
    """CPU seconds all processes have used since boot (every core; steal time counts: another VM had it)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None  # not Linux
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()  # this process and its finished children
    return t.user + t.system + t.children_user + t.children_system


class OtherCpu:
    """Share of the machine's CPU time that other processes have used since this object was made: the busy
    time of all cores (/proc/stat) minus this process's own. Unlike the load average it neither lags by a
    minute nor counts the benchmark itself. share() is None where /proc/stat is missing."""

    def __init__(self):
        self.start = (time.monotonic(), _machine_busy_seconds(), _own_cpu_seconds())

    def share(self) -> float | None:
        wall, busy, own = time.monotonic(), _machine_busy_seconds(), _own_cpu_seconds()
        if busy is None or self.start[1] is None or wall <= self.start[0]:
            return None
        others = (busy - self.start[1]) - (own - self.start[2])
        return max(0.0, others) / ((wall - self.start[0]) * (os.cpu_count() or 1))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"
