"""figures.py writes real PNGs: the diagram is read from the model, the example grid from synthetic data only."""

import numpy as np
import pytest
from matplotlib.text import Text
from PIL import Image

import dataset
import figures
import synthetic
from modules import ImprovedUNet, ModelConfig, count_parameters


def open_png(path):
    assert path.stat().st_size > 10_000
    image = Image.open(path)
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"))


def test_architecture_png(tmp_path):
    out = tmp_path / "figs" / "architecture.png"
    figures.main(["architecture", "--out", str(out), "--base-channels", "4", "--size", "64"])
    pixels = open_png(out)
    assert 1000 <= pixels.shape[1] <= 1400 and 500 <= pixels.shape[0] <= 900
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 8  # a drawing, not a blank canvas


def test_architecture_reads_the_model(tmp_path):
    model = ImprovedUNet(ModelConfig(base_channels=8))
    text = "\n".join(t.get_text() for t in figures.draw_architecture(model, size=64).findobj(Text))
    for label in ("8 features\n64×64", "128 features\n4×4", "localisation\n128→64", "upsampling\n128→64",
                  "segmentation\n32→1 at 1/4", f"{count_parameters(model):,} parameters"):
        assert label in text
    assert "256 features" not in text

    paths = {c: tmp_path / f"arch{c}.png" for c in (8, 16)}
    for c, path in paths.items():
        figures.main(["architecture", "--out", str(path), "--base-channels", str(c), "--size", "64"])
    a, b = open_png(paths[8]), open_png(paths[16])
    assert a.shape != b.shape or (a != b).any()


def test_synthetic_png_generates_a_set_when_the_folder_is_missing(tmp_path, capsys):
    out = tmp_path / "synthetic.png"
    figures.main(["synthetic", "--out", str(out), "--data-dir", str(tmp_path / "missing"), "-n", "2"])
    pixels = open_png(out)
    assert pixels.shape[1] >= 400 and pixels.shape[0] >= 200
    assert "generating 2 synthetic images" in capsys.readouterr().out
    assert not (tmp_path / "missing").exists()  # generated in a temporary folder, not in --data-dir


def test_synthetic_png_from_an_existing_set(tmp_path):
    root = synthetic.make_synthetic(tmp_path / "syn", 2, seed=3, log=lambda *a: None, num_workers=1)
    out = tmp_path / "synthetic.png"
    figures.main(["synthetic", "--out", str(out), "--data-dir", str(root), "-n", "1"])
    open_png(out)
    with pytest.raises(dataset.DataError, match="fewer than -n 3"):
        figures.main(["synthetic", "--out", str(out), "--data-dir", str(root), "-n", "3"])


def test_synthetic_refuses_other_data(isic_folder, tmp_path):
    with pytest.raises(dataset.DataError, match="not a synthetic set"):
        figures.main(["synthetic", "--out", str(tmp_path / "x.png"), "--data-dir", str(isic_folder), "-n", "2"])
    assert not (tmp_path / "x.png").exists()
