"""The recipe study: train.py settings compared on real ISIC images and scored on the held-out test split.

    python study.py --data-dir data/ISIC2018 --budget short             # every short-budget run not yet in the table
    python study.py --data-dir data/ISIC2018 --budget short --only default dynunet
    python study.py --report                                             # table, speed ratio and figure from results/

Each run is `python train.py <budget flags> <its flags>` followed by `python predict.py` on the run's
stored validation and test splits (with and without flip TTA, and with --postprocess; see PREDICTIONS);
`--rescore` repeats only the predictions. One row per run goes to results/recipes.csv, its
per-epoch metrics to results/curves/, and images/recipes_time_to_dice.png draws validation Dice against
training minutes. Choose recipes on the validation columns only: the test columns are for the final figure.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import dataset
import devices
import utils

HERE = Path(__file__).resolve().parent

# Budgets: what a student on a 2-core CPU or a busy queue can afford (about 10 minutes here), runs
# 2.5 and 5 times as long, and a screen of a third of the short budget for one-factor comparisons.
BUDGETS = {
    "short": ["--image-size", "128", "--epochs", "6", "--batch-size", "16"],
    "long": ["--image-size", "128", "--epochs", "15", "--batch-size", "16"],
    "long30": ["--image-size", "128", "--epochs", "30", "--batch-size", "16"],
    "screen": ["--image-size", "128", "--epochs", "2", "--batch-size", "16"],
    # Wall-clock budgets (train.py --minutes): the steps and the schedule fitted to N minutes of training
    # and validation on the machine at hand. Report them apart: python study.py --budget min10 --table budgets
    "min5": ["--minutes", "5", "--image-size", "96", "--batch-size", "16"],
    "min10": ["--minutes", "10", "--image-size", "96", "--batch-size", "16"],
    "min30": ["--minutes", "30", "--image-size", "96", "--batch-size", "16"],
}

# The DynUNet baseline: a short MONAI script's recipe (instance norm, no deep supervision, no dropout,
# flips only, Dice loss, the paper's Adam 5e-4 x0.985 per epoch).
PEER_RECIPE = ["--norm", "instance", "--dropout", "0", "--augment", "flips", "--loss", "dice", "--lr", "5e-4",
               "--schedule", "paper", "--warmup-epochs", "0"]

# name -> train.py flags laid over the budget's; each varies one setting of the default recipe
RUNS = {
    "default": [],
    "paper": ["--recipe", "paper"],
    "paper-batchnorm": ["--recipe", "paper", "--norm", "batch"],
    "dynunet": ["--arch", "dynunet", *PEER_RECIPE],
    "peer-recipe": PEER_RECIPE,
    "norm-batch": ["--norm", "batch"],
    "dropout-0.3": ["--dropout", "0.3"],
    "augment-none": ["--augment", "none"],
    "augment-light": ["--augment", "light"],
    "augment-full": ["--augment", "full"],
    "augment-full-seed-1": ["--augment", "full", "--seed", "1"],
    "augment-full-seed-2": ["--augment", "full", "--seed", "2"],
    "size-128-augment-full": ["--image-size", "128", "--augment", "full"],
    "loss-dice": ["--loss", "dice"],
    "lr-5e-4": ["--lr", "5e-4"],
    "lr-1e-3": ["--lr", "1e-3"],
    "lr-4e-3": ["--lr", "4e-3"],
    "schedule-paper": ["--schedule", "paper", "--lr", "5e-4", "--warmup-epochs", "0"],
    "batch-8": ["--batch-size", "8"],
    "size-96": ["--image-size", "96"],
    "size-192": ["--image-size", "192"],
    # the default again with other weights, shuffling and augmentation (same split): how far a result is luck
    "seed-1": ["--seed", "1"],
    "seed-2": ["--seed", "2"],
    "size-96-seed-1": ["--image-size", "96", "--seed", "1"],
    "size-96-seed-2": ["--image-size", "96", "--seed", "2"],
    # three more seeds of the short default, to pair into two-run ensembles (study.py --ensemble)
    "size-96-seed-3": ["--image-size", "96", "--seed", "3"],
    "size-96-seed-4": ["--image-size", "96", "--seed", "4"],
    "size-96-seed-5": ["--image-size", "96", "--seed", "5"],
    "size-64": ["--image-size", "64"],
    "size-64-seed-1": ["--image-size", "64", "--seed", "1"],
    "size-64-seed-2": ["--image-size", "64", "--seed", "2"],
    "size-128": ["--image-size", "128"],
    "size-128-seed-1": ["--image-size", "128", "--seed", "1"],
    "size-128-seed-2": ["--image-size", "128", "--seed", "2"],
    "size-160": ["--image-size", "160"],
    "size-160-seed-1": ["--image-size", "160", "--seed", "1"],
    "size-160-seed-2": ["--image-size", "160", "--seed", "2"],
    # an exponential moving average of the weights, validated and saved instead of them
    "ema-0.99": ["--ema", "0.99"],
    # aimed at the failed images (Jaccard under 0.65): a Lovasz hinge term, a surrogate of the Jaccard itself
    "lovasz": ["--loss", "dice+bce+lovasz"],
    "lovasz-seed-1": ["--loss", "dice+bce+lovasz", "--seed", "1"],
    "lovasz-seed-2": ["--loss", "dice+bce+lovasz", "--seed", "2"],
    # the cross-entropy term weighed twice (the Dice-only loss was worse than the default in the screen)
    "bce-2": ["--bce-weight", "2"],
    "bce-2-seed-1": ["--bce-weight", "2", "--seed", "1"],
    "bce-2-seed-2": ["--bce-weight", "2", "--seed", "2"],
    # nnU-Net's deep supervision: the loss also on the segmentation at 1/2 and 1/4 resolution, weighted 4:2:1
    "deep-sup": ["--deep-supervision-loss"],
    "deep-sup-seed-1": ["--deep-supervision-loss", "--seed", "1"],
    "deep-sup-seed-2": ["--deep-supervision-loss", "--seed", "2"],
    # the two that moved the failures most: deep supervision with the Lovasz hinge term
    "deep-sup-lovasz": ["--deep-supervision-loss", "--loss", "dice+bce+lovasz"],
    "deep-sup-lovasz-seed-1": ["--deep-supervision-loss", "--loss", "dice+bce+lovasz", "--seed", "1"],
    "deep-sup-lovasz-seed-2": ["--deep-supervision-loss", "--loss", "dice+bce+lovasz", "--seed", "2"],
    # colour constancy: each image's illuminant made gray (Shades of Gray, p = 6) in training and prediction
    "shades-of-gray": ["--shades-of-gray"],
    "shades-of-gray-seed-1": ["--shades-of-gray", "--seed", "1"],
    "shades-of-gray-seed-2": ["--shades-of-gray", "--seed", "2"],
    # a final fit: the default recipe trained on the training and validation images (judged on test alone)
    "train-on-val": ["--train-on-val"],
    "train-on-val-seed-1": ["--train-on-val", "--seed", "1"],
    "train-on-val-seed-2": ["--train-on-val", "--seed", "2"],
}
# 5-fold cross-validation of the default and of the best recipe on validation so far: every non-test image is
# validated once, out of fold, so --compare judges them on 1,950 images rather than 230
CV_FOLDS = 5
for _recipe in ("size-96", "deep-sup-lovasz"):
    for _fold in range(CV_FOLDS):
        RUNS[f"cv{CV_FOLDS}-{_recipe}-fold-{_fold}"] = [*RUNS[_recipe], "--folds", str(CV_FOLDS), "--fold", str(_fold)]
BASELINE = "dynunet"

COLUMNS = ["budget", "name", "flags", "best_epoch", "val_dice", "val_threshold_jaccard", "val_failure_share",
           "test_dice", "test_threshold_jaccard", "official_test_dice", "official_test_threshold_jaccard",
           "test_dice_postprocess", "test_threshold_jaccard_postprocess", "val_dice_predict",
           "val_threshold_jaccard_predict", "val_dice_tta", "val_threshold_jaccard_tta", "test_dice_tta",
           "test_threshold_jaccard_tta", "test_failure_share_tta", "train_minutes", "wall_minutes", "other_cpu",
           "machine", "date", "commit"]


def flags_of(budget: str, name: str) -> list[str]:
    """The budget's flags with the run's own laid over them (a run may change the size or the batch)."""
    merged = {**flag_values(BUDGETS[budget]), **flag_values(RUNS[name])}
    return [item for flag, value in merged.items() for item in (flag, value) if item is not None]


def flag_values(flags: list[str]) -> dict[str, str | None]:
    """{flag: its value, or None for a switch such as --train-on-val} of a flag list, in order."""
    found, i = {}, 0
    while i < len(flags):
        takes_value = i + 1 < len(flags) and not flags[i + 1].startswith("--")
        found[flags[i]] = flags[i + 1] if takes_value else None
        i += 2 if takes_value else 1
    return found


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    utils.write_csv(path, rows, COLUMNS)


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def run_logged(argv: list[str], log_path: Path) -> None:
    """Run a script of this repository with the same Python, its output appended to log_path."""
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
        done = subprocess.run([sys.executable, *argv], cwd=HERE, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")})
    if done.returncode:
        raise RuntimeError(f"{argv[0]} exited with {done.returncode}; see {log_path}")


def official_scores(predictions: Path, per_image_csv: Path) -> dict[str, float]:
    """Dice and thresholded Jaccard of a predictions folder by the challenge's own scorer
    (isic-challenge-scoring), on the images predict.py scored; {} where the scorer is not installed."""
    scorer = shutil.which("isic-challenge-scoring")
    if scorer is None or not per_image_csv.is_file():
        return {}
    truth = {row["image_id"]: row for row in read_rows(per_image_csv)}
    data_dir = json.loads((predictions.parent / "config.json").read_text())["train"]["data_dir"]
    masks = {s.id: s.mask for samples in dataset.find_pairs(data_dir, log=lambda *a: None).values() for s in samples}
    with tempfile.TemporaryDirectory() as tmp:
        gt, pred = Path(tmp, "truth"), Path(tmp, "pred")
        gt.mkdir()
        pred.mkdir()
        for image_id in truth:  # the scorer wants exactly one prediction per ground-truth mask
            (gt / f"{image_id}_segmentation.png").symlink_to(Path(masks[image_id]).resolve())
            (pred / f"{image_id}_segmentation.png").symlink_to((predictions / f"{image_id}_segmentation.png").resolve())
        out = subprocess.run([scorer, "segmentation", str(gt), str(pred)], capture_output=True, text=True)
    found = dict(re.findall(r"^(dice|threshold_jaccard)\s+([0-9.]+)$", out.stdout, flags=re.M))
    return {f"official_test_{k}": round(float(v), 4) for k, v in found.items()}


# (split, column suffix) -> predict.py flags. Each run's best.pt segments its stored splits at their original
# size: the validation scores choose between prediction options (--tta), the test scores report them.
PREDICTIONS = {
    ("test", ""): ["--no-tta"],
    ("test", "_postprocess"): ["--no-tta", "--postprocess"],
    ("test", "_tta"): ["--tta"],
    ("val", "_predict"): ["--split", "val", "--no-tta"],
    ("val", "_tta"): ["--split", "val", "--tta"],
}


# --scores tta: predict.py's defaults only (flip TTA), on both splits: a third of the prediction time
TTA_ONLY = (("test", "_tta"), ("val", "_tta"))
SCORES = {"all": None, "tta": TTA_ONLY}


def prediction_scores(checkpoints: list[Path], folder: Path, split: str, suffix: str, extra: list[str],
                      log: Path) -> dict:
    """predict.py with the checkpoints (several: their mean) and the flags `extra`, written to folder/<split><suffix>;
    its Dice, thresholded Jaccard and failure share as the columns <split>_<figure><suffix>."""
    out = folder / f"{split}{suffix}"
    run_logged(["predict.py", "--checkpoint", *map(str, checkpoints), "--output", str(out), *extra], log)
    metrics = json.loads((out / "metrics.json").read_text())
    return {f"{split}_{key}{suffix}": round(metrics[key], 4)
            for key in ("dice", "threshold_jaccard", "failure_share")}


def score_run(run_dir: Path, log: Path, only=None) -> dict:
    """The run's prediction scores (the columns named by PREDICTIONS, or those in `only`) and the official
    scorer's on the test split (of the plain predictions, else of the TTA ones)."""
    scores = {}
    for (split, suffix), extra in PREDICTIONS.items():
        if not only or (split, suffix) in only:
            scores.update(prediction_scores([run_dir / "best.pt"], run_dir, split, suffix, extra, log))
    test = run_dir / "test" if (run_dir / "test").is_dir() else run_dir / "test_tta"
    scores.update(official_scores(test, test / "metrics.csv"))
    return scores


def run_one(budget: str, name: str, args) -> dict:
    """Train, score the test split, and return the run's row (its curve is copied to results/curves/)."""
    run_dir = Path(args.out_dir) / f"{budget}-{name}"
    if args.rerun and run_dir.exists():
        shutil.rmtree(run_dir)  # a new run, not a resumption of the finished one
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "study.log"
    flags = flags_of(budget, name) + shlex.split(args.train_flags)  # given last, so they win
    train_argv = ["train.py", "--data-dir", args.data_dir, "--out-dir", args.out_dir, "--name", run_dir.name,
                  "--resume", "auto", "--no-progress", *flags]
    utils.print0(f"[{budget}/{name}] python {' '.join(train_argv)}")
    meter = utils.OtherCpu()
    started = time.perf_counter()
    run_logged(train_argv, log)
    wall = time.perf_counter() - started
    other = meter.share()
    history = read_rows(run_dir / "metrics.csv")
    summary = json.loads((run_dir / "summary.json").read_text())
    best = history[summary["best_epoch"] - 1]
    scores = score_run(run_dir, log, SCORES[args.scores])
    curves = Path(args.results).parent / "curves"
    curves.mkdir(parents=True, exist_ok=True)
    with utils.atomic_write(curves / f"{budget}-{name}.csv") as tmp:
        tmp.write_text((run_dir / "metrics.csv").read_text())
    row = {"budget": budget, "name": name, "flags": " ".join(flags), "best_epoch": summary["best_epoch"],
           "val_dice": round(float(best["val_dice"]), 4),
           "val_threshold_jaccard": round(float(best["val_threshold_jaccard"]), 4),
           "val_failure_share": round(float(best["val_failure_share"]), 4) if best.get("val_failure_share") else "",
           **scores,
           "train_minutes": round(sum(float(r["seconds"]) for r in history) / 60, 2),
           "wall_minutes": round(wall / 60, 2), "other_cpu": "" if other is None else round(other, 3),
           "machine": devices.device_name(devices.select_device("auto")),
           "date": datetime.date.today().isoformat(), "commit": commit()}
    utils.print0(f"[{budget}/{name}] val Dice {row['val_dice']}  test Dice (TTA) {row.get('test_dice_tta')}  "
                 f"thresholded Jaccard {row.get('test_threshold_jaccard_tta')}  failures (Jaccard < 0.65) "
                 f"{row.get('test_failure_share_tta')}  ({row['train_minutes']} min training)")
    return row


def ensemble_one(budget: str, names: list[str], args) -> dict:
    """The finished runs' best.pt averaged (predict.py with several --checkpoint), scored with flip TTA on the stored
    validation and test splits: a row under the budget '<budget>x<N>', its training time the runs' sum."""
    members = [Path(args.out_dir) / f"{budget}-{name}" for name in names]
    missing = [str(m / "best.pt") for m in members if not (m / "best.pt").is_file()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} missing; train the runs first: python study.py --budget "
                                f"{budget} --only {' '.join(names)}")
    name, ensemble = "+".join(names), f"{budget}x{len(names)}"
    out = Path(args.out_dir) / f"{ensemble}-{name}"
    out.mkdir(parents=True, exist_ok=True)
    scores = {}
    for split, suffix in TTA_ONLY:  # the same predictions as a run's --scores tta
        extra = [*PREDICTIONS[(split, suffix)], "--overwrite"]
        scores.update(prediction_scores([m / "best.pt" for m in members], out, split, suffix, extra,
                                        out / "study.log"))
    minutes = sum(sum(float(r["seconds"]) for r in read_rows(m / "metrics.csv")) for m in members) / 60
    row = {"budget": ensemble, "name": name, "flags": " | ".join(" ".join(flags_of(budget, n)) for n in names),
           "best_epoch": "", "val_dice": "", "val_threshold_jaccard": "", **scores,
           "train_minutes": round(minutes, 2), "machine": devices.device_name(devices.select_device("auto")),
           "date": datetime.date.today().isoformat(), "commit": commit()}
    utils.print0(f"[{ensemble}/{name}] val Dice (TTA) {row['val_dice_tta']}  test Dice (TTA) {row['test_dice_tta']}  "
                 f"thresholded Jaccard {row['test_threshold_jaccard_tta']}  failures {row['test_failure_share_tta']}")
    return row


def ensembles(args) -> None:
    """--ensemble N: the --only runs of the budget in groups of N, in order, each group's mean scored (ensemble_one)."""
    names = args.only or []
    if not names or len(names) % args.ensemble:
        raise SystemExit(f"error: --ensemble {args.ensemble} takes --only runs in groups of {args.ensemble}, "
                         f"got {len(names)}")
    results = Path(args.results)
    for start in range(0, len(names), args.ensemble):
        row = ensemble_one(args.budget, names[start:start + args.ensemble], args)
        rows = [r for r in read_rows(results) if not (r["budget"] == row["budget"] and r["name"] == row["name"])]
        write_rows(results, rows + [row])


# ----------------------------------------------------------------------------- report


def time_to_reach(curve: list[dict], target: float) -> float | None:
    """Training minutes until the validation Dice first reaches target (None if it never does)."""
    minutes = 0.0
    for row in curve:
        minutes += float(row["seconds"]) / 60
        if float(row["val_dice"]) >= target:
            return minutes
    return None


def speed_against_baseline(rows: list[dict], curves_dir: Path, budget: str) -> list[tuple[str, float, float]]:
    """(name, minutes to the baseline's final validation Dice, ratio to the baseline's training minutes)."""
    def curve(name):
        path = curves_dir / f"{budget}-{name}.csv"
        return read_rows(path) if path.is_file() else []

    base = curve(BASELINE)
    if not base:
        return []
    target = float(base[-1]["val_dice"])
    base_minutes = sum(float(r["seconds"]) for r in base) / 60
    out = []
    for row in rows:
        if row["budget"] == budget and row["name"] != BASELINE:
            reached = time_to_reach(curve(row["name"]), target)
            if reached is not None:
                out.append((row["name"], reached, reached / base_minutes))
    return out


def share(value) -> str:
    """'9.5%' for a share of images, '-' where the run predates the figure."""
    return f"{100 * float(value):.1f}%" if value not in (None, "") else "-"


def markdown_table(rows: list[dict]) -> str:
    head = ["budget", "run", "val Dice", "val thr. Jaccard", "test Dice", "test thr. Jaccard",
            "official scorer: Dice / thr. J.", "`--postprocess`: Dice / thr. J.",
            "val, full size: plain -> `--tta` Dice / thr. J.", "`--tta`: test Dice / thr. J.",
            "`--tta`: test failures", "training min", "other CPU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        pair = lambda a, b: f"{r.get(a) or '-'} / {r.get(b) or '-'}"  # noqa: E731
        val_tta = (f"{pair('val_dice_predict', 'val_threshold_jaccard_predict')} -> "
                   f"{pair('val_dice_tta', 'val_threshold_jaccard_tta')}") if r.get("val_dice_tta") else "-"
        lines.append(f"| {r['budget']} | `{r['name']}` | {r['val_dice']} | {r['val_threshold_jaccard']} | "
                     f"{r.get('test_dice') or '-'} | {r.get('test_threshold_jaccard') or '-'} | "
                     f"{pair('official_test_dice', 'official_test_threshold_jaccard')} | "
                     f"{pair('test_dice_postprocess', 'test_threshold_jaccard_postprocess')} | {val_tta} | "
                     f"{pair('test_dice_tta', 'test_threshold_jaccard_tta') if r.get('test_dice_tta') else '-'} | "
                     f"{share(r.get('test_failure_share_tta'))} | {r['train_minutes']} | {r['other_cpu']} |")
    return "\n".join(lines)


def failure_table(rows: list[dict]) -> str:
    """Per budget and recipe, the mean over its seeds (and the range, with several) of the validation and test
    figures, failures included: the table that compares what is aimed at the failed images. Both splits are scored
    alike, by predict.py's defaults (flip TTA) at the images' own size."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["budget"], recipe_of(r["name"])), []).append(r)
    head = ["budget", "recipe", "seeds", "val Dice", "val thr. Jaccard", "val failures", "test Dice",
            "test thr. Jaccard", "test failures"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---:|" + "---:|" * (len(head) - 3)]

    def cell(runs, key, percent=False):
        values = [float(r[key]) for r in runs if r.get(key) not in (None, "")]
        if not values:
            return "-"
        show = share if percent else (lambda v: f"{v:.4f}")
        spread = f" ({show(min(values))}-{show(max(values))})" if len(values) > 1 else ""
        return show(sum(values) / len(values)) + spread

    for (budget, recipe), runs in groups.items():
        # a run with --train-on-val was trained on the validation images: its validation figures say nothing
        scored = {"val": [r for r in runs if "--train-on-val" not in r.get("flags", "").split()], "test": runs}
        figures = [cell(scored[split], f"{split}_{key}_tta", key == "failure_share") for split in ("val", "test")
                   for key in ("dice", "threshold_jaccard", "failure_share")]
        lines.append(f"| {budget} | `{recipe}` | {len(runs)} | " + " | ".join(figures) + " |")
    return "\n".join(lines)


def recipe_of(name: str) -> str:
    """A run's recipe: its name without a -seed-N or -fold-N suffix (seeds of one recipe are averaged, folds
    pooled); an ensemble's (names joined by +) is its first run's."""
    return re.sub(r"-(seed|fold)-\d+$", "", name.split("+")[0])


def per_image(run_dirs: list[Path], split: str) -> dict[str, dict[str, float]]:
    """{image id: its Dice and thresholded Jaccard, each the mean over the runs that scored it}, from the metrics.csv
    that --scores tta wrote for the split (<run>/<split>_tta/). The runs scored the same images (seeds), or, for the
    validation split of cross-validation folds, images of their own that together make the pool (out of fold)."""
    tables = []
    for run_dir in run_dirs:
        path = run_dir / f"{split}_tta" / "metrics.csv"
        if not path.is_file():
            raise ValueError(f"{path} is missing: the run is unfinished or unscored (python study.py --budget ... "
                             f"--rescore --only {run_dir.name.split('-', 1)[1]})")
        tables.append({r["image_id"]: r for r in read_rows(path)})
    disjoint = sum(len(t) for t in tables) == len(set().union(*tables))
    for run_dir, table in zip(run_dirs, tables):
        if set(table) != set(tables[0]) and not disjoint:
            raise ValueError(f"{run_dir} scored other {split} images than {run_dirs[0]} (another split, or images "
                             f"that failed); compare runs of one split, each scored whole")
    scored = {i: [t[i] for t in tables if i in t] for i in sorted(set().union(*tables))}
    return {i: {k: sum(float(r[k]) for r in rows) / len(rows) for k in ("dice", "threshold_jaccard")}
            for i, rows in scored.items()}


def paired_difference(a: dict[str, float], b: dict[str, float], draws: int = 10_000, seed: int = 0) -> dict:
    """B minus A on the same images: the mean difference, its 95% interval by the percentile bootstrap over images
    (images drawn with replacement, both recipes keeping their pairing), and how many images each way."""
    if set(a) != set(b):
        raise ValueError("the two recipes scored different images")
    diff = np.array([b[i] - a[i] for i in sorted(a)])
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (draws, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"images": len(diff), "difference": float(diff.mean()), "low": float(low), "high": float(high),
            "better": int((diff > 1e-9).sum()), "worse": int((diff < -1e-9).sum())}


def compare(args) -> str:
    """--compare A B: recipe B against recipe A on the images of each split, every seed of each averaged per image.
    A recipe trained on the validation images (--train-on-val) is compared on test alone."""
    known = {recipe_of(name) for name in RUNS}
    for recipe in args.compare:
        if recipe not in known:
            raise SystemExit(f"error: --compare {recipe}: no such recipe; choose from {', '.join(sorted(known))}")
    runs = {recipe: sorted(Path(args.out_dir) / f"{args.budget}-{name}" for name in RUNS
                           if recipe_of(name) == recipe and (Path(args.out_dir) / f"{args.budget}-{name}").is_dir())
            for recipe in args.compare}
    for recipe, found in runs.items():
        if not found:
            raise SystemExit(f"error: no finished {args.budget} run of {recipe} under {args.out_dir}")
    lines = [f"{args.compare[1]} against {args.compare[0]} ({len(runs[args.compare[1]])} and "
             f"{len(runs[args.compare[0]])} runs, each image's figures averaged over them; 95% interval by the "
             f"bootstrap over images):",
             "| split | figure | images | difference | 95% interval | images better / worse |", "|---|---|---:|---:|---:|---:|"]
    seen_val = any("--train-on-val" in RUNS[name] for name in RUNS if recipe_of(name) in args.compare)
    for split in ("test",) if seen_val else ("val", "test"):
        try:
            a, b = (per_image(runs[recipe], split) for recipe in args.compare)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
        for key in ("dice", "threshold_jaccard"):
            d = paired_difference({i: v[key] for i, v in a.items()}, {i: v[key] for i, v in b.items()})
            lines.append(f"| {split} | {key} | {d['images']} | {d['difference']:+.4f} | "
                         f"{d['low']:+.4f} to {d['high']:+.4f} | {d['better']} / {d['worse']} |")
    text = "\n".join(lines)
    print(text)
    return text


# Validation Dice this close to the best counts as a tie: the recipe with fewer failed images (Jaccard under 0.65,
# which score 0 in the challenge's ranking) wins it. 0.001 is below the spread of seeds of one recipe (0.002-0.005).
DICE_TIE = 0.001


def best_recipe(firsts: dict[str, dict]) -> str:
    """The recipe with the highest validation Dice; among those within DICE_TIE of it, the one with the smallest
    share of failed validation images (runs that predate the figure count by Dice alone)."""
    top = max(float(r["val_dice"]) for r in firsts.values())
    tied = {k: r for k, r in firsts.items() if float(r["val_dice"]) >= top - DICE_TIE}
    if any(r.get("val_failure_share") in (None, "") for r in tied.values()):
        return max(tied, key=lambda k: float(tied[k]["val_dice"]))
    return min(tied, key=lambda k: (float(tied[k]["val_failure_share"]), -float(tied[k]["val_dice"])))


def choose_per_budget(rows: list[dict]) -> dict[str, tuple[str, list[dict]]]:
    """For each wall-clock budget: the recipe whose first run (seed 0, as every contender has) is best_recipe on
    the validation split (the validation split chooses; test scores are only reported), and all its runs: the
    other seeds repeat the winner, they do not take part in the choice."""
    chosen = {}
    for budget in (b for b in BUDGETS if "--minutes" in BUDGETS[b]):
        recipes: dict[str, list[dict]] = {}
        for r in rows:
            if r["budget"] == budget:
                recipes.setdefault(recipe_of(r["name"]), []).append(r)
        firsts = {k: r for k, runs in recipes.items() for r in runs if r["name"] == k}
        if firsts:
            best = best_recipe(firsts)
            chosen[budget] = (best, recipes[best])
    return chosen


def budget_table(rows: list[dict]) -> str:
    """README's "How long should I train?" table: per budget, the recipe validation chose, its command and
    its test scores with predict.py's defaults (mean over its seeds)."""
    lines = ["| budget | command | seeds | validation Dice | test Dice | test thr. Jaccard |", "|---|---|---:|---:|---:|---:|"]
    mean = lambda runs, key: sum(float(r[key]) for r in runs) / len(runs)  # noqa: E731
    for budget, (recipe, runs) in choose_per_budget(rows).items():
        flags = flags_of(budget, recipe if recipe in RUNS else runs[0]["name"])
        flags = [f for f in " ".join(flags).replace(" --batch-size 16", "").split() if f]
        seeds = sorted(runs, key=lambda r: r["name"])
        spread = (f" ({min(float(r['test_dice_tta']) for r in seeds):.3f}-"
                  f"{max(float(r['test_dice_tta']) for r in seeds):.3f})") if len(seeds) > 1 else ""
        lines.append(f"| {BUDGETS[budget][1]} min | `python train.py --data-dir DATA {' '.join(flags)}` | {len(seeds)} | "
                     f"{mean(seeds, 'val_dice'):.3f} | {mean(seeds, 'test_dice_tta'):.3f}{spread} | "
                     f"{mean(seeds, 'test_threshold_jaccard_tta'):.3f} |")
    return "\n".join(lines)


def plot_time_to_dice(rows: list[dict], curves_dir: Path, path: Path) -> None:
    """Validation Dice against cumulative training minutes, one panel per budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = [b for b in BUDGETS if any(r["budget"] == b for r in rows)]
    fig, axes = plt.subplots(1, len(budgets), figsize=(6.2 * len(budgets), 4.4), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        for r in (r for r in rows if r["budget"] == budget):
            curve = read_rows(curves_dir / f"{budget}-{r['name']}.csv")
            minutes, total = [], 0.0
            for c in curve:
                total += float(c["seconds"]) / 60
                minutes.append(total)
            main = r["name"] in ("default", BASELINE, "paper")
            ax.plot(minutes, [float(c["val_dice"]) for c in curve], marker="o", markersize=3,
                    linewidth=2.2 if main else 1.0, alpha=1.0 if main else 0.6,
                    linestyle="--" if r["name"] == BASELINE else "-",
                    label=f"{r['name']} (other CPU {float(r['other_cpu']):.0%})" if r.get("other_cpu") else r["name"])
        ax.set_title(f"{budget} budget ({' '.join(BUDGETS[budget])})", fontsize=9)
        ax.set_xlabel(f"training minutes ({rows[0].get('machine', '')})", fontsize=8)
        ax.set_ylabel("validation Dice")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with utils.atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def report(args) -> None:
    rows = read_rows(Path(args.results))
    if not rows:
        raise SystemExit(f"error: {args.results} holds no runs yet; run python study.py --data-dir D first")
    for row in rows:  # rows from before the scorer was installed, whose run folders are still here
        test = Path(args.out_dir) / f"{row['budget']}-{row['name']}" / "test"
        if not row.get("official_test_dice") and test.is_dir():
            row.update(official_scores(test, test / "metrics.csv"))
    write_rows(Path(args.results), rows)
    curves = Path(args.results).parent / "curves"
    table = markdown_table(rows)
    lines = [table, ""]
    for budget in BUDGETS:
        load = {r["name"]: r.get("other_cpu") for r in rows if r["budget"] == budget}
        for name, minutes, ratio in speed_against_baseline(rows, curves, budget):
            lines.append(f"- {budget}: `{name}` reaches {BASELINE}'s final validation Dice after {minutes:.1f} "
                         f"training minutes, {ratio:.2f}x {BASELINE}'s time (other processes took "
                         f"{load.get(name) or '?'} and {load.get(BASELINE) or '?'} of the CPU during the two runs)")
    text = "\n".join(lines) + "\n"
    with utils.atomic_write(Path(args.results).with_suffix(".md")) as tmp:
        tmp.write_text(text)
    plot_time_to_dice(rows, curves, Path(args.figure))
    print(text + f"\nwrote {Path(args.results).with_suffix('.md')} and {args.figure}")


def rescore(args) -> None:
    """Fill the prediction columns of the budget's rows (those named by --only) from their run folders' best.pt."""
    results = Path(args.results)
    rows = read_rows(results)
    for row in rows:
        run_dir = Path(args.out_dir) / f"{row['budget']}-{row['name']}"
        if row["budget"] != args.budget or (args.only and row["name"] not in args.only):
            continue
        if not (run_dir / "best.pt").is_file():
            utils.print0(f"[{row['budget']}/{row['name']}] {run_dir / 'best.pt'} is missing; left as it is")
            continue
        scores = score_run(run_dir, run_dir / "study.log", SCORES[args.scores])
        row.update(scores)
        utils.print0(f"[{row['budget']}/{row['name']}] " + ", ".join(f"{k} {v}" for k, v in scores.items()
                                                                       if k.startswith(("val_dice", "test_dice"))))
        write_rows(results, rows)
    report(args)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", default="data/ISIC2018", help="ISIC root, as for train.py")
    parser.add_argument("--budget", choices=list(BUDGETS), default="short", help="training budget of the runs")
    parser.add_argument("--only", nargs="*", choices=list(RUNS), help="these runs only (default: all)")
    parser.add_argument("--rerun", action="store_true", help="run again even when the table has the run")
    parser.add_argument("--train-flags", default="", help="more train.py flags for every run, e.g. '--device cuda'")
    parser.add_argument("--out-dir", default="runs/study", help="parent of the study's run folders")
    parser.add_argument("--results", default="results/recipes.csv", help="the table of runs")
    parser.add_argument("--figure", default="images/recipes_time_to_dice.png", help="validation Dice against time")
    parser.add_argument("--scores", choices=list(SCORES), default="all",
                        help="prediction columns to fill: all of PREDICTIONS, or predict.py's default (TTA) on val "
                             "and test")
    parser.add_argument("--ensemble", type=int, default=0, metavar="N",
                        help="score finished runs averaged in groups of N (the --only runs of --budget, in order), "
                             "without training; the rows go to --results under the budget '<budget>xN'")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"),
                        help="recipe B against recipe A on the same images, from their finished runs of --budget "
                             "(every seed) as --scores tta scored them: the mean difference per image and its 95%% "
                             "interval, which says whether a gap is more than the images' chance")
    parser.add_argument("--report", action="store_true", help="only write the table, speed ratios and figure")
    parser.add_argument("--rescore", action="store_true",
                        help="score the budget's finished runs again (every PREDICTIONS column), without training")
    args = parser.parse_args(argv)
    if args.compare:
        compare(args)
        return
    if args.report:
        return report(args)
    if args.rescore:
        return rescore(args)
    if args.ensemble:
        return ensembles(args)
    if not Path(args.data_dir).is_dir():
        parser.error(f"--data-dir {args.data_dir} does not exist; the study needs real ISIC data "
                     f"(python download.py --root {args.data_dir})")
    results = Path(args.results)
    for name in args.only or list(RUNS):
        rows = read_rows(results)
        if not args.rerun and any(r["budget"] == args.budget and r["name"] == name for r in rows):
            utils.print0(f"[{args.budget}/{name}] already in {results}; --rerun to run it again")
            continue
        try:
            row = run_one(args.budget, name, args)
        except (RuntimeError, OSError, KeyError, ValueError) as err:
            utils.print0(f"[{args.budget}/{name}] failed: {err}")
            continue
        rows = [r for r in read_rows(results) if not (r["budget"] == args.budget and r["name"] == name)]
        write_rows(results, rows + [row])
    report(args)


if __name__ == "__main__":
    main()
