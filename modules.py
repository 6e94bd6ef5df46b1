"""The Improved UNet of Isensee et al. 2017 (arXiv:1802.10508), in 2D, for ISIC 2018 lesion segmentation.

Run `python modules.py` to print the layer summary and the parameter count of a configuration.
The network follows Figure 1 and Section 2.2 of the paper ("Brain Tumor Segmentation and Radiomics
Survival Prediction: Contribution to the BRATS 2017 Challenge") and the authors' Lasagne code:

    context pathway  level 1: 3x3 conv; levels 2-5: 3x3 conv, stride 2, doubling the features
                     (16, 32, 64, 128, 256); each followed by a context module (pre-activation
                     residual block: norm, LeakyReLU, 3x3 conv, dropout 0.3, norm, LeakyReLU, 3x3 conv)
                     added element-wise to its input
    localisation     upsampling module (nearest x2, 3x3 conv halving the features, norm, LeakyReLU),
                     concatenation with the skip of the same level, localisation module (3x3 conv,
                     1x1 conv halving the features); the top level ends in a 3x3 conv
    segmentation     1x1 segmentation layers on the localisation outputs at 1/4 and 1/2 resolution
                     and on the top level, upscaled (nearest) and summed (deep supervision); the
                     network returns logits in training and evaluation alike (with `scale_outputs`,
                     training also returns the sums at 1/2 and 1/4 resolution, for nnU-Net-style
                     losses on them: train.py --deep-supervision-loss)

Deviations from the paper, and why:
- 2D instead of 3D: ISIC images are 2D dermoscopy photographs.
- Normalisation: `norm="instance"` (the default) is the paper's affine instance normalisation, built
  as an `nn.GroupNorm` with one channel per group: the same function with the same parameters as
  `nn.InstanceNorm2d(affine=True)` (tested); `norm="batch"` is offered for comparison (on real ISIC
  images it learns more slowly: docs/recipes.md).
- Dropout is channel-wise (`Dropout2d`); the authors' code drops single activations. Dropping whole
  feature maps is the usual choice for convolutional features, whose neighbours are correlated.
- Convolutions followed by a normalisation have no bias: the normalisation subtracts any constant
  per channel, so such a bias would never change the output. The segmentation layers keep theirs.
- The paper normalises everywhere; the authors' code skips normalisation inside the first context
  module and feeds its skip connection without it, and adds an extra 1x1 conv after the first
  upsampling. We follow the paper's text and figure, and take the deep-supervision outputs from the
  localisation modules' outputs as drawn in Figure 1 (the code taps the 3x3 conv before the 1x1).
- One efficient but equivalent formulation: nearest x2 upsampling followed by a 3x3 conv is computed
  as one stride-2 transposed 4x4 conv whose weight is derived from the same 3x3 weight, so no
  upsampled tensor is materialised and the conv does 16 instead of 36 multiply-adds per
  low-resolution pixel and channel pair. It is compared with the literal form in
  tests/test_modules.py, and `model.use_reference_formulation()` switches back to that form; what it
  buys is in docs/architecture.md (from the CPU tables of docs/benchmarks.md).
  LeakyReLU, dropout and the residual sum run in place where autograd does not need their input.
- The memory format is the caller's choice (`model.to(memory_format=torch.channels_last)`); the
  activations follow the weights'. devices.Hardware.channels_last decides it per device, norm,
  precision and input size (docs/training.md#devices-what-is-chosen-where).
"""

from __future__ import annotations

import argparse
import typing
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

# --norm's choices (--arch's are the names of MODELS, at the end of this file)
Norm = typing.Literal["instance", "batch"]
NORMS = typing.get_args(Norm)
SIZE_MULTIPLE = 16  # four stride-2 convolutions halve the input four times


@dataclass
class ModelConfig:
    """The network's settings, stored in every checkpoint. train.TrainConfig takes the fields as they are,
    so each setting is also a flag of train.py."""

    # --- model ---
    arch: Arch = "improved-unet"  # "improved-unet" (this network) or "dynunet" (MONAI's DynUNet baseline; needs monai)
    in_channels: int = field(default=3, metadata={"setting": False})  # input image channels (RGB)
    num_classes: int = field(default=1, metadata={"setting": False})  # logit channels: 1 for a binary lesion mask (sigmoid), N for N classes (softmax)
    base_channels: int = 16  # feature maps at the first level (the paper: 16, doubling per level)
    norm: Norm = "instance"  # "instance" (the paper's affine instance norm) or "batch"
    dropout: float = 0.0  # channel dropout inside every context module (the paper: 0.3; --recipe paper sets it)
    negative_slope: float = 0.01  # LeakyReLU slope for negative inputs (the paper: 1e-2)


def check_config(config: ModelConfig) -> list[str]:
    """The model settings that cannot work, as messages naming the flags (empty when usable)."""
    problems = []
    if config.arch not in MODELS:
        problems.append(f"--arch must be one of {', '.join(MODELS)}, got {config.arch!r}")
    if config.norm not in NORMS:
        problems.append(f"--norm must be one of {', '.join(NORMS)}, got {config.norm!r}")
    for name in ("in_channels", "num_classes", "base_channels"):
        if int(getattr(config, name)) < 1:
            where = "--base-channels" if name == "base_channels" else f"ModelConfig.{name}"  # the others are no flags
            problems.append(f"{where} must be at least 1, got {getattr(config, name)}")
    if not 0.0 <= config.dropout < 1.0:
        problems.append(f"--dropout must be in [0, 1), got {config.dropout}")
    if config.negative_slope < 0:
        # in-place LeakyReLU recovers the sign of its input from its output, so the slope must be >= 0
        problems.append(f"--negative-slope must be >= 0, got {config.negative_slope}")
    return problems


def checked(config: ModelConfig) -> ModelConfig:
    """The config itself, or ValueError naming every setting that cannot work."""
    problems = check_config(config)
    if problems:
        raise ValueError("; ".join(problems))
    return config


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (trainable or not; buffers such as running statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def make_norm(kind: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "batch" else InstanceNorm(channels)


class InstanceNorm(nn.GroupNorm):
    """Affine instance norm: group norm with one channel per group (the same function as
    nn.InstanceNorm2d(affine=True), with the same parameters, and a faster CPU kernel)."""

    def __init__(self, channels: int):
        super().__init__(channels, channels)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias (a normalisation always follows)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class ConvNormAct(nn.Module):
    """conv (3x3 or 1x1, no bias) -> norm -> LeakyReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, config: ModelConfig):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.norm = make_norm(config.norm, out_channels)
        self.negative_slope = config.negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in place: the norm's backward needs its input, not its output
        return F.leaky_relu_(self.norm(self.conv(x)), self.negative_slope)


class ContextModule(nn.Module):
    """Pre-activation residual block: x + conv(act(norm(drop(conv(act(norm(x))))))), shape unchanged."""

    def __init__(self, channels: int, config: ModelConfig):
        super().__init__()
        self.norm1 = make_norm(config.norm, channels)
        self.conv1 = conv3x3(channels, channels)
        self.dropout = nn.Dropout2d(config.dropout)
        self.norm2 = make_norm(config.norm, channels)
        self.conv2 = conv3x3(channels, channels)
        self.negative_slope = config.negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu_(self.norm1(x), self.negative_slope)  # (B, C, H, W)
        h = self.conv1(h)  # (B, C, H, W)
        h = F.dropout2d(h, self.dropout.p, self.training, inplace=True)  # whole channels zeroed, rest / (1 - p)
        h = F.leaky_relu_(self.norm2(h), self.negative_slope)  # (B, C, H, W)
        h = self.conv2(h)  # (B, C, H, W)
        return h.add_(x)  # element-wise sum; in place: conv2's backward does not need its output


class ContextLevel(nn.Module):
    """One level of the context pathway: 3x3 conv (stride 1 or 2), context module, sum, then the
    norm + LeakyReLU that pre-activates both the skip connection and the next level's conv."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, config: ModelConfig):
        super().__init__()
        self.conv = conv3x3(in_channels, out_channels, stride=stride)
        self.context = ContextModule(out_channels, config)
        self.norm = make_norm(config.norm, out_channels)
        self.negative_slope = config.negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)  # (B, C_out, H/stride, W/stride)
        x = self.context(x)  # (B, C_out, H/stride, W/stride), context module + element-wise sum
        return F.leaky_relu_(self.norm(x), self.negative_slope)  # (B, C_out, H/stride, W/stride)


def upsample_conv3x3(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """conv3x3(nearest_upsample_x2(x), weight, padding=1) as one stride-2 transposed 4x4 conv.

    x: (B, C_in, H, W), weight: (C_out, C_in, 3, 3) -> (B, C_out, 2H, 2W). After nearest upsampling,
    output row 2m sees input rows (m-1, m, m) through taps (w0, w1, w2) and row 2m+1 sees (m, m, m+1);
    so along each axis the transposed kernel (index k: output 2i - 1 + k reads input i) is
    (w2, w1 + w2, w0 + w1, w0). Borders match because both read zeros outside the image.
    """

    def expand(w: torch.Tensor, dim: int) -> torch.Tensor:
        w0, w1, w2 = w.unbind(dim)
        return torch.stack([w2, w1 + w2, w0 + w1, w0], dim)

    kernel = expand(expand(weight, 2), 3)  # (C_out, C_in, 4, 4)
    return F.conv_transpose2d(x, kernel.transpose(0, 1), stride=2, padding=1)  # (B, C_out, 2H, 2W)


class UpsamplingModule(nn.Module):
    """Nearest x2 upsampling, 3x3 conv that halves the features, norm, LeakyReLU."""

    def __init__(self, in_channels: int, out_channels: int, config: ModelConfig):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm = make_norm(config.norm, out_channels)
        self.negative_slope = config.negative_slope
        self.transposed = True  # the single-conv formulation below; False: the paper's literal one

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transposed:
            x = upsample_conv3x3(x, self.conv.weight)  # (B, C_out, 2H, 2W)
        else:
            x = self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))  # (B, C_out, 2H, 2W)
        return F.leaky_relu_(self.norm(x), self.negative_slope)


class LocalizationModule(nn.Module):
    """3x3 conv, then 1x1 conv that halves the features (each followed by norm + LeakyReLU)."""

    def __init__(self, in_channels: int, out_channels: int, config: ModelConfig):
        super().__init__()
        self.conv3x3 = ConvNormAct(in_channels, in_channels, 3, config)
        self.conv1x1 = ConvNormAct(in_channels, out_channels, 1, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1x1(self.conv3x3(x))  # (B, C_in, H, W) -> (B, C_out, H, W)


class SegmentationHead(nn.Module):
    """Deep supervision: 1x1 segmentation layers at 1/4, 1/2 and full resolution; the coarser maps are
    upscaled (nearest x2) and added to the next finer one. Returns logits (B, num_classes, H, W)."""

    def __init__(self, channels: tuple[int, int, int], num_classes: int):
        super().__init__()
        self.seg_quarter = nn.Conv2d(channels[0], num_classes, 1)
        self.seg_half = nn.Conv2d(channels[1], num_classes, 1)
        self.seg_full = nn.Conv2d(channels[2], num_classes, 1)

    def forward(self, quarter: torch.Tensor, half: torch.Tensor, full: torch.Tensor,
                scales: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The full-resolution logits; with scales=True also the sums at 1/2 and 1/4 resolution, finest first."""
        s4 = self.seg_quarter(quarter)  # (B, K, H/4, W/4)
        s2 = F.interpolate(s4, scale_factor=2, mode="nearest").add_(self.seg_half(half))  # (B, K, H/2, W/2)
        s1 = F.interpolate(s2, scale_factor=2, mode="nearest").add_(self.seg_full(full))  # (B, K, H, W)
        return (s1, s2, s4) if scales else s1


class ImprovedUNet(nn.Module):
    """Improved UNet: float input (B, in_channels, H, W), H and W multiples of 16, normalised images
    -> logits (B, num_classes, H, W) (apply sigmoid/softmax in the loss or at prediction)."""

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = config = checked(config if config is not None else ModelConfig())
        # In training, also return the segmentation at 1/2 and 1/4 resolution for losses there (nnU-Net's deep
        # supervision); set by train.py --deep-supervision-loss. Not part of the weights or of ModelConfig.
        self.scale_outputs = False
        c = config.base_channels
        self.level1 = ContextLevel(config.in_channels, c, 1, config)
        self.level2 = ContextLevel(c, 2 * c, 2, config)
        self.level3 = ContextLevel(2 * c, 4 * c, 2, config)
        self.level4 = ContextLevel(4 * c, 8 * c, 2, config)
        self.level5 = ContextLevel(8 * c, 16 * c, 2, config)
        self.up4 = UpsamplingModule(16 * c, 8 * c, config)
        self.loc4 = LocalizationModule(16 * c, 8 * c, config)
        self.up3 = UpsamplingModule(8 * c, 4 * c, config)
        self.loc3 = LocalizationModule(8 * c, 4 * c, config)
        self.up2 = UpsamplingModule(4 * c, 2 * c, config)
        self.loc2 = LocalizationModule(4 * c, 2 * c, config)
        self.up1 = UpsamplingModule(2 * c, c, config)
        self.top = ConvNormAct(2 * c, 2 * c, 3, config)
        self.head = SegmentationHead((4 * c, 2 * c, 2 * c), config.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # He normal initialisation for the LeakyReLU, as in the authors' code; zero biases
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=self.config.negative_slope, nonlinearity="leaky_relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def use_reference_formulation(self, enabled: bool = True) -> ImprovedUNet:
        """Switch the upsampling modules to the paper's literal form (upsample, then 3x3 conv); same function."""
        for m in self.modules():
            if isinstance(m, UpsamplingModule):
                m.transposed = not enabled
        return self

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"ImprovedUNet expects a (B, C, H, W) batch, got a tensor of shape {tuple(x.shape)}")
        if x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"ImprovedUNet was built for {self.config.in_channels} input channels but got {x.shape[1]} "
                f"(shape {tuple(x.shape)}); convert the images or set ModelConfig.in_channels"
            )
        h, w = x.shape[-2:]
        if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
            ph, pw = (-(-s // SIZE_MULTIPLE) * SIZE_MULTIPLE for s in (h, w))
            raise ValueError(
                f"input size {h}x{w} is not a multiple of {SIZE_MULTIPLE} in height and width; pad to {ph}x{pw}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        # activations follow the weights' memory format (model.to(memory_format=torch.channels_last))
        if self.level1.conv.weight.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        c1 = self.level1(x)  # (B, C, H, W)
        c2 = self.level2(c1)  # (B, 2C, H/2, W/2)
        c3 = self.level3(c2)  # (B, 4C, H/4, W/4)
        c4 = self.level4(c3)  # (B, 8C, H/8, W/8)
        c5 = self.level5(c4)  # (B, 16C, H/16, W/16)
        x = self.up4(c5)  # (B, 8C, H/8, W/8)
        l4 = self.loc4(torch.cat([x, c4], dim=1))  # (B, 16C, H/8, W/8) -> (B, 8C, H/8, W/8)
        x = self.up3(l4)  # (B, 4C, H/4, W/4)
        l3 = self.loc3(torch.cat([x, c3], dim=1))  # (B, 8C, H/4, W/4) -> (B, 4C, H/4, W/4)
        x = self.up2(l3)  # (B, 2C, H/2, W/2)
        l2 = self.loc2(torch.cat([x, c2], dim=1))  # (B, 4C, H/2, W/2) -> (B, 2C, H/2, W/2)
        x = self.up1(l2)  # (B, C, H, W)
        l1 = self.top(torch.cat([x, c1], dim=1))  # (B, 2C, H, W)
        return self.head(l3, l2, l1, scales=self.scale_outputs and self.training)  # (B, K, H, W) logits


def dynunet_baseline(config: ModelConfig, deep_supervision: bool = False) -> nn.Module:
    """MONAI's DynUNet configured like a plain reimplementation of the same paper: five levels of
    base_channels * 2**k residual blocks, affine instance (or batch) norm, LeakyReLU 0.01, 2x2 transposed
    convolutions, one output head (no deep supervision, so that it returns logits (B, K, H, W) in training
    and evaluation alike). A baseline for the recipe study; MONAI is not needed for anything else.
    deep_supervision=True adds the two lower heads of the paper's recipe (in training DynUNet then returns
    them stacked), as benchmark.py times MONAI's network the way a MONAI user would train it."""
    try:
        from monai.networks.nets import DynUNet
    except ImportError:
        raise ImportError("--arch dynunet needs MONAI: pip install -r requirements-bench.txt") from None
    c = checked(config).base_channels
    norm = ("INSTANCE", {"affine": True}) if config.norm == "instance" else "BATCH"
    return DynUNet(spatial_dims=2, in_channels=config.in_channels, out_channels=config.num_classes,
                   kernel_size=[3] * 5, strides=[1, 2, 2, 2, 2], upsample_kernel_size=[2] * 4,
                   filters=[c, 2 * c, 4 * c, 8 * c, 16 * c], dropout=config.dropout or None, norm_name=norm,
                   act_name=("leakyrelu", {"inplace": True, "negative_slope": config.negative_slope}),
                   deep_supervision=deep_supervision, deep_supr_num=2 if deep_supervision else 1, res_block=True)


def build_model(config: ModelConfig) -> nn.Module:
    """The network a ModelConfig (as stored in every checkpoint) describes; ValueError when it cannot be built."""
    return MODELS[checked(config).arch](config)


# The networks by --arch name: a new model is one entry here, a builder that takes a ModelConfig.
MODELS = {"improved-unet": ImprovedUNet, "dynunet": dynunet_baseline}
Arch = typing.Literal[tuple(MODELS)]  # --arch's choices


def summary(model: ImprovedUNet, size: int = 256) -> str:
    """One line per paper-level module: output shape for a (1, C, size, size) input and parameter count."""
    rows, hooks = [], []
    for name, module in model.named_children():
        hooks.append(module.register_forward_hook(
            lambda m, inp, out, name=name: rows.append((name, type(m).__name__, tuple(out.shape), count_parameters(m)))
        ))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, model.config.in_channels, size, size))
    model.train(was_training)
    for h in hooks:
        h.remove()
    lines = [f"ImprovedUNet(arXiv:1802.10508) {asdict(model.config)}",
             f"{'module':8s} {'type':20s} {'output shape':22s} {'parameters':>10s}"]
    lines += [f"{n:8s} {t:20s} {str(s):22s} {p:>10,d}" for n, t, s, p in rows]
    lines.append(f"total parameters: {count_parameters(model):,d}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print the Improved UNet's layers and parameter count.")
    parser.add_argument("--size", type=int, default=256, help="input height and width for the shape column")
    parser.add_argument("--base-channels", type=int, default=ModelConfig.base_channels, help="features at level 1")
    parser.add_argument("--norm", choices=NORMS, default=ModelConfig.norm, help="normalisation layer")
    parser.add_argument("--num-classes", type=int, default=ModelConfig.num_classes, help="output logit channels")
    args = parser.parse_args(argv)
    config = ModelConfig(base_channels=args.base_channels, norm=args.norm, num_classes=args.num_classes)
    print(summary(ImprovedUNet(config), args.size))


if __name__ == "__main__":
    main()
