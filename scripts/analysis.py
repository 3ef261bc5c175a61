"""Statistics of brain-age predictions: accuracy metrics, age-bias correction, PAD associations, KS tests.

Brain-PAD (predicted age difference) = predicted age - chronological age. Regression to the mean makes
raw PADs correlate negatively with age; the bias corrections below remove that dependence using a fit
made on validation data only (never on the data being analysed), as the field requires. Accuracy is
always reported on the uncorrected predictions.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import stats

BIAS_CORRECTION_METHODS = ("beheshti", "cole", "none")


def _as_array(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
    return np.asarray(values, dtype=np.float64).ravel()


def pearson_r(prediction, target) -> float:
    """Pearson correlation in float64; NaN when either side is constant (e.g. an untrained model).

    Takes tensors or arrays of any matching shape, so it also serves as an Ignite ``EpochMetric`` ``compute_fn``.
    """
    x, y = _as_array(prediction), _as_array(target)
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt((x * x).sum() * (y * y).sum())
    if not denominator > 1e-12 * max(len(x), 1):
        return float("nan")
    return float((x * y).sum() / denominator)


def pearson_with_p(x, y) -> tuple[float, float]:
    """Pearson r and its two-sided p-value; NaNs when fewer than 3 pairs or a side is constant."""
    x, y = _as_array(x), _as_array(y)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    result = stats.pearsonr(x, y)
    return float(result.statistic), float(result.pvalue)


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
        pred, age = _as_array(predicted_age), _as_array(age)
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
        pred, age = _as_array(predicted_age), _as_array(age)
        if self.method == "beheshti":
            return pred - age - (self.slope * age + self.intercept)
        if self.method == "cole":
            return (pred - self.intercept) / self.slope - age
        return pred - age

    def save(self, path: str | Path) -> None:
        """Write as JSON, atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, path)

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


def regression_metrics(predicted_age, age, correction: BiasCorrection | None = None) -> dict[str, float]:
    """Accuracy of (uncorrected) predictions and the age dependence of PAD before/after correction."""
    pred, age = _as_array(predicted_age), _as_array(age)
    keep = np.isfinite(pred) & np.isfinite(age)
    pred, age = pred[keep], age[keep]
    n = int(len(age))
    if n == 0:
        raise ValueError("no labelled predictions to evaluate")
    pad = pred - age
    r, p = pearson_with_p(pred, age)
    ss_res = float(((age - pred) ** 2).sum())
    ss_tot = float(((age - age.mean()) ** 2).sum())
    metrics = {
        "n": n,
        "r": r,
        "r_p": p,
        "mae": float(np.abs(pad).mean()),
        "rmse": float(math.sqrt((pad**2).mean())),
        "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan"),
        "pad_mean": float(pad.mean()),
        "pad_std": float(pad.std(ddof=1)) if n > 1 else float("nan"),
        "pad_age_r": pearson_with_p(pad, age)[0],
        "mean_age_mae": float(np.abs(age - age.mean()).mean()),  # predicting everyone the mean age
    }
    if correction is not None:
        corrected = correction.corrected_pad(pred, age)
        metrics.update({
            "bias_correction": correction.method,
            "pad_corrected_mean": float(corrected.mean()),
            "pad_corrected_std": float(corrected.std(ddof=1)) if n > 1 else float("nan"),
            "pad_corrected_age_r": pearson_with_p(corrected, age)[0],
        })
    return metrics


METRIC_LABELS = {
    "n": "n (labelled)",
    "r": "Pearson r (predicted, age)",
    "r_p": "p-value of r",
    "mae": "MAE (years)",
    "rmse": "RMSE (years)",
    "r2": "R2",
    "pad_mean": "brain-PAD mean (years)",
    "pad_std": "brain-PAD std (years)",
    "pad_age_r": "corr(brain-PAD, age)",
    "pad_corrected_mean": "corrected PAD mean (years)",
    "pad_corrected_std": "corrected PAD std (years)",
    "pad_corrected_age_r": "corr(corrected PAD, age)",
    "mean_age_mae": "MAE of predicting the mean age",
}


def format_table(metrics: dict, title: str = "") -> str:
    """A plain-text two-column table of the metrics, in a fixed order."""
    lines = [title] if title else []
    width = max(len(label) for label in METRIC_LABELS.values())
    for key, label in METRIC_LABELS.items():
        if key not in metrics:
            continue
        value = metrics[key]
        if key == "n":
            shown = str(value)
        elif key == "r_p":
            shown = f"{value:.2e}"
        else:
            shown = f"{value:.3f}"
        lines.append(f"  {label:<{width}}  {shown}")
    if "bias_correction" in metrics:
        lines.append(f"  (bias correction: {metrics['bias_correction']}, fitted on validation data)")
    return "\n".join(lines)


def evaluate_predictions(predictions_csv: str | Path, output_dir: str | Path,
                         correction_path: str | Path | None = None) -> dict:
    """Metrics of a predictions.csv: ``OUT/metrics.json``, ``OUT/scatter.png`` and a printed table."""
    from scripts.figures import prediction_scatter
    from scripts.inference import read_predictions

    rows = [r for r in read_predictions(predictions_csv) if np.isfinite(r["age"]) and np.isfinite(r["predicted_age"])]
    if not rows:
        raise SystemExit(f"{predictions_csv}: no prediction with a known age to evaluate")
    correction = BiasCorrection.load(correction_path) if correction_path and Path(correction_path).is_file() else None
    predicted = np.array([r["predicted_age"] for r in rows])
    age = np.array([r["age"] for r in rows])
    metrics = regression_metrics(predicted, age, correction)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".metrics.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(metrics, indent=1))
    os.replace(tmp, out / "metrics.json")
    prediction_scatter(predicted, age, out / "scatter.png", metrics)
    print(format_table(metrics, f"Brain-age accuracy on {predictions_csv} (uncorrected predictions)"))
    return metrics
