"""K-fold cross-validation: folds that cover the pool once, crossval.py's summary, fold ensembles in predict.py."""

import csv
import json
from pathlib import Path

import pytest
import torch

import checkpoint
import crossval
import dataset
import predict
import train
import utils
from conftest import write_isic_folder


def samples(tmp_path, n):
    return [dataset.Sample(f"ISIC_{i:07d}", tmp_path / f"{i}.jpg", tmp_path / f"{i}.png") for i in range(n)]


@pytest.mark.parametrize("k", [2, 5])
def test_folds_cover_the_pool_exactly_once_and_share_the_test_split(tmp_path, k):
    pool = samples(tmp_path, 200)
    splits = [dataset.split_samples({"train": pool}, 0.1, 0.1, seed=0, folds=k, fold=i)[0] for i in range(k)]
    test = {s.id for s in splits[0]["test"]}
    assert test and all({s.id for s in sp["test"]} == test for sp in splits)
    validated = [s.id for sp in splits for s in sp["val"]]
    assert sorted(validated) == sorted(s.id for s in pool if s.id not in test)  # every pool image once
    for sp in splits:
        assert not {s.id for s in sp["train"]} & ({s.id for s in sp["val"]} | test)
        assert abs(len(sp["val"]) - len(validated) / k) < 4 * (len(validated) / k) ** 0.5


def test_folds_are_stable_when_images_are_added(tmp_path):
    pool = samples(tmp_path, 300)
    before = dataset.split_samples({"train": pool[:150]}, 0.1, 0.1, seed=0, folds=5, fold=2)[0]
    after = dataset.split_samples({"train": pool}, 0.1, 0.1, seed=0, folds=5, fold=2)[0]
    assert {s.id for s in before["val"]} <= {s.id for s in after["val"]}


@pytest.mark.parametrize("folds, fold", [(1, 0), (3, 3), (-2, 0)])
def test_bad_fold_settings_are_refused(tmp_path, folds, fold, capsys):
    with pytest.raises(ValueError, match="folds must be 0"):
        dataset.split_samples({"train": samples(tmp_path, 10)}, 0.1, 0.1, 0, folds=folds, fold=fold)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--folds", str(folds), "--fold", str(fold)])
    assert exit_info.value.code == 2
    assert "--fold" in capsys.readouterr().err


def tiny_fold_args(root, out, fold, *extra):
    return ["--data-dir", str(root), "--out-dir", str(out), "--image-size", "32", "--base-channels", "4",
            "--batch-size", "4", "--device", "cpu", "--wandb", "disabled", "--no-progress", "--num-preview", "1",
            "--test-fraction", "0.2", "--folds", "3", "--fold", str(fold), "--epochs", "1", "--name",
            f"cv-fold{fold}", *extra]


@pytest.fixture(scope="module")
def three_folds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cv")
    root = write_isic_folder(tmp / "isic", n=30)
    for fold in range(3):
        train.main(tiny_fold_args(root, tmp / "runs", fold))
    return tmp


def test_crossval_summary_pools_every_non_test_image_once(three_folds):
    runs = sorted((three_folds / "runs").glob("cv-fold*"))
    summary = crossval.main([str(r) for r in runs])
    stored = [json.loads((r / "splits.json").read_text()) for r in runs]
    pool = {i for s in stored for i in s["val"]}
    assert len(pool) == sum(len(s["val"]) for s in stored) == 30 - len(stored[0]["test"])
    assert summary["out_of_fold_images"] == len(pool) and summary["complete"]
    assert [r["fold"] for r in summary["per_fold"]] == [0, 1, 2]
    values = [r["val_dice"] for r in summary["per_fold"]]
    assert summary["val_dice_mean"] == pytest.approx(sum(values) / 3)
    per_image = [row for r in runs for row in
                 csv.DictReader(open(r / "out-of-fold" / "metrics.csv"))]
    assert summary["out_of_fold_dice"] == pytest.approx(sum(float(x["dice"]) for x in per_image) / len(per_image))
    assert (three_folds / "runs" / "crossval.md").read_text().count("\n| ") >= 4


def test_crossval_refuses_two_runs_of_the_same_fold(three_folds, capsys):
    run = three_folds / "runs" / "cv-fold0"
    with pytest.raises(SystemExit) as exit_info:
        crossval.main([str(run), str(run)])
    assert exit_info.value.code == 2
    assert "are both fold 0" in capsys.readouterr().err


def test_fold_ensemble_averages_probabilities_on_the_shared_test_split(three_folds, tmp_path):
    checkpoints = [str(p) for p in sorted((three_folds / "runs").glob("cv-fold*/best.pt"))]
    result = predict.main(["--checkpoint", *checkpoints, "--output", str(tmp_path / "ens"), "--device", "cpu",
                           "--tta", "--postprocess"])
    test_ids = json.loads((three_folds / "runs" / "cv-fold0" / "splits.json").read_text())["test"]
    assert sorted(r["image_id"] for r in result.per_image) == sorted(test_ids)

    members = [predict.load_model(c, torch.device("cpu")) for c in checkpoints]
    ensemble = predict.load_ensemble([predict.Path(c) for c in checkpoints], torch.device("cpu"))
    raw = torch.rand(2, 3, 32, 32)
    x = (raw - torch.tensor(members[0].mean).view(1, 3, 1, 1)) / torch.tensor(members[0].std).view(1, 3, 1, 1)
    expected = torch.stack([m.model((raw - torch.tensor(m.mean).view(1, 3, 1, 1)) / torch.tensor(m.std).view(1, 3, 1, 1))
                            .sigmoid() for m in members]).mean(0)
    with torch.no_grad():
        torch.testing.assert_close(ensemble.model(x).sigmoid(), expected.detach(), atol=1e-5, rtol=1e-4)


def test_ensemble_of_different_image_sizes_is_refused(three_folds, tmp_path, capsys):
    root = three_folds / "isic"
    train.main(tiny_fold_args(root, tmp_path, 0, "--image-size", "48"))
    other = tmp_path / "cv-fold0" / "best.pt"
    assert checkpoint.load_checkpoint(other)["image_size"] == 48
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--checkpoint", str(three_folds / "runs" / "cv-fold0" / "best.pt"), str(other),
                      "--output", str(tmp_path / "o"), "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "48px" in capsys.readouterr().err


def test_the_fold_sweep_file_gives_each_fold_once_as_valid_train_flags():
    lines = (Path(__file__).resolve().parents[1] / "slurm" / "folds5.txt").read_text().splitlines()
    folds = []
    for line in lines:
        config, _, _ = utils.parse_config(train.TrainConfig, line.split(), "", train.GROUPS, train.CHOICES)
        assert not train.check_config(config) and config.folds == 5
        folds.append(config.fold)
    assert folds == [0, 1, 2, 3, 4]
