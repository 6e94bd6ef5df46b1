"""Shared test set-up: offline wandb, CPU-only defaults and the `gpu` marker's skip."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the scripts are top-level modules, not a package

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A test that changes torch's thread count must not change the float results of later tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# What a cluster user may have exported that the job scripts read (their Python environment, a run name, a
# sweep, a rendezvous, a SLURM job of their own): the SLURM tests start from an environment without them.
JOB_VARIABLES = {"PYTHON_ENV", "RUN_NAME", "SWEEP", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE", "RESUME_HOW",
                 "CONTINUES_FROM", "CUDA_VISIBLE_DEVICES", "GLOO_SOCKET_IFNAME", "VIRTUAL_ENV", "CONDA_PREFIX",
                 "CONDA_DEFAULT_ENV"}
JOB_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "PET_", "TORCHELASTIC_")


def clean_environ() -> dict[str, str]:
    """os.environ without JOB_VARIABLES and the SLURM and torchrun variables."""
    return {k: v for k, v in os.environ.items() if k not in JOB_VARIABLES and not k.startswith(JOB_PREFIXES)}


def write_isic_folder(root: Path, n: int = 16, size: int = 48, seed: int = 0) -> Path:
    """A tiny data set in the official ISIC 2018 Task 1 layout: a dark disc on lighter skin."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = root / "ISIC2018_Task1-2_Training_Input"
    masks = root / "ISIC2018_Task1_Training_GroundTruth"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        radius = rng.uniform(0.15, 0.3) * size
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
        skin = np.array([220, 180, 160]) + rng.normal(0, 10, (size, size, 3))
        image = np.where(mask[..., None], skin * 0.45, skin).clip(0, 255).astype(np.uint8)
        Image.fromarray(image).save(images / f"ISIC_{i:07d}.jpg", quality=95)
        Image.fromarray(mask.astype(np.uint8) * 255).save(masks / f"ISIC_{i:07d}_segmentation.png")
    return root


@pytest.fixture
def isic_folder(tmp_path):
    return write_isic_folder(tmp_path / "isic")
