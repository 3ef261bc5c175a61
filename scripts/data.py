"""Datalists: reading, validating and summarising the bundle's JSON datalists.

Format (MONAI decathlon style): ``{"training": [...], "validation": [...], "test": [...], ...}``, each
item ``{"image": path, "subject": id, "age": years (omitted for unlabelled scans), ...extra}``.
Relative image paths resolve against the datalist's folder. Nothing in a datalist is evaluated.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Iterable

from scripts import phantom
from scripts.cli import BundleError

SPLITS = ("training", "validation", "calibration", "test")
IMAGE_SUFFIXES = (".nii", ".nii.gz")


class DatalistError(BundleError, ValueError):
    """A datalist problem, reported in one line that names the file, the item and the reason."""


def subject_from_path(image: str) -> str:
    """Default subject id: the path as given without its NIfTI/NumPy extension (``a/T1w.nii.gz`` -> ``a/T1w``).

    Pass a path relative to the input root, so that ``a/T1w.nii.gz`` and ``b/T1w.nii.gz`` stay two scans.
    """
    name = Path(image).as_posix()
    for suffix in (".nii.gz", ".nii", ".npy"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def parse_age(value, where: str) -> float:
    """A finite, non-negative age in years, or a :class:`DatalistError` saying why not."""
    if isinstance(value, bool):
        raise DatalistError(f"{where}: age {value!r} is not a number")
    try:
        age = float(value)
    except (TypeError, ValueError):
        raise DatalistError(f"{where}: age {value!r} is not a number") from None
    if not math.isfinite(age) or age < 0:
        raise DatalistError(f"{where}: age {value!r} must be a finite number >= 0")
    return age


def read_json(path: str | Path) -> dict:
    """The datalist file's JSON object, or a :class:`DatalistError` saying why it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise DatalistError(f"{path}: datalist not found")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatalistError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise DatalistError(f"{path}: expected an object with split lists such as 'training', got {type(raw).__name__}")
    return raw


def load_datalist(
    path: str | Path,
    splits: Iterable[str] | None = None,
    check_files: bool = True,
    check_leakage: bool = True,
    require_age: Iterable[str] = (),
) -> dict[str, list[dict]]:
    """Read and validate a datalist; return ``{split: [item, ...]}`` with absolute image paths.

    Every item gets ``subject`` (default: the image file name) and ``age`` (``nan`` for unlabelled
    items, so batches collate; the loss masks them). Raises :class:`DatalistError` for missing or
    malformed keys, bad ages, missing files (``check_files``), duplicated subjects within a split,
    a subject (``participant_id`` where items have one) in more than one of training/validation/test
    (``check_leakage``), a requested split that is absent or empty, and an item without an age in a
    ``require_age`` split. Without ``splits``, every non-empty list is read.
    """
    path = Path(path)
    raw = read_json(path)
    wanted = [split for split in raw if raw[split]] if splits is None else list(splits)  # every non-empty list
    for split in wanted:
        if not raw.get(split):
            raise DatalistError(f"{path}: no '{split}' items (found: {', '.join(raw) or 'nothing'})")
    out = {split: _parse_split(path, split, raw[split], check_files) for split in wanted}
    for split in require_age:
        for item in out.get(split, []):
            if not is_labelled(item):
                raise DatalistError(
                    f"{path}: {split} item {item['subject']} has no 'age'; every {split} item needs one"
                )
    if check_leakage:
        seen: dict[str, str] = {}
        images: dict[str, str] = {}
        for split in (s for s in SPLITS if s in raw):
            items = out[split] if split in out else _parse_split(path, split, raw[split], check_files=False)
            for it in items:
                person = participant(it)
                first = seen.setdefault(person, split)
                if first != split:
                    raise DatalistError(
                        f"{path}: participant {person} is in both '{first}' and '{split}' (data leakage; "
                        "give every scan of one person the same participant_id, and keep them in one split)"
                    )
                first = images.setdefault(it["image"], split)
                if first != split:
                    raise DatalistError(
                        f"{path}: image {it['image']} is in both '{first}' and '{split}' (data leakage)"
                    )
    return out


def optional_split(path: str | Path, split: str) -> list[dict]:
    """The items of ``split`` when the datalist has it (each with an age), else ``[]``; validated as
    :func:`load_datalist` does, leakage across splits included."""
    if not read_json(path).get(split):
        return []
    return load_datalist(path, splits=[split], require_age=[split])[split]


def _parse_split(path: Path, split: str, items, check_files: bool) -> list[dict]:
    if not isinstance(items, list):
        raise DatalistError(f"{path}: '{split}' must be a list of items")
    parsed = []
    for i, item in enumerate(items):
        where = f"{path}: {split}[{i}]"
        if not isinstance(item, dict):
            raise DatalistError(f"{where}: item must be an object, got {type(item).__name__}")
        image = item.get("image")
        if not isinstance(image, str) or not image:
            raise DatalistError(f"{where}: missing 'image' path")
        resolved = Path(image) if Path(image).is_absolute() else path.parent / image
        subject = str(item.get("subject") or subject_from_path(image))
        where = f"{where} ({subject})"
        if check_files and not (resolved.is_file() or resolved.is_dir()):  # a folder: a DICOM series
            raise DatalistError(f"{where}: image {resolved} does not exist")
        clean = dict(item, image=str(resolved), subject=subject)
        clean["age"] = parse_age(item["age"], where) if item.get("age") is not None else math.nan
        parsed.append(clean)
    counts = Counter(it["subject"] for it in parsed)
    for subject, n in counts.items():
        if n > 1:
            raise DatalistError(f"{path}: subject {subject} appears {n} times in '{split}'")
    return parsed


BIDS_SCAN_ID = re.compile(r"(sub-[A-Za-z0-9]+)_(?:ses|acq|run|rec|ce)-[A-Za-z0-9]+(?:_.*)?")


def participant(item: dict) -> str:
    """Who a scan belongs to, for leakage checks and splits: ``participant_id`` (several scans per person: re-scans,
    follow-up sessions), else the ``sub-<label>`` of a BIDS-style scan id such as ``sub-01_ses-2``, else ``subject``.
    """
    if item.get("participant_id"):
        return str(item["participant_id"])
    subject = str(item["subject"])
    match = BIDS_SCAN_ID.fullmatch(subject)
    return match.group(1) if match else subject


def is_labelled(item: dict) -> bool:
    age = item.get("age")
    return age is not None and not (isinstance(age, float) and math.isnan(age))


def items_digest(items: Iterable[dict]) -> str:
    """A short digest of what a list of items is (subject, image file name, age), for telling two datasets apart.

    File names rather than paths, so a dataset moved to another folder is still the same dataset.
    """

    rows = [[str(it.get("subject", "")), Path(str(it["image"])).name, _age_text(it.get("age"))] for it in items]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def _age_text(age) -> str:
    return "" if age is None or (isinstance(age, float) and math.isnan(age)) else repr(float(age))


def age_statistics(items: Iterable[dict]) -> tuple[float, float]:
    """Mean and standard deviation of the labelled ages; the age head normalises its targets with them."""
    ages = [float(it["age"]) for it in items if is_labelled(it)]
    if not ages:
        raise DatalistError("no labelled items: the age head needs at least one age to train")
    mean = sum(ages) / len(ages)
    var = sum((a - mean) ** 2 for a in ages) / max(len(ages) - 1, 1)
    return mean, max(math.sqrt(var), 1.0)


def embedded_phantom(
    dataset_dir: str | Path,
    n: int = 600,
    seed: int = 0,
    channels: int = 1,
    levels: int = 1,
    level_spacing: int = 4,
    n_calibration: int = 240,
    n_disease: int | None = None,
) -> str:
    """The embedded default dataset: a phantom cohort generated once into ``dataset_dir``; its datalist.

    600 healthy research-grade subjects (420 training of which 25 % unlabelled, 90 validation, 90 test), 120
    with accelerated ageing and survival times, and a calibration split of 240 more healthy people, about half of
    them clinical grade (the prediction interval is fitted on it: >= 100 of each kind keeps its coverage near
    90 %); generated by two processes. ``n``, ``n_disease`` (default ``n // 5``) and ``n_calibration`` size the
    cohorts; ``channels``, ``levels`` and ``level_spacing`` as
    preprocessing's ``slice_*`` keys (other values regenerate it).
    """

    return phantom.ensure_dataset(
        dataset_dir,
        phantom.CohortSpec(n=n, seed=seed, n_disease=n_disease, n_calibration=n_calibration),
        channels=int(channels),
        levels=int(levels),
        level_spacing=int(level_spacing),
        workers=min(2, os.cpu_count() or 1),
    )
