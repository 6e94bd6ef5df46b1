"""Small pieces shared by the scripts: seeding, rank-0 printing, progress, atomic writes, dataclass configs.

Nothing here knows about data layouts, the network or the hardware (devices.py), nor the checkpoint
format (checkpoint.py).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import difflib
import inspect
import json
import math
import os
import random
import re
import signal
import sys
import time
import types
import typing
from pathlib import Path

import numpy as np
import torch




def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and PyTorch (all devices); optionally force deterministic kernels.

    Each distributed rank should pass ``seed + rank`` so that augmentation differs across ranks.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds CUDA and MPS generators as well
    if deterministic:
        # cuBLAS needs this workspace setting before deterministic matmuls are allowed
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def get_rank() -> int:
    """Global rank under torchrun (0 when not distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", 0))


def stop_signals() -> list[int]:
    """The signals that ask a run to stop cleanly: SLURM's warning before a time limit (USR1) and
    preemption's TERM. Windows has no USR1."""
    return [getattr(signal, name) for name in ("SIGUSR1", "SIGTERM") if hasattr(signal, name)]


def is_main_process() -> bool:
    return get_rank() == 0


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only, so a multi-GPU run prints each line once."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


class Progress:
    """A progress bar over `total` steps: tqdm when stderr (where tqdm draws) is a terminal; otherwise,
    as in a SLURM job log, a plain line on stdout at each quarter and at least every `interval` seconds,
    because tqdm's carriage-return redraws make a log file unreadable. It offers the part of tqdm's
    interface the training loop uses: n, set_postfix, update, close.
    """

    def __init__(self, total: int, initial: int = 0, desc: str = "", enabled: bool = True, interval: float = 30.0,
                 terminal: bool | None = None, stream=None, clock=time.monotonic):
        self.total, self.n, self.desc, self.interval = total, initial, desc, interval
        self.enabled, self.stream, self.clock = enabled, stream, clock
        self.postfix: dict[str, str] = {}
        self._bar = None
        if enabled and (sys.stderr.isatty() if terminal is None else terminal):
            from tqdm import tqdm
            self._bar = tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True, unit="step")
        self._initial = initial
        self._started = self._last_line = clock()
        self._quarters = [math.ceil(total * k / 4) for k in (1, 2, 3)]

    def set_postfix(self, **values) -> None:
        self.postfix = {k: str(v) for k, v in values.items()}
        if self._bar is not None:
            self._bar.set_postfix(values)

    def update(self, steps: int = 1) -> None:
        before, self.n = self.n, self.n + steps
        if self._bar is not None:
            self._bar.update(steps)
            return
        if not self.enabled or self.n >= self.total:  # the epoch's summary line follows the last step
            return
        now = self.clock()
        if any(before < mark <= self.n for mark in self._quarters) or now - self._last_line >= self.interval:
            self._last_line = now
            print(self.line(now), file=self.stream or sys.stdout, flush=True)

    def line(self, now: float) -> str:
        """'epoch 2/8  step 15/30 (50%)  loss 0.4123  img_s 3.2  ETA 0:00:04'; the rate counts only the
        steps of this process, so a resumed epoch's ETA is not thrown off by the steps done before it."""
        rate = (self.n - self._initial) / max(now - self._started, 1e-9)
        eta = time.strftime("%H:%M:%S", time.gmtime((self.total - self.n) / rate)) if rate > 0 else "?"
        parts = [self.desc, f"step {self.n}/{self.total} ({100 * self.n // max(self.total, 1)}%)",
                 *(f"{k} {v}" for k, v in self.postfix.items()), f"ETA {eta}"]
        return "  ".join(part for part in parts if part)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# Configuration: argparse generated from a dataclass, with an optional JSON/YAML file.


class ConfigError(ValueError):
    """A configuration file or flag that cannot be used; the message says which and why."""


def _declaring_classes(cls) -> list[type]:
    """The dataclasses that declare `cls`'s fields, in field order: a config composed from the configs of the
    files that own its settings (train.TrainConfig from dataset.DataConfig, modules.ModelConfig, ...) reads
    each field's comment and group from the class that declares it."""
    return [c for c in reversed(cls.__mro__) if "__dataclass_fields__" in vars(c)]


def settings(cls) -> list[dataclasses.Field]:
    """The fields of a config dataclass that a user sets (flags, config-file keys). A field declared with
    metadata {"setting": False} is fixed by the task and only carried along (modules.ModelConfig.in_channels)."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("setting", True)]


def field_help(cls) -> dict[str, str]:
    """The one-line comment after each field of a dataclass, used as that flag's help text."""
    helps = {}
    for declaring in _declaring_classes(cls):
        for line in inspect.getsource(declaring).splitlines():
            match = re.match(r"\s+(\w+):[^#]*#\s*(.+)$", line)
            if match:
                helps[match.group(1)] = match.group(2).strip()
    return helps


@contextlib.contextmanager
def atomic_write(path):
    """Write `path` whole or not at all. Every whole file the project writes (records, results, checkpoints,
    masks) goes through here; the cache's memory-mapped arrays (dataset.py) and download.py's resumable
    `.part` files are the two files written in place, each renamed only when complete.

    Yields a temporary path beside `path` (hidden, carrying this process's id, and ending in `path`'s own
    suffix, so writers that infer the format from the name still do). When the block ends, the file is
    fsynced and renamed over `path`, and the rename is made durable where the file system allows. When
    the block fails, the temporary file is removed and `path` stays as it was; an OSError (a full disk,
    an exceeded quota) is raised again naming `path`. A process killed mid-write leaves a hidden
    `.<stem>.<pid>.tmp<suffix>` file behind, never a half-written `path`.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError):
            raise OSError(err.errno, err.strerror or str(err), str(path)) from None
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable. Best effort: Windows cannot open folders, and some network file
    systems refuse to fsync them."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_csv(path, rows: list[dict], columns: list[str]) -> None:
    """Write rows as CSV atomically (atomic_write): a reader never sees half a table. The columns are
    `columns`, then every other key the rows hold, in the order they first appear: no value is dropped."""
    extra = [key for key in dict.fromkeys(key for row in rows for key in row) if key not in columns]
    with atomic_write(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[*columns, *extra])
            writer.writeheader()
            writer.writerows(rows)


def field_groups(cls) -> dict[str, list[str]]:
    """Help groups of a dataclass's settings, from the `# --- name ---` comment lines of the classes that
    declare them (fields in order; a group named again by a later class gathers its fields too)."""
    names = {f.name for f in settings(cls)}
    groups = {}
    for declaring in _declaring_classes(cls):
        current = "options"
        for line in inspect.getsource(declaring).splitlines():
            marker = re.match(r"\s+# --- (.+?) ---", line)
            if marker:
                current = marker.group(1)
                continue
            match = re.match(r"\s+(\w+):", line)
            if match and match.group(1) in names and match.group(1) in inspect.get_annotations(declaring):
                groups.setdefault(current, []).append(match.group(1))
    return groups


def field_choices(cls) -> dict[str, list]:
    """The allowed values of the fields annotated with typing.Literal (or Literal | None), directly or through
    an alias of the file that owns the setting."""
    return {name: list(typing.get_args(_options(hint)[0])) for name, hint in typing.get_type_hints(cls).items()
            if _field_kind(hint) == "literal"}


def subconfig(cls, config, **overrides):
    """An instance of dataclass `cls` with the fields it shares with `config` copied over (then overrides)."""
    shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(cls) if hasattr(config, f.name)}
    return cls(**{**shared, **overrides})


def _options(hint) -> list:
    """The annotation's types without None: [X] for X and for X | None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [h for h in typing.get_args(hint) if h is not type(None)]
    return [hint]


def _field_kind(hint) -> str:
    """"bool", "int", "float", "str", "list[str]" or "literal" for a resolved annotation. A Literal may be
    an alias that the file owning the setting declares (losses.LossKind, modules.Arch, devices.Amp, ...)."""
    base = _options(hint)[0]
    if typing.get_origin(base) is typing.Literal:
        return "literal"
    if typing.get_origin(base) is list:
        return "list[str]"
    return {bool: "bool", int: "int", float: "float"}.get(base, "str")


def _coerce(name: str, hint, value, source: str):
    """Check a value from a config file against the field's resolved type (ints are accepted as floats)."""
    kind = _field_kind(hint)
    if value is None and type(None) in typing.get_args(hint):
        return None
    if kind == "literal":
        allowed = list(typing.get_args(_options(hint)[0]))
        if value not in allowed:
            raise ConfigError(f"{source}: {name} must be one of {', '.join(map(str, allowed))}, got {value!r}")
        return value
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "list[str]": isinstance(value, list) and all(isinstance(v, str) for v in value),
    }.get(kind, True)
    if not ok:
        raise ConfigError(f"{source}: {name} must be {kind}, got {value!r} ({type(value).__name__})")
    return float(value) if kind == "float" else value


def read_config_file(path: str | os.PathLike, cls) -> dict:
    """Settings from a JSON or YAML file, checked against the dataclass (unknown keys, types)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix.lower() in {".yaml", ".yml"}:
            import yaml  # only YAML configs need it (wandb depends on PyYAML anyway)

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except Exception as err:  # both parsers raise their own error types
        raise ConfigError(f"config file {path} could not be parsed: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of setting names to values")
    fields = {f.name: f for f in settings(cls)}
    hints = typing.get_type_hints(cls)
    checked = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"config file {path}: unknown setting {key!r}{hint}")
        checked[name] = _coerce(name, hints[name], value, f"config file {path}")
    return checked


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults and keeps the description's own line breaks."""


def build_parser(cls, description: str, groups: dict[str, list[str]] | None = None,
                 choices: dict[str, list[str]] | None = None,
                 suppress_defaults: bool = False, metavars: dict[str, str] | None = None,
                 epilog: str | None = None, prog: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser generated from a dataclass: one --kebab-case flag per field, grouped, with
    the field's comment as help and BooleanOptionalAction for switches. Groups default to the class's
    `# --- name ---` sections and choices to its Literal annotations."""
    groups = groups or field_groups(cls)
    choices, metavars = {**field_choices(cls), **(choices or {})}, metavars or {}
    parser = argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog, formatter_class=_HelpFormatter,
        argument_default=argparse.SUPPRESS if suppress_defaults else None,
    )
    helps = field_help(cls)
    fields = {f.name: f for f in settings(cls)}
    hints = typing.get_type_hints(cls)
    missing = set(fields) - {name for names in groups.values() for name in names}
    assert not missing, f"fields without a help group: {missing}"
    for title, names in groups.items():
        group = parser.add_argument_group(title)
        for name in names:
            f = fields[name]
            kind = _field_kind(hints[name])
            flag = "--" + name.replace("_", "-")
            kwargs = {"help": helps.get(name, "").replace("%", "%%")}  # argparse %-formats help strings
            if not suppress_defaults:
                kwargs["default"] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if kind == "bool":
                kwargs["action"] = argparse.BooleanOptionalAction
            elif kind == "list[str]":
                kwargs["nargs"] = "*"
                kwargs["metavar"] = metavars.get(name, "VALUE")
            else:
                kwargs["type"] = {"int": int, "float": float}.get(kind, str)
                kwargs["metavar"] = metavars.get(name, kind.upper() if kind in ("int", "float") else
                                                 name.split("_")[-1].upper())
            if name in choices:
                kwargs["choices"] = choices[name]
                kwargs.pop("metavar", None)
            group.add_argument(flag, **kwargs)
    return parser


def parse_config(cls, argv, description: str, groups=None, choices=None):
    """Two-stage parse: a --config file sets defaults, flags override them.

    Returns the config and the set of fields the user set (in the file or as flags).
    """
    parser = build_parser(cls, description, groups, choices)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    file_values = {}
    if known.config:
        try:
            file_values = read_config_file(known.config, cls)
        except ConfigError as err:
            parser.error(str(err))
        parser.set_defaults(**file_values)
    args = parser.parse_args(argv)
    given = vars(build_parser(cls, description, groups, choices, suppress_defaults=True).parse_args(argv))
    return cls(**vars(args)), set(file_values) | set(given), parser


# ----------------------------------------------------------------------------- machine


def _machine_busy_seconds() -> float | None:
    """CPU seconds all processes have used since boot (every core; steal time counts: another VM had it)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None  # not Linux
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()  # this process and its finished children
    return t.user + t.system + t.children_user + t.children_system


class OtherCpu:
    """Share of the machine's CPU time that other processes have used since this object was made: the busy
    time of all cores (/proc/stat) minus this process's own. Unlike the load average it neither lags by a
    minute nor counts the benchmark itself. share() is None where /proc/stat is missing."""

    def __init__(self):
        self.start = (time.monotonic(), _machine_busy_seconds(), _own_cpu_seconds())

    def share(self) -> float | None:
        wall, busy, own = time.monotonic(), _machine_busy_seconds(), _own_cpu_seconds()
        if busy is None or self.start[1] is None or wall <= self.start[0]:
            return None
        others = (busy - self.start[1]) - (own - self.start[2])
        return max(0.0, others) / ((wall - self.start[0]) * (os.cpu_count() or 1))


def write_json(path, value) -> None:
    """Write JSON atomically (atomic_write): a reader never sees half a file."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2) + "\n")
