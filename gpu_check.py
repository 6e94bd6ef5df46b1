"""The first thing to run on a CUDA machine: the GPU tests, a quick benchmark, a training run stopped by SIGUSR1
and resumed, training in fp32, bf16 and fp16, and prediction; its --timeout bounds each command, and inside a SLURM job every stage ends before the
job's time limit, with summary.json and summary.md rewritten after each stage.

    python gpu_check.py                     # logs, runs and the summary in runs/gpu-check/
    python gpu_check.py --skip tests        # leave stages out: tests, benchmark, resume, precision, predict

Each stage runs its commands as separate processes, their output in <out>/<stage>.log; a failed stage is reported
and the others still run. The summary (GPU, torch, training images/s and MFU at 256 px, peak memory, the faster
memory format with instance norm, the resume, precision and predict checks, the projected ISIC epoch) is printed and written
to <out>/summary.json and <out>/summary.md. Exit status: 0 when every stage passed, 1 when one failed, 2 when
there is no CUDA GPU to check.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import dataclasses
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import budget
import checkpoint
import devices
import predict
import synthetic
import utils

ROOT = Path(__file__).resolve().parent
STAGES = ("tests", "benchmark", "resume", "precision", "predict")
ISIC_TRAIN_IMAGES = 2594  # ISIC 2018 Task 1 training images: the basis of the projected epoch
BENCH_SIZE, BENCH_BATCH = 256, 16  # the image size and batch train.py uses on ISIC by default
SYNTHETIC_IMAGES = 160  # the default split trains on 115 of them: 14 batches of 8, more than STEPS_PER_EPOCH
STEPS_PER_EPOCH = 10  # --max-steps: every epoch of the resume check is exactly this long
# Inside a SLURM job the stages end this long before its time limit, to leave time for the summary
SUMMARY_MARGIN_SECONDS = 60
MIN_STAGE_SECONDS = 30  # a stage is not started with less time than this left
SIGNAL_AT_STEP = 15  # the interrupted run gets SIGUSR1 after this optimizer step: epoch 2, step 5 of 10
PREEMPTED = 128 + signal.SIGUSR1  # train.py's exit status after saving last.pt on SIGUSR1
# Deterministic kernels make a resumed run repeat the uninterrupted one bit for bit on the same GPU (as
# tests/test_train.py asserts on the CPU); a resume error (a batch skipped or repeated, the schedule one step
# off, Adam's moments lost) moves the weights by about the learning rate (1e-3), far above this.
RESUME_ATOL = 1e-5
NONDETERMINISTIC = "does not have a deterministic implementation"  # torch's warning under warn_only
# The precision stage: the same short run (seed, data, steps) in float32, bf16 and fp16 with GradScaler (the V100
# and P100 path, which an A100 or H100 runs only when asked). Rounding moves the last epoch's mean training loss of
# the reduced-precision runs away from float32's by PRECISION_BAND at most; a broken path (a wrong cast, a loss
# that stops learning, most steps skipped as overflows) moves it by far more. PRECISION_MEASURED is what the CPU gave for bf16 and
# fp16 (python gpu_check.py --precision-band on a 2-core AMD EPYC, PyTorch 2.14.1), the band four times the larger.
PRECISIONS = ("off", "bf16", "fp16")
PRECISION_MEASURED = {"bf16": 0.0141, "fp16": 0.0136}  # from 0.623 in fp32, 2026-12-07; the first epoch ends near 1.32
PRECISION_BAND = 0.056
PREDICT_DICE_TOLERANCE = 0.002  # mean Dice of the shipped weights, this GPU's precision against the CPU's float32
OVERFLOWED = re.compile(r"(\d+) fp16 step\(s\) overflowed")  # train.py's line for the steps GradScaler skipped


@dataclass
class CheckConfig:
    out: str = "runs/gpu-check"  # folder for the stage logs, the runs, summary.json and summary.md
    device: str = "cuda"  # the GPU to check: cuda or cuda:N (the gpu-marked tests use the default GPU)
    skip: list[str] = field(default_factory=list)  # stages to leave out, from STAGES
    timeout: int = 300  # seconds one command may run before it is stopped and its stage fails
    minutes: float = 0.0  # the whole check's time: each stage gets its share of what is left; 0: no limit but a SLURM job's
    deadline: float | None = None  # time.monotonic() by which every stage must be over (--minutes, a SLURM job's limit)
    precision_band: bool = False  # measure the precision stage's runs on this machine's CPU (PRECISION_MEASURED) and exit

    def __post_init__(self):
        unknown = [s for s in self.skip if s not in STAGES]
        if unknown:
            raise ValueError(f"--skip {' '.join(unknown)}: choose from {', '.join(STAGES)}")
        if self.timeout < 1:
            raise ValueError(f"--timeout must be at least 1 second, got {self.timeout}")
        if self.minutes < 0:
            raise ValueError(f"--minutes must be 0 (no limit) or more, got {self.minutes}")

    def seconds(self) -> float:
        """How long the next command may run: --timeout, or less when the deadline is nearer."""
        if self.deadline is None:
            return self.timeout
        return max(1.0, min(self.timeout, self.deadline - time.monotonic()))

    def time_is_up(self) -> bool:
        return self.deadline is not None and self.deadline - time.monotonic() < MIN_STAGE_SECONDS


@dataclass
class StageResult:
    name: str
    passed: bool
    seconds: float
    detail: str  # one line: what was measured, or why the stage failed
    log: str  # the log of the stage's commands
    values: dict = field(default_factory=dict)  # figures for the summary table


# ----------------------------------------------------------------------------- running commands


def run_command(command: list[str], log: Path, timeout: float, env: dict | None = None) -> int | None:
    """Run one command from the repository root, its output appended to `log`. Returns its exit status, or
    None when it ran past `timeout` (its whole process group is then killed) or could not start."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(command)}\n")
        f.flush()
        try:
            # a session of its own, so that a timeout also ends the command's worker processes
            process = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        except OSError as err:
            f.write(f"[could not start: {err}]\n")
            return None
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            f.write(f"\n[stopped after {timeout} s]\n")
            return None
        finally:
            if process.poll() is None:  # timed out, or gpu_check itself was interrupted
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def last_line(log: Path) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def status_text(code: int | None) -> str:
    return "it timed out or could not start" if code is None else f"exit status {code}"


def run_stages(stages: list[tuple[str, Callable[[], StageResult]]], log: Callable = print,
               time_is_up: Callable[[], bool] = lambda: False,
               on_result: Callable[[list[StageResult]], None] = lambda results: None) -> list[StageResult]:
    """Each stage in turn; one that fails (or raises) is reported, and the next one still runs. Past the
    deadline (`time_is_up`) a stage is not started and fails as not run. `on_result` hears the results so far
    after every stage, so that a job ended at its time limit keeps the figures already measured."""
    results = []
    for i, (name, stage) in enumerate(stages, 1):
        log(f"[{i}/{len(stages)}] {name} ...", flush=True)
        start = time.perf_counter()
        if time_is_up():
            result = StageResult(name, False, 0.0, "not run: too little time was left before the job's time limit", "")
        else:
            try:
                result = stage()
            except Exception as err:  # a bug or an unreadable output: this stage fails, the others still run
                result = StageResult(name, False, 0.0, f"{type(err).__name__}: {err}", "")
        result.seconds = round(time.perf_counter() - start, 1)
        results.append(result)
        log(f"    {'pass' if result.passed else 'FAIL'} ({result.seconds:.0f} s): {result.detail}", flush=True)
        on_result(results)
    return results


# ----------------------------------------------------------------------------- the stages


def stage_tests(config: CheckConfig, out: Path) -> StageResult:
    log = out / "tests.log"
    code = run_command([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"], log,
                       config.seconds())
    summary = last_line(log)  # pytest's "6 passed, 300 deselected in 41.2s"
    return StageResult("tests", code == 0, 0.0, summary if code is not None else status_text(code), str(log))


def benchmark_figures(report: dict) -> dict:
    """The summary's figures from benchmark.json: the variant train.py trains the default (instance norm) model in,
    at the largest size timed; the memory-format verdict for instance norm; what torch.compile buys."""
    meta, rows = report["meta"], report["results"] or report.get("provisional", [])  # a run killed mid-size
    if not rows:
        return {}
    size = max(e["size"] for e in rows)
    default = meta["train_default"]
    at_size = sorted((e for e in rows if e["size"] == size), key=lambda e: -e["train_images_per_s"])
    # the default variant, else (it failed) the fastest of the same model, else the fastest of all
    row = next((e for e in at_size if (e["model"], e["variant"]) == (default["model"], default["variant"])),
               next((e for e in at_size if e["model"] == default["model"]), at_size[0]))
    data = {d["size"]: d["images_per_s"] for d in report["data_pipeline"]}
    figures = {"size": size, "batch_size": meta["config"]["batch_size"], "model": row["model"],
               "variant": row["variant"], "train_images_per_s": row["train_images_per_s"], "mfu": row.get("mfu"),
               "peak_tflops": meta.get("peak_tflops"), "peak_memory_mb": row["train_peak_mb"],
               # an epoch is the training steps plus the loader's work, as benchmark.py projects it
               "isic_epoch_s": ISIC_TRAIN_IMAGES / row["train_images_per_s"]
               + (ISIC_TRAIN_IMAGES / data[size] if size in data else 0.0)}
    if "rounds" in row:
        figures["provisional"] = f"{row['rounds']} of {row['of_rounds']} timed rounds"
    verdict = next((v for v in report.get("memory_format", []) if v["size"] == size and v["dtype"] == meta.get("amp")),
                   None)
    if verdict:
        figures["memory_format"] = verdict
    for model, key in (("ours-batch", "compile_speedup"), ("ours-instance", "compile_speedup_instance")):
        by_variant = {e["variant"]: e for e in rows if e["model"] == model and e["size"] == size}
        compiled = next((e for v, e in by_variant.items() if v.endswith("-compile")), None)
        if compiled and compiled["variant"].removesuffix("-compile") in by_variant:
            eager = by_variant[compiled["variant"].removesuffix("-compile")]
            figures[key] = compiled["train_images_per_s"] / eager["train_images_per_s"]
    return figures


def stage_benchmark(config: CheckConfig, out: Path) -> StageResult:
    log, folder = out / "benchmark.log", out / "benchmark"
    code = run_command([sys.executable, "benchmark.py", "--device", config.device, "--quick", "--sizes",
                        str(BENCH_SIZE), "--batch-size", str(BENCH_BATCH), "--models", "ours-batch", "ours-instance",
                        "--out", str(folder)], log, config.seconds())
    path = folder / "benchmark.json"
    if not path.exists():
        return StageResult("benchmark", False, 0.0, f"no benchmark.json ({status_text(code)})", str(log))
    report = json.loads(path.read_text())
    figures = benchmark_figures(report)
    problems = [status_text(code)] if code != 0 else []
    problems += [f"{k} failed ({v})" for k, v in report["meta"].get("failed", {}).items()]
    if not figures:
        problems.append("no results")
    measured = [f"{figures['train_images_per_s']:.0f} img/s ({figures['model']} {figures['variant']}, {figures['size']} "
                f"px{', provisional: ' + figures['provisional'] if 'provisional' in figures else ''})"] if figures else []
    detail = "; ".join(problems + measured)
    return StageResult("benchmark", not problems, 0.0, detail, str(log), figures)


def train_until_signal(step: int, argv: list[str]) -> None:
    """train.py's main, which sends itself SIGUSR1 right after optimizer step `step` of the run: a preemption at a
    known point mid-epoch, where a signal from outside would land wherever the GPU had got to. The handler, last.pt
    and the exit status are train.py's own. Run as a process of its own (see stage_resume)."""
    import train

    count = 0

    def after_step(optimizer, args, kwargs) -> None:
        nonlocal count
        count += 1
        if count == step:
            os.kill(os.getpid(), signal.SIGUSR1)

    hook = register_optimizer_step_post_hook(after_step)
    try:
        train.main(argv)
    finally:
        hook.remove()


def max_weight_difference(a: dict, b: dict) -> float:
    """The largest absolute difference between two state dicts' tensors (inf when their keys or shapes differ)."""
    if a.keys() != b.keys():
        return math.inf
    worst = 0.0
    for key in a:
        if a[key].shape != b[key].shape:
            return math.inf
        worst = max(worst, (a[key].double() - b[key].double()).abs().max().item() if a[key].numel() else 0.0)
    return worst


def final_val_dice(run: Path) -> float | None:
    try:
        rows = list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
        return float(rows[-1]["val_dice"])
    except (OSError, KeyError, IndexError, ValueError):
        return None


def make_synthetic(config: CheckConfig, data: Path, log: Path) -> int | None:
    """The synthetic lesion set the training stages share (made once)."""
    if (data / synthetic.IMAGE_FOLDER).is_dir():
        return 0
    return run_command([sys.executable, "synthetic.py", "--out", str(data), "-n", str(SYNTHETIC_IMAGES), "--seed", "0"],
                       log, config.seconds())


def checkpoint_write_seconds(source: Path, scratch: Path) -> float:
    """Seconds to write one epoch's checkpoints of a run (last.pt and best.pt, each fsynced and renamed, as train.py
    writes them) in --out's file system: on a network home these can take longer than a fast GPU's epoch."""
    state = checkpoint.load_checkpoint(source)
    start = time.perf_counter()
    for name in ("last.pt", "best.pt"):
        checkpoint.save_checkpoint(state, scratch / name)
    seconds = time.perf_counter() - start
    shutil.rmtree(scratch)
    return seconds


def stage_resume(config: CheckConfig, out: Path) -> StageResult:
    """A short training run (instance norm, --amp auto: bf16 from compute capability 8.0, fp16 below) on a synthetic
    set, stopped by SIGUSR1 mid-epoch and resumed with --resume auto, against the same run uninterrupted."""
    log, data, runs = out / "resume.log", out / "synthetic", out / "runs"
    code = make_synthetic(config, data, log)
    if code != 0:
        return StageResult("resume", False, 0.0, f"synthetic.py failed ({status_text(code)})", str(log))
    common = ["--device", config.device, "--data-dir", str(data), "--image-size", "64", "--epochs", "2",
              "--batch-size", "8", "--max-steps", str(STEPS_PER_EPOCH), "--seed", "0", "--deterministic",
              "--wandb", "disabled", "--no-progress", "--num-preview", "2", "--out-dir", str(runs)]
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "WANDB_MODE": "disabled"}  # cuBLAS reads it before its first call
    stopped = run_command([sys.executable, "-c", "import sys, gpu_check; "
                           "gpu_check.train_until_signal(int(sys.argv[1]), sys.argv[2:])", str(SIGNAL_AT_STEP),
                           *common, "--name", "gpu-check-train"], log, config.seconds(), env)
    run = runs / "gpu-check-train"
    if stopped != PREEMPTED or not (run / "last.pt").exists():
        return StageResult("resume", False, 0.0, f"the interrupted run gave {status_text(stopped)}, expected "
                           f"{PREEMPTED} (SIGUSR1) and last.pt", str(log))
    saved = checkpoint.load_checkpoint(run / "last.pt")
    where = (saved["epoch"], saved["step"])
    resumed = run_command([sys.executable, "train.py", *common, "--name", "gpu-check-train", "--resume", "auto"], log,
                          config.seconds(), env)
    whole = run_command([sys.executable, "train.py", *common, "--name", "gpu-check-reference"], log, config.seconds(), env)
    if resumed != 0 or whole != 0:
        return StageResult("resume", False, 0.0, f"the resumed run gave {status_text(resumed)}, the uninterrupted one "
                           f"{status_text(whole)}", str(log))
    difference = max_weight_difference(checkpoint.load_checkpoint(run / "last.pt")["model"],
                                       checkpoint.load_checkpoint(runs / "gpu-check-reference" / "last.pt")["model"])
    dice = final_val_dice(run), final_val_dice(runs / "gpu-check-reference")
    mid_epoch = 0 < where[1] < STEPS_PER_EPOCH
    passed = mid_epoch and difference <= RESUME_ATOL
    detail = (f"SIGUSR1 at epoch {where[0] + 1}, step {where[1]}{'' if mid_epoch else ' (not mid-epoch)'}; resumed "
              f"against uninterrupted: max weight difference {difference:.2g}, final val Dice "
              + " against ".join("n/a" if d is None else f"{d:.4f}" for d in dice))
    if not passed and NONDETERMINISTIC in log.read_text(errors="replace"):
        detail += f"; torch warned that an op {NONDETERMINISTIC} (see {log.name}), so the runs may differ by noise"
    writes = checkpoint_write_seconds(run / "last.pt", out / "checkpoint-writes")
    detail += f"; an epoch's checkpoint writes took {format_seconds(writes)}"
    return StageResult("resume", passed, 0.0, detail, str(log),
                       {"max_weight_difference": difference if math.isfinite(difference) else None,
                        "val_dice": list(dice), "stopped_at": list(where), "checkpoint_write_s": writes})


def last_train_loss(run: Path) -> float | None:
    try:
        return float(list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))[-1]["train_loss"])
    except (OSError, KeyError, IndexError, ValueError):
        return None


def precision_losses(device: str, data: Path, runs: Path, log: Path, seconds: Callable[[], float]) -> dict:
    """{amp: (the last epoch's training loss or None, fp16 steps skipped, exit status)} of the same short run in each
    of PRECISIONS: 64 px, 2 epochs of STEPS_PER_EPOCH steps, seed 0, the default kernels (not --deterministic)."""
    found = {}
    for amp in PRECISIONS:
        run = runs / f"amp-{amp}"
        start = log.stat().st_size if log.exists() else 0
        code = run_command([sys.executable, "train.py", "--device", device, "--data-dir", str(data), "--image-size",
                            "64", "--epochs", "2", "--batch-size", "8", "--max-steps", str(STEPS_PER_EPOCH), "--seed",
                            "0", "--amp", amp, "--wandb", "disabled", "--no-progress", "--num-preview", "0",
                            "--out-dir", str(runs), "--name", run.name], log, seconds(), {"WANDB_MODE": "disabled"})
        with open(log, "rb") as f:  # this run's part of the log
            f.seek(start)
            text = f.read().decode(errors="replace")
        found[amp] = (last_train_loss(run), sum(int(n) for n in OVERFLOWED.findall(text)), code)
    return found


def stage_precision(config: CheckConfig, out: Path) -> StageResult:
    """float32, bf16 and fp16 with GradScaler: each short run ends, and the reduced precisions' last training loss
    lies within PRECISION_BAND of float32's."""
    log, data, runs = out / "precision.log", out / "synthetic", out / "precision"
    code = make_synthetic(config, data, log)
    if code != 0:
        return StageResult("precision", False, 0.0, f"synthetic.py failed ({status_text(code)})", str(log))
    found = precision_losses(config.device, data, runs, log, config.seconds)
    reference = found["off"][0]
    problems, parts, values = [], [], {}
    for amp, (loss, skipped, code) in found.items():
        values[amp] = {"train_loss": loss, "overflow_steps": skipped}
        if code != 0 or loss is None:
            problems.append(f"--amp {amp}: {status_text(code)}, no training loss")
            continue
        parts.append(f"{amp} {loss:.4f}" + (f" ({skipped} steps skipped)" if skipped else ""))
        if amp != "off" and reference is not None and abs(loss - reference) > PRECISION_BAND:
            problems.append(f"--amp {amp} ends at loss {loss:.4f}, {abs(loss - reference):.4f} from float32's "
                            f"(band {PRECISION_BAND})")
    detail = "; ".join(problems + [f"last training loss {', '.join(parts)} (band {PRECISION_BAND} around fp32)"])
    return StageResult("precision", not problems, 0.0, detail, str(log), values)


def predict_dice(command: list[str], folder: Path, log: Path, seconds: float) -> tuple[int | None, float | None, int]:
    """(exit status, mean Dice, images scored) of one predict.py command writing to `folder`."""
    code = run_command([sys.executable, "predict.py", *command, "--output", str(folder), "--overwrite"], log, seconds)
    try:
        dice = json.loads((folder / "metrics.json").read_text())["dice"]
        images = len(list(csv.DictReader((folder / "metrics.csv").read_text().splitlines())))
    except (OSError, ValueError, KeyError):
        dice, images = None, 0
    return code, dice, images


def stage_predict(config: CheckConfig, out: Path) -> StageResult:
    """predict.py with the resume stage's best.pt on that run's held-out synthetic test images, scored; and the
    shipped weights on every synthetic image on this GPU (its default precision) and on the CPU in float32, whose
    mean Dice must agree within PREDICT_DICE_TOLERANCE."""
    log, best, data = out / "predict.log", out / "runs" / "gpu-check-train" / "best.pt", out / "synthetic"
    problems, parts, values = [], [], {}
    if best.exists():
        code, dice, images = predict_dice(["--checkpoint", str(best), "--device", config.device], out / "predict", log,
                                          config.seconds())
        values.update(dice=dice, images=images)
        if code == 0 and dice is not None and math.isfinite(dice):
            parts.append(f"Dice {dice:.4f} on the run's {images} synthetic test images")
        else:
            problems.append(f"the trained run's prediction gave {status_text(code)}, metrics.json: {dice}")
    else:
        problems.append(f"no {best}: the resume stage makes it")
    code = make_synthetic(config, data, log)
    if code != 0:
        return StageResult("predict", False, 0.0, f"synthetic.py failed ({status_text(code)})", str(log))
    shipped = ["--checkpoint", str(predict.SHIPPED_WEIGHTS), "--input",
               str(data / synthetic.IMAGE_FOLDER), "--masks", str(data / synthetic.MASK_FOLDER)]
    here = predict_dice([*shipped, "--device", config.device], out / "predict-shipped-gpu", log, config.seconds())
    cpu = predict_dice([*shipped, "--device", "cpu", "--amp", "off"], out / "predict-shipped-cpu", log,
                       config.seconds())
    values.update(shipped_dice_gpu=here[1], shipped_dice_cpu=cpu[1])
    if here[0] != 0 or cpu[0] != 0 or here[1] is None or cpu[1] is None:
        problems.append(f"the shipped weights' prediction gave {status_text(here[0])} here and {status_text(cpu[0])} "
                        f"on the CPU")
    else:
        gap = abs(here[1] - cpu[1])
        parts.append(f"shipped weights on {here[2]} synthetic images: Dice {here[1]:.4f} here, {cpu[1]:.4f} on the "
                     f"CPU in float32")
        if gap > PREDICT_DICE_TOLERANCE:
            problems.append(f"the shipped weights' Dice differs from the CPU's by {gap:.4f} (at most "
                            f"{PREDICT_DICE_TOLERANCE})")
    return StageResult("predict", not problems, 0.0, "; ".join(problems + parts), str(log), values)


# ----------------------------------------------------------------------------- the summary


def format_seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 10 else f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def build_summary(gpu: dict, results: list[StageResult], total_s: float) -> dict:
    """summary.json's content: the GPU, every stage's result, and the headline figures."""
    by_name = {r.name: r for r in results}
    bench = by_name["benchmark"].values if "benchmark" in by_name else {}
    writes = by_name["resume"].values.get("checkpoint_write_s") if "resume" in by_name else None
    figures = {}
    if bench.get("train_images_per_s"):
        figures = {
            "train_images_per_s": bench["train_images_per_s"], "train_setting": f"{bench['model']} {bench['variant']}, "
            f"{bench['size']} px, batch {bench['batch_size']}", "mfu": bench.get("mfu"),
            "peak_tflops": bench.get("peak_tflops"), "peak_memory_mb": bench.get("peak_memory_mb"),
            "memory_format": bench.get("memory_format"), "compile_speedup": bench.get("compile_speedup"),
            "compile_speedup_instance": bench.get("compile_speedup_instance"),
            # the epoch a run waits for: the steps and the loader's work; train.py writes the checkpoints on another
            # thread during the next epoch, so they add to it only where they take longer than the epoch
            "checkpoint_write_s": writes, "isic_epoch_s": max(bench["isic_epoch_s"], writes or 0.0),
        }
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        **gpu,
        "passed": all(r.passed for r in results),
        "stages": [asdict(r) for r in results],
        "figures": figures,
        "total_s": round(total_s, 1),
    }


def _verdict_text(v: dict | None) -> str:
    if not v:
        return "not measured"
    speed = (f"channels-last at {v['channels_last_speedup']:.2f}x NCHW's speed ({v['channels_last_images_per_s']:.0f} "
             f"against {v['nchw_images_per_s']:.0f} img/s, {v['dtype']})")
    return speed + (": no clear difference" if v["faster"] == "neither" else f": {v['faster']} is faster")


def epoch_text(f: dict) -> str:
    if not f:
        return "not measured"
    writes = f.get("checkpoint_write_s")
    if writes is None:
        return format_seconds(f["isic_epoch_s"]) + " (checkpoint writes not measured)"
    hidden = writes < f["isic_epoch_s"]
    return format_seconds(f["isic_epoch_s"]) + (
        f"; writing last.pt and best.pt takes {format_seconds(writes)} in the background, "
        + ("within the next epoch" if hidden else "longer than an epoch's steps, so the run waits for it: the "
           "file system of --out-dir is slow (write checkpoints to local or scratch disk)"))


def markdown(summary: dict) -> str:
    f = summary["figures"]
    stages = {s["name"]: s for s in summary["stages"]}

    def check(name: str) -> str:
        s = stages.get(name)
        return "not run" if s is None else f"{'pass' if s['passed'] else 'FAIL'}: {s['detail']}"

    peak = f.get("peak_tflops")
    mfu = "n/a" if f.get("mfu") is None else f"{f['mfu']:.1%}" + (
        f" of the dense {peak['dtype']} peak, {peak['tflops']:g} TFLOP/s" if peak else "")
    if f.get("train_images_per_s") and f.get("mfu") is None:
        mfu = "n/a (this GPU's peak is not in benchmark.py's table)"
    def compile_text(speedup: float | None) -> str:
        return "n/a" if speedup is None else f"{speedup:.2f}x the eager training speed"
    rows = [
        ("GPU", f"{summary['gpu']}, compute capability {summary['capability']}"),
        ("PyTorch", f"{summary['torch']} (CUDA {summary['cuda']}, cuDNN {summary['cudnn']})"),
        (f"Training speed ({f['train_setting']})" if f else "Training speed",
         f"{f['train_images_per_s']:.0f} images/s" if f else "not measured"),
        ("MFU (model FLOPs / peak)", mfu if f else "not measured"),
        ("Peak memory of a training step",
         "n/a" if f.get("peak_memory_mb") is None else f"{f['peak_memory_mb']:,.0f} MB"),
        ("Memory format with instance norm", _verdict_text(f.get("memory_format"))),
        ("torch.compile (ours-batch, NHWC)", compile_text(f.get("compile_speedup"))),
        ("torch.compile (ours-instance, the default model, NCHW)", compile_text(f.get("compile_speedup_instance"))),
        ("Resume after SIGUSR1", check("resume")),
        ("fp32, bf16 and fp16 (GradScaler) training", check("precision")),
        ("Prediction", check("predict")),
        ("GPU tests (pytest -m gpu)", check("tests")),
        (f"ISIC 2018 epoch at 256 px ({ISIC_TRAIN_IMAGES:,} images: training steps, loader and checkpoint writes, "
         "no validation)", epoch_text(f)),
        ("Total time of this check", format_seconds(summary["total_s"])),
    ]
    lines = [f"# GPU check: {summary['gpu']}, {summary['date'][:10]}", "",
             f"{'All stages passed' if summary['passed'] else 'Some stages FAILED'}.", "",
             "| check | result |", "|---|---|"]
    lines += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows]
    lines += ["", "| stage | result | time | log |", "|---|---|---:|---|"]
    # logs are named relative to summary.md, which lies beside them
    lines += [f"| {s['name']} | {'pass' if s['passed'] else 'FAIL'} | {format_seconds(s['seconds'])} "
              f"| {Path(s['log']).name if s['log'] else '-'} |" for s in summary["stages"]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> CheckConfig:
    defaults = CheckConfig()
    p = argparse.ArgumentParser(
        prog="gpu_check.py", description=__doc__.split("\n\n")[0],
        epilog="stages, in order:\n"
               "  tests      python -m pytest -m gpu -q (the tests marked gpu)\n"
               "  benchmark  python benchmark.py --device cuda --quick --sizes 256 --batch-size 16 --models ours-batch "
               "ours-instance:\n"
               "             images/s, MFU, peak memory, NCHW against channels-last with instance norm, torch.compile\n"
               "  resume     synthetic.py, then train.py (64 px, 2 epochs of 10 steps, --deterministic) stopped by\n"
               "             SIGUSR1 at epoch 2 step 5, resumed with --resume auto, and compared with an uninterrupted\n"
               "             run: the final weights must agree within 1e-5\n"
               "  precision  train.py, the same short run in fp32, bf16 and fp16 with GradScaler: the last training\n"
               f"             losses within {PRECISION_BAND} of fp32's\n"
               "  predict    predict.py with the resumed run's best.pt on its synthetic test images, and the shipped\n"
               f"             weights here and on the CPU (fp32): Dice within {PREDICT_DICE_TOLERANCE}\n\n"
               "Exit status: 0 when every stage passed, 1 when one failed, 2 when there is no CUDA GPU.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=defaults.out,
                   help=f"folder for the logs, runs, summary.json and summary.md (default {defaults.out})")
    p.add_argument("--device", default=defaults.device,
                   help="the GPU to check: cuda or cuda:N (default cuda; the gpu-marked tests use the default GPU)")
    p.add_argument("--skip", nargs="+", default=[], choices=STAGES, metavar="STAGE",
                   help=f"stages to leave out, from: {', '.join(STAGES)} (predict needs resume's checkpoint)")
    p.add_argument("--timeout", type=int, default=defaults.timeout,
                   help=f"seconds one command may run before it is stopped and its stage fails "
                        f"(default {defaults.timeout})")
    p.add_argument("--minutes", type=float, default=defaults.minutes,
                   help="the whole check's time, for a short slot (e.g. 8 on a machine lent for 9 minutes): each "
                        "stage gets an equal share of the time left, and the summary is written as each ends; inside a "
                        "SLURM job the job's limit also bounds it (default 0: only the job's limit)")
    p.add_argument("--precision-band", action="store_true",
                   help="run the precision stage's three short runs on this machine's CPU, print how far bf16 and fp16 "
                        "end from fp32 (the figures PRECISION_BAND rests on) and exit; needs no GPU")
    a = p.parse_args(argv)
    try:
        return CheckConfig(out=a.out, device=a.device, skip=a.skip, timeout=a.timeout, minutes=a.minutes,
                           precision_band=a.precision_band)
    except ValueError as err:
        p.error(str(err))


def gpu_info(config: CheckConfig) -> dict:
    """The GPU to check, or exit 2 with one line saying why there is none."""
    if not torch.cuda.is_available():
        build = "built without CUDA" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        print(f"gpu_check.py: no CUDA GPU is visible to PyTorch {torch.__version__} ({build}): nothing to check "
              "here (on a CPU, run the test suite: python -m pytest)", file=sys.stderr)
        raise SystemExit(2)
    try:
        hw = devices.hardware(devices.select_device(config.device))
    except (ValueError, devices.DeviceError) as err:
        print(f"gpu_check.py: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    # ROCm has no compute capability: hw.name carries the gfx architecture instead
    capability = f"{hw.capability[0]}.{hw.capability[1]}" if hw.capability else "none (ROCm)"
    return {"gpu": hw.name, "capability": capability, "device": str(hw.device), "torch": torch.__version__,
            "cuda": torch.version.cuda or (f"HIP {torch.version.hip}" if devices.is_rocm() else None),
            "cudnn": cudnn_version()}


def cudnn_version() -> str | None:
    """cuDNN's version as x.y.z: torch reports 9.10.2 as 91002 and 8.9.2 as 8902."""
    v = torch.backends.cudnn.version()
    if not v:
        return None
    major = v // 10000 if v >= 10000 else v // 1000
    rest = v % 10000 if v >= 10000 else v % 1000
    return f"{major}.{rest // 100}.{rest % 100}"


def clear_outputs(out: Path, stages: list[str]) -> None:
    """Remove what an earlier check left for the stages about to run (only the names this script writes: --out may
    be a folder with other things in it)."""
    owned = {"tests": ["tests.log"], "benchmark": ["benchmark.log", "benchmark"],
             "resume": ["resume.log", "runs", "synthetic"], "precision": ["precision.log", "precision"],
             "predict": ["predict.log", "predict", "predict-shipped-gpu", "predict-shipped-cpu"]}
    for name in [n for stage in stages for n in owned[stage]] + ["summary.json", "summary.md"]:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def measure_precision_band(config: CheckConfig) -> dict:
    """--precision-band: the precision stage's runs on the CPU; {amp: |last training loss - float32's|}."""
    out = Path(config.out).resolve()
    log, runs = out / "precision-band.log", out / "precision-band"
    log.unlink(missing_ok=True)
    shutil.rmtree(runs, ignore_errors=True)  # its own folders only: an earlier check's summary stays
    if make_synthetic(config, out / "synthetic", log) != 0:
        raise SystemExit(f"gpu_check.py: synthetic.py failed; see {log}")
    found = precision_losses("cpu", out / "synthetic", runs, log, config.seconds)
    if any(loss is None for loss, _, _ in found.values()):
        raise SystemExit(f"gpu_check.py: a run failed; see {log}")
    reference = found["off"][0]
    gaps = {amp: round(abs(loss - reference), 5) for amp, (loss, _, _) in found.items() if amp != "off"}
    print(f"last training loss on the CPU: {', '.join(f'{amp} {loss:.5f}' for amp, (loss, _, _) in found.items())}; "
          f"away from fp32: {gaps} (PRECISION_MEASURED holds {PRECISION_MEASURED}, band {PRECISION_BAND})")
    return gaps


def main(argv: list[str] | None = None) -> dict:
    config = parse_args(argv)
    if config.precision_band:
        return measure_precision_band(config)
    gpu = gpu_info(config)
    out = Path(config.out).resolve()
    chosen = [s for s in STAGES if s not in config.skip]
    clear_outputs(out, chosen)
    out.mkdir(parents=True, exist_ok=True)
    print(f"GPU check of {gpu['gpu']} (compute capability {gpu['capability']}, {gpu['device']}), torch {gpu['torch']}: "
          f"{', '.join(chosen)}; logs in {out}/", flush=True)
    bodies = {"tests": stage_tests, "benchmark": stage_benchmark, "resume": stage_resume, "precision": stage_precision,
              "predict": stage_predict}
    left = budget.slurm_seconds_left()
    limits = [t for t in (config.minutes * 60 if config.minutes else None,
                          left - SUMMARY_MARGIN_SECONDS if left is not None else None) if t is not None]
    if limits:  # end every stage in time to write the summary before the check's (or the job's) limit
        config = dataclasses.replace(config, deadline=time.monotonic() + min(limits))
        print(f"every stage ends within {budget.format_minutes(max(min(limits), 0))}"
              + (f" (the job's time limit is {budget.format_minutes(max(left, 0))} away)" if left is not None else ""),
              flush=True)
    start = time.perf_counter()

    def share(name: str) -> CheckConfig:
        """The config a stage runs with: its equal share of the time left before the deadline."""
        if config.deadline is None:
            return config
        stages_left = len(chosen) - chosen.index(name)
        return dataclasses.replace(config, deadline=time.monotonic() + (config.deadline - time.monotonic()) / stages_left)

    def write_summary(results: list[StageResult]) -> dict:
        summary = build_summary(gpu, results, time.perf_counter() - start)
        utils.write_json(out / "summary.json", summary)
        with utils.atomic_write(out / "summary.md") as tmp:
            tmp.write_text(markdown(summary))
        return summary

    results = run_stages([(name, lambda body=bodies[name], name=name: body(share(name), out)) for name in chosen],
                         time_is_up=config.time_is_up, on_result=write_summary)
    summary = write_summary(results)
    table = markdown(summary)
    print("\n" + table)
    print(f"wrote {out / 'summary.json'} and {out / 'summary.md'}")
    print(f"To report this GPU, send {out / 'summary.md'} (every figure above; summary.json holds the same in full)")
    if not summary["passed"]:
        raise SystemExit(1)
    return summary


if __name__ == "__main__":
    main()
