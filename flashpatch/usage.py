"""Checks of what a user asked for, made before any long work starts: each failure is one line that names the
option, what is wrong and what to do. The CLI prints it and exits 2."""

from __future__ import annotations

import difflib
import importlib.util
import os


class UsageError(ValueError):
    """Bad model, data or option: the CLI prints the message and exits 2."""


def at_least(option: str, value: int | float | None, minimum: int | float, what: str = "") -> None:
    """`value` (None: the option was not given) must be >= minimum."""
    if value is not None and value < minimum:
        raise UsageError(f"{option} {value}: must be at least {minimum}{what}")


def int_list(option: str, text: str, minimum: int = 1) -> list[int]:
    """'512,1024' -> [512, 1024]: integers >= minimum, at least one."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"{option} {text!r}: comma-separated integers, e.g. 512,1024") from None
    if not values:
        raise UsageError(f"{option} {text!r}: give at least one value")
    bad = [v for v in values if v < minimum]
    if bad:
        raise UsageError(f"{option} {text!r}: every value must be at least {minimum} (got {bad[0]})")
    return values


def length_range(option: str, text: str, minimum: int = 1) -> tuple[int, int]:
    """'512-4096' -> (512, 4096), 'N' -> (N, N): integers >= minimum, low end first."""
    parts = text.strip().split("-")
    try:
        if len(parts) not in (1, 2):
            raise ValueError
        low, high = int(parts[0]), int(parts[-1])
    except ValueError:
        raise UsageError(f"{option} {text!r}: a range LO-HI of integers, e.g. 512-4096 (or one length)") from None
    if low < minimum:
        raise UsageError(f"{option} {text!r}: lengths must be at least {minimum} (got {low})")
    if low > high:
        raise UsageError(f"{option} {text!r}: the low end comes first, e.g. {high}-{low}")
    return low, high


def text_lines(option: str, path: str) -> list[str]:
    """A UTF-8 text file's non-blank lines (one prompt each, say): a missing, unreadable, non-UTF-8 or blank file is
    said at once."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\r\n") for line in f]
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{option} {path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                         f"{exc.start}); convert it, e.g. iconv -t utf-8") from None
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise UsageError(f"{option} {path}: every line is blank; give one item a line")
    return lines


def name_list(option: str, text: str, allowed) -> list[str]:
    """'a,b' -> ['a', 'b'], each one of `allowed`."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    for name in names:
        if name not in allowed:
            raise UsageError(f"{option}: {name!r} is not one of {', '.join(allowed)}{_did_you_mean(name, allowed)}")
    return names


def output_file(option: str, path: str | None) -> None:
    """A file the run will write at the end: its folder must exist and be writable now, not after the run."""
    if path is None or path == "-":
        return
    if os.path.isdir(path):
        raise UsageError(f"{option} {path}: is a folder; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{option} {path}: folder {folder} does not exist; create it or choose another path")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{option} {path}: folder {folder} is not writable")


def device_name(device: str | None) -> str | None:
    """None (choose), 'cpu', 'cuda' or 'cuda:N'."""
    if device is None or device in ("cpu", "cuda"):
        return device
    if device.startswith("cuda:") and device[5:].isdigit():
        return device
    raise UsageError(f"--device {device!r}: flashpatch runs on cuda (cuda:N) or cpu")


def need_module(module: str, purpose: str, install: str) -> None:
    """An optional dependency, checked before the run that needs it."""
    if importlib.util.find_spec(module) is None:
        raise UsageError(f"{purpose} needs the {module} package: {install}")


def unknown_model(spec: str, presets) -> UsageError:
    """A bare name that is neither a preset nor a local folder: said at once, with the nearest presets, rather
    than after the hub's retries."""
    return UsageError(f"model {spec!r} is not a preset, a local folder or a .gguf file"
                      f"{_did_you_mean(spec, presets)}; presets: {', '.join(presets)}; hub ids look like owner/name")


def _did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
