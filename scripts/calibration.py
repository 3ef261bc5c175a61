"""Calibration of brain-age predictions: the age-bias correction and the prediction interval, fitted at the end of
training for the best model and stored beside it, each recording what it was fitted for.

Brain-PAD (predicted age difference) = predicted age - chronological age. Regression to the mean makes raw PADs
correlate negatively with age; the corrections here remove that dependence with a fit made on the best model's
validation predictions (:class:`CalibrationFitter`), never on the data being analysed, as the field requires.
The prediction interval is fitted on a calibration split of its own, separately for scans whose image quality is like
the model's own scans' and for the others; its age-conditional form bounds the corrected brain-PAD. Accuracy is always
reported on the uncorrected predictions.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Events
from monai.utils import evenly_divisible_all_gather
from scipy import stats
from torch import nn

from scripts import cli
from scripts.atomic import write_json
from scripts.checkpoint import read_model_weights
from scripts.cli import BundleError
from scripts.networks import unwrap
from scripts.quality import ATYPICAL, QUALITY_METRICS, AcquisitionReference

__all__ = [
    "BIAS_CORRECTION_METHODS",
    "BiasCorrection",
    "CalibrationError",
    "CalibrationFitter",
    "PredictionInterval",
    "bias_correction_path",
    "check_fitted_for",
    "fitted_for",
    "interval_path",
    "weights_sha256",
]

logger = logging.getLogger(__name__)

BIAS_CORRECTION_METHODS = ("beheshti", "cole", "none")


def as_array(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
    return np.asarray(values, dtype=np.float64).ravel()


@dataclass(frozen=True)
class BiasCorrection:
    """Linear age-bias correction of brain-age predictions, fitted on validation data.

    * ``beheshti`` (Beheshti et al. 2019): regress PAD on age, ``PAD = slope * age + intercept``; the
      corrected PAD is the residual ``PAD - (slope * age + intercept)``.
    * ``cole`` (Cole et al. 2018; de Lange & Cole 2020): regress prediction on age,
      ``pred = slope * age + intercept``; corrected prediction ``(pred - intercept) / slope``.
    * ``none``: corrected = raw.
    """

    method: str
    slope: float = 0.0
    intercept: float = 0.0
    n: int = 0
    fitted_for: dict = field(default_factory=dict)

    @classmethod
    def fit(cls, predicted_age, age, method: str = "beheshti", fitted_for: dict | None = None) -> "BiasCorrection":
        if method not in BIAS_CORRECTION_METHODS:
            raise ValueError(f"unknown bias correction {method!r}; choose from {', '.join(BIAS_CORRECTION_METHODS)}")
        pred, age = as_array(predicted_age), as_array(age)
        keep = np.isfinite(pred) & np.isfinite(age)
        pred, age = pred[keep], age[keep]
        if method == "none":
            return cls("none", n=len(age), fitted_for=dict(fitted_for or {}))
        if len(age) < 3 or np.ptp(age) == 0:
            raise ValueError(f"bias correction needs >= 3 labelled predictions with varying ages, got {len(age)}")
        target = pred - age if method == "beheshti" else pred
        slope, intercept = np.polyfit(age, target, 1)
        if method == "cole" and abs(slope) < 1e-3:
            raise ValueError(f"cole correction: predictions do not vary with age (slope {slope:.2g})")
        return cls(method, float(slope), float(intercept), int(len(age)), dict(fitted_for or {}))

    def corrected_pad(self, predicted_age, age) -> np.ndarray:
        pred, age = as_array(predicted_age), as_array(age)
        if self.method == "beheshti":
            return pred - age - (self.slope * age + self.intercept)
        if self.method == "cole":
            return (pred - self.intercept) / self.slope - age
        return pred - age

    def key(self) -> dict:
        """What makes two corrections the same correction (an interval records the one it was fitted with)."""
        return {"method": self.method, "slope": self.slope, "intercept": self.intercept}

    def save(self, path: str | Path) -> None:
        """Write as JSON, atomically."""
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> "BiasCorrection":
        data = json.loads(Path(path).read_text())
        if data.get("method") not in BIAS_CORRECTION_METHODS:
            raise CalibrationError(f"{path}: not a bias-correction file (method {data.get('method')!r})")
        return cls(
            str(data["method"]),
            float(data["slope"]),
            float(data["intercept"]),
            int(data.get("n", 0)),
            dict(data.get("fitted_for", {})),
        )


#: Each band of the interval needs at least this many calibration scans (fewer make a 90 % interval's ends noisy;
#: below 19 it is unbounded); a band with fewer is merged into the other.
MIN_GROUP = 40
METHOD = "acquisition-mondrian-split-conformal"


@dataclass(frozen=True)
class PredictionInterval:
    """Mondrian split-conformal prediction interval of brain age (Vovk et al. 2003, 2005; Lei et al. 2018), fitted
    on a calibration split, separately for typical and atypical acquisitions.

    A scan's band is whether its image-quality metrics lie within the model's own scans' (``atypicality`` up to
    :data:`scripts.quality.ATYPICAL` from the :class:`scripts.quality.AcquisitionReference` of the split that
    trained and chose the model) or beyond. Within a band, with the signed residuals ``r = predicted - age`` of
    its n calibration scans, the interval of a new prediction ``p`` is ``[p - upper, p - lower]`` where
    ``lower``/``upper`` are the ``floor((n+1) a/2)``-th and ``ceil((n+1)(1 - a/2))``-th smallest residuals
    (``a = 1 - coverage``): for a scan exchangeable with the band's calibration scans it covers the true age with
    probability at least ``coverage`` (and below ``coverage + 2/(n+1)``). A clinical scan so gets the interval of
    the clinical-like calibration scans, and a research scan keeps one as narrow as research scans alone give,
    which bands of one quality score cannot do: no single score separates the two, so its bands mix them. Signed
    residuals keep it honest where the model is biased (regression to the mean, or a younger reading of clinical
    scans). It says nothing for scans unlike every calibration scan; a band with fewer than ``2/a - 1`` scans is
    unbounded (``inf``), as the method says it must be. A scan without metrics gets the widest band's interval.

    The interval of predicted age is marginal over age: regression to the mean over-predicts young brains and
    under-predicts old ones, so it under-covers the ends of the age range. Fitted with a :class:`BiasCorrection`
    (``correction``), each band also holds the split-conformal quantiles of the calibration scans' corrected PADs,
    which no longer depend on age linearly: :meth:`corrected_pad_bounds` bounds a scan's corrected brain-PAD given
    its chronological age, the interval to use when asking whether one person's brain looks older than their age.
    """

    coverage: float
    lower: tuple[float, ...]
    upper: tuple[float, ...]
    n: tuple[int, ...]
    reference: AcquisitionReference | None = None  # what ``atypicality`` is measured from
    fitted_for: dict = field(default_factory=dict)
    method: str = METHOD
    correction: dict = field(default_factory=dict)  # BiasCorrection.key() of the corrected bands; {}: none
    corrected_lower: tuple[float, ...] = ()
    corrected_upper: tuple[float, ...] = ()
    age_range: tuple[float, ...] = ()  # (youngest, oldest) calibration age: where the guarantee was checked

    @classmethod
    def fit(
        cls,
        predicted_age,
        age,
        quality=None,
        reference: AcquisitionReference | None = None,
        coverage: float = 0.9,
        min_group: int = MIN_GROUP,
        fitted_for: dict | None = None,
        correction: BiasCorrection | None = None,
    ) -> "PredictionInterval":
        """Args:
        predicted_age, age: of the calibration scans.
        quality: their :data:`scripts.quality.QUALITY_METRICS`, ``(N, 3)``; None: one band.
        reference: the acquisitions the model knows; None: one band.
        correction: the model's age-bias correction (fitted on other scans); None: no age-conditional bands.
        """
        if not 0 < coverage < 1:
            raise ValueError(f"interval coverage {coverage} must be between 0 and 1 (e.g. 0.9)")
        pred, age = as_array(predicted_age), as_array(age)
        keep = np.isfinite(pred) & np.isfinite(age)
        if not keep.any():
            raise ValueError("a prediction interval needs labelled calibration predictions, got none")
        pred, age = pred[keep], age[keep]
        band = np.zeros(len(pred), dtype=int)
        if reference is not None and quality is not None:  # else one band (too few of one kind: one band too)
            distance = reference.atypicality(quality)[keep]
            if np.isfinite(distance).all() and np.bincount(distance > ATYPICAL, minlength=2).min() >= min_group:
                band = (distance > ATYPICAL).astype(int)
        groups = range(band.max() + 1)
        bands = [_split_conformal(pred[band == g] - age[band == g], coverage) for g in groups]
        corrected = (
            [_split_conformal(correction.corrected_pad(pred[band == g], age[band == g]), coverage) for g in groups]
            if correction is not None
            else []
        )
        return cls(
            float(coverage),
            tuple(b[0] for b in bands),
            tuple(b[1] for b in bands),
            tuple(b[2] for b in bands),
            reference,
            dict(fitted_for or {}),
            correction=correction.key() if corrected else {},
            corrected_lower=tuple(b[0] for b in corrected),
            corrected_upper=tuple(b[1] for b in corrected),
            age_range=(float(age.min()), float(age.max())),
        )

    def atypicality(self, quality=None) -> np.ndarray:
        """How far each scan's metrics lie from the model's own scans' (NaN without metrics or a reference)."""
        if quality is None or self.reference is None:
            return np.full(1 if quality is None else len(np.asarray(quality).reshape(-1, 3)), np.nan)
        return self.reference.atypicality(quality)

    def group(self, quality=None) -> np.ndarray:
        """The band of each scan (0 typical, 1 atypical); the widest band where its metrics are missing."""
        if len(self.n) == 1:
            return np.zeros(len(self.atypicality(quality)), dtype=int)
        distance = self.atypicality(quality)
        widest = int(np.argmax(np.asarray(self.upper) - np.asarray(self.lower)))
        return np.where(np.isfinite(distance), distance > ATYPICAL, widest).astype(int)

    def bounds(self, predicted_age, quality=None) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) ends of the interval of each predicted age, in the band of its metrics."""
        pred = as_array(predicted_age)
        band = self._bands(quality, len(pred))
        return pred - np.asarray(self.upper)[band], pred - np.asarray(self.lower)[band]

    def _bands(self, quality, n: int) -> np.ndarray:
        """The band of each of ``n`` scans: by its metrics, or the widest band for all without metrics."""
        band = self.group(quality) if quality is not None else np.full(n, self.group(None)[0])
        return np.broadcast_to(band, (n,))

    def corrected_pad_bounds(
        self, predicted_age, age, correction: BiasCorrection, quality=None
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """(lower, upper) ends of the interval of each corrected brain-PAD given chronological ``age``; for a healthy
        scan exchangeable with its band's calibration scans it holds 0 with probability ``coverage``, at every age
        the correction makes the PAD independent of. None when this interval was not fitted with ``correction``."""
        if not self.corrected_lower or self.correction != correction.key():
            return None
        pad = correction.corrected_pad(predicted_age, age)
        band = self._bands(quality, len(pad))
        return pad - np.asarray(self.corrected_upper)[band], pad - np.asarray(self.corrected_lower)[band]

    def coverage_spread(self, probability: float = 0.95) -> tuple[tuple[float, float], ...]:
        """Per band, the range in which this interval's coverage of new scans like its calibration scans lies with
        ``probability`` over the draw of those n scans: the guarantee is an average over calibration sets, and one
        set's coverage is Beta(k, n + 1 - k) for the k residual ranks between its ends (Vovk 2012, "Conditional
        validity of inductive conformal predictors"). About 100 scans give 85-96 % for a 90 % interval; ~1,000,
        88-92 %."""
        spread = []
        for n in self.n:
            k_low, k_high = _ranks(n, self.coverage)
            k = k_high - k_low
            if n < 1 or k > n:  # unbounded on a side with every residual inside: it always covers
                spread.append((1.0, 1.0))
                continue
            tail = (1.0 - probability) / 2
            spread.append(tuple(float(v) for v in stats.beta.ppf([tail, 1.0 - tail], k, n + 1 - k)))
        return tuple(spread)

    def describe(self) -> str:
        """One line per band: its residual range, n and :meth:`coverage_spread`, for logs and the report."""
        return "; ".join(
            f"{'typical' if i == 0 else 'atypical'} acquisitions: {lo:+.1f} to {u:+.1f} years of residual, n {n}, "
            f"coverage {100 * a:.0f}-{100 * b:.0f} % for 95 % of calibration sets of this size"
            for i, (lo, u, n, (a, b)) in enumerate(zip(self.lower, self.upper, self.n, self.coverage_spread()))
        )

    def save(self, path: str | Path) -> None:
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> "PredictionInterval":
        data = json.loads(Path(path).read_text())
        if data.get("method") != METHOD:
            raise CalibrationError(
                f"{path}: not a prediction-interval file of this bundle version (method {data.get('method')!r}); "
                "refit it: python -m scripts.calibration CALIBRATION_PREDICTIONS.csv --ckpt_path MODEL"
            )
        reference = data.get("reference")
        return cls(
            float(data["coverage"]),
            tuple(float(v) for v in data["lower"]),
            tuple(float(v) for v in data["upper"]),
            tuple(int(v) for v in data["n"]),
            (
                AcquisitionReference(
                    tuple(reference["mean"]), tuple(map(tuple, reference["covariance"])), int(reference["n"])
                )
                if reference
                else None
            ),
            dict(data.get("fitted_for", {})),
            correction=dict(data.get("correction", {})),
            corrected_lower=tuple(float(v) for v in data.get("corrected_lower", ())),
            corrected_upper=tuple(float(v) for v in data.get("corrected_upper", ())),
            age_range=tuple(float(v) for v in data.get("age_range", ())),
        )


def _ranks(n: int, coverage: float) -> tuple[int, int]:
    """The 1-based ranks of the lower and upper residual among n (0: below every one; n + 1: above every one)."""
    alpha = 1.0 - coverage
    return int(np.floor((n + 1) * alpha / 2)), min(int(np.ceil((n + 1) * (1 - alpha / 2))), n + 1)


def _split_conformal(residual: np.ndarray, coverage: float) -> tuple[float, float, int]:
    """The (lower, upper) residual quantiles of split-conformal prediction at ``coverage``, and n."""
    residual = np.sort(residual)
    n = len(residual)
    k_low, k_high = _ranks(n, coverage)
    lower = float(residual[k_low - 1]) if k_low >= 1 else -math.inf
    upper = float(residual[k_high - 1]) if k_high <= n else math.inf
    return lower, upper, n


class CalibrationError(BundleError, ValueError):
    """A calibration file that does not belong to the model or the settings it would be applied to."""


def weights_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a model's weights (names, dtypes, shapes and values): which model a calibration was fitted for.

    Computed from the tensors, so the training-time model and the saved file it becomes give the same digest.
    """
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fitted_for(network: nn.Module | Mapping[str, torch.Tensor], slice_levels: int, image_size: int, split: str) -> dict:
    """What a calibration belongs to: the model's weights, the levels and size it predicted with, the split used."""
    state = network.state_dict() if isinstance(network, nn.Module) else network
    return {
        "weights_sha256": weights_sha256(state),
        "slice_levels": int(slice_levels),
        "image_size": int(image_size),
        "split": str(split),
    }


#: What must match between a calibration file and the run that applies it (the split is information only).
CHECKED = ("weights_sha256", "slice_levels", "image_size")


def check_fitted_for(path: str | Path, recorded: Mapping, expected: Mapping) -> None:
    """:class:`CalibrationError` in one line when a calibration was fitted for another model or other settings."""
    refit = "python -m scripts.calibration CALIBRATION_PREDICTIONS.csv --ckpt_path MODEL"
    if not recorded:
        raise CalibrationError(f"{path}: does not say which model it was fitted for (an older version); refit: {refit}")
    differ = [key for key in CHECKED if recorded.get(key) != expected.get(key)]
    if not differ:
        return
    shown = "; ".join(f"{key} {_short(recorded.get(key))} there, {_short(expected.get(key))} here" for key in differ)
    raise CalibrationError(
        f"{path}: fitted for another model or other settings ({shown}); use the calibration written with this "
        f"model, predict with its settings, or refit: {refit}"
    )


def _short(value) -> str:
    return f"{value[:12]}..." if isinstance(value, str) and len(value) > 16 else repr(value)


def interval_path(ckpt_path: str | Path) -> Path:
    """Where the prediction interval fitted for a checkpoint lives: beside it, ``<stem>_interval.json``."""
    ckpt_path = Path(ckpt_path)
    return ckpt_path.with_name(f"{ckpt_path.stem}_interval.json")


def bias_correction_path(ckpt_path: str | Path) -> Path:
    """Where the correction fitted for a checkpoint lives: beside it, ``<stem>_bias_correction.json``."""
    ckpt_path = Path(ckpt_path)
    return ckpt_path.with_name(f"{ckpt_path.stem}_bias_correction.json")


class CalibrationFitter:
    """Fit the age-bias correction and the :class:`PredictionInterval` of the best model and store them beside it.

    Attached to the validation evaluator. When an epoch sets a new best key metric (the epoch whose model the
    best-model checkpoint holds), it fits

    * the :class:`BiasCorrection` on that epoch's validation predictions, written to ``path``;
    * the interval, with its age-conditional bands for that correction, on the ``calibration`` split
      (``data_loader``): predicted there with the same network, inferer and batch preparation, so on scans that did
      not choose the checkpoint, which the coverage guarantee needs.
      Without a calibration split it falls back to the validation predictions, says so in the log and records
      ``split: validation`` in the file: the validation split chose the checkpoint, so coverage may fall short.

    Both files record what they were fitted for (:func:`fitted_for`); inference refuses them for another model,
    another ``slice_levels`` or ``image_size``. A correction that cannot be fitted (``cole`` on a model whose
    predictions do not yet vary with age) is logged and skipped; training goes on.

    Args:
        path: the bias-correction file (``<ckpt>_bias_correction.json``).
        method: ``beheshti``, ``cole`` or ``none``.
        interval_path: the interval file (``<ckpt>_interval.json``); None: no interval.
        interval_coverage: e.g. 0.9.
        data_loader: the calibration split (``image``, ``age``, ``quality``), or None.
        slice_levels, image_size: what the model predicts with (recorded in both files).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        method: str = "beheshti",
        interval_path: str | os.PathLike | None = None,
        interval_coverage: float = 0.9,
        data_loader=None,
        slice_levels: int = 1,
        image_size: int = 128,
        quality_key: str = "quality",
    ) -> None:
        self.path = Path(path)
        self.method = method
        self.interval_path = Path(interval_path) if interval_path else None
        self.interval_coverage = float(interval_coverage)
        self.data_loader = data_loader
        self.slice_levels, self.image_size = int(slice_levels), int(image_size)
        self.quality_key = quality_key
        self._pred: list[torch.Tensor] = []
        self._age: list[torch.Tensor] = []
        self._quality: list[torch.Tensor] = []

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._fit)

    def _reset(self, engine) -> None:
        self._pred, self._age, self._quality = [], [], []

    def _collect(self, engine) -> None:
        pred = engine.state.output["pred"].detach().float().cpu().reshape(-1)
        self._pred.append(pred)
        self._age.append(engine.state.output["label"].detach().float().cpu().reshape(-1))
        self._quality.append(_quality(engine.state.batch, self.quality_key, len(pred)))

    def _fit(self, engine) -> None:
        if engine.state.best_metric_epoch != engine.state.epoch:
            return
        pred, age, quality = (torch.cat(x) if x else torch.empty(0) for x in (self._pred, self._age, self._quality))
        if dist.is_available() and dist.is_initialized():  # every rank validated a shard: fit on all of them

            device = getattr(engine.state, "device", None) or torch.device("cpu")  # NCCL gathers CUDA tensors
            pred, age, quality = (
                evenly_divisible_all_gather(x.to(device), concat=True).cpu() for x in (pred, age, quality)
            )
            if dist.get_rank() != 0:
                return
        if not len(pred):
            return
        network = unwrap(engine.network)
        record = partial(fitted_for, network.state_dict(), self.slice_levels, self.image_size)
        try:  # first, so the interval's age-conditional bands are fitted with the correction the model keeps
            correction = BiasCorrection.fit(pred, age, self.method, fitted_for=record("validation"))
            correction.save(self.path)
        except ValueError as err:
            # e.g. cole on an early model whose predictions barely vary with age: refuse, do not stop training;
            # a correction fitted for an earlier best model no longer belongs to the checkpoint, so it goes too
            correction = None
            Path(self.path).unlink(missing_ok=True)
            logger.warning(
                f"epoch {engine.state.epoch}: age-bias correction not fitted ({err}); "
                f"brain_pad_corrected stays empty until a later best epoch fits one"
            )
        if self.interval_path is None:
            return
        reference = _reference(quality.numpy())  # the validation split: scans drawn like the training ones
        fit = partial(
            PredictionInterval.fit, reference=reference, coverage=self.interval_coverage, correction=correction
        )
        if self.data_loader is not None:  # the interval of the checkpoint's model
            cal_pred, cal_age, cal_quality = predict_split(engine, self.data_loader, self.quality_key)
            interval = fit(cal_pred, cal_age, cal_quality, fitted_for=record("calibration"))
        else:
            logger.warning(
                "no calibration split: the prediction interval is fitted on the validation split, which also "
                "chose the checkpoint, so its coverage may fall short; add a 'calibration' list to the datalist"
            )
            interval = fit(pred, age, quality, fitted_for=record("validation"))
        interval.save(self.interval_path)
        logger.info(f"epoch {engine.state.epoch}: prediction interval {interval.describe()}")


def _quality(batch, key: str, n: int) -> torch.Tensor:
    """The ``(n, 3)`` image-quality metrics of a batch (NaN where there are none)."""
    value = batch.get(key) if isinstance(batch, Mapping) else None
    if value is None:
        return torch.full((n, len(QUALITY_METRICS)), float("nan"))
    return torch.as_tensor(value, dtype=torch.float32).reshape(n, len(QUALITY_METRICS)).cpu()


def _reference(quality: np.ndarray) -> AcquisitionReference | None:
    """The acquisition reference of these scans' metrics; None (a one-band interval, logged) when too few."""
    try:
        return AcquisitionReference.fit(quality)
    except ValueError as err:
        logger.warning(f"one interval band for every scan: {err}")
        return None


@torch.no_grad()
def predict_split(engine, data_loader, quality_key: str = "quality") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predicted age, age and quality metrics ``(N, 3)`` of every scan of ``data_loader`` with an evaluator's own
    network, batch preparation and inferer (so the same levels and precision as its validation)."""
    preds, ages, scores = [], [], []
    for batch in data_loader:
        images, age = engine.prepare_batch(batch, engine.state.device, engine.non_blocking)
        pred = engine.inferer(images, engine.network)
        pred = pred["age"] if isinstance(pred, Mapping) else pred
        preds.append(as_array(pred))
        ages.append(as_array(age))
        scores.append(_quality(batch, quality_key, len(as_array(pred))).numpy())
    if not preds:
        return np.empty(0), np.empty(0), np.empty((0, len(QUALITY_METRICS)))
    return np.concatenate(preds), np.concatenate(ages), np.concatenate(scores)


def fit_from_predictions(
    predictions_csv: str | Path,
    ckpt_path: str | Path,
    method: str = "beheshti",
    coverage: float = 0.9,
    interval_split: str | None = "calibration",
    correction_split: str | None = "validation",
    image_size: int = 128,
) -> list[Path]:
    """Refit a model's calibration from its predictions (a predictions.csv of ``run inference``): the interval on
    the rows of ``interval_split``, the bias correction on those of ``correction_split`` (``"all"``: every row;
    None: leave that file alone); write them beside ``ckpt_path``, recording what they were fitted for. The
    interval's age-conditional bands use the correction refitted here, else the one beside the model.

    For a model trained before the calibration split existed, to refit at another coverage or ``slice_levels``, or
    to calibrate the interval on labelled scans of your own scanner (e.g. healthy controls): the interval then
    holds for scans like those. Never pass the data the model will be evaluated on: calibrating on it voids the
    coverage guarantee. Typical and atypical acquisitions are told apart by the model's own acquisition reference:
    that of the interval already beside the checkpoint, else the ``validation`` rows' metrics.
    """

    def number(text) -> float:
        return float(text) if text not in (None, "") else math.nan

    with open(predictions_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    levels = {r.get("slice_levels") or "1" for r in rows if r.get("predicted_age")}
    if len(levels) > 1:
        raise CalibrationError(f"{predictions_csv}: rows predicted with different slice_levels ({sorted(levels)})")
    weights = read_model_weights(ckpt_path)
    reference = _known_reference(ckpt_path, rows, number)
    correction = _known_correction(ckpt_path)
    written = []
    for kind, split in (("correction", correction_split), ("interval", interval_split)):  # the interval uses both
        if split is None:
            continue
        chosen = [r for r in rows if split == "all" or r.get("split") == split]
        pred = np.array([number(r.get("predicted_age")) for r in chosen], dtype=np.float64)
        age = np.array([number(r.get("age")) for r in chosen], dtype=np.float64)
        quality = np.array([[number(r.get(m)) for m in QUALITY_METRICS] for r in chosen], dtype=np.float64)
        if not np.isfinite(pred + age).any():  # the interval and the correction need labelled predictions
            raise CalibrationError(f"{predictions_csv}: no row of split {split!r} with both a prediction and an age")
        record = fitted_for(weights, int(levels.pop() if levels else 1), image_size, split)
        levels = {str(record["slice_levels"])}
        if kind == "interval":
            path = interval_path(ckpt_path)
            interval = PredictionInterval.fit(
                pred, age, quality, reference, coverage, fitted_for=record, correction=correction
            )
            interval.save(path)
            logger.info(f"prediction interval {interval.describe()}")
        else:
            path = bias_correction_path(ckpt_path)
            correction = BiasCorrection.fit(pred, age, method, fitted_for=record)
            correction.save(path)
        written.append(path)
    return written


def _known_correction(ckpt_path) -> BiasCorrection | None:
    """The age-bias correction already beside a model (None where there is none or it cannot be read)."""
    try:
        return BiasCorrection.load(bias_correction_path(ckpt_path))
    except (OSError, ValueError, KeyError):
        return None


def _known_reference(ckpt_path, rows: list[dict], number) -> AcquisitionReference | None:
    """The acquisitions a model knows: those of the interval already beside it, else the ``validation`` rows'."""
    try:
        known = PredictionInterval.load(interval_path(ckpt_path)).reference
    except (OSError, ValueError, KeyError):
        known = None
    if known is not None:
        return known
    validation = [[number(r.get(m)) for m in QUALITY_METRICS] for r in rows if r.get("split") == "validation"]
    return _reference(np.array(validation, dtype=np.float64).reshape(-1, len(QUALITY_METRICS)))


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(
        prog="python -m scripts.calibration",
        description="Refit a model's prediction interval (Mondrian split-conformal, typical and atypical acquisitions) and "
        "age-bias correction from its predictions (a predictions.csv of run inference), and store them beside the "
        "checkpoint. Training does this itself; use it to calibrate on labelled scans of your own scanner.",
    )
    parser.add_argument("predictions", type=cli.existing_file, help="predictions.csv of the calibration scans")
    parser.add_argument("--ckpt_path", default="models/model.pt", help="the model they belong to")
    parser.add_argument("--method", choices=BIAS_CORRECTION_METHODS, default="beheshti", help="bias correction")
    parser.add_argument("--coverage", type=float, default=0.9, help="interval coverage")
    parser.add_argument(
        "--interval_split", default="calibration", help="rows (split column) for the interval; all: every row"
    )
    parser.add_argument(
        "--correction_split",
        default="validation",
        help="rows for the bias correction; all: every row; none: keep the current correction",
    )
    parser.add_argument("--image_size", type=int, default=128, help="the model's image_size (recorded)")
    args = parser.parse_args(argv)
    try:
        written = fit_from_predictions(
            args.predictions,
            args.ckpt_path,
            args.method,
            args.coverage,
            args.interval_split,
            None if args.correction_split == "none" else args.correction_split,
            args.image_size,
        )
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    print("wrote " + " and ".join(map(str, written)))
    return 0


if __name__ == "__main__":

    sys.exit(main())
