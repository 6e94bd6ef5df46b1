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

import checkpoint
from conftest import clean_environ

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "slurm").glob("*.sh"))


FAKE_SCONTROL = """#!/usr/bin/env bash
if [[ "$1 $2" == "show hostnames" ]]; then echo 127.0.0.1; exit 0; fi
if [[ "$1 $2 $3" == "-o show job" ]]; then echo "JobId=${4%_*} JobState=${FAKE_JOB_STATE:-RUNNING}"; exit 0; fi
echo "$*" >>"$(dirname "$0")/calls.log"
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
    env = {**clean_environ(), "SLURM_JOB_ID": job_id, "SLURM_JOB_NAME": "unet", "SLURM_SUBMIT_DIR": str(ROOT),
           "PATH": f"{fake_slurm}:{Path(sys.executable).parent}:{os.environ['PATH']}", "WANDB_MODE": "disabled"}
    env.update(extra)
    return env


def tiny_flags(data_dir, out_dir, epochs="2"):
    return ["--data-dir", str(data_dir), "--out-dir", str(out_dir), "--image-size", "32", "--base-channels", "4",
            "--batch-size", "1", "--epochs", epochs, "--device", "cpu", "--no-progress", "--num-preview", "1",
            "--val-fraction", "0.25", "--test-fraction", "0.125"]


def test_scripts_use_strict_mode_and_rangpur_header():
    """Partitions that run on Rangpur, and no memory request: its nodes declare none and refuse one."""
    partitions = {"train.sh": "a100", "predict.sh": "a100", "train_multigpu.sh": "a100", "gpu_check.sh": "a100-test",
                  "download.sh": "cpu"}
    for script in SCRIPTS:
        text = script.read_text()
        if script.name != "common.sh":
            assert "set -euo pipefail" in text, script.name
            assert re.findall(r"^#SBATCH --partition=(\S+)$", text, re.M) == [partitions[script.name]], script.name
            assert "#SBATCH --output=logs/%x-%j.out" in text, script.name
            assert not re.search(r"^#SBATCH --mem", text, re.M), script.name
            assert "vgpu" not in text, script.name
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
    stopped = checkpoint.load_checkpoint(tmp_path / "unet-4242" / "last.pt")
    assert stopped["epoch"] < 3

    again = subprocess.run(command, env=slurm_env(fake_slurm, SLURM_RESTART_COUNT="1"), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "job 4242 attempt 2" in again.stdout and "resuming from" in again.stdout
    assert checkpoint.load_checkpoint(tmp_path / "unet-4242" / "last.pt")["epoch"] == 3
    assert re.search(r"^epoch 3(/3)?  step \d+/\d+ \(\d+%\)  loss [\d.]+  img_s [\d.]+  ETA ", again.stdout, re.M)
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


def test_an_array_task_of_a_prediction_job_segments_its_own_part(fake_slurm):
    show = 'array_part_flags; echo "${PART_FLAGS[*]}"'
    assert run_common(fake_slurm, show).stdout == "\n"  # not an array: the whole folder

    def part(task, count, first, step=None):
        env = {"SLURM_ARRAY_TASK_ID": task, "SLURM_ARRAY_TASK_COUNT": count, "SLURM_ARRAY_TASK_MIN": first}
        return run_common(fake_slurm, show, **env, **({"SLURM_ARRAY_TASK_STEP": step} if step else {})).stdout.strip()

    assert part("1", "4", "1") == "--parts 4 --part 1"  # --array=1-4
    assert part("3", "4", "0") == "--parts 4 --part 4"  # --array=0-3
    assert part("6", "4", "0", "3") == "--parts 4 --part 3"  # --array=0-9:3: ids 0, 3, 6, 9


def test_a_warned_array_task_requeues_itself_alone(fake_slurm):
    # SLURM gives the last task the array's own id (900 here), and `scontrol requeue 900` requeues them all
    run_common(fake_slurm, "SIGNALLED=1; requeue_if_signalled 138", SLURM_JOB_ID="900", SLURM_ARRAY_JOB_ID="900",
               SLURM_ARRAY_TASK_ID="2")
    run_common(fake_slurm, "SIGNALLED=1; requeue_if_signalled 0")  # finished anyway: nothing to resume
    assert (fake_slurm / "calls.log").read_text() == "requeue 900_2\n"


def test_a_cancelled_job_is_not_requeued(fake_slurm):
    # scancel and the time limit send TERM as preemption does, but the job is COMPLETING, not RUNNING
    ended = run_common(fake_slurm, "SIGNALLED=1; SIGNAL_NAME=SIGTERM; requeue_if_signalled 143",
                       FAKE_JOB_STATE="COMPLETING", RUN_NAME="unet-4242")
    assert "so it is not requeued; resubmit with RUN_NAME=unet-4242 to resume" in ended.stdout, ended.stdout
    assert not (fake_slurm / "calls.log").exists()
    preempted = run_common(fake_slurm, "SIGNALLED=1; SIGNAL_NAME=SIGTERM; requeue_if_signalled 143")
    assert "requeueing job 4242 after SIGTERM; the job continues from its last checkpoint" in preempted.stdout
    assert (fake_slurm / "calls.log").read_text() == "requeue 4242\n"


FAKE_NVIDIA_SMI = """#!/usr/bin/env bash
for i in 0 1 2 3 4 5 6 7; do echo "GPU $i: NVIDIA A100-SXM4-40GB (UUID: GPU-$i)"; done
echo "  MIG 3g.20gb     Device  0: (UUID: MIG-0)"
"""
GPU_VARIABLES = ("SLURM_GPUS_ON_NODE", "CUDA_VISIBLE_DEVICES")


def test_gpu_count_is_the_jobs_not_the_nodes(fake_slurm):
    """The node shows 8 GPUs (and a MIG device); the job was given fewer."""
    (fake_slurm / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
    (fake_slurm / "nvidia-smi").chmod(0o755)

    def count(**variables):
        exports = "".join(f"export {name}={value!r}; " for name, value in variables.items())
        result = run_common(fake_slurm, f"unset {' '.join(GPU_VARIABLES)}; {exports}job_gpus_on_node")
        assert result.returncode == 0, result.stderr
        return int(result.stdout)

    assert count(SLURM_GPUS_ON_NODE="2", CUDA_VISIBLE_DEVICES="0,1,2,3") == 2
    assert count(CUDA_VISIBLE_DEVICES="3,5") == 2  # SLURM sets it to the job's GPUs
    assert count(CUDA_VISIBLE_DEVICES="GPU-5d1e,MIG-77aa,GPU-0b3c") == 3
    assert count(CUDA_VISIBLE_DEVICES="2,-1,3") == 1  # CUDA ignores everything from -1 on
    assert count(CUDA_VISIBLE_DEVICES="") == 0
    assert count() == 8  # outside SLURM: the node's GPUs, not its MIG lines
    (fake_slurm / "nvidia-smi").unlink()
    assert count() == 0


def test_rendezvous_port_is_the_jobs_own(fake_slurm):
    port = "rendezvous_port"
    assert run_common(fake_slurm, port, SLURM_JOB_ID="4242").stdout == "19242\n"
    assert run_common(fake_slurm, port, SLURM_JOB_ID="1234243").stdout == "19243\n"  # the next job, the next port
    assert run_common(fake_slurm, port, SLURM_JOB_ID="4242", MASTER_PORT="29517").stdout == "29517\n"
    assert run_common(fake_slurm, f"unset SLURM_JOB_ID MASTER_PORT; {port}").stdout == "29500\n"


# torchrun as the multi-GPU script starts it, without torch: it records its arguments, says it is
# ready, and on USR1 or TERM does what torchrun does after passing the signal to the ranks: rank 0's
# last line, then its own SignalException traceback, and exit status 1. FAKE_ERROR replaces the
# traceback's last line with another exception.
FAKE_TORCHRUN = """#!/usr/bin/env bash
known="--nnodes --nproc_per_node --rdzv_id --rdzv_backend --rdzv_endpoint ${FAKE_TORCHRUN_FLAGS---signals-to-handle --local-addr}"
if [[ "$1" == --help ]]; then printf '  %s VALUE\\n' $known; exit 0; fi
for arg in "$@"; do  # argparse's answer to a flag it does not know, before the script's own flags
    [[ "$arg" == *.py ]] && break
    if [[ " $known " != *" ${arg%%=*} "* ]]; then echo "torchrun: error: unrecognized arguments: $arg" >&2; exit 2; fi
done
echo "torchrun $*" >>"$(dirname "$0")/calls.log"
echo $$ >"$(dirname "$0")/torchrun.pid"
on_signal() {
    echo "stopped by SIGUSR1 at epoch 2, step 6; resume with --resume auto --name unet-4242"
    cat >&2 <<EOF
Traceback (most recent call last):
  File "/venv/bin/torchrun", line 6, in <module>
    sys.exit(main())
             ^^^^^^
  File "/venv/lib/python3.11/site-packages/torch/distributed/elastic/agent/server/api.py", line 923, in _invoke_run
    time.sleep(monitor_interval)
  File "/venv/lib/python3.11/site-packages/torch/distributed/elastic/multiprocessing/api.py", line 86, in _terminate_process_handler
    raise SignalException(f"Process {os.getpid()} got signal: {sigval}", sigval=sigval)
${FAKE_ERROR:-torch.distributed.elastic.multiprocessing.api.SignalException: Process $$ got signal: 10}
EOF
    exit 1
}
trap on_signal USR1 TERM
echo "[rank0]: ready"
while true; do sleep 0.1; done
"""


def start_multigpu_script(fake_slurm, **env) -> tuple[subprocess.Popen, list[str]]:
    """train_multigpu.sh with the fake torchrun, on a node of 8 GPUs of which the job has 2 (1 and 3);
    returns once the fake torchrun runs, with the lines written so far."""
    for name, text in (("torchrun", FAKE_TORCHRUN), ("nvidia-smi", FAKE_NVIDIA_SMI)):
        (fake_slurm / name).write_text(text)
        (fake_slurm / name).chmod(0o755)
    base = {k: v for k, v in slurm_env(fake_slurm).items() if k not in GPU_VARIABLES}
    process = subprocess.Popen(["bash", str(ROOT / "slurm" / "train_multigpu.sh"), "--epochs", "3"],
                               env={**base, "CUDA_VISIBLE_DEVICES": "1,3", **env}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    while (line := process.stdout.readline()) and "[rank0]: ready" not in line:
        lines.append(line)
    assert line, "".join(lines)
    return process, [*lines, line]


def finish(process: subprocess.Popen, lines: list[str], sig=None, whole_job=False) -> str:
    """Sends `sig` to the job script, or with `whole_job` to all its processes, as `scancel --signal`
    without --batch and preemption do; returns all of the output."""
    if sig is not None:
        if whole_job:
            os.killpg(process.pid, sig)
        else:
            process.send_signal(sig)
    rest, _ = process.communicate(timeout=60)
    return "".join(lines) + rest


@pytest.mark.parametrize("whole_job", [False, True], ids=["batch-shell", "whole-job"])
def test_multigpu_script_requeues_with_one_line_not_torchruns_traceback(fake_slurm, whole_job):
    process, lines = start_multigpu_script(fake_slurm)
    output = finish(process, lines, signal.SIGUSR1, whole_job)
    assert process.returncode == 1, output
    assert "Traceback" not in output and "SignalException" not in output, output
    assert "[rank0]: ready" in output and "stopped by SIGUSR1 at epoch 2, step 6;" in output
    assert output.endswith("requeueing job 4242 after SIGUSR1: last.pt saved at epoch 2, step 6; "
                           "the job continues from there\n"), output
    calls = (fake_slurm / "calls.log").read_text().splitlines()
    # the job's 2 GPUs, not the node's 8; the job's own port
    assert "--nproc_per_node=2" in calls[0] and "--rdzv_endpoint=127.0.0.1:19242" in calls[0], calls
    assert "1 node(s) x 2 process(es), rendezvous 127.0.0.1:19242" in output
    assert calls[-1] == "requeue 4242"


@pytest.mark.parametrize("flags", ["--signals-to-handle", "--signals-to-handle --shutdown-timeout", ""],
                         ids=["signals-only", "signals-and-timeout", "neither"])
def test_multigpu_script_passes_torchrun_only_the_flags_it_has(fake_slurm, flags):
    """torchrun gained --shutdown-timeout releases after --signals-to-handle; a PyTorch between the two
    refuses the second flag as argparse does, and every multi-GPU job would fail at launch."""
    process, lines = start_multigpu_script(fake_slurm, FAKE_TORCHRUN_FLAGS=flags, SLURM_CPUS_PER_TASK="8")
    output = finish(process, lines, signal.SIGUSR1)
    assert "unrecognized arguments" not in output and "[rank0]: ready" in output, output
    launch = (fake_slurm / "calls.log").read_text().splitlines()[1]
    assert ("--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in launch) == ("--signals-to-handle" in flags)
    assert ("--shutdown-timeout=100" in launch) == ("--shutdown-timeout" in flags)
    assert ("cannot forward USR1" in output) == (not flags)
    # the step gets the job's cores: srun no longer passes --cpus-per-task on by itself (Slurm 22.05)
    assert (fake_slurm / "calls.log").read_text().startswith("srun --kill-on-bad-exit=1 --cpus-per-task=8 torchrun")


def test_each_node_gives_torchrun_its_slurm_node_name_as_its_address(fake_slurm):
    """Evaluated on the node (srun runs the command there): rank 0's node then names itself by a name every
    node resolves, not by a hostname that its /etc/hosts maps to 127.0.0.1."""
    process, lines = start_multigpu_script(fake_slurm, SLURMD_NODENAME="node-7")
    finish(process, lines, signal.SIGUSR1)
    launch = (fake_slurm / "calls.log").read_text().splitlines()[1]
    assert launch.startswith("torchrun --local-addr=node-7 --signals-to-handle="), launch


def test_the_run_folder_in_the_log_is_the_one_train_py_writes(fake_slurm):
    show = 'run_folder improved-unet "$@"; echo "$RUN_NAME $RUN_DIR"'

    def folder(*flags, **env):
        result = subprocess.run(["bash", "-c", f"set -euo pipefail; source slurm/common.sh; {show}", "bash", *flags],
                                cwd=ROOT, env=slurm_env(fake_slurm, **env), capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    assert folder("--epochs", "3") == "unet-4242 runs/unet-4242"
    assert folder("--name", "isic", "--epochs", "3") == "isic runs/isic"
    assert folder("--name=first", "--out-dir", "/scratch/me", "--name", "isic") == "isic /scratch/me/isic"
    assert folder("--out-dir=/scratch/me", RUN_NAME="resumed") == "resumed /scratch/me/resumed"
    assert folder("--name", "isic", RUN_NAME="resumed") == "isic runs/isic"  # train.py's --name comes last


def test_errors_name_the_run_folder_and_how_to_resume_it(fake_slurm):
    ended = run_common(fake_slurm, 'run_folder x --name isic; SIGNALLED=1; SIGNAL_NAME=SIGTERM; requeue_if_signalled 143',
                       FAKE_JOB_STATE="COMPLETING")
    assert "so it is not requeued; resubmit with RUN_NAME=isic to resume" in ended.stdout, ended.stdout


FAKE_CONDA = """#!/usr/bin/env bash
# conda's shell hook defines a function; its activation reads variables that may be unset, as conda's own do
if [[ "$1 $2" == "shell.bash hook" ]]; then
    echo 'conda() { [[ "$1" == activate ]] && export CONDA_DEFAULT_ENV="$2${CONDA_PS1_BACKUP:+}$NEVER_SET_BY_ANYONE"; }'
fi
"""


def test_conda_activation_that_reads_unset_variables_does_not_end_the_job(fake_slurm):
    (fake_slurm / "conda").write_text(FAKE_CONDA)
    (fake_slurm / "conda").chmod(0o755)
    result = subprocess.run(["bash", str(ROOT / "slurm" / "train.sh"), "--help"],
                            env=slurm_env(fake_slurm, PYTHON_ENV="unet"), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: train.py" in result.stdout


def test_a_miniconda_in_home_is_found_when_conda_is_not_on_path(fake_slurm, tmp_path):
    """Rangpur has no conda module: the course guide installs Miniconda in $HOME/miniconda3."""
    home = tmp_path / "home"
    (home / "miniconda3" / "bin").mkdir(parents=True)
    (home / "miniconda3" / "bin" / "conda").write_text(FAKE_CONDA)
    (home / "miniconda3" / "bin" / "conda").chmod(0o755)
    env = slurm_env(fake_slurm, PYTHON_ENV="torch", HOME=str(home))
    assert shutil.which("conda", path=env["PATH"]) is None
    result = subprocess.run(["bash", "-c", "source slurm/common.sh; activate_python_env; echo $CONDA_DEFAULT_ENV"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "torch", result.stdout + result.stderr
    (home / "miniconda3" / "bin" / "conda").unlink()
    missing = subprocess.run(["bash", "-c", "source slurm/common.sh; activate_python_env"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "source ~/miniconda3/bin/activate" in missing.stderr, missing.stderr


def test_the_callers_job_variables_do_not_reach_the_scripts(fake_slurm, monkeypatch):
    """A cluster user runs the tests with their own PYTHON_ENV, RUN_NAME or SLURM job exported."""
    for name, value in {"PYTHON_ENV": "/nowhere/env", "RUN_NAME": "theirs", "SLURM_ARRAY_TASK_ID": "3",
                        "MASTER_PORT": "1", "SLURM_CPUS_PER_TASK": "2"}.items():
        monkeypatch.setenv(name, value)
    shown = run_common(fake_slurm, 'activate_python_env; run_folder x; echo "$RUN_DIR ${MASTER_PORT:-} '
                                   '${SLURM_CPUS_PER_TASK:-}"')
    assert shown.returncode == 0 and shown.stdout == "runs/unet-4242  \n", shown.stdout + shown.stderr


def test_multigpu_script_keeps_the_tracebacks_it_did_not_cause(fake_slurm):
    # torchrun stopped by a signal that the job script did not send (scancel of the step): all of it shows
    process, lines = start_multigpu_script(fake_slurm)
    os.kill(int((fake_slurm / "torchrun.pid").read_text()), signal.SIGTERM)
    output = finish(process, lines)
    assert process.returncode == 1
    assert "Traceback (most recent call last):" in output and "SignalException: Process" in output, output
    assert "requeue" not in output and "requeue" not in (fake_slurm / "calls.log").read_text()
    # an error while stopping after the warning: its traceback shows, and the job is requeued
    process, lines = start_multigpu_script(fake_slurm, FAKE_ERROR="OSError: [Errno 28] No space left on device")
    output = finish(process, lines, signal.SIGUSR1)
    assert "Traceback (most recent call last):" in output and "OSError: [Errno 28]" in output, output
    assert "requeueing job 4242 after SIGUSR1" in output


def test_errors_stay_on_stderr_for_an_error_file(fake_slurm):
    # sbatch --error=FILE splits the streams: the job's errors must reach that file, not --output's
    result = subprocess.run(["bash", str(ROOT / "slurm" / "train.sh"), "--epochs", "many"], env=slurm_env(fake_slurm),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "invalid int value: 'many'" in result.stderr and "invalid int value" not in result.stdout
    assert "trains into runs/unet-4242" in result.stdout


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
    calls = (fake_slurm / "calls.log").read_text()
    assert calls.startswith("srun --kill-on-bad-exit=1 bash -c exec ") and \
        " torchrun --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout=100 " in calls, calls
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
