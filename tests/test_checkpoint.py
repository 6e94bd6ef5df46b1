"""Checkpoints: atomic saves that survive a full disk and SIGKILL, and safe, clearly failing loads."""

import dataclasses
import errno
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import utils

ROOT = Path(__file__).resolve().parents[1]


def make_state(tag: int = 0) -> dict:
    """A checkpoint shaped like train.py's, with real optimizer, scheduler and scaler states."""
    torch.manual_seed(tag)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4, weight_decay=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.985**epoch)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    scheduler.step()
    return {
        "format": utils.CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "model_config": {"in_channels": 3, "num_classes": 1, "base_channels": 4, "norm": "batch"},
        "train_config": {"lr": 5e-4, "wandb_tags": ["a"], "name": None},
        "image_size": 32,
        "norm_stats": {"mean": [0.7, 0.5, 0.4], "std": [0.1, 0.1, 0.1]},
        "epoch": tag + 1,
        "best_metric": 0.5,
        "best_epoch": tag,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(),
        "rng": utils.rng_state(),
        "wandb_run_id": None,
    }


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_round_trip_with_weights_only(tmp_path):
    state = make_state(3)
    path = tmp_path / "run" / "last.pt"  # the folder is created
    utils.save_checkpoint(state, path)
    loaded = utils.load_checkpoint(path)
    assert_same(state, loaded)
    assert torch.load(path, weights_only=True)["epoch"] == 4  # loads with plain torch too
    assert os.listdir(path.parent) == ["last.pt"]  # no temporary file left


def test_overwrite_replaces_previous(tmp_path):
    path = tmp_path / "last.pt"
    utils.save_checkpoint(make_state(0), path)
    utils.save_checkpoint(make_state(1), path)
    assert utils.load_checkpoint(path)["epoch"] == 2
    assert os.listdir(tmp_path) == ["last.pt"]


@pytest.mark.parametrize("failing", ["torch.save", "os.fsync", "os.replace"])
def test_full_disk_keeps_previous_checkpoint(tmp_path, monkeypatch, failing):
    path = tmp_path / "last.pt"
    utils.save_checkpoint(make_state(0), path)
    new_state = make_state(1)

    def no_space(*args, **kwargs):
        if failing == "torch.save":
            args[1].write(b"PK\x03\x04 partial")  # a write that got partway, like a real full disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    module, name = failing.split(".")
    monkeypatch.setattr({"torch": torch, "os": os}[module], name, no_space)
    with pytest.raises(utils.CheckpointError, match=f"{path}.*No space left on device.*free disk space"):
        utils.save_checkpoint(new_state, path)
    monkeypatch.undo()
    assert utils.load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]


def test_save_refuses_values_weights_only_cannot_load(tmp_path):
    import numpy as np

    state = make_state(0)
    state["train_config"]["data_dir"] = tmp_path  # a Path, not a str
    with pytest.raises(TypeError, match=r"\['train_config'\]\['data_dir'\] holds a pathlib.*str\(path\)"):
        utils.save_checkpoint(state, tmp_path / "last.pt")
    state["train_config"]["data_dir"] = str(tmp_path)
    state["best_metric"] = np.float64(0.5)
    with pytest.raises(TypeError, match=r"\['best_metric'\] holds a numpy.float64"):
        utils.save_checkpoint(state, tmp_path / "last.pt")
    assert os.listdir(tmp_path) == []


def write_bad(kind: str, path: Path) -> Path:
    if kind == "missing":
        return path
    if kind == "folder":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        utils.save_checkpoint(make_state(0), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "text":
        path.write_text("epoch,loss\n1,0.5\n")
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "no-format":
        torch.save({"model": {}, "epoch": 1}, path)
    elif kind == "other-format":
        torch.save({"format": "improved-unet-isic/0", "model": {}}, path)
    return path


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", "does not exist"),
        ("folder", "is a folder"),
        ("empty", "truncated or not a PyTorch file"),
        ("truncated", "truncated or not a PyTorch file"),
        ("text", "truncated or not a PyTorch file"),
        ("tensor", "not a checkpoint of this project \\(format None"),
        ("no-format", "not a checkpoint of this project \\(format None"),
        ("other-format", "not a checkpoint of this project \\(format 'improved-unet-isic/0'"),
    ],
)
def test_load_bad_files_name_the_file(tmp_path, kind, message):
    path = write_bad(kind, tmp_path / "last.pt")
    with pytest.raises(utils.CheckpointError, match=message) as caught:
        utils.load_checkpoint(path)
    assert str(path) in str(caught.value)


class CreatesFile:
    """Unpickling this calls open(target, "w"): a stand-in for any code a crafted file could run."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.parametrize("container", ["torch.save", "pickle"])
def test_malicious_checkpoint_runs_no_code(tmp_path, container):
    target = tmp_path / "created_by_unpickling"
    path = tmp_path / "evil.pt"
    payload = {"format": utils.CHECKPOINT_FORMAT, "model": CreatesFile(target)}
    if container == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)  # torch's own protocol
    with pytest.raises(utils.CheckpointError, match=f"refused to load checkpoint {path}.*could run code"):
        utils.load_checkpoint(path)
    assert not target.exists()
    # the file really is dangerous: an unsafe load runs the code
    if container == "torch.save":
        torch.load(path, weights_only=False)["model"].close()
        assert target.exists()


WRITER = textwrap.dedent(
    """
    import sys, torch, utils
    path = sys.argv[1]
    weights = torch.empty(2_000_000)  # 8 MB, so the kill is likely to land inside a write
    version = 1
    while True:
        weights.fill_(version)
        utils.save_checkpoint({"format": utils.CHECKPOINT_FORMAT, "version": version, "model": {"w": weights}}, path)
        print(version, flush=True)
        version += 1
    """
)


def partial_file(folder: Path, full_size: int) -> bool:
    """True while some file in `folder` is part-written (the checkpoint or a temporary file)."""
    for entry in os.scandir(folder):
        try:
            if 0 < entry.stat().st_size < 0.9 * full_size:
                return True
        except FileNotFoundError:  # renamed away between listing and stat
            pass
    return False


@pytest.mark.slow
def test_sigkill_while_writing_leaves_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "last.pt"
    first = {"format": utils.CHECKPOINT_FORMAT, "version": 0, "model": {"w": torch.zeros(2_000_000)}}
    utils.save_checkpoint(first, path)
    full_size = path.stat().st_size
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert writer.stdout.readline(), "the checkpoint writer stopped early"
        # kill it at the dangerous moment: while a file is half written (or after 20 s regardless)
        deadline = time.monotonic() + 20
        while not partial_file(tmp_path, full_size) and time.monotonic() < deadline:
            pass
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert writer.returncode == -signal.SIGKILL
    state = utils.load_checkpoint(path)
    assert state["version"] >= 1
    assert torch.all(state["model"]["w"] == state["version"])  # one whole checkpoint, not a mixture


def test_checkpoint_from_when_the_memory_format_was_a_model_setting_still_loads():
    import modules

    model = modules.ImprovedUNet(modules.ModelConfig(base_channels=4, dropout=0.0))
    state = {"model": model.state_dict(), "image_size": 32, "norm_stats": {"mean": [0.5] * 3, "std": [0.2] * 3},
             "model_config": {**dataclasses.asdict(model.config), "channels_last": True}}  # as such runs stored it
    rebuilt, size, _, _ = utils.model_from_checkpoint(state, "old.pt")
    x = torch.randn(1, 3, 32, 32)
    model.eval(), rebuilt.eval()
    with torch.no_grad():
        assert size == 32 and torch.equal(rebuilt(x), model(x))
