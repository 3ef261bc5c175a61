"""Command-line conventions shared by the bundle's tools: ``python -m scripts.*`` and the bundle's workflows."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

#: Set to 1 for the full traceback of a :class:`BundleError` (otherwise one line).
TRACEBACK_VARIABLE = "BRAINAGE_TRACEBACK"


class BundleError(Exception):
    """A problem with the user's input or settings (not a bug): its message is the whole report, in one line.

    The bundle's own error classes derive from it (datalists, BIDS, DICOM, shards, resume, calibration, ...), so
    :func:`report_errors_in_one_line` can tell them from bugs, whose tracebacks stay.
    """


def root_cause(err: BaseException) -> BaseException:
    """The innermost cause of an exception chain: ``monai.bundle`` wraps what a config expression raises in
    ``RuntimeError("Failed to evaluate ...")``, once per level of ``@`` reference."""
    seen = {id(err)}
    while err.__cause__ is not None and id(err.__cause__) not in seen:
        err = err.__cause__
        seen.add(id(err))
    return err


def report_errors_in_one_line() -> None:
    """Make an uncaught :class:`BundleError` end the process with the line ``error: <reason>`` (exit status 1).

    Called first in every workflow's run list, so that ``python -m monai.bundle run ...`` reports a bad input as
    one line instead of a traceback with the reason in its middle. Any other exception keeps its traceback, and
    ``BRAINAGE_TRACEBACK=1`` keeps it for these too.
    """
    previous = sys.excepthook
    if getattr(previous, "reports_bundle_errors", False):
        return

    def hook(kind, err, traceback):
        cause = root_cause(err)
        if isinstance(cause, BundleError) and os.environ.get(TRACEBACK_VARIABLE, "") in ("", "0"):
            sys.stderr.write(f"error: {cause}\n")
        else:
            previous(kind, err, traceback)

    hook.reports_bundle_errors = True
    sys.excepthook = hook


def snake_case_flag(token: str) -> str:
    """``--n-disease`` -> ``--n_disease`` (``--name=value`` too); any other token unchanged."""
    if not token.startswith("--") or token == "--":
        return token
    name, equals, value = token.partition("=")
    return "--" + name[2:].replace("-", "_") + equals + value


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` with the bundle's flag spelling and a one-line error (``prog: error: reason``), exit code 2.

    Flags are spelt as the settings they set, in snake case, as the configs and ``python -m monai.bundle``'s own
    flags are (``--config_file``, ``--image_size``); a hyphenated spelling (``--image-size``) is read as the same
    flag. The stock parser prints the whole usage block before an error, which buries the reason in batch logs;
    ``--help`` still shows the full usage.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):  # noqa: D102 - argparse hook
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args([snake_case_flag(token) for token in args], namespace)

    def error(self, message: str):  # noqa: D102 - argparse hook
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


FLAG_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def flag(value, key: str) -> bool:
    """A config's on/off setting ``key`` as a bool, however the command line spelt it.

    ``python -m monai.bundle run`` hands ``--use_ema false`` over as the string ``'false'``, which Python reads as
    true; every reference to an on/off key in the configs goes through here, so that ``false``, ``no``, ``off`` and
    ``0`` turn it off, and any other word is a one-line error instead of a silent "on".
    """
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word not in FLAG_WORDS:
        raise BundleError(f"--{key} {value!r}: expected true or false")
    return FLAG_WORDS[word]


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def existing_file(text: str) -> str:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return text
