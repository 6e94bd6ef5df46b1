"""Tests for gpu_check.py on the CPU: the no-GPU exit, the stage runner, the summary from canned stage results,
the self-sent SIGUSR1, and the command line. The stages' real commands need a GPU and are not run here."""

import json
import math
import signal
import sys
import types
from pathlib import Path

import pytest
import torch

import gpu_check


def test_no_cuda_says_so_in_one_line_and_exits_2(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--out", str(tmp_path / "check")])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "no CUDA GPU is visible" in captured.err
    assert "Traceback" not in captured.err and not (tmp_path / "check").exists()


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_stage_runner_goes_on_past_a_failed_stage(tmp_path):
    def command_stage(name, code):
        def stage():
            log = tmp_path / f"{name}.log"
            status = gpu_check.run_command(python(code), log, timeout=60)
            return gpu_check.StageResult(name, status == 0, 0.0, gpu_check.last_line(log), str(log))
        return name, stage

    def broken():
        raise KeyError("summary")

    lines = []
    results = gpu_check.run_stages([command_stage("first", "import sys; print('boom'); sys.exit(3)"),
                                    ("second", broken), command_stage("third", "print('fine')")],
                                   log=lambda *a, **k: lines.append(a[0]))
    assert [(r.name, r.passed) for r in results] == [("first", False), ("second", False), ("third", True)]
    assert results[0].detail == "boom" and results[1].detail == "KeyError: 'summary'" and results[2].detail == "fine"
    assert "$ " in (tmp_path / "first.log").read_text()  # the log names the command it holds
    assert lines[0] == "[1/3] first ..." and lines[1].startswith("    FAIL") and lines[-1].startswith("    pass")


def test_a_command_past_its_timeout_is_stopped(tmp_path):
    log = tmp_path / "slow.log"
    assert gpu_check.run_command(python("import time; time.sleep(60)"), log, timeout=1) is None
    assert "[stopped after 1 s]" in log.read_text()
    assert gpu_check.run_command(["/nonexistent/program"], log, timeout=5) is None
    assert "could not start" in log.read_text()


def canned_benchmark(mfu=0.05, default_variant="bf16-cl"):
    def row(model, variant, ips):
        return {"model": model, "variant": variant, "size": 256, "train_images_per_s": ips,
                "train_peak_mb": 1500.0, "mfu": mfu}
    return {
        "meta": {"config": {"batch_size": 16}, "amp": "bf16", "peak_tflops": {"tflops": 989.0, "dtype": "bf16"},
                 "train_default": {"model": "ours-instance", "variant": default_variant}, "failed": {}},
        "results": [row("ours-batch", "bf16-cl", 1000.0), row("ours-batch", "bf16-cl-compile", 1250.0),
                    row("ours-instance", "bf16", 800.0), row("ours-instance", "bf16-cl", 900.0)],
        "data_pipeline": [{"size": 256, "images_per_s": 9000.0}],
        "memory_format": [{"model": "ours-instance", "size": 256, "dtype": "bf16", "nchw_images_per_s": 800.0,
                           "channels_last_images_per_s": 900.0, "channels_last_speedup": 1.125,
                           "faster": "channels-last"}],
    }


def test_benchmark_figures_take_the_variant_train_py_uses():
    figures = gpu_check.benchmark_figures(canned_benchmark())
    assert (figures["model"], figures["variant"], figures["size"], figures["batch_size"]) == \
        ("ours-instance", "bf16-cl", 256, 16)
    assert figures["train_images_per_s"] == 900.0 and figures["peak_memory_mb"] == 1500.0
    assert figures["isic_epoch_s"] == pytest.approx(2594 / 900 + 2594 / 9000)
    assert figures["compile_speedup"] == pytest.approx(1.25)
    assert figures["memory_format"]["faster"] == "channels-last"
    # the default variant missing (it failed): the fastest row of the same model stands in
    assert gpu_check.benchmark_figures(canned_benchmark(default_variant="bf16-cl-compile"))["variant"] == "bf16-cl"


def test_summary_from_canned_stage_results():
    gpu = {"gpu": "NVIDIA H200", "capability": "9.0", "device": "cuda:0", "torch": "2.9.0", "cuda": "12.8",
           "cudnn": "9.10.2"}
    stages = [
        gpu_check.StageResult("tests", True, 42.0, "7 passed, 320 deselected in 40.1s", "tests.log"),
        gpu_check.StageResult("benchmark", True, 100.0, "900 img/s", "benchmark.log",
                              gpu_check.benchmark_figures(canned_benchmark())),
        gpu_check.StageResult("resume", False, 70.0, "the interrupted run gave exit status 1, expected 138",
                              "resume.log"),
        gpu_check.StageResult("predict", True, 12.0, "Dice 0.8000 on the run's 26 synthetic test images",
                              "predict.log"),
    ]
    summary = gpu_check.build_summary(gpu, stages, 230.0)
    assert summary["passed"] is False
    assert json.loads(json.dumps(summary)) == summary  # plain JSON
    assert summary["figures"]["train_images_per_s"] == 900.0
    table = gpu_check.markdown(summary)
    for text in ("| GPU | NVIDIA H200, compute capability 9.0 |",
                 "| PyTorch | 2.9.0 (CUDA 12.8, cuDNN 9.10.2) |",
                 "| Training speed (ours-instance bf16-cl, 256 px, batch 16) | 900 images/s |",
                 "| MFU (model FLOPs / peak) | 5.0% of the dense bf16 peak, 989 TFLOP/s |",
                 "| Peak memory of a training step | 1,500 MB |",
                 "channels-last at 1.12x NCHW's speed (900 against 800 img/s, bf16): channels-last is faster |",
                 "| torch.compile (ours-batch, NHWC) | 1.25x the eager training speed |",
                 "| Resume after SIGUSR1 | FAIL: the interrupted run gave exit status 1, expected 138 |",
                 "| Prediction | pass: Dice 0.8000",
                 "| GPU tests (pytest -m gpu) | pass: 7 passed, 320 deselected in 40.1s |",
                 # 2594 / 900 + 2594 / 9000; the failed resume stage timed no checkpoint writes
                 "images: training steps, loader and checkpoint writes, no validation) | 3.2 s (checkpoint writes not "
                 "measured) |",
                 "| fp32, bf16 and fp16 (GradScaler) training | not run |",
                 "| Total time of this check | 3.8 min |",
                 "Some stages FAILED", "| resume | FAIL | 70 s | resume.log |"):
        assert text in table, text


def test_summary_without_a_benchmark_says_not_measured():
    gpu = {"gpu": "Tesla T4", "capability": "7.5", "device": "cuda:0", "torch": "2.9.0", "cuda": "12.6",
           "cudnn": "9.1.0"}
    summary = gpu_check.build_summary(gpu, [gpu_check.StageResult("tests", True, 1.0, "ok", "tests.log")], 5.0)
    table = gpu_check.markdown(summary)
    assert summary["passed"] and "All stages passed" in table
    assert "| Training speed | not measured |" in table and "| Resume after SIGUSR1 | not run |" in table


def test_main_writes_the_summary_and_fails_when_a_stage_fails(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(gpu_check, "gpu_info", lambda config: {
        "gpu": "Fake GPU", "capability": "9.0", "device": "cuda:0", "torch": "x", "cuda": "y", "cudnn": "z"})
    ran = []

    def fake(name, passed):
        def stage(config, out):
            ran.append(name)
            return gpu_check.StageResult(name, passed, 0.0, f"{name} done", str(out / f"{name}.log"))
        return stage

    for name in gpu_check.STAGES:
        monkeypatch.setattr(gpu_check, f"stage_{name}", fake(name, name != "benchmark"))
    (tmp_path / "keep.txt").write_text("not ours")
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--out", str(tmp_path), "--skip", "tests"])
    assert exit_info.value.code == 1
    assert ran == ["benchmark", "resume", "precision", "predict"]  # past the failed benchmark
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["benchmark", "resume", "precision", "predict"]
    assert "| benchmark | FAIL |" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "keep.txt").exists()  # only what the check writes is cleared

    for name in gpu_check.STAGES:
        monkeypatch.setattr(gpu_check, f"stage_{name}", fake(name, True))
    assert gpu_check.main(["--out", str(tmp_path)])["passed"]


def test_clear_outputs_removes_only_the_stages_own_files(tmp_path):
    for name in ("runs/old/last.pt", "synthetic/x.jpg", "benchmark/benchmark.json", "resume.log", "other/file"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    gpu_check.clear_outputs(tmp_path, ["resume"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["benchmark", "other"]
    (tmp_path / "precision" / "amp-off").mkdir(parents=True)
    (tmp_path / "predict-shipped-cpu").mkdir()
    gpu_check.clear_outputs(tmp_path, ["precision", "predict"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["benchmark", "other"]


def test_train_until_signal_sends_sigusr1_after_the_given_step(monkeypatch):
    received = []

    def fake_main(argv):
        model = torch.nn.Linear(2, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        previous = signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(steps))
        try:
            for steps in range(1, 5):
                model(torch.ones(1, 2)).sum().backward()
                optimizer.step()
        finally:
            signal.signal(signal.SIGUSR1, previous)
        assert argv == ["--epochs", "2"]

    monkeypatch.setitem(sys.modules, "train", types.SimpleNamespace(main=fake_main))
    gpu_check.train_until_signal(2, ["--epochs", "2"])
    assert received == [2]
    # the hook is gone afterwards: later optimizers in this process are not signalled
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    for _ in range(3):
        optimizer.step()
    assert received == [2]


def test_weight_difference():
    a = {"w": torch.zeros(3), "n": torch.tensor(4)}
    assert gpu_check.max_weight_difference(a, {"w": torch.zeros(3), "n": torch.tensor(4)}) == 0
    assert gpu_check.max_weight_difference(a, {"w": torch.tensor([0.0, 2e-3, 0.0]), "n": torch.tensor(4)}) == \
        pytest.approx(2e-3)
    assert gpu_check.max_weight_difference(a, {"w": torch.zeros(3)}) == math.inf
    assert gpu_check.max_weight_difference(a, {"w": torch.zeros(4), "n": torch.tensor(4)}) == math.inf


@pytest.mark.parametrize("raw, text", [(91002, "9.10.2"), (8902, "8.9.2"), (None, None)])
def test_cudnn_version_text(monkeypatch, raw, text):
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: raw)
    assert gpu_check.cudnn_version() == text


def test_command_line(capsys):
    config = gpu_check.parse_args([])
    assert (config.out, config.device, config.skip, config.timeout) == ("runs/gpu-check", "cuda", [], 300)
    config = gpu_check.parse_args(["--out", "x", "--device", "cuda:1", "--skip", "tests", "predict", "--timeout", "60"])
    assert (config.out, config.device, config.skip, config.timeout) == ("x", "cuda:1", ["tests", "predict"], 60)
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--skip", "train"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--timeout", "0"])
    assert "--timeout must be at least 1 second" in capsys.readouterr().err  # a usage error, not a traceback


def test_help_names_every_stage_and_the_exit_codes(capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for stage in gpu_check.STAGES:
        assert f"\n  {stage} " in text, stage
    assert "SIGUSR1" in text and "2 when there is no CUDA GPU" in text


def test_a_rocm_gpu_is_described_without_a_compute_capability(monkeypatch):
    """ROCm reports no compute capability (Hardware.capability is None): the check names the GPU and HIP."""
    import devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", "6.2", raising=False)
    monkeypatch.setattr(torch.version, "cuda", None)
    hw = devices.Hardware(torch.device("cuda", 0), "AMD Instinct MI250X (gfx90a)", None, torch.bfloat16, True)
    monkeypatch.setattr(devices, "select_device", lambda name: hw.device)
    monkeypatch.setattr(devices, "hardware", lambda device: hw)
    info = gpu_check.gpu_info(gpu_check.parse_args([]))
    assert info["gpu"] == "AMD Instinct MI250X (gfx90a)" and info["capability"] == "none (ROCm)"
    assert info["cuda"] == "HIP 6.2"


def test_a_job_near_its_time_limit_keeps_every_figure_measured_before_it(monkeypatch, tmp_path):
    """Inside a SLURM job the stages end before its limit: each command's time is cut to what is left, a stage is
    not started too late, and summary.json is rewritten after every stage (a job killed at its limit keeps it)."""
    import time

    monkeypatch.setattr(gpu_check, "gpu_info", lambda config: {
        "gpu": "Fake GPU", "capability": "8.0", "device": "cuda:0", "torch": "x", "cuda": "y", "cudnn": "z"})
    monkeypatch.setenv("SLURM_JOB_END_TIME", str(time.time() + gpu_check.SUMMARY_MARGIN_SECONDS + 100))
    seen = {}

    def tests(config, out):
        seen["seconds"] = config.seconds()
        return gpu_check.StageResult("tests", True, 0.0, "6 passed", "")

    def benchmark(config, out):
        seen["summary after tests"] = json.loads((out / "summary.json").read_text())["stages"]
        now = time.monotonic() + 10_000
        monkeypatch.setattr(time, "monotonic", lambda: now)  # the stage used up the time left
        return gpu_check.StageResult("benchmark", True, 0.0, "measured", "")

    monkeypatch.setattr(gpu_check, "stage_tests", tests)
    monkeypatch.setattr(gpu_check, "stage_benchmark", benchmark)
    monkeypatch.setattr(gpu_check, "stage_resume", lambda config, out: pytest.fail("started after the deadline"))
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", str(tmp_path), "--skip", "precision", "predict"])
    assert 30 < seen["seconds"] <= 100 / 3  # 300 s a command, but 100 s were left for three stages
    assert [stage["name"] for stage in seen["summary after tests"]] == ["tests"]
    stages = json.loads((tmp_path / "summary.json").read_text())["stages"]
    assert [(s["name"], s["passed"]) for s in stages] == [("tests", True), ("benchmark", True), ("resume", False)]
    assert stages[2]["detail"].startswith("not run: too little time")


def test_minutes_gives_each_stage_its_share_of_the_time_left(monkeypatch, tmp_path):
    """--minutes 2 for two stages: the first may use a minute; the second, what the first left."""
    import time

    monkeypatch.delenv("SLURM_JOB_END_TIME", raising=False)
    monkeypatch.setattr(gpu_check, "gpu_info", lambda config: {
        "gpu": "Fake GPU", "capability": "8.0", "device": "cuda:0", "torch": "x", "cuda": "y", "cudnn": "z"})
    shares = []

    def stage(name):
        def body(config, out):
            shares.append(config.seconds())
            return gpu_check.StageResult(name, True, 0.0, "ok", "")
        return body

    monkeypatch.setattr(gpu_check, "stage_tests", stage("tests"))
    monkeypatch.setattr(gpu_check, "stage_benchmark", stage("benchmark"))
    gpu_check.main(["--out", str(tmp_path), "--skip", "resume", "precision", "predict", "--minutes", "2"])
    assert 55 < shares[0] <= 60 and 110 < shares[1] <= 120
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--minutes", "-1"])


def fake_train_runs(monkeypatch, losses: dict, skipped: int = 0):
    """run_command that plays train.py: each --amp run writes metrics.csv with its loss (a missing one fails)."""
    def run_command(command, log, timeout, env=None):
        if "synthetic.py" in command:
            (Path(command[command.index("--out") + 1]) / "ISIC2018_Task1-2_Training_Input").mkdir(parents=True)
            return 0
        amp = command[command.index("--amp") + 1]
        run = Path(command[command.index("--out-dir") + 1]) / command[command.index("--name") + 1]
        with open(log, "a") as f:
            f.write(f"epoch 2: {skipped} fp16 step(s) overflowed and were skipped\n" if amp == "fp16" and skipped else "")
        if losses.get(amp) is None:
            return 1
        run.mkdir(parents=True, exist_ok=True)
        (run / "metrics.csv").write_text(f"epoch,train_loss\n1,0.9\n2,{losses[amp]}\n")
        return 0
    monkeypatch.setattr(gpu_check, "run_command", run_command)


def test_precision_stage_passes_within_the_band_and_names_the_precision_that_strays(monkeypatch, tmp_path):
    config = gpu_check.CheckConfig(out=str(tmp_path))
    band = gpu_check.PRECISION_BAND
    assert band > 0  # measured (python gpu_check.py --precision-band), not left at zero
    fake_train_runs(monkeypatch, {"off": 0.5, "bf16": 0.5 + band / 2, "fp16": 0.5 - band / 2}, skipped=3)
    result = gpu_check.stage_precision(config, tmp_path)
    assert result.passed, result.detail
    assert result.values["fp16"] == {"train_loss": 0.5 - band / 2, "overflow_steps": 3}
    assert "3 steps skipped" in result.detail

    fake_train_runs(monkeypatch, {"off": 0.5, "bf16": 0.5, "fp16": 0.5 + 3 * band})
    result = gpu_check.stage_precision(config, tmp_path)
    assert not result.passed and "--amp fp16 ends at loss" in result.detail and "bf16" not in result.detail.split(";")[0]

    fake_train_runs(monkeypatch, {"off": 0.5, "bf16": None, "fp16": 0.5})
    result = gpu_check.stage_precision(config, tmp_path)
    assert not result.passed and "--amp bf16: exit status 1" in result.detail


def test_predict_stage_fails_when_the_gpu_and_the_cpu_disagree_on_the_shipped_weights(monkeypatch, tmp_path):
    (tmp_path / "runs" / "gpu-check-train").mkdir(parents=True)
    (tmp_path / "runs" / "gpu-check-train" / "best.pt").write_bytes(b"x")
    (tmp_path / "synthetic" / "ISIC2018_Task1-2_Training_Input").mkdir(parents=True)
    config = gpu_check.CheckConfig(out=str(tmp_path))
    for gpu_dice, passed in ((0.8010, True), (0.8040, False)):
        scores = {"predict": 0.7, "predict-shipped-gpu": gpu_dice, "predict-shipped-cpu": 0.8000}
        monkeypatch.setattr(gpu_check, "predict_dice", lambda command, folder, log, seconds: (0, scores[folder.name], 160))
        result = gpu_check.stage_predict(config, tmp_path)
        assert result.passed is passed, result.detail
        assert result.values["shipped_dice_gpu"] == gpu_dice
    assert "differs from the CPU's by 0.0040" in result.detail


def test_checkpoint_writes_are_timed_and_count_in_the_projected_epoch_where_longer_than_it(tmp_path):
    import checkpoint

    checkpoint.save_checkpoint({"format": checkpoint.CHECKPOINT_FORMAT, "model": {"w": torch.zeros(1000)}},
                               tmp_path / "last.pt")
    seconds = gpu_check.checkpoint_write_seconds(tmp_path / "last.pt", tmp_path / "scratch")
    assert seconds > 0 and not (tmp_path / "scratch").exists()
    gpu = {"gpu": "H100", "capability": "9.0", "device": "cuda:0", "torch": "x", "cuda": "y", "cudnn": "z"}
    results = [gpu_check.StageResult("benchmark", True, 1.0, "ok", "", {**gpu_check.benchmark_figures(canned_benchmark())}),
               gpu_check.StageResult("resume", True, 1.0, "ok", "", {"checkpoint_write_s": 2.5})]
    summary = gpu_check.build_summary(gpu, results, 10.0)  # the steps take 3.2 s: the writes overlap them
    assert summary["figures"]["isic_epoch_s"] == pytest.approx(results[0].values["isic_epoch_s"])
    assert "takes 2.5 s in the background, within the next epoch" in gpu_check.markdown(summary)
    results[1].values["checkpoint_write_s"] = 9.0  # a slow network home: the next epoch's end waits for them
    summary = gpu_check.build_summary(gpu, results, 10.0)
    assert summary["figures"]["isic_epoch_s"] == 9.0 and "so the run waits for it" in gpu_check.markdown(summary)
