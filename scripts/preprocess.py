"""Batch preprocessing: raw T1w scans of a datalist -> cached 128x128 slices, QC images and a manifest.

``configs/preprocess.yaml`` (run id ``preprocess``) calls :func:`preprocess_datalist`; the inference
workflow reuses :func:`preprocess_items` for raw inputs. Each scan goes through the transform chain
(``scripts.transforms``) in a worker process and leaves, under the output folder::

    slices/<name>.nii.gz    the model input (``scripts.slices.slice_nifti``)
    qc/<name>.png           the slice with its brain-mask outline
    records/<name>.json     what happened: status, reason, seconds per stage, skull-strip method, ...

where ``<name>`` is ``<subject>_<key>`` and ``key`` hashes the input file's bytes together with the
settings of every transform in the chain. A record is written last and atomically, so a scan with
a record is done: a second run, or a run resumed after a kill, skips it. A run ends with
``datalist.json`` (the input datalist, ``image`` pointing at the slices, failed scans left out),
``manifest.csv`` (one row per scan) and ``qc_montage.png``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import pickle
import re
import sys
import time
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser
from tqdm import tqdm

from scripts import bids, shards
from scripts.atomic import safe_name, write_atomic, write_csv, write_json
from scripts.data import read_json
from scripts.figures import qc_montage, qc_slice
from scripts.slices import centre_channels, slice_nifti

logger = logging.getLogger(__name__)

# Bump when an algorithm changes in a way the transforms' settings do not show; old caches go stale.
CHAIN_VERSION = "1"
STAGES = ("load", "register", "resample", "n4", "skull_strip", "slice", "write")
# Stage of the MONAI transforms the chain uses; the bundle's own transforms carry a `stage` attribute.
MONAI_STAGES = {"LoadImaged": "load", "Resized": "slice"}
MANIFEST_COLUMNS = (
    "subject",
    "source",
    "status",
    "reason",
    "skull_strip",
    "dicom_series",
    "cached",
    "slice",
    "qc",
    "template_correlation",
    "determinant",
    "brain_in_view",
    *(f"seconds_{s}" for s in STAGES),
    "seconds_total",
)


def chain_transforms(transform) -> list:
    """The transforms of a (possibly nested) MONAI ``Compose``, in order."""
    return list(transform.flatten().transforms) if hasattr(transform, "flatten") else [transform]


def chain_settings(transform) -> list:
    """What the cache key covers: each transform's class and, for the bundle's own, its ``settings``."""
    return [[type(t).__name__, getattr(t, "settings", {})] for t in chain_transforms(transform)]


def cache_key(path: str | Path, settings: list) -> str:
    """sha256 of the input's bytes (a file, or every file of a DICOM folder) and the chain's settings."""
    digest = hashlib.sha256()
    path = Path(path)
    # a DICOM series folder: the names and bytes of the files in it
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.name.encode())
        with open(file, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                digest.update(block)
    digest.update(json.dumps([CHAIN_VERSION, settings], sort_keys=True).encode())
    return digest.hexdigest()


def scan_name(item: dict, key: str) -> str:
    """File-name stem of a scan's outputs: the subject (or the input's file name) as a safe name, and the key."""
    subject = str(item.get("subject") or re.sub(r"\.nii(\.gz)?$", "", Path(item["image"]).name))
    return f"{safe_name(subject)}_{key[:12]}"


def _read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or left unreadable by something other than this module
        return None


def _first_reader_error(message: str) -> str:
    """MONAI's "cannot find a suitable reader" lists each reader's traceback; the first is nibabel's."""
    lines = message.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Traceback"):
            for following in lines[i + 1 :]:
                if not following.startswith(" "):
                    return following.split(": ", 1)[-1]
    return ""


def _reason(stage: str, err: Exception) -> str:
    """One line: the stage and what went wrong."""
    message = str(err)
    if message.startswith("LoadImage cannot find a suitable reader"):
        message = f"not a readable NIfTI file ({_first_reader_error(message) or type(err).__name__})"
    elif stage == "load" and isinstance(err, (EOFError, zlib.error)):  # a file cut short, e.g. by a killed copy
        message = f"not a readable NIfTI file (truncated or corrupt: {message})"
    message = " ".join(message.split()) or type(err).__name__
    return f"{stage}: {message[:300]}"


def preprocess_scan(
    item: dict, output_dir: str | Path, transform, settings: list | None = None, retry_failed: bool = False
) -> dict:
    """Preprocess one datalist item (``image``: an absolute path) unless its record says it is done.

    Returns the scan's record; ``cached`` tells whether this call did the work. Never raises for a
    bad scan: the record has ``status: failed`` and a one-line ``reason``.
    """

    out = Path(output_dir)
    source = str(item["image"])
    settings = chain_settings(transform) if settings is None else settings
    record = {"subject": item.get("subject", ""), "source": source}
    try:
        key = cache_key(source, settings)
    except OSError as err:  # nothing to key on: report, do not cache
        return {**record, "status": "failed", "reason": _reason("load", err), "cached": False, "seconds": {}}
    name = scan_name(item, key)
    record_path = out / "records" / f"{name}.json"
    done = _read_record(record_path)
    if done and (
        done.get("status") == "ok"
        and (out / done["slice"]).is_file()
        or done.get("status") == "failed"
        and not retry_failed
    ):
        return {**done, "subject": record["subject"], "cached": True}

    record.update(key=key, status="ok", reason="", skull_strip="", seconds={}, registration={})
    seconds = record["seconds"]
    data = {"image": source}
    stage = "load"
    start = time.perf_counter()
    try:
        for t in chain_transforms(transform):
            stage = getattr(t, "stage", None) or MONAI_STAGES.get(type(t).__name__, type(t).__name__)
            t0 = time.perf_counter()
            data = t(data)
            seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - t0
        stage = "write"
        t0 = time.perf_counter()
        image = np.asarray(data["image"], dtype=np.float32)
        mask = np.asarray(data["brain_mask"]) if "brain_mask" in data else None
        slice_file, qc_file = f"slices/{name}.nii.gz", f"qc/{name}.png"
        levels = int(data.get("slice_levels", 1))
        write_atomic(
            out / slice_file, lambda tmp: slice_nifti(image, data.get("slice_offset", 0), levels).to_filename(tmp)
        )
        image = centre_channels(image, levels)  # the QC image shows the centre (medial) level
        mask = None if mask is None else centre_channels(mask, levels)
        title = str(record["subject"] or name)
        if "registration" in data:
            title += f"  r={data['registration']['template_correlation']:.2f}"
        qc_slice(image, mask, out / qc_file, title=title)
        record.update(slice=slice_file, qc=qc_file)
        seconds[stage] = time.perf_counter() - t0
    except Exception as err:  # a bad scan must not stop the batch: it becomes a failure row
        record.update(status="failed", reason=_reason(stage, err))
    record["skull_strip"] = data.get("skull_strip", "")
    record["dicom_series"] = data.get("dicom_series", "")
    record["registration"] = data.get("registration", {})
    record["brain_in_view"] = data.get("brain_in_view", "")
    record["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    record["seconds_total"] = round(time.perf_counter() - start, 3)
    write_json(record_path, record)
    return {**record, "cached": False}


# -- worker processes --------------------------------------------------------------------------
_worker_transform = None


def _init_worker(transform_bytes: bytes, threads: int) -> None:
    """Give each worker ``threads`` threads (ITK/ANTs, torch, OpenMP) before the chain is unpickled."""
    global _worker_transform
    for var in ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS"):
        os.environ[var] = str(threads)
    import SimpleITK as sitk  # noqa: N813 (the library's own convention)

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    torch.set_num_threads(threads)
    _worker_transform = pickle.loads(transform_bytes)


def _work(args) -> dict:
    item, output_dir, settings, retry_failed = args
    return preprocess_scan(item, output_dir, _worker_transform, settings, retry_failed)


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary files of a killed run (their final names never appeared)."""
    for folder in (out, out / "slices", out / "qc", out / "records"):
        if folder.is_dir():
            for path in folder.glob(".*.tmp*"):
                path.unlink(missing_ok=True)


def preprocess_items(
    items: list[dict],
    output_dir: str | Path,
    transform,
    num_workers: int = 1,
    progress: bool = True,
    retry_failed: bool = False,
) -> list[dict]:
    """Preprocess datalist items (``image``: absolute paths) in ``num_workers`` processes.

    Returns one record per item, in order. Scans done before (same bytes, same chain settings) are
    not redone; failed ones are redone only with ``retry_failed``. With ``num_workers > 1`` the
    workers are spawned (fresh interpreters, safe with the thread pools of torch and ITK), so a
    script calling this must do so under ``if __name__ == "__main__":``.
    """

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out)
    settings = chain_settings(transform)
    unique = list(dict.fromkeys(str(it["image"]) for it in items))
    first = {}
    for it in items:
        first.setdefault(str(it["image"]), it)
    by_source: dict[str, dict] = {}
    bar = tqdm(total=len(unique), desc="preprocess", unit="scan", file=sys.stderr, disable=not progress)
    if num_workers <= 1:
        for source in unique:
            by_source[source] = preprocess_scan(first[source], out, transform, settings, retry_failed)
            bar.update()
    else:
        threads = max(1, (os.cpu_count() or 1) // num_workers)
        with ProcessPoolExecutor(
            num_workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(pickle.dumps(transform), threads),
        ) as pool:
            futures = {pool.submit(_work, (first[s], out, settings, retry_failed)): s for s in unique}
            for future in as_completed(futures):
                by_source[futures[future]] = future.result()
                bar.update()
    bar.close()
    return [{**by_source[str(it["image"])], "subject": it.get("subject", "")} for it in items]


# -- datalists ---------------------------------------------------------------------------------
def read_datalist(path: str | Path) -> dict:
    """A datalist whose item ``image`` paths are made absolute (relative ones resolve against its folder)."""

    path = Path(path)
    datalist = read_json(path)  # DatalistError (a ValueError) when missing, not JSON or not an object
    if not any(isinstance(v, list) for v in datalist.values()):
        raise ValueError(f'{path}: a datalist is a JSON object of item lists, e.g. {{"training": [...]}}')
    for split, items in datalist.items():
        if isinstance(items, list):
            for i, item in enumerate(items):
                if not isinstance(item, dict) or "image" not in item:
                    raise ValueError(f"{path}: item {i} of {split!r} has no 'image'")
                item["image"] = str((path.parent / os.path.expanduser(item["image"])).resolve())
    return datalist


def write_manifest(path: Path, rows: list[dict]) -> None:
    def row(r: dict) -> dict:
        seconds = r.get("seconds", {})
        registration = r.get("registration", {})
        return {
            "subject": r.get("subject", ""),
            "source": r.get("source", ""),
            "status": r["status"],
            "reason": r.get("reason", ""),
            "skull_strip": r.get("skull_strip", ""),
            "dicom_series": r.get("dicom_series", ""),
            "cached": str(bool(r.get("cached"))).lower(),
            "slice": r.get("slice", ""),
            "qc": r.get("qc", ""),
            "template_correlation": registration.get("template_correlation", ""),
            "determinant": registration.get("determinant", ""),
            "brain_in_view": r.get("brain_in_view", ""),
            **{f"seconds_{s}": seconds.get(s, "") for s in STAGES},
            "seconds_total": r.get("seconds_total", ""),
        }

    write_csv(path, [row(r) for r in rows], MANIFEST_COLUMNS)


def load_chain(bundle_root: str | Path, config_file: str = "configs/preprocess.yaml", **settings):
    """The raw-scan preprocessing chain (``preprocessing``) of the bundle's preprocess config, built with
    ``settings`` overriding its top-level keys (``skull_strip``, ``slice_channels``, ...).

    Read relative to ``bundle_root``, so inference and evaluation use the one definition of the chain and the
    bundle runs from any working directory (a ``%configs/...`` macro would be relative to the current one).
    """

    parser = ConfigParser()
    parser.read_config(str(Path(bundle_root) / config_file))
    parser.update({"bundle_root": str(bundle_root), **settings})
    return parser.get_parsed_content("preprocessing")


def resolve_datalist(
    datalist: str | Path,
    output_dir: str | Path,
    split_column: str | None = None,
    split_seed: int = 0,
    split_fractions=(0.6, 0.15, 0.1, 0.15),
) -> Path:
    """A datalist JSON path for ``datalist``: the file itself, or for a BIDS root its scans split by subject
    (``scripts.bids.split_items``) into ``output_dir/bids_datalist.json``."""

    path = Path(datalist).expanduser()
    if path.is_dir():
        if not bids.is_bids_root(path):
            raise ValueError(f"{path}: a folder, but not a BIDS dataset (no dataset_description.json or sub-* folders)")
        return bids.write_split_datalist(
            path, Path(output_dir) / "bids_datalist.json", split_column, int(split_seed), split_fractions
        )
    return path


def preprocess_datalist(
    datalist: str | Path,
    output_dir: str | Path,
    transform,
    num_workers: int = 1,
    retry_failed: bool = False,
    montage_max: int = 48,
    progress: bool = True,
    shard: str | None = None,
    split_column: str | None = None,
    split_seed: int = 0,
    split_fractions=(0.6, 0.15, 0.1, 0.15),
) -> list[dict]:
    """The ``preprocess`` workflow: every scan of ``datalist`` -> ``output_dir`` (see the module docstring).

    ``datalist`` may be a BIDS root, split by subject with ``split_column`` or ``split_seed`` /
    ``split_fractions`` (:func:`resolve_datalist`). With ``shard`` ``"i/N"`` only that shard's scans are
    done and the tables go to ``OUT/shards/`` for ``python -m scripts.merge OUT``.
    Logs the failures at the end and exits with status 1 only when no scan succeeded.
    """

    part = shards.parse_shard(shard)  # a bad spec stops here, before any work
    out = Path(output_dir)
    datalist = resolve_datalist(datalist, out, split_column, split_seed, split_fractions)
    data = read_datalist(datalist)
    entries = [(split, item) for split, items in data.items() if isinstance(items, list) for item in items]
    mine = {id(it) for it in shards.select([item for _, item in entries], part)}
    entries = [(split, item) for split, item in entries if id(item) in mine]
    records = preprocess_items([item for _, item in entries], out, transform, num_workers, progress, retry_failed)

    result: dict = {}
    for split, items in data.items():
        result[split] = [] if isinstance(items, list) else items
    for (split, item), record in zip(entries, records):
        if record["status"] == "ok":
            result[split].append({**item, "image": record["slice"]})
    ok = [r for r in records if r["status"] == "ok"]
    failed = [r for r in records if r["status"] != "ok"]
    cached = sum(bool(r.get("cached")) for r in records)
    if part is not None:
        write_json(shards.table_path(out, part, "datalist.json"), result)
        write_manifest(shards.table_path(out, part, "manifest.csv"), records)
        shards.write_record(out, part, "preprocess", len(records), ok=len(ok), failed=len(failed))
        logger.info(
            f"preprocess shard {part.index}/{part.count}: {len(ok)} ok ({cached} from cache), {len(failed)} failed"
        )
        for r in failed:
            logger.warning(f"failed: {r['source']}: {r['reason']}")
        return records
    write_json(out / "datalist.json", result)
    write_manifest(out / "manifest.csv", records)
    _montage(out, ok, len(failed), montage_max)
    logger.info(f"preprocess: {len(ok)} ok ({cached} from cache), {len(failed)} failed -> {out / 'manifest.csv'}")
    for r in failed:
        logger.warning(f"failed: {r['source']}: {r['reason']}")
    if not ok:
        raise SystemExit(f"preprocess: no scan of {datalist} could be preprocessed; see {out / 'manifest.csv'}")
    return records


def _montage(out: Path, ok: list[dict], n_failed: int, montage_max: int) -> None:
    """QC montage of the successful scans, worst registrations first: where a reviewer starts."""

    if not ok:
        return

    def correlation(r: dict) -> float:
        value = r.get("registration", {}).get("template_correlation", r.get("template_correlation", 1.0))
        return float(value) if value not in ("", None) else 1.0

    shown = sorted(ok, key=correlation)[:montage_max]
    title = f"{len(ok)} scans preprocessed, {n_failed} failed; lowest correlation with the template (r) first"
    if len(shown) < len(ok):
        title += f"; {len(shown)} shown"
    qc_montage([out / r["qc"] for r in shown], out / "qc_montage.png", title, columns=min(8, len(shown)))


def merge_shards(output_dir: str | Path, records: list[dict]) -> Path:
    """Join finished preprocess shards (``scripts.shards``) into ``manifest.csv``, ``datalist.json`` and the montage."""

    out = Path(output_dir)
    rows = shards.read_tables(out, records, "manifest.csv", key="source")
    merged: dict = {}
    for r in records:
        part = shards.Shard(r["shard"], r["count"])
        for split, items in read_json(shards.table_path(out, part, "datalist.json")).items():
            if isinstance(items, list):
                merged.setdefault(split, []).extend(items)
            else:
                merged.setdefault(split, items)
    write_json(out / "datalist.json", merged)
    write_csv(out / "manifest.csv", rows, MANIFEST_COLUMNS)
    ok = [r for r in rows if r["status"] == "ok"]
    _montage(out, ok, len(rows) - len(ok), 48)
    logger.info(f"preprocess: {len(records)} shards merged, {len(ok)} ok, {len(rows) - len(ok)} failed")
    return out / "manifest.csv"


def training_datalist(
    datalist: str | Path,
    bundle_root: str | Path,
    preprocessed_dir: str | Path,
    num_workers: int = 1,
    split_column: str | None = None,
    split_seed: int = 0,
    split_fractions=(0.6, 0.15, 0.1, 0.15),
    **chain_settings,
) -> str:
    """What training reads: a datalist JSON as it is, or a BIDS root split by subject and preprocessed
    (cached) into ``preprocessed_dir`` with the chain of configs/preprocess.yaml; returns the JSON path."""
    path = Path(datalist).expanduser()
    if not path.is_dir():
        return str(datalist)
    chain = load_chain(bundle_root, **chain_settings)
    preprocess_datalist(
        path,
        preprocessed_dir,
        chain,
        num_workers=num_workers,
        split_column=split_column,
        split_seed=split_seed,
        split_fractions=split_fractions,
    )
    return str(Path(preprocessed_dir) / "datalist.json")
