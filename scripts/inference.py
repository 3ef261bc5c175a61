"""Brain-age inference pieces for the standard MONAI workflows of ``configs/inference.yaml`` and the
``configs/evaluate.yaml`` overlay: raw T1w scans or preprocessed slices -> ``predictions.csv``.

The input is one NIfTI file, a folder of them or a datalist (:func:`resolve_inputs`); raw scans go through the
preprocessing chain first (:func:`prepare_inputs`, cached under ``OUT/preprocessed``), model-input slices are used
as they are. MONAI's stock ``SupervisedEvaluator`` and ``CheckpointLoader`` do the prediction; the
:class:`PredictionWriter` handler writes the CSV. A scan that cannot be used gets a row with its error and the
others go on; the run fails only when nothing could be predicted (:func:`finish`).
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from ignite.engine import Events

from scripts import bids
from scripts import data as datalists
from scripts import dicom, shards
from scripts.atomic import safe_name, write_atomic, write_csv
from scripts.bids import is_bids_root
from scripts.calibration import BiasCorrection, PredictionInterval, check_fitted_for, fitted_for
from scripts.checkpoint import CheckpointError, read_model_weights
from scripts.cli import BundleError
from scripts.networks import ArchitectureMismatchError
from scripts.preprocess import preprocess_items
from scripts.quality import QUALITY_METRICS
from scripts.slices import check_slice, is_model_input

logger = logging.getLogger(__name__)

PREDICTION_COLUMNS = (
    "subject",
    "image",
    "predicted_age",
    "predicted_age_lower",
    "predicted_age_upper",
    "age",
    "brain_pad",
    "brain_pad_lower",
    "brain_pad_upper",
    "brain_pad_corrected",
    "brain_pad_corrected_lower",
    "brain_pad_corrected_upper",
    "slice_levels",
    "level_sd",
    "quality",
    "noise_level",
    "sharpness",
    "atypicality",
    "interval_band",
    "split",
    "error",
)
NIFTI_SUFFIXES = (".nii", ".nii.gz")


class InputError(BundleError, ValueError):
    """An input the workflow cannot take, in one line naming it and the reason."""


class InputNotFoundError(InputError, FileNotFoundError):
    """An input or checkpoint that does not exist."""


def resolve_inputs(
    source: str | Path,
    splits: list[str] | None = None,
    missing_ok: bool = False,
    shard: str | None = None,
    dicom_age: bool = False,
) -> list[dict]:
    """Items ``{"image", "subject", ...}`` for a NIfTI file, a DICOM series folder, a folder of either, a BIDS
    dataset root, or a datalist JSON.

    For a datalist, ``splits`` selects item lists (default: every list in it); each item keeps its columns
    (``age``, ``survival_months``, ...) and gets ``split``. A BIDS root gives one item per T1w image with its
    entities and participants.tsv / sessions.tsv columns (``scripts.bids``). A folder that directly holds
    DICOM files is one scan, named after its path below ``source``; with ``dicom_age`` its age comes from the
    DICOM header (otherwise no patient tag is read). Missing files are not an error here: they become failure
    rows. ``shard`` ``"i/N"`` keeps that shard's items (``scripts.shards``). With ``missing_ok`` a ``source``
    that does not exist gives no items (a workflow being built for a property check); :func:`require_inputs`
    then reports it when the workflow runs.
    """

    part = shards.parse_shard(shard)
    path = Path(source).expanduser()
    if missing_ok and not path.exists():
        return []
    if path.is_dir() and bids.is_bids_root(path):
        items = bids.bids_items(path)
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.name.endswith(NIFTI_SUFFIXES) and not p.name.startswith("."))
        # a scan's id is its path below the folder: a/T1w.nii.gz and b/T1w.nii.gz are a/T1w and b/T1w
        items = [{"image": str(p), "subject": datalists.subject_from_path(p.relative_to(path))} for p in files]
        for folder in dicom.dicom_folders(path):
            name = folder.relative_to(path).as_posix() if folder != path else folder.name
            items.append(_dicom_item(folder, name, dicom_age))
        if not items:
            raise InputNotFoundError(f"{path}: no .nii or .nii.gz files and no DICOM series in this folder")
    elif path.name.endswith(NIFTI_SUFFIXES):
        if not path.is_file():
            raise InputNotFoundError(f"{path}: no such file")
        items = [{"image": str(path), "subject": datalists.subject_from_path(path.name)}]
    elif path.suffix == ".json":
        if splits is None:
            raw = datalists.read_json(path)
            splits = [k for k, v in raw.items() if isinstance(v, list) and v]  # every list with items
            if not splits:
                raise datalists.DatalistError(f"{path}: every item list is empty ({', '.join(raw) or 'no lists'})")
        loaded = datalists.load_datalist(path, splits, check_files=False, check_leakage=False)
        items = [{**item, "split": split} for split, items in loaded.items() for item in items]
    else:
        raise InputError(
            f"{path}: expected a .nii/.nii.gz file, a DICOM series folder, a folder of them, a BIDS dataset "
            "or a datalist .json"
        )
    if any("age" in item for item in items):  # a batch collates only when every item has the key
        items = [{"age": math.nan, **item} for item in items]
    return shards.select(items, part)


def _dicom_item(folder: Path, name: str, dicom_age: bool) -> dict:
    """A DICOM folder as an input item; with ``dicom_age`` the header's age (an unreadable one is a failure row)."""

    item = {"image": str(folder), "subject": name}
    if dicom_age:
        try:
            age = dicom.patient_age(dicom.choose_series(folder))
        except Exception as err:  # the chain reports the series problem again with its stage
            return {**item, "error": f"load: {_one_line(err)}"}
        if age is not None:
            item["age"] = round(age, 2)
    return item


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__


class PreparedInputs(NamedTuple):
    """What :func:`prepare_inputs` made of the inputs: model-ready slices, and failures with their reason."""

    ready: list[dict]
    failed: list[dict]


def prepare_inputs(
    items: list[dict], output_dir: str | Path, raw_preprocessing=None, num_workers: int = 1, progress: bool = True
) -> PreparedInputs:
    """Split items into model-ready slices and failures; raw scans are preprocessed into ``OUT/preprocessed``.

    Ready items get ``source`` (the file given) and ``image`` (the slice); failures get ``error``.
    """
    ready, failed, raw = [], [], []
    for item in items:
        path = Path(item["image"])
        if item.get("error"):
            failed.append(item)
            continue
        if not path.exists():
            failed.append({**item, "error": f"load: {path} does not exist"})
            continue
        if path.is_dir():  # a DICOM series
            raw.append(item)
            continue
        try:
            model_input = is_model_input(path)
        except Exception as err:  # unreadable or truncated header: a failure row, not a crash
            failed.append({**item, "error": f"load: not a readable NIfTI file ({_one_line(err)})"})
            continue
        if not model_input:
            raw.append(item)
            continue
        try:
            check_slice(path)
            ready.append({**item, "source": item["image"]})
        except Exception as err:
            failed.append({**item, "error": f"load: {_one_line(err)}"})
    if raw:
        if raw_preprocessing is None:
            failed += [{**it, "error": "raw scan given but no preprocessing chain configured"} for it in raw]
        else:

            out = Path(output_dir) / "preprocessed"
            records = preprocess_items(raw, out, raw_preprocessing, num_workers=num_workers, progress=progress)
            for item, record in zip(raw, records):
                if record["status"] == "ok":
                    ready.append(
                        {
                            **item,
                            "source": item["image"],
                            "image": str(out / record["slice"]),
                            "qc": str(out / record["qc"]),
                        }
                    )
                else:
                    failed.append({**item, "error": record["reason"]})
    return PreparedInputs(ready, failed)


def load_weights(network: torch.nn.Module, ckpt_path: str | Path) -> torch.nn.Module:
    """Load a best-model file (:func:`read_model_weights`) into ``network``, strictly, its architecture record
    included (:class:`scripts.networks.RecordsArchitecture`)."""
    try:
        network.load_state_dict(read_model_weights(ckpt_path))
    except ArchitectureMismatchError as err:
        raise CheckpointError(f"{ckpt_path}: {err}") from None
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise CheckpointError(
            f"{ckpt_path}: does not fit the configured network ({first}); "
            "use the architecture settings the model was trained with"
        ) from None
    return network


class PredictionWriter:
    """Evaluator handler writing ``OUT/predictions.csv`` (and ``OUT/latents/``) when the evaluation completes.

    Collects each batch's predictions in dataset order (the evaluator does not decollate or shuffle), joins them
    with the items they came from and adds a row for every input that could not be used (``failed``, with its
    reason). ``brain_pad_corrected`` uses the age-bias correction fitted on validation data at the end of training
    (``bias_correction_path``), never one fitted on the data predicted. ``write()`` can also be called without an
    evaluation, when no input was usable. Columns: :data:`PREDICTION_COLUMNS`, then any other datalist column.

    For a BIDS input (``bids_root``) it also writes a BIDS-derivatives dataset to ``derivatives_dir``
    (``scripts.bids.write_derivatives``, ``generator`` naming the bundle). With ``shard`` ``"i/N"`` the table
    goes to ``OUT/shards/`` with a completion record instead, for ``python -m scripts.merge OUT``; the record
    keeps ``ckpt_path``, which the merged set's report describes.
    """

    def __init__(
        self,
        output_dir: str | Path,
        ready: list[dict],
        failed: list[dict] | None = None,
        bias_correction_path: str | Path | None = None,
        save_latents: bool = False,
        interval_path: str | Path | None = None,
        shard: str | None = None,
        bids_root: str | Path | None = None,
        derivatives_dir: str | Path | None = None,
        generator: dict | None = None,
        ckpt_path: str | Path | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.ready = list(ready)
        self.failed = list(failed or [])
        self.bias_correction_path = bias_correction_path
        self.interval_path = interval_path
        self.save_latents = save_latents
        self.shard = shards.parse_shard(shard)
        self.bids_root = bids_root
        self.derivatives_dir = Path(derivatives_dir) if derivatives_dir else self.output_dir / "derivatives"
        self.generator = generator
        self.ckpt_path = ckpt_path
        self.ages: list[np.ndarray] = []
        self.latents: list[np.ndarray] = []
        self.level_ages: list[np.ndarray] = []
        self.qualities: list[np.ndarray] = []

    def attach(self, engine) -> None:

        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, lambda _: self.write())

    def _reset(self, engine=None) -> None:
        self.ages, self.latents, self.level_ages, self.qualities = [], [], [], []

    def _collect(self, engine) -> None:
        output = engine.state.output  # AgeInferer's dict unpacked by the evaluator (scripts.inferers.unpack_age_output)
        self.ages.append(output["pred"].detach().float().cpu().numpy().reshape(-1))
        quality = engine.state.batch.get("quality") if isinstance(engine.state.batch, dict) else None
        n, width = len(self.ages[-1]), len(QUALITY_METRICS)
        self.qualities.append(
            np.full((n, width), np.nan) if quality is None else np.asarray(quality, np.float64).reshape(n, width)
        )
        if self.save_latents and "z" in output:
            self.latents.append(output["z"].detach().float().cpu().numpy())
        self.level_ages.append(output["age_levels"].detach().float().cpu().numpy())

    def correction(self) -> BiasCorrection | None:
        return _load_beside_model(
            self.bias_correction_path, BiasCorrection, "age-bias correction", "brain_pad_corrected"
        )

    def interval(self) -> PredictionInterval | None:
        return _load_beside_model(
            self.interval_path, PredictionInterval, "prediction interval", "predicted_age_lower/upper"
        )

    def write(self) -> Path:
        ages = np.concatenate(self.ages) if self.ages else np.empty(0)
        if len(ages) != len(self.ready):
            raise RuntimeError(f"{len(ages)} predictions for {len(self.ready)} inputs: the evaluator must not shuffle")
        correction = self.correction() if self.ready else None
        interval = self.interval() if self.ready else None
        if interval is not None and interval.correction and correction is not None:
            if interval.correction != correction.key():
                logger.warning(
                    f"{self.interval_path}: fitted with another age-bias correction than {self.bias_correction_path}; "
                    "brain_pad_corrected_lower/upper left empty; refit both: python -m scripts.calibration "
                    "CALIBRATION_PREDICTIONS.csv --ckpt_path MODEL"
                )
        levels = _level_columns(self.level_ages, len(ages))
        qualities = (
            np.concatenate(self.qualities) if self.qualities else np.full((len(ages), len(QUALITY_METRICS)), np.nan)
        )
        rows = [
            {**_row(item, float(age), correction, interval, quality), **level}
            for item, age, level, quality in zip(self.ready, ages.tolist(), levels, qualities)
        ]
        rows += [_row(item, math.nan, None) for item in self.failed]
        if self.save_latents and self.latents:
            _save_latents(self.output_dir / "latents", self.ready, np.concatenate(self.latents))
        if self.shard is not None:

            path = shards.table_path(self.output_dir, self.shard, "predictions.csv")
            _write_csv(path, rows)
            bids = (
                {"bids_root": str(self.bids_root), "derivatives_dir": str(self.derivatives_dir)}
                if self.bids_root
                else {}
            )
            shards.write_record(
                self.output_dir,
                self.shard,
                "inference",
                len(rows),
                ckpt_path=str(self.ckpt_path) if self.ckpt_path else None,
                **bids,
            )
        else:
            path = self.output_dir / "predictions.csv"
            _write_csv(path, rows)
            if self.bids_root:
                write_bids_derivatives(rows, self.bids_root, self.derivatives_dir, self.generator)
        logger.info(f"inference: {len(self.ready)} predicted, {len(self.failed)} failed -> {path}")
        for item in self.failed:
            logger.warning(f"failed: {item['image']}: {item['error']}")
        return path


def bids_root_of(source: str | Path) -> str | None:
    """``source`` when it is a BIDS dataset root (inference then writes BIDS derivatives), else None."""

    path = Path(source).expanduser()
    return str(path.resolve()) if path.is_dir() and is_bids_root(path) else None


def write_bids_derivatives(
    rows: list[dict], bids_root: str | Path, derivatives_dir: str | Path, generator: dict | None = None
) -> Path:
    """The BIDS-derivatives dataset of a BIDS input's predictions (``scripts.bids.write_derivatives``)."""

    generator = generator or bids.generated_by(Path(__file__).resolve().parents[1])
    out = bids.write_derivatives(rows, bids_root, derivatives_dir, generator)
    logger.info(f"inference: BIDS derivatives -> {out}")
    return out


def merge_shards(output_dir: str | Path, records: list[dict]) -> Path:
    """Join finished inference shards (``scripts.shards``) into ``predictions.csv`` (and the BIDS derivatives)."""

    out = Path(output_dir)
    rows = shards.read_tables(out, records, "predictions.csv", key="image")
    path = out / "predictions.csv"
    _write_csv(path, rows)
    if records[0].get("bids_root"):  # where the shards were told to put the derivatives
        write_bids_derivatives(rows, records[0]["bids_root"], records[0]["derivatives_dir"])
    logger.info(f"inference: {len(records)} shards merged, {len(rows)} rows -> {path}")
    return path


def check_checkpoint(network: torch.nn.Module, ckpt_path: str | Path) -> None:
    """Fail before any work, in one line, when the checkpoint is missing, unsafe or does not fit the network.

    The weights are loaded into a copy, so the workflow's own ``CheckpointLoader`` still does the loading.
    """

    load_weights(copy.deepcopy(network).cpu(), ckpt_path)


def check_calibration(
    ckpt_path: str | Path, paths: list[str | Path | None], slice_levels: int = 1, image_size: int = 128
) -> None:
    """Fail before any work, in one line, when a calibration file beside the model (bias correction, interval) was
    fitted for another model, another ``slice_levels`` or ``image_size`` (:func:`scripts.calibration.
    check_fitted_for`); a missing file is only a warning, later, that its columns stay empty."""

    existing = [Path(p) for p in paths if p and Path(p).is_file()]
    if not existing:
        return
    expected = fitted_for(read_model_weights(ckpt_path), slice_levels, image_size, "")
    for path in existing:
        check_fitted_for(path, json.loads(path.read_text()).get("fitted_for", {}), expected)


def require_inputs(source: str | Path, items: list[dict], shard: str | None = None) -> None:
    """One-line error when the input does not exist or holds no scan (checked when a workflow runs, not when it
    is merely built, so the bundle's property checks work without data). A shard may be empty (more shards
    than scans): it then writes an empty table and its record."""

    part = shards.parse_shard(shard)
    path = Path(source).expanduser()
    if not path.exists():
        raise InputNotFoundError(
            f"{path}: no such file or folder (--input: a NIfTI file, a DICOM folder, a folder of them, a BIDS "
            "dataset or a datalist)"
        )
    if not items and part is None:
        raise InputNotFoundError(f"{path}: no scan to predict (no .nii/.nii.gz files, or empty datalist splits)")


def log_run(device, autocast_dtype: str | None, ready: list[dict], failed: list[dict]) -> None:
    """What the run will do, in the log: how many inputs are usable and in which precision."""
    precision = f"{autocast_dtype} autocast (the encoder and age head run in float32)" if autocast_dtype else "float32"
    logger.info(
        f"inference: {len(ready)} slices on {torch.device(device)}, precision {precision}; "
        f"{len(failed)} inputs could not be used"
    )


def finish(ready: list[dict], items: list[dict], output_dir: str | Path) -> None:
    """Exit non-zero only when nothing could be predicted (the CSV lists why for every input)."""
    if items and not ready:
        raise SystemExit(
            f"inference: none of the {len(items)} inputs could be used; " f"see {Path(output_dir) / 'predictions.csv'}"
        )


def _load_beside_model(path, kind, what: str, columns: str):
    """A calibration file stored beside the checkpoint (``kind.load``), or None with a warning when it is missing."""
    if path and Path(path).is_file():
        return kind.load(path)
    if path:
        logger.warning(f"no {what} at {path}: {columns} left empty")
    return None


def _level_columns(level_ages: list[np.ndarray], n: int) -> list[dict]:
    """``slice_levels`` and ``level_sd`` (sd of the per-level predicted ages; empty for one level) per row."""
    if not level_ages:
        return [{}] * n
    ages = np.concatenate(level_ages)
    if len(ages) != n:
        raise RuntimeError(f"{len(ages)} per-level predictions for {n} inputs: the evaluator must not shuffle")
    levels = ages.shape[1]
    spread = ages.std(axis=1, ddof=1) if levels > 1 else np.full(n, np.nan)
    return [{"slice_levels": levels, "level_sd": round(float(s), 3) if levels > 1 else ""} for s in spread]


def _row(
    item: dict,
    predicted: float,
    correction: BiasCorrection | None,
    interval: PredictionInterval | None = None,
    quality: np.ndarray | None = None,
) -> dict:
    age = item.get("age")
    has_age = age is not None and not (isinstance(age, float) and math.isnan(age))
    known = has_age and math.isfinite(predicted)
    bounded = interval is not None and math.isfinite(predicted)
    quality = np.full(len(QUALITY_METRICS), np.nan) if quality is None else np.asarray(quality, np.float64)
    lower, upper = (float(v[0]) for v in interval.bounds([predicted], quality)) if bounded else (math.nan, math.nan)
    corrected = (
        interval.corrected_pad_bounds([predicted], [age], correction, quality)
        if known and bounded and correction is not None
        else None
    )
    atypicality = float(interval.atypicality(quality)[0]) if interval is not None else math.nan

    def number(value: float) -> float | str:
        return round(value, 3) if math.isfinite(value) else ("inf" if value > 0 else "-inf")

    row = {
        "subject": item.get("subject", ""),
        "image": item.get("source", item["image"]),
        "predicted_age": "" if math.isnan(predicted) else round(predicted, 3),
        "predicted_age_lower": number(lower) if bounded else "",
        "predicted_age_upper": number(upper) if bounded else "",
        "age": age if has_age else "",
        "brain_pad": round(predicted - age, 3) if known else "",
        "brain_pad_lower": number(lower - age) if known and bounded else "",
        "brain_pad_upper": number(upper - age) if known and bounded else "",
        "brain_pad_corrected": (
            round(float(correction.corrected_pad([predicted], [age])[0]), 3) if known and correction else ""
        ),
        "brain_pad_corrected_lower": number(float(corrected[0][0])) if corrected else "",
        "brain_pad_corrected_upper": number(float(corrected[1][0])) if corrected else "",
        **{
            name: float(f"{value:.5g}") if math.isfinite(value) else "" for name, value in zip(QUALITY_METRICS, quality)
        },
        "atypicality": round(atypicality, 2) if math.isfinite(atypicality) else "",
        "interval_band": int(interval.group(quality)[0]) + 1 if bounded else "",
        "split": item.get("split", ""),
        "error": item.get("error", ""),
    }
    # other datalist columns (grade, survival_months, ...) ride along for the analyses
    extra = {k: v for k, v in item.items() if k not in row and k != "source" and isinstance(v, (str, int, float))}
    return {**row, **extra}


def _write_csv(path: Path, rows: list[dict]) -> None:
    """Atomic CSV with the standard columns first, then any extra datalist columns (e.g. survival_months)."""
    columns = list(PREDICTION_COLUMNS)
    for row in rows:
        columns += [k for k in row if k not in columns]
    write_csv(path, rows, columns, restval="")


def latent_path(folder: Path, item: dict) -> Path:
    """Where a scan's z_sem goes: ``<split>_<subject>.npy`` as one safe file name inside ``folder``."""
    return folder / f"{safe_name((item['split'] + '_' if item.get('split') else '') + item['subject'])}.npy"


def _save_latents(folder: Path, items: list[dict], latents: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for item, z in zip(items, latents):
        write_atomic(latent_path(folder, item), lambda tmp, z=z: np.save(tmp, z.astype(np.float32)))


def read_predictions(path: str | Path) -> list[dict]:
    """Rows of a predictions.csv with numbers parsed (empty cells -> NaN)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        for key in ("predicted_age", "age", "brain_pad", "brain_pad_corrected", *QUALITY_METRICS, "atypicality"):
            row[key] = float(row[key]) if row.get(key) not in (None, "") else math.nan
    return rows
