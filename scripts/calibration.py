"""Age-bias correction and prediction intervals of brain-age predictions, fitted on validation data and stored
beside the model.

Brain-PAD (predicted age difference) = predicted age - chronological age. Regression to the mean makes raw PADs
correlate negatively with age; the corrections here remove that dependence with a fit made at the end of training
on the best model's validation predictions (:class:`BiasCorrectionFitter`), never on the data being analysed, as
the field requires. Accuracy is always reported on the uncorrected predictions.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from scripts.atomic import write_json

__all__ = [
    "BIAS_CORRECTION_METHODS",
    "BiasCorrection",
    "BiasCorrectionFitter",
    "PredictionInterval",
    "bias_correction_path",
    "interval_path",
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

    @classmethod
    def fit(cls, predicted_age, age, method: str = "beheshti") -> "BiasCorrection":
        if method not in BIAS_CORRECTION_METHODS:
            raise ValueError(f"unknown bias correction {method!r}; choose from {', '.join(BIAS_CORRECTION_METHODS)}")
        pred, age = as_array(predicted_age), as_array(age)
        keep = np.isfinite(pred) & np.isfinite(age)
        pred, age = pred[keep], age[keep]
        if method == "none":
            return cls("none", n=len(age))
        if len(age) < 3 or np.ptp(age) == 0:
            raise ValueError(f"bias correction needs >= 3 labelled predictions with varying ages, got {len(age)}")
        target = pred - age if method == "beheshti" else pred
        slope, intercept = np.polyfit(age, target, 1)
        if method == "cole" and abs(slope) < 1e-3:
            raise ValueError(f"cole correction: predictions do not vary with age (slope {slope:.2g})")
        return cls(method, float(slope), float(intercept), int(len(age)))

    def corrected_pad(self, predicted_age, age) -> np.ndarray:
        pred, age = as_array(predicted_age), as_array(age)
        if self.method == "beheshti":
            return pred - age - (self.slope * age + self.intercept)
        if self.method == "cole":
            return (pred - self.intercept) / self.slope - age
        return pred - age

    def save(self, path: str | Path) -> None:
        """Write as JSON, atomically."""
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> "BiasCorrection":
        data = json.loads(Path(path).read_text())
        if data.get("method") not in BIAS_CORRECTION_METHODS:
            raise ValueError(f"{path}: not a bias-correction file (method {data.get('method')!r})")
        return cls(str(data["method"]), float(data["slope"]), float(data["intercept"]), int(data.get("n", 0)))


@dataclass(frozen=True)
class PredictionInterval:
    """Split-conformal prediction interval of brain age (Vovk et al. 2005; Lei et al. 2018), fitted on validation.

    With the signed validation residuals ``r = predicted - age`` of n scans, the interval of a new prediction
    ``p`` is ``[p - upper, p - lower]`` where ``lower``/``upper`` are the ``floor((n+1) a/2)``-th and
    ``ceil((n+1)(1 - a/2))``-th smallest residuals (``a = 1 - coverage``): for a scan exchangeable with the
    validation scans it covers the true age with probability at least ``coverage`` (and below
    ``coverage + 2/(n+1)``). Signed residuals keep the interval honest where the model is biased
    (regression to the mean); the guarantee is marginal, over the validation population's ages and scan types,
    not per age or per scanner. ``n`` below ``2/a - 1`` cannot reach the coverage: the interval is then
    unbounded (``inf``), as the method says it must be.
    """

    coverage: float
    lower: float
    upper: float
    n: int
    method: str = "split-conformal"

    @classmethod
    def fit(cls, predicted_age, age, coverage: float = 0.9) -> "PredictionInterval":
        if not 0 < coverage < 1:
            raise ValueError(f"interval coverage {coverage} must be between 0 and 1 (e.g. 0.9)")
        pred, age = as_array(predicted_age), as_array(age)
        keep = np.isfinite(pred) & np.isfinite(age)
        residual = np.sort(pred[keep] - age[keep])
        n, alpha = len(residual), 1.0 - coverage
        if n == 0:
            raise ValueError("a prediction interval needs labelled validation predictions, got none")
        k_low = int(np.floor((n + 1) * alpha / 2))  # 1-based rank; 0 means "below every residual"
        k_high = int(np.ceil((n + 1) * (1 - alpha / 2)))
        lower = float(residual[k_low - 1]) if k_low >= 1 else -math.inf
        upper = float(residual[k_high - 1]) if k_high <= n else math.inf
        return cls(float(coverage), lower, upper, n)

    def bounds(self, predicted_age) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) ends of the interval of each predicted age."""
        pred = as_array(predicted_age)
        return pred - self.upper, pred - self.lower

    def save(self, path: str | Path) -> None:
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> "PredictionInterval":
        data = json.loads(Path(path).read_text())
        if data.get("method") != "split-conformal":
            raise ValueError(f"{path}: not a prediction-interval file (method {data.get('method')!r})")
        return cls(float(data["coverage"]), float(data["lower"]), float(data["upper"]), int(data["n"]))


def interval_path(ckpt_path: str | Path) -> Path:
    """Where the prediction interval fitted for a checkpoint lives: beside it, ``<stem>_interval.json``."""
    ckpt_path = Path(ckpt_path)
    return ckpt_path.with_name(f"{ckpt_path.stem}_interval.json")


def bias_correction_path(ckpt_path: str | Path) -> Path:
    """Where the correction fitted for a checkpoint lives: beside it, ``<stem>_bias_correction.json``."""
    ckpt_path = Path(ckpt_path)
    return ckpt_path.with_name(f"{ckpt_path.stem}_bias_correction.json")


class BiasCorrectionFitter:
    """Fit the age-bias correction (and, with ``interval_path``, the :class:`PredictionInterval`) on the validation
    predictions of the best model and store them beside it.

    Attached to the evaluator; collects (prediction, age) of every validation batch and, when the epoch sets a
    new best key metric (the epoch whose model the best-model checkpoint holds), fits
    :class:`BiasCorrection` and writes it atomically to ``path``. The correction is therefore always
    from validation data, never from the data it is later applied to. A fit that cannot be made (``cole`` on a
    model whose predictions do not yet vary with age) is logged and skipped; training goes on.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        method: str = "beheshti",
        interval_path: str | os.PathLike | None = None,
        interval_coverage: float = 0.9,
    ) -> None:
        self.path = Path(path)
        self.method = method
        self.interval_path = Path(interval_path) if interval_path else None
        self.interval_coverage = float(interval_coverage)
        self._pred: list[torch.Tensor] = []
        self._age: list[torch.Tensor] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._fit)

    def _reset(self, engine) -> None:
        self._pred, self._age = [], []

    def _collect(self, engine) -> None:
        self._pred.append(engine.state.output["pred"].detach().float().cpu().reshape(-1))
        self._age.append(engine.state.output["label"].detach().float().cpu().reshape(-1))

    def _fit(self, engine) -> None:
        if engine.state.best_metric_epoch != engine.state.epoch:
            return
        pred = torch.cat(self._pred) if self._pred else torch.empty(0)
        age = torch.cat(self._age) if self._age else torch.empty(0)
        if dist.is_available() and dist.is_initialized():  # every rank validated a shard: fit on all of them
            from monai.utils import evenly_divisible_all_gather

            device = getattr(engine.state, "device", None) or torch.device("cpu")  # NCCL gathers CUDA tensors
            pred = evenly_divisible_all_gather(pred.to(device), concat=True).cpu()
            age = evenly_divisible_all_gather(age.to(device), concat=True).cpu()
            if dist.get_rank() != 0:
                return
        if not len(pred):
            return
        if self.interval_path is not None:  # the interval of the checkpoint's model, from the same validation data
            PredictionInterval.fit(pred, age, self.interval_coverage).save(self.interval_path)
        try:
            correction = BiasCorrection.fit(pred, age, self.method)
        except ValueError as err:
            # e.g. cole on an early model whose predictions barely vary with age: refuse, do not stop training;
            # a correction fitted for an earlier best model no longer belongs to the checkpoint, so it goes too
            Path(self.path).unlink(missing_ok=True)
            logger.warning(
                f"epoch {engine.state.epoch}: age-bias correction not fitted ({err}); "
                f"brain_pad_corrected stays empty until a later best epoch fits one"
            )
            return
        correction.save(self.path)


def fit_from_predictions(
    predictions_csv: str | Path,
    ckpt_path: str | Path,
    method: str = "beheshti",
    coverage: float = 0.9,
    split: str | None = "validation",
) -> tuple[Path, Path]:
    """Fit the bias correction and the prediction interval of ``ckpt_path`` from its predictions on *validation*
    data (a predictions.csv of ``run inference --input_splits "['validation']"``); write both beside it.

    For a model trained before intervals existed, or to refit at another coverage. Never pass the data the
    model will be evaluated on: calibrating on it voids the coverage guarantee.
    """
    import csv

    def number(text) -> float:
        return float(text) if text not in (None, "") else math.nan

    with open(predictions_csv, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if split is None or r.get("split") == split]
    pred = np.array([number(r.get("predicted_age")) for r in rows], dtype=np.float64)
    age = np.array([number(r.get("age")) for r in rows], dtype=np.float64)
    if not np.isfinite(pred + age).any():  # the interval and the correction need labelled predictions
        raise ValueError(f"{predictions_csv}: no {split or ''} row with both a prediction and an age")
    interval = interval_path(ckpt_path)
    PredictionInterval.fit(pred, age, coverage).save(interval)
    correction = bias_correction_path(ckpt_path)
    BiasCorrection.fit(pred, age, method).save(correction)
    return correction, interval


def main(argv: list[str] | None = None) -> int:
    from scripts import cli

    parser = cli.ArgumentParser(
        prog="python -m scripts.calibration",
        description="Fit a model's age-bias correction and split-conformal prediction interval from its "
        "predictions on validation data, and store them beside the checkpoint (training does this itself).",
    )
    parser.add_argument("predictions", type=cli.existing_file, help="predictions.csv with the validation split")
    parser.add_argument("--ckpt_path", "--ckpt-path", default="models/model.pt", help="the model they belong to")
    parser.add_argument("--method", choices=BIAS_CORRECTION_METHODS, default="beheshti", help="bias correction")
    parser.add_argument("--coverage", type=float, default=0.9, help="interval coverage (default: %(default)s)")
    parser.add_argument("--split", default="validation", help="rows of this split only (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        written = fit_from_predictions(args.predictions, args.ckpt_path, args.method, args.coverage, args.split)
    except ValueError as err:
        parser.error(str(err))
    print("wrote " + " and ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
