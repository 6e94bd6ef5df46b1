"""What the hardware can do, decided in one place: device names, capability, mixed precision, compile,
memory format, copies, synchronisation, backend flags and the distributed set-up.

Every other file asks `hardware(device)` (a Hardware) instead of testing `device.type` itself, so a new
device or a new measurement changes this file only. CUDA (NVIDIA and ROCm builds), Apple MPS and the CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime
import functools
import os
import platform
import re
import warnings
from pathlib import Path
from typing import Literal, NamedTuple, get_args

import torch


# --amp's choices, for train.py, predict.py and benchmark.py alike
Amp = Literal["auto", "bf16", "fp16", "off"]
AMP_CHOICES = get_args(Amp)


class DeviceError(RuntimeError):
    """The device cannot run this job; the message names the device and what to do."""


def out_of_memory(err: BaseException) -> bool:
    """Whether an exception is the device running out of memory: CUDA's and ROCm's OutOfMemoryError, or MPS's
    RuntimeError, which has no class of its own."""
    return isinstance(err, torch.cuda.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "MPS backend out of memory" in str(err))


# ----------------------------------------------------------------------------- names


def select_device(name: str = "auto") -> torch.device:
    """The device to run on, with its index: ``auto`` picks cuda > mps > cpu; otherwise the named one.

    CUDA devices always carry an index (torch.device("cuda") != torch.device("cuda:0")): the GPU of
    LOCAL_RANK under torchrun, else the current one. Under a multi-process torchrun every process
    takes the GPU of its LOCAL_RANK, whatever index was named. A named device that is not available
    raises a ValueError that says what is available, and a GPU this PyTorch build has no kernels for
    raises DeviceError, rather than failing later inside the first tensor copy.
    """
    name = name.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            return torch.device("mps")
        else:
            check_job_gpus_usable()
            return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r} is not a device name; use auto, cpu, cuda, cuda:N or mps") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name} was asked for but CUDA is not available here; {available_devices()}")
        device = _cuda_device(device.index)
        check_cuda_build(device)
        # the process's current GPU: the one whose random generator a checkpoint saves and restores, and
        # where a bare .cuda() lands; left at cuda:0, --device cuda:1 would also open a context on GPU 0
        torch.cuda.set_device(device)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device mps was asked for but MPS is not available here; {available_devices()}")
    return device


# What SLURM sets in a job, or a step of it, that was given GPUs (--gres=gpu:N or --gpus).
SLURM_GPU_VARIABLES = ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS")


def slurm_job_gpus() -> tuple[str, str] | None:
    """(variable, value) of the first SLURM variable that says this job holds GPUs, or None."""
    for variable in SLURM_GPU_VARIABLES:
        value = os.environ.get(variable, "").strip()
        # SLURM_GPUS_ON_NODE is a count; the others list GPU indices, where 0 is the first GPU
        if value and not (variable == "SLURM_GPUS_ON_NODE" and value == "0"):
            return variable, value
    return None


def check_job_gpus_usable() -> None:
    """A SLURM job that was given GPUs which PyTorch cannot use stops here instead of falling back to the
    CPU: at the GPU's pace a CPU run would take days, and a job script that requeues would keep it going."""
    given = slurm_job_gpus()
    if given is None:
        return
    if torch.version.cuda is None and not is_rocm():
        why = (f"this PyTorch ({torch.__version__}) is a CPU-only build; install a CUDA build in the job's "
               "environment (docs/getting-started.md)")
    else:
        why = ("the driver did not answer (run `sbatch slurm/gpu_check.sh`; docs/troubleshooting.md lists the "
               "causes)")
    raise DeviceError(f"this SLURM job was given a GPU ({given[0]}={given[1]}) but PyTorch cannot use it: {why}. "
                      "To train on the CPU anyway, pass --device cpu")


def canonical(device: str | torch.device) -> torch.device:
    """The device as tensors on it report it: a bare "cuda" is the current GPU, cuda:N."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _cuda_device(index: int | None) -> torch.device:
    """cuda:N for a named or unnamed index: LOCAL_RANK's GPU under torchrun, else the current device."""
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None and (index is None or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        if index is not None and index != int(local_rank):
            warnings.warn(f"--device cuda:{index} ignored for this process: under torchrun each process uses the "
                          f"GPU of its LOCAL_RANK, here cuda:{local_rank}")  # once per process: one source line
        index = int(local_rank)
        if index >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={index} but this node has {torch.cuda.device_count()} visible GPU(s); "
                             "start at most that many processes per node (torchrun --nproc_per_node)")
    elif index is None:
        index = torch.cuda.current_device()
    elif index >= torch.cuda.device_count():
        raise ValueError(f"--device cuda:{index}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device("cuda", index)


def available_devices() -> str:
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        found.append("mps")
    return "available: " + ", ".join(found)


def is_rocm() -> bool:
    """A ROCm (HIP) build: AMD GPUs answer as "cuda" devices, with gfx architectures, not compute capabilities."""
    return bool(getattr(torch.version, "hip", None))


def _arch_fits(arch: str, capability: tuple[int, int]) -> bool:
    """Whether one entry of torch.cuda.get_arch_list() runs on a GPU of this compute capability.

    sm_XY is machine code for major X, minor >= Y (sm_XYa only for exactly X.Y); compute_XY is PTX,
    which the driver compiles for any capability >= X.Y.
    """
    match = re.fullmatch(r"(sm|compute)_(\d+)(\d)([a-z]?)", arch)
    if match is None:
        return False
    kind, built = match.group(1), (int(match.group(2)), int(match.group(3)))
    if kind == "compute":
        return capability >= built
    if match.group(4) == "a":
        return capability == built
    return capability[0] == built[0] and capability[1] >= built[1]


def _build_advice(capability: tuple[int, int]) -> str:
    """What to install for a compute capability. PyTorch's CUDA 12.6 wheels are the ones with Maxwell, Pascal
    and Volta kernels (sm_50-sm_90); its CUDA 12.8 and 13.0 wheels cover sm_75-sm_120."""
    major, minor = capability
    if capability < (5, 0):
        return "no current PyTorch build has kernels for it: run on the CPU with --device cpu"
    if capability < (7, 5):
        return (f"install a PyTorch build with sm_{major}{minor} kernels, e.g. a CUDA 12.6 build: "
                "pip install torch --index-url https://download.pytorch.org/whl/cu126 (or run on the CPU with "
                "--device cpu)")
    return ("install a newer PyTorch build, e.g. pip install --upgrade torch --index-url "
            "https://download.pytorch.org/whl/cu130 (or run on the CPU with --device cpu)")


def check_cuda_build(device: torch.device) -> None:
    """Raise DeviceError unless this PyTorch build has kernels (or PTX) for the GPU `device` names.

    Without them the first kernel fails with "no kernel image is available for execution on the
    device"; this says instead which GPU, which kernels the build has, and what to install.
    """
    arch_list = torch.cuda.get_arch_list()
    if not arch_list or is_rocm():  # no CUDA build, or ROCm (gfx90a...: not checked here)
        return
    capability = tuple(torch.cuda.get_device_capability(device))
    if any(_arch_fits(arch, capability) for arch in arch_list):
        return
    raise DeviceError(
        f"{torch.cuda.get_device_name(device)} ({device}) has compute capability {capability[0]}.{capability[1]}, "
        f"but this PyTorch {torch.__version__} has kernels only for {', '.join(arch_list)}: "
        f"{_build_advice(capability)}")


# ----------------------------------------------------------------------------- capability


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512_BF16 or AMX tiles), so that autocast to bf16 is faster.

    Without them oneDNN emulates bf16 in fp32 and a step is slower than in plain fp32. On the 2-core Xeon
    with AMX that measured it, training ran 2.1x (96 px) and 2.7x (128 px) faster in bf16 (docs/benchmarks.md).
    """
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


# ROCm architectures that torch.compile's Triton backend supports: CDNA2 and later, RDNA3 and later.
ROCM_COMPILE_ARCHS = ("gfx90a", "gfx94", "gfx95", "gfx11", "gfx12")
# bf16 in the matrix units: MI100 (gfx908) and later Instinct GPUs, RDNA3 and RDNA4. MI50/MI60 (gfx906) and
# RDNA1/2 (gfx101x, gfx103x) would emulate it, slower than fp16.
ROCM_BF16_ARCHS = ("gfx908", "gfx90a", "gfx94", "gfx95", "gfx11", "gfx12")


def _rocm_arch(device: torch.device) -> str:
    """The gfx architecture of a ROCm GPU ("gfx90a"), without its feature suffix (":sramecc+:xnack-")."""
    name = getattr(torch.cuda.get_device_properties(device), "gcnArchName", "") or ""
    return name.split(":")[0]


@dataclasses.dataclass(frozen=True)
class Hardware:
    """What one device can do; the one place where training and prediction settings follow the device."""

    device: torch.device  # normalised: cuda:N with its index
    name: str  # "NVIDIA A100-SXM4-80GB", "AMD Instinct MI250X (gfx90a)", "Apple MPS", "CPU"
    capability: tuple[int, int] | None  # CUDA compute capability; None off NVIDIA CUDA (ROCm, MPS, CPU)
    amp_dtype: torch.dtype | None  # what --amp auto uses: bf16 where the device computes it natively, fp16 on
    # CUDA below 8.0, None (float32) elsewhere
    can_compile: bool  # torch.compile is possible and worth it: NVIDIA from 7.0 (Triton's minimum), ROCm CDNA2+

    @property
    def is_cuda(self) -> bool:
        """A CUDA (or ROCm) GPU: kernels run asynchronously, behind a queue that a host read stalls."""
        return self.device.type == "cuda"

    @property
    def is_cpu(self) -> bool:
        return self.device.type == "cpu"

    def channels_last(self, norm: str, training: bool = True, dtype: torch.dtype | None = None,
                      size: int | None = None) -> bool:
        """The default memory format of the network's activations: NHWC (True) or NCHW, for autocast to `dtype`
        and inputs of `size` px.

        Instance norm trains NCHW everywhere: ATen's group-norm kernels make their input contiguous, so in
        NHWC each of the ~25 norms converts the activations to NCHW and the next convolution back
        (upstream measured +24% step time for nnU-Net on CUDA, pytorch#59168; on a 2-core Xeon with AMX,
        bf16 training ran 81 img/s NCHW against 25 NHWC at 96 px). Batch norm runs NHWC on NVIDIA GPUs with
        tensor cores (compute capability 7.0 and up), where cuDNN's tensor-core kernels are NHWC, NCHW on
        older ones (P100) and on ROCm, whose MIOpen kernels are NCHW-first (neither measured here), and trains
        NHWC on the CPU in fp32 (18-19% faster there).
        CPU inference runs NHWC, except in bf16 up to 128 px, where NCHW is faster (forward, batch 8, on
        the Xeon: 96 px 198 against 110 img/s, 128 px 135 against 112; 256 px NHWC 37.5 against 21.8).
        MPS: NCHW, its best-supported layout. gpu_check.py measures both formats with each norm on a GPU.
        """
        if self.device.type == "mps":
            return False
        if self.is_cuda:
            # tensor cores (NVIDIA from 7.0) are what NHWC buys; a P100 has none, and MIOpen (ROCm) is tuned NCHW
            return norm == "batch" and self.capability is not None and self.capability >= (7, 0)
        if not training:
            return dtype is None or size is None or size > 128
        return norm == "batch" and dtype is None

    @property
    def fused_optimizer(self) -> bool:
        """Adam's fused kernel (one pass over all parameters): a third of the multi-tensor time on the CPU
        (9 vs 28 ms a step for this model) and the usual choice on CUDA; MPS got it only in recent releases."""
        return self.device.type in ("cpu", "cuda")

    @property
    def check_every(self) -> int:
        """Steps between reads that wait for the device (the loss's finiteness, the preemption flag under DDP):
        each stalls the queue of kernels the host has launched ahead. A CPU has no queue to stall."""
        return 1 if self.is_cpu else 25

    @property
    def non_blocking(self) -> bool:
        """Whether a host-to-device copy may return before it is done: only from pinned memory to CUDA.

        On MPS a non-blocking copy from pageable memory can read the source after it was freed (silent
        corruption, pytorch#139550), so copies there wait."""
        return self.is_cuda

    @property
    def pin_memory(self) -> bool:
        """Whether host staging buffers are pinned (page-locked): what makes CUDA copies asynchronous."""
        return self.is_cuda

    @property
    def antialias_resize(self) -> bool:
        """Whether F.interpolate(..., antialias=True) runs on this device (MPS got it in PyTorch 2.7)."""
        return self.device.type != "mps" or _torch_version() >= (2, 7)

    def synchronize(self) -> None:
        """Wait until the device has finished its queued work, so a clock reads the real time."""
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()

    def free_memory(self) -> int | None:
        """Bytes the device has free for a cache held on it; None where memory is the host's (CPU, MPS's
        unified memory), so holding data there costs no second copy."""
        return torch.cuda.mem_get_info(self.device)[0] if self.is_cuda else None

    def empty_cache(self) -> None:
        """Return the blocks the caching allocator keeps to the driver (after an out-of-memory error)."""
        if self.is_cuda:
            torch.cuda.empty_cache()
        elif self.device.type == "mps":
            torch.mps.empty_cache()

    def reset_peak_memory(self) -> int | None:
        """Start counting the allocator's peak anew; the bytes allocated now, or None where the allocator
        keeps no count (the CPU: benchmark.py reads the process's resident set there)."""
        if not self.is_cuda:
            return None
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def peak_memory(self) -> int | None:
        """The allocator's peak bytes since reset_peak_memory, or None where it keeps no count."""
        if not self.is_cuda:
            return None
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)

    def autocast(self, dtype: torch.dtype | None):
        """A factory of autocast contexts to `dtype` on this device (nullcontext for float32)."""
        if dtype is None:
            return contextlib.nullcontext
        return functools.partial(torch.autocast, self.device.type, dtype=dtype)

    def grad_scaler(self, dtype: torch.dtype | None) -> torch.amp.GradScaler | None:
        """A GradScaler for fp16 only: bf16 has fp32's exponent range and needs no loss scaling."""
        return torch.amp.GradScaler(self.device.type) if dtype == torch.float16 else None

    def compile_refusal(self, dtype: torch.dtype | None) -> str | None:
        """Why torch.compile cannot run here with autocast to `dtype`, or None when it can."""
        if not self.can_compile:
            return (f"torch.compile's GPU kernels (Triton) need CUDA capability 7.0 or higher (or a ROCm GPU from "
                    f"gfx90a)" + (f", this GPU has {self.capability[0]}.{self.capability[1]}" if self.capability else ""))
        if dtype == torch.bfloat16 and self.capability is not None and self.capability < (8, 0):
            return (f"Triton's bf16 kernels need CUDA capability 8.0 (ptxas refuses bf16 below sm_80), this GPU has "
                    f"{self.capability[0]}.{self.capability[1]}; use --amp fp16 or auto to compile")
        return None

    def describe(self, dtype: torch.dtype | None, channels_last: bool) -> str:
        """'cpu (bf16, NCHW)' for the run's first line."""
        precision = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[dtype]
        return f"{self.device} ({precision}, {'NHWC' if channels_last else 'NCHW'})"


def accelerator_rng_states() -> dict:
    """The generators of the accelerators this process uses, by device type: the current CUDA device's (set by
    select_device; get_rng_state_all() would create a context on every GPU in every torchrun process) and
    MPS's. A device type whose generator is not in use is None."""
    return {"cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
            "mps": torch.mps.get_rng_state() if torch.backends.mps.is_available() else None}


def set_accelerator_rng_states(states: dict) -> None:
    """Restore what accelerator_rng_states() returned; a device type missing here is left alone."""
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"].cpu())
    if states.get("mps") is not None and torch.backends.mps.is_available():
        torch.mps.set_rng_state(states["mps"].cpu())


def _torch_version() -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", torch.__version__).groups()
    return int(major), int(minor)


def hardware(device: str | torch.device) -> Hardware:
    """The Hardware of a device that select_device returned (its CUDA build already checked)."""
    device = canonical(device)
    if device.type == "cuda" and is_rocm():
        arch = _rocm_arch(device)
        # a gfx number is no compute capability (gfx906 would read as 9.0), and torch.cuda.is_bf16_supported()
        # answers True for every HIP device, emulated or not: the architecture decides
        amp = torch.bfloat16 if arch.startswith(ROCM_BF16_ARCHS) else torch.float16
        return Hardware(device, f"{torch.cuda.get_device_name(device)} ({arch or 'gfx?'})", None, amp,
                        arch.startswith(ROCM_COMPILE_ARCHS))
    if device.type == "cuda":
        capability = tuple(torch.cuda.get_device_capability(device))
        # cuDNN has bf16 convolutions only from Ampere (8.0); below, bf16 falls back to slow kernels
        amp = torch.bfloat16 if capability >= (8, 0) else torch.float16
        return Hardware(device, torch.cuda.get_device_name(device), capability, amp, capability >= (7, 0))
    if device.type == "mps":
        return Hardware(device, "Apple MPS", None, None, False)
    return Hardware(device, "CPU", None, torch.bfloat16 if cpu_has_native_bf16() else None, False)


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def amp_dtype(amp: str, hw: Hardware) -> torch.dtype | None:
    """The autocast dtype for an --amp choice: "auto" takes the device's (hw.amp_dtype); bf16, fp16, off as named."""
    if amp == "auto":
        return hw.amp_dtype
    if amp not in AMP_DTYPES:
        raise ValueError(f"--amp {amp!r}: choose {', '.join(AMP_CHOICES)}")
    if amp == "bf16" and hw.capability is not None and hw.capability < (8, 0):
        warnings.warn(f"--amp bf16 on {hw.name} (compute capability {hw.capability[0]}.{hw.capability[1]}): cuDNN "
                      "has bf16 convolutions only from 8.0, so this runs slower than fp32; use --amp fp16 or auto",
                      stacklevel=2)
    if amp == "bf16" and hw.is_cpu and not cpu_has_native_bf16():
        warnings.warn("--amp bf16 on a CPU without AVX512_BF16 or AMX: bf16 is emulated there and runs slower "
                      "than fp32; use --amp auto", stacklevel=2)
    return AMP_DTYPES[amp]


# ----------------------------------------------------------------------------- copies


def copy_to(tensor: torch.Tensor, hw: Hardware) -> torch.Tensor:
    """A host tensor on hw's device, with one copy: pinned and asynchronous to CUDA, a waiting copy elsewhere.

    The pinned buffer stays alive with the copy's source until the copy has run (the caching host allocator
    records the stream), so the caller may drop it; an unpinned source is never copied asynchronously.
    """
    if hw.is_cpu:
        return tensor
    if hw.pin_memory:
        tensor = tensor.pin_memory()
    return tensor.to(hw.device, non_blocking=hw.non_blocking)


# ----------------------------------------------------------------------------- backends


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # mallopt parameters from glibc's <malloc.h>
DEFAULT_MMAP_MAX = 65536  # glibc's own default for M_MMAP_MAX


def mallopt(param: int, value: int) -> bool:
    """glibc's mallopt(param, value); False where the C library is not glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(param, value))
    except (OSError, AttributeError):
        return False


def tune_glibc_malloc() -> bool:
    """Keep freed memory in the process: large blocks from the heap instead of fresh mmap pages, never trimmed.

    Every CPU training step frees and re-allocates the same activations; with glibc's defaults each large
    one comes back as new zeroed pages whose first touch faults (on a 2-core VM, 256x256 steps ran about
    10% faster tuned; no change at 64x64). The resident set then stays at its high-water mark.
    Process-wide, Linux/glibc only; returns whether it took effect.
    """
    return mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, 2**31 - 1)


def configure_backends(hw: Hardware, deterministic: bool = False, tune_malloc: bool = True) -> None:
    """The process-wide switches that training and benchmark.py share: cuDNN autotuning and TF32 on CUDA
    (TF32 convolutions and matmuls keep fp32's range with a 10-bit mantissa: the usual choice for training),
    glibc's allocator kept warm on the CPU."""
    if hw.is_cuda:
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif hw.is_cpu and tune_malloc:
        tune_glibc_malloc()


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (which SLURM, taskset and cpusets set), else
    SLURM_CPUS_PER_TASK, else every core of the machine. os.cpu_count() counts the whole node, so a job
    given 4 of 64 cores would start 64 threads."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        pass
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        return int(slurm)
    return os.cpu_count() or 1


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and core count, for result tables."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


# ----------------------------------------------------------------------------- distributed


class DistInfo(NamedTuple):
    rank: int  # global rank, 0 .. world_size - 1
    local_rank: int  # rank within this node: the GPU index
    world_size: int  # number of processes
    is_distributed: bool  # False for a plain single-process run


DIST_TIMEOUT_MINUTES = 60  # rank 0 builds the data cache while the others wait (NCCL's own default is 10)


def dist_timeout() -> datetime.timedelta:
    """How long a collective may wait for the other ranks: DIST_TIMEOUT_MINUTES from the environment, else 60."""
    value = os.environ.get("DIST_TIMEOUT_MINUTES", str(DIST_TIMEOUT_MINUTES))
    try:
        minutes = float(value)
    except ValueError:
        minutes = -1.0
    if minutes <= 0:
        raise ValueError(f"DIST_TIMEOUT_MINUTES={value!r} is not a positive number of minutes")
    return datetime.timedelta(minutes=minutes)


def init_distributed(device: str | torch.device | None = None) -> DistInfo:
    """Join the process group that torchrun describes in RANK, LOCAL_RANK and WORLD_SIZE.

    A no-op returning DistInfo(0, 0, 1, False) when WORLD_SIZE is unset or 1. Otherwise the backend
    follows `device` (as for select_device; None means auto): NCCL for CUDA, each process on the GPU
    of its LOCAL_RANK (select_device warns when another index was named), gloo for cpu, so a CPU run
    on a GPU node uses gloo. MPS is refused: gloo cannot carry MPS tensors and there is no other backend.
    Collectives wait up to dist_timeout(), long enough for rank 0's first cache build while the others
    wait at a barrier. Calling it again returns the same information.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(0, 0, 1, False)
    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    except (KeyError, ValueError) as err:
        raise RuntimeError(
            f"WORLD_SIZE={world_size} is set but RANK or LOCAL_RANK is missing or not a number; "
            "launch with torchrun --nproc_per_node=N train.py ..., or unset WORLD_SIZE for one process"
        ) from err
    info = DistInfo(rank, local_rank, world_size, True)
    if not torch.distributed.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed; run one process")
    if torch.distributed.is_initialized():
        return info
    chosen = select_device("auto" if device is None else str(device))
    if chosen.type == "mps":
        raise DeviceError("torchrun with MPS: PyTorch has no distributed backend for Apple GPUs (gloo cannot carry "
                          "MPS tensors); run one process (python train.py), or several on the CPU with --device cpu")
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)  # before NCCL starts, so each rank owns one GPU
        torch.distributed.init_process_group("nccl", device_id=chosen, timeout=dist_timeout())
    else:
        torch.distributed.init_process_group("gloo", timeout=dist_timeout())
    return info


def cleanup_distributed(barrier_timeout: float = 600.0) -> None:
    """Leave the process group (if any), so the process exits without NCCL warnings.

    Under gloo the ranks first meet at a barrier: a gloo worker thread may still hold the last
    collective's tensors and need the GIL to free them, and a rank that went straight on to exit
    would finalise Python under it and abort ("terminate called without an active exception", seen
    in 2-process CPU runs under SLURM). The barrier releases the GIL while it waits; its timeout
    bounds the wait when another rank failed and never arrives.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_backend() == "gloo":
        try:
            torch.distributed.monitored_barrier(timeout=datetime.timedelta(seconds=barrier_timeout))
        except RuntimeError:
            pass  # a rank that failed; leave anyway
    torch.distributed.destroy_process_group()
