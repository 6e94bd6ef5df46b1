"""Device paths without the device: CUDA queries mocked, float64 and host-to-device copies watched on CPU.

`watch_tensors()` and `no_float64()` are for any test (`from test_devices import no_float64`): on the CPU,
a float64 tensor made on the model, loss or metric path would be made on the GPU too, and MPS has none.
"""

import contextlib
import dataclasses
import datetime
import os

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import dataset
import devices
import loader
import losses
import modules

# --- the watch: float64 tensors and host-to-device copies ------------------------------------------


@dataclasses.dataclass
class Watched:
    float64: list[str] = dataclasses.field(default_factory=list)  # ops that made a float64 tensor, and where
    host_to_device: list[str] = dataclasses.field(default_factory=list)  # copies from the CPU to another device


_COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}
_FACTORIES = (torch.tensor, torch.as_tensor, torch.asarray)


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


class _WatchOps(TorchDispatchMode):
    """Every aten op, after autograd and decomposition: what each made, and copies off the host."""

    def __init__(self, seen: Watched):
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        made = _tensors(out)
        for t in made:
            if t.dtype == torch.float64:
                self.seen.float64.append(f"{func} on {t.device}")
        if func in _COPIES and any(t.device.type == "cpu" for t in _tensors((args, kwargs))) \
                and any(t.device.type != "cpu" for t in made):
            self.seen.host_to_device.append(f"{func} to {made[0].device} {tuple(made[0].shape)}")
        return out


class _WatchFactories(TorchFunctionMode):
    """torch.tensor(data, device=...) builds and copies below the dispatcher, where _WatchOps cannot see it."""

    def __init__(self, seen: Watched):
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _FACTORIES and isinstance(out, torch.Tensor):
            if out.dtype == torch.float64:
                self.seen.float64.append(f"torch.{func.__name__} on {out.device}")
            if out.device.type != "cpu" and not isinstance(args[0] if args else None, torch.Tensor):
                self.seen.host_to_device.append(f"torch.{func.__name__} to {out.device} {tuple(out.shape)}")
        return out


@contextlib.contextmanager
def watch_tensors():
    """Record the float64 tensors and host-to-device copies that the code inside makes."""
    seen = Watched()
    with _WatchFactories(seen), _WatchOps(seen):
        yield seen


@contextlib.contextmanager
def no_float64():
    """Fail if the code inside makes a float64 tensor (on any device: MPS has none, and GPUs are slow at it)."""
    with watch_tensors() as seen:
        yield seen
    assert not seen.float64, f"float64 tensors made: {seen.float64[:5]}"


def watched(fn) -> Watched:
    with watch_tensors() as seen:
        fn()
    return seen


@pytest.mark.parametrize("make", [lambda: torch.ones(2).double(), lambda: torch.tensor([0.5], dtype=torch.float64),
                                  lambda: torch.as_tensor(np.zeros(2)), lambda: torch.zeros(1, dtype=torch.float64),
                                  lambda: torch.zeros(1) + torch.from_numpy(np.ones(1))])
def test_the_watch_sees_float64_however_it_is_made(make):
    assert watched(make).float64 and not watched(lambda: torch.ones(2).float().sum()).float64
    with pytest.raises(AssertionError, match="float64"):
        with no_float64():
            make()


@pytest.mark.parametrize("copy", [lambda: torch.ones(2).to("meta"), lambda: torch.tensor([1.0, 2.0], device="meta"),
                                  lambda: torch.as_tensor(torch.ones(2), device="meta"),
                                  lambda: torch.empty(2, device="meta").copy_(torch.ones(2))])
def test_the_watch_sees_host_to_device_copies_however_they_are_made(copy):
    assert len(watched(copy).host_to_device) == 1
    assert not watched(lambda: torch.ones(2, device="meta") * torch.ones(1, device="meta")).host_to_device


# --- select_device: normalised, one GPU per torchrun process -----------------------------------------


@pytest.fixture
def gpus(monkeypatch):
    """Two mocked CUDA devices of compute capability 9.0, with a build that has sm_90 kernels."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    current = [0]  # the process's current GPU, as torch.cuda.set_device moves it
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.__setitem__(0, torch.device(device).index))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_80", "sm_90"])
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def test_cuda_without_an_index_is_the_device_tensors_report(gpus):
    # torch.device("cuda") != torch.device("cuda:0"), and tensors on the GPU report cuda:0
    assert torch.device("cuda") != torch.device("cuda", 0)
    assert devices.select_device("cuda") == devices.select_device("auto") == torch.device("cuda", 0)
    assert devices.select_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="only 2 CUDA device"):
        devices.select_device("cuda:2")


def test_the_chosen_gpu_becomes_the_current_one_whose_generator_checkpoints_save(gpus, monkeypatch):
    """With --device cuda:1 in one process, the random state saved and restored is GPU 1's, and nothing
    opens a context on GPU 0 (torch.cuda's generator calls act on the current device)."""
    import checkpoint

    assert devices.select_device("cuda:1") == torch.device("cuda", 1) and torch.cuda.current_device() == 1
    saved_from = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": saved_from.append(
        torch.cuda.current_device()) or torch.zeros(8, dtype=torch.uint8))
    assert checkpoint.rng_state()["cuda"] is not None and saved_from == [1]
    assert devices.select_device("cuda") == torch.device("cuda", 1)  # a bare "cuda" is now that GPU


def test_the_mps_generator_is_saved_and_restored(monkeypatch):
    import checkpoint

    state = torch.arange(4, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: state)
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda value: restored.append(value))
    saved = checkpoint.rng_state()
    assert torch.equal(saved["mps"], state)
    checkpoint.set_rng_state(saved)
    assert len(restored) == 1 and torch.equal(restored[0], state)


def test_loader_given_cuda_without_an_index_works_on_the_cache_device(gpus, monkeypatch):
    monkeypatch.setattr(loader, "to_device", lambda groups, device: groups)  # no GPU to copy the statistics to
    split = dataset.CachedSplit(["a"], np.zeros((1, 8, 8, 3), np.uint8), np.zeros((1, 8, 8), np.uint8))
    batches = loader.make_loader(split, 1, (0.5,) * 3, (0.2,) * 3, device="cuda", train=True, seed=0,
                                 keep_on_device=False)
    assert batches.device == torch.device("cuda", 0) and not batches.on_device


def test_each_torchrun_process_takes_the_gpu_of_its_local_rank(gpus, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert devices.select_device("cuda") == devices.select_device("auto") == torch.device("cuda", 1)
    with pytest.warns(UserWarning, match="cuda:0 ignored.*LOCAL_RANK.*cuda:1"):
        assert devices.select_device("cuda:0") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match="LOCAL_RANK=2 but this node has 2 visible GPU.*nproc_per_node"):
        devices.select_device("cuda")


# --- Hardware: what each device does ------------------------------------------------------------------


def fake_gpu(monkeypatch, capability, name="NVIDIA H200"):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    return devices.hardware(torch.device("cuda", 0))


@pytest.mark.parametrize("capability, amp, compiles", [((9, 0), torch.bfloat16, True), ((8, 0), torch.bfloat16, True),
                                                        ((7, 5), torch.float16, True), ((7, 0), torch.float16, True),
                                                        ((6, 0), torch.float16, False)])
def test_cuda_amp_dtype_and_compile_follow_the_compute_capability(monkeypatch, capability, amp, compiles):
    hw = fake_gpu(monkeypatch, capability)
    assert (hw.device, hw.name, hw.capability) == (torch.device("cuda", 0), "NVIDIA H200", capability)
    assert hw.amp_dtype == amp and devices.amp_dtype("auto", hw) == amp
    assert hw.can_compile is compiles
    # cuDNN's tensor-core kernels are NHWC (from 7.0; a P100 has no tensor cores); ATen's group norm (instance
    # norm) makes its input NCHW
    assert hw.channels_last("batch") is (capability >= (7, 0)) and not hw.channels_last("instance")


@pytest.mark.parametrize("native", [True, False])
def test_the_cpu_trains_in_bf16_only_where_it_computes_bf16_natively(monkeypatch, native):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native)
    cpu = devices.hardware(torch.device("cpu"))
    assert cpu.name == "CPU" and cpu.capability is None and not cpu.can_compile
    assert cpu.amp_dtype == devices.amp_dtype("auto", cpu) == (torch.bfloat16 if native else None)
    # NCHW with instance norm (and in bf16); NHWC for fp32 batch norm and for inference
    assert not cpu.channels_last("instance") and not cpu.channels_last("batch", dtype=torch.bfloat16)
    assert cpu.channels_last("batch") and cpu.channels_last("instance", training=False)
    # inference: NHWC, except bf16 at the small sizes where NCHW measured faster
    assert cpu.channels_last("instance", training=False, dtype=None, size=96)
    assert not cpu.channels_last("instance", training=False, dtype=torch.bfloat16, size=96)
    assert cpu.channels_last("instance", training=False, dtype=torch.bfloat16, size=256)
    assert cpu.describe(cpu.amp_dtype, False) == f"cpu ({'bf16' if native else 'fp32'}, NCHW)"


def test_the_cpu_bf16_check_asks_torch_for_avx512_bf16_and_amx(monkeypatch):
    for avx, amx in ((True, False), (False, True), (False, False)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        assert devices.cpu_has_native_bf16() is (avx or amx)


def test_mps_runs_float32_nchw_with_waiting_copies_and_its_own_sync(monkeypatch):
    mps = devices.hardware(torch.device("mps"))
    assert mps.name == "Apple MPS" and mps.amp_dtype is None and not mps.can_compile
    assert not mps.channels_last("batch") and not mps.channels_last("instance", training=False)
    # a non-blocking copy from pageable memory can be read after it was freed on MPS (pytorch#139550)
    assert not mps.non_blocking and not mps.pin_memory and not mps.fused_optimizer
    synced = []
    monkeypatch.setattr(torch.mps, "synchronize", lambda: synced.append("mps"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append("cuda"))
    mps.synchronize()
    devices.hardware("cpu").synchronize()
    assert synced == ["mps"]  # the budget's step timer waits for MPS too; a CPU has nothing to wait for


def test_copies_to_mps_wait_and_copies_to_cuda_are_pinned_and_asynchronous(monkeypatch):
    calls = []

    class Probe(torch.Tensor):
        def pin_memory(self):
            calls.append("pin")
            return self

        def to(self, device, non_blocking=False):
            calls.append(("to", str(device), non_blocking))
            return self
    for name in ("mps", "cuda:0"):
        calls.clear()
        hw = devices.Hardware(torch.device(name), name, None, None, False)
        devices.copy_to(torch.zeros(3).as_subclass(Probe), hw)
        expected = [("to", "mps", False)] if name == "mps" else ["pin", ("to", "cuda:0", True)]
        assert calls == expected
    cpu = torch.zeros(3)
    assert devices.copy_to(cpu, devices.hardware("cpu")) is cpu


@pytest.mark.parametrize("version, antialias", [("2.4.1", False), ("2.6.0", False), ("2.7.0", True), ("2.14.1", True)])
def test_mps_shrinks_with_antialiasing_only_where_torch_has_it(monkeypatch, version, antialias):
    monkeypatch.setattr(torch, "__version__", version)
    assert devices.hardware(torch.device("mps")).antialias_resize is antialias
    assert devices.hardware(torch.device("cpu")).antialias_resize


@pytest.mark.parametrize("arch, amp, compiles", [("gfx906:sramecc+:xnack-", torch.float16, False),
                                                 ("gfx1030", torch.float16, False),
                                                 ("gfx908:sramecc+:xnack-", torch.bfloat16, False),
                                                 ("gfx90a:sramecc+:xnack-", torch.bfloat16, True),
                                                 ("gfx942", torch.bfloat16, True),
                                                 ("gfx1100", torch.bfloat16, True)])
def test_rocm_is_judged_by_its_arch_not_a_capability(gpus, monkeypatch, arch, amp, compiles):
    """gfx906 (MI50) would read as capability 9.0: bf16 and compile would be switched on for a GPU without them.
    torch.cuda.is_bf16_supported() says True for every HIP device (emulated bf16 included), as here."""
    monkeypatch.setattr(torch.version, "hip", "6.2", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "AMD Instinct")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: type("P", (), {"gcnArchName": arch}))
    hw = devices.hardware(torch.device("cuda", 0))
    assert hw.capability is None and hw.amp_dtype == amp and hw.can_compile is compiles
    assert arch.split(":")[0] in hw.name
    assert not hw.channels_last("batch")  # MIOpen's kernels are NCHW-first


def test_explicit_amp_choices_and_the_slow_bf16_warning(monkeypatch):
    cpu = devices.hardware(torch.device("cpu"))
    assert [devices.amp_dtype(a, cpu) for a in ("bf16", "fp16", "off")] == [torch.bfloat16, torch.float16, None]
    volta = fake_gpu(monkeypatch, (7, 0), "Tesla V100-SXM2-16GB")
    with pytest.warns(UserWarning, match="V100.*7.0.*bf16 convolutions only from 8.0"):
        assert devices.amp_dtype("bf16", volta) == torch.bfloat16
    assert devices.amp_dtype("off", volta) is None
    with pytest.raises(ValueError, match="auto, bf16, fp16, off"):
        devices.amp_dtype("fp8", cpu)


# --- the PyTorch build against the GPU ----------------------------------------------------------------


@pytest.mark.parametrize("capability, arch_list, fits", [
    ((6, 0), ["sm_60", "sm_70", "sm_75"], True),
    ((6, 1), ["sm_60"], True),  # machine code runs on later minors of its major version
    ((8, 6), ["sm_80", "sm_90"], True),
    ((9, 0), ["sm_80", "compute_80"], True),  # PTX compiles for any later capability
    ((9, 0), ["sm_80", "sm_86"], False),
    ((9, 0), ["sm_90a"], True), ((10, 0), ["sm_90a"], False),  # "a" kernels run on exactly their capability
    ((12, 0), ["sm_100", "compute_100"], True),
    ((7, 0), ["sm_75", "sm_80", "sm_90", "sm_100", "sm_120"], False),
])
def test_a_kernel_fits_the_gpu(gpus, monkeypatch, capability, arch_list, fits):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: arch_list)
    if fits:
        devices.check_cuda_build(torch.device("cuda", 0))
    else:
        with pytest.raises(devices.DeviceError):
            devices.check_cuda_build(torch.device("cuda", 0))


def test_a_gpu_without_kernels_in_this_build_is_named_with_what_to_install(gpus, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla P100-PCIE-16GB")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80", "sm_90"])
    with pytest.raises(devices.DeviceError) as caught:
        devices.select_device("cuda")  # before anything runs on the GPU
    message = str(caught.value)
    for part in ("Tesla P100-PCIE-16GB", "capability 6.0", "sm_75, sm_80, sm_90", "sm_60 kernels",
                 "pip install torch --index-url https://download.pytorch.org/whl/cu126", "--device cpu"):
        assert part in message
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_60", "sm_70", "sm_75", "sm_80", "sm_90"])
    assert devices.select_device("cuda") == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (12, 0))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_80", "sm_90"])
    with pytest.raises(devices.DeviceError, match="12.0.*newer PyTorch build"):
        devices.select_device("auto")


def test_a_rocm_build_is_not_judged_by_cuda_kernel_names(gpus, monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.2", raising=False)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["gfx90a", "gfx942"])
    devices.check_cuda_build(torch.device("cuda", 0))  # ROCm names its kernels gfx...: no sm_ entry can match


def test_train_names_a_gpu_without_kernels_in_one_line(gpus, isic_folder, tmp_path, monkeypatch, capsys):
    import train

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla P100-PCIE-16GB")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80", "sm_90"])
    with pytest.raises(SystemExit) as stopped:
        train.main(["--device", "cuda", "--wandb", "disabled", "--data-dir", str(isic_folder), "--out-dir",
                    str(tmp_path / "runs"), "--image-size", "32"])
    err = capsys.readouterr().err
    assert stopped.value.code == 1 and "Traceback" not in err
    assert err.startswith("error: Tesla P100-PCIE-16GB") and "cu126" in err


# --- init_distributed: the backend follows --device ---------------------------------------------------


@pytest.fixture
def torchrun(gpus, monkeypatch):
    """Rank 1 of 2 under torchrun, with init_process_group and set_device recorded instead of run."""
    calls = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("DIST_TIMEOUT_MINUTES", raising=False)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend, **kwargs: calls.update(backend=backend, **kwargs))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.update(set_device=device))
    return calls


def test_cpu_run_on_a_gpu_node_uses_gloo(torchrun):
    assert devices.init_distributed("cpu") == devices.DistInfo(1, 1, 2, True)
    assert torchrun == {"backend": "gloo", "timeout": datetime.timedelta(minutes=60)}


def test_torchrun_on_a_mac_is_refused_in_one_line(torchrun, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    with pytest.raises(devices.DeviceError, match="no distributed backend for Apple GPUs.*--device cpu"):
        devices.init_distributed("mps")
    assert torchrun == {}  # refused before any process group was started


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "auto", None])
def test_cuda_ranks_use_nccl_on_the_gpu_of_their_local_rank(torchrun, device, recwarn):
    devices.init_distributed(device)
    assert torchrun == {"backend": "nccl", "device_id": torch.device("cuda", 1), "set_device": torch.device("cuda", 1),
                        "timeout": datetime.timedelta(minutes=60)}
    # the user named GPU 0 for every rank: said once, in a line
    assert [str(w.message).count("\n") for w in recwarn] == ([0] if device == "cuda:0" else [])


def test_collective_timeout_covers_the_first_cache_build_and_can_be_set(torchrun, monkeypatch):
    # the other ranks wait at a barrier while rank 0 builds the cache; NCCL's own default is 10 minutes
    monkeypatch.setenv("DIST_TIMEOUT_MINUTES", "180")
    devices.init_distributed("cpu")
    assert torchrun["timeout"] == datetime.timedelta(hours=3)
    monkeypatch.setenv("DIST_TIMEOUT_MINUTES", "soon")
    with pytest.raises(ValueError, match="DIST_TIMEOUT_MINUTES='soon'"):
        devices.init_distributed("cpu")


def test_one_gloo_process_through_init_distributed(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    seen = {}
    real = torch.distributed.init_process_group

    def one_process(backend, **kwargs):  # the launcher's rendezvous, for a group of one
        seen.update(backend=backend, **kwargs)
        real(backend, init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1, **kwargs)

    monkeypatch.setattr(torch.distributed, "init_process_group", one_process)
    try:
        devices.init_distributed("cpu")
        assert torch.distributed.get_backend() == "gloo" and seen["timeout"] == datetime.timedelta(minutes=60)
        averager = losses.MetricAverager()  # the averager's exchange runs through the group
        averager.update({"dice": torch.tensor([0.25, 0.75])})
        assert averager.compute() == {"dice": 0.5}
    finally:
        devices.cleanup_distributed()


# --- the job's CPUs -----------------------------------------------------------------------------------


def test_usable_cpus_are_the_jobs_not_the_nodes(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "8")
    assert devices.usable_cpus() == 4  # the affinity mask is what the job may really run on
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS, Windows
    assert devices.usable_cpus() == 8
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "")
    assert devices.usable_cpus() == 64


# --- no float64 on the model, loss and metric path -----------------------------------------------------


def test_loss_metrics_and_averager_make_no_float64():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 16, 16, generator=gen, requires_grad=True)
    masks = (torch.rand(3, 1, 16, 16, generator=gen) > 0.5).float()
    averager = losses.MetricAverager()
    with no_float64():
        for kind in losses.LOSSES:
            loss = losses.SegmentationLoss(kind)(logits, masks)
            loss.backward()
            averager.update({"loss": loss.detach()})
        averager.update(losses.segmentation_metrics(logits[:, 0] > 0, masks[:, 0] > 0.5))
        averager.update({"python": [0.5, 1.0]})
        means = averager.compute()
        two_class = torch.randn(3, 2, 16, 16, generator=gen)
        losses.dice_loss(two_class, masks[:, 0].long())
    assert set(means) == {"loss", "python", *losses.METRIC_NAMES}


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_an_evaluation_pass_makes_no_float64(norm):
    split = dataset.CachedSplit([f"i{i}" for i in range(5)], np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3),
                                dtype=np.uint8), np.random.default_rng(1).integers(0, 2, (5, 32, 32), dtype=np.uint8))
    model = modules.ImprovedUNet(modules.ModelConfig(base_channels=4, norm=norm)).eval()
    criterion = losses.SegmentationLoss("dice+bce")
    averager = losses.MetricAverager()
    with no_float64(), torch.no_grad():
        for images, masks in loader.make_loader(split, 2, (0.5,) * 3, (0.2,) * 3, device="cpu", train=False, seed=0):
            logits = model(images)
            averager.update({"loss": criterion(logits, masks).reshape(1)})
            averager.update(losses.segmentation_metrics(logits[:, 0] > 0, masks[:, 0] > 0.5))
        means = averager.compute()
    assert all(np.isfinite(v) for v in means.values())


def test_training_batches_make_no_float64():
    rng = np.random.default_rng(0)
    split = dataset.CachedSplit([f"i{i}" for i in range(6)], rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8),
                                rng.integers(0, 2, (6, 16, 16), dtype=np.uint8))
    batches = loader.make_loader(split, 3, (0.5,) * 3, (0.2,) * 3, device="cpu", train=True, seed=0,
                                 augment=loader.AugmentConfig(affine_p=0.5))
    with no_float64():
        assert len(list(batches)) == 2


# --- no per-step host-to-device copies ----------------------------------------------------------------


def copies_per_epoch(n: int, keep_on_device, train: bool) -> int:
    """Host-to-device copies for one epoch of an n-sample split in batches of 2, on the meta device."""
    rng = np.random.default_rng(0)
    split = dataset.CachedSplit([f"i{i}" for i in range(n)], rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8),
                                rng.integers(0, 2, (n, 16, 16), dtype=np.uint8))
    batches = loader.make_loader(split, 2, (0.5,) * 3, (0.2,) * 3, device="meta", train=train, seed=0,
                                 keep_on_device=keep_on_device, augment=loader.AugmentConfig(affine_p=0.5))
    list(batches)  # the first epoch copies the per-device constants (luma weights) once
    batches.set_epoch(1)
    with watch_tensors() as seen:
        for x, m in batches:
            assert x.device.type == m.device.type == "meta"
    return len(seen.host_to_device)


@pytest.mark.parametrize("train", [True, False])
def test_batches_from_a_cache_on_the_device_copy_nothing_per_step(train):
    # one copy per epoch (the sample order and all random draws), however many batches it has
    assert copies_per_epoch(4, "auto", train) == copies_per_epoch(16, "auto", train) == 1


@pytest.mark.parametrize("train", [True, False])
def test_batches_from_a_host_cache_copy_only_the_batch(train):
    # the uint8 images and masks of each batch, plus the epoch's draws when training
    assert copies_per_epoch(4, False, train) == 2 * 2 + train
    assert copies_per_epoch(16, False, train) == 2 * 8 + train


def test_to_device_keeps_values_shapes_and_dtypes():
    tensors = [[torch.arange(5), torch.rand(2, 3)], [], [torch.tensor([[True, False]])]]
    with watch_tensors() as seen:
        moved = loader.to_device(tensors, torch.device("meta"))
    assert len(seen.host_to_device) == 1
    assert [[(t.device.type, t.shape, t.dtype) for t in group] for group in moved] == \
        [[("meta", t.shape, t.dtype) for t in group] for group in tensors]
    assert loader.to_device(tensors, torch.device("cpu")) is tensors


# --- a SLURM job that was given a GPU PyTorch cannot use -------------------------------------------------


@pytest.mark.parametrize("variable, value", [("SLURM_GPUS_ON_NODE", "1"), ("SLURM_JOB_GPUS", "0"),
                                             ("SLURM_STEP_GPUS", "0,1")])
def test_a_gpu_job_without_a_usable_gpu_stops_instead_of_training_on_the_cpu(monkeypatch, variable, value):
    for name in devices.SLURM_GPU_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setenv(variable, value)
    with pytest.raises(devices.DeviceError, match=rf"given a GPU \({variable}={value}\).*pass --device cpu") as err:
        devices.select_device("auto")
    assert "\n" not in str(err.value)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(devices.DeviceError, match="is a CPU-only build"):
        devices.select_device("auto")
    assert devices.select_device("cpu") == torch.device("cpu")  # the CPU, when asked for by name
    monkeypatch.setenv(variable, "0" if variable == "SLURM_GPUS_ON_NODE" else "")
    assert devices.select_device("auto") == torch.device("cpu")  # a job without GPUs falls back as before


def test_train_py_in_a_gpu_job_without_a_gpu_is_one_line_and_exit_1(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from conftest import write_isic_folder

    data = write_isic_folder(tmp_path / "data", n=4)
    env = {**os.environ, "WANDB_MODE": "disabled", "SLURM_GPUS_ON_NODE": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(Path(devices.__file__).parent / "train.py"), "--data-dir", str(data),
                           "--out-dir", str(tmp_path / "runs"), "--epochs", "1"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1, done
    assert done.stderr.strip().startswith("error: this SLURM job was given a GPU (SLURM_GPUS_ON_NODE=1)"), done.stderr
    assert done.stderr.strip().count("\n") == 0 and not (tmp_path / "runs").exists()
