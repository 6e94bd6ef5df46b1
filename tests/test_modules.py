"""Tests for modules.py: shapes, the parameter count by hand, gradients, determinism, clear errors, and the
fast formulation against a plain functional re-statement of the paper's network."""

import copy
import json
from dataclasses import asdict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import modules
import train
from modules import ImprovedUNet, InstanceNorm, ModelConfig, count_parameters, main, upsample_conv3x3

TINY = dict(base_channels=4)


def tiny(**overrides) -> ImprovedUNet:
    torch.manual_seed(0)
    return ImprovedUNet(ModelConfig(**{**TINY, **overrides}))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    """Max abs difference within rel * max |expected| (float32 kernels sum in different orders)."""
    scale = expected.abs().max().item() + 1e-12
    err = (actual - expected).abs().max().item()
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel} * {scale:.3g}"


# ---------------------------------------------------------------------------------------------------
# A plain functional statement of the network, written from the paper, sharing only the parameters.


def reference_forward(model: ImprovedUNet, x: torch.Tensor) -> torch.Tensor:
    slope = model.config.negative_slope

    def act(t):
        return F.leaky_relu(t, slope)

    def norm(m, t):
        if isinstance(m, nn.BatchNorm2d):
            return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, model.training, m.momentum, m.eps)
        return F.instance_norm(t, weight=m.weight, bias=m.bias, eps=m.eps)  # the paper's instance norm

    def conv(m, t):
        return F.conv2d(t, m.weight, m.bias, m.stride, m.padding)

    def level(lv, t):
        r = conv(lv.conv, t)
        h = conv(lv.context.conv1, act(norm(lv.context.norm1, r)))
        h = F.dropout2d(h, lv.context.dropout.p, model.training)
        h = conv(lv.context.conv2, act(norm(lv.context.norm2, h)))
        return act(norm(lv.norm, h + r))

    def upsampling(u, t):
        return act(norm(u.norm, conv(u.conv, F.interpolate(t, scale_factor=2, mode="nearest"))))

    def conv_norm_act(m, t):
        return act(norm(m.norm, conv(m.conv, t)))

    def localization(lm, t):
        return conv_norm_act(lm.conv1x1, conv_norm_act(lm.conv3x3, t))

    def up2(t):
        return F.interpolate(t, scale_factor=2, mode="nearest")

    c1 = level(model.level1, x)
    c2 = level(model.level2, c1)
    c3 = level(model.level3, c2)
    c4 = level(model.level4, c3)
    c5 = level(model.level5, c4)
    l4 = localization(model.loc4, torch.cat([upsampling(model.up4, c5), c4], 1))
    l3 = localization(model.loc3, torch.cat([upsampling(model.up3, l4), c3], 1))
    l2 = localization(model.loc2, torch.cat([upsampling(model.up2, l3), c2], 1))
    l1 = conv_norm_act(model.top, torch.cat([upsampling(model.up1, l2), c1], 1))
    head = model.head
    return up2(up2(conv(head.seg_quarter, l3)) + conv(head.seg_half, l2)) + conv(head.seg_full, l1)


def forward_backward(model, x, grad_out):
    x = x.clone().requires_grad_()
    out = model(x)
    out.backward(grad_out)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out.detach(), x.grad, grads


# ---------------------------------------------------------------------------------------------------


def test_parameter_count_of_default_config_matches_hand_count():
    # conv weights are in*out*k*k (no bias: a norm follows), each norm has 2 parameters per channel,
    # the three 1x1 segmentation layers have in*1 weights + 1 bias
    expected = (
        # context pathway: level conv, two context-module convs, norm1 + norm2 + the level's output norm
        3 * 16 * 9 + 2 * 16 * 16 * 9 + 3 * 2 * 16
        + 16 * 32 * 9 + 2 * 32 * 32 * 9 + 3 * 2 * 32
        + 32 * 64 * 9 + 2 * 64 * 64 * 9 + 3 * 2 * 64
        + 64 * 128 * 9 + 2 * 128 * 128 * 9 + 3 * 2 * 128
        + 128 * 256 * 9 + 2 * 256 * 256 * 9 + 3 * 2 * 256
        # upsampling modules: 3x3 conv halving the features + norm
        + 256 * 128 * 9 + 2 * 128
        + 128 * 64 * 9 + 2 * 64
        + 64 * 32 * 9 + 2 * 32
        + 32 * 16 * 9 + 2 * 16
        # localisation modules on the concatenation (2C): 3x3 conv 2C->2C + norm, 1x1 conv 2C->C + norm
        + 256 * 256 * 9 + 2 * 256 + 256 * 128 + 2 * 128
        + 128 * 128 * 9 + 2 * 128 + 128 * 64 + 2 * 64
        + 64 * 64 * 9 + 2 * 64 + 64 * 32 + 2 * 32
        # top level: 3x3 conv on the concatenation (16 + 16) + norm
        + 32 * 32 * 9 + 2 * 32
        # segmentation layers at 1/4 (64 channels), 1/2 (32) and full resolution (32)
        + (64 + 1) + (32 + 1) + (32 + 1)
    )
    assert expected == 3_186_483
    assert count_parameters(ImprovedUNet()) == expected
    assert count_parameters(ImprovedUNet(ModelConfig(norm="instance"))) == expected  # same affine parameters


@pytest.mark.parametrize("norm", ["batch", "instance"])
@pytest.mark.parametrize("batch,height,width", [(1, 64, 64), (2, 64, 96), (3, 128, 80), (1, 512, 512), (2, 48, 512)])
def test_output_shape(norm, batch, height, width):
    model = tiny(norm=norm, num_classes=2)
    out = model(torch.randn(batch, 3, height, width))
    assert out.shape == (batch, 2, height, width)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_default_config_output_shape_and_logits_in_both_modes():
    model = ImprovedUNet()
    x = torch.randn(2, 3, 64, 64)
    train_out = model(x)
    model.eval()
    with torch.no_grad():
        eval_out = model(x)
    assert train_out.shape == eval_out.shape == (2, 1, 64, 64)
    # logits, not probabilities: no sigmoid inside the network
    assert (train_out < 0).any() and (train_out > 0).any()
    assert (eval_out < 0).any() and (eval_out > 0).any()


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_every_parameter_gets_a_finite_gradient(norm):
    model = tiny(norm=norm)
    model(torch.randn(2, 3, 64, 64)).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"
    assert {"head.seg_quarter.weight", "head.seg_half.weight", "head.seg_full.weight"} <= dict(model.named_parameters()).keys()


@pytest.mark.parametrize("channels_last", [True, False])
def test_gradients_have_their_parameters_strides(channels_last):
    # DDP copies gradients into buckets laid out like the parameters, and warns and slows down otherwise
    model = tiny()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model(torch.randn(1, 3, 32, 32)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad.stride() == p.stride(), name


def test_eval_is_deterministic_and_train_uses_dropout():
    model = tiny(dropout=0.3)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))  # channel dropout is active in training


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_both_norms_train(norm):
    model = tiny(norm=norm, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(4, 3, 32, 32)
    y = (x[:, :1] > 0).float()  # a mask the network can learn from the input
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_wrong_size_names_the_padded_size():
    model = tiny()
    with pytest.raises(ValueError, match="250x270.*pad to 256x272"):
        model(torch.randn(1, 3, 250, 270))
    with pytest.raises(ValueError, match="pad to 272x272"):
        model(torch.randn(1, 3, 260, 272))


def test_wrong_channel_count_and_rank_are_clear_errors():
    model = tiny()
    with pytest.raises(ValueError, match="3 input channels but got 4"):
        model(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.randn(3, 64, 64))


@pytest.mark.parametrize(
    "field,value", [("norm", "layer"), ("dropout", 1.0), ("negative_slope", -0.1), ("base_channels", 0)]
)
def test_bad_config_is_rejected(field, value):
    flag = "--" + field.replace("_", "-")
    assert any(problem.startswith(flag) for problem in modules.check_config(ModelConfig(**{field: value})))
    with pytest.raises(ValueError, match=flag):
        modules.build_model(ModelConfig(**{field: value}))
    with pytest.raises(ValueError, match=flag):
        ImprovedUNet(ModelConfig(**{field: value}))


def test_config_rebuilds_the_model_from_a_checkpoint_dict():
    model = tiny(norm="instance", num_classes=3)
    saved = json.loads(json.dumps(asdict(model.config)))  # what the checkpoint stores
    rebuilt = ImprovedUNet(ModelConfig(**saved))
    rebuilt.load_state_dict(model.state_dict())
    model.eval(), rebuilt.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))


def test_memory_format_does_not_change_the_function():
    nchw = tiny(dropout=0.0)
    nhwc = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64)
    out = nhwc(x)
    assert out.is_contiguous(memory_format=torch.channels_last)  # activations follow the weights' format
    assert_close(out, nchw(x))


@pytest.mark.parametrize("channels_last", [False, True])
def test_instance_norm_equals_torch_instance_norm(channels_last):
    torch.manual_seed(0)
    ours, theirs = InstanceNorm(8), nn.InstanceNorm2d(8, affine=True)
    with torch.no_grad():
        ours.weight.normal_(), ours.bias.normal_()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 8, 16, 24) * 5 + 2
    g = torch.randn(3, 8, 16, 24)
    xo = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    xo.requires_grad_(), x.requires_grad_()
    out_ours, out_theirs = ours(xo), theirs(x)
    assert_close(out_ours, out_theirs, rel=1e-5)
    grads_ours = torch.autograd.grad(out_ours, (xo, ours.weight, ours.bias), g)
    grads_theirs = torch.autograd.grad(out_theirs, (x, theirs.weight, theirs.bias), g)
    for a, e in zip(grads_ours, grads_theirs):
        assert_close(a, e, rel=1e-4)
    assert out_ours.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("c_in,c_out,h,w", [(8, 4, 5, 7), (3, 6, 8, 8), (16, 8, 1, 2)])
def test_fused_upsample_conv_equals_upsample_then_conv(c_in, c_out, h, w, channels_last):
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, c_in, h, w).contiguous(memory_format=fmt).requires_grad_()
    weight = torch.randn(c_out, c_in, 3, 3).requires_grad_()
    g = torch.randn(2, c_out, 2 * h, 2 * w)
    plain = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, padding=1)
    gx_plain, gw_plain = torch.autograd.grad(plain, (x, weight), g)
    fused = upsample_conv3x3(x, weight)
    gx_fused, gw_fused = torch.autograd.grad(fused, (x, weight), g)
    assert fused.shape == plain.shape == (2, c_out, 2 * h, 2 * w)
    assert_close(fused, plain, rel=1e-5)
    assert_close(gx_fused, gx_plain, rel=1e-5)
    assert_close(gw_fused, gw_plain, rel=1e-5)


@pytest.mark.parametrize("norm", ["batch", "instance"])
@pytest.mark.parametrize("training", [True, False])
def test_fast_formulation_equals_plain_reference(norm, training):
    # float64, so that the comparison is exact up to rounding (in float32 the input gradient through
    # instance norm over 4x4 maps differs by a few percent between any two summation orders)
    torch.manual_seed(0)
    fast = ImprovedUNet(ModelConfig(norm=norm, dropout=0.0, base_channels=4)).double()
    with torch.no_grad():  # non-trivial norm parameters and running statistics
        for m in fast.modules():
            if isinstance(m, (nn.BatchNorm2d, InstanceNorm)):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
    plain = copy.deepcopy(fast).use_reference_formulation()
    functional = copy.deepcopy(fast)
    for m in (fast, plain, functional):
        m.train(training)
    x = torch.randn(2, 3, 32, 48, dtype=torch.float64)
    g = torch.randn(2, 1, 32, 48, dtype=torch.float64)
    out_fast, gx_fast, grads_fast = forward_backward(fast, x, g)
    out_plain, gx_plain, grads_plain = forward_backward(plain, x, g)
    xr = x.clone().requires_grad_()
    out_ref = reference_forward(functional, xr)
    out_ref.backward(g)
    for out, gx, grads in ((out_fast, gx_fast, grads_fast), (out_plain, gx_plain, grads_plain)):
        assert_close(out, out_ref, rel=1e-10)
        assert_close(gx, xr.grad, rel=1e-10)
        for name, p in functional.named_parameters():
            assert_close(grads[name], p.grad, rel=1e-10)
    for (name, b_fast), b_ref in zip(fast.named_buffers(), functional.buffers()):
        if b_fast.is_floating_point():  # running statistics move alike (F.batch_norm counts no batches)
            assert torch.allclose(b_fast, b_ref, rtol=1e-10, atol=0), name


def test_sync_batchnorm_conversion_keeps_the_state_dict():
    model = tiny(norm="batch")
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert any(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())
    assert converted.state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_bfloat16_autocast_trains_on_cpu(norm):
    model = ImprovedUNet(ModelConfig(norm=norm))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(1, 3, 64, 64))
    out.float().mean().backward()
    assert out.shape == (1, 1, 64, 64) and torch.isfinite(out.float()).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.gpu
def test_cuda_bf16_channels_last_and_compile():
    model = ImprovedUNet().cuda()
    compiled = torch.compile(model)
    x = torch.randn(2, 3, 64, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = compiled(x)
        out.float().mean().backward()
    assert out.shape == (2, 1, 64, 64) and torch.isfinite(out.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_main_prints_summary_and_parameter_count(capsys):
    main(["--size", "64"])
    printed = capsys.readouterr().out
    assert "total parameters: 3,186,483" in printed
    for name in ("ContextLevel", "UpsamplingModule", "LocalizationModule", "SegmentationHead"):
        assert name in printed


def test_default_model_config_is_the_papers_network_and_the_paper_recipe_adds_its_dropout():
    config = ModelConfig()
    assert (config.arch, config.base_channels, config.norm, config.negative_slope) == \
        ("improved-unet", 16, "instance", 0.01)
    assert isinstance(modules.build_model(config), ImprovedUNet)
    # dropout 0 is the default training recipe's (chosen on validation images); --recipe paper trains with 0.3
    assert config.dropout == 0.0 and train.RECIPES["paper"]["dropout"] == 0.3


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_dynunet_baseline_returns_logits_in_training_and_evaluation(norm):
    pytest.importorskip("monai")
    torch.manual_seed(0)
    model = modules.build_model(ModelConfig(arch="dynunet", base_channels=4, norm=norm, dropout=0.0))
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 1, 32, 32)  # one head: no stacked deep-supervision outputs in training
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.eval()(x).shape == (2, 1, 32, 32)


def test_scale_outputs_are_the_deep_supervision_sums_in_training_only():
    model = modules.ImprovedUNet(modules.ModelConfig(base_channels=4, dropout=0.0)).train()
    x = torch.randn(2, 3, 32, 32)
    plain = model(x)
    taps = {}
    model.head.register_forward_hook(lambda m, args, out: taps.update(args=args))
    model.scale_outputs = True
    full, half, quarter = model(x)
    assert (full.shape, half.shape, quarter.shape) == ((2, 1, 32, 32), (2, 1, 16, 16), (2, 1, 8, 8))
    torch.testing.assert_close(full, plain)  # the network's output is unchanged
    l3, l2, l1 = taps["args"]
    head = model.head
    torch.testing.assert_close(quarter, head.seg_quarter(l3))
    torch.testing.assert_close(half, quarter.repeat_interleave(2, -1).repeat_interleave(2, -2) + head.seg_half(l2))
    torch.testing.assert_close(full, half.repeat_interleave(2, -1).repeat_interleave(2, -2) + head.seg_full(l1))
    assert model.eval()(x).shape == (2, 1, 32, 32)  # evaluation and prediction take the full map alone


def test_unknown_arch_is_refused():
    with pytest.raises(ValueError, match="--arch must be one of improved-unet, dynunet"):
        modules.build_model(ModelConfig(arch="resnet"))

