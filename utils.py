"""Small pieces shared by every script: seeding, devices, losses and metrics, checkpoints, DDP set-up.

The loss and metric code lives in losses.py and is re-exported here, so scripts only import utils.
Nothing in this file knows about data layouts or the network.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from losses import METRIC_NAMES, MetricAverager, SegmentationLoss, dice_loss, segmentation_metrics

__all__ = [
    "METRIC_NAMES", "MetricAverager", "SegmentationLoss", "dice_loss", "segmentation_metrics",
    "seed_everything", "select_device", "available_devices", "get_rank", "is_main_process", "print0",
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


def select_device(name: str = "auto") -> torch.device:
    """Return the device to run on: ``auto`` picks cuda > mps > cpu; otherwise the named one.

    A named device that is not available raises a ValueError that says what is available,
    rather than failing later inside the first tensor copy.
    """
    name = name.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r} is not a device name; use auto, cpu, cuda, cuda:N or mps") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name} was asked for but CUDA is not available here; {available_devices()}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device mps was asked for but MPS is not available here; {available_devices()}")
    return device


def available_devices() -> str:
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        found.append("mps")
    return "available: " + ", ".join(found)


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
