"""Age-bias correction of brain-age predictions, fitted on validation data and stored beside the model.

Brain-PAD (predicted age difference) = predicted age - chronological age. Regression to the mean makes raw PADs
correlate negatively with age; the corrections here remove that dependence with a fit made at the end of training
on the best model's validation predictions (:class:`BiasCorrectionFitter`), never on the data being analysed, as
the field requires. Accuracy is always reported on the uncorrected predictions.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from scripts.atomic import write_json

__all__ = ["BIAS_CORRECTION_METHODS", "BiasCorrection", "BiasCorrectionFitter", "bias_correction_path"]

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


def bias_correction_path(ckpt_path: str | Path) -> Path:
    """Where the correction fitted for a checkpoint lives: beside it, ``<stem>_bias_correction.json``."""
    ckpt_path = Path(ckpt_path)
    return ckpt_path.with_name(f"{ckpt_path.stem}_bias_correction.json")


class BiasCorrectionFitter:
    """Fit the age-bias correction on the validation predictions of the best model and store it beside it.

    Attached to the evaluator; collects (prediction, age) of every validation batch and, when the epoch sets a
    new best key metric (the epoch whose model the best-model checkpoint holds), fits
    :class:`BiasCorrection` and writes it atomically to ``path``. The correction is therefore always
    from validation data, never from the data it is later applied to. A fit that cannot be made (``cole`` on a
    model whose predictions do not yet vary with age) is logged and skipped; training goes on.
    """

    def __init__(self, path: str | os.PathLike, method: str = "beheshti") -> None:
        self.path = Path(path)
        self.method = method
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
