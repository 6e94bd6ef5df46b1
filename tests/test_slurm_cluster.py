"""The job scripts, unchanged, submitted with sbatch to a real SLURM scheduler shaped like UQ's Rangpur:
the test cluster that `sudo bash .ci/slurm_cluster.sh start` sets up (ten one-GPU nodes a100-0 .. a100-9,
each a slurmd in namespaces of its own, declaring no memory; partitions a100-test, a100, comp3710 and cpu,
the last on this machine; the course's read-only data copy). Skipped where no such cluster answers; with
REQUIRE_SLURM=1 (CI sets it) a missing cluster fails instead. Nothing here has a CUDA GPU: the jobs train
with --device cpu, and the GPUs are placeholders the scheduler hands out.

A requeued job may start again only two minutes after its requeue, so one fixture submits every job
at once and each test then waits for its own: the two minutes are spent once, in parallel (about
three minutes in all). Then six multi-process jobs side by side on this machine (the cpu partition), one
job across two nodes, and the course's data copy, each alone (one to two minutes each). There is no
slurmdbd, hence no sacct: `scontrol show job` (finished jobs stay ten minutes) and the jobcomp/filetxt
record, one line per attempt, are the scheduler's word.
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoint
from conftest import clean_environ, write_isic_folder

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_NAME = "unet-test"  # as .ci/slurm_cluster.sh names it
# The course's copy as jobs see it (read-only), and the folder behind it that the tests fill
COURSE_DATA = Path("/home/groups/comp3710/ISIC2018")
COURSE_SOURCE = Path("/var/lib/slurm-unet-test/course-data")
# The fabric's interface on every node, for gloo (as an administrator names a cluster's fabric)
FABRIC = {"GLOO_SOCKET_IFNAME": "unet0"}
EPOCHS = 4
# Each optimizer step of a first attempt sleeps this long (tests/slurm_site/sitecustomize.py): a
# 33-step epoch takes ~7 s, so a signal sent on a progress line lands mid-epoch.
STEP_SLEEP = "0.2"
# The time-limit job: slurmctld checks limits every 30 s and warns at the first check within lead time
# + 30 s of the end (send_job_warn_signal in src/slurmctld/job_mgr.c), so a one-minute limit with a
# 15 s lead is warned 15-45 s after the start: inside the first epoch, 33 steps x 1.5 s.
TIME_LIMIT_EPOCHS, TIME_LIMIT_SLEEP, TIME_LIMIT_SIGNAL = 2, "1.5", "--signal=B:USR1@15"
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


def cluster_problem() -> str | None:
    """Why the tests cannot run here, or None. They submit jobs, so only to the test cluster."""
    if shutil.which("sbatch") is None:
        return "sbatch is not installed (sudo bash .ci/slurm_cluster.sh start sets up a test cluster)"
    try:
        config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "scontrol show config did not answer within 30 s"
    if config.returncode != 0:
        return f"no SLURM controller answers ({config.stderr.strip()}); sudo bash .ci/slurm_cluster.sh start"
    name = re.search(r"^ClusterName\s*=\s*(\S+)", config.stdout, re.M)
    if name is None or name.group(1) != CLUSTER_NAME:
        return (f"the controller here runs cluster {name.group(1) if name else '?'}, not the test cluster "
                f"'{CLUSTER_NAME}' of .ci/slurm_cluster.sh; these tests submit jobs, so they do not run here")
    return None


@pytest.fixture(scope="module")
def cluster():
    problem = cluster_problem()
    if problem is not None:
        if os.environ.get("REQUIRE_SLURM") == "1":
            pytest.fail(f"REQUIRE_SLURM=1 but {problem}")
        pytest.skip(problem)
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    return {"jobcomp": Path(re.search(r"^JobCompLoc\s*=\s*(\S+)", config, re.M).group(1))}


def cluster_nodes() -> list[str]:
    """The test cluster's responding nodes, this machine's first (.ci/slurm_cluster.sh makes one or two)."""
    listed = subprocess.run(["sinfo", "--noheader", "--responding", "-N", "-o", "%N"], capture_output=True, text=True,
                            timeout=30).stdout.split()
    here = socket.gethostname().split(".")[0]
    return sorted(set(listed), key=lambda node: node != here)


def job_info(spec: str) -> dict:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); {} once the job is forgotten."""
    result = subprocess.run(["scontrol", "-o", "show", "job", spec], capture_output=True, text=True, timeout=30)
    if result.returncode != 0 or not result.stdout.strip():
        return {}
    return dict(re.findall(r"(\S+?)=(\S*)", result.stdout.splitlines()[0]))


def wait_for(condition, timeout: float, what):
    """Poll `condition` every second until it returns something true; `what` (text, or a function
    giving it at the time of failure) says what was awaited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"gave up after {timeout:.0f} s waiting for {what() if callable(what) else what}")


class Job:
    def __init__(self, spec: str, log: Path):
        self.spec, self.log = spec, log

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def info(self) -> dict:
        return job_info(self.spec)

    def finished(self, timeout: float = 420) -> dict:
        info = wait_for(lambda: (i := self.info()).get("JobState") in FINISHED and i, timeout,
                        lambda: f"job {self.spec} to finish (log {self.log}:\n{self.text()[-3000:]})")
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, self.text()[-3000:])
        return info


class Cluster:
    """Submits the project's scripts from the repository root; each job's working directory (and so
    its log folder) is under tmp_path."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        (tmp / "logs").mkdir(parents=True)
        self.env = {**clean_environ(), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                    "PYTHONPATH": str(ROOT / "tests" / "slurm_site"), "STEP_SLEEP": STEP_SLEEP,
                    "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
        self.submitted: list[str] = []

    def submit(self, script: str, name: str, *args, sbatch=(), env=None) -> Job:
        command = ["sbatch", "--parsable", f"--job-name={name}", f"--chdir={self.tmp}", *sbatch,
                   str(ROOT / "slurm" / script), *map(str, args)]
        result = subprocess.run(command, cwd=ROOT, env={**self.env, **(env or {})}, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stderr
        job_id = result.stdout.strip().split(";")[0]
        self.submitted.append(job_id)
        return Job(job_id, self.tmp / "logs" / f"{name}-{job_id}.out")

    def data(self, name: str) -> Path:
        """The same 48 generated images in a folder of the job's own (no two jobs write one cache)."""
        return write_isic_folder(self.tmp / "data" / name, n=48)

    def flags(self, name: str, epochs: int = EPOCHS) -> list[str]:
        return ["--data-dir", self.data(name), "--out-dir", self.tmp / "runs", "--image-size", "32",
                "--base-channels", "4", "--batch-size", "1", "--epochs", str(epochs), "--device", "cpu",
                "--num-preview", "1", "--val-fraction", "0.25", "--test-fraction", "0.125"]

    def cancel_all(self) -> None:
        if self.submitted:
            subprocess.run(["scancel", *self.submitted], capture_output=True, timeout=60)


def signal_mid_epoch(jobs: list[Job], cancel: list[Job] = (), timeout: float = 240) -> None:
    """scancel --signal=USR1 --batch (what SLURM does before a time limit, sent by hand) to each of
    `jobs`, and a plain scancel to each of `cancel`, as soon as its log shows a progress line inside
    epoch 2."""
    waiting = {job: ["--signal=USR1", "--batch"] for job in jobs} | {job: [] for job in cancel}

    def send_ready():
        for job, how in list(waiting.items()):
            if re.search(rf"^epoch 2(/{EPOCHS})?  step \d+/", job.text(), re.M):
                subprocess.run(["scancel", *how, job.spec], check=True, timeout=60)
                del waiting[job]
        return not waiting

    wait_for(send_ready, timeout, f"epoch 2 in the logs of {[job.spec for job in waiting]}")


@pytest.fixture(scope="module")
def jobs(cluster, tmp_path_factory):
    """Every job of this module, submitted at once. The uninterrupted references start 30 s later, out
    of the way of the others' start-up; they run at full speed."""
    slurm = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        # First and alone, so that its signal handler is in place (a few seconds) before the warning.
        limited = slurm.submit("train.sh", "time-limit", *slurm.flags("time-limit", TIME_LIMIT_EPOCHS),
                               sbatch=["--time=1", TIME_LIMIT_SIGNAL], env={"STEP_SLEEP": TIME_LIMIT_SLEEP})
        started = wait_for(lambda: re.search(r"run folder /|got USR1", limited.text()), 120,
                           f"job {limited.spec} to start training")
        assert started.group(0) == "run folder /", f"warned before training began:\n{limited.text()}"
        sweep = slurm.tmp / "sweep.txt"
        sweep.write_text("--seed 0\n--seed 1\n")
        later = ["--begin=now+30"]
        full_speed = {"STEP_SLEEP": ""}
        submitted = {
            "time_limit": limited,
            "usr1": slurm.submit("train.sh", "usr1", *slurm.flags("usr1")),
            # --name: the run folder is runs/hard-kill, and the log must say so
            "hard_kill": slurm.submit("train.sh", "hard", *slurm.flags("hard-kill"), "--name", "hard-kill",
                                      env={"STEP_SLEEP": "0.5"}),  # still training once the others are warned
            "cancelled": slurm.submit("train.sh", "cancelled", *slurm.flags("cancelled")),
            "ddp_usr1": slurm.submit("train_multigpu.sh", "ddp-usr1", *slurm.flags("ddp-usr1"), env=FABRIC),
            "sweep": slurm.submit("train.sh", "sweep", *slurm.flags("sweep"), env={"SWEEP": str(sweep)},
                                  sbatch=["--array=1-2", "--output=logs/%x-%A_%a.out"]),
            "reference": slurm.submit("train.sh", "reference", *slurm.flags("reference"), sbatch=later,
                                      env=full_speed),
            "reference_2": slurm.submit("train.sh", "reference-2", *slurm.flags("reference-2", TIME_LIMIT_EPOCHS),
                                        sbatch=later, env=full_speed),
            "ddp_reference": slurm.submit("train_multigpu.sh", "ddp-reference", *slurm.flags("ddp-reference"),
                                          sbatch=later, env={**full_speed, **FABRIC}),
        }
        reference_id = submitted["reference"].spec
        submitted["predict"] = slurm.submit(
            "predict.sh", "predict", "--checkpoint", slurm.tmp / "runs" / f"reference-{reference_id}" / "best.pt",
            "--input", slurm.tmp / "data" / "reference" / "ISIC2018_Task1-2_Training_Input",
            "--masks", slurm.tmp / "data" / "reference" / "ISIC2018_Task1_Training_GroundTruth",
            "--output", slurm.tmp / "predictions", "--device", "cpu", sbatch=[f"--dependency=afterok:{reference_id}"])
        # the same, one image a batch and slowed, to be warned mid-folder
        submitted["predict_usr1"] = slurm.submit(
            "predict.sh", "predict-usr1", "--checkpoint", slurm.tmp / "runs" / f"reference-{reference_id}" / "best.pt",
            "--input", slurm.tmp / "data" / "reference" / "ISIC2018_Task1-2_Training_Input",
            "--output", slurm.tmp / "predictions-usr1", "--device", "cpu", "--batch-size", "1",
            sbatch=[f"--dependency=afterok:{reference_id}"], env={"PREDICT_SLEEP": "0.5"})
        submitted["gpu_check"] = slurm.submit("gpu_check.sh", "gpucheck")
        array_id = submitted.pop("sweep").spec
        for task in (1, 2):
            submitted[f"sweep_{task}"] = Job(f"{array_id}_{task}", slurm.tmp / "logs" / f"sweep-{array_id}_{task}.out")
        signal_mid_epoch([submitted["usr1"], submitted["ddp_usr1"], submitted["sweep_2"]], [submitted["cancelled"]])
        kill_hard_and_requeue(submitted["hard_kill"], slurm.tmp / "runs" / "hard-kill")
        written_before_warning = warn_mid_folder(submitted["predict_usr1"], slurm.tmp / "predictions-usr1")
        # The resumed attempt keeps the job's one-minute limit and could be warned again; a real job's
        # limit is hours. Raise it while the job waits in the queue after its requeue.
        wait_for(lambda: limited.info().get("Restarts") == "1", 240, f"job {limited.spec} to be requeued")
        subprocess.run(["scontrol", "update", f"JobId={limited.spec}", "TimeLimit=10"], check=True, timeout=60)
        yield {"tmp": slurm.tmp, "jobcomp": cluster["jobcomp"], "written_before_warning": written_before_warning,
               **submitted}
    finally:
        slurm.cancel_all()


def kill_hard_and_requeue(job: Job, folder: Path) -> None:
    """What a node failure, the OOM killer or a kill after a slow save does: SIGKILL to the training
    process in epoch 2, so its lock stays behind; the lock is then made another node's (where the job
    ran before it was requeued elsewhere), and the job requeued by hand, as SLURM requeues after a node
    failure."""
    lock = folder / ".lock"
    wait_for(lambda: re.search(rf"^epoch 2(/{EPOCHS})?  step \d+/", job.text(), re.M) and lock.is_file(), 240,
             lambda: f"epoch 2 of job {job.spec}:\n{job.text()[-2000:]}")
    host, pid, owner, attempt = lock.read_text().split()
    assert (owner, attempt) == (job.spec, "0"), lock.read_text()
    ran_on = job.info()["BatchHost"]
    os.kill(int(pid), 9)  # the machine's pid space holds every node's processes
    wait_for(lambda: (i := job.info()).get("JobState") in FINISHED and i, 120, f"job {job.spec} to fail")
    subprocess.run(["scontrol", "requeue", job.spec], check=True, timeout=60)
    others = [node for node in cluster_nodes() if node != ran_on]
    if others:  # two nodes: the requeued job must start on the other one, where the lock is another host's
        subprocess.run(["scontrol", "update", f"JobId={job.spec}", f"ExcNodeList={ran_on}"], check=True, timeout=60)
    else:  # one node: the lock is made to read as another node's
        lock.write_text(f"node-b {pid} {owner} {attempt}\n")


def warn_mid_folder(job: Job, out: Path) -> dict[str, int]:
    """SLURM's warning to a prediction job once it has written five masks; returns the masks (name -> inode)
    that its first attempt left."""
    wait_for(lambda: len(list(out.glob("*_segmentation.png"))) >= 5, 420,
             lambda: f"masks from job {job.spec}:\n{job.text()[-2000:]}")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job.spec], check=True, timeout=60)
    wait_for(lambda: "requeueing job" in job.text(), 120, lambda: f"job {job.spec} to requeue:\n{job.text()}")
    return {path.name: path.stat().st_ino for path in out.glob("*_segmentation.png")}


def run_dir(jobs, job: Job, name: str) -> Path:
    return jobs["tmp"] / "runs" / f"{name}-{job.spec}"


def epochs_in_metrics(folder: Path) -> list[int]:
    rows = (folder / "metrics.csv").read_text().splitlines()[1:]
    return [int(row.split(",")[0]) for row in rows]


def same_weights(a: Path, b: Path) -> bool:
    first, second = checkpoint.load_checkpoint(a)["model"], checkpoint.load_checkpoint(b)["model"]
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def assert_readable(log: str) -> None:
    """Plain lines: no carriage returns, progress and per-epoch summary lines."""
    assert "\r" not in log
    assert re.search(rf"^epoch 1(/{EPOCHS})?  step \d+/\d+ \(\d+%\)  loss [\d.]+  img_s [\d.]+  ETA \d\d:\d\d:\d\d$",
                     log, re.M), log
    assert re.search(rf"^epoch +{EPOCHS}(/{EPOCHS})?  loss [\d.]+  val Dice", log, re.M), log


def assert_resumed_mid_epoch(jobs, job: Job, info: dict, name: str, reference: Job, reference_name: str,
                             epochs: int = EPOCHS) -> str:
    """The job requeued itself once, kept its id, stopped mid-epoch, resumed, trained each epoch
    once and ended with the weights of the uninterrupted reference."""
    log = job.text()
    assert info["Restarts"] == "1", (info, log)
    assert "attempt 1 on" in log and "attempt 2 on" in log, log  # the log keeps every attempt
    stopped = re.search(r"stopped by SIGUSR1 at epoch (\d+), step (\d+)", log)
    assert stopped and int(stopped.group(2)) > 0, log  # last.pt was written mid-epoch
    assert "got USR1" in log, log
    assert (f"requeueing job {info['JobId']} after SIGUSR1: last.pt saved at epoch {stopped.group(1)}, step "
            f"{stopped.group(2)}; the job continues from there") in log, log
    assert re.search(r"resuming from \S+last\.pt", log), log
    folder = run_dir(jobs, job, name)
    assert epochs_in_metrics(folder) == list(range(1, epochs + 1))
    reference.finished()
    assert same_weights(folder / "last.pt", run_dir(jobs, reference, reference_name) / "last.pt")
    return log


def test_train_script_trains_a_tiny_run_to_the_end(jobs):
    job = jobs["reference"]
    info = job.finished()
    assert info["Restarts"] == "0"
    folder = run_dir(jobs, job, "reference")
    assert epochs_in_metrics(folder) == list(range(1, EPOCHS + 1))
    assert (folder / "best.pt").is_file() and (folder / "summary.json").is_file()
    assert_readable(job.text())


def test_usr1_mid_epoch_requeues_resumes_and_matches_an_uninterrupted_run(jobs):
    job = jobs["usr1"]
    info = job.finished()
    log = assert_resumed_mid_epoch(jobs, job, info, "usr1", jobs["reference"], "reference")
    assert_readable(log)
    # the scheduler's record: the first attempt ended in the queue again, the second completed
    records = [line for line in jobs["jobcomp"].read_text().splitlines() if line.startswith(f"JobId={job.spec} ")]
    assert [re.search(r"JobState=(\S+)", line).group(1) for line in records] == ["PENDING", "COMPLETED"], records


def test_time_limit_warning_requeues_resumes_and_matches_an_uninterrupted_run(jobs):
    job = jobs["time_limit"]
    info = job.finished()
    log = assert_resumed_mid_epoch(jobs, job, info, "time-limit", jobs["reference_2"], "reference-2",
                                   TIME_LIMIT_EPOCHS)
    assert "TIME LIMIT" not in log  # warned in time, never killed at the limit


def test_multigpu_script_two_processes_save_on_usr1_and_resume(jobs):
    """Rangpur's nodes hold one GPU each: the script's two processes are on two nodes."""
    job = jobs["ddp_usr1"]
    info = job.finished()
    log = assert_resumed_mid_epoch(jobs, job, info, "ddp-usr1", jobs["ddp_reference"], "ddp-reference")
    assert "2 node(s) x 1 process(es)" in log
    # torchrun passed the signal on and waited for the ranks, instead of dying of it under srun
    assert "User defined signal 1" not in log and "closing signal SIGUSR1" in log, log
    # and its SignalException traceback after the save stays out of the log: a requeue is one line
    assert "Traceback" not in log and "SignalException" not in log and "srun: error" not in log, log


def test_a_hard_killed_job_requeued_elsewhere_takes_over_its_own_lock_and_completes(jobs):
    job = jobs["hard_kill"]
    info = job.finished()
    log = job.text()
    folder = jobs["tmp"] / "runs" / "hard-kill"
    assert info["Restarts"] == "1" and "attempt 2 on" in log, (info, log)
    assert f"trains into {folder}" in log  # the --name the job was given, not <job name>-<job id>
    assert "is in use by another run" not in log, log
    nodes = re.findall(r"attempt \d+ on (\S+):", log)
    assert len(nodes) == 2 and (nodes[0] != nodes[1]) == (len(cluster_nodes()) > 1), log  # requeued elsewhere
    assert re.search(r"resuming from \S+last\.pt \(epoch [2-4], step 0\)", log), log  # from an epoch's end
    assert epochs_in_metrics(folder) == list(range(1, EPOCHS + 1))
    assert not (folder / ".lock").exists()
    jobs["reference"].finished()
    assert same_weights(folder / "last.pt", run_dir(jobs, jobs["reference"], "reference") / "last.pt")


def test_a_warned_prediction_job_requeues_and_keeps_its_finished_masks(jobs):
    job = jobs["predict_usr1"]
    out, written = jobs["tmp"] / "predictions-usr1", jobs["written_before_warning"]
    assert 5 <= len(written) < 48, written
    info = job.finished()
    log = job.text()
    assert info["Restarts"] == "1" and "stopped by SIGUSR1" in log, log
    assert f"{len(written)} of the 48 images were segmented into" in log, log
    masks = {path.name: path.stat().st_ino for path in out.glob("*_segmentation.png")}
    assert len(masks) == 48 and all(masks[name] == inode for name, inode in written.items())
    assert not list(out.glob(".*.tmp.*"))


def test_the_gpu_check_job_says_in_its_log_what_it_found(jobs):
    """No GPU on the test cluster: gpu_check.py's own answer (exit 2, one line), and where the summary goes.
    It ran on a100-test, within that partition's 20 minutes."""
    job = jobs["gpu_check"]
    info = wait_for(lambda: (i := job.info()).get("JobState") in FINISHED and i, 300, f"job {job.spec} to end")
    log = job.text()
    assert info["ExitCode"] == "2:0", (info, log)
    assert info["Partition"] == "a100-test" and info["TimeLimit"] == "00:20:00", info
    assert f"summary in runs/gpucheck-{job.spec}/summary.md" in log, log
    assert "gpu_check.py: no CUDA GPU is visible to PyTorch" in log, log


def test_a_cancelled_job_stays_cancelled(jobs):
    """scancel sends TERM to the job script, as preemption does; the job is ending, so no requeue."""
    job = jobs["cancelled"]
    decision = wait_for(lambda: re.search(r"^.*(requeueing|not requeued).*$", job.text(), re.M), 120,
                        lambda: f"job {job.spec} to decide about a requeue:\n{job.text()[-3000:]}")
    assert "got TERM" in job.text() and "so it is not requeued" in decision.group(0), job.text()
    info = wait_for(lambda: (i := job.info()).get("JobState") in FINISHED and i, 120, f"job {job.spec} to end")
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", info


def test_predict_script_writes_masks_and_metrics(jobs):
    jobs["predict"].finished()
    out = jobs["tmp"] / "predictions"
    assert len(list(out.glob("*_segmentation.png"))) == 48
    assert (out / "metrics.json").is_file()


def test_array_tasks_are_sweep_runs_that_resume(jobs):
    first, second = jobs["sweep_1"], jobs["sweep_2"]
    array_id = first.spec.split("_")[0]
    assert first.finished()["Restarts"] == "0"
    second_info = second.finished()
    folders = [jobs["tmp"] / "runs" / f"sweep-{array_id}_{task}" for task in (1, 2)]
    for folder, seed in zip(folders, (0, 1)):
        assert checkpoint.load_checkpoint(folder / "last.pt")["train_config"]["seed"] == seed
        assert epochs_in_metrics(folder) == list(range(1, EPOCHS + 1))
    log = second.text()
    assert second_info["Restarts"] == "1" and "attempt 2 on" in log and "got USR1" in log, log
    # only this task: `scontrol requeue <array id>` would requeue them all
    assert f"requeueing job {array_id}_2 after SIGUSR1" in log, log
    reference = run_dir(jobs, jobs["reference"], "reference") / "last.pt"
    jobs["reference"].finished()
    assert same_weights(folders[0] / "last.pt", reference)  # seed 0 is the reference's seed
    assert not same_weights(folders[1] / "last.pt", reference)


def listening_ports() -> set[int]:
    """The TCP ports that something on this machine listens on (state 0A in /proc/net/tcp*)."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            if state == "0A":
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def rendezvous_port(job: Job) -> int | None:
    banner = re.search(r"1 node\(s\) x 2 process\(es\), rendezvous \S+:(\d+),", job.text())
    return int(banner.group(1)) if banner else None


def test_multigpu_jobs_sharing_a_node_rendezvous_apart(cluster, tmp_path):
    """Three pairs of two-process jobs on the one node. The second of each pair starts once the first
    holds its rendezvous store, and the first ends while the second still trains. With one port for
    every job the second would join the first's store and fail when the first ends (DistNetworkError:
    what two jobs on one node did with MASTER_PORT fixed at 29500); with a port of its own each
    completes. A GPU node of Rangpur holds one job's GPU; nodes with several GPUs do share, as this
    machine's cpu partition does here: one node, no GPU, two processes a job (sbatch's flags and
    NPROC_PER_NODE override the script's two nodes of one GPU)."""
    slurm = Cluster(tmp_path)
    node = cluster_nodes()[0]  # this machine, whose listening ports the test can read
    # the script's 8 CPUs: six jobs fit on the node's 64 at once
    release = {"first": tmp_path / "release-first", "second": tmp_path / "release-second"}
    one_node = ["--partition=cpu", "--gres=none", "--nodes=1", f"--nodelist={node}"]

    def submit(role: str, pair: int) -> Job:
        name = f"{role}-{pair}"
        return slurm.submit("train_multigpu.sh", name, *slurm.flags(name, epochs=1), sbatch=one_node,
                            env={"STEP_SLEEP": "", "STEP_WAIT_FOR": str(release[role]), "NPROC_PER_NODE": "2"})

    def training(jobs: list[Job]):
        return lambda: all("run folder /" in job.text() for job in jobs)  # train.py's line, after the rendezvous

    def logs(jobs: list[Job]):
        return lambda: "\n".join(job.text()[-1000:] for job in jobs)

    try:
        firsts = [submit("first", pair) for pair in range(3)]
        wait_for(lambda: all(rendezvous_port(job) in listening_ports() for job in firsts), 180, logs(firsts))
        seconds = [submit("second", pair) for pair in range(3)]
        wait_for(training(firsts + seconds), 240, logs(firsts + seconds))
        release["first"].touch()
        for job in firsts:
            job.finished(timeout=180)
        assert all(job.info().get("JobState") == "RUNNING" for job in seconds)  # they outlived the firsts
        release["second"].touch()
        for job in seconds:
            job.finished(timeout=180)
    finally:
        release["first"].touch()
        release["second"].touch()
        slurm.cancel_all()
    assert len({rendezvous_port(job) for job in firsts + seconds}) == 6


def test_a_two_node_job_trains_with_one_rendezvous_across_the_nodes(cluster, tmp_path):
    """Two nodes of two processes each (sbatch --nodes=2 --gres=gpu:2 on nodes with two GPUs; here the cpu
    node's processes stand in, NPROC_PER_NODE=2, on two GPU nodes): one torchrun per node, started by srun,
    meeting at the first node's c10d store (MASTER_ADDR from the job's node list), four gloo processes in
    all. Each GPU node is a slurmd in its own network namespace (.ci/slurm_cluster.sh); the nodes' link is
    named unet0 on every node, which GLOO_SOCKET_IFNAME names."""
    nodes = [node for node in cluster_nodes() if node.startswith("a100-")]
    slurm = Cluster(tmp_path)
    job = slurm.submit("train_multigpu.sh", "two-nodes", *slurm.flags("two-nodes", epochs=2), sbatch=["--nodes=2"],
                       env={"STEP_SLEEP": "", "NPROC_PER_NODE": "2", **FABRIC})
    try:
        info = job.finished(timeout=300)
    finally:
        slurm.cancel_all()
    log = job.text()
    allocated = subprocess.run(["scontrol", "show", "hostnames", info["NodeList"]], capture_output=True, text=True,
                               timeout=30).stdout.split()
    assert len(set(allocated)) == 2 and set(allocated) <= set(nodes), info
    # the first node of the allocation hosts the rendezvous, whichever of the two it is
    assert f"2 node(s) x 2 process(es), rendezvous {allocated[0]}:" in log, log
    folder = tmp_path / "runs" / f"two-nodes-{job.spec}"
    assert epochs_in_metrics(folder) == [1, 2]
    assert len(checkpoint.load_checkpoint(folder / "last.pt")["rng_ranks"]) == 4  # one random stream per rank


# --- Rangpur as its students find it -------------------------------------------------------------------


def test_every_job_script_is_accepted_unchanged_and_lands_where_its_header_says(cluster):
    """sbatch --test-only: the scheduler's own word that each script's #SBATCH lines fit a partition of
    this Rangpur-shaped cluster, with no memory request."""
    expected = {"train.sh": "a100", "predict.sh": "a100", "gpu_check.sh": "a100-test", "train_multigpu.sh": "a100",
                "download.sh": "cpu"}
    assert sorted(expected) == sorted(p.name for p in (ROOT / "slurm").glob("*.sh") if p.name != "common.sh")
    for script, partition in expected.items():
        text = (ROOT / "slurm" / script).read_text()
        assert not re.search(r"^#SBATCH --mem", text, re.M), script
        result = subprocess.run(["sbatch", "--test-only", str(ROOT / "slurm" / script)], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and f"in partition {partition}" in result.stderr, (script, result.stderr)


def test_a_memory_request_is_refused_as_on_rangpur(cluster):
    """Why the scripts ask for no memory: the nodes declare RealMemory=1."""
    result = subprocess.run(["sbatch", "--test-only", "--mem=32G", str(ROOT / "slurm" / "train.sh")], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "Requested node configuration is not available" in result.stderr, result


def test_the_course_partition_without_its_account_never_starts(cluster, tmp_path):
    """comp3710 allows the comp3710 account only (AllowAccounts): a job without --account waits for good.
    (With --account=comp3710 it runs on Rangpur; that needs slurmdbd's accounts, which this cluster lacks.)"""
    result = subprocess.run(["sbatch", "--parsable", "--partition=comp3710", f"--chdir={tmp_path}", "--wrap", "true"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    job = result.stdout.strip()
    try:
        info = wait_for(lambda: (i := job_info(job)).get("Reason") not in (None, "None") and i, 30,
                        f"a reason for job {job} to wait")
        time.sleep(6)  # a scheduling pass later it still waits
        info = job_info(job)
        assert info["JobState"] == "PENDING" and "comp3710" in info["Reason"] + info.get("Partition", ""), info
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def course(cluster, tmp_path_factory):
    """The course's read-only copy with 24 training pairs and 3 test images, a training job on it, the same
    command again once it has finished, and a prediction job on its test folder."""
    from conftest import write_course_copy

    if not COURSE_DATA.is_dir() or not COURSE_SOURCE.is_dir():
        pytest.fail(f"{COURSE_DATA} is not mounted from {COURSE_SOURCE}; .ci/slurm_cluster.sh start mounts it")
    for child in COURSE_SOURCE.iterdir():  # its contents: the nodes' read-only mount shows this very folder
        shutil.rmtree(child)
    write_course_copy(COURSE_SOURCE, n=24, n_test=3)
    slurm = Cluster(tmp_path_factory.mktemp("course"))
    slurm.env.update({"STEP_SLEEP": "", "XDG_CACHE_HOME": str(slurm.tmp / "home-cache")})
    flags = ["--data-dir", COURSE_DATA, "--out-dir", slurm.tmp / "runs", "--image-size", "32", "--base-channels", "4",
             "--batch-size", "4", "--epochs", "2", "--num-preview", "1", "--val-fraction", "0.25",
             "--test-fraction", "0.125", "--name", "course"]
    try:
        trained = slurm.submit("train.sh", "course", *flags, "--device", "cpu")
        after = [f"--dependency=afterok:{trained.spec}"]
        yield {
            "source": COURSE_SOURCE, "tmp": slurm.tmp, "train": trained,
            "again": slurm.submit("train.sh", "course-again", *flags, "--device", "cpu", sbatch=after),
            "predict": slurm.submit("predict.sh", "course-predict", "--checkpoint", slurm.tmp / "runs/course/best.pt",
                                    "--input", COURSE_DATA / "ISIC2018_Task1-2_Test_Input", "--output",
                                    slurm.tmp / "course-masks", "--device", "cpu", sbatch=after),
            # the same training without --device cpu: the job holds a GPU that PyTorch cannot use
            "no_gpu": slurm.submit("train.sh", "no-gpu", *flags[:-1], "no-gpu"),
        }
    finally:
        slurm.cancel_all()


def test_train_script_trains_from_the_read_only_course_copy(course):
    job = course["train"]
    job.finished()
    log = job.text()
    assert (COURSE_DATA / "ISIC2018_Task1-2_Training_Input_x2").is_dir()
    assert "ignored 2 files that are not images" in log, log
    assert f"{COURSE_DATA} is read-only, so the cache goes to {course['tmp'] / 'home-cache'}" in log, log
    assert epochs_in_metrics(course["tmp"] / "runs" / "course") == [1, 2]
    # the log ends with where everything is and the command that predicts with it
    assert "best validation Dice" in log and f"predict with python predict.py --checkpoint " in log, log
    assert not [p for p in course["source"].rglob("*") if ".cache" in p.parts]


def test_the_same_command_on_a_finished_run_says_so_and_succeeds(course):
    job = course["again"]
    info = job.finished()
    log = job.text()
    assert info["Restarts"] == "0" and "already finished on" in log and "resuming from" not in log, log
    assert "Use a new --name for a new run, or a larger --epochs (was 2)" in log, log


def test_predict_script_segments_the_course_test_folder_without_masks(course):
    course["predict"].finished()
    masks = sorted(p.name for p in (course["tmp"] / "course-masks").glob("*_segmentation.png"))
    assert masks == [f"ISIC_{9000000 + i:07d}_segmentation.png" for i in range(3)]
    assert not (course["tmp"] / "course-masks" / "metrics.json").exists()  # nothing to score against
    assert not [p for p in (course["source"] / "ISIC2018_Task1-2_Test_Input").iterdir() if p.suffix != ".jpg"]


def test_a_gpu_job_whose_gpu_pytorch_cannot_use_fails_at_once_and_is_not_requeued(course):
    job = course["no_gpu"]
    info = wait_for(lambda: (i := job.info()).get("JobState") in FINISHED and i, 300, f"job {job.spec} to end")
    log = job.text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "1:0" and info["Restarts"] == "0", (info, log)
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: this SLURM job was given a GPU (SLURM_"), log
    assert "--device cpu" in errors[0] and "Traceback" not in log and "epoch" not in log, log


def test_download_script_fetches_the_ground_truth_on_the_cpu_partition(cluster, tmp_path):
    """slurm/download.sh from a server on this machine (the cpu partition's node): the masks alone."""
    from test_download import Server, official_zips

    slurm = Cluster(tmp_path)
    with Server(official_zips(n=3)) as server:
        job = slurm.submit("download.sh", "download", "--root", tmp_path / "truth", "--splits", "train",
                           "--masks-only", "--no-check-counts", "--base-url", server.url)
        info = job.finished(timeout=300)
    assert info["Partition"] == "cpu"
    assert len(list((tmp_path / "truth" / "ISIC2018_Task1_Training_GroundTruth").glob("*.png"))) == 3
    assert "train ground truth ready in" in job.text()
