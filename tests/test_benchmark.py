"""Tests for benchmark.py: a tiny end-to-end run writes sane JSON and Markdown; the table's ratios and
projections are checked against hand-computed values; bad options fail clearly."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

import benchmark
import devices
import utils
from test_devices import fake_gpu, gpus  # noqa: F401 (gpus is a fixture)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fp32_cpu(monkeypatch):
    """The CPU variants of an fp32-only CPU, whatever this one has (test_default_models... sets both cases)."""
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)


def test_tiny_run_writes_json_and_markdown(tmp_path):
    report = benchmark.main(["--device", "cpu", "--quick", "--sizes", "32", "--batch-size", "2", "--models",
                             "ours-batch", "--repeats", "1", "--warmup", "0", "--data-images", "4",
                             "--threads", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    assert saved == json.loads(json.dumps(report))
    # on CPU ours runs in both memory formats, in fp32 and, where the CPU computes bf16 natively, in bf16
    native = ["bf16"] if devices.cpu_has_native_bf16() else []
    assert [(e["model"], e["variant"], e["size"]) for e in saved["results"]] == [
        ("ours-batch", variant, 32) for dtype in ["fp32", *native] for variant in (dtype, f"{dtype}-cl")]
    entry = saved["results"][0]
    assert entry["parameters"] == 3_186_483
    for key in ("train_images_per_s", "infer_images_per_s", "train_flops_per_s", "matmul_fraction"):
        assert math.isfinite(entry[key]) and entry[key] > 0, key
    assert entry["train_flops_per_s"] == pytest.approx(entry["train_flops_per_image"] * entry["train_images_per_s"])
    # training (forward + backward) costs about three forwards; the fused upsampling executes fewer FLOPs
    assert 2.5 < entry["train_flops_per_image"] / entry["infer_flops_per_image"] < 3.5
    assert entry["train_flops_per_image"] < entry["paper_train_flops_per_image"]
    assert len(entry["train_step_s"]) == 1
    assert entry["train_extra_mb"] is None or entry["train_extra_mb"] >= 0
    assert saved["matmul_flops_per_s"]["fp32"]["median"] > 0
    assert saved["data_pipeline"][0]["size"] == 32 and saved["data_pipeline"][0]["images_per_s"] > 0
    assert saved["meta"]["config"]["batch_size"] == 2
    table = (tmp_path / "benchmark.md").read_text()
    assert "## 32x32" in table and "| ours-batch | fp32 |" in table and "| ours-batch | fp32-cl |" in table and "Data pipeline" in table


def fake_report(size=256):
    def entry(model, ips, flops_per_image, **extra):
        return {"model": model, "variant": "fp32", "size": size, "train_images_per_s": ips,
                "infer_images_per_s": 3 * ips, "train_flops_per_image": flops_per_image,
                "train_flops_per_s": flops_per_image * ips, "matmul_fraction": flops_per_image * ips / 100e9,
                "train_peak_mb": 900.0, "train_extra_mb": 500.0, **extra}
    return {
        "meta": {"device": "test CPU", "device_type": "cpu", "date": "2026-01-01T00:00:00", "torch": "x",
                 "threads": 2, "config": {"batch_size": 8, "repeats": 5, "warmup": 2}, "malloc_tuned": False,
                 "other_cpu_before": 0.0, "other_cpu_during": 0.01,
                 "skipped": {"basicunet": "monai is not installed"}},
        "matmul_flops_per_s": {"fp32": {"median": 100e9, "max": 110e9, "all": [100e9]}},
        "data_pipeline": [{"size": size, "images_per_s": 100.0}],
        "results": [entry("ours-batch", 10.0, 8e9, paper_train_flops_per_image=9e9, paper_train_flops_per_s=90e9,
                          paper_matmul_fraction=0.9),
                    entry("dynunet", 20.0, 2e9)],
    }


def test_markdown_ratios_and_isic_epoch_projection():
    table = benchmark.markdown(fake_report())
    dyn_row = next(line for line in table.splitlines() if line.startswith("| dynunet"))
    cells = [c.strip() for c in dyn_row.strip("|").split("|")]
    assert cells[2:8] == ["20.00", "60.00", "2.00", "40.0", "40%", "500"]
    assert cells[8:10] == ["0.50x", "2.00x"]  # ours trains half as many images/s at twice the FLOP/s
    assert cells[10] == "2.2 min"  # 2594 images / 20 img/s = 129.7 s
    # training plus the data pipeline: 2594 / 10 + 2594 / 100 = 285.3 s
    assert "- ours-batch fp32: 4.8 min" in table
    assert "= 10.0x ours-batch's training speed" in table
    assert "fewer FLOPs per image" in table and "Not measured: basicunet" in table
    assert "90.0 GFLOP/s = 90% of matmul" in table


def test_unknown_model_and_bad_sizes_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown nnunet; choose from"):
        benchmark.main(["--models", "nnunet", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--sizes 48"):
        benchmark.main(["--sizes", "48", "--out", str(tmp_path)])


def test_missing_peer_is_skipped_with_the_reason(monkeypatch):
    monkeypatch.setattr(benchmark, "_installed", lambda name: name != "monai")
    names, skipped = benchmark.choose_models(benchmark.BenchConfig(models=["ours-batch", "dynunet", "basicunet"]))
    assert names == ["ours-batch"]
    assert set(skipped) == {"dynunet", "basicunet"}
    assert "requirements-bench.txt" in skipped["dynunet"]


def test_default_models_include_every_peer_and_variants_per_device(monkeypatch):
    config = benchmark.BenchConfig(quick=True)
    assert benchmark.DEFAULT_MODELS == ["ours-batch", "ours-instance", "dynunet", "basicunet", "smp-unet-r34"]
    for native, names in ((False, ["fp32", "fp32-cl"]), (True, ["fp32", "fp32-cl", "bf16", "bf16-cl"])):
        monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native)
        cpu = devices.hardware(torch.device("cpu"))
        assert [v.name for v in benchmark.variants_for("ours-batch", cpu, True)] == names
    assert [v.name for v in benchmark.variants_for("dynunet", cpu, True)] == ["fp32"]
    cuda = fake_gpu(monkeypatch, (9, 0))
    assert {v.name for v in benchmark.variants_for("ours-batch", cuda, False)} >= {"fp32", "bf16-cl", "bf16-cl-compile"}
    assert config.repeats == 3 and config.warmup == 1


@pytest.mark.parametrize("capability, amp, compiles", [((6, 0), "fp16", False), ((7, 0), "fp16", True),
                                                        ((8, 0), "bf16", True), ((9, 0), "bf16", True)])
def test_cuda_variants_take_the_amp_dtype_and_compile_from_the_capability(monkeypatch, capability, amp, compiles):
    # bf16 convolutions exist in cuDNN only from 8.0: a P100 or V100 benchmarks fp16, as train.py trains there
    hw = fake_gpu(monkeypatch, capability, "Tesla P100-PCIE-16GB" if capability < (7, 0) else "NVIDIA H200")
    assert benchmark.amp_name(hw) == amp
    quick = [v.name for v in benchmark.variants_for("ours-batch", hw, quick=True)]
    assert quick == ["fp32-cl", f"{amp}-cl"] + ([f"{amp}-cl-compile"] if compiles else [])
    assert [v.name for v in benchmark.variants_for("ours-batch", hw, True, compile=False)] == ["fp32-cl", f"{amp}-cl"]
    # both memory formats with instance norm, in the dtype training uses, and compiled as train.py --compile runs it
    compiled = [f"{amp}-compile"] if compiles else []
    assert [v.name for v in benchmark.variants_for("ours-instance", hw, quick=True)] == [amp, f"{amp}-cl", *compiled]
    full = [v.name for v in benchmark.variants_for("ours-instance", hw, quick=False)]
    assert full == ["fp32", "fp32-cl", amp, f"{amp}-cl", *compiled]
    assert [v.name for v in benchmark.variants_for("dynunet", hw, quick=True)] == [f"{amp}-cl"]
    runner = benchmark.Runner("ours-batch", benchmark.Variant(amp, True), 32, benchmark.BenchConfig(batch_size=1),
                              torch.device("cpu"))
    assert runner.autocast.fast_dtype == benchmark.AMP_DTYPES[amp]
    assert (runner.scaler is not None) == (amp == "fp16")  # loss scaling only for fp16, as train.py


def test_device_is_normalised_before_anything_uses_it(gpus, monkeypatch):
    # a bare "cuda" made the loader's device comparison fail (cuda != cuda:0) after the first size
    assert benchmark.resolve_device("cuda") == torch.device("cuda", 0)
    assert benchmark.resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert benchmark.resolve_device("auto") == torch.device("cpu")


def test_cuda_settings_match_train_py_and_are_restored(gpus):
    before = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with benchmark.cuda_settings(torch.device("cuda", 0)):  # only flags: a mocked GPU is enough
            assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32
            assert torch.backends.cudnn.allow_tf32
        assert not torch.backends.cudnn.benchmark and not torch.backends.cuda.matmul.allow_tf32
        with benchmark.cuda_settings(torch.device("cpu")):
            assert not torch.backends.cudnn.benchmark
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32) = before


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", (989.0, "bf16")), ("NVIDIA H100 PCIe", (756.0, "bf16")),
                                        ("NVIDIA H200", (989.0, "bf16")), ("NVIDIA A100-SXM4-80GB", (312.0, "bf16")),
                                        ("NVIDIA A10", (125.0, "bf16")), ("NVIDIA A10G", None),
                                        ("Tesla V100-SXM2-32GB", (125.0, "fp16")), ("Tesla P100-PCIE-16GB", (18.7, "fp16")),
                                        ("Tesla T4", (65.0, "fp16")), ("NVIDIA GeForce RTX 4090", (165.0, "bf16")),
                                        ("NVIDIA L40S", (362.0, "bf16")), ("NVIDIA GeForce GTX 1080", None),
                                        ("NVIDIA A100-SXM4-40GB MIG 3g.20gb", (312.0 * 3 / 7, "bf16")),
                                        ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", (989.0 / 7, "bf16"))])
def test_peak_tflops_by_gpu_name(name, peak):
    assert benchmark.peak_tflops(name) == peak  # a MIG slice: its share of the GPU's, so MFU is of the slice


@pytest.mark.parametrize("cuda", [True, False])
def test_peak_memory_is_read_after_a_warm_up_step_on_cuda_and_from_the_first_step_on_the_cpu(monkeypatch, cuda):
    """On CUDA the first steps hold cuDNN's and torch.compile's one-off workspaces; on the CPU the first step's
    growth of the resident set is the figure (the gradients and Adam's state)."""
    steps, measured = [], []

    class Recorder:
        def __init__(self, device):
            self.peak_mb = self.extra_mb = 1.0

        def __enter__(self):
            measured.append(len(steps))
            return self

        def __exit__(self, *exc):
            return False

    class Stub:
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        train_step = staticmethod(lambda: steps.append("train"))
        infer_step = staticmethod(lambda: steps.append("infer"))

    gpu = devices.Hardware(torch.device("cuda", 0), "NVIDIA H100", (9, 0), torch.bfloat16, True)
    monkeypatch.setattr(benchmark.devices, "hardware", lambda device: gpu if cuda else devices.Hardware(
        torch.device("cpu"), "CPU", None, None, False))
    monkeypatch.setattr(benchmark, "PeakMemory", Recorder)
    benchmark.Runner.measure_memory(Stub())
    assert measured == ([2, 3] if cuda else [0, 1])


def test_quick_flags_parse():
    config = benchmark.parse_args(["--device", "cuda", "--quick", "--no-compile", "--steps", "5", "--sizes", "256",
                                   "--batch-size", "16"])
    assert (config.quick, config.compile, config.steps, config.sizes, config.batch_size) == (True, False, 5, [256], 16)
    assert (config.repeats, config.warmup) == (3, 1)
    config = benchmark.parse_args([])
    assert (config.quick, config.compile, config.steps, config.repeats, config.warmup) == (False, True, 0, 5, 2)
    with pytest.raises(ValueError, match="--steps"):
        benchmark.parse_args(["--steps", "-1"])


def test_flops_scale_exactly_with_pixels():
    # benchmark.py counts FLOPs at 64x64 and scales them; check the scaling on our model at 32 -> 64
    import torch

    from torch.utils.flop_counter import FlopCounterMode

    from modules import ImprovedUNet, ModelConfig

    model = ImprovedUNet(ModelConfig(base_channels=4))
    counts = []
    for side in (32, 64):
        with FlopCounterMode(display=False) as fc:
            model(torch.randn(1, 3, side, side)).sum().backward()
        counts.append(fc.get_total_flops())
    assert counts[1] == 4 * counts[0]


@pytest.mark.gpu
def test_quick_cuda_run_times_amp_channels_last_and_both_formats_with_instance_norm(tmp_path):
    report = benchmark.main(["--device", "cuda", "--quick", "--no-compile", "--sizes", "64", "--batch-size", "2",
                             "--models", "ours-batch", "ours-instance", "--repeats", "1", "--warmup", "1",
                             "--steps", "2", "--out", str(tmp_path)])
    hw = devices.hardware(devices.select_device("cuda"))
    amp = "bf16" if hw.capability >= (8, 0) else "fp16"
    assert report["meta"]["device_index"] == str(hw.device) and report["meta"]["complete"]
    assert [(e["model"], e["variant"]) for e in report["results"]] == [
        ("ours-batch", "fp32-cl"), ("ours-batch", f"{amp}-cl"), ("ours-instance", amp), ("ours-instance", f"{amp}-cl")]
    assert all(e["train_peak_mb"] > 0 and e["matmul_fraction"] > 0 for e in report["results"])
    assert report["matmul_flops_per_s"][amp]["median"] > report["matmul_flops_per_s"]["fp32"]["median"]
    assert [v["dtype"] for v in report["memory_format"]] == [amp]
    if report["meta"]["peak_tflops"]:
        assert all(0 < e["mfu"] < 1 for e in report["results"])


def test_markdown_says_whether_other_processes_made_timings_noisy():
    quiet, busy = fake_report(), fake_report()
    busy["meta"]["other_cpu_during"] = 0.4
    assert "other processes used 1% of the CPU during the run." in benchmark.markdown(quiet)
    assert "other processes used 40% of the CPU during the run, so timings are noisy" in benchmark.markdown(busy)


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs Linux /proc/stat")
def test_other_cpu_counts_a_competing_process_but_not_our_own_work():
    import subprocess
    import sys
    import time

    def others_running() -> int:
        """Runnable threads on the machine besides this one (procs_running of /proc/stat counts this one too)."""
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("procs_running "):
                return int(line.split()[1]) - 1
        return 0

    # Our own busy work is not "other". Another program that ran at any point of this window would be
    # counted, rightly, so the scheduler's count of runnable threads is sampled throughout, and the check is
    # skipped when anything else ran in more than a twentieth of the samples (a process that starts or a
    # burst of load mid-window, not only before it).
    meter = utils.OtherCpu()
    samples = []
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        samples.append(others_running())
    own_only = meter.share()
    if sum(n > 0 for n in samples) > len(samples) / 20:
        pytest.skip(f"other processes ran during the check ({sum(n > 0 for n in samples)} of {len(samples)} samples)")

    meter = utils.OtherCpu()
    burner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 3\nwhile time.time() < end: pass"])
    try:
        time.sleep(1.5)  # the burner is still running, so its CPU time is not yet ours (not reaped)
        competing = meter.share()
    finally:
        burner.kill()
        burner.wait()
    cores = os.cpu_count() or 1
    assert own_only < 0.5 / cores
    assert competing > 0.5 / cores  # one busy process holds about one core of `cores`


def test_breakdown_reports_the_kernel_ceiling(tmp_path):
    report = benchmark.main(["--device", "cpu", "--quick", "--sizes", "32", "--batch-size", "2", "--models",
                             "ours-batch", "--repeats", "1", "--warmup", "0", "--data-images", "4", "--threads", "1",
                             "--breakdown", "--out", str(tmp_path)])
    entry = report["results"][0]  # NCHW, as train.py trains on CPU
    # FLOP_KERNELS must name the ops this PyTorch really runs: were the convolution kernels missed (a renamed
    # op), only the 1x1 matmuls would count and the share would fall to a few percent; were every op counted,
    # it would be 1. Measured here: 0.44 at 32x32, 0.71-0.84 at 128-256.
    assert 0.2 < entry["kernel_time_share"] < 0.95
    assert entry["kernel_flops_per_s"] == pytest.approx(entry["train_flops_per_s"] / entry["kernel_time_share"])
    assert entry["kernel_matmul_fraction"] == pytest.approx(
        entry["kernel_flops_per_s"] / report["matmul_flops_per_s"]["fp32"]["median"])
    assert "convolution and matmul kernels take" in (tmp_path / "benchmark.md").read_text()


def test_baseline_modules_are_timed_beside_ours(tmp_path):
    # the repository's own modules.py as the baseline: the same network, so the same parameter count and FLOPs
    report = benchmark.main(["--device", "cpu", "--quick", "--sizes", "32", "--batch-size", "2", "--models",
                             "ours-instance", "ours-baseline", "--baseline-modules", str(ROOT / "modules.py"),
                             "--repeats", "1", "--warmup", "0", "--data-images", "4", "--threads", "1",
                             "--out", str(tmp_path)])
    rows = {(e["model"], e["variant"]): e for e in report["results"]}
    assert set(rows) == {("ours-instance", "fp32"), ("ours-instance", "fp32-cl"), ("ours-baseline", "fp32")}
    assert rows["ours-baseline", "fp32"]["parameters"] == rows["ours-instance", "fp32"]["parameters"]
    assert rows["ours-baseline", "fp32"]["train_flops_per_image"] == rows["ours-instance", "fp32"]["train_flops_per_image"]
    with pytest.raises(ValueError, match="no such file"):
        benchmark.main(["--models", "ours-baseline", "--baseline-modules", str(tmp_path / "missing.py")])


TINY = ["--device", "cpu", "--quick", "--batch-size", "2", "--models", "ours-batch", "--repeats", "1", "--warmup", "0",
        "--data-images", "4", "--threads", "1"]


def test_each_model_is_measured_alone_and_a_failed_variant_is_named(tmp_path, monkeypatch):
    import weakref

    live = weakref.WeakSet()
    measure = benchmark.Runner.measure_memory
    alone = []

    def measure_memory(self):
        live.add(self)
        alone.append(len(live))  # the models measured before must be gone (with their gradients and Adam state)
        if self.variant.channels_last:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB\nmore detail")
        return measure(self)

    monkeypatch.setattr(benchmark.Runner, "measure_memory", measure_memory)
    report = benchmark.main([*TINY, "--models", "ours-batch", "ours-instance", "--sizes", "32", "--out", str(tmp_path)])
    assert alone == [1, 1, 1, 1]
    assert [(e["model"], e["variant"]) for e in report["results"]] == [("ours-batch", "fp32"), ("ours-instance", "fp32")]
    assert report["meta"]["failed"] == {
        "ours-batch fp32-cl 32": "RuntimeError: CUDA out of memory. Tried to allocate 2 GiB",
        "ours-instance fp32-cl 32": "RuntimeError: CUDA out of memory. Tried to allocate 2 GiB"}
    assert "Failed (model variant size: error): ours-batch fp32-cl 32" in (tmp_path / "benchmark.md").read_text()


def test_finished_sizes_are_written_before_a_later_size_crashes(tmp_path, monkeypatch):
    pipeline = benchmark.measure_data_pipeline

    def crash_at_64(size, config, device):
        if size == 64:
            raise RuntimeError("simulated crash")
        return pipeline(size, config, device)

    monkeypatch.setattr(benchmark, "measure_data_pipeline", crash_at_64)
    with pytest.raises(RuntimeError, match="simulated crash"):
        benchmark.main([*TINY, "--sizes", "32", "64", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    assert {e["size"] for e in saved["results"]} == {32} and len(saved["results"]) == 2
    assert saved["meta"]["complete"] is False
    assert "**Partial**" in (tmp_path / "benchmark.md").read_text()
    assert not list(tmp_path.glob("*.tmp"))
    # 64 px was timed before the crash: its rows are kept as provisional, with the rounds they rest on
    assert {(e["size"], e["rounds"]) for e in saved["provisional"]} == {(64, saved["meta"]["config"]["repeats"])}


def test_a_size_killed_mid_rounds_keeps_its_rounds_so_far(tmp_path, monkeypatch):
    """A job killed while a size is being timed (a SLURM time limit) keeps the figures of the rounds it finished."""
    rounds = benchmark.time_rounds

    def killed_after_first_round(runners, config, device, steps, amp, matmul, after_round=None):
        def after(n):
            after_round(n)
            raise KeyboardInterrupt  # what the kill leaves: nothing runs after this round
        rounds(runners, config, device, steps, amp, matmul, after)

    monkeypatch.setattr(benchmark, "time_rounds", killed_after_first_round)
    with pytest.raises(KeyboardInterrupt):
        benchmark.main([*TINY, "--sizes", "32", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    assert saved["results"] == [] and len(saved["provisional"]) == 2
    assert all(e["rounds"] == 1 and e["train_images_per_s"] > 0 for e in saved["provisional"])
    assert "32 px stopped after 1 of its" in (tmp_path / "benchmark.md").read_text()
    import gpu_check
    figures = gpu_check.benchmark_figures(saved)  # gpu_check's summary still gets its figures
    assert figures["size"] == 32 and figures["provisional"].startswith("1 of")


def test_mfu_and_the_instance_norm_memory_format_verdict():
    report = fake_report()
    report["meta"].update(device_type="cuda", peak_tflops={"tflops": 0.1, "dtype": "bf16"}, amp="bf16",
                          train_default={"model": "ours-instance", "variant": "bf16-cl"})
    report["matmul_flops_per_s"]["bf16"] = {"median": 400e9, "max": 400e9, "all": [400e9]}
    for e in report["results"]:
        e["mfu"] = e["train_flops_per_s"] / 0.1e12
    rows = [{"model": "ours-instance", "variant": v, "size": 256, "train_images_per_s": ips}
            for v, ips in (("bf16", 100.0), ("bf16-cl", 112.0), ("fp32", 50.0), ("fp32-cl", 49.5))]
    report["memory_format"] = benchmark.memory_format_verdicts(rows + report["results"])
    assert [(v["dtype"], v["faster"]) for v in report["memory_format"]] == [("bf16", "channels-last"), ("fp32", "neither")]
    assert report["memory_format"][0]["channels_last_speedup"] == pytest.approx(1.12)
    table = benchmark.markdown(report)
    dyn_row = next(line for line in table.splitlines() if line.startswith("| dynunet"))
    assert dyn_row.endswith("| 40.0% |")  # 40 GFLOP/s of a 100 GFLOP/s peak
    assert "dense bf16 tensor-core peak, 0.1 TFLOP/s" in table and "bf16 median 0 TFLOP/s" in table
    assert "256x256, bf16: channels-last trains at 1.12x NCHW's speed (112.0 against 100.0 img/s): " \
           "channels-last is faster." in table
    assert "fp32: channels-last trains at 0.99x NCHW's speed" in table and "no clear difference" in table
    assert "train.py trains ours-instance as bf16-cl on this device." in table
