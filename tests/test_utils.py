import os
import platform
import random

import numpy as np
import pytest
import torch

import checkpoint
import devices
import utils


def test_seed_everything_repeats_all_generators():
    def draw():
        return random.random(), np.random.rand(), torch.rand(1).item()

    utils.seed_everything(123)
    first = draw()
    utils.seed_everything(123)
    assert draw() == first
    utils.seed_everything(124)
    assert draw() != first


def test_select_device_auto_and_cpu():
    assert devices.select_device("cpu") == torch.device("cpu")
    assert devices.select_device("auto").type in {"cpu", "cuda", "mps"}


def test_select_device_unavailable_cuda_names_what_exists():
    if torch.cuda.is_available():
        pytest.skip("CUDA is present here")
    with pytest.raises(ValueError, match="CUDA is not available.*available: cpu"):
        devices.select_device("cuda")


def test_select_device_rejects_nonsense():
    with pytest.raises(ValueError, match="not a device name"):
        devices.select_device("gpu0")


def test_print0_prints_on_rank0_only(capsys, monkeypatch):
    utils.print0("hello")
    assert capsys.readouterr().out == "hello\n"
    monkeypatch.setenv("RANK", "1")
    utils.print0("hidden")
    assert capsys.readouterr().out == ""


@pytest.mark.gpu
def test_cuda_device_selected_when_present():
    assert devices.select_device("auto").type == "cuda"


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    def draw():
        return random.random(), np.random.rand(), np.random.randn(), torch.rand(3).tolist()

    utils.seed_everything(7)
    np.random.randn()  # leaves a cached Gaussian in NumPy's state
    saved = checkpoint.rng_state()
    expected = draw()
    checkpoint.save_checkpoint({"format": checkpoint.CHECKPOINT_FORMAT, "rng": saved}, tmp_path / "last.pt")
    utils.seed_everything(8)
    checkpoint.set_rng_state(checkpoint.load_checkpoint(tmp_path / "last.pt")["rng"])
    assert draw() == expected


def test_init_distributed_is_a_no_op_for_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert devices.init_distributed() == devices.DistInfo(0, 0, 1, False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert devices.init_distributed() == (0, 0, 1, False)
    assert not torch.distributed.is_initialized()
    devices.cleanup_distributed()  # nothing to leave: must not raise


def test_cleanup_distributed_meets_the_other_ranks_then_leaves(tmp_path, monkeypatch):
    """Under gloo a barrier comes first (a rank must not finalise Python while a gloo thread still
    frees its last collective's tensors); a rank that never arrives only delays the leaving."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    devices.cleanup_distributed()
    assert not torch.distributed.is_initialized()
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store2'}", rank=0, world_size=1)
    calls = []

    def absent_peer(timeout):
        calls.append(timeout.total_seconds())
        raise RuntimeError("rank 1 failed to pass monitoredBarrier")

    monkeypatch.setattr(torch.distributed, "monitored_barrier", absent_peer)
    devices.cleanup_distributed(barrier_timeout=5)
    assert calls == [5] and not torch.distributed.is_initialized()


def test_init_distributed_says_how_to_launch(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RuntimeError, match="RANK or LOCAL_RANK is missing.*torchrun"):
        devices.init_distributed()


@pytest.mark.gpu
def test_rng_state_restores_cuda_generator():
    torch.zeros(1, device="cuda")  # rng_state() skips CUDA until something has initialised it
    torch.cuda.manual_seed(1)
    saved = checkpoint.rng_state()
    assert saved["cuda"] is not None
    expected = torch.rand(3, device="cuda")
    checkpoint.set_rng_state(saved)
    assert torch.equal(torch.rand(3, device="cuda"), expected)


_STEP_FAULTS = """
import resource, sys
import torch
import devices, modules
torch.set_num_threads(1)
if sys.argv[1] == "tuned":
    assert devices.tune_glibc_malloc()
model = modules.ImprovedUNet()
opt = torch.optim.Adam(model.parameters())
x = torch.randn(2, 3, 128, 128).contiguous(memory_format=torch.channels_last)
faults = []
for _ in range(7):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    opt.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    opt.step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[3:]))  # four steps after the first three settle the heap
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="needs glibc")
def test_tuned_malloc_reuses_freed_activations_without_page_faults():
    # a training step frees and re-allocates the same large activations: with glibc's defaults they come
    # back as fresh pages that fault on first touch in every step; tuned, the freed memory is reused
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    faults = {mode: int(subprocess.run([sys.executable, "-c", _STEP_FAULTS, mode], cwd=root, check=True,
                                       capture_output=True, text=True).stdout)
              for mode in ("default", "tuned")}
    # measured over four steps: default 55,000-65,000 faults (one step alone dipped to 4,500), tuned 500-1,500
    assert faults["tuned"] < 4000, faults
    assert faults["default"] > max(10_000, 4 * faults["tuned"]), faults


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_writes_plain_lines_at_quarters_and_intervals_when_not_a_terminal():
    import io

    out, clock = io.StringIO(), FakeClock()
    bar = utils.Progress(total=100, desc="epoch 2/8", interval=30, terminal=False, stream=out, clock=clock)
    for step in range(1, 101):
        clock.now = step * 1.0  # one second per step
        if step % 10 == 0:
            bar.set_postfix(loss="0.5000", img_s="2.0")
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    # quarters at 25, 50, 75; the 30 s interval adds none between them; step 100 is left to the epoch summary
    assert [line.split("  ")[1] for line in lines] == ["step 25/100 (25%)", "step 50/100 (50%)", "step 75/100 (75%)"]
    assert lines[1] == "epoch 2/8  step 50/100 (50%)  loss 0.5000  img_s 2.0  ETA 00:00:50"


def test_progress_interval_lines_and_resumed_eta():
    import io

    out, clock = io.StringIO(), FakeClock()
    bar = utils.Progress(total=1000, initial=600, desc="e", interval=30, terminal=False, stream=out, clock=clock)
    for step in range(601, 700):
        clock.now = (step - 600) * 2.0  # two seconds per step, counted from the resumed step
        bar.update(1)
    steps = [line.split("  ")[1].split()[1] for line in out.getvalue().splitlines()]
    assert steps == ["615/1000", "630/1000", "645/1000", "660/1000", "675/1000", "690/1000"]
    assert out.getvalue().splitlines()[0].endswith("ETA 00:12:50")  # 385 steps left at 2 s


def test_progress_is_silent_when_disabled_and_tqdm_in_a_terminal(capsys):
    import io

    out = io.StringIO()
    quiet = utils.Progress(total=8, enabled=False, terminal=False, stream=out)
    for _ in range(8):
        quiet.update(1)
    assert out.getvalue() == ""
    bar = utils.Progress(total=8, desc="epoch 1/1", terminal=True)
    assert bar._bar is not None and bar._bar.total == 8
    bar.set_postfix(loss="0.1")
    bar.update(8)
    bar.close()
    assert "epoch 1/1" in capsys.readouterr().err


def test_a_python_without_sigusr1_still_installs_the_stop_handlers(monkeypatch):
    """Windows has SIGTERM but no SIGUSR1: training and prediction must start there all the same."""
    import signal

    import predict
    import train

    monkeypatch.delattr(signal, "SIGUSR1")
    assert utils.stop_signals() == [signal.SIGTERM]
    before = signal.getsignal(signal.SIGTERM)
    preemption = train.Preemption()
    preemption.install()
    assert signal.getsignal(signal.SIGTERM) == preemption._handle
    preemption.uninstall()
    with predict.stop_on_signals():
        assert signal.getsignal(signal.SIGTERM) not in (before, signal.SIG_DFL)
    assert signal.getsignal(signal.SIGTERM) == before


# --- one atomic writer ---------------------------------------------------------------------------------


def test_atomic_write_replaces_whole_or_leaves_the_old_file(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("old\n")
    with utils.atomic_write(path) as tmp:
        assert tmp.parent == path.parent and tmp.name.startswith(".metrics.") and tmp.suffix == ".csv"
        assert str(os.getpid()) in tmp.name  # two processes never share a temporary file
        tmp.write_text("new\n")
        assert path.read_text() == "old\n"  # nothing reaches path before the block ends
    assert path.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]

    with pytest.raises(ValueError, match="half way"):
        with utils.atomic_write(path) as tmp:
            tmp.write_text("half")
            raise ValueError("half way")
    assert path.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]


def test_atomic_write_names_the_file_when_the_disk_refuses(tmp_path):
    path = tmp_path / "summary.json"
    with pytest.raises(OSError) as err:
        with utils.atomic_write(path) as tmp:
            tmp.write_text("{}")
            raise OSError(28, "No space left on device")
    assert err.value.filename == str(path) and err.value.errno == 28
    assert list(tmp_path.iterdir()) == []


def test_write_csv_keeps_every_key_it_is_given(tmp_path):
    """A value logged under a new name must reach the file, not vanish (csv's extrasaction='ignore' did)."""
    rows = [{"epoch": 1, "val_dice": 0.5}, {"epoch": 2, "val_dice": 0.6, "val_failures": 3}]
    utils.write_csv(tmp_path / "m.csv", rows, ["epoch", "val_dice"])
    lines = (tmp_path / "m.csv").read_text().splitlines()
    assert lines == ["epoch,val_dice,val_failures", "1,0.5,", "2,0.6,3"]
