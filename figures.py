"""The figures of README.md and docs/, drawn from the project's own code: the network diagram and synthetic examples.

    python figures.py architecture --out images/architecture.png
    python figures.py synthetic --out images/synthetic_examples.png -n 6
"""

from __future__ import annotations

import argparse
import io
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Circle, FancyBboxPatch
from PIL import Image

import dataset
import synthetic
import utils
from modules import ContextLevel, ImprovedUNet, LocalizationModule, ModelConfig, UpsamplingModule, count_parameters

COLORS = {"conv": "#9ecae1", "context": "#fdd49e", "up": "#c7e9c0", "loc": "#dadaeb", "seg": "#fcbba1",
          "upscale": "#e0e0e0"}
SKIP = "#7f7f7f"


def trace(model: ImprovedUNet, size: int) -> dict[str, tuple[list[tuple], tuple]]:
    """{child name: (its input shapes, its output shape)} and "output" for a (1, C, size, size) input."""
    shapes = {}
    hooks = [m.register_forward_hook(lambda m, inp, out, name=name: shapes.__setitem__(
        name, ([tuple(i.shape) for i in inp], tuple(out.shape)))) for name, m in model.named_children()]
    was_training = model.training
    with torch.no_grad():
        shapes["output"] = ([], tuple(model.eval()(torch.zeros(1, model.config.in_channels, size, size)).shape))
    model.train(was_training)
    for h in hooks:
        h.remove()
    return shapes


class Canvas:
    """Boxes, circles and arrows in data units on one matplotlib axis."""

    def __init__(self, ax):
        self.ax = ax

    def box(self, x, y, text, kind, w=1.1, h=0.58, size=9.5):
        self.ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0,rounding_size=0.08",
                                         fc=COLORS[kind], ec="#404040", lw=0.8, zorder=2))
        self.ax.text(x, y, text, ha="center", va="center", fontsize=size, zorder=3, linespacing=1.1)
        return {"x": x, "y": y, "l": (x - w / 2, y), "r": (x + w / 2, y), "t": (x, y + h / 2), "b": (x, y - h / 2)}

    def circle(self, x, y, symbol, r=0.15):
        self.ax.add_patch(Circle((x, y), r, fc="white", ec="#404040", lw=0.9, zorder=2))
        self.ax.text(x, y, symbol, ha="center", va="center", fontsize=11 if symbol == "+" else 9, weight="bold",
                     zorder=3)
        return {"x": x, "y": y, "l": (x - r, y), "r": (x + r, y), "t": (x, y + r), "b": (x, y - r)}

    def arrow(self, *points, color="#303030", lw=1.1, dot=None):
        xs, ys = zip(*points)
        self.ax.plot(xs[:-1], ys[:-1], color=color, lw=lw, zorder=1, solid_capstyle="butt")
        self.ax.annotate("", xy=points[-1], xytext=points[-2], zorder=1,
                         arrowprops=dict(arrowstyle="-|>,head_length=0.45,head_width=0.2", color=color, lw=lw,
                                         shrinkA=0, shrinkB=0))
        if dot is not None:  # a branch point
            self.ax.plot(*dot, "o", color=color, ms=3.5, zorder=3)


@dataclass(frozen=True)
class Layout:
    """Where the diagram's columns and rows go (data units)."""

    depth: int  # pathway levels
    s: float = 0.6  # step inwards per level
    gap: float = 1.45  # row spacing
    a: float = 1.55  # x of the first conv
    up_dx: float = 2.65  # concatenation to upsampling module within a row

    @property
    def c0(self) -> float:  # x of the top concatenation: the narrowest skip is ~1 unit
        return self.a + 2.45 + 2 * (self.depth - 2) * self.s + 1.0

    @property
    def x_seg(self) -> float:
        return self.c0 + self.up_dx - self.s + 1.25

    @property
    def x_sum(self) -> float:
        return self.c0 + self.up_dx - self.s + 2.3


def draw_architecture(model: ImprovedUNet, size: int = 256) -> Figure:
    """Figure 1 of the paper for this model: context pathway left, localisation right, deep supervision."""
    shapes = trace(model, size)
    children = dict(model.named_children())

    def row(name: str, which: int = -1) -> int:  # pathway level from a tensor's height: size / 2**row
        h = (shapes[name][1] if which < 0 else shapes[name][0][which])[2]
        return int(round(np.log2(size / h)))

    levels = [(n, m) for n, m in children.items() if isinstance(m, ContextLevel)]
    ups = {row(n) + 1: m for n, m in children.items() if isinstance(m, UpsamplingModule)}  # drawn in the row below
    locs = {row(n): m for n, m in children.items() if isinstance(m, LocalizationModule)}
    seg_convs = list(model.head.children())  # 1x1 segmentation layers, coarsest first
    seg_rows = [row("head", i) for i in range(len(seg_convs))]
    lay = Layout(len(levels))
    fig = Figure(figsize=(13.2, 7.4), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1), xlim=(0, lay.x_sum + 1.65), ylim=(-(lay.depth - 1) * lay.gap - 0.75, 1.9),
                      aspect="equal")
    ax.axis("off")
    cv = Canvas(ax)
    cfg = model.config
    ax.text(0.15, 1.62, f"Improved UNet (Isensee et al. 2017, arXiv:1802.10508), 2D: base_channels="
            f"{cfg.base_channels}, {cfg.norm} norm, {count_parameters(model):,} parameters", fontsize=12,
            fontweight="bold", va="center")
    ax.text(0.15, 1.25, f"features and sizes for a {cfg.in_channels}×{size}×{size} input", fontsize=10,
            va="center", color="#404040")
    ctx_out = _draw_context_pathway(cv, levels, shapes, lay, cfg.in_channels, size)
    tail = _draw_localisation_pathway(cv, model, locs, ups, ctx_out, lay)
    _draw_deep_supervision(cv, seg_rows, seg_convs, tail, lay, shapes["output"][1])
    _draw_legend(cv, lay)
    return fig


def _draw_context_pathway(cv: Canvas, levels: list, shapes: dict, lay: Layout, in_channels: int, size: int) -> dict:
    """Left column: per level a 3x3 conv (stride 2 below the top), a context module and the residual sum."""
    ax, ctx_out = cv.ax, {}
    for k, (name, level) in enumerate(levels):
        y, x = -k * lay.gap, lay.a + k * lay.s
        stride = level.conv.stride[0]
        conv = cv.box(x, y, "3×3 conv" + (f"\nstride {stride}" if stride > 1 else ""), "conv", w=1.0)
        ctx = cv.box(x + 1.45, y, "context\nmodule", "context")
        plus = cv.circle(x + 2.45, y, "+")
        junction = ((conv["r"][0] + ctx["l"][0]) / 2, y)
        cv.arrow(conv["r"], ctx["l"])
        cv.arrow(ctx["r"], plus["l"])
        cv.arrow(junction, (junction[0], y + 0.45), (plus["x"], y + 0.45), plus["t"], dot=junction)
        h, w = shapes[name][1][2:]
        ax.text(conv["l"][0] - 0.12, y, f"{level.conv.out_channels} features\n{h}×{w}", ha="right", va="center",
                fontsize=10, linespacing=1.2)
        if k == 0:
            ax.text(x, y + 0.85, f"input {in_channels}×{size}×{size}", ha="center", va="bottom", fontsize=9.5)
            cv.arrow((x, y + 0.82), conv["t"])
        else:
            prev = ctx_out[k - 1]
            cv.arrow(prev["b"], (prev["x"], y + lay.gap / 2), (x, y + lay.gap / 2), conv["t"])
        ctx_out[k] = plus
    return ctx_out


def _draw_localisation_pathway(cv: Canvas, model: ImprovedUNet, locs: dict, ups: dict, ctx_out: dict,
                               lay: Layout) -> dict:
    """Right column: per level a concatenation with the skip, a localisation module and an upsampling module."""
    concat, tail = {}, {}
    for k in range(lay.depth):
        y, xc = -k * lay.gap, lay.c0 - k * lay.s
        if k < lay.depth - 1:
            concat[k] = cv.circle(xc, y, "c")
            cv.arrow(ctx_out[k]["r"], concat[k]["l"], color=SKIP)
            if k in locs:
                label, kind, first_conv, last_conv = "localisation", "loc", locs[k].conv3x3.conv, locs[k].conv1x1.conv
            else:  # the top level ends in a 3x3 conv
                label, kind, first_conv, last_conv = "3×3 conv", "conv", model.top.conv, model.top.conv
            tail[k] = cv.box(xc + 1.25, y, f"{label}\n{first_conv.in_channels}→{last_conv.out_channels}", kind, w=1.2)
            cv.arrow(concat[k]["r"], tail[k]["l"])
        if k in ups:
            up = cv.box(xc + lay.up_dx, y, f"upsampling\n{ups[k].conv.in_channels}→{ups[k].conv.out_channels}",
                        "up", w=1.05)
            cv.arrow(tail[k]["r"] if k in tail else ctx_out[k]["r"], up["l"])
            cv.arrow(up["t"], (up["x"], y + lay.gap / 2), (concat[k - 1]["x"], y + lay.gap / 2), concat[k - 1]["b"])
    return tail


def _draw_deep_supervision(cv: Canvas, seg_rows: list[int], seg_convs: list, tail: dict, lay: Layout,
                           output_shape) -> None:
    """Segmentation layers, upscaled (nearest x2) and summed into the full-resolution output."""
    below = first = None
    for k, conv in zip(seg_rows, seg_convs):
        y = -k * lay.gap - 0.55
        src = tail[k]["r"]
        branch = (src[0] + 0.1, src[1])
        where = "full size" if k == 0 else f"at 1/{2 ** k}"
        seg = cv.box(lay.x_seg, y, f"segmentation\n{conv.in_channels}→{conv.out_channels} {where}", "seg", w=1.3,
                     h=0.5, size=8.5)
        cv.arrow(src, branch, (branch[0], y), seg["l"], dot=branch)
        if below is None:
            below = first = seg
            continue
        plus = cv.circle(lay.x_sum, y, "+")
        cv.arrow(seg["r"], plus["l"])
        upscale = cv.box(lay.x_sum, (y + below["y"]) / 2, "upscale ×2", "upscale", w=0.95, h=0.32, size=8)
        if below is first:  # the coarsest map turns up into the sum column
            cv.arrow(below["r"], (lay.x_sum, below["y"]), upscale["b"])
        else:
            cv.arrow(below["t"], upscale["b"])
        cv.arrow(upscale["t"], plus["b"])
        below = plus
    cv.arrow(below["r"], (below["x"] + 0.45, below["y"]))
    k_out, (h_out, w_out) = output_shape[1], output_shape[2:]
    cv.ax.text(below["x"] + 0.5, below["y"], f"logits\n{k_out}×{h_out}×{w_out}", ha="left", va="center", fontsize=9.5)


def _draw_legend(cv: Canvas, lay: Layout) -> None:
    """Two columns below the deep-supervision branch."""
    legend = [("conv", "3×3 convolution"), ("loc", "localisation module\n(3×3 conv, 1×1 conv)"),
              ("context", "context module\n(residual block)"), ("seg", "segmentation layer\n(1×1 conv)"),
              ("up", "upsampling module\n(nearest ×2, 3×3 conv)"), ("upscale", "upscale (nearest ×2)"),
              ("+", "element-wise sum"), ("c", "concatenation"), ("skip", "skip connection")]
    for i, (kind, text) in enumerate(legend):
        x, y = lay.c0 + 1.75 + (i % 2) * 2.45, -2 * lay.gap - 1.3 - (i // 2) * 0.5
        if kind in COLORS:
            cv.box(x, y, "", kind, w=0.36, h=0.28)
        elif kind == "skip":
            cv.arrow((x - 0.2, y), (x + 0.2, y), color=SKIP)
        else:
            cv.circle(x, y, kind, r=0.13)
        cv.ax.text(x + 0.28, y, text, ha="left", va="center", fontsize=8.5, linespacing=1.05)


def save_png(fig: Figure, out: Path, colors: int = 256) -> Path:
    """Save with an adaptive palette: a few times smaller than RGB for diagrams and small photo grids."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor="white")
    image = Image.open(buf).convert("RGB").quantize(colors, dither=Image.Dither.NONE)
    out.parent.mkdir(parents=True, exist_ok=True)
    with utils.atomic_write(out) as tmp:
        image.save(tmp, optimize=True)
    return out


def synthetic_samples(data_dir: Path, n: int) -> list[dataset.Sample]:
    """The first n pairs of a synthetic set; refuses any other data so that no real image reaches a figure."""
    if not (data_dir / synthetic.MARKER).is_file():
        raise dataset.DataError(f"{data_dir} is not a synthetic set (no {synthetic.MARKER}); figures show synthetic "
                                f"images only: pass a folder made by `python synthetic.py --out DIR`")
    samples = sorted((s for split in dataset.find_pairs(data_dir, log=lambda *a: None).values() for s in split
                      if s.mask is not None), key=lambda s: s.id)
    if len(samples) < n:
        raise dataset.DataError(f"{data_dir} holds {len(samples)} image/mask pairs, fewer than -n {n}; lower -n")
    return samples[:n]


def draw_synthetic(samples: list[dataset.Sample], width: int = 360) -> Figure:
    """A grid of images, each downscaled to `width` pixels, with its ground-truth outline."""
    cols = min(3, len(samples))
    rows = -(-len(samples) // cols)
    fig = Figure(figsize=(3.7 * cols, 3.0 * rows + 0.4), dpi=100)
    fig.suptitle("Synthetic lesions (python synthetic.py) with the ground-truth outline", fontsize=12)
    for i, sample in enumerate(samples):
        image, mask = dataset.load_image(sample.image), dataset.load_mask(sample.mask)
        size = (width, round(width * image.shape[0] / image.shape[1]))
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))
        mask = np.asarray(Image.fromarray(mask * 255).resize(size, Image.Resampling.BILINEAR)) / 255.0
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(image)
        ax.contour(mask, levels=[0.5], colors="#00e5ff", linewidths=1.6)  # 0.5 of the smoothed mask: its outline
        ax.text(0.02, 0.03, f"{sample.id}: {mask.mean():.0%} lesion", transform=ax.transAxes, fontsize=8.5,
                bbox=dict(fc="white", ec="none", alpha=0.8, pad=2))
        ax.axis("off")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.4 / fig.get_figheight(), wspace=0.03,
                        hspace=0.03)
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Draw the figures of README.md and docs/ into PNG files.")
    sub = parser.add_subparsers(dest="command", required=True)
    arch = sub.add_parser("architecture", help="diagram of the Improved UNet, read from a model instance")
    arch.add_argument("--out", type=Path, default=Path("images/architecture.png"), help="PNG to write")
    arch.add_argument("--base-channels", type=int, default=ModelConfig.base_channels, help="features at level 1")
    arch.add_argument("--size", type=int, default=256, help="input height and width the sizes are given for")
    syn = sub.add_parser("synthetic", help="grid of synthetic lesions with their ground-truth outlines")
    syn.add_argument("--out", type=Path, default=Path("images/synthetic_examples.png"), help="PNG to write")
    syn.add_argument("--data-dir", type=Path, default=Path(synthetic.SYNTHETIC_DIR),
                     help="synthetic set to draw from; when missing, a small set is generated in a temporary folder")
    syn.add_argument("-n", type=int, default=6, help="number of images in the grid")
    args = parser.parse_args(argv)

    if args.command == "architecture":
        fig = draw_architecture(ImprovedUNet(ModelConfig(base_channels=args.base_channels)), args.size)
    else:
        if args.n < 1:
            parser.error(f"-n must be at least 1, got {args.n}")
        with tempfile.TemporaryDirectory() as tmp:
            root = args.data_dir
            if not root.exists():
                print(f"{root} does not exist: generating {args.n} synthetic images in a temporary folder")
                root = synthetic.make_synthetic(tmp, args.n, seed=0, log=lambda *a: None, num_workers=1)
            fig = draw_synthetic(synthetic_samples(root, args.n))
    print(f"wrote {save_png(fig, args.out)}")


if __name__ == "__main__":
    main()
