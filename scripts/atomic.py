"""Atomic file writes and safe file names: every output of the bundle goes through here.

A file is written under a temporary name in its own folder (``.<name>.tmp<pid><ext>``, hidden, same
extension so writers that choose the format by suffix still work) and renamed over the target, so a kill
never leaves a half-written file under the final name. Batch jobs remove temporaries of killed runs by the
``.*.tmp*`` pattern.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def safe_name(text: str) -> str:
    """``text`` as one file name inside an output folder: itself when it is plain (letters, digits, ``._-``, no
    leading dot), else its unsafe runs replaced by ``_`` and a digest of the original appended, so that two ids
    never share a file and none (``../../x``, ``a/b``) leaves the folder."""
    text = str(text)
    if SAFE_NAME.fullmatch(text) and text not in (".", ".."):
        return text
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:80] or "scan"
    return f"{cleaned}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def temporary_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    return path.with_name(f".{path.name}.tmp{os.getpid()}{suffix}")


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """``write(tmp_path)``, then rename it to ``path`` (its folder is created); returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | os.PathLike, obj, **kwargs) -> Path:
    """Indented by 4 and newline-terminated: the layout of the Model Zoo's pretty-format-json hook."""
    return write_text(path, json.dumps(obj, indent=4, **kwargs) + "\n")


def write_csv(path: str | os.PathLike, rows, fieldnames, **writer_kwargs) -> Path:
    """Rows (dicts) under a header of ``fieldnames``; ``writer_kwargs`` go to ``csv.DictWriter`` (e.g. a delimiter)."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(fieldnames), lineterminator="\n", **writer_kwargs)
            writer.writeheader()
            writer.writerows(rows)

    return write_atomic(path, write)
