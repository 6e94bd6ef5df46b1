"""Speed, memory and FLOP/s of the Improved UNet beside the networks people would use instead, in one run.

    python benchmark.py --device cpu --quick       # about 3 minutes on an idle 2-core CPU
    python benchmark.py --device cuda              # adds mixed-precision, channels_last and torch.compile variants
    python benchmark.py --device cuda --quick      # about 2 minutes: the variants train.py chooses between, and MFU
Writes <out>/benchmark.json and <out>/benchmark.md, rewritten after every size so that a crash keeps the finished
rows. Mixed precision is the dtype train.py's --amp auto picks (bf16, or fp16 below compute capability 8.0). Peers
(MONAI DynUNet and BasicUNet, segmentation_models_pytorch Unet/ResNet-34) are measured when installed:
pip install -r requirements-bench.txt
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import dataset
import devices
import loader
import losses
import modules
import utils

ISIC_TRAIN_IMAGES = 2594  # ISIC 2018 Task 1 training images; an epoch is projected at 256x256
OURS = "ours-batch"  # the model every ratio compares against
DEEP_SUPERVISION_WEIGHTS = (1.0, 0.5, 0.25)  # DynUNet's stacked heads, as MONAI's DeepSupervisionLoss weighs them
FLOP_COUNT_SIZE = 64  # FLOPs are counted at this side (or smaller) and scaled by the pixel count


@dataclass
class BenchConfig:
    device: str = "auto"  # auto (cuda > cpu), cpu, cuda or cuda:N
    quick: bool = False  # fewer repeats and variants: about 3 minutes on an idle 2-core CPU, 2 on a GPU
    sizes: list[int] = field(default_factory=lambda: [128, 256])  # square input sides, multiples of 32
    batch_size: int = 8  # images per training and inference step
    models: list[str] | None = None  # names from --list-models; default: ours and every installed peer
    repeats: int | None = None  # timed rounds per model and size, medians reported (default 5; quick 3)
    warmup: int | None = None  # untimed rounds per model and size first (default 2; quick 1)
    steps: int = 0  # steps per timed round; 0: 1 on CPU, 10 on CUDA (whose steps take milliseconds)
    compile: bool = True  # CUDA: include the torch.compile variant (its first steps compile for about a minute)
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
        if self.batch_size < 1 or self.repeats < 1 or self.warmup < 0 or self.steps < 0:
            raise ValueError("--batch-size and --repeats must be at least 1, --warmup and --steps at least 0")
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
    # the paper's recipe as MONAI builds it: modules.py's baseline with its two deep-supervision heads
    return modules.dynunet_baseline(modules.ModelConfig(arch="dynunet"), deep_supervision=True)


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


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # variant name -> autocast dtype


def amp_name(hw) -> str | None:
    """The dtype train.py's --amp auto trains in on this hardware, as a variant name (None: no autocast)."""
    dtype = devices.amp_dtype("auto", hw)
    return next((name for name, d in AMP_DTYPES.items() if d == dtype), None)


@dataclass(frozen=True)
class Variant:
    dtype: str = "fp32"  # "fp32", or "bf16" / "fp16" under autocast
    channels_last: bool = False
    compile: bool = False

    @property
    def name(self) -> str:
        return self.dtype + ("-cl" if self.channels_last else "") + ("-compile" if self.compile else "")


def variants_for(model: str, hw, quick: bool, compile: bool = True) -> list[Variant]:
    """What to time for one model on this hardware (devices.hardware: device type, amp dtype, compile support)."""
    amp = amp_name(hw)
    if not hw.is_cuda:
        # ours: both memory formats, in fp32 and in the CPU's native bf16 where it has one (what train.py's --amp
        # auto picks); peers as their users run them
        if model not in ("ours-batch", "ours-instance"):
            return [Variant()]
        return [Variant(dtype, cl) for dtype in ["fp32"] + ([amp] if amp else []) for cl in (False, True)]
    mixed = (lambda cl: [Variant(amp, cl)]) if amp else (lambda cl: [])
    compiled = [Variant(amp or "fp32", True, compile=True)] if compile and hw.compile_refusal(AMP_DTYPES.get(amp)) is None else []
    if model == "ours-batch":  # fp32 (TF32) against mixed precision, and what compiling adds
        return ([] if quick else [Variant()]) + [Variant(channels_last=True)] + mixed(True) + compiled
    if model == "ours-instance":
        # both memory formats: whether channels-last pays with instance norm (GroupNorm kernels) on this GPU, and
        # compiled as train.py --compile runs the default model (NCHW)
        compiled = [Variant(amp or "fp32", False, compile=True)] if compile and hw.compile_refusal(AMP_DTYPES.get(amp)) is None else []
        return ([] if quick else [Variant(), Variant(channels_last=True)]) + mixed(False) + mixed(True) + compiled
    if model == "ours-plain":
        return ([] if quick else [Variant()]) + mixed(False)
    if model.startswith("ours"):
        return ([] if quick else [Variant(channels_last=True)]) + mixed(True)
    return ([] if quick else [Variant()]) + mixed(True)


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
        self.base = devices.hardware(self.device).reset_peak_memory()  # an allocator that counts (CUDA)
        if self.base is None:  # the CPU: only the resident set
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
                self.resettable = True
            except OSError:
                self.resettable = False
            self.base = (_proc_status_kib("VmRSS") or 0) * 1024
        return self

    def __exit__(self, *exc):
        self.peak = devices.hardware(self.device).peak_memory()
        if self.peak is None:
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
    devices.hardware(device).synchronize()


CLOCK: Callable[[], float] = time.perf_counter  # run() switches to time.process_time for --clock cpu


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of one large square matmul (2048 on CPU, 8192 on CUDA), best of three."""
    n = 8192 if devices.hardware(device).is_cuda else 2048
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


def training_loss(loss_fn: nn.Module, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if out.dim() == 5:  # DynUNet in training: (B, heads, C, H, W), full resolution first
        w = DEEP_SUPERVISION_WEIGHTS[: out.shape[1]]
        return sum(wi * loss_fn(out[:, i], target) for i, wi in enumerate(w)) / sum(w)
    return loss_fn(out, target)


def count_flops(name: str, size: int) -> dict[str, float]:
    """FLOPs per image of a training step (forward + backward) and of inference, as executed; for our
    model also the training FLOPs of the plain formulation (upsample then 3x3 conv), i.e. of the paper.

    Counted on the CPU (the same for every dtype, memory format and device), on two images of at most
    64x64, and scaled by the pixel count: every layer's FLOPs are proportional to its output pixels, which
    scale exactly with the input's for sides that are multiples of 32 (tests/test_benchmark.py checks the
    scaling).
    """
    side = min(size, FLOP_COUNT_SIZE)
    scale = (size / side) ** 2 / 2
    torch.manual_seed(0)
    model = MODELS[name][0](False)
    loss_fn = losses.SegmentationLoss("dice")
    x = torch.randn(2, 3, side, side)

    def train_flops() -> float:
        with FlopCounterMode(display=False) as fc:
            out = model.train()(x)
            training_loss(loss_fn, out, torch.zeros_like(out[:, :1] if out.dim() == 4 else out[:, 0, :1])).backward()
        return fc.get_total_flops() * scale

    found = {"train_flops_per_image": train_flops()}
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.eval()(x)
    found["infer_flops_per_image"] = fc.get_total_flops() * scale
    if hasattr(model, "use_reference_formulation"):
        model.use_reference_formulation()
        found["paper_train_flops_per_image"] = train_flops()
    return found


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
        hw = devices.hardware(device)
        self.optimizer = torch.optim.Adam(self.eager.parameters(), lr=1e-3, weight_decay=1e-5,
                                          fused=hw.fused_optimizer)
        self.loss_fn = losses.SegmentationLoss("dice")
        g = torch.Generator().manual_seed(size)
        b = config.batch_size
        self.x = torch.randn(b, 3, size, size, generator=g).to(device)
        self.y = (torch.rand(b, 1, size, size, generator=g) > 0.7).float().to(device)
        if variant.channels_last:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        dtype = AMP_DTYPES.get(variant.dtype)
        self.autocast = hw.autocast(dtype)()
        self.scaler = hw.grad_scaler(dtype)  # as train.py: loss scaling only for fp16
        self.train_times: list[float] = []
        self.infer_times: list[float] = []

    def loss(self, out: torch.Tensor) -> torch.Tensor:
        return training_loss(self.loss_fn, out.float(), self.y)

    def train_step(self) -> None:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast:
            out = self.model(self.x)
        loss = self.loss(out)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()

    def infer_step(self) -> None:
        self.model.eval()
        with torch.inference_mode(), self.autocast:
            self.model(self.x)

    def timed(self, step: Callable[[], None], steps: int = 1) -> float:
        """Seconds per step, over `steps` back-to-back steps (on CUDA one step is too short to time alone)."""
        synchronize(self.device)
        t = CLOCK()
        for _ in range(steps):
            step()
        synchronize(self.device)
        return (CLOCK() - t) / steps

    def measure_memory(self) -> dict[str, float | None]:
        """Peak memory of a training step and of an inference step. On CUDA, after one step of each: the first
        steps also compile (torch.compile) and try cuDNN's algorithms, whose workspaces a run needs only once.
        On the CPU, the first steps: the resident set's growth there is what the gradients and Adam's state add."""
        if devices.hardware(self.device).is_cuda:
            self.train_step()
            self.infer_step()
        with PeakMemory(self.device) as train_mem:
            self.train_step()
        with PeakMemory(self.device) as infer_mem:
            self.infer_step()
        return {"train_peak_mb": train_mem.peak_mb, "train_extra_mb": train_mem.extra_mb,
                "infer_peak_mb": infer_mem.peak_mb, "infer_extra_mb": infer_mem.extra_mb}


def release(device: torch.device) -> None:
    """Free what the models just measured left behind, so the next one's peak memory is its own: their
    tensors once unreferenced (gc breaks the module graphs' cycles), the blocks CUDA's caching allocator
    keeps, and its peak counter. torch.compile's graphs stay cached: they hold no weights, and phase 2's
    fresh model of the same class reuses them instead of compiling again for a minute."""
    gc.collect()
    hw = devices.hardware(device)
    hw.synchronize()
    hw.empty_cache()
    hw.reset_peak_memory()


@contextmanager
def cuda_settings(device: torch.device):
    """The backend flags train.py sets on CUDA (devices.configure_backends, without --deterministic): cuDNN picks
    the fastest algorithm per shape, float32 matmuls and convolutions run on TF32 tensor cores. Restored after."""
    hw = devices.hardware(device)
    if not hw.is_cuda:
        yield
        return
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    devices.configure_backends(hw)
    try:
        yield
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32) = saved


# Dense (no sparsity) tensor-core peak of the dtype --amp auto trains in, in TFLOP/s, from NVIDIA's data sheets:
# bf16 with float32 accumulation; fp16 on the GPUs below compute capability 8.0, which train in fp16. The first
# matching pattern wins, so specific names come before general ones; an unlisted GPU gets no MFU.
PEAK_TFLOPS: list[tuple[str, float, str]] = [
    (r"H100.*NVL", 835.0, "bf16"),
    (r"H100.*PCIe", 756.0, "bf16"),
    (r"H100", 989.0, "bf16"),  # SXM
    (r"H200.*NVL", 835.0, "bf16"),
    (r"H200", 989.0, "bf16"),
    (r"A100", 312.0, "bf16"),
    (r"L40S", 362.0, "bf16"),
    (r"\bA10\b", 125.0, "bf16"),  # not the A10G
    (r"RTX 4090", 165.0, "bf16"),  # GeForce: half rate with float32 accumulation
    (r"V100.*PCIe", 112.0, "fp16"),
    (r"V100", 125.0, "fp16"),  # SXM2
    (r"P100.*SXM", 21.2, "fp16"),
    (r"P100", 18.7, "fp16"),  # PCIe
    (r"\bT4\b", 65.0, "fp16"),
]


# A MIG slice is named after its compute slices out of the GPU's 7 (A100, H100, H200): "NVIDIA A100-SXM4-40GB MIG
# 3g.20gb" holds 3/7 of the streaming multiprocessors, and so 3/7 of the peak.
_MIG_SLICE = re.compile(r"\bMIG (\d)g\.", re.IGNORECASE)
MIG_COMPUTE_SLICES = 7


def peak_tflops(gpu_name: str) -> tuple[float, str] | None:
    """(dense tensor-core TFLOP/s, its dtype) of a GPU named as torch.cuda.get_device_name names it, or None;
    a MIG slice gets its share of the whole GPU's peak."""
    for pattern, tflops, dtype in PEAK_TFLOPS:
        if re.search(pattern, gpu_name, re.IGNORECASE):
            mig = _MIG_SLICE.search(gpu_name)
            return (tflops * int(mig.group(1)) / MIG_COMPUTE_SLICES if mig else tflops), dtype
    return None


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
                                 train=True, seed=0, augment=loader.AUGMENT_PRESETS[loader.DEFAULT_AUGMENT])
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


def resolve_device(name: str) -> torch.device:
    """--device as devices.select_device normalises it (cuda -> cuda:N); "auto" is cuda > cpu (not MPS, whose
    memory this benchmark cannot measure)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return devices.select_device(name)


def describe_device(hw, device: torch.device) -> str:
    if hw.capability is not None:
        return f"{hw.name} (compute capability {hw.capability[0]}.{hw.capability[1]})"
    return devices.device_name(device)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


NOISE = 0.02  # speed differences below this share are called ties in the memory-format verdict


def memory_format_verdicts(results: list[dict], model: str = "ours-instance") -> list[dict]:
    """NCHW against channels-last training speed of `model` per size and dtype where both were timed. With
    instance norm (GroupNorm kernels) the faster format differs between devices: train.py's default should
    follow this figure."""
    rows = {(e["size"], e["variant"]): e for e in results if e["model"] == model}
    found = []
    for (size, variant), nchw in rows.items():
        cl = rows.get((size, variant + "-cl"))
        if cl is None or "-" in variant:
            continue
        speedup = cl["train_images_per_s"] / nchw["train_images_per_s"]
        faster = "neither" if abs(speedup - 1) < NOISE else "channels-last" if speedup > 1 else "NCHW"
        found.append({"model": model, "size": size, "dtype": variant, "nchw_images_per_s": nchw["train_images_per_s"],
                      "channels_last_images_per_s": cl["train_images_per_s"], "channels_last_speedup": speedup,
                      "faster": faster})
    return found


def run(config: BenchConfig, log: Callable = print, save: Callable[[dict], None] | None = None) -> dict:
    """Every model in every variant at every size. `save` gets the report so far after each size, so that a
    crash (out of memory at the largest size, say) keeps the rows already finished."""
    device = resolve_device(config.device)
    hw = devices.hardware(device)
    steps = config.steps or (10 if hw.is_cuda else 1)
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
    plan = [(n, v) for n in names for v in variants_for(n, hw, config.quick, config.compile)]
    amp = amp_name(hw)
    peak = peak_tflops(hw.name) if hw.is_cuda else None
    idle_check = utils.OtherCpu()
    time.sleep(1.0)
    other_before = idle_check.share()
    if hw.is_cpu and other_before is not None and other_before > NOISY_OTHER_CPU:
        log(f"warning: other processes are using {other_before:.0%} of the CPU: wall-clock figures will be noisy "
            "(--threads 1 --clock cpu measures this process's CPU time instead)")
    during = utils.OtherCpu()
    results, failed, data = [], {}, []
    matmul = {"fp32": [], **({amp: []} if amp else {})}
    meta = run_meta(config, device, hw, steps, amp, peak, skipped, failed, other_before)

    def report() -> dict:
        meta["other_cpu_during"] = during.share()
        return assemble_report(meta, matmul, data, results, peak)

    with cuda_settings(device):
        # phase 1, per size and model: FLOPs (on the CPU), and peak memory of the first steps with nothing else
        # alive: each model is freed before the next is built. Blocks of 64 KiB and more are mmapped on the CPU
        # while it runs, so that memory freed by one model leaves the resident set and the next model's growth is
        # its own (glibc otherwise keeps blocks below its adaptive threshold in the heap)
        measurable_rss = hw.is_cpu and devices.mallopt(devices.M_MMAP_MAX, devices.DEFAULT_MMAP_MAX) \
            and devices.mallopt(devices.M_MMAP_THRESHOLD, 64 << 10)
        flops, memory = measure_flops_and_memory(plan, config, device, failed, log)
        if config.tune_malloc and hw.is_cpu:
            meta["malloc_tuned"] = devices.tune_glibc_malloc()
        elif measurable_rss:
            devices.mallopt(devices.M_MMAP_THRESHOLD, 32 << 20)  # where glibc's adaptive threshold settles for tensors this big

        # phase 2, per size: timed rounds, every model once per round, so that load from other processes
        # hits all of them alike
        for size in config.sizes:
            runners = [Runner(n, v, size, config, device) for n, v in plan if (n, v, size) in memory]
            log(f"{size}x{size}: {len(runners)} model variants, batch {config.batch_size}, {config.warmup} warm-up + "
                f"{config.repeats} timed rounds of {steps} step{'s' if steps > 1 else ''}")
            time_rounds(runners, config, device, steps, amp, matmul, after_round=None if save is None else (
                lambda rounds: save({**report(), "provisional": provisional_entries(runners, size, config, flops,
                                                                                    memory, rounds)})))
            data_ips = measure_data_pipeline(size, config, device)
            data.append({"size": size, "images_per_s": data_ips})
            for r in runners:
                share = kernel_time_share(r) if config.breakdown and hw.is_cpu else None
                entry = result_entry(r, size, config.batch_size, flops[r.name, size], memory[r.name, r.variant, size],
                                     share)
                results.append(entry)
                mfu = f"  MFU {entry['train_flops_per_s'] / (peak[0] * 1e12):6.1%}" if peak else ""
                log(f"  {r.name:14s} {r.variant.name:16s} train {entry['train_images_per_s']:8.2f} img/s  "
                    f"infer {entry['infer_images_per_s']:8.2f} img/s  {entry['train_flops_per_s'] / 1e9:8.1f} GFLOP/s"
                    + mfu)
            log(f"  data pipeline {data_ips:.1f} img/s")
            runners = None
            release(device)
            if save is not None:
                save(report())
    meta["complete"] = True
    final = report()
    if save is not None:
        save(final)
    return final


def run_meta(config: BenchConfig, device: torch.device, hw: devices.Hardware, steps: int, amp: str | None,
             peak: tuple | None, skipped: dict, failed: dict, other_before: float | None) -> dict:
    """The report's "meta": the machine, the software, the settings, and what was skipped or failed."""
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": describe_device(hw, device), "device_index": str(device), "device_type": device.type,
        "capability": list(hw.capability) if hw.capability else None, "torch": torch.__version__,
        "cuda": torch.version.cuda if hw.is_cuda else None,
        "threads": torch.get_num_threads(), "python": platform.python_version(),
        "config": asdict(config), "steps_per_round": steps, "amp": amp,
        "peak_tflops": {"tflops": peak[0], "dtype": peak[1]} if peak else None,
        # the variant train.py trains its default (instance norm) model in here, from the same devices.hardware
        "train_default": {"model": "ours-instance",
                          "variant": Variant(amp or "fp32", hw.channels_last("instance", dtype=hw.amp_dtype)).name},
        "malloc_tuned": False, "skipped": skipped, "failed": failed,
        "other_cpu_before": other_before, "other_cpu_during": None,
        "peers": {p: package_version(p) for p in ("monai", "segmentation_models_pytorch")},
        "complete": False,
    }


def assemble_report(meta: dict, matmul: dict[str, list], data: list[dict], results: list[dict],
                    peak: tuple | None) -> dict:
    """The report so far: each row's share of the matmul reference (and MFU against the GPU's peak)."""
    summary = {k: {"median": statistics.median(v), "max": max(v), "all": v} for k, v in matmul.items() if v}
    for e in results:
        ref = summary[e["variant"].split("-")[0]]["median"]
        e["matmul_fraction"] = e["train_flops_per_s"] / ref
        if "kernel_flops_per_s" in e:
            e["kernel_matmul_fraction"] = e["kernel_flops_per_s"] / ref
        if "paper_train_flops_per_s" in e:
            e["paper_matmul_fraction"] = e["paper_train_flops_per_s"] / ref
        if peak:
            e["mfu"] = e["train_flops_per_s"] / (peak[0] * 1e12)
    return {"meta": meta, "matmul_flops_per_s": summary, "data_pipeline": data, "results": results,
            "memory_format": memory_format_verdicts(results)}


def measure_flops_and_memory(plan: list, config: BenchConfig, device: torch.device, failed: dict,
                             log: Callable) -> tuple[dict, dict]:
    """Phase 1: each model's FLOPs per image (counted on the CPU) and the peak memory of its first steps, one
    model alive at a time. A variant that fails (out of memory, torch.compile without a compiler) is recorded
    in `failed` and left out of the timing."""
    flops, memory = {}, {}
    for size in config.sizes:
        for name, variant in plan:
            runner = None
            try:
                if (name, size) not in flops:
                    flops[name, size] = count_flops(name, size)
                runner = Runner(name, variant, size, config, device)
                memory[name, variant, size] = runner.measure_memory()
            except Exception as err:  # say so, and measure the rest
                failed[f"{name} {variant.name} {size}"] = _first_line(err)
                log(f"  {name} {variant.name} at {size}x{size} failed: {_first_line(err)}")
            finally:
                runner = None
                release(device)
    return flops, memory


def time_rounds(runners: list[Runner], config: BenchConfig, device: torch.device, steps: int, amp: str | None,
                matmul: dict[str, list], after_round: Callable[[int], None] | None = None) -> None:
    """Phase 2 at one size: warm-up, then timed rounds with every model once per round (so that load from
    other processes hits all of them alike), each round beside a matmul reference. after_round(n) runs after
    the n-th timed round (run() saves the figures so far: a job killed mid-size keeps them)."""
    for _ in range(config.warmup):
        for r in runners:
            r.timed(r.train_step, steps), r.timed(r.infer_step, steps)
    for _ in range(config.repeats):
        matmul["fp32"].append(matmul_flops_per_s(device))
        if amp:
            matmul[amp].append(matmul_flops_per_s(device, AMP_DTYPES[amp]))
        for r in runners:
            r.train_times.append(r.timed(r.train_step, steps))
            r.infer_times.append(r.timed(r.infer_step, steps))
        if after_round is not None:
            after_round(len(runners[0].train_times) if runners else 0)


def provisional_entries(runners: list[Runner], size: int, config: BenchConfig, flops: dict, memory: dict,
                        rounds: int) -> list[dict]:
    """The rows of the size being timed, from its first `rounds` rounds (of config.repeats): what a report saved
    mid-size holds under "provisional", apart from the finished rows."""
    return [{**result_entry(r, size, config.batch_size, flops[r.name, size], memory[r.name, r.variant, size], None),
             "rounds": rounds, "of_rounds": config.repeats} for r in runners]


def result_entry(r: Runner, size: int, batch_size: int, flops: dict, memory: dict, share: float | None) -> dict:
    """One row of the report: a model variant's speeds, FLOPs, memory and, with --breakdown, its kernel ceiling."""
    entry = {
        "model": r.name, "variant": r.variant.name, "size": size, "description": MODELS[r.name][2],
        "parameters": modules.count_parameters(r.eager),
        "train_images_per_s": batch_size / statistics.median(r.train_times),
        "infer_images_per_s": batch_size / statistics.median(r.infer_times),
        "train_step_s": r.train_times, "infer_step_s": r.infer_times, **flops, **memory,
    }
    entry["train_flops_per_s"] = entry["train_flops_per_image"] * entry["train_images_per_s"]
    if "paper_train_flops_per_image" in entry:
        entry["paper_train_flops_per_s"] = entry["paper_train_flops_per_image"] * entry["train_images_per_s"]
    if share:
        entry["kernel_time_share"] = share
        entry["kernel_flops_per_s"] = entry["train_flops_per_s"] / share
    return entry


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
    """benchmark.md: the set-up, one table per size, the projected ISIC epoch, the memory format and notes."""
    meta = report["meta"]
    by_size: dict[int, list[dict]] = {}
    for e in report["results"]:
        by_size.setdefault(e["size"], []).append(e)
    data = {d["size"]: d["images_per_s"] for d in report["data_pipeline"]}
    lines = _markdown_header(report)
    for size, entries in by_size.items():
        lines += _markdown_size(size, entries, data.get(size), meta["device_type"] == "cuda", meta.get("peak_tflops"))
    return "\n".join(lines + _markdown_closing(report, by_size, data)) + "\n"


def _markdown_header(report: dict) -> list[str]:
    """The title, how the timings were taken, the matmul reference and the MFU's peak."""
    meta, mm = report["meta"], report["matmul_flops_per_s"]
    cfg, cuda, amp, peak = meta["config"], meta["device_type"] == "cuda", meta.get("amp"), meta.get("peak_tflops")
    steps = meta.get("steps_per_round", 1)
    lines = [
        f"# Benchmark: {meta['device']}, {meta['date'][:10]}",
        "",
        f"torch {meta['torch']}, {meta['threads']} threads, {cfg.get('clock', 'wall')} clock, batch {cfg['batch_size']}, "
        f"median of {cfg['repeats']} "
        f"interleaved rounds{f' of {steps} steps' if steps > 1 else ''} after {cfg['warmup']} warm-up; "
        + ("cuDNN autotuning and TF32 on, as train.py runs; " if cuda else "")
        + f"glibc malloc tuning {'on' if meta['malloc_tuned'] else 'off'}; "
        f"{_other_cpu_text(meta.get('other_cpu_during'))}.",
        "",
    ]
    if not meta.get("complete", True):
        done = sorted({e["size"] for e in report["results"]})
        rounds = {(e["size"], e["rounds"], e["of_rounds"]) for e in report.get("provisional", [])}
        lines += [f"**Partial**: the run stopped before it finished; sizes done: {', '.join(map(str, done)) or 'none'}"
                  + "".join(f"; {size} px stopped after {n} of its {of} timed rounds (benchmark.json's provisional "
                            f"rows)" for size, n, of in sorted(rounds)) + ".", ""]
    if "fp32" in mm:
        lines += ["Matmul reference, measured in every round: float32" + (" (TF32)" if cuda else "") + " median "
                  f"{mm['fp32']['median'] / 1e9:.0f} GFLOP/s (best {mm['fp32']['max'] / 1e9:.0f})"
                  + (f"; {amp} median {mm[amp]['median'] / 1e12:.0f} TFLOP/s" if amp in mm else "") + ".", ""]
    if peak:
        lines += [f"MFU: training FLOP/s as counted below over the GPU's dense {peak['dtype']} tensor-core peak, "
                  f"{peak['tflops']:g} TFLOP/s (data sheet).", ""]
    return lines


def _markdown_size(size: int, entries: list[dict], data_ips: float | None, cuda: bool, peak: dict | None) -> list[str]:
    """One size's table, against our model, and its notes (paper FLOPs, the kernel ceiling, the data pipeline)."""
    ours = next((e for e in entries if e["model"] == OURS), None)
    lines = [
        f"## {size}x{size}",
        "",
        "| model | variant | train img/s | inference img/s | train GFLOP/img | train GFLOP/s | of matmul "
        f"| peak train memory MB | {OURS} train speed / this | {OURS} FLOP/s / this | ISIC epoch at this size |"
        + (" MFU |" if peak else ""),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if peak else ""),
    ]
    for e in entries:
        ratio_ips = ratio_fl = "-"
        if ours is not None and e is not ours:
            ratio_ips = f"{ours['train_images_per_s'] / e['train_images_per_s']:.2f}x"
            ratio_fl = f"{ours['train_flops_per_s'] / e['train_flops_per_s']:.2f}x"
        epoch_s = ISIC_TRAIN_IMAGES / e["train_images_per_s"]
        mem = e["train_peak_mb"] if cuda else e["train_extra_mb"]
        lines.append(
            f"| {e['model']} | {e['variant']} | {e['train_images_per_s']:.2f} | {e['infer_images_per_s']:.2f} "
            f"| {e['train_flops_per_image'] / 1e9:.2f} | {e['train_flops_per_s'] / 1e9:.1f} "
            f"| {e['matmul_fraction']:.0%} | {_fmt(mem, '.0f')} | {ratio_ips} | {ratio_fl} "
            f"| {format_seconds(epoch_s)} |" + (f" {e['mfu']:.1%} |" if peak else "")
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
    if data_ips is not None:
        ratio = f" = {data_ips / ours['train_images_per_s']:.1f}x {OURS}'s training speed" if ours else ""
        lines.append(f"- Data pipeline (cached uint8, shuffled, augmented, normalised): {data_ips:.0f} img/s{ratio}.")
    lines.append("")
    return lines


def _markdown_closing(report: dict, by_size: dict[int, list[dict]], data: dict[int, float]) -> list[str]:
    """The projected ISIC epoch at 256 px, the memory format with instance norm, and the notes."""
    meta, lines = report["meta"], []
    if 256 in by_size and 256 in data:
        lines += [f"Projected ISIC 2018 epoch ({ISIC_TRAIN_IMAGES} images at 256x256, training steps plus the data "
                  "pipeline in the same process):", ""]
        for e in by_size[256]:
            t = ISIC_TRAIN_IMAGES / e["train_images_per_s"] + ISIC_TRAIN_IMAGES / data[256]
            lines.append(f"- {e['model']} {e['variant']}: {format_seconds(t)}")
        lines.append("")
    verdicts = report.get("memory_format", [])
    if verdicts:
        lines += ["Memory format with instance norm (ours-instance, training):", ""]
        for v in verdicts:
            lines.append(f"- {v['size']}x{v['size']}, {v['dtype']}: channels-last trains at "
                         f"{v['channels_last_speedup']:.2f}x NCHW's speed ({v['channels_last_images_per_s']:.1f} against "
                         f"{v['nchw_images_per_s']:.1f} img/s): "
                         + ("no clear difference." if v["faster"] == "neither" else f"{v['faster']} is faster."))
        default = meta.get("train_default")
        if default:
            lines.append(f"- train.py trains {default['model']} as {default['variant']} on this device.")
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
    if meta.get("failed"):
        lines.append("- Failed (model variant size: error): " + "; ".join(f"{k}: {v}" for k, v in meta["failed"].items()))
    return lines


def format_seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def parse_args(argv: list[str] | None) -> BenchConfig:
    defaults = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=defaults.device, help="auto (cuda > cpu; the default), cpu, cuda or cuda:N")
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=defaults.quick,
                   help="3 timed rounds, 1 warm-up, fewer variants. CPU: about 3 minutes on an idle 2-core CPU. CUDA: "
                        "about 2 minutes: fp32 (TF32), mixed precision, channels-last and compile for ours-batch, and "
                        "NCHW against channels-last for ours-instance")
    p.add_argument("--sizes", type=int, nargs="+", default=defaults.sizes,
                   help="square input sides, multiples of 32 (default 128 256)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per step (default 8)")
    p.add_argument("--models", nargs="+", default=None,
                   help=f"models to run, from: {', '.join(MODELS)} (default: {', '.join(DEFAULT_MODELS)}"
                        f", and {', '.join(FULL_EXTRA_MODELS)} without --quick)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds, medians reported (default 5; quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds per model first (default 2; quick 1)")
    p.add_argument("--steps", type=int, default=defaults.steps,
                   help="steps per timed round (default 0: 1 on CPU, 10 on CUDA, where a step takes milliseconds)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=defaults.compile,
                   help="CUDA: also time ours-batch under torch.compile (default on; its first steps compile for "
                        "about a minute)")
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
                       repeats=a.repeats, warmup=a.warmup, steps=a.steps, compile=a.compile, threads=a.threads,
                       clock=a.clock, tune_malloc=a.tune_malloc, breakdown=a.breakdown, data_images=a.data_images,
                       baseline_modules=a.baseline_modules, out=a.out)


def _write_atomic(path: Path, text: str) -> None:
    with utils.atomic_write(path) as tmp:
        tmp.write_text(text)


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "benchmark.json", json.dumps(report, indent=2) + "\n")
    _write_atomic(out / "benchmark.md", markdown(report))


def main(argv: list[str] | None = None) -> dict:
    config = parse_args(argv)
    out = Path(config.out)
    try:
        report = run(config, save=lambda partial: write_report(partial, out))
    except devices.DeviceError as err:  # a GPU this PyTorch build has no kernels for: the message says what to install
        print(f"benchmark.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(markdown(report))
    print(f"wrote {out / 'benchmark.json'} and {out / 'benchmark.md'}")
    return report


if __name__ == "__main__":
    main()
