"""study.py: the recipe study's run list, its table, the official scorer's cross-check and the figure."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import study
from conftest import write_isic_folder


def test_run_flags_lay_over_the_budget():
    assert study.flags_of("short", "default") == ["--image-size", "128", "--epochs", "6", "--batch-size", "16"]
    flags = study.flags_of("short", "batch-8")
    assert flags[flags.index("--batch-size") + 1] == "8" and flags.count("--batch-size") == 1
    flags = study.flags_of("long", "dynunet")
    assert flags[flags.index("--arch") + 1] == "dynunet" and flags[flags.index("--epochs") + 1] == "15"
    assert study.flags_of("min10", "train-on-val-seed-1") == ["--minutes", "10", "--image-size", "96", "--batch-size",
                                                               "16", "--train-on-val", "--seed", "1"]  # a switch
    for name in study.RUNS:  # every run is a valid train.py command
        import train
        config, _, _ = train.utils.parse_config(train.TrainConfig, study.flags_of("short", name), "", train.GROUPS,
                                                train.CHOICES)
        assert not train.check_config(config), name


def test_time_to_reach_and_speed_against_the_baseline(tmp_path):
    curves = tmp_path / "curves"
    curves.mkdir()
    for name, dice in (("dynunet", [0.6, 0.7, 0.8]), ("default", [0.75, 0.82, 0.85])):
        with open(curves / f"short-{name}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["epoch", "val_dice", "seconds"])
            writer.writeheader()
            writer.writerows({"epoch": i + 1, "val_dice": d, "seconds": 60} for i, d in enumerate(dice))
    rows = [{"budget": "short", "name": "dynunet"}, {"budget": "short", "name": "default"}]
    assert study.time_to_reach(study.read_rows(curves / "short-default.csv"), 0.8) == pytest.approx(2.0)
    assert study.time_to_reach(study.read_rows(curves / "short-default.csv"), 0.9) is None
    assert study.speed_against_baseline(rows, curves, "short") == [("default", pytest.approx(2.0), pytest.approx(2 / 3))]


@pytest.mark.slow
def test_study_runs_trains_scores_and_reports(tmp_path, monkeypatch):
    root = write_isic_folder(tmp_path / "isic", n=24)
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "results" / "recipes.csv"
    tiny = "--image-size 32 --base-channels 4 --batch-size 4 --epochs 1 --device cpu --val-fraction 0.25 --test-fraction 0.25"
    study.main(["--data-dir", str(root), "--budget", "screen", "--only", "default", "dynunet", "--results", str(results),
                "--out-dir", str(tmp_path / "runs"), "--figure", str(tmp_path / "fig.png"), "--train-flags", tiny])
    rows = study.read_rows(results)
    assert [r["name"] for r in rows] == ["default", "dynunet"]
    for row in rows:
        assert 0 <= float(row["test_dice"]) <= 1 and 0 <= float(row["val_dice"]) <= 1
        curve = study.read_rows(tmp_path / "results" / "curves" / f"screen-{row['name']}.csv")
        seconds = sum(float(c["seconds"]) for c in curve)
        assert seconds > 0 and float(row["train_minutes"]) == pytest.approx(seconds / 60, abs=0.006)
        assert row["machine"] and row["date"]
        if shutil.which("isic-challenge-scoring"):  # the challenge's scorer agrees with predict.py's metrics
            assert float(row["official_test_dice"]) == pytest.approx(float(row["test_dice"]), abs=1e-4)
            assert float(row["official_test_threshold_jaccard"]) == pytest.approx(
                float(row["test_threshold_jaccard"]), abs=1e-4)
    assert (tmp_path / "fig.png").stat().st_size > 10_000
    assert (tmp_path / "results" / "curves" / "screen-default.csv").is_file()
    assert "| screen | `dynunet` |" in (tmp_path / "results" / "recipes.md").read_text()
    for row in rows:  # validation and test split, each plain and with --tta, at the original size
        for column in ("val_dice_predict", "val_dice_tta", "test_dice_tta", "test_threshold_jaccard_tta",
                       "val_failure_share", "test_failure_share_tta"):  # failures: the share under Jaccard 0.65
            assert 0 <= float(row[column]) <= 1, column
    assert "`--tta`: test failures" in (tmp_path / "results" / "recipes.md").read_text()
    # --rescore fills the prediction columns again from the run folders, without training
    scored = {r["name"]: dict(r) for r in rows}
    study.write_rows(results, [{**r, "test_dice_tta": "", "val_dice_tta": ""} for r in rows])
    study.main(["--budget", "screen", "--only", "dynunet", "--rescore", "--results", str(results),
                "--out-dir", str(tmp_path / "runs"), "--figure", str(tmp_path / "fig.png")])
    again = {r["name"]: r for r in study.read_rows(results)}
    assert again["dynunet"]["test_dice_tta"] == scored["dynunet"]["test_dice_tta"]
    assert again["dynunet"]["val_dice_tta"] == scored["dynunet"]["val_dice_tta"]
    assert again["default"]["test_dice_tta"] == ""  # not named by --only
    assert again["default"]["train_minutes"] == scored["default"]["train_minutes"]
    # a second call skips the runs already in the table
    study.main(["--data-dir", str(root), "--budget", "screen", "--only", "default", "--results", str(results),
                "--out-dir", str(tmp_path / "runs"), "--figure", str(tmp_path / "fig.png"), "--train-flags", tiny])
    assert len(study.read_rows(results)) == 2
    # --ensemble 2 scores the two runs averaged, without training: a row of its own, the runs' minutes summed
    study.main(["--budget", "screen", "--only", "default", "dynunet", "--ensemble", "2", "--results", str(results),
                "--out-dir", str(tmp_path / "runs")])
    ensemble = next(r for r in study.read_rows(results) if r["budget"] == "screenx2")
    assert ensemble["name"] == "default+dynunet" and study.recipe_of(ensemble["name"]) == "default"
    assert float(ensemble["train_minutes"]) == pytest.approx(
        float(scored["default"]["train_minutes"]) + float(scored["dynunet"]["train_minutes"]), abs=0.02)
    for column in ("val_dice_tta", "test_dice_tta", "test_threshold_jaccard_tta", "test_failure_share_tta"):
        assert 0 <= float(ensemble[column]) <= 1, column
    record = json.loads((tmp_path / "runs" / "screenx2-default+dynunet" / "test_tta" / "predictions.json").read_text())
    assert len(record["checkpoints"]) == 2
    with pytest.raises(SystemExit, match="groups of 2"):
        study.main(["--budget", "screen", "--only", "default", "--ensemble", "2", "--results", str(results)])


def test_the_budget_table_reports_the_recipe_its_first_run_chose_over_all_its_seeds():
    def row(name, val, test, budget="min10"):
        return {"budget": budget, "name": name, "val_dice": str(val), "test_dice_tta": str(test),
                "test_threshold_jaccard_tta": str(test - 0.1)}
    rows = [row("size-96", 0.880, 0.890), row("size-64", 0.879, 0.894), row("ema-0.99", 0.8795, 0.889),
            row("size-96-seed-1", 0.870, 0.895), row("size-96-seed-2", 0.872, 0.900),  # seeds repeat the winner
            row("size-64", 0.879, 0.891, "min5"), row("size-96", 0.870, 0.872, "min5")]
    chosen = study.choose_per_budget(rows)
    assert chosen["min10"][0] == "size-96" and len(chosen["min10"][1]) == 3
    assert chosen["min5"][0] == "size-64" and "min30" not in chosen
    table = study.budget_table(rows).splitlines()
    assert table[2] == ("| 5 min | `python train.py --data-dir DATA --minutes 5 --image-size 64` | 1 | 0.879 | "
                        "0.891 | 0.791 |")
    assert table[3] == ("| 10 min | `python train.py --data-dir DATA --minutes 10 --image-size 96` | 3 | 0.874 | "
                        "0.895 (0.890-0.900) | 0.795 |")


def test_a_tie_in_validation_dice_goes_to_the_recipe_with_fewer_failed_images():
    def row(name, val, failures):
        return {"budget": "min10", "name": name, "val_dice": str(val), "val_failure_share": failures}
    # within DICE_TIE of the best: the fewer failures win, although the Dice is a little lower
    chosen = study.choose_per_budget([row("size-96", 0.9004, "0.1"), row("lovasz", 0.8998, "0.07")])
    assert chosen["min10"][0] == "lovasz"
    # a clear lead in Dice stands, whatever the failures
    chosen = study.choose_per_budget([row("size-96", 0.9040, "0.1"), row("lovasz", 0.8998, "0.07")])
    assert chosen["min10"][0] == "size-96"
    # runs recorded before the failures were counted are compared by Dice alone
    chosen = study.choose_per_budget([row("size-96", 0.9004, ""), row("lovasz", 0.8998, "0.07")])
    assert chosen["min10"][0] == "size-96"


def test_the_failure_table_averages_each_recipe_over_its_seeds():
    def row(name, val, fail, budget="min10"):
        return {"budget": budget, "name": name, "val_dice_tta": str(val), "val_threshold_jaccard_tta": "0.78",
                "val_failure_share_tta": str(fail), "test_dice_tta": "0.9", "test_threshold_jaccard_tta": "0.8",
                "test_failure_share_tta": str(fail)}
    rows = [row("size-96", 0.89, 0.11), row("lovasz", 0.893, 0.09), row("lovasz-seed-1", 0.891, 0.07),
            row("size-96+size-96-seed-1", 0.895, 0.06, "min5x2"),
            {**row("train-on-val", 0.95, 0.01), "flags": "--minutes 10 --train-on-val"}]
    table = study.failure_table(rows).splitlines()
    assert table[2] == "| min10 | `size-96` | 1 | 0.8900 | 0.7800 | 11.0% | 0.9000 | 0.8000 | 11.0% |"
    assert table[3] == ("| min10 | `lovasz` | 2 | 0.8920 (0.8910-0.8930) | 0.7800 (0.7800-0.7800) | 8.0% (7.0%-9.0%) | "
                        "0.9000 (0.9000-0.9000) | 0.8000 (0.8000-0.8000) | 8.0% (7.0%-9.0%) |")
    assert table[4].startswith("| min5x2 | `size-96` | 1 | 0.8950 |")  # an ensemble of two runs: its first run's recipe
    assert table[5].startswith("| min10 | `train-on-val` | 1 | - | - | - | 0.9000 |")  # validation was trained on


def test_a_paired_difference_and_its_interval_over_images():
    rng = np.random.default_rng(0)
    a = {f"ISIC_{i:07d}": float(v) for i, v in enumerate(rng.uniform(0.6, 0.95, 200))}
    shifted = study.paired_difference(a, {i: v + 0.01 for i, v in a.items()})
    assert shifted["difference"] == pytest.approx(0.01)
    assert shifted["low"] == pytest.approx(0.01) and shifted["high"] == pytest.approx(0.01)  # every image moved alike
    assert (shifted["better"], shifted["worse"], shifted["images"]) == (200, 0, 200)
    noisy = {i: v + rng.normal(0.002, 0.02) for i, v in a.items()}
    ours = study.paired_difference(a, noisy)
    stats = pytest.importorskip("scipy.stats")
    diff = np.array([noisy[i] - a[i] for i in sorted(a)])
    theirs = stats.bootstrap((diff,), np.mean, confidence_level=0.95, method="percentile", n_resamples=10_000,
                             random_state=1).confidence_interval
    assert ours["low"] == pytest.approx(theirs.low, abs=6e-4) and ours["high"] == pytest.approx(theirs.high, abs=6e-4)
    assert ours["low"] < ours["difference"] < ours["high"]
    with pytest.raises(ValueError, match="different images"):
        study.paired_difference(a, {"ISIC_9999999": 0.5})


def write_scores(runs: Path, name: str, split: str, dice: dict[str, float]) -> None:
    """A min10 run's <split>_tta/metrics.csv as --scores tta leaves it, for the given per-image Dice (the Jaccard
    column is not read; the thresholded Jaccard is the Dice, or 0 under 0.65)."""
    folder = runs / f"min10-{name}" / f"{split}_tta"
    folder.mkdir(parents=True)
    with open(folder / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image_id", "dice", "threshold_jaccard"])
        writer.writeheader()
        writer.writerows({"image_id": i, "dice": d, "threshold_jaccard": d if d >= 0.65 else 0} for i, d in dice.items())


def test_compare_averages_each_recipes_seeds_per_image(tmp_path, capsys):
    def scored(name, split, dice):
        write_scores(tmp_path / "runs", name, split, {f"ISIC_{i:07d}": d for i, d in enumerate(dice)})

    for split in ("val", "test"):
        scored("size-96", split, [0.8, 0.6, 0.9])
        scored("size-96-seed-1", split, [0.8, 0.7, 0.9])  # the recipe's two seeds average to 0.8, 0.65, 0.9
        scored("lovasz", split, [0.82, 0.66, 0.9])
    study.main(["--budget", "min10", "--out-dir", str(tmp_path / "runs"), "--compare", "size-96", "lovasz"])
    out = capsys.readouterr().out
    assert "lovasz against size-96 (1 and 2 runs" in out
    assert "| val | dice | 3 | +0.0100 |" in out and "| 2 / 0 |" in out
    # thresholded Jaccard: the second image is 0.35 on average for size-96 (0.6 counts as 0, then 0.7) and 0.66
    # for lovasz, so the differences are 0.02, 0.31 and 0
    assert "| test | threshold_jaccard | 3 | +0.1100 |" in out
    with pytest.raises(SystemExit, match="no finished min10 run of deep-sup"):
        study.main(["--budget", "min10", "--out-dir", str(tmp_path / "runs"), "--compare", "size-96", "deep-sup"])


def test_compare_says_what_it_cannot_compare(tmp_path):
    runs = ["--budget", "min10", "--out-dir", str(tmp_path / "runs")]
    with pytest.raises(SystemExit, match="--compare size96: no such recipe"):
        study.main([*runs, "--compare", "size96", "lovasz"])
    for name in ("size-96", "lovasz"):
        (tmp_path / "runs" / f"min10-{name}").mkdir(parents=True)
    with pytest.raises(SystemExit, match="val_tta/metrics.csv is missing: the run is unfinished or unscored"):
        study.main([*runs, "--compare", "size-96", "lovasz"])


def test_compare_pools_the_folds_validation_images_out_of_fold(tmp_path, capsys):
    def scored(name, split, dice):
        write_scores(tmp_path / "runs", name, split, dice)

    assert study.recipe_of("cv5-deep-sup-lovasz-fold-3") == "cv5-deep-sup-lovasz"
    assert study.flags_of("min10", "cv5-size-96-fold-3")[-4:] == ["--folds", "5", "--fold", "3"]
    for fold in range(study.CV_FOLDS):  # each fold validates its own image; all share the test images
        scored(f"cv5-size-96-fold-{fold}", "val", {f"ISIC_{fold:07d}": 0.8})
        scored(f"cv5-deep-sup-lovasz-fold-{fold}", "val", {f"ISIC_{fold:07d}": 0.8 + 0.01 * fold})
        scored(f"cv5-size-96-fold-{fold}", "test", {"ISIC_0000100": 0.9, "ISIC_0000101": 0.7})
        scored(f"cv5-deep-sup-lovasz-fold-{fold}", "test", {"ISIC_0000100": 0.9, "ISIC_0000101": 0.7 + 0.01 * fold})
    study.main(["--budget", "min10", "--out-dir", str(tmp_path / "runs"), "--compare", "cv5-size-96",
                "cv5-deep-sup-lovasz"])
    out = capsys.readouterr().out
    assert "| val | dice | 5 | +0.0200 |" in out  # the pool of five images, one from each fold: 0, .01, .02, .03, .04
    assert "| test | dice | 2 | +0.0100 |" in out  # the test images, each averaged over the five folds: 0 and .02
