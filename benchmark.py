"""Speed, memory and FLOP/s of the Improved UNet beside the networks people would use instead, in one run.

    python benchmark.py --device cpu --quick       # about 3 minutes on an idle 2-core CPU
    python benchmark.py --device cuda              # adds bf16, channels_last and torch.compile variants
Writes <out>/benchmark.json and <out>/benchmark.md. Peers (MONAI DynUNet and BasicUNet, segmentation_models_pytorch
Unet/ResNet-34) are measured when installed: pip install -r requirements-bench.txt
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import platform
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import dataset
import loader
import modules
import utils

ISIC_TRAIN_IMAGES = 2594  # ISIC 2018 Task 1 training images; an epoch is projected at 256x256
OURS = "ours-batch"  # the model every ratio compares against
DEEP_SUPERVISION_WEIGHTS = (1.0, 0.5, 0.25)  # DynUNet's stacked heads, as MONAI's DeepSupervisionLoss weighs them
FLOP_COUNT_SIZE = 64  # FLOPs are counted at this side (or smaller) and scaled by the pixel count


@dataclass
class BenchConfig:
    device: str = "auto"  # auto (cuda > cpu), cpu, cuda or cuda:N
    quick: bool = False  # fewer repeats and no optional variants: about 3 minutes on an idle 2-core CPU
    sizes: list[int] = field(default_factory=lambda: [128, 256])  # square input sides, multiples of 32
    batch_size: int = 8  # images per training and inference step
    models: list[str] | None = None  # names from --list-models; default: ours and every installed peer
    repeats: int | None = None  # timed rounds per model and size, medians reported (default 5; quick 3)
    warmup: int | None = None  # untimed steps per model and size first (default 2; quick 1)
    threads: int = 0  # torch CPU threads; 0 keeps torch's default (one per core)
    clock: str = "wall"  # "wall", or "cpu": this process's CPU time (with --threads 1; robust on a shared machine)
    tune_malloc: bool = True  # glibc keeps freed memory for reuse, as train.py does on CPU (Linux)
    breakdown: bool = False  # CPU: profile two training steps per model: time share and FLOP/s of the conv/matmul kernels
    data_images: int | None = None  # images in the synthetic cache timed through the loader (default 64; quick 32)
    baseline_modules: str | None = None  # another version of modules.py, timed beside ours as model "ours-baseline"
    out: str = "runs/benchmark"  # folder for benchmark.json and benchmark.md

    def __post_init__(self):
        self.repeats = self.repeats or (3 if self.quick else 5)
        self.warmup = self.warmup if self.warmup is not None else (1 if self.quick else 2)
        self.data_images = self.data_images or (32 if self.quick else 64)
        if self.batch_size < 1 or self.repeats < 1 or self.warmup < 0:
            raise ValueError("--batch-size and --repeats must be at least 1, --warmup at least 0")
        if self.clock not in ("wall", "cpu"):
            raise ValueError(f"--clock must be wall or cpu, got {self.clock!r}")
        if self.clock == "cpu" and (self.threads != 1 or self.device not in ("cpu", "auto")):
            raise ValueError("--clock cpu counts one thread's CPU time: use it with --device cpu --threads 1")
        for s in self.sizes:
            if s < 32 or s % 32:
                raise ValueError(f"--sizes {s}: every size must be a multiple of 32 (the ResNet-34 UNet needs it)")


# ---------------------------------------------------------------------------------------------------
# The models


def _ours(norm: str, plain: bool = False) -> Callable[[bool], nn.Module]:
    def build(channels_last: bool) -> nn.Module:  # the variant converts weights and inputs to channels-last
        model = modules.ImprovedUNet(modules.ModelConfig(norm=norm))
        return model.use_reference_formulation() if plain else model
    return build


def _peer(build: Callable[[], nn.Module]) -> Callable[[bool], nn.Module]:
    return lambda channels_last: build()  # the variant converts weights and inputs to channels-last


def _dynunet() -> nn.Module:
    from monai.networks.nets import DynUNet
    # the paper's recipe: 16..256 filters, residual blocks, affine instance norm, LeakyReLU 0.01, deep supervision
    return DynUNet(spatial_dims=2, in_channels=3, out_channels=1, kernel_size=[3] * 5, strides=[1, 2, 2, 2, 2],
                   upsample_kernel_size=[2] * 4, filters=[16, 32, 64, 128, 256],
                   norm_name=("INSTANCE", {"affine": True}),
                   act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
                   deep_supervision=True, deep_supr_num=2, res_block=True)


def _basicunet() -> nn.Module:
    from monai.networks.nets import BasicUNet
    return BasicUNet(spatial_dims=2, in_channels=3, out_channels=1)


def _smp_unet() -> nn.Module:
    import segmentation_models_pytorch as smp
    return smp.Unet("resnet34", encoder_weights=None, in_channels=3, classes=1)


def _baseline(path: str) -> Callable[[bool], nn.Module]:
    """The default ImprovedUNet of another modules.py (e.g. `git show main:modules.py > /tmp/main_modules.py`), built
    as that version builds it, so that a change of modules.py is timed against it in one interleaved run."""
    import importlib.util
    import sys

    if not Path(path).is_file():
        raise ValueError(f"--baseline-modules {path}: no such file")
    spec = importlib.util.spec_from_file_location("baseline_modules", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return lambda channels_last: module.ImprovedUNet(module.ModelConfig())


def _installed(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


MODELS: dict[str, tuple[Callable[[bool], nn.Module], str, str]] = {
    # name: (builder taking channels_last, package it needs, description)
    "ours-batch": (_ours("batch"), "", "Improved UNet, batch norm"),
    "ours-instance": (_ours("instance"), "", "Improved UNet, instance norm (the paper's and the default)"),
    "ours-plain": (_ours("batch", plain=True), "", "Improved UNet, batch norm, plain NCHW formulation"),
    "dynunet": (_peer(_dynunet), "monai",
                "MONAI DynUNet like the paper: 16-256, residual, instance norm, deep supervision"),
    "basicunet": (_peer(_basicunet), "monai", "MONAI BasicUNet, default features (32, 32, 64, 128, 256, 32)"),
    "smp-unet-r34": (_peer(_smp_unet), "segmentation_models_pytorch",
                     "segmentation_models_pytorch Unet, ResNet-34, random init"),
}
DEFAULT_MODELS = ["ours-batch", "ours-instance", "dynunet", "basicunet", "smp-unet-r34"]
FULL_EXTRA_MODELS = ["ours-plain"]  # shows what the fast formulation buys; skipped by --quick


@dataclass(frozen=True)
class Variant:
    dtype: str = "fp32"  # "fp32" or "bf16" (autocast)
    channels_last: bool = False
    compile: bool = False

    @property
    def name(self) -> str:
        return self.dtype + ("-cl" if self.channels_last else "") + ("-compile" if self.compile else "")


def variants_for(model: str, device: torch.device, quick: bool) -> list[Variant]:
    if device.type != "cuda":
        # ours: NCHW as train.py trains on CPU, channels-last as predict.py infers; peers as their users run them
        return [Variant(), Variant(channels_last=True)] if model in ("ours-batch", "ours-instance") else [Variant()]
    if model == "ours-batch":
        found = [Variant(), Variant(channels_last=True), Variant("bf16"), Variant("bf16", True)]
        return found + ([] if quick else [Variant("bf16", True, compile=True)])
    if model.startswith("ours"):
        cl = model != "ours-plain"  # channels-last is how train.py and predict.py run ours on CUDA
        return [Variant(channels_last=cl), Variant("bf16", cl)]
    return [Variant(), Variant("bf16", True)]


def choose_models(config: BenchConfig) -> tuple[list[str], dict[str, str]]:
    """The models to run and, for those left out, why."""
    wanted = config.models or DEFAULT_MODELS + ([] if config.quick else FULL_EXTRA_MODELS)
    unknown = [m for m in wanted if m not in MODELS]
    if unknown:
        raise ValueError(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    run, skipped = [], {}
    for name in wanted:
        package = MODELS[name][1]
        if package and not _installed(package):
            skipped[name] = f"{package} is not installed (pip install -r requirements-bench.txt)"
        else:
            run.append(name)
    return run, skipped


# ---------------------------------------------------------------------------------------------------
# Measuring


NOISY_OTHER_CPU = 0.05  # above this share of the machine's CPU taken by other processes, timings are noisy


def _proc_status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of a block: max_memory_allocated on CUDA; on CPU the resident set's high-water mark
    (VmHWM, reset through /proc/self/clear_refs), minus the resident set before the block."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
                self.resettable = True
            except OSError:
                self.resettable = False
            self.base = (_proc_status_kib("VmRSS") or 0) * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            hwm = _proc_status_kib("VmHWM")
            self.peak = hwm * 1024 if hwm is not None and self.resettable else None
        return False

    @property
    def extra_mb(self) -> float | None:
        return None if self.peak is None else round((self.peak - self.base) / 2**20, 1)

    @property
    def peak_mb(self) -> float | None:
        return None if self.peak is None else round(self.peak / 2**20, 1)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCK: Callable[[], float] = time.perf_counter  # run() switches to time.process_time for --clock cpu


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of one large square matmul (2048 on CPU, 8192 on CUDA), best of three."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(3):
        synchronize(device)
        t = CLOCK()
        a @ b
        synchronize(device)
        best = min(best, CLOCK() - t)
    return 2 * n**3 / best


class Runner:
    """One model in one variant at one size: its optimizer, a fixed batch, and timed steps."""

    def __init__(self, name: str, variant: Variant, size: int, config: BenchConfig, device: torch.device):
        self.name, self.variant, self.size, self.device = name, variant, size, device
        torch.manual_seed(0)
        self.eager = MODELS[name][0](variant.channels_last).to(device)
        if variant.channels_last:
            self.eager = self.eager.to(memory_format=torch.channels_last)
        self.model = torch.compile(self.eager) if variant.compile else self.eager
        # the training run's optimizer and loss (train.py: Adam, weight decay 1e-5, Dice)
        self.optimizer = torch.optim.Adam(self.eager.parameters(), lr=1e-3, weight_decay=1e-5,
                                          fused=device.type in ("cpu", "cuda"))
        self.loss_fn = utils.SegmentationLoss("dice")
        g = torch.Generator().manual_seed(size)
        b = config.batch_size
        self.x = torch.randn(b, 3, size, size, generator=g).to(device)
        self.y = (torch.rand(b, 1, size, size, generator=g) > 0.7).float().to(device)
        if variant.channels_last:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if variant.dtype == "bf16"
                         else nullcontext())
        self.train_times: list[float] = []
        self.infer_times: list[float] = []

    def loss(self, out: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        target = self.y if target is None else target
        if out.dim() == 5:  # DynUNet in training: (B, heads, C, H, W), full resolution first
            w = DEEP_SUPERVISION_WEIGHTS[: out.shape[1]]
            return sum(wi * self.loss_fn(out[:, i], target) for i, wi in enumerate(w)) / sum(w)
        return self.loss_fn(out, target)

    def train_step(self, model: nn.Module | None = None) -> None:
        model = model or self.model
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast:
            loss = self.loss(model(self.x))
        loss.backward()
        self.optimizer.step()

    def infer_step(self) -> None:
        self.model.eval()
        with torch.inference_mode(), self.autocast:
            self.model(self.x)

    def timed(self, step: Callable[[], None]) -> float:
        synchronize(self.device)
        t = CLOCK()
        step()
        synchronize(self.device)
        return CLOCK() - t

    def count_flops(self) -> dict[str, float]:
        """FLOPs per image of a training step (forward + backward) and of inference, as executed; for our
        model also the training FLOPs of the plain formulation (upsample then 3x3 conv), i.e. of the paper.

        Counted on two images of at most 64x64 and scaled by the pixel count: every layer's FLOPs are
        proportional to its output pixels, which scale exactly with the input's for sides that are
        multiples of 32 (tests/test_benchmark.py checks the scaling).
        """
        side = min(self.size, FLOP_COUNT_SIZE)
        scale = (self.size / side) ** 2 / 2
        x = torch.randn(2, 3, side, side, device=self.device)
        model = copy.deepcopy(self.eager)

        def train_flops() -> float:
            with FlopCounterMode(display=False) as fc:
                out = model.train()(x)
                self.loss(out, torch.zeros_like(out[:, :1] if out.dim() == 4 else out[:, 0, :1])).backward()
            return fc.get_total_flops() * scale

        found = {"train_flops_per_image": train_flops()}
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            model.eval()(x)
        found["infer_flops_per_image"] = fc.get_total_flops() * scale
        if hasattr(model, "use_reference_formulation"):
            model.use_reference_formulation()
            found["paper_train_flops_per_image"] = train_flops()
        return found


# the aten ops whose kernels do the FLOPs that flop_counter counts (their wrappers, such as aten::convolution,
# only dispatch and are left with the other ops)
FLOP_KERNELS = {"mkldnn_convolution", "convolution_backward", "_slow_conv2d_forward", "_slow_conv2d_backward",
                "slow_conv_transpose2d", "slow_conv_dilated2d", "mm", "addmm", "bmm", "_nnpack_spatial_convolution"}


def kernel_time_share(runner: Runner, steps: int = 2) -> float:
    """Share of the time of profiled training steps spent inside the convolution and matmul kernels.

    Multiplied by the timed step's FLOP/s it gives the FLOP/s those kernels reach on their own: the ceiling
    of the step's FLOP/s, reached only if every other op (norms, activations, copies, the optimizer) took
    no time. Only the share comes from the profiler; absolute times come from the timed rounds, since a
    profiled step on a shared VM can be slower or faster than the median.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            runner.train_step()
    kernel = total = 0.0
    for e in prof.key_averages():
        total += e.self_cpu_time_total
        if e.key.removeprefix("aten::") in FLOP_KERNELS:
            kernel += e.self_cpu_time_total
    return kernel / total


def measure_data_pipeline(size: int, config: BenchConfig, device: torch.device) -> float:
    """Images/s of the training loader (index, copy to the device, augment, normalise) from an in-memory cache."""
    rng = np.random.default_rng(0)
    n = max(config.data_images, config.batch_size)
    split = dataset.CachedSplit(
        ids=[f"bench_{i:04d}" for i in range(n)],
        images=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        masks=rng.integers(0, 2, (n, size, size), dtype=np.uint8),
    )
    batches = loader.make_loader(split, config.batch_size, (0.6, 0.5, 0.4), (0.2, 0.2, 0.2), device=device,
                                 train=True, seed=0)
    per_image = []
    for epoch in range(config.warmup + config.repeats):
        batches.set_epoch(epoch)
        synchronize(device)
        t, count = CLOCK(), 0
        for images, _ in batches:
            count += len(images)
        synchronize(device)
        if epoch >= config.warmup:
            per_image.append((CLOCK() - t) / count)
    return 1.0 / statistics.median(per_image)


def run(config: BenchConfig, log: Callable = print) -> dict:
    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available() else
                          "cpu" if config.device == "auto" else config.device)
    device = utils.select_device(str(device))
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    global CLOCK
    CLOCK = time.process_time if config.clock == "cpu" else time.perf_counter
    if config.baseline_modules:
        MODELS["ours-baseline"] = (_baseline(config.baseline_modules), "",
                                   f"Improved UNet as {config.baseline_modules} builds it by default")
    names, skipped = choose_models(config)
    for name, why in skipped.items():
        log(f"skipping {name}: {why}")
    idle_check = utils.OtherCpu()
    time.sleep(1.0)
    other_before = idle_check.share()
    if device.type == "cpu" and other_before is not None and other_before > NOISY_OTHER_CPU:
        log(f"warning: other processes are using {other_before:.0%} of the CPU: wall-clock figures will be noisy "
            "(--threads 1 --clock cpu measures this process's CPU time instead)")
    during = utils.OtherCpu()
    results, matmul, data = [], {"fp32": [], "bf16": []}, []
    malloc_tuned = False

    # phase 1, per size: FLOPs, and peak memory of the first (warm-up) steps. Blocks of 64 KiB and more
    # are mmapped while it runs, so that memory freed by one model leaves the resident set and the next
    # model's growth is its own (glibc otherwise keeps blocks below its adaptive threshold in the heap)
    measurable_rss = device.type == "cpu" and utils.mallopt(utils.M_MMAP_MAX, utils.DEFAULT_MMAP_MAX) \
        and utils.mallopt(utils.M_MMAP_THRESHOLD, 64 << 10)
    runners_by_size = {}
    for size in config.sizes:
        runners = [Runner(n, v, size, config, device) for n in names for v in variants_for(n, device, config.quick)]
        for r in runners:
            r.flops = r.count_flops()
            with PeakMemory(device) as train_mem:
                r.train_step()
            with PeakMemory(device) as infer_mem:
                r.infer_step()
            r.memory = {"train_peak_mb": train_mem.peak_mb, "train_extra_mb": train_mem.extra_mb,
                        "infer_peak_mb": infer_mem.peak_mb, "infer_extra_mb": infer_mem.extra_mb}
        runners_by_size[size] = runners
    if config.tune_malloc and device.type == "cpu":
        malloc_tuned = utils.tune_glibc_malloc()
    elif measurable_rss:
        utils.mallopt(utils.M_MMAP_THRESHOLD, 32 << 20)  # where glibc's adaptive threshold settles for tensors this big

    # phase 2, per size: timed rounds, every model once per round, so that load from other processes
    # hits all of them alike
    for size in config.sizes:
        runners = runners_by_size.pop(size)
        log(f"{size}x{size}: {len(runners)} model variants, batch {config.batch_size}, "
            f"{config.warmup} warm-up + {config.repeats} timed rounds")
        for r in runners:
            for _ in range(max(config.warmup - 1, 0)):
                r.train_step(), r.infer_step()
        for _ in range(config.repeats):
            matmul["fp32"].append(matmul_flops_per_s(device))
            if device.type == "cuda":
                matmul["bf16"].append(matmul_flops_per_s(device, torch.bfloat16))
            for r in runners:
                r.train_times.append(r.timed(r.train_step))
                r.infer_times.append(r.timed(r.infer_step))
        data_ips = measure_data_pipeline(size, config, device)
        data.append({"size": size, "images_per_s": data_ips})
        for r in runners:
            share = kernel_time_share(r) if config.breakdown and device.type == "cpu" else None
            step = statistics.median(r.train_times)
            entry = {
                "model": r.name, "variant": r.variant.name, "size": size, "description": MODELS[r.name][2],
                "parameters": modules.count_parameters(r.eager),
                "train_images_per_s": config.batch_size / step,
                "infer_images_per_s": config.batch_size / statistics.median(r.infer_times),
                "train_step_s": r.train_times, "infer_step_s": r.infer_times,
                **r.flops, **r.memory,
            }
            entry["train_flops_per_s"] = entry["train_flops_per_image"] * entry["train_images_per_s"]
            if "paper_train_flops_per_image" in entry:
                entry["paper_train_flops_per_s"] = entry["paper_train_flops_per_image"] * entry["train_images_per_s"]
            if share:
                entry["kernel_time_share"] = share
                entry["kernel_flops_per_s"] = entry["train_flops_per_s"] / share
            results.append(entry)
            log(f"  {r.name:14s} {r.variant.name:16s} train {entry['train_images_per_s']:8.2f} img/s  "
                f"infer {entry['infer_images_per_s']:8.2f} img/s  {entry['train_flops_per_s'] / 1e9:8.1f} GFLOP/s")
        log(f"  data pipeline {data_ips:.1f} img/s")
        del runners
        gc.collect()

    matmul_summary = {k: {"median": statistics.median(v), "max": max(v), "all": v} for k, v in matmul.items() if v}
    for e in results:
        ref = matmul_summary["bf16" if e["variant"].startswith("bf16") else "fp32"]["median"]
        e["matmul_fraction"] = e["train_flops_per_s"] / ref
        if "kernel_flops_per_s" in e:
            e["kernel_matmul_fraction"] = e["kernel_flops_per_s"] / ref
        if "paper_train_flops_per_s" in e:
            e["paper_matmul_fraction"] = e["paper_train_flops_per_s"] / ref
    return {
        "meta": {
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "device": utils.device_name(device), "device_type": device.type, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "config": asdict(config), "malloc_tuned": malloc_tuned, "skipped": skipped,
            "other_cpu_before": other_before, "other_cpu_during": during.share(),
            "peers": {p: package_version(p) for p in ("monai", "segmentation_models_pytorch")},
        },
        "matmul_flops_per_s": matmul_summary,
        "data_pipeline": data,
        "results": results,
    }


def package_version(name: str) -> str | None:
    if not _installed(name):
        return None
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name.replace("_", "-"))
    except PackageNotFoundError:
        return "installed"


# ---------------------------------------------------------------------------------------------------
# Reporting


def _fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def _other_cpu_text(share: float | None) -> str:
    if share is None:
        return "CPU use of other processes not measured (no /proc/stat)"
    text = f"other processes used {share:.0%} of the CPU during the run"
    return text + (", so timings are noisy" if share > NOISY_OTHER_CPU else "")


def markdown(report: dict) -> str:
    meta, mm = report["meta"], report["matmul_flops_per_s"]
    cfg = meta["config"]
    lines = [
        f"# Benchmark: {meta['device']}, {meta['date'][:10]}",
        "",
        f"torch {meta['torch']}, {meta['threads']} threads, {cfg.get('clock', 'wall')} clock, batch {cfg['batch_size']}, "
        f"median of {cfg['repeats']} "
        f"interleaved rounds after {cfg['warmup']} warm-up; glibc malloc tuning "
        f"{'on' if meta['malloc_tuned'] else 'off'}; {_other_cpu_text(meta.get('other_cpu_during'))}.",
        "",
        "Matmul reference, measured in every round: float32 median "
        f"{mm['fp32']['median'] / 1e9:.0f} GFLOP/s (best {mm['fp32']['max'] / 1e9:.0f})"
        + (f"; bfloat16 median {mm['bf16']['median'] / 1e12:.0f} TFLOP/s" if "bf16" in mm else "") + ".",
        "",
    ]
    by_size: dict[int, list[dict]] = {}
    for e in report["results"]:
        by_size.setdefault(e["size"], []).append(e)
    data = {d["size"]: d["images_per_s"] for d in report["data_pipeline"]}
    for size, entries in by_size.items():
        ours = next((e for e in entries if e["model"] == OURS), None)
        lines += [
            f"## {size}x{size}",
            "",
            "| model | variant | train img/s | inference img/s | train GFLOP/img | train GFLOP/s | of matmul "
            f"| peak train memory MB | {OURS} train speed / this | {OURS} FLOP/s / this | ISIC epoch at this size |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for e in entries:
            ratio_ips = ratio_fl = "-"
            if ours is not None and e is not ours:
                ratio_ips = f"{ours['train_images_per_s'] / e['train_images_per_s']:.2f}x"
                ratio_fl = f"{ours['train_flops_per_s'] / e['train_flops_per_s']:.2f}x"
            epoch_s = ISIC_TRAIN_IMAGES / e["train_images_per_s"]
            mem = e["train_peak_mb"] if report["meta"]["device_type"] == "cuda" else e["train_extra_mb"]
            lines.append(
                f"| {e['model']} | {e['variant']} | {e['train_images_per_s']:.2f} | {e['infer_images_per_s']:.2f} "
                f"| {e['train_flops_per_image'] / 1e9:.2f} | {e['train_flops_per_s'] / 1e9:.1f} "
                f"| {e['matmul_fraction']:.0%} | {_fmt(mem, '.0f')} | {ratio_ips} | {ratio_fl} "
                f"| {format_seconds(epoch_s)} |"
            )
        lines.append("")
        for e in entries:
            if e.get("paper_train_flops_per_image", e["train_flops_per_image"]) != e["train_flops_per_image"]:
                lines.append(
                    f"- {e['model']} ({e['variant']}) runs the paper's upsample-then-3x3-conv as one transposed conv "
                    f"({e['train_flops_per_image'] / 1e9:.2f} executed GFLOP/img); counted in the paper's form "
                    f"({e['paper_train_flops_per_image'] / 1e9:.2f} GFLOP/img) it reaches "
                    f"{e['paper_train_flops_per_s'] / 1e9:.1f} GFLOP/s = {e['paper_matmul_fraction']:.0%} of matmul.")
        for e in entries:
            if "kernel_flops_per_s" in e:
                lines.append(
                    f"- {e['model']} ({e['variant']}): convolution and matmul kernels take {e['kernel_time_share']:.0%} "
                    f"of profiled training steps, so alone they run at {e['kernel_flops_per_s'] / 1e9:.1f} GFLOP/s = "
                    f"{e['kernel_matmul_fraction']:.0%} of matmul: the step's ceiling if every other op were free.")
        if size in data:
            ratio = f" = {data[size] / ours['train_images_per_s']:.1f}x {OURS}'s training speed" if ours else ""
            lines.append(f"- Data pipeline (cached uint8, shuffled, augmented, normalised): {data[size]:.0f} img/s{ratio}.")
        lines.append("")
    if 256 in by_size and 256 in data:
        lines += [f"Projected ISIC 2018 epoch ({ISIC_TRAIN_IMAGES} images at 256x256, training steps plus the data "
                  "pipeline in the same process):", ""]
        for e in by_size[256]:
            t = ISIC_TRAIN_IMAGES / e["train_images_per_s"] + ISIC_TRAIN_IMAGES / data[256]
            lines.append(f"- {e['model']} {e['variant']}: {format_seconds(t)}")
        lines.append("")
    lines += [
        "Notes",
        "",
        "- Memory: peak allocated by torch on CUDA; on CPU the growth of the process's resident set during one "
        "training step (large blocks mmapped while measuring, so that it follows the live tensors).",
        "- FLOPs are counted by torch.utils.flop_counter (convolutions and matmuls; forward + backward for training).",
        "- DynUNet does about 45% fewer FLOPs per image than the paper's architecture by design (2x2 transposed "
        "convolutions instead of upsampling + 3x3 convs, no 1x1 localisation convs), so it trains more images per "
        "second at a lower FLOP/s: compare FLOP/s and % of matmul for efficiency, img/s for wall time.",
        "- ratios above 1.00x favour our model.",
    ]
    if meta["skipped"]:
        lines.append("- Not measured: " + "; ".join(f"{k} ({v})" for k, v in meta["skipped"].items()))
    return "\n".join(lines) + "\n"


def format_seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def parse_args(argv: list[str] | None) -> BenchConfig:
    defaults = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=defaults.device, help="auto (cuda > cpu; the default), cpu, cuda or cuda:N")
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=defaults.quick,
                   help="3 timed rounds, 1 warm-up, no optional variants: about 3 minutes on an idle 2-core CPU")
    p.add_argument("--sizes", type=int, nargs="+", default=defaults.sizes,
                   help="square input sides, multiples of 32 (default 128 256)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per step (default 8)")
    p.add_argument("--models", nargs="+", default=None,
                   help=f"models to run, from: {', '.join(MODELS)} (default: {', '.join(DEFAULT_MODELS)}"
                        f", and {', '.join(FULL_EXTRA_MODELS)} without --quick)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds, medians reported (default 5; quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per model first (default 2; quick 1)")
    p.add_argument("--threads", type=int, default=defaults.threads,
                   help="torch CPU threads (default 0: torch's own choice, one per core)")
    p.add_argument("--clock", choices=("wall", "cpu"), default=defaults.clock,
                   help="wall time (default), or this process's CPU time (with --threads 1: robust on a shared machine)")
    p.add_argument("--tune-malloc", action=argparse.BooleanOptionalAction, default=defaults.tune_malloc,
                   help="keep freed memory in glibc's heap so steps do not page-fault fresh memory (CPU, Linux; "
                        "default on, as train.py runs; --no-tune-malloc for glibc's defaults)")
    p.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=defaults.breakdown,
                   help="CPU: profile two training steps per model and report the share of time in the convolution "
                        "and matmul kernels and their own FLOP/s (the ceiling of the step's FLOP/s)")
    p.add_argument("--data-images", type=int, default=None, help="cache size timed through the loader (default 64; quick 32)")
    p.add_argument("--baseline-modules", default=None, metavar="FILE",
                   help="another modules.py (e.g. git show main:modules.py > m.py), timed as model ours-baseline "
                        "(name it in --models) in the same interleaved rounds")
    p.add_argument("--out", default=defaults.out, help="folder for benchmark.json and benchmark.md (default runs/benchmark)")
    a = p.parse_args(argv)
    return BenchConfig(device=a.device, quick=a.quick, sizes=a.sizes, batch_size=a.batch_size, models=a.models,
                       repeats=a.repeats, warmup=a.warmup, threads=a.threads, clock=a.clock, tune_malloc=a.tune_malloc,
                       breakdown=a.breakdown, data_images=a.data_images, baseline_modules=a.baseline_modules,
                       out=a.out)


def main(argv: list[str] | None = None) -> dict:
    config = parse_args(argv)
    report = run(config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (out / "benchmark.md").write_text(table)
    print(table)
    print(f"wrote {out / 'benchmark.json'} and {out / 'benchmark.md'}")
    return report


if __name__ == "__main__":
    main()
