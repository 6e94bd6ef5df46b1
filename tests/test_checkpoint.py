"""Checkpoints: atomic saves that survive a full disk and SIGKILL, and safe, clearly failing loads."""

import copy
import dataclasses
import errno
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import checkpoint

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
        "format": checkpoint.CHECKPOINT_FORMAT,
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
        "rng": checkpoint.rng_state(),
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
    checkpoint.save_checkpoint(state, path)
    loaded = checkpoint.load_checkpoint(path)
    assert_same(state, loaded)
    assert torch.load(path, weights_only=True)["epoch"] == 4  # loads with plain torch too
    assert os.listdir(path.parent) == ["last.pt"]  # no temporary file left


def test_overwrite_replaces_previous(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save_checkpoint(make_state(0), path)
    checkpoint.save_checkpoint(make_state(1), path)
    assert checkpoint.load_checkpoint(path)["epoch"] == 2
    assert os.listdir(tmp_path) == ["last.pt"]


@pytest.mark.parametrize("failing", ["torch.save", "os.fsync", "os.replace"])
def test_full_disk_keeps_previous_checkpoint(tmp_path, monkeypatch, failing):
    path = tmp_path / "last.pt"
    checkpoint.save_checkpoint(make_state(0), path)
    new_state = make_state(1)

    def no_space(*args, **kwargs):
        if failing == "torch.save":
            Path(args[1]).write_bytes(b"PK\x03\x04 partial")  # a write that got partway, like a real full disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    module, name = failing.split(".")
    monkeypatch.setattr({"torch": torch, "os": os}[module], name, no_space)
    with pytest.raises(checkpoint.CheckpointError, match=f"{path}.*No space left on device.*free disk space"):
        checkpoint.save_checkpoint(new_state, path)
    monkeypatch.undo()
    assert checkpoint.load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]


def test_save_refuses_values_weights_only_cannot_load(tmp_path):
    import numpy as np

    state = make_state(0)
    state["train_config"]["data_dir"] = tmp_path  # a Path, not a str
    with pytest.raises(TypeError, match=r"\['train_config'\]\['data_dir'\] holds a pathlib.*str\(path\)"):
        checkpoint.save_checkpoint(state, tmp_path / "last.pt")
    state["train_config"]["data_dir"] = str(tmp_path)
    state["best_metric"] = np.float64(0.5)
    with pytest.raises(TypeError, match=r"\['best_metric'\] holds a numpy.float64"):
        checkpoint.save_checkpoint(state, tmp_path / "last.pt")
    assert os.listdir(tmp_path) == []


def test_a_background_write_holds_the_state_as_it_was_when_saved(tmp_path, monkeypatch):
    """Training goes on while the writer thread writes: weights updated in place and a history appended to after
    save() must not reach the file. The write is held back until both have changed."""
    state = make_state(0) | {"history": [{"epoch": 1}]}
    expected = {key: value.clone() for key, value in state["model"].items()}
    release, real = threading.Event(), checkpoint.save_checkpoint

    def held(state, path):
        release.wait(timeout=30)
        real(state, path)

    monkeypatch.setattr(checkpoint, "save_checkpoint", held)
    writer = checkpoint.BackgroundWriter()
    writer.save(state, [tmp_path / "last.pt", tmp_path / "best.pt"])
    for value in state["model"].values():
        value.add_(1)  # the next training step
    state["history"].append({"epoch": 99})
    release.set()
    writer.wait()
    for name in ("last.pt", "best.pt"):
        saved = checkpoint.load_checkpoint(tmp_path / name)
        assert all(torch.equal(saved["model"][key], value) for key, value in expected.items()), name
        assert saved["model"]._metadata == state["model"]._metadata  # the modules' versions, for load_state_dict
        assert {"epoch": 99} not in saved["history"]
    state["train_config"]["data_dir"] = tmp_path  # refused on the calling thread, before anything is written
    with pytest.raises(TypeError, match=r"holds a pathlib"):
        writer.save(state, [tmp_path / "next.pt"])
    assert not (tmp_path / "next.pt").exists()


def write_bad(kind: str, path: Path) -> Path:
    if kind == "missing":
        return path
    if kind == "folder":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        checkpoint.save_checkpoint(make_state(0), path)
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
    with pytest.raises(checkpoint.CheckpointError, match=message) as caught:
        checkpoint.load_checkpoint(path)
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
    payload = {"format": checkpoint.CHECKPOINT_FORMAT, "model": CreatesFile(target)}
    if container == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)  # torch's own protocol
    with pytest.raises(checkpoint.CheckpointError, match=f"refused to load checkpoint {path}.*could run code"):
        checkpoint.load_checkpoint(path)
    assert not target.exists()
    # the file really is dangerous: an unsafe load runs the code
    if container == "torch.save":
        torch.load(path, weights_only=False)["model"].close()
        assert target.exists()


WRITER = textwrap.dedent(
    """
    import sys, torch, checkpoint
    path = sys.argv[1]
    weights = torch.empty(2_000_000)  # 8 MB, so the kill is likely to land inside a write
    version = 1
    while True:
        weights.fill_(version)
        checkpoint.save_checkpoint({"format": checkpoint.CHECKPOINT_FORMAT, "version": version, "model": {"w": weights}}, path)
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
    first = {"format": checkpoint.CHECKPOINT_FORMAT, "version": 0, "model": {"w": torch.zeros(2_000_000)}}
    checkpoint.save_checkpoint(first, path)
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
    state = checkpoint.load_checkpoint(path)
    assert state["version"] >= 1
    assert torch.all(state["model"]["w"] == state["version"])  # one whole checkpoint, not a mixture


def test_checkpoint_from_when_the_memory_format_was_a_model_setting_still_loads():
    import modules

    model = modules.ImprovedUNet(modules.ModelConfig(base_channels=4, dropout=0.0))
    state = {"model": model.state_dict(), "image_size": 32, "norm_stats": {"mean": [0.5] * 3, "std": [0.2] * 3},
             "model_config": {**dataclasses.asdict(model.config), "channels_last": True}}  # as such runs stored it
    rebuilt, size, _, _ = checkpoint.model_from_checkpoint(state, "old.pt")
    x = torch.randn(1, 3, 32, 32)
    model.eval(), rebuilt.eval()
    with torch.no_grad():
        assert size == 32 and torch.equal(rebuilt(x), model(x))


@pytest.fixture
def small_disk(tmp_path):
    """A real 64 MiB file system (tmpfs), so that a full disk fails as it does on a cluster's home folder; root only."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or 'not root'})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path, leave: int = 0) -> None:
    """Fill the file system, then free `leave` bytes again."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        with pytest.raises(OSError) as full:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
    assert full.value.errno == errno.ENOSPC
    os.truncate(filler, max(0, filler.stat().st_size - leave))


def test_a_real_full_disk_ends_training_in_one_line_and_keeps_last_pt(small_disk, isic_folder, capsys):
    """torch.save reports a full disk as RuntimeError('unexpected pos ...'); the run still ends with one line that
    names the file and the cause, and the last good checkpoint stays loadable."""
    from test_train import tiny_args
    import train

    runs = small_disk / "runs"
    train.main(tiny_args(isic_folder, runs, "--epochs", "1", "--name", "full"))
    fill(small_disk, leave=256 << 10)  # room for the lock and config.json, not for a checkpoint
    capsys.readouterr()
    with pytest.raises(SystemExit) as ended:
        train.main(tiny_args(isic_folder, runs, "--epochs", "3", "--name", "full", "--resume", "auto"))
    err = capsys.readouterr().err.strip()
    assert ended.value.code == 1 and len(err.splitlines()) == 1, err
    # best.pt goes first when validation improved (so last.pt never claims a best that best.pt lacks)
    assert err.startswith((f"error: could not write checkpoint {runs / 'full' / 'last.pt'}",
                           f"error: could not write checkpoint {runs / 'full' / 'best.pt'}")) and "disk is full" in err
    assert "Traceback" not in err and "unexpected pos" not in err
    assert checkpoint.load_checkpoint(runs / "full" / "last.pt")["epoch"] == 1
    assert not [p for p in (runs / "full").iterdir() if p.name.endswith(".tmp")]
    fill(small_disk, leave=0)  # full to the last byte: the lock is the first write, and it says so too
    with pytest.raises(SystemExit):
        train.main(tiny_args(isic_folder, runs, "--epochs", "3", "--name", "full", "--resume", "auto"))
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: could not write {runs / 'full' / '.lock'}: the disk is full"), err
    assert not (runs / "full" / ".lock").exists() and checkpoint.load_checkpoint(runs / "full" / "last.pt")["epoch"] == 1


def test_each_rank_resumes_its_own_random_stream():
    """A resumed 2-rank run: rank 1 continues rank 1's saved stream, not a restart from seed + rank."""
    model = nn.Linear(2, 2)
    optimizer = torch.optim.Adam(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    states, following = [], []
    for seed in (10, 11):  # each rank's stream, three draws in
        torch.manual_seed(seed)
        torch.rand(3)
        states.append(checkpoint.rng_state())
        following.append(torch.rand(4))  # what that rank draws next
    saved = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": states[0],
             "rng_ranks": states, "epoch": 1, "best_metric": 0.5, "best_epoch": 1}
    for rank in (1, 0):
        torch.manual_seed(0)
        checkpoint.restore(saved, optimizer, scheduler, None, rank=rank, world_size=2)
        assert torch.equal(torch.rand(4), following[rank])
    # saved by a run with another number of ranks: rank 1 keeps the stream it was seeded with
    torch.manual_seed(99)
    checkpoint.restore(saved, optimizer, scheduler, None, rank=1, world_size=3)
    drawn = torch.rand(4)
    torch.manual_seed(99)
    assert torch.equal(drawn, torch.rand(4))


@pytest.mark.parametrize("saved_fused, resumed_fused", [(False, True), (True, False)])
def test_a_resumed_optimizer_keeps_the_implementation_of_the_machine_it_resumes_on(saved_fused, resumed_fused):
    """Started where Adam is not fused (MPS) and resumed where it is (CUDA), or the other way round: the run
    takes this machine's choice, its step counters follow, and the update is the same either way."""
    def build(fused):
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        return model, torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused)

    model, optimizer = build(saved_fused)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.ones(2, 4)).sum().backward()
        optimizer.step()
    saved = {"optimizer": copy.deepcopy(optimizer.state_dict()), "scheduler": {}, "epoch": 1, "best_metric": 0.0, "best_epoch": 1,
             "rng": checkpoint.rng_state()}
    resumed_model, resumed = build(resumed_fused)
    resumed_model.load_state_dict(model.state_dict())
    scheduler = torch.optim.lr_scheduler.LambdaLR(resumed, lambda step: 1.0)
    checkpoint.restore({**saved, "scheduler": scheduler.state_dict()}, resumed, scheduler, None)
    assert all(group["fused"] is resumed_fused for group in resumed.param_groups)
    for optim, net in ((optimizer, model), (resumed, resumed_model)):
        optim.zero_grad()
        net(torch.ones(2, 4)).sum().backward()
        optim.step()
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert [state["step"].item() for state in resumed.state.values()] == [4.0, 4.0]
