"""train.py on the devices it never meets here (CUDA, MPS, torchrun), checked on the CPU: what a training
step may create on the device, a resume across memory formats, and which GPU each rank takes."""

import contextlib
import dataclasses
import math
from unittest import mock

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import checkpoint
import devices
import loader
import losses
import modules
import train
import utils
from test_train import tiny_args, weights


class Float64Ops(TorchDispatchMode):
    """Records every operation that produces a float64 tensor (MPS has no float64: each would fail there)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in outs):
            self.seen.append(str(func))
        return out


class HostToDevice(TorchFunctionMode):
    """Counts the calls that make a tensor from host data or move one to a device: on a GPU each is a
    copy that the step may have to wait for."""

    NAMES = {"tensor", "as_tensor", "scalar_tensor", "to", "cuda", "new_tensor", "from_numpy"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.NAMES and (name != "to" or _moves_device(args, kwargs or {})):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def _moves_device(args, kwargs) -> bool:
    targets = [a for a in args[1:] if isinstance(a, (str, torch.device))] + [kwargs.get("device")]
    return any(t is not None and not isinstance(t, torch.dtype) for t in targets)


def tiny_step_setup(isic_folder, steps=3):
    """A model, a loader and everything an EpochTrainer needs, at the tiny test size."""
    import dataset

    splits = dataset.prepare_splits(dataset.DataConfig(data_dir=str(isic_folder), image_size=32, val_fraction=0.25,
                                                       test_fraction=0.125), log=lambda *a, **k: None)
    batches = loader.make_loader(splits.train, 2, splits.mean, splits.std, device="cpu", train=True, seed=0,
                                 augment=loader.AUGMENT_PRESETS["full"])
    model = modules.build_model(modules.ModelConfig(base_channels=4))
    config = train.TrainConfig(epochs=1, max_steps=steps, progress=False, image_size=32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    scheduler = train.make_scheduler(optimizer, config, steps)
    return model, batches, optimizer, scheduler, config, splits


def run_epoch(model, batches, optimizer, scheduler, config, average=None):
    return train.EpochTrainer(
        model, batches, optimizer, scheduler, losses.SegmentationLoss("dice+bce"), autocast=contextlib.nullcontext,
        scaler=None, config=config, preemption=train.Preemption(), distributed=False, hw=devices.hardware("cpu"),
        average=average).train_epoch(0)


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_fp16_unscales_the_gradients_only_to_clip_them(isic_folder, monkeypatch, clip):
    """GradScaler.step unscales by itself; an unscale_ before it only pays where the gradients are clipped."""
    model, batches, optimizer, scheduler, config, _ = tiny_step_setup(isic_folder, steps=2)
    config = dataclasses.replace(config, grad_clip=clip)
    scaler = torch.amp.GradScaler("cpu")
    unscaled = []
    real_unscale = scaler.unscale_
    monkeypatch.setattr(scaler, "unscale_", lambda opt: unscaled.append(opt) or real_unscale(opt))
    train.EpochTrainer(
        model, batches, optimizer, scheduler, losses.SegmentationLoss("dice+bce"),
        autocast=lambda: torch.autocast("cpu", dtype=torch.float16), scaler=scaler, config=config,
        preemption=train.Preemption(), distributed=False, hw=devices.hardware("cpu")).train_epoch(0)
    assert len(unscaled) == (2 if clip else 0)
    assert scaler.get_scale() > 0 and all(torch.isfinite(p).all() for p in model.parameters())


class OverflowAt(losses.SegmentationLoss):
    """The training loss, infinite at the steps given (0-based calls), as an fp16 overflow makes it."""

    def __init__(self, steps):
        super().__init__("dice+bce")
        self.calls, self.steps = 0, steps

    def forward(self, logits, target):
        loss = super().forward(logits, target)
        self.calls += 1
        return loss * torch.inf if self.calls - 1 in self.steps else loss


def fp16_epoch(isic_folder, loss_fn, scaler, steps=3):
    model, batches, optimizer, scheduler, config, _ = tiny_step_setup(isic_folder, steps=steps)
    return model, train.EpochTrainer(
        model, batches, optimizer, scheduler, loss_fn, autocast=contextlib.nullcontext, scaler=scaler, config=config,
        preemption=train.Preemption(), distributed=False, hw=devices.hardware("cpu")).train_epoch(0)


def test_one_fp16_overflow_costs_one_skipped_step_not_the_run(isic_folder, capsys):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    model, result = fp16_epoch(isic_folder, OverflowAt({1}), scaler)
    assert result["step"] == 3 and result["overflow_steps"] == 1 and math.isfinite(result["loss_sum"])
    assert scaler.get_scale() == 2.0**15  # GradScaler skipped the step and halved its scale
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert "1 fp16 step(s) overflowed and were skipped" in capsys.readouterr().out


def test_an_overflow_streak_under_fp16_and_any_non_finite_loss_without_a_scaler_end_the_run(isic_folder, monkeypatch):
    monkeypatch.setattr(train.EpochTrainer, "OVERFLOW_STREAK", 2)
    with pytest.raises(train.TrainingError, match="overflowed in 2 steps in a row"):
        fp16_epoch(isic_folder, OverflowAt({1, 2}), torch.amp.GradScaler("cpu"))
    with pytest.raises(train.TrainingError, match="the training loss became"):
        fp16_epoch(isic_folder, OverflowAt({1}), None)  # fp32 or bf16: nothing would skip the step


def test_a_training_step_and_validation_make_no_float64_tensor(isic_folder):
    model, batches, optimizer, scheduler, config, splits = tiny_step_setup(isic_folder)
    average = train.WeightAverage(model, 0.9)
    with Float64Ops() as guard:
        result = run_epoch(model, batches, optimizer, scheduler, config, average)
        val = loader.make_loader(splits.val, 2, splits.mean, splits.std, device="cpu", train=False, seed=0)
        logits = model(next(iter(val))[0])
        per_image = losses.segmentation_metrics(logits[:, 0] > 0, next(iter(val))[1][:, 0] > 0.5)
    assert result["step"] == 3 and per_image["dice"].dtype == torch.float32
    assert guard.seen == [], f"float64 made during training or validation: {sorted(set(guard.seen))}"


def test_a_training_step_moves_nothing_to_the_device_but_its_batch(isic_folder):
    model, batches, optimizer, scheduler, config, _ = tiny_step_setup(isic_folder, steps=4)
    run_epoch(model, batches, optimizer, scheduler, config)  # warm-up: one-time constants are made here
    counter = HostToDevice()
    with counter:
        run_epoch(model, batches, optimizer, scheduler, config)
    # the epoch's loss accumulator and the batches' own copies (image, mask) are allowed; nothing per step
    per_step = max(len(counter.calls) - 1, 0) / 4
    assert per_step <= 2, f"{per_step} host-to-device tensors a step: {counter.calls}"


def test_resume_across_memory_formats_with_fused_adam_matches_the_uninterrupted_run(isic_folder, tmp_path):
    """Saved NCHW, resumed channels-last (a CPU run continued on a GPU): fused Adam treats each parameter and its
    moments as flat memory, so moments kept in the old layout would update the wrong weights (0.04 apart)."""
    paper = ("--schedule", "paper", "--warmup-epochs", "0", "--norm", "batch", "--amp", "off")  # fp32: the layouts agree
    train.main(tiny_args(isic_folder, tmp_path, "--epochs", "2", "--name", "whole", "--no-channels-last", *paper))
    train.main(tiny_args(isic_folder, tmp_path, "--epochs", "1", "--name", "moved", "--no-channels-last", *paper))
    train.main(tiny_args(isic_folder, tmp_path, "--epochs", "2", "--name", "moved", "--channels-last", "--resume",
                         "auto", *paper))
    whole, moved = weights(tmp_path / "whole" / "last.pt"), weights(tmp_path / "moved" / "last.pt")
    worst = max((whole[k].float() - moved[k].float()).abs().max().item() for k in whole)
    assert worst < 1e-4, f"weights {worst:.2g} apart after a resume in another memory format"


def test_optimizer_state_takes_its_parameters_layout():
    conv = torch.nn.Conv2d(3, 8, 3)
    optimizer = torch.optim.Adam(conv.parameters(), fused=True)
    conv(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    saved = optimizer.state_dict()
    conv = conv.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(conv.parameters(), fused=True)
    optimizer.load_state_dict(saved)
    checkpoint.match_parameter_layout(optimizer)
    state = optimizer.state[conv.weight]
    assert state["exp_avg"].stride() == conv.weight.stride() == state["exp_avg_sq"].stride()
    assert torch.equal(state["exp_avg"], saved["state"][0]["exp_avg"])  # same values, new layout


@pytest.mark.parametrize("asked, local_rank, expected", [("cuda", 1, "cuda:1"), ("cuda:0", 1, "cuda:1"),
                                                         ("auto", 2, "cuda:2"), ("cpu", 1, "cpu")])
def test_each_torchrun_rank_trains_on_its_own_gpu(asked, local_rank, expected, monkeypatch, capsys):
    chosen = torch.device("cpu") if asked == "cpu" else torch.device("cuda", 0)
    monkeypatch.setattr(devices, "select_device", lambda name: chosen)
    monkeypatch.setattr(devices, "hardware", lambda device: devices.Hardware(torch.device(device), "GPU", (9, 0),
                                                                           torch.bfloat16, True))
    monkeypatch.setattr(devices, "configure_backends", lambda *a, **k: None)
    monkeypatch.setattr(utils, "seed_everything", lambda *a, **k: None)
    config = train.TrainConfig(device=asked)
    hw = train.setup_device(config, devices.DistInfo(local_rank, local_rank, 4, True))
    assert hw.device == torch.device(expected)
    assert ("own GPU" in capsys.readouterr().out) == (asked == "cuda:0")


def test_train_asks_for_the_process_group_of_its_device(isic_folder, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(devices, "init_distributed", lambda device=None: seen.append(device) or devices.DistInfo(0, 0, 1, False))
    train.main(tiny_args(isic_folder, tmp_path, "--epochs", "1", "--name", "cpu"))
    assert seen == ["cpu"]


@pytest.mark.parametrize("capability, dtype, scaled", [((9, 0), torch.bfloat16, False), ((8, 0), torch.bfloat16, False),
                                                       ((7, 0), torch.float16, True), ((6, 0), torch.float16, True)])
def test_amp_auto_follows_the_gpu_capability(capability, dtype, scaled, monkeypatch):
    hardware = devices.Hardware(torch.device("cuda", 0), "GPU", capability,
                              torch.bfloat16 if capability >= (8, 0) else torch.float16, capability >= (7, 0))
    seen = {}
    monkeypatch.setattr(torch, "autocast", lambda device_type, dtype: seen.update(dtype=dtype) or contextlib.nullcontext())
    with mock.patch.object(torch.amp, "GradScaler", lambda device: "scaler"):
        dtype_chosen = devices.amp_dtype("auto", hardware)
        autocast, scaler = hardware.autocast(dtype_chosen), hardware.grad_scaler(dtype_chosen)
    autocast()
    assert seen["dtype"] == dtype and (scaler == "scaler") == scaled


def test_compile_is_skipped_with_a_reason_below_capability_7(monkeypatch, capsys):
    hardware = devices.Hardware(torch.device("cpu"), "Tesla P100-PCIE-16GB", (6, 0), torch.float16, False)
    monkeypatch.setattr(torch, "compile", lambda model: pytest.fail("compiled on a GPU Triton cannot drive"))
    config = train.TrainConfig(compile=True, base_channels=4)
    train.setup_model(config, None, devices.DistInfo(0, 0, 1, False), hardware, None)
    out = capsys.readouterr().out
    assert "--compile ignored on Tesla P100-PCIE-16GB" in out and "6.0" in out


def test_compile_in_bf16_is_skipped_with_a_reason_below_capability_8(monkeypatch, capsys):
    """ptxas refuses Triton's bf16 kernels below sm_80: a V100 compiles in fp16 (--amp auto), not with --amp bf16."""
    volta = devices.Hardware(torch.device("cpu"), "Tesla V100-SXM2-16GB", (7, 0), torch.float16, True)
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(model) or model)
    config = train.TrainConfig(compile=True, base_channels=4)
    train.setup_model(config, None, devices.DistInfo(0, 0, 1, False), volta, torch.bfloat16)
    out = capsys.readouterr().out
    assert "--compile ignored on Tesla V100-SXM2-16GB: Triton's bf16 kernels need CUDA capability 8.0" in out
    assert not compiled
    train.setup_model(config, None, devices.DistInfo(0, 0, 1, False), volta, torch.float16)
    assert len(compiled) == 1 and volta.compile_refusal(torch.float16) is None


def test_a_single_gpu_run_stops_at_the_step_the_signal_came(isic_folder, monkeypatch):
    """Off the CPU the loss is checked every Hardware.check_every steps (a read-back); the signal flag, a Python
    variable, is still read after every step, so "saving last.pt after this step" holds."""
    monkeypatch.setattr(devices.Hardware, "check_every", 25)  # the GPU's interval, on this CPU
    model, batches, optimizer, scheduler, config, _ = tiny_step_setup(isic_folder, steps=4)
    polls = []

    class SignalAtStep2(train.Preemption):
        def poll(self, distributed, device, overrun=False, loss_sum=None):
            polls.append(loss_sum is not None)
            if len(polls) == 2:
                self.signum = 10
            return super().poll(distributed, device, overrun, loss_sum)
    result = train.EpochTrainer(
        model, batches, optimizer, scheduler, losses.SegmentationLoss("dice"), autocast=contextlib.nullcontext,
        scaler=None, config=config, preemption=SignalAtStep2(), distributed=False,
        hw=devices.hardware("cpu")).train_epoch(0)
    assert result["stopped"] and result["step"] == 2
    assert polls == [False, False], "the loss is read back only at the check interval"


def test_a_plan_saved_before_its_steps_were_timed_resumes():
    import budget

    pace = budget.Pace(1.0, 10, 1000, plan={"total_steps": 8, "planned_steps": None, "overrun": True})
    assert not pace.measuring and pace.total_steps == 8
