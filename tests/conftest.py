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


def write_course_copy(root: Path, n: int = 16, n_test: int = 4, size: int = 48) -> Path:
    """The layout of UQ's course copy (/home/groups/comp3710/ISIC2018), as students reported it: the
    training folders with an _x2 suffix and licence and attribution texts among the images, and the test
    images without masks."""
    write_isic_folder(root, n=n, size=size)
    (root / "ISIC2018_Task1-2_Training_Input").rename(root / "ISIC2018_Task1-2_Training_Input_x2")
    (root / "ISIC2018_Task1_Training_GroundTruth").rename(root / "ISIC2018_Task1_Training_GroundTruth_x2")
    for name in ("LICENSE.txt", "ATTRIBUTION.txt"):
        (root / "ISIC2018_Task1-2_Training_Input_x2" / name).write_text("CC-BY-NC 4.0\n")
    test = write_isic_folder(root / ".test-source", n=n_test, size=size)
    (test / "ISIC2018_Task1-2_Training_Input").rename(root / "ISIC2018_Task1-2_Test_Input")
    for i, image in enumerate(sorted((root / "ISIC2018_Task1-2_Test_Input").iterdir())):
        image.rename(image.with_name(f"ISIC_{9000000 + i:07d}.jpg"))  # ids of their own
    import shutil
    shutil.rmtree(test)
    return root


@pytest.fixture
def read_only_view(tmp_path):
    """read_only_view(folder) -> a path that shows `folder` read-only to every process: a read-only bind
    mount where this runs as root (root writes through any permission bits), else the permission bits."""
    import stat
    import subprocess

    mounts, chmodded = [], []

    def view(folder: Path) -> Path:
        if os.geteuid() == 0:
            target = tmp_path / f"read-only-{len(mounts)}"
            target.mkdir()
            done = subprocess.run(["mount", "--bind", str(folder), str(target)], capture_output=True)
            if done.returncode == 0:
                mounts.append(target)
                if subprocess.run(["mount", "-o", "remount,ro,bind", str(target)], capture_output=True).returncode == 0:
                    return target
            pytest.skip(f"root here cannot make a read-only bind mount ({done.stderr.decode().strip()})")
        for path in [folder, *folder.rglob("*")]:
            path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
            chmodded.append(path)
        return folder

    yield view
    for target in mounts:
        subprocess.run(["umount", str(target)], capture_output=True)
    for path in chmodded:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)
