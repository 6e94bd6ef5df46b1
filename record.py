"""The record of a training run in its folder: the lock, config.json, splits.json, metrics.csv, curves.png,
predictions.png, summary.json and the wandb run. train.py decides what happens; this file writes it down.

Only rank 0 keeps a record; the other ranks get a RunRecord whose methods do nothing.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
import warnings
from pathlib import Path

import utils


class RunInUseError(RuntimeError):
    """Another live process holds the run folder."""


class RunLock:
    """A lock file in the run folder, so two runs never write the same checkpoints.

    It records host, pid and the SLURM job attempt. A lock is taken over when its owner is gone: a
    process that no longer exists on this host (a crash), or an earlier attempt of this same SLURM job
    (a job killed hard, by a node failure, the OOM killer or a kill after a slow save, and requeued
    onto any node: SLURM never runs two attempts of one job at once).
    """

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self.held = False

    def acquire(self) -> None:
        host, job, attempt = socket.gethostname(), *slurm_attempt()
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and _stale(owner, host, job, attempt):
                    self.path.unlink(missing_ok=True)
                    continue
                owner_host, owner_pid, owner_job, _ = owner or (None, None, None, None)
                of_job = f", SLURM job {owner_job}" if owner_job else ""
                raise RunInUseError(
                    f"{self.path.parent} is in use by another run (pid {owner_pid} on {owner_host}{of_job}). "
                    f"Choose another --name, or wait for that run to finish; if it is no longer "
                    f"running, delete {self.path}.") from None
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(f"{host} {os.getpid()} {job or '-'} {attempt}\n")
            except OSError as err:  # a full disk: leave no empty lock that would block the next attempt
                self.path.unlink(missing_ok=True)
                raise OSError(err.errno, err.strerror, str(self.path)) from None
            self.held = True
            return

    def _owner(self) -> tuple[str, int, str | None, int] | None:
        """(host, pid, SLURM job or None, attempt); a lock of two fields predates the job fields."""
        try:
            fields = self.path.read_text().split()
            host, pid = fields[0], int(fields[1])
            job = fields[2] if len(fields) > 2 and fields[2] != "-" else None
            return host, pid, job, int(fields[3]) if len(fields) > 3 else 0
        except (OSError, ValueError, IndexError):
            return None

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def slurm_attempt() -> tuple[str | None, int]:
    """This process's SLURM job, as squeue names it (an array task is <array id>_<task id>), and its
    attempt (SLURM_RESTART_COUNT counts requeues); (None, 0) outside SLURM."""
    job = os.environ.get("SLURM_JOB_ID") or None
    if job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ.get('SLURM_ARRAY_JOB_ID', job)}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    try:
        attempt = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        attempt = 0
    return job, attempt


def _stale(owner: tuple, host: str, job: str | None, attempt: int) -> bool:
    owner_host, owner_pid, owner_job, owner_attempt = owner
    if job is not None and owner_job == job and owner_attempt < attempt:
        return True  # an earlier attempt of this job, on whichever node: it ended before this one began
    return owner_host == host and not _pid_alive(owner_pid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


METRIC_COLUMNS = ["epoch", "train_loss", "val_loss", "val_dice", "val_jaccard", "val_threshold_jaccard",
                  "val_accuracy", "val_sensitivity", "val_specificity", "lr", "images_per_s", "seconds",
                  "val_failure_share"]  # the share of images under Jaccard 0.65, which score 0 in the ranking


# ----------------------------------------------------------------------------- plots


def plot_curves(history: list[dict], path: Path) -> None:
    """Loss, validation Dice and learning rate per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, [row["train_loss"] for row in history], label="train")
    axes[0].plot(epochs, [row["val_loss"] for row in history], label="validation")
    axes[0].set_title("loss (train.py --loss)")
    axes[0].legend()
    axes[1].plot(epochs, [row["val_dice"] for row in history], label="Dice")
    axes[1].plot(epochs, [row["val_jaccard"] for row in history], label="Jaccard")
    axes[1].set_title("validation")
    axes[1].legend()
    axes[2].plot(epochs, [row["lr"] for row in history])
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with utils.atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


EMPTY_HISTORY = [{"epoch": 1, "train_loss": 0.0, "val_loss": 0.0, "val_dice": 0.0, "val_jaccard": 0.0, "lr": 0.0}]


def plot_predictions(images, masks, predictions, path: Path, titles=None) -> None:
    """Rows of image | ground truth | prediction (uint8 images (N,H,W,3), masks (N,H,W) {0,1})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.5 * n), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(images[i])
        axes[i, 1].imshow(masks[i], cmap="gray", vmin=0, vmax=1)
        axes[i, 2].imshow(images[i])
        axes[i, 2].contour(masks[i], levels=[0.5], colors="lime", linewidths=1)
        axes[i, 2].contour(predictions[i], levels=[0.5], colors="red", linewidths=1)
        if titles:
            axes[i, 0].set_ylabel(titles[i], fontsize=8)
    for ax, title in zip(axes[0], ["image", "ground truth", "prediction (red) vs truth (green)"]):
        ax.set_title(title, fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    with utils.atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- wandb


def wandb_mode(config) -> str:
    """Flag, then WANDB_MODE, then online only when an API key is configured (else offline)."""
    if config.wandb:
        return config.wandb
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


def start_wandb(config, run_dir: Path, run_id: str | None):
    """A wandb run (resumed when run_id is known), or None; never lets wandb stop training."""
    mode = wandb_mode(config)
    if mode == "disabled":
        return None
    try:
        import wandb

        return wandb.init(
            project=config.wandb_project, entity=config.wandb_entity, name=run_dir.name,
            tags=config.wandb_tags or None, config=dataclasses.asdict(config), dir=str(run_dir),
            id=run_id, resume="allow" if run_id else None, mode=mode,
        )
    except Exception as err:  # wandb raises many error types when it cannot start; none may stop training
        warnings.warn(f"wandb could not start ({type(err).__name__}: {err}); training goes on without it. "
                      f"Use --wandb offline to log locally and `wandb sync` later.", stacklevel=2)
        return None


def wandb_log(run, values: dict, step: int) -> None:
    if run is None:
        return
    try:
        run.log(values, step=step)
    except Exception as err:  # a lost connection must not stop training
        warnings.warn(f"wandb.log failed ({err}); continuing", stacklevel=2)


def log_wandb_predictions(run, images, masks, predictions, ids, step: int) -> None:
    """Prediction images with the ground truth and the prediction as wandb mask overlays."""
    if run is None:
        return
    import wandb

    labels = {0: "background", 1: "lesion"}
    panels = [wandb.Image(image, caption=name, masks={
        "prediction": {"mask_data": prediction, "class_labels": labels},
        "ground_truth": {"mask_data": mask, "class_labels": labels}})
        for image, mask, prediction, name in zip(images, masks, predictions, ids)]
    wandb_log(run, {"predictions": panels}, step)


# ----------------------------------------------------------------------------- the record


class RunRecord:
    """The run folder of rank 0: locked while the run lives, with its files and its wandb run."""

    # curves.png is redrawn at most this often (and once more at the end): a fast GPU's epoch takes a second or
    # two, and a matplotlib redraw a good part of one; metrics.csv, which the figure draws, is written every epoch
    PLOT_EVERY_SECONDS = 30.0

    def __init__(self, run_dir: Path, enabled: bool):
        self.dir, self.enabled = Path(run_dir), enabled
        self.lock = RunLock(self.dir)
        self.wandb = None
        self.plotted_at: float | None = None  # time.monotonic() of the last redraw of curves.png
        self.unplotted: list[dict] | None = None  # the history curves.png does not show yet

    def open(self, config, wandb_id: str | None) -> str | None:
        """Create and lock the folder, start wandb; returns the wandb run id to store in checkpoints."""
        if not self.enabled:
            return wandb_id
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        self.wandb = start_wandb(config, self.dir, wandb_id)
        return self.wandb.id if self.wandb is not None else wandb_id

    def close(self) -> None:
        try:  # a run stopped by a signal or an error still leaves curves.png up to its last epoch
            self.plot()
        except Exception as err:  # a figure must not hide the run's own result
            warnings.warn(f"could not redraw {self.dir / 'curves.png'}: {err}", stacklevel=2)
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception:  # a wandb failure at shutdown must not hide the run's result
                pass
        self.lock.release()

    def write_splits(self, config, description: str, split_ids: dict) -> None:
        if self.enabled:
            utils.write_json(self.dir / "splits.json", {"data_dir": config.data_dir, "split_seed": config.split_seed,
                                                        "folds": config.folds, "fold": config.fold,
                                                        "description": description, **split_ids})

    def write_config(self, config, model_config, norm_stats: dict, plan: dict | None) -> None:
        if self.enabled:
            utils.write_json(self.dir / "config.json", {
                "train": dataclasses.asdict(config), "model": dataclasses.asdict(model_config),
                "norm_stats": norm_stats, "budget_plan": plan})

    def write_epoch(self, history: list[dict]) -> None:
        """metrics.csv, curves.png and the epoch's row to wandb."""
        if not self.enabled:
            return
        utils.write_csv(self.dir / "metrics.csv", history, METRIC_COLUMNS)
        self.unplotted = history
        if self.plotted_at is None or time.monotonic() - self.plotted_at >= self.PLOT_EVERY_SECONDS:
            self.plot()
        row = history[-1]
        wandb_log(self.wandb, {k: v for k, v in row.items() if k != "epoch"} | {"epoch": row["epoch"]}, row["epoch"])

    def plot(self) -> None:
        """Redraw curves.png from the history written last, if it does not show it yet."""
        if self.unplotted is not None:
            plot_curves(self.unplotted, self.dir / "curves.png")
            self.plotted_at, self.unplotted = time.monotonic(), None

    def write_summary(self, summary: dict, preview, step: int) -> None:
        """curves.png as the run ended, summary.json, predictions.png (and to wandb), and where everything is."""
        if not self.enabled:
            return
        self.plot()
        images, masks, predictions, ids = preview
        if len(ids):
            plot_predictions(images, masks, predictions, self.dir / "predictions.png", titles=ids)
            log_wandb_predictions(self.wandb, images, masks, predictions, ids, step)
        utils.write_json(self.dir / "summary.json", summary)
        utils.print0(f"\nbest validation Dice {summary['best_val_dice']:.4f} at epoch {summary['best_epoch']}\n"
                     f"  checkpoints  {self.dir / 'best.pt'}, {self.dir / 'last.pt'}\n"
                     f"  metrics      {self.dir / 'metrics.csv'}, {self.dir / 'summary.json'}\n"
                     f"  figures      {self.dir / 'curves.png'}, {self.dir / 'predictions.png'}\n"
                     f"  predict with python predict.py --checkpoint {self.dir / 'best.pt'}")
