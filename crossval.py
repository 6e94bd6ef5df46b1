"""Summarise a K-fold cross-validation: per-fold and mean +- std validation scores, and the out-of-fold score.

    for i in 0 1 2 3 4; do python train.py --data-dir D --folds 5 --fold $i --name cv-fold$i; done
    python crossval.py runs/cv-fold*                 # writes runs/cv-fold0/../crossval.json and crossval.md
    python predict.py --checkpoint runs/cv-fold*/best.pt   # the fold ensemble on the shared test split

Each fold's best.pt segments that fold's validation images at their original size (as predict.py does);
pooled over the folds, every non-test image is scored exactly once by a model that never trained on it:
the out-of-fold Dice and thresholded Jaccard.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import checkpoint
import predict
import utils

SCORES = ("dice", "threshold_jaccard", "jaccard")


class CrossValidationError(ValueError):
    """The run folders do not form one cross-validation; the message says which and why."""


def read_fold(run_dir: Path) -> dict:
    """A fold's run folder: its split, its best validation metrics and its best checkpoint."""
    paths = {name: run_dir / name for name in ("splits.json", "summary.json", "best.pt")}
    for name, path in paths.items():
        if not path.is_file():
            raise CrossValidationError(f"{path} is missing: {run_dir} is not a finished train.py run "
                                       f"(train it to the end, or leave it out)")
    split = json.loads(paths["splits.json"].read_text())
    if int(split.get("folds") or 0) < 2:
        raise CrossValidationError(f"{run_dir} was not trained with --folds K (K >= 2)")
    summary = json.loads(paths["summary.json"].read_text())
    return {"run_dir": run_dir, "split": split, "best": summary.get("best_metrics", {}), "checkpoint": paths["best.pt"]}


def check_folds(folds: list[dict]) -> int:
    """The K of a consistent set of folds (same K, seed and test split, each fold once)."""
    first = folds[0]["split"]
    k = int(first["folds"])
    seen = {}
    for fold in folds:
        split = fold["split"]
        if int(split["folds"]) != k or split["split_seed"] != first["split_seed"]:
            raise CrossValidationError(f"{fold['run_dir']} has folds={split['folds']}, split_seed={split['split_seed']}; "
                                       f"{folds[0]['run_dir']} has folds={k}, split_seed={first['split_seed']}")
        if sorted(split["test"]) != sorted(first["test"]):
            raise CrossValidationError(f"{fold['run_dir']} and {folds[0]['run_dir']} held out different test "
                                       f"splits (was the data folder changed between folds?)")
        if split["fold"] in seen:
            raise CrossValidationError(f"{fold['run_dir']} and {seen[split['fold']]} are both fold {split['fold']}")
        seen[split["fold"]] = fold["run_dir"]
    return k


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(run_dirs: list[Path], device: str = "auto") -> dict:
    """Per-fold validation scores, their mean and std, and the out-of-fold scores over the pool."""
    folds = sorted((read_fold(Path(d)) for d in run_dirs), key=lambda f: f["split"]["fold"])
    if not folds:
        raise CrossValidationError("no run folders given")
    k = check_folds(folds)
    rows, pooled = [], []
    for fold in folds:
        result = predict.run(predict.PredictConfig(
            checkpoint=[str(fold["checkpoint"])], split="val", device=device,
            output=str(fold["run_dir"] / "out-of-fold")))
        pooled.extend(result.per_image)
        rows.append({"fold": fold["split"]["fold"], "run_dir": str(fold["run_dir"]),
                     "val_images": len(result.per_image),
                     **{f"val_{s}": fold["best"].get(f"val_{s}") for s in SCORES},  # at network resolution
                     **{f"oof_{s}": result.metrics[s] for s in SCORES}})  # at the original size
    summary = {"folds": k, "complete": len(folds) == k, "per_fold": rows}
    for s in SCORES:
        values = [r[f"val_{s}"] for r in rows if r[f"val_{s}"] is not None]
        if values:
            summary[f"val_{s}_mean"], summary[f"val_{s}_std"] = mean_std(values)
        summary[f"out_of_fold_{s}"] = statistics.fmean(float(r[s]) for r in pooled)
    summary["out_of_fold_images"] = len(pooled)
    return summary


def markdown(summary: dict) -> str:
    lines = ["| fold | val images | val Dice | val thr. Jaccard | out-of-fold Dice | out-of-fold thr. Jaccard |",
             "|---|---|---|---|---|---|"]
    for r in summary["per_fold"]:
        lines.append(f"| {r['fold']} | {r['val_images']} | {r['val_dice']:.4f} | {r['val_threshold_jaccard']:.4f} | "
                     f"{r['oof_dice']:.4f} | {r['oof_threshold_jaccard']:.4f} |")
    lines.append(f"| mean +- std | | {summary['val_dice_mean']:.4f} +- {summary['val_dice_std']:.4f} | "
                 f"{summary['val_threshold_jaccard_mean']:.4f} +- {summary['val_threshold_jaccard_std']:.4f} | | |")
    lines.append(f"| pooled ({summary['out_of_fold_images']} images) | | | | {summary['out_of_fold_dice']:.4f} | "
                 f"{summary['out_of_fold_threshold_jaccard']:.4f} |")
    if not summary["complete"]:
        lines.append(f"\nOnly {len(summary['per_fold'])} of {summary['folds']} folds: the pooled score covers "
                     f"those folds' images only.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("runs", nargs="+", help="the folds' run folders (train.py --folds K --fold I)")
    parser.add_argument("--output", help="folder for crossval.json and crossval.md; default: the runs' parent")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    args = parser.parse_args(argv)
    try:
        summary = summarise([Path(r) for r in args.runs], args.device)
    except (CrossValidationError, predict.PredictError, checkpoint.CheckpointError) as err:
        print(f"crossval.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    out = Path(args.output) if args.output else Path(args.runs[0]).parent
    out.mkdir(parents=True, exist_ok=True)
    with utils.atomic_write(out / "crossval.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    text = markdown(summary)
    with utils.atomic_write(out / "crossval.md") as tmp:
        tmp.write_text(text)
    print(text + f"\nwrote {out / 'crossval.json'} and {out / 'crossval.md'}")
    return summary


if __name__ == "__main__":
    main()
