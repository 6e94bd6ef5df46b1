"""predict.py's output folder: which checkpoint and settings its masks came from, and resuming it.

A folder's predictions.json records the checkpoints' sha256 and the settings that decide a mask. A run
that finds its own record skips the images whose files are all there (a requeued job, the parts of an
array job); a run with another checkpoint or threshold is refused instead of mixing masks unnoticed.
Every file is written whole (utils.atomic_write), so a file under its final name is never half written.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


class OutputError(RuntimeError):
    """The output folder belongs to another run, or cannot be claimed; the message says what to do."""


RECORD = "predictions.json"  # in the output folder: the checkpoints and settings its masks came from
SETTINGS = ("threshold", "tta", "postprocess")  # with the checkpoints' contents (input size included), what decides a mask


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def output_record(paths: list[Path], loaded, config) -> dict:
    """What the masks of this run depend on: the checkpoints' bytes (not their paths) and the settings
    (`loaded`: predict.LoadedModel, `config`: predict.PredictConfig)."""
    return {"checkpoints": [{"path": str(path), "sha256": file_sha256(path)} for path in paths],
            "image_size": loaded.image_size, "threshold": config.threshold, "tta": config.tta,
            "postprocess": config.postprocess}


def record_differences(there: dict, here: dict) -> list[str]:
    differences = []
    if [c.get("sha256") for c in there.get("checkpoints", [])] != [c["sha256"] for c in here["checkpoints"]]:
        names = ", ".join(c.get("path", "?") for c in there.get("checkpoints", []))
        differences.append(f"another checkpoint ({names}, other contents than {here['checkpoints'][0]['path']})")
    differences += [f"--{key} {there.get(key)} (here {here[key]})" for key in SETTINGS if there.get(key) != here[key]]
    return differences


def claim_output(output_dir: Path, record: dict, overwrite: bool) -> None:
    """Write predictions.json, or check that the one there is this run's: masks of two checkpoints, or of
    two thresholds, must never share a folder unnoticed. Parts of an array job claim one folder at once;
    the record appears whole (hard link of a finished file), so each part reads a complete one."""
    path = output_dir / RECORD
    # a finished draft, then linked (exclusive) or renamed into place: never a half-written record
    draft = output_dir / f".{Path(RECORD).stem}.{os.getpid()}.tmp{Path(RECORD).suffix}"
    with open(draft, "w") as f:
        f.write(json.dumps(record, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    try:
        if overwrite:
            os.replace(draft, path)
            return
        masks = sorted(output_dir.glob("*_segmentation.png"))
        try:
            os.link(draft, path)
            if masks:  # masks from before the record, or from another tool
                path.unlink()
                raise OutputError(f"{output_dir} holds {len(masks)} masks (e.g. {masks[0].name}) but no {RECORD} "
                                   f"saying which checkpoint wrote them; pass --overwrite to replace them, or choose "
                                   f"another --output")
            return
        except FileExistsError:
            pass
    finally:
        draft.unlink(missing_ok=True)
    try:
        there = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise OutputError(f"cannot read {path} ({err}); delete it, or pass --overwrite to segment every image "
                           f"again") from None
    differences = record_differences(there, record)
    if differences:
        raise OutputError(f"{output_dir} holds masks written with {'; '.join(differences)}; choose another "
                           f"--output, or pass --overwrite to replace them")


def part_of(items: list, parts: int, part: int) -> list:
    """The part-th of `parts` consecutive slices of nearly equal size (sizes differ by one at most)."""
    if parts > len(items):
        raise OutputError(f"--parts {parts} is more than the {len(items)} images to segment; use at most "
                           f"{len(items)} parts")
    return items[(part - 1) * len(items) // parts: part * len(items) // parts]


def mask_path(item, output_dir: Path) -> Path:
    """Where an image's mask goes: <id>_segmentation.png, as the challenge names it."""
    return output_dir / f"{item.id}_segmentation.png"


def output_paths(item, output_dir: Path, config) -> list[Path]:
    """The files this image gets: its mask, and its overlay and probability map when asked for."""
    paths = [mask_path(item, output_dir)]
    if config.save_probabilities:
        paths.append(output_dir / "probabilities" / f"{item.id}_probability.png")
    if config.overlay:
        paths.append(output_dir / "overlays" / f"{item.id}_overlay.jpg")
    return paths
