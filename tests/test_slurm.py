"""The SLURM job scripts, run with bash (no sbatch) and the variables SLURM would set, on CPU.

Stand-ins for scontrol and srun come first on PATH, so these tests behave the same on a laptop and on a
login node where the real commands would act on an invented job id. tests/test_slurm_cluster.py submits
the same scripts to a real scheduler.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import utils

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "slurm").glob("*.sh"))


FAKE_SCONTROL = """#!/usr/bin/env bash
echo "$*" >>"$(dirname "$0")/calls.log"
if [[ "$1 $2" == "show hostnames" ]]; then echo 127.0.0.1; fi
"""
FAKE_SRUN = """#!/usr/bin/env bash
echo "srun $*" >>"$(dirname "$0")/calls.log"
while [[ "$1" == -* ]]; do shift; done
exec "$@"
"""


@pytest.fixture
def fake_slurm(tmp_path):
    """A folder with scontrol (records its arguments in calls.log) and srun (runs its command here)."""
    folder = tmp_path / "fake-slurm"
    folder.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder


def slurm_env(fake_slurm, job_id="4242", **extra):
    env = {**os.environ, "SLURM_JOB_ID": job_id, "SLURM_JOB_NAME": "unet", "SLURM_SUBMIT_DIR": str(ROOT),
           "PATH": f"{fake_slurm}:{Path(sys.executable).parent}:{os.environ['PATH']}", "WANDB_MODE": "disabled"}
    env.update(extra)
    return env


def tiny_flags(data_dir, out_dir, epochs="2"):
    return ["--data-dir", str(data_dir), "--out-dir", str(out_dir), "--image-size", "32", "--base-channels", "4",
            "--batch-size", "1", "--epochs", epochs, "--device", "cpu", "--no-progress", "--num-preview", "1",
            "--val-fraction", "0.25", "--test-fraction", "0.125"]


def test_scripts_use_strict_mode_and_rangpur_header():
    for script in SCRIPTS:
        text = script.read_text()
        if script.name != "common.sh":
            assert "set -euo pipefail" in text, script.name
            assert "#SBATCH --partition=a100" in text and "#SBATCH --output=logs/%x-%j.out" in text, script.name
    for name in ("train.sh", "train_multigpu.sh"):
        text = (ROOT / "slurm" / name).read_text()
        assert "#SBATCH --signal=B:USR1@120" in text and "#SBATCH --requeue" in text
        assert "#SBATCH --open-mode=append" in text  # a requeue must not truncate the job log
        assert "--resume auto" in text


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_scripts_pass_shellcheck():
    result = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS), ".ci/slurm_cluster.sh"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_train_script_resumes_after_usr1(isic_folder, tmp_path, fake_slurm):
    """SLURM's warning signal reaches the batch shell; the script forwards it, python saves last.pt,
    asks for a requeue, and the requeued job (same job id) resumes and finishes. Progress goes to the
    log as plain lines, not tqdm's carriage returns."""
    flags = [flag for flag in tiny_flags(isic_folder, tmp_path, epochs="3") if flag != "--no-progress"]
    command = ["bash", str(ROOT / "slurm" / "train.sh"), *flags]
    process = subprocess.Popen(command, env=slurm_env(fake_slurm), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    metrics = tmp_path / "unet-4242" / "metrics.csv"
    deadline = time.time() + 120
    while not metrics.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGUSR1)
    output, _ = process.communicate(timeout=120)
    assert "got USR1" in output, output
    assert process.returncode == 128 + signal.SIGUSR1, output
    assert (fake_slurm / "calls.log").read_text() == "requeue 4242\n"
    stopped = utils.load_checkpoint(tmp_path / "unet-4242" / "last.pt")
    assert stopped["epoch"] < 3

    again = subprocess.run(command, env=slurm_env(fake_slurm, SLURM_RESTART_COUNT="1"), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "job 4242 attempt 2" in again.stdout and "resuming from" in again.stdout
    assert utils.load_checkpoint(tmp_path / "unet-4242" / "last.pt")["epoch"] == 3
    assert re.search(r"^epoch 3/3  step \d+/\d+ \(\d+%\)  loss [\d.]+  img_s [\d.]+  ETA ", again.stdout, re.M)
    assert "\r" not in again.stdout + again.stderr
    assert (fake_slurm / "calls.log").read_text() == "requeue 4242\n"  # a finished run is not requeued


def run_common(fake_slurm, code, **env):
    """Source slurm/common.sh and run `code` (bash)."""
    return subprocess.run(["bash", "-c", f"set -euo pipefail; source slurm/common.sh; {code}"], cwd=ROOT,
                          env=slurm_env(fake_slurm, **env), capture_output=True, text=True, timeout=30)


def test_array_tasks_get_their_own_run_folder_and_sweep_line(fake_slurm, tmp_path):
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("--seed 3\n--lr 1e-3 --loss dice\n")
    show = 'array_task_flags; echo "$(default_run_name x) ${TASK_FLAGS[*]}"'
    array = {"SLURM_ARRAY_JOB_ID": "900", "SLURM_JOB_ID": "902"}
    assert run_common(fake_slurm, show, SLURM_ARRAY_TASK_ID="2", SWEEP=str(sweep), **array).stdout == \
        "unet-900_2 --lr 1e-3 --loss dice\n"
    assert run_common(fake_slurm, show, SLURM_ARRAY_TASK_ID="4", **array).stdout == "unet-900_4 --seed 4\n"
    assert run_common(fake_slurm, show).stdout == "unet-4242 \n"
    missing = run_common(fake_slurm, show, SLURM_ARRAY_TASK_ID="3", SWEEP=str(sweep), **array)
    assert missing.returncode != 0 and "has no line 3" in missing.stderr and "--array=1-2" in missing.stderr


def test_a_warned_array_task_requeues_itself_alone(fake_slurm):
    # SLURM gives the last task the array's own id (900 here), and `scontrol requeue 900` requeues them all
    run_common(fake_slurm, "SIGNALLED=1; requeue_if_signalled 138", SLURM_JOB_ID="900", SLURM_ARRAY_JOB_ID="900",
               SLURM_ARRAY_TASK_ID="2")
    run_common(fake_slurm, "SIGNALLED=1; requeue_if_signalled 0")  # finished anyway: nothing to resume
    assert (fake_slurm / "calls.log").read_text() == "requeue 900_2\n"


def test_bad_python_env_fails_with_a_message(tmp_path, fake_slurm):
    result = subprocess.run(["bash", str(ROOT / "slurm" / "train.sh"), "--help"],
                            env=slurm_env(fake_slurm, PYTHON_ENV=str(tmp_path / "no-such-env"), PATH="/usr/bin:/bin"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "no-such-env" in result.stderr and "PYTHON_ENV" in result.stderr


@pytest.mark.slow
def test_multigpu_script_runs_two_processes_on_cpu(isic_folder, tmp_path, fake_slurm):
    result = subprocess.run(["bash", str(ROOT / "slurm" / "train_multigpu.sh"),
                             *tiny_flags(isic_folder, tmp_path, epochs="1")],
                            env=slurm_env(fake_slurm, job_id="77", NPROC_PER_NODE="2", MASTER_PORT="29517",
                                          OMP_NUM_THREADS="1"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 node(s) x 2 process(es)" in result.stdout
    assert "srun --kill-on-bad-exit=1 torchrun --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in \
        (fake_slurm / "calls.log").read_text()
    assert (tmp_path / "unet-77" / "best.pt").is_file()


def test_predict_script_writes_masks_and_scores(isic_folder, tmp_path, fake_slurm):
    import train

    train.main([*tiny_flags(isic_folder, tmp_path, epochs="1"), "--name", "run", "--wandb", "disabled"])
    out = tmp_path / "predictions"
    result = subprocess.run(["bash", str(ROOT / "slurm" / "predict.sh"), "--checkpoint", str(tmp_path / "run" / "best.pt"),
                             "--input", str(isic_folder / "ISIC2018_Task1-2_Training_Input"), "--output", str(out),
                             "--masks", str(isic_folder / "ISIC2018_Task1_Training_GroundTruth"), "--device", "cpu"],
                            env=slurm_env(fake_slurm), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(list(out.glob("*_segmentation.png"))) == 16
    assert (out / "metrics.json").is_file()


def test_real_scheduler_tests_never_submit_to_a_real_cluster(tmp_path, monkeypatch):
    """tests/test_slurm_cluster.py submits jobs; on a login node its cluster check must say no."""
    import test_slurm_cluster

    for name, text in (("sbatch", "exit 0\n"), ("scontrol", "echo 'ClusterName             = rangpur'\n")):
        (tmp_path / name).write_text(f"#!/usr/bin/env bash\n{text}")
        (tmp_path / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    problem = test_slurm_cluster.cluster_problem()
    assert problem is not None and "runs cluster rangpur, not the test cluster 'unet-test'" in problem
