"""Download and extract the official ISIC 2018 Task 1 zips (urllib only).

    python download.py --root data/ISIC2018 --splits train val test
    python download.py --root data/isic-truth --splits val test --masks-only   # the ground truth alone

Partial downloads resume with HTTP Range from <root>/downloads/<name>.zip.part; every zip is tested
(zipfile.testzip) and extracted member by member, refusing paths that would land outside <root>.
"""

from __future__ import annotations

import argparse
import http.client
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

from tqdm import tqdm

BASE_URL = "https://isic-challenge-data.s3.amazonaws.com/2018/"
ZIPS = {
    "train": ("ISIC2018_Task1-2_Training_Input.zip", "ISIC2018_Task1_Training_GroundTruth.zip"),
    "val": ("ISIC2018_Task1-2_Validation_Input.zip", "ISIC2018_Task1_Validation_GroundTruth.zip"),
    "test": ("ISIC2018_Task1-2_Test_Input.zip", "ISIC2018_Task1_Test_GroundTruth.zip"),
}
EXPECTED_COUNTS = {"train": 2594, "val": 100, "test": 1000}
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A download or extraction failed; the message says which file and what to do."""


def _is_offline(err: BaseException) -> bool:
    reason = getattr(err, "reason", err)
    return isinstance(reason, (socket.gaierror, ConnectionRefusedError)) or (
        isinstance(reason, OSError) and reason.errno in (101, 113))  # network / host unreachable


def _fetch(url: str, dest: Path, timeout: float) -> None:
    """One attempt: append to dest.part from where it stops (HTTP Range), then rename to dest."""
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing past the end: the .part is already whole
            part.replace(dest)
            return
        raise
    with response:
        if have and response.status != 206:  # the server ignored Range: start again
            have = 0
        total = response.headers.get("Content-Length")
        total = int(total) + have if total is not None else None
        with open(part, "ab" if have else "wb") as f, tqdm(
                total=total, initial=have, unit="B", unit_scale=True, desc=dest.name, leave=False,
                disable=total is not None and total < 1 << 22) as bar:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
    if total is not None and part.stat().st_size != total:
        raise http.client.IncompleteRead(b"", total - part.stat().st_size)
    part.replace(dest)


def download_file(url: str, dest: Path, retries: int = 5, backoff: float = 2.0, timeout: float = 60,
                  log: Callable = print) -> Path:
    """Download url to dest, resuming a partial dest.part; retries with exponential backoff."""
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, retries + 1):
        try:
            _fetch(url, dest, timeout)
            return dest
        except urllib.error.HTTPError as err:
            if err.code in (403, 404):
                raise DownloadError(f"{url} answered {err.code} {err.reason}; check --base-url") from None
            failure = err
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            if _is_offline(err):
                raise DownloadError(f"cannot reach {url} ({getattr(err, 'reason', err)}): no network? "
                                    f"Connect, or download the zips by hand into {dest.parent}") from None
            failure = err
        if attempt < retries:
            wait = backoff * 2 ** (attempt - 1)
            log(f"download: {dest.name}: {failure}; retrying in {wait:.0f}s ({attempt}/{retries})")
            time.sleep(wait)
    raise DownloadError(f"{url} failed {retries} times (last: {failure}); run the command again to resume")


def safe_extract(archive: Path, target: Path) -> list[str]:
    """Extract a zip under target, refusing absolute paths, '..' and links (zip-slip). Returns top-level names."""
    target = Path(target).resolve()
    tops = set()
    with zipfile.ZipFile(archive) as zf:
        members = [m for m in zf.infolist() if not m.filename.startswith("__MACOSX/")]
        for m in members:  # check everything before writing anything
            name = PurePosixPath(m.filename.replace("\\", "/"))
            dest = (target / name).resolve()
            is_link = (m.external_attr >> 16) & 0o170000 == 0o120000
            if name.is_absolute() or ".." in name.parts or ":" in m.filename or is_link \
                    or not dest.is_relative_to(target):
                raise DownloadError(f"{archive} holds an unsafe entry {m.filename!r} that would be written outside "
                                    f"{target}; the archive is not trustworthy: delete it and download it again")
        for m in members:
            dest = target / m.filename.replace("\\", "/")
            tops.add(PurePosixPath(m.filename).parts[0])
            if m.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(m) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, CHUNK)
    return sorted(tops)


def _check_zip(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
        return None if bad is None else f"member {bad} fails its CRC check"
    except (zipfile.BadZipFile, OSError) as err:
        return str(err)


def download_isic(root, splits: Sequence[str] = ("train", "val", "test"), *, base_url: str = BASE_URL,
                  expected_counts: dict[str, int] | None = EXPECTED_COUNTS, retries: int = 5,
                  backoff: float = 2.0, timeout: float = 60, masks_only: bool = False, log: Callable = print) -> Path:
    """Fetch, test and extract the ISIC 2018 Task 1 zips of `splits` into root; returns root. `masks_only`:
    the ground-truth zips alone (for images that are already at hand, such as a course's copy)."""
    root = Path(root)
    unknown = set(splits) - set(ZIPS)
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}; choose from {sorted(ZIPS)}")
    downloads = root / "downloads"
    for split in splits:
        for name in ZIPS[split][1:] if masks_only else ZIPS[split]:
            archive, done = downloads / name, downloads / (name + ".extracted")
            if done.exists():
                continue
            for attempt in (1, 2):
                download_file(base_url.rstrip("/") + "/" + name, archive, retries, backoff, timeout, log)
                problem = _check_zip(archive)
                if problem is None:
                    break
                archive.unlink()
                if attempt == 2:
                    raise DownloadError(f"{archive} is corrupt ({problem}) after two downloads; it was deleted, "
                                        "run the command again later")
                log(f"download: {name} is corrupt ({problem}); downloading it again")
            log(f"download: extracting {name}")
            safe_extract(archive, root)
            done.write_text("ok\n")
        if expected_counts and split in expected_counts:
            zip_name, pattern, what = (ZIPS[split][1], "*_segmentation.png", "masks") if masks_only else \
                (ZIPS[split][0], "*.jpg", "images")
            folder = root / zip_name.removesuffix(".zip")
            found = sum(1 for p in folder.glob(pattern)) if folder.is_dir() else 0
            if found != expected_counts[split]:
                raise DownloadError(f"{folder} holds {found} {what}, expected {expected_counts[split]}; delete it "
                                    f"and {downloads}/{zip_name}* and download again "
                                    "(or pass --no-check-counts for a partial copy)")
    log(f"download: {', '.join(splits)}{' ground truth' if masks_only else ''} ready in {root}")
    return root


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Download and extract the official ISIC 2018 Task 1 zips.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--root", default="data/ISIC2018", help="folder the zips are downloaded to and extracted in")
    parser.add_argument("--splits", nargs="+", choices=list(ZIPS), default=list(ZIPS), help="which splits to fetch")
    parser.add_argument("--base-url", default=BASE_URL, help="where the zips are served from")
    parser.add_argument("--check-counts", action=argparse.BooleanOptionalAction, default=True,
                        help="check the official image counts (2594 / 100 / 1000) after extraction")
    parser.add_argument("--retries", type=int, default=5, help="attempts per file before giving up")
    parser.add_argument("--masks-only", action="store_true",
                        help="only the ground-truth zips, for images you already have (a course's copy)")
    args = parser.parse_args(argv)
    try:
        download_isic(args.root, args.splits, base_url=args.base_url, retries=args.retries,
                      expected_counts=EXPECTED_COUNTS if args.check_counts else None, masks_only=args.masks_only)
    except DownloadError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
