"""train.py end to end on tiny generated data: files written, resume, preemption, bad settings."""

import contextlib
import csv
import dataclasses
import inspect
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoint
import dataset
import devices
import loader
import losses
import modules
import predict
import record
import train
import utils

ROOT = Path(__file__).resolve().parents[1]


def tiny_args(data_dir, out_dir, *extra):
    return ["--data-dir", str(data_dir), "--out-dir", str(out_dir), "--image-size", "32", "--base-channels", "4",
            "--batch-size", "4", "--device", "cpu", "--wandb", "disabled", "--no-progress", "--num-preview", "2",
            "--val-fraction", "0.25", "--test-fraction", "0.125", *extra]


def weights(path):
    return checkpoint.load_checkpoint(path)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6, rtol=0), key


def test_help_lists_grouped_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for heading in ("data:", "recipe:", "model:", "optimisation:", "augmentation:", "hardware:", "run:", "wandb:",
                    "debugging:"):
        assert heading in out
    assert "--resume RESUME" in out and "--no-progress" in out


def test_tiny_run_writes_the_run_folder(isic_folder, tmp_path, capsys):
    summary = train.main(tiny_args(isic_folder, tmp_path / "runs", "--epochs", "2", "--name", "tiny"))
    run = tmp_path / "runs" / "tiny"
    for name in ("config.json", "metrics.csv", "summary.json", "curves.png", "predictions.png", "best.pt", "last.pt"):
        assert (run / name).is_file(), name
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for column in ("train_loss", "val_dice", "val_jaccard", "lr", "seconds"):
        assert all(0 <= float(r[column]) < 1e6 for r in rows), column
    assert float(rows[0]["lr"]) > float(rows[1]["lr"]) >= 0  # cosine decay to zero by the last step
    saved = json.loads((run / "summary.json").read_text())
    assert saved["best_epoch"] == summary["best_epoch"] in (1, 2)
    assert saved["best_val_dice"] == pytest.approx(max(float(r["val_dice"]) for r in rows))
    state = checkpoint.load_checkpoint(run / "last.pt")
    assert state["epoch"] == 2 and state["image_size"] == 32
    assert state["model_config"]["base_channels"] == 4
    assert len(state["norm_stats"]["mean"]) == 3
    assert state["train_config"]["data_dir"] == str(isic_folder)
    out = capsys.readouterr().out
    assert "best validation Dice" in out and str(run / "best.pt") in out


def lrs_per_step(config, steps_per_epoch, steps):
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=config.lr)
    scheduler = train.make_scheduler(optimizer, config, steps_per_epoch)
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_paper_schedule_multiplies_initial_lr_once_per_epoch():
    config = train.TrainConfig(lr=1.0, lr_decay=0.5, schedule="paper", warmup_epochs=0)
    assert lrs_per_step(config, 2, 8) == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125]


def test_cosine_schedule_warms_up_per_step_then_decays_to_zero():
    config = train.TrainConfig(lr=1.0, schedule="cosine", warmup_epochs=0.5, epochs=3)
    seen = lrs_per_step(config, 10, 30)
    assert seen[:5] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6])  # half an epoch of linear warm-up
    assert seen[5] == 1.0
    assert all(a > b for a, b in zip(seen[5:], seen[6:])) and 0 < seen[-1] < 0.01
    assert seen[5 + 12] == pytest.approx(0.5, abs=0.07)  # half way through the decay


def test_paper_recipe_fills_only_the_settings_not_given(isic_folder, tmp_path):
    train.main(tiny_args(isic_folder, tmp_path, "--epochs", "2", "--name", "paper", "--recipe", "paper",
                         "--weight-decay", "0"))
    saved = json.loads((tmp_path / "paper" / "config.json").read_text())["train"]
    assert (saved["norm"], saved["dropout"], saved["augment"], saved["loss"], saved["schedule"]) == \
        ("instance", 0.3, "full", "dice", "paper")
    assert saved["weight_decay"] == 0  # given on the command line: the recipe leaves it alone
    rows = list(csv.DictReader(open(tmp_path / "paper" / "metrics.csv")))
    assert [float(r["lr"]) for r in rows] == pytest.approx([5e-4 * 0.985, 5e-4 * 0.985 ** 2])
    state = checkpoint.load_checkpoint(tmp_path / "paper" / "last.pt")
    assert state["model_config"]["dropout"] == 0.3 and state["train_config"]["recipe"] == "paper"


def test_augment_preset_and_knobs_from_flags():
    def parsed(*flags):
        config, _, _ = utils.parse_config(train.TrainConfig, list(flags), "", train.GROUPS, train.CHOICES)
        return loader.augmentation(config)

    assert parsed() == loader.AUGMENT_PRESETS["flips"]
    assert parsed("--augment", "full") == loader.AugmentConfig()
    light = parsed("--augment", "light", "--zoom", "0.25", "--no-flips", "--saturation", "0")
    assert light.scale == (0.75, 1.25) and not light.flips and light.saturation == 0
    assert light.rotate_deg == loader.AUGMENT_PRESETS["light"].rotate_deg  # the rest from the preset


def test_augmentation_settings_reach_the_run_folder_and_checkpoint(isic_folder, tmp_path):
    train.main(tiny_args(isic_folder, tmp_path, "--epochs", "1", "--name", "aug", "--augment", "light",
                         "--rotate-deg", "30"))
    saved = json.loads((tmp_path / "aug" / "config.json").read_text())["train"]
    assert (saved["augment"], saved["rotate_deg"], saved["zoom"]) == ("light", 30.0, None)
    assert checkpoint.load_checkpoint(tmp_path / "aug" / "last.pt")["train_config"]["rotate_deg"] == 30.0


def test_resume_after_epoch_matches_uninterrupted_run(isic_folder, tmp_path):
    # the paper's schedule does not depend on --epochs (a cosine decay does), so a run extended from
    # one to three epochs follows the same learning rates as a three-epoch run
    paper = ("--schedule", "paper", "--warmup-epochs", "0")
    train.main(tiny_args(isic_folder, tmp_path, "--epochs", "3", "--name", "whole", *paper))
    train.main(tiny_args(isic_folder, tmp_path, "--epochs", "1", "--name", "split", *paper))
    train.main(tiny_args(isic_folder, tmp_path, "--epochs", "3", "--name", "split", "--resume", "auto"))
    assert_same_weights(weights(tmp_path / "whole" / "last.pt"), weights(tmp_path / "split" / "last.pt"))
    rows = list(csv.DictReader(open(tmp_path / "split" / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]


def test_signal_mid_epoch_saves_and_resume_matches(isic_folder, tmp_path):
    """A real subprocess gets SIGUSR1 mid-run, writes last.pt and exits; the resumed run ends with the
    weights of an uninterrupted one. All three runs are subprocesses with one thread, so they sum
    floating-point numbers in the same order."""
    args = tiny_args(isic_folder, tmp_path, "--epochs", "3", "--name", "preempted")
    # One-image batches make an epoch long enough to be interrupted inside it.
    args[args.index("--batch-size") + 1] = "1"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "train.py")]
    process = subprocess.Popen([*command, *args], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "preempted" / "metrics.csv"
    deadline = time.time() + 120
    while not metrics.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGUSR1)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGUSR1, output
    assert "received SIGUSR1" in output
    stopped = checkpoint.load_checkpoint(tmp_path / "preempted" / "last.pt")
    assert (stopped["epoch"], stopped["step"]) < (3, 0)

    resumed = subprocess.run([*command, *args, "--resume", "auto"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    reference = tiny_args(isic_folder, tmp_path, "--epochs", "3", "--name", "reference")
    reference[reference.index("--batch-size") + 1] = "1"
    whole = subprocess.run([*command, *reference], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    assert_same_weights(weights(tmp_path / "reference" / "last.pt"), weights(tmp_path / "preempted" / "last.pt"))


KILLED_MID_WRITE = """
import sys, threading, time
import torch
marker, real = sys.argv[1], torch.save

def save(state, path, *args, **kwargs):  # epoch 2's first checkpoint: written half, then the process is killed
    real(state, path, *args, **kwargs)
    if state.get("epoch") == 2:
        with open(path, "r+b") as f:
            f.truncate(f.seek(0, 2) // 2)
        open(marker, "w").write(threading.current_thread().name)
        time.sleep(300)

torch.save = save
import train
train.main(sys.argv[2:])
"""


def test_a_run_killed_during_a_background_write_resumes_to_the_same_weights(isic_folder, tmp_path):
    """train.py is killed (SIGKILL, no chance to clean up) while its writer thread is half-way through epoch 2's
    first checkpoint: epoch 1's last.pt is still whole, and the resumed run ends with an uninterrupted run's weights."""
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    args = tiny_args(isic_folder, tmp_path, "--epochs", "3", "--name", "killed")
    marker = tmp_path / "writing"
    process = subprocess.Popen([sys.executable, "-c", KILLED_MID_WRITE, str(marker), *args], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), process.communicate()[0]
    process.kill()
    process.communicate(timeout=60)
    assert marker.read_text() == "checkpoint-writer"  # not the training thread
    run = tmp_path / "killed"
    assert [p.name for p in run.glob(".*.tmp.pt")]  # the half-written file (best.pt or last.pt), never renamed
    assert checkpoint.load_checkpoint(run / "last.pt")["epoch"] == 1

    command = [sys.executable, str(ROOT / "train.py")]
    resumed = subprocess.run([*command, *args, "--resume", "auto"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    reference = tiny_args(isic_folder, tmp_path, "--epochs", "3", "--name", "reference")
    whole = subprocess.run([*command, *reference], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    assert_same_weights(weights(tmp_path / "reference" / "last.pt"), weights(run / "last.pt"))
    assert [r["epoch"] for r in csv.DictReader(open(run / "metrics.csv"))] == ["1", "2", "3"]


def test_flags_given_at_resume_are_checked_with_the_saved_ones(isic_folder, tmp_path, capsys):
    train.main(tiny_args(isic_folder, tmp_path, "--epochs", "1", "--name", "baseline", "--arch", "dynunet"))
    with pytest.raises(SystemExit) as exit_info:  # alone the flag is fine; with the saved --arch dynunet it is not
        train.main(tiny_args(isic_folder, tmp_path, "--epochs", "2", "--name", "baseline", "--resume", "auto",
                             "--deep-supervision-loss"))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'baseline' / 'last.pt'}: the saved settings with the ones given now cannot work" in err
    assert "--deep-supervision-loss needs --arch improved-unet" in err
    assert checkpoint.load_checkpoint(tmp_path / "baseline" / "last.pt")["epoch"] == 1
    # the network's input stays as it was trained on: another preprocessing at resume is refused, naming it
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_args(isic_folder, tmp_path, "--epochs", "2", "--name", "baseline", "--resume", "auto",
                             "--shades-of-gray"))
    assert exit_info.value.code == 1
    assert "was trained with --shades-of-gray False, and a resumed run keeps its input" in capsys.readouterr().err
    assert checkpoint.load_checkpoint(tmp_path / "baseline" / "last.pt")["epoch"] == 1


def test_a_failed_background_write_ends_the_run_naming_the_file_and_keeps_the_last_checkpoint(
        isic_folder, tmp_path, monkeypatch, capsys):
    train.main(tiny_args(isic_folder, tmp_path, "--epochs", "1", "--name", "run"))
    before = weights(tmp_path / "run" / "last.pt")
    real = checkpoint.save_checkpoint

    def full_disk(state, path):
        if state["epoch"] == 2 and path.name == "last.pt":
            raise checkpoint.CheckpointError(f"could not write checkpoint {path}: the disk is full")
        real(state, path)

    monkeypatch.setattr(checkpoint, "save_checkpoint", full_disk)
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_args(isic_folder, tmp_path, "--epochs", "3", "--name", "run", "--resume", "auto"))
    assert exit_info.value.code == 1
    assert f"could not write checkpoint {tmp_path / 'run' / 'last.pt'}: the disk is full" in capsys.readouterr().err
    assert_same_weights(before, weights(tmp_path / "run" / "last.pt"))


def test_resume_from_a_checkpoint_path_extends_training(isic_folder, tmp_path):
    train.main(tiny_args(isic_folder, tmp_path, "--epochs", "1", "--name", "run"))
    train.main(tiny_args(isic_folder, tmp_path, "--epochs", "2", "--resume", str(tmp_path / "run" / "last.pt")))
    assert checkpoint.load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 2


def test_resume_with_a_different_model_is_refused(isic_folder, tmp_path, capsys):
    train.main(tiny_args(isic_folder, tmp_path, "--epochs", "1", "--name", "run"))
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_args(isic_folder, tmp_path, "--epochs", "2", "--name", "run", "--resume", "auto",
                             "--base-channels", "8"))
    assert exit_info.value.code == 1
    assert "differs from this run" in capsys.readouterr().err


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(isic_folder, tmp_path, monkeypatch, capsys):
    train.main(tiny_args(isic_folder, tmp_path, "--epochs", "1", "--name", "run"))
    before = weights(tmp_path / "run" / "last.pt")

    class NanLoss(torch.nn.Module):
        def __init__(self, kind, **settings):
            super().__init__()

        def forward(self, logits, target):
            return logits.sum() * float("nan")

    monkeypatch.setattr(losses, "SegmentationLoss", NanLoss)
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_args(isic_folder, tmp_path, "--epochs", "2", "--name", "run", "--resume", "auto"))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "loss became nan at epoch 2, step 1" in err and "last good checkpoint is kept" in err
    assert_same_weights(before, weights(tmp_path / "run" / "last.pt"))


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--image-size", "100"], "multiple of 16"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--norm", "group"], "invalid choice"),
    (["--augment", "heavy"], "invalid choice"),
    (["--zoom", "1.5"], "--zoom must be in [0, 1)"),
    (["--affine-p", "2"], "--affine-p must be in [0, 1]"),
    (["--rotate-deg", "-5"], "--rotate-deg must not be negative"),
    (["--deep-supervision-loss", "--arch", "dynunet"], "--deep-supervision-loss needs --arch improved-unet"),
])
def test_nonsensical_flags_are_refused(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_config_file_sets_defaults_and_flags_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 7\nlr: 0.001\nnorm: instance\n")
    config, explicit, _ = utils.parse_config(train.TrainConfig, ["--config", str(path), "--epochs", "3"], "",
                                             train.GROUPS, train.CHOICES)
    assert (config.epochs, config.lr, config.norm) == (3, 0.001, "instance")
    assert {"epochs", "lr", "norm"} <= explicit
    json_path = tmp_path / "run.json"
    json_path.write_text(json.dumps({"batch-size": 2}))
    config, _, _ = utils.parse_config(train.TrainConfig, ["--config", str(json_path)], "", train.GROUPS, train.CHOICES)
    assert config.batch_size == 2


def test_flag_choices_come_from_the_files_that_own_them_and_match_what_they_name():
    """Each setting's allowed values are declared once, by the file that owns the setting; train.py's and
    predict.py's flags, and the config files' checks, take them from there."""
    assert train.CHOICES["recipe"] == list(train.RECIPES)
    assert train.CHOICES["arch"] == list(modules.MODELS)
    assert train.CHOICES["augment"] == list(loader.AUGMENT_PRESETS)
    assert train.CHOICES["norm"] == list(modules.NORMS) == ["instance", "batch"]
    assert train.CHOICES["loss"] == list(losses.LOSSES)
    assert train.CHOICES["amp"] == list(devices.AMP_CHOICES) == utils.field_choices(predict.PredictConfig)["amp"]
    for kind in losses.LOSSES:  # every name a loss
        losses.SegmentationLoss(kind)
    with pytest.raises(ValueError, match="choose auto, bf16, fp16, off"):
        devices.amp_dtype("fp8", devices.hardware(torch.device("cpu")))
    grouped = [name for names in train.GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(f.name for f in utils.settings(train.TrainConfig))  # every setting
    assert len(grouped) == len(set(grouped))  # once


def test_each_setting_is_declared_once_by_the_file_that_owns_it():
    """TrainConfig takes the data, model, augmentation and loss settings from dataset.py, modules.py, loader.py and
    losses.py as they are: none is declared again here, so a default or a help text cannot drift apart."""
    owned = {dataset.DataConfig: "dataset", modules.ModelConfig: "modules", loader.AugmentSettings: "loader",
             losses.LossConfig: "losses"}
    own = set(inspect.get_annotations(train.TrainConfig))
    for cls in owned:
        names = {f.name for f in dataclasses.fields(cls)}
        assert names <= {f.name for f in dataclasses.fields(train.TrainConfig)} and not names & own, cls.__name__
    defaults = train.TrainConfig()
    assert (defaults.dropout, defaults.image_size, defaults.augment) == (modules.ModelConfig.dropout, 256, "flips")
    # the checks come from the owners too, and name the flags
    bad = train.TrainConfig(dropout=1.5, val_fraction=1.0, zoom=2.0, image_size=100)
    assert {p.split()[0] for p in train.check_config(bad)} == {"--dropout", "--val-fraction", "--zoom",
                                                                "--image-size", "--val-fraction"}
    # in_channels and num_classes are fixed by the task: carried into the checkpoint, never a flag
    assert "in_channels" not in {f.name for f in utils.settings(train.TrainConfig)}
    with pytest.raises(SystemExit):
        utils.parse_config(train.TrainConfig, ["--num-classes", "2"], "", train.GROUPS, train.CHOICES)


@pytest.mark.parametrize("content, message", [
    ("norm: group\n", "norm must be one of instance, batch, got 'group'"),
    ("epoch: 3\n", "unknown setting 'epoch'; did you mean 'epochs'?"),
    ("epochs: three\n", "epochs must be int"),
    ("- 1\n- 2\n", "must hold a mapping"),
])
def test_bad_config_file_names_file_and_problem(tmp_path, capsys, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(SystemExit):
        train.main(["--config", str(path)])
    err = capsys.readouterr().err
    assert str(path) in err and message in err


def test_missing_data_dir_says_how_to_get_data(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_args(tmp_path / "nowhere", tmp_path))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "nowhere does not exist" in err and "python download.py" in err


def test_second_run_on_the_same_folder_is_refused(isic_folder, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    # pid 1 is alive for as long as this machine is up: a live owner
    (run / ".lock").write_text(f"{record.socket.gethostname()} 1\n")
    with pytest.raises(SystemExit):
        train.main(tiny_args(isic_folder, tmp_path, "--epochs", "1", "--name", "run"))
    assert "is in use by another run" in capsys.readouterr().err
    assert not (run / "last.pt").exists()


def test_stale_lock_of_a_dead_process_is_taken_over(isic_folder, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / ".lock").write_text(f"{record.socket.gethostname()} {dead.pid}\n")
    train.main(tiny_args(isic_folder, tmp_path, "--epochs", "1", "--name", "run"))
    assert (run / "last.pt").is_file() and not (run / ".lock").exists()


@pytest.mark.parametrize("lock, env, taken_over", [
    # a hard-killed job, requeued onto another node: the lock of its own first attempt is stale
    ("node-b 1 4242 0", {"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "1"}, True),
    ("node-b 1 900_3 1", {"SLURM_JOB_ID": "905", "SLURM_ARRAY_JOB_ID": "900", "SLURM_ARRAY_TASK_ID": "3",
                          "SLURM_RESTART_COUNT": "2"}, True),
    # the same attempt elsewhere (another step of the job), another job, another array task, no job at all
    ("node-b 1 4242 1", {"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "1"}, False),
    ("node-b 1 4241 0", {"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "1"}, False),
    ("node-b 1 900_2 0", {"SLURM_JOB_ID": "905", "SLURM_ARRAY_JOB_ID": "900", "SLURM_ARRAY_TASK_ID": "3",
                          "SLURM_RESTART_COUNT": "1"}, False),
    ("node-b 1 4242 0", {}, False),
    ("node-b 1", {"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "1"}, False),  # a lock written before jobs were
])
def test_a_lock_left_by_an_earlier_attempt_of_the_same_slurm_job_is_taken_over(tmp_path, monkeypatch, lock, env,
                                                                               taken_over):
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    (tmp_path / ".lock").write_text(lock + "\n")
    run_lock = record.RunLock(tmp_path)
    if taken_over:
        run_lock.acquire()
        host, pid, job, attempt = (tmp_path / ".lock").read_text().split()
        assert (host, int(pid)) == (record.socket.gethostname(), os.getpid())
        assert (job, attempt) == (lock.split()[2], env["SLURM_RESTART_COUNT"])
        run_lock.release()
    else:
        with pytest.raises(record.RunInUseError, match="in use by another run \\(pid 1 on node-b"):
            run_lock.acquire()
        assert (tmp_path / ".lock").read_text() == lock + "\n"


def test_zero_argument_run_falls_back_to_synthetic_data(tmp_path, monkeypatch, capsys):
    """With no ISIC data, the default command generates the synthetic set and trains on it."""
    monkeypatch.chdir(tmp_path)
    summary = train.main(["--synthetic-images", "12", "--epochs", "1", "--image-size", "32", "--base-channels", "4",
                          "--batch-size", "4", "--device", "cpu", "--wandb", "disabled", "--no-progress",
                          "--val-fraction", "0.25", "--test-fraction", "0.25"])
    out = capsys.readouterr().out
    assert "built-in synthetic lesion set" in out
    assert summary["synthetic"] and Path(summary["run_dir"], "best.pt").is_file()
    assert any((tmp_path / "data" / "synthetic").rglob("*.jpg"))


def test_wandb_offline_writes_the_run_locally(isic_folder, tmp_path):
    pytest.importorskip("wandb")
    train.main(tiny_args(isic_folder, tmp_path, "--epochs", "1", "--name", "logged", "--wandb", "offline"))
    runs = list((tmp_path / "logged" / "wandb").glob("offline-run-*"))
    assert runs, "no offline wandb run folder"
    assert any(runs[0].rglob("*.wandb"))
    assert checkpoint.load_checkpoint(tmp_path / "logged" / "last.pt")["wandb_run_id"]


def test_wandb_failure_falls_back_with_a_warning(isic_folder, tmp_path, monkeypatch):
    import wandb

    def broken_init(**kwargs):
        raise ConnectionError("unreachable")

    monkeypatch.setattr(wandb, "init", broken_init)
    with pytest.warns(UserWarning, match="wandb could not start"):
        train.main(tiny_args(isic_folder, tmp_path, "--epochs", "1", "--name", "run", "--wandb", "online"))
    assert (tmp_path / "run" / "best.pt").is_file()


@pytest.mark.slow
def test_two_process_ddp_matches_single_process_evaluation(isic_folder, tmp_path):
    """torchrun with 2 gloo processes: validation metrics all-reduced over ranks equal a single
    process's evaluation of the saved model on the same split."""
    args = tiny_args(isic_folder, tmp_path, "--epochs", "1", "--name", "ddp")
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--standalone", str(ROOT / "train.py"), *args],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("best validation Dice") == 1  # only rank 0 prints
    row = next(csv.DictReader(open(tmp_path / "ddp" / "metrics.csv")))

    state = checkpoint.load_checkpoint(tmp_path / "ddp" / "last.pt")
    model, _, _, _ = checkpoint.model_from_checkpoint(state, "last.pt")
    config = train.TrainConfig(**state["train_config"])
    splits = dataset.prepare_splits(dataset.DataConfig(
        data_dir=config.data_dir, image_size=config.image_size, val_fraction=config.val_fraction,
        test_fraction=config.test_fraction, split_seed=config.split_seed), log=lambda *a, **k: None)
    batches = loader.make_loader(splits.val, 3, splits.mean, splits.std, device=torch.device("cpu"),
                                  train=False, seed=0)
    hw = devices.hardware("cpu")
    autocast = hw.autocast(devices.amp_dtype(config.amp, hw))  # as the run validated (bf16 where native)
    single = train.evaluate(model, batches, losses.SegmentationLoss("dice"), autocast=autocast)
    assert float(row["val_dice"]) == pytest.approx(single["dice"], abs=1e-5)
    assert float(row["val_jaccard"]) == pytest.approx(single["jaccard"], abs=1e-5)


def test_dynunet_baseline_trains_and_predict_rebuilds_it(isic_folder, tmp_path):
    pytest.importorskip("monai")
    import predict

    train.main(tiny_args(isic_folder, tmp_path, "--epochs", "1", "--name", "dyn", "--arch", "dynunet"))
    state = checkpoint.load_checkpoint(tmp_path / "dyn" / "best.pt")
    assert state["model_config"]["arch"] == "dynunet"
    result = predict.main(["--checkpoint", str(tmp_path / "dyn" / "best.pt"), "--output", str(tmp_path / "out"),
                           "--device", "cpu"])
    assert result.written and 0 <= result.metrics["dice"] <= 1
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["threshold_jaccard"] >= 0


def test_the_stored_split_keeps_test_images_out_of_training_when_the_folder_changes(tmp_path, capsys):
    """A run stores its split; predict.py scores exactly those test images even after images are added,
    resuming on a changed folder is refused, and a missing test image is named."""
    import predict
    from conftest import write_isic_folder

    root = write_isic_folder(tmp_path / "isic", n=40)
    train.main(tiny_args(root, tmp_path, "--epochs", "1", "--name", "run"))
    stored = json.loads((tmp_path / "run" / "splits.json").read_text())
    assert stored["test"] and not set(stored["test"]) & set(stored["train"])
    best = tmp_path / "run" / "best.pt"
    assert checkpoint.load_checkpoint(best)["splits"]["test"] == stored["test"]

    def scored():
        result = predict.main(["--checkpoint", str(best), "--output", str(tmp_path / "out"), "--device", "cpu"])
        return sorted(row["image_id"] for row in result.per_image)

    assert scored() == sorted(stored["test"])
    write_isic_folder(tmp_path / "more", n=46, seed=1)  # 6 new ids: ISIC_0000040 ... ISIC_0000045
    for i in range(40, 46):
        for folder, suffix in (("ISIC2018_Task1-2_Training_Input", ".jpg"),
                               ("ISIC2018_Task1_Training_GroundTruth", "_segmentation.png")):
            name = f"ISIC_{i:07d}{suffix}"
            (root / folder / name).write_bytes((tmp_path / "more" / folder / name).read_bytes())
    assert scored() == sorted(stored["test"])  # the same images, none of the new ones

    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_args(root, tmp_path, "--epochs", "2", "--name", "run", "--resume", "auto"))
    assert exit_info.value.code == 1
    assert "no longer gives the split this run started with" in capsys.readouterr().err

    gone = stored["test"][0]
    (root / "ISIC2018_Task1-2_Training_Input" / f"{gone}.jpg").unlink()
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--checkpoint", str(best), "--output", str(tmp_path / "out"), "--device", "cpu"])
    assert exit_info.value.code == 2
    assert gone in capsys.readouterr().err



def test_resuming_a_finished_run_says_so_and_trains_nothing(isic_folder, tmp_path, capsys):
    """slurm/train.sh always passes --resume auto: a reused --name must not look like a resumed run."""
    summary = train.main(tiny_args(isic_folder, tmp_path, "--epochs", "1", "--name", "done"))
    before = (tmp_path / "done" / "last.pt").stat().st_mtime_ns, (tmp_path / "done" / "metrics.csv").read_text()
    capsys.readouterr()
    again = train.main(tiny_args(isic_folder, tmp_path, "--epochs", "1", "--name", "done", "--resume", "auto"))
    out = capsys.readouterr().out
    assert out.count("\n") == 1, out
    assert f"{tmp_path / 'done'} already finished on " in out and ": 1 epoch, best validation Dice " in out
    assert "Use a new --name for a new run, or a larger --epochs (was 1)" in out and "resuming from" not in out
    assert again["best_val_dice"] == summary["best_val_dice"]
    after = (tmp_path / "done" / "last.pt").stat().st_mtime_ns, (tmp_path / "done" / "metrics.csv").read_text()
    assert after == before
    # a larger --epochs trains it further
    train.main(tiny_args(isic_folder, tmp_path, "--epochs", "2", "--name", "done", "--resume", "auto"))
    assert checkpoint.load_checkpoint(tmp_path / "done" / "last.pt")["epoch"] == 2


def test_a_finished_run_exits_0_from_the_command_line(isic_folder, tmp_path):
    args = tiny_args(isic_folder, tmp_path, "--epochs", "1", "--name", "done")
    train.main(args)
    env = {**os.environ, "WANDB_MODE": "disabled"}
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "--resume", "auto"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "already finished" in done.stdout and not done.stderr.strip(), done


def test_a_new_per_epoch_figure_reaches_metrics_csv(isic_folder, tmp_path, monkeypatch):
    """A key added to the epoch's row (as a new metric would be) is a column of metrics.csv, as it is a value
    in wandb: the file keeps every key it is given."""
    written = record.RunRecord.write_epoch

    def with_a_new_key(self, history):
        history[-1]["val_new_figure"] = 0.25
        written(self, history)

    monkeypatch.setattr(record.RunRecord, "write_epoch", with_a_new_key)
    train.main(tiny_args(isic_folder, tmp_path, "--epochs", "2", "--name", "new-key"))
    rows = list(csv.DictReader(open(tmp_path / "new-key" / "metrics.csv")))
    assert [row["val_new_figure"] for row in rows] == ["0.25", "0.25"]
    assert list(rows[0])[:len(record.METRIC_COLUMNS)] == record.METRIC_COLUMNS


def test_a_run_stopped_on_one_process_continues_its_schedule_on_two(isic_folder, tmp_path):
    """Steps per epoch halve with two processes. Two epochs on one process, then two more with torchrun and two
    gloo ranks: the cosine schedule continues where it stood (half-way through four epochs), it does not stand
    past its end, and every epoch is trained once."""
    args = tiny_args(isic_folder, tmp_path, "--name", "grown", "--warmup-epochs", "0")
    args[args.index("--batch-size") + 1] = "2"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    train.main([*args, "--epochs", "2"])
    one = checkpoint.load_checkpoint(tmp_path / "grown" / "last.pt")
    assert (one["world_size"], one["epoch"]) == (1, 2)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                             str(ROOT / "train.py"), *args, "--epochs", "4", "--resume", "auto"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    spe1, two = one["steps_per_epoch"], checkpoint.load_checkpoint(tmp_path / "grown" / "last.pt")
    spe2 = two["steps_per_epoch"]
    assert spe2 < spe1 and two["world_size"] == 2
    rows = list(csv.DictReader(open(tmp_path / "grown" / "metrics.csv")))
    assert [row["epoch"] for row in rows] == ["1", "2", "3", "4"]
    lr = float(rows[2]["lr"])  # after epoch 3 of 4: three quarters of the cosine
    assert lr == pytest.approx(2e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 4)), rel=1e-4)
    assert f"an epoch is {spe2} steps instead of {spe1}, so the run continues at step {2 * spe2}" in result.stdout
    assert two["scheduler"]["last_epoch"] == 4 * spe2


def test_follow_world_size_rescales_the_step_the_schedule_and_the_plan():
    state = {"epoch": 3, "step": 6, "steps_per_epoch": 10, "world_size": 1,
             "scheduler": {"last_epoch": 36, "_step_count": 37},
             "budget_plan": {"total_steps": 100, "planned_steps": 98, "minutes": 5}}
    assert train.follow_world_size(state, 5, 2)
    assert (state["step"], state["scheduler"]["last_epoch"], state["scheduler"]["_step_count"]) == (3, 18, 19)
    assert state["budget_plan"] == {"total_steps": 50, "planned_steps": 49, "minutes": 5}
    same = {"epoch": 1, "step": 0, "steps_per_epoch": 5, "scheduler": {"last_epoch": 5}}
    assert not train.follow_world_size(same, 5, 1) and same["scheduler"]["last_epoch"] == 5
    old = {"epoch": 1, "step": 0, "scheduler": {"last_epoch": 5}}  # a checkpoint from before the units were kept
    assert not train.follow_world_size(old, 2, 2)


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("MPS backend out of memory (MPS allocated: 8.00 GB)")])
def test_out_of_device_memory_is_one_line_that_says_what_to_lower(monkeypatch, capsys, error):
    def run_out(config, explicit):
        raise error

    monkeypatch.setattr(train, "train", run_out)
    with pytest.raises(SystemExit) as stop:
        train.main(["--batch-size", "64", "--image-size", "512", "--name", "big"])
    err = capsys.readouterr().err
    assert stop.value.code == 1 and err.count("\n") == 1, err
    assert "ran out of memory training 64 images of 512px a step" in err and "Lower --batch-size or --image-size" in err
    assert "--resume auto --name big" in err


def test_other_runtime_errors_are_not_taken_for_a_full_gpu(monkeypatch):
    monkeypatch.setattr(train, "train", lambda config, explicit: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        train.main([])


def test_validation_counts_the_images_that_fail_the_challenge_threshold(isic_folder):
    """val_failure_share: the share of images whose Jaccard is under 0.65, which the ranking counts as 0."""
    assert losses.failures(torch.tensor([0.0, 0.65, 0.7, 0.0])).tolist() == [1.0, 0.0, 0.0, 1.0]
    splits = dataset.prepare_splits(dataset.DataConfig(data_dir=str(isic_folder), image_size=32, val_fraction=0.25,
                                                       test_fraction=0.125), log=lambda *a, **k: None)
    batches = loader.make_loader(splits.val, 2, splits.mean, splits.std, device=torch.device("cpu"), train=False,
                                 seed=0)

    class Constant(torch.nn.Module):
        def __init__(self, logit):
            super().__init__()
            self.logit = logit

        def forward(self, x):
            return torch.full((x.shape[0], 1, *x.shape[2:]), self.logit)

    loss = losses.SegmentationLoss("dice")
    nothing = train.evaluate(Constant(-5.0), batches, loss, autocast=contextlib.nullcontext)
    assert nothing["failure_share"] == 1.0 and nothing["threshold_jaccard"] == 0.0  # every image holds a lesion
    # a mask over the whole image: each image's Jaccard is its lesion's share of the image, all far under 0.65 here
    everything = train.evaluate(Constant(5.0), batches, loss, autocast=contextlib.nullcontext)
    shares = (splits.val.masks > 0).reshape(len(splits.val.ids), -1).mean(axis=1)
    assert everything["failure_share"] == pytest.approx(float((shares < 0.65).mean()))


def test_curves_are_redrawn_at_most_every_thirty_seconds_and_always_at_the_end(tmp_path, monkeypatch):
    """A fast GPU's epoch takes a second or two: curves.png is not redrawn after each one, but metrics.csv is
    written every epoch and the figure catches up within PLOT_EVERY_SECONDS and when the run closes."""
    import record

    drawn = []
    monkeypatch.setattr(record, "plot_curves", lambda history, path: drawn.append(len(history)))
    now = [1000.0]
    monkeypatch.setattr(record.time, "monotonic", lambda: now[0])
    run = record.RunRecord(tmp_path, enabled=True)
    history = []
    for epoch in range(1, 6):
        history = history + [{"epoch": epoch, "train_loss": 1.0 / epoch, "val_dice": 0.1 * epoch}]
        run.write_epoch(history)
        now[0] += 2.0  # two seconds an epoch
    assert drawn == [1]  # the first epoch, then nothing for 8 seconds
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 6  # header and every epoch
    now[0] += record.RunRecord.PLOT_EVERY_SECONDS
    run.write_epoch(history + [{"epoch": 6, "train_loss": 0.1, "val_dice": 0.6}])
    assert drawn == [1, 6]
    run.write_epoch(history + [{"epoch": 6, "train_loss": 0.1, "val_dice": 0.6}, {"epoch": 7, "train_loss": 0.1}])
    run.close()  # the run ends (or is stopped): the last epochs are drawn
    assert drawn == [1, 6, 7]


def test_deep_supervision_loss_trains_on_three_scales_and_saves_the_plain_network(isic_folder, tmp_path, monkeypatch):
    seen = []
    real = losses.SegmentationLoss.forward

    def recording(self, logits, target):
        seen.append(tuple(o.shape[-1] for o in logits) if isinstance(logits, tuple) else logits.shape[-1])
        return real(self, logits, target)

    monkeypatch.setattr(losses.SegmentationLoss, "forward", recording)
    train.main(tiny_args(isic_folder, tmp_path, "--epochs", "1", "--name", "ds", "--deep-supervision-loss"))
    assert (32, 16, 8) in seen and 32 in seen  # training weighs three scales; validation the full one
    state = checkpoint.load_checkpoint(tmp_path / "ds" / "best.pt")
    model = modules.build_model(modules.ModelConfig(**state["model_config"]))
    model.load_state_dict(state["model"])  # no extra weights: the coarser maps come from the paper's own layers
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 1, 32, 32)
