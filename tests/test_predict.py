"""predict.py end to end on tiny generated images: outputs, failures, scores against the official scorer."""

import csv
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import devices
import losses
import postprocess
import predict
import utils
from modules import ImprovedUNet, ModelConfig

IMAGE_SIZE = 32
MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.25, 0.25)


def save_checkpoint(path: Path, seed: int = 0, **overrides) -> Path:
    """A checkpoint in the layout train.py writes, for a randomly initialised tiny network."""
    torch.manual_seed(seed)
    config = ModelConfig(base_channels=4)
    model = ImprovedUNet(config)
    state = {"format": "improved-unet-isic/1", "model": model.state_dict(), "model_config": dataclasses.asdict(config),
             "train_config": {}, "image_size": IMAGE_SIZE, "norm_stats": {"mean": list(MEAN), "std": list(STD)},
             "epoch": 1, "best_metric": 0.5, "best_epoch": 0, "optimizer": {}, "scheduler": {}, "scaler": None,
             "rng": {}, "wandb_run_id": None}
    state.update(overrides)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def lesion_image(rng, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A skin-coloured RGB image with a dark ellipse, and the ellipse as a {0, 1} mask."""
    yy, xx = np.mgrid[:height, :width]
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    mask = ((yy - cy) / (0.3 * height)) ** 2 + ((xx - cx) / (0.25 * width)) ** 2 < 1
    image = np.empty((height, width, 3), np.uint8)
    image[:] = (220, 170, 150)
    image[mask] = (90, 50, 40)
    noise = rng.integers(-20, 20, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8), mask.astype(np.uint8)


@pytest.fixture
def checkpoint(tmp_path):
    return save_checkpoint(tmp_path / "model" / "best.pt")


@pytest.fixture
def data(tmp_path):
    """Five readable images of varied sizes and kinds, one corrupt file, and ground truth for the five.

    Returns (image folder, truth folder, {id: (height, width)} as displayed).
    """
    rng = np.random.default_rng(0)
    images, truth = tmp_path / "images", tmp_path / "truth"
    images.mkdir()
    truth.mkdir()
    sizes = {}

    def add(number: int, height: int, width: int, save):
        image, mask = lesion_image(rng, height, width)
        name = f"ISIC_{number:07d}"
        save(image, images / name)
        Image.fromarray(mask * 255).save(truth / f"{name}_segmentation.png")
        sizes[name] = (height, width)

    add(1, 40, 56, lambda a, p: Image.fromarray(a).save(p.with_suffix(".jpg"), quality=95))
    add(2, 48, 36, lambda a, p: Image.fromarray(a).save(p.with_suffix(".png")))
    add(3, 33, 45, lambda a, p: Image.fromarray(a).convert("L").save(p.with_suffix(".png")))
    add(4, 50, 40, lambda a, p: Image.fromarray(a).convert("RGBA").save(p.with_suffix(".png")))

    def save_rotated(array, path):  # stored 44 wide and 30 high; EXIF orientation 6 shows it 30 wide, 44 high
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(np.ascontiguousarray(np.rot90(array, k=1))).save(path.with_suffix(".jpg"), exif=exif)

    add(5, 44, 30, save_rotated)
    with Image.open(images / "ISIC_0000005.jpg") as stored:
        assert stored.size == (44, 30)  # the file really is stored sideways
    (images / "ISIC_0000009.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    return images, truth, sizes


def read_masks(folder: Path) -> dict[str, np.ndarray]:
    masks = {}
    for path in sorted(folder.glob("*_segmentation.png")):
        with Image.open(path) as image:
            assert image.mode == "L", path
            masks[path.name.removesuffix("_segmentation.png")] = np.asarray(image)
    return masks


def run_main(argv) -> int:
    """predict.main's exit status: 0 when it returns."""
    try:
        predict.main([str(a) for a in argv])
    except SystemExit as exit:
        return exit.code
    return 0


def test_masks_at_original_size_binary_named_and_bad_file_reported(checkpoint, data, tmp_path, capsys):
    images, _, sizes = data
    out = tmp_path / "out"
    status = run_main(["--checkpoint", checkpoint, "--input", images, "--output", out, "--workers", 0])
    err = capsys.readouterr().err
    assert status == 1
    assert "ISIC_0000009.jpg" in err and "1 of 6 files failed" in err
    masks = read_masks(out)
    assert set(masks) == set(sizes)  # the corrupt file wrote nothing
    for name, mask in masks.items():
        assert mask.shape == sizes[name], name  # original size, EXIF rotation applied
        assert set(np.unique(mask)) <= {0, 255}


def test_prediction_switches_the_backends_as_training_does(checkpoint, data, tmp_path, monkeypatch):
    """cuDNN autotuning (and TF32) on a GPU come from devices.configure_backends, for prediction too: without it
    cudnn.benchmark stays off and every convolution takes cuDNN's heuristic kernel."""
    configured = []
    monkeypatch.setattr(devices, "configure_backends", lambda hw, **kwargs: configured.append(hw.device))
    good = good_images(data, tmp_path)
    assert run_main(["--checkpoint", checkpoint, "--input", good, "--output", tmp_path / "out", "--device", "cpu"]) == 0
    assert configured == [torch.device("cpu")]


def test_worker_threads_give_the_same_masks(checkpoint, data, tmp_path):
    images, _, sizes = data
    outputs = []
    for workers in (0, 2):
        out = tmp_path / f"out{workers}"
        assert run_main(["--checkpoint", checkpoint, "--input", images, "--output", out, "--workers", workers,
                         "--batch-size", 2]) == 1
        outputs.append(read_masks(out))
    assert outputs[0].keys() == outputs[1].keys() == sizes.keys()
    for name in sizes:
        np.testing.assert_array_equal(outputs[0][name], outputs[1][name])


def test_metrics_files_overlays_and_probability_maps(checkpoint, data, tmp_path):

    images, truth, sizes = data
    (images / "ISIC_0000009.jpg").unlink()
    out = tmp_path / "out"
    result = predict.main(["--checkpoint", str(checkpoint), "--input", str(images), "--masks", str(truth),
                           "--output", str(out), "--overlay", "--save-probabilities"])
    masks = read_masks(out)
    assert any(m.min() == 0 and m.max() == 255 for m in masks.values()), "predictions too uniform to test on"
    means = json.loads((out / "metrics.json").read_text())
    assert list(means) == [*predict.METRICS, "failures", "failure_share"]
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(row["image_id"] for row in rows) == sorted(sizes)
    for key in predict.METRICS:  # metrics.csv rounds each float32 value to its shortest decimal
        assert means[key] == pytest.approx(np.mean([float(row[key]) for row in rows]), abs=1e-7)
        assert means[key] == result.metrics[key]
    for row in rows:  # scored at the original resolution, on exactly the files written
        truth_mask = np.asarray(Image.open(truth / f"{row['image_id']}_segmentation.png")) > 127
        expected = losses.segmentation_metrics(torch.from_numpy(masks[row["image_id"]] == 255)[None],
                                              torch.from_numpy(truth_mask)[None])
        assert np.float32(row["dice"]) == expected["dice"][0].item()
    assert (out / "cases.png").is_file()
    for name, (height, width) in sizes.items():
        with Image.open(out / "overlays" / f"{name}_overlay.jpg") as overlay:
            assert overlay.size == (width, height)
        with Image.open(out / "probabilities" / f"{name}_probability.png") as probability:
            assert probability.size == (width, height) and probability.mode == "L"
            # the saved map, thresholded, is the mask
            np.testing.assert_array_equal(np.asarray(probability) > 127.5, masks[name] == 255)


@pytest.mark.slow  # the scorer imports scikit-learn: several seconds
def test_official_scorer_accepts_our_output_and_agrees(checkpoint, data, tmp_path):
    images, truth, sizes = data
    (images / "ISIC_0000009.jpg").unlink()
    # an empty ground truth exercises the scorer's conventions for undefined ratios
    Image.fromarray(np.zeros(sizes["ISIC_0000002"], np.uint8)).save(truth / "ISIC_0000002_segmentation.png")
    out = tmp_path / "out"
    # overlays/, probabilities/ and our metric files sit beside the masks: the scorer must not mind
    predict.main(["--checkpoint", str(checkpoint), "--input", str(images), "--masks", str(truth),
                  "--output", str(out), "--overlay", "--save-probabilities"])
    command = [sys.executable, "-m", "isic_challenge_scoring", "-o", "json", "segmentation", str(truth), str(out)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    official = json.loads(completed.stdout)["macro_average"]
    # our per-image ratios are float32 (MPS has no float64): within half a float32 step of the scorer's
    ours = json.loads((out / "metrics.json").read_text())
    assert {key: ours[key] for key in official} == pytest.approx(official, abs=2**-25)
    # and the failures: images under the 0.65 Jaccard that the scorer's thresholded mean counts as 0
    per_image = list(csv.DictReader(open(out / "metrics.csv")))
    failed = sum(float(row["jaccard"]) < 0.65 for row in per_image)
    assert ours["failures"] == failed and ours["failure_share"] == pytest.approx(failed / len(per_image))
    assert failed >= 1  # the empty ground truth above fails


def truncated(path: Path) -> Path:
    good = save_checkpoint(path.with_name("whole.pt"))
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return path


def foreign(path: Path) -> Path:
    torch.save({"weights": torch.zeros(3)}, path)
    return path


def other_architecture(path: Path) -> Path:
    return save_checkpoint(path, model_config=dataclasses.asdict(ModelConfig(base_channels=8)))


@pytest.mark.parametrize("make", [lambda p: p, truncated, foreign, other_architecture],
                         ids=["missing", "truncated", "foreign", "other-architecture"])
def test_unusable_checkpoint_is_one_line_and_status_2(make, data, tmp_path, capsys):
    images, _, _ = data
    bad = make(tmp_path / "bad.pt")
    status = run_main(["--checkpoint", bad, "--input", images, "--output", tmp_path / "out"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("predict.py: error: ") and "bad.pt" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_default_checkpoint_is_the_newest_run_and_output_goes_beside_it(data, tmp_path, capsys, monkeypatch):
    images, _, _ = data
    runs = tmp_path / "runs"
    older, newer = save_checkpoint(runs / "a" / "best.pt"), save_checkpoint(runs / "b" / "best.pt")
    os.utime(older, (1e9, 1e9))
    assert run_main(["--runs-dir", runs, "--input", images / "ISIC_0000001.jpg"]) == 0
    assert str(newer) in capsys.readouterr().out
    assert (runs / "b" / "predictions" / "ISIC_0000001_segmentation.png").is_file()
    monkeypatch.setattr(predict, "SHIPPED_WEIGHTS", tmp_path / "no-shipped-weights.pt")
    assert run_main(["--runs-dir", tmp_path / "empty", "--input", images]) == 2
    assert "no best.pt" in capsys.readouterr().err


def test_exported_weights_are_float16_smaller_and_segment_as_the_checkpoint_does(checkpoint, data, tmp_path, capsys):
    images, truth, _ = data
    exported = tmp_path / "weights" / "model.pt"
    assert run_main(["--checkpoint", checkpoint, "--export-weights", exported]) == 0
    assert f"Wrote {exported}" in capsys.readouterr().out
    state = torch.load(exported, weights_only=True)
    assert {v.dtype for v in state["model"].values() if v.is_floating_point()} == {torch.float16}
    assert "optimizer" not in state and state["exported_from"]["checkpoint"] == str(checkpoint)
    assert exported.stat().st_size < 0.6 * checkpoint.stat().st_size
    for name, source in (("full", checkpoint), ("half", exported)):
        assert run_main(["--checkpoint", source, "--input", images, "--masks", truth, "--output", tmp_path / name,
                         "--save-probabilities", "--amp", "off"]) == 1  # the corrupt file fails, the rest is written
    full, half = (read_masks(tmp_path / name) for name in ("full", "half"))
    assert full.keys() == half.keys() and len(full) == 5
    for key in full:  # float16 weights move a probability a little: a pixel flips only next to the threshold
        probs = [np.asarray(Image.open(tmp_path / n / "probabilities" / f"{key}_probability.png"), np.int16)
                 for n in ("full", "half")]
        assert np.abs(probs[0] - probs[1]).max() <= 1, key  # in 1/255 steps
        assert (full[key] != half[key]).mean() < 0.01, key


def test_without_a_checkpoint_or_a_run_predict_uses_the_shipped_weights_and_says_so_first(
        checkpoint, data, tmp_path, monkeypatch, capsys):
    images, _, _ = data
    shipped = tmp_path / "weights" / "improved-unet-isic2018.pt"
    assert run_main(["--checkpoint", checkpoint, "--export-weights", shipped]) == 0
    capsys.readouterr()
    monkeypatch.setattr(predict, "SHIPPED_WEIGHTS", shipped)
    monkeypatch.chdir(tmp_path)
    assert run_main(["--runs-dir", tmp_path / "no-runs", "--input", images / "ISIC_0000001.jpg"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("No --checkpoint and no run under") and "shipped weights" in first
    assert (tmp_path / "predict_out" / "ISIC_0000001_segmentation.png").is_file()


def test_zero_argument_run_scores_the_held_out_test_split(tmp_path, monkeypatch, capsys):
    import dataset
    import synthetic

    monkeypatch.chdir(tmp_path)
    root = Path(synthetic.SYNTHETIC_DIR)  # where the zero-argument train.py puts its data
    rng = np.random.default_rng(1)
    for folder in ("ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"):
        (root / folder).mkdir(parents=True)
    for number in range(10):
        image, mask = lesion_image(rng, 36 + number, 48)
        Image.fromarray(image).save(root / "ISIC2018_Task1-2_Training_Input" / f"ISIC_{number:07d}.jpg")
        Image.fromarray(mask * 255).save(root / "ISIC2018_Task1_Training_GroundTruth" / f"ISIC_{number:07d}_segmentation.png")
    train_config = {"data_dir": str(root), "image_size": IMAGE_SIZE, "val_fraction": 0.2, "test_fraction": 0.3,
                    "split_seed": 3}
    save_checkpoint(Path("runs/synthetic/best.pt"), train_config=train_config)
    # the split exactly as the training run made it (this builds the run's cache)
    splits = dataset.prepare_splits(dataset.DataConfig(**train_config), log=lambda *a, **k: None)
    test_ids = sorted(splits.test.ids)
    assert 1 <= len(test_ids) < 10  # a checkpoint without a stored split: the seeded hold-out is recomputed

    result = predict.main([])
    output = Path("runs/synthetic/predictions")
    assert sorted(row["image_id"] for row in result.per_image) == test_ids
    assert sorted(read_masks(output)) == test_ids
    assert (output / "metrics.json").is_file()
    assert "threshold_jaccard" in capsys.readouterr().out  # the scores are printed
    # the validation split's masks go to a folder of their own, beside the test split's, which stays as it was
    validation = predict.main(["--split", "val"])
    assert sorted(row["image_id"] for row in validation.per_image) == sorted(splits.val.ids)
    assert sorted(read_masks(Path("runs/synthetic/predictions-val"))) == sorted(splits.val.ids)
    assert sorted(read_masks(output)) == test_ids


def test_glob_input_and_duplicate_names(checkpoint, data, tmp_path, capsys):
    images, _, _ = data
    out = tmp_path / "out"
    assert run_main(["--checkpoint", checkpoint, "--input", f"{images}/*.png", "--output", out]) == 0
    assert sorted(read_masks(out)) == ["ISIC_0000002", "ISIC_0000003", "ISIC_0000004"]
    Image.new("RGB", (20, 20)).save(images / "ISIC_0000001.png")  # ISIC_0000001.jpg is there too
    assert run_main(["--checkpoint", checkpoint, "--input", images, "--output", out]) == 2
    err = capsys.readouterr().err
    assert "ISIC_0000001.jpg" in err and "ISIC_0000001.png" in err


@pytest.mark.parametrize("spec", ["missing-folder", "empty-folder"])
def test_no_inputs_is_a_clear_error(checkpoint, tmp_path, spec, capsys):
    (tmp_path / "empty-folder").mkdir()
    assert run_main(["--checkpoint", checkpoint, "--input", tmp_path / spec, "--output", tmp_path / "o"]) == 2
    assert spec in capsys.readouterr().err


def test_ground_truth_of_another_size_fails_that_image(checkpoint, data, tmp_path, capsys):
    images, truth, _ = data
    (images / "ISIC_0000009.jpg").unlink()
    Image.new("L", (7, 9)).save(truth / "ISIC_0000003_segmentation.png")
    assert run_main(["--checkpoint", checkpoint, "--input", images, "--masks", truth, "--output",
                     tmp_path / "out"]) == 1
    err = capsys.readouterr().err
    assert "ISIC_0000003_segmentation.png" in err and "1 of 5 files failed" in err
    lines = (tmp_path / "out" / "metrics.csv").read_text().splitlines()
    assert len(lines) == 1 + 4 and not any(line.startswith("ISIC_0000003") for line in lines)


@pytest.mark.parametrize("flags", [["--batch-size", "0"], ["--threshold", "1.5"], ["--workers", "-1"]])
def test_nonsense_flags_exit_2(flags, capsys):
    assert run_main(flags) == 2
    assert flags[0] in capsys.readouterr().err


def test_every_flag_has_its_own_help_and_group():
    fields = [f.name for f in dataclasses.fields(predict.PredictConfig)]
    helps = utils.field_help(predict.PredictConfig)
    assert sorted(fields) == sorted(helps) == sorted(n for names in predict.GROUPS.values() for n in names)
    assert len(set(helps.values())) == len(helps)  # no copy-pasted help text
    text = predict.build_parser().format_help()
    for name in fields:
        assert "--" + name.replace("_", "-") in text


def test_tta_maps_each_flip_back():
    class FirstChannel(torch.nn.Module):  # logits = the input's first channel: flips must undo exactly
        def forward(self, x):
            return x[:, :1] * 3

    x = torch.randn(2, 3, 16, 16)
    expected = (x[:, 0] * 3).sigmoid()
    torch.testing.assert_close(predict.predict_probabilities(FirstChannel(), x, tta=True), expected)


def test_postprocess_flag_edits_the_network_resolution_map(checkpoint, data, tmp_path):
    import dataset

    images, _, sizes = data
    (images / "ISIC_0000009.jpg").unlink()
    out = tmp_path / "out"
    assert run_main(["--checkpoint", checkpoint, "--input", images, "--output", out, "--postprocess", "--tta",
                     "--amp", "off"]) == 0  # float32, as the reference below
    loaded = predict.load_model(checkpoint, torch.device("cpu"))
    for name, mask in read_masks(out).items():
        path = next(images.glob(name + ".*"))
        small = torch.from_numpy(np.array(dataset.resize_image(dataset.load_image(path), IMAGE_SIZE)))[None]
        probs = predict.predict_probabilities(loaded.model, dataset.normalize(small, MEAN, STD), tta=True)[0]
        edited = postprocess.postprocess_probabilities(probs.numpy(), 0.5)
        assert postprocess.label_regions(edited > 0.5)[1] <= 1, name  # one region at the network's resolution
        expected = predict.resize_probabilities(torch.from_numpy(edited), sizes[name]) > 0.5
        np.testing.assert_array_equal(mask == 255, expected.numpy(), err_msg=name)


def test_onnx_export_matches_pytorch(checkpoint, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "model.onnx"
    assert predict.main(["--checkpoint", str(checkpoint), "--export-onnx", str(path)]).written == [path]
    loaded = predict.load_model(checkpoint, torch.device("cpu"))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    metadata = session.get_modelmeta().custom_metadata_map
    assert json.loads(metadata["mean"]) == list(MEAN) and metadata["image_size"] == str(IMAGE_SIZE)
    assert metadata["shades_of_gray"] == "false" and "Shades of Gray" not in metadata["preprocessing"]
    for shape in [(1, 3, 32, 32), (3, 3, 48, 64)]:  # batch, height and width all differ from the export's
        x = torch.randn(shape)
        with torch.no_grad():
            expected = loaded.model(x).numpy()
        (got,) = session.run(None, {"image": x.numpy()})
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_outline_marks_the_edge_only():
    mask = torch.zeros(40, 50, dtype=torch.bool)
    mask[10:30, 12:41] = True
    x = mask[None, None].float()
    edge = (torch.nn.functional.max_pool2d(x, 3, 1, 1) > -torch.nn.functional.max_pool2d(-x, 3, 1, 1))[0, 0]
    assert torch.equal(predict.outline(mask, 1), edge)
    thick = predict.outline(mask, 4)
    assert thick.shape == mask.shape and thick[edge].all()
    far = torch.ones_like(mask)
    far[10 - 8:30 + 8, 12 - 8:41 + 8] = False  # more than two widths outside
    far[10 + 8:30 - 8, 12 + 8:41 - 8] = True  # more than two widths inside
    assert not thick[far].any()


def test_masks_from_an_isic_root(checkpoint, data, tmp_path):
    images, truth, sizes = data
    (images / "ISIC_0000009.jpg").unlink()
    root = tmp_path / "root"  # the images/ + masks/ layout that dataset.find_pairs reads
    root.mkdir()
    images.rename(root / "images")
    truth.rename(root / "masks")
    out = tmp_path / "out"
    result = predict.main(["--checkpoint", str(checkpoint), "--input", str(root / "images"), "--masks", str(root),
                           "--output", str(out)])
    assert sorted(row["image_id"] for row in result.per_image) == sorted(sizes)


@pytest.mark.gpu
def test_cuda_bf16_probabilities_agree_with_cpu(checkpoint, data, tmp_path):
    images, _, sizes = data
    (images / "ISIC_0000009.jpg").unlink()
    for device in ("cpu", "cuda"):
        predict.main(["--checkpoint", str(checkpoint), "--input", str(images), "--output", str(tmp_path / device),
                      "--device", device, "--save-probabilities"])
    for name in sizes:
        maps = [np.asarray(Image.open(tmp_path / device / "probabilities" / f"{name}_probability.png"), np.float64)
                for device in ("cpu", "cuda")]
        assert maps[0].shape == maps[1].shape == sizes[name]
        assert np.abs(maps[0] - maps[1]).mean() < 3, name  # bf16 autocast: a few 1/255 steps at most


def test_overlay_draws_prediction_over_truth_and_leaves_the_rest_untouched():
    image = np.full((40, 60, 3), 100, np.uint8)
    truth = np.zeros((40, 60), bool)
    truth[5:25, 5:25] = True
    prediction = np.zeros((40, 60), bool)
    prediction[10:30, 30:55] = True
    out = predict.overlay_image(image, prediction, truth)
    red = (out == (255, 0, 0)).all(-1)
    green = (out == (0, 255, 0)).all(-1)
    assert red[10, 40] and red[29, 40] and not red[20, 40]  # the prediction's edge, not its inside
    assert green[5, 15] and not green[15, 15]
    assert ((out == 100).all(-1) | red | green).all()  # nothing else changed
    assert not (red & green).any() and image.max() == 100  # the input is not modified


def test_prediction_sees_an_image_exactly_as_the_training_cache_holds_it(tmp_path):
    import dataset
    from conftest import write_isic_folder

    root = write_isic_folder(tmp_path / "isic", n=6, size=70)
    splits = dataset.prepare_splits(dataset.DataConfig(data_dir=str(root), image_size=32, val_fraction=0,
                                                       test_fraction=0), log=lambda *a, **k: None)
    for i, sample_id in enumerate(splits.train.ids):
        item = predict.Item(sample_id, root / "ISIC2018_Task1-2_Training_Input" / f"{sample_id}.jpg")
        loaded = predict.load_item(item, 32, False)
        np.testing.assert_array_equal(loaded.small, splits.train.images[i])
        assert loaded.size == (70, 70)


def test_prediction_and_scoring_make_no_float64(checkpoint, data, tmp_path):
    from test_devices import no_float64

    images, truth, sizes = data
    (images / "ISIC_0000009.jpg").unlink()
    with no_float64():  # MPS has none: what runs here on the CPU runs there on the device
        result = predict.main(["--checkpoint", str(checkpoint), "--input", str(images), "--masks", str(truth),
                               "--output", str(tmp_path / "out"), "--postprocess", "--save-probabilities"])
    assert len(result.per_image) == len(sizes)


@pytest.mark.parametrize("amp, expected", [("auto", torch.bfloat16), ("off", None), ("fp16", torch.float16)])
def test_autocast_dtype_comes_from_the_device(checkpoint, data, tmp_path, monkeypatch, capsys, amp, expected):
    images, _, _ = data
    # a device whose own choice is bf16, as devices.hardware says of a CUDA GPU from compute capability 8.0
    gpu_like = devices.Hardware(torch.device("cpu"), "NVIDIA A100-SXM4-80GB", (8, 0), torch.bfloat16, True)
    monkeypatch.setattr(devices, "hardware", lambda device: gpu_like)
    seen = []
    real = predict.predict_probabilities
    monkeypatch.setattr(predict, "predict_probabilities",
                        lambda model, x, tta, amp, hw=None: seen.append(amp) or real(model, x, tta, amp, hw))
    assert run_main(["--checkpoint", checkpoint, "--input", images / "ISIC_0000001.jpg", "--output", tmp_path / "out",
                     "--amp", amp]) == 0
    assert seen == [expected]
    assert "NVIDIA A100-SXM4-80GB" in capsys.readouterr().out


def good_images(data, tmp_path) -> Path:
    """The data's readable images alone (the corrupt file would fail every run)."""
    images, _, _ = data
    folder = tmp_path / "good"
    folder.mkdir()
    for path in images.iterdir():
        if path.name != "ISIC_0000009.jpg":
            (folder / path.name).write_bytes(path.read_bytes())
    return folder


def test_a_second_run_skips_the_masks_written_whole_and_scores_all_of_them(checkpoint, data, tmp_path, capsys):
    images, truth, sizes = good_images(data, tmp_path), data[1], data[2]
    full, out = tmp_path / "full", tmp_path / "out"
    assert run_main(["--checkpoint", checkpoint, "--input", images, "--masks", truth, "--output", full]) == 0
    reference = json.loads((full / "metrics.json").read_text())
    # an interrupted run: two masks whole, one left as the hidden part file a stop mid-write leaves
    first = predict.run(predict.PredictConfig(checkpoint=[str(checkpoint)], input=str(images), output=str(out)))
    kept = sorted(out.glob("*_segmentation.png"))
    for path in kept[2:]:
        path.unlink()
    (out / f".{kept[2].stem}.4242.tmp.png").write_bytes(b"half a png")
    inodes = {path.name: path.stat().st_ino for path in kept[:2]}
    capsys.readouterr()

    again = predict.run(predict.PredictConfig(checkpoint=[str(checkpoint)], input=str(images), masks=str(truth),
                                              output=str(out)))
    assert "2 of the 5 images were segmented into" in capsys.readouterr().out
    assert sorted(p.name for p in again.skipped) == sorted(inodes) and len(again.written) == 3
    assert {path.name: path.stat().st_ino for path in kept[:2]} == inodes  # never rewritten
    assert set(read_masks(out)) == set(sizes) and first.total == 5
    for name, mask in read_masks(full).items():
        np.testing.assert_array_equal(read_masks(out)[name], mask)
    # the skipped masks are scored from the files: the whole folder's scores, as one uninterrupted run's
    assert json.loads((out / "metrics.json").read_text()) == reference
    assert len((out / "metrics.csv").read_text().splitlines()) == 6


def test_parts_of_a_folder_fill_one_output_and_a_last_run_scores_it(checkpoint, data, tmp_path, capsys):
    images, truth = good_images(data, tmp_path), data[1]
    out = tmp_path / "out"
    parts = []
    for part in (1, 2, 3):
        result = predict.run(predict.PredictConfig(checkpoint=[str(checkpoint)], input=str(images), masks=str(truth),
                                                   output=str(out), parts=3, part=part))
        parts.append(sorted(p.name for p in result.written))
    assert [len(names) for names in parts] == [1, 2, 2]  # 5 images in three nearly equal slices
    assert sorted(sum(parts, [])) == sorted(p.name for p in out.glob("*_segmentation.png"))
    assert not (out / "metrics.json").exists()  # a part's scores are not the folder's
    assert "part 3 of 3 only" in capsys.readouterr().out
    last = predict.run(predict.PredictConfig(checkpoint=[str(checkpoint)], input=str(images), masks=str(truth),
                                             output=str(out)))
    assert last.written == [] and len(last.skipped) == 5 and len(last.per_image) == 5
    assert json.loads((out / "metrics.json").read_text())["dice"] == pytest.approx(last.metrics["dice"])


def test_an_output_folder_of_another_checkpoint_or_threshold_is_refused(checkpoint, data, tmp_path, capsys):
    images = good_images(data, tmp_path)
    out = tmp_path / "out"
    assert run_main(["--checkpoint", checkpoint, "--input", images, "--output", out]) == 0
    other = save_checkpoint(tmp_path / "other" / "best.pt", seed=1)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert run_main(["--checkpoint", other, "--input", images, "--output", out]) == 2
    err = capsys.readouterr().err
    assert f"{out} holds masks written with another checkpoint ({checkpoint}" in err and "--overwrite" in err, err
    assert run_main(["--checkpoint", checkpoint, "--input", images, "--output", out, "--threshold", "0.3"]) == 2
    assert "--threshold 0.5 (here 0.3)" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing touched
    # --overwrite takes the folder over: every mask again, the record now the other checkpoint's
    assert run_main(["--checkpoint", other, "--input", images, "--output", out, "--overwrite"]) == 0
    assert json.loads((out / "predictions.json").read_text())["checkpoints"][0]["path"] == str(other)
    # masks with no record of their checkpoint (another tool's) are not mixed in either
    (out / "predictions.json").unlink()
    assert run_main(["--checkpoint", checkpoint, "--input", images, "--output", out]) == 2
    assert "holds 5 masks (e.g. ISIC_0000001_segmentation.png) but no predictions.json" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--parts", "3", "--part", "4"], "--part must be between 1 and --parts (3), got 4"),
    (["--parts", "3", "--part", "0"], "--part must be between 1 and --parts (3), got 0"),
    (["--parts", "0"], "--parts must be at least 1, got 0"),
])
def test_a_part_outside_the_parts_is_refused(flags, message, capsys):
    assert run_main(flags) == 2
    assert message in capsys.readouterr().err


def test_more_parts_than_images_is_a_clear_error(checkpoint, data, tmp_path, capsys):
    images = good_images(data, tmp_path)
    assert run_main(["--checkpoint", checkpoint, "--input", images, "--output", tmp_path / "o", "--parts", "6",
                     "--part", "6"]) == 2
    assert "--parts 6 is more than the 5 images to segment; use at most 5 parts" in capsys.readouterr().err


def test_a_signal_stops_prediction_with_whole_masks_and_one_line(checkpoint, data, tmp_path, monkeypatch, capsys):
    """SLURM's USR1 mid-folder: the masks in flight are finished, none is left half written."""
    import signal

    images = good_images(data, tmp_path)
    out = tmp_path / "out"
    finish = predict.Segmenter.finish
    calls = []

    def finish_then_signal(self, entry, prob):
        finish(self, entry, prob)
        calls.append(entry.item.id)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(predict.Segmenter, "finish", finish_then_signal)
    status = run_main(["--checkpoint", checkpoint, "--input", images, "--output", out, "--batch-size", 1,
                       "--workers", 2])
    assert status == 128 + signal.SIGUSR1
    assert "stopped by SIGUSR1; every mask written so far is whole" in capsys.readouterr().out
    assert sorted(read_masks(out)) == sorted(calls) and len(calls) == 2
    assert not list(out.glob(".*.tmp.*"))
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the handler is gone with the run


def test_out_of_device_memory_is_one_line_that_says_what_to_lower(monkeypatch, capsys, tmp_path):
    def run_out(config):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB")

    monkeypatch.setattr(predict, "run", run_out)
    assert run_main(["--input", tmp_path, "--batch-size", 32]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out of device memory even at one image a forward pass" in err


def test_worst_draws_the_images_of_lowest_jaccard_worst_first(checkpoint, data, tmp_path, capsys):
    images, truth, _ = data
    good = good_images(data, tmp_path)
    out = tmp_path / "out"
    assert run_main(["--checkpoint", checkpoint, "--input", good, "--masks", truth, "--output", out, "--worst", 2]) == 0
    printed = re.search(r"Wrote worst.png: the 2 images of lowest Jaccard, worst first: (\S+), (\S+)$",
                        capsys.readouterr().out, re.M)
    rows = sorted(csv.DictReader(open(out / "metrics.csv")), key=lambda r: (float(r["jaccard"]), r["image_id"]))
    assert printed and list(printed.groups()) == [rows[0]["image_id"], rows[1]["image_id"]]
    with Image.open(out / "worst.png") as figure:
        assert figure.size == (900, 600)  # two rows of image, ground truth and prediction
    assert run_main(["--checkpoint", checkpoint, "--input", good, "--output", tmp_path / "plain", "--worst", 2]) == 0
    assert "--worst draws nothing here: it needs ground truth" in capsys.readouterr().out


def test_out_of_device_memory_halves_the_forward_passes_and_goes_on(checkpoint, data, tmp_path, monkeypatch, capsys):
    """A card that holds two images a pass, asked for eight: the batch runs again in passes of two, and the masks
    are those of an unhindered run."""
    good = good_images(data, tmp_path)
    assert run_main(["--checkpoint", checkpoint, "--input", good, "--output", tmp_path / "whole", "--batch-size", 8]) == 0
    real = predict.predict_probabilities
    passes = []

    def small_card(model, images, *args, **kwargs):
        passes.append(len(images))
        if len(images) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
        return real(model, images, *args, **kwargs)

    monkeypatch.setattr(predict, "predict_probabilities", small_card)
    capsys.readouterr()
    assert run_main(["--checkpoint", checkpoint, "--input", good, "--output", tmp_path / "halved", "--batch-size", 8]) == 0
    err = capsys.readouterr().err
    assert err.count("out of device memory: going on with") == 1 and "with 2 image(s) a forward pass" in err
    assert max(passes[passes.index(2):]) == 2  # once halved, it stays halved
    whole, halved = read_masks(tmp_path / "whole"), read_masks(tmp_path / "halved")
    assert whole.keys() == halved.keys() and all(np.array_equal(whole[k], halved[k]) for k in whole)


def test_the_shipped_weights_match_their_sha256_stay_small_and_segment_a_lesion(tmp_path, capsys):
    """weights/ holds the trained model that predict.py uses without --checkpoint: the file is the one its
    SHA256SUMS names, at most 7 MB, and it finds a drawn lesion through predict.py's own pipeline."""
    folder = Path(predict.__file__).resolve().parent / "weights"
    sums = {name: digest for digest, name in (line.split() for line in (folder / "SHA256SUMS").read_text().splitlines())}
    assert predict.SHIPPED_WEIGHTS.name in sums and predict.SHIPPED_WEIGHTS.stat().st_size <= 7_000_000
    assert hashlib.sha256(predict.SHIPPED_WEIGHTS.read_bytes()).hexdigest() == sums[predict.SHIPPED_WEIGHTS.name]
    images, truth = tmp_path / "images", tmp_path / "truth"
    images.mkdir(), truth.mkdir()
    for number in range(3):  # a dark ellipse on skin colour, the shape every ISIC mask has
        image, mask = lesion_image(np.random.default_rng(number), 300, 400)
        Image.fromarray(image).save(images / f"ISIC_{number:07d}.jpg", quality=95)
        Image.fromarray(mask * 255).save(truth / f"ISIC_{number:07d}_segmentation.png")
    assert run_main(["--runs-dir", tmp_path / "no-runs", "--input", images, "--masks", truth,
                     "--output", tmp_path / "out"]) == 0
    assert "shipped weights" in capsys.readouterr().out.splitlines()[0]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["dice"] > 0.8 and metrics["failures"] == 0


def test_a_model_trained_on_colour_constant_images_sees_its_input_so(data, tmp_path):
    import dataset

    images, _, _ = data
    plain = predict.load_model(save_checkpoint(tmp_path / "a" / "best.pt"), torch.device("cpu"))
    constant = predict.load_model(save_checkpoint(tmp_path / "b" / "best.pt", train_config={"shades_of_gray": True}),
                                  torch.device("cpu"))
    assert not plain.shades_of_gray and constant.shades_of_gray
    path = images / "ISIC_0000001.jpg"
    item = predict.Item("ISIC_0000001", path)
    seen = predict.ImageFiles([item], IMAGE_SIZE, False, constant.shades_of_gray)[0].small
    np.testing.assert_array_equal(seen, dataset.shades_of_gray(dataset.network_image(path, IMAGE_SIZE)[0]))
    assert not np.array_equal(seen, predict.ImageFiles([item], IMAGE_SIZE, False)[0].small)
    with pytest.raises(predict.PredictError, match="--shades-of-gray"):
        predict.load_ensemble([tmp_path / "a" / "best.pt", tmp_path / "b" / "best.pt"], torch.device("cpu"))


def test_each_split_and_an_ensemble_get_an_output_folder_of_their_own(tmp_path):
    runs = tmp_path / "runs"
    one, other = runs / "a" / "best.pt", runs / "b" / "best.pt"
    assert predict.default_output([one], str(runs)) == runs / "a" / "predictions"
    assert predict.default_output([one], str(runs), "val") == runs / "a" / "predictions-val"
    assert predict.default_output([one, other], str(runs), "val") == Path("predict_out-val")
    assert predict.default_output([tmp_path / "elsewhere.pt"], str(runs)) == Path("predict_out")
