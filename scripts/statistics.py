"""Statistics of brain-age predictions: accuracy metrics, PAD associations with outcomes, KS tests between models.

The paper's Table 1 (r, MAE, R2 and the PAD-survival association), Table 2 (KS tests of PAD distributions) and
Figure 2 (PAD box plots). Accuracy is always reported on the uncorrected predictions; corrected PADs use the
validation-fitted :class:`scripts.calibration.BiasCorrection`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy import stats

from scripts.atomic import write_json
from scripts.calibration import BiasCorrection, as_array
from scripts.figures import pad_boxplot, prediction_scatter
from scripts.inference import read_predictions


def pearson_r(prediction, target) -> float:
    """Pearson correlation in float64; NaN when either side is constant (e.g. an untrained model).

    Takes tensors or arrays of any matching shape, so it also serves as an Ignite ``EpochMetric`` ``compute_fn``.
    """
    x, y = as_array(prediction), as_array(target)
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt((x * x).sum() * (y * y).sum())
    if not denominator > 1e-12 * max(len(x), 1):
        return float("nan")
    return float((x * y).sum() / denominator)


def pearson_with_p(x, y) -> tuple[float, float]:
    """Pearson r and its two-sided p-value; NaNs when fewer than 3 pairs or a side is constant."""
    x, y = as_array(x), as_array(y)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    result = stats.pearsonr(x, y)
    return float(result.statistic), float(result.pvalue)


def regression_metrics(predicted_age, age, correction: BiasCorrection | None = None) -> dict[str, float]:
    """Accuracy of (uncorrected) predictions and the age dependence of PAD before/after correction."""
    pred, age = as_array(predicted_age), as_array(age)
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
        metrics.update(
            {
                "bias_correction": correction.method,
                "pad_corrected_mean": float(corrected.mean()),
                "pad_corrected_std": float(corrected.std(ddof=1)) if n > 1 else float("nan"),
                "pad_corrected_age_r": pearson_with_p(corrected, age)[0],
            }
        )
    return metrics


def interval_metrics(lower, upper, age) -> dict[str, float]:
    """Empirical coverage of prediction intervals and their mean width (years)."""
    lower, upper, age = as_array(lower), as_array(upper), as_array(age)
    keep = ~np.isnan(lower) & ~np.isnan(upper) & np.isfinite(age)
    lower, upper, age = lower[keep], upper[keep], age[keep]
    return {
        "interval_coverage": float(np.mean((lower <= age) & (age <= upper))) if len(age) else float("nan"),
        "interval_width": float(np.mean(upper - lower)) if len(age) else float("nan"),
    }


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
    "interval_coverage": "prediction-interval coverage",
    "interval_width": "mean interval width (years)",
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


def evaluate_predictions(
    predictions_csv: str | Path, output_dir: str | Path, correction_path: str | Path | None = None
) -> dict:
    """Metrics of a predictions.csv: ``OUT/metrics.json``, ``OUT/scatter.png`` and a printed table."""

    rows = [r for r in read_predictions(predictions_csv) if np.isfinite(r["age"]) and np.isfinite(r["predicted_age"])]
    if not rows:
        raise SystemExit(f"{predictions_csv}: no prediction with a known age to evaluate")
    correction = BiasCorrection.load(correction_path) if correction_path and Path(correction_path).is_file() else None
    predicted = np.array([r["predicted_age"] for r in rows])
    age = np.array([r["age"] for r in rows])
    metrics = regression_metrics(predicted, age, correction)
    if "predicted_age_lower" in rows[0]:
        lower, upper = _column(rows, "predicted_age_lower"), _column(rows, "predicted_age_upper")
        if not np.isnan(lower).all():
            metrics.update(interval_metrics(lower, upper, age))
    out = Path(output_dir)
    write_json(out / "metrics.json", metrics)
    prediction_scatter(predicted, age, out / "scatter.png", metrics)
    print(format_table(metrics, f"Brain-age accuracy on {predictions_csv} (uncorrected predictions)"))
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# Brain-PAD against outcomes and between models (paper: Table 1's last row, Table 2, Figure 2).
# ---------------------------------------------------------------------------------------------------------------

MISSING_VALUES = ("", "n/a", "na", "nan")


def _select(rows: list[dict], split: str | None) -> list[dict]:
    if not rows:
        raise ValueError("no predictions")
    if split is None:
        return rows
    selected = [row for row in rows if row.get("split") == split]
    if not selected:
        found = sorted({str(row.get("split", "")) for row in rows})
        raise ValueError(f"no predictions in split {split!r} (splits: {', '.join(found)})")
    return selected


def _column(rows: list[dict], column: str) -> np.ndarray:
    """One column as float64, NaN where empty; extra predictions.csv columns arrive as text."""
    if not any(column in row for row in rows):
        raise ValueError(f"no column {column!r} in the predictions (columns: {', '.join(rows[0])})")
    values = []
    for row in rows:
        value = row.get(column)
        if value is None or (isinstance(value, str) and value.strip().lower() in MISSING_VALUES):
            values.append(math.nan)
            continue
        try:
            values.append(float(value))
        except ValueError:
            raise ValueError(
                f"column {column!r} of subject {row.get('subject', '?')}: {value!r} is not a number"
            ) from None
    return np.asarray(values, dtype=np.float64)


def pad_outcome_association(
    rows: list[dict], outcome: str = "survival_months", pad: str = "brain_pad", split: str | None = None
) -> dict:
    """Pearson r (and p) between brain-PAD and an outcome such as survival: the paper's Table 1, last row.

    ``rows`` as :func:`scripts.inference.read_predictions` returns them; rows lacking either value are left out
    and ``n`` counts the pairs used; ``split`` keeps the rows of one datalist split (e.g. ``disease``).
    """
    rows = _select(rows, split)
    x, y = _column(rows, pad), _column(rows, outcome)
    keep = np.isfinite(x) & np.isfinite(y)
    r, p = pearson_with_p(x[keep], y[keep])
    return {"r": r, "p": p, "n": int(keep.sum()), "outcome": outcome, "pad": pad, "split": split}


def compare_pad_distributions(
    named_rows: dict[str, list[dict]],
    reference: str | None = None,
    pad: str = "brain_pad",
    split: str | dict[str, str] | None = None,
    boxplot: str | Path | None = None,
) -> dict:
    """Brain-PAD mean, std and n per model, and the two-sample Kolmogorov-Smirnov test of each against a reference.

    The paper's Table 2 (and, with ``boxplot`` a PNG path, its Figure 2): whether the models' PAD distributions on
    one cohort differ, not only their means. ``reference`` defaults to the first model; its own KS entries are None.
    ``split`` is one split for every model or ``{name: split}``, e.g. to compare one model's healthy and disease
    cohorts.
    """
    if len(named_rows) < 2:
        raise ValueError(f"comparing PAD distributions needs at least two models, got {len(named_rows)}")
    reference = next(iter(named_rows)) if reference is None else reference
    if reference not in named_rows:
        raise ValueError(f"reference {reference!r} is not one of the models ({', '.join(named_rows)})")
    splits = split if isinstance(split, dict) else dict.fromkeys(named_rows, split)
    pads = {}
    for name, rows in named_rows.items():
        values = _column(_select(rows, splits.get(name)), pad)
        pads[name] = values[np.isfinite(values)]
        if len(pads[name]) == 0:
            raise ValueError(f"{name}: no {pad} values" + (f" in split {splits[name]!r}" if splits.get(name) else ""))
    models = {}
    for name, values in pads.items():
        models[name] = {
            "n": int(len(values)),
            "mean": float(values.mean()),
            "std": float(values.std(ddof=1)) if len(values) > 1 else float("nan"),
            "ks_statistic": None,
            "ks_p": None,
        }
        if name != reference:
            ks = stats.ks_2samp(values, pads[reference])
            models[name].update(ks_statistic=float(ks.statistic), ks_p=float(ks.pvalue))
    result = {"reference": reference, "pad": pad, "split": split, "models": models}
    if boxplot is not None:

        pad_boxplot(pads, boxplot, models, title=f"{pad} by model{_where(split).replace(' (', chr(10) + '(', 1)}")
    return result


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(f"{cell:>{w}}" for cell, w in zip(line, widths)) for line in [header, *rows]]
    return "\n".join("  " + line for line in lines)


def _number(value, spec: str = ".2f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _where(split: str | dict | None) -> str:
    if isinstance(split, dict):
        return " (splits: " + ", ".join(f"{name}: {value}" for name, value in split.items()) + ")"
    return f" (split {split!r})" if split else ""


def format_association(result: dict) -> str:
    return (
        f"corr({result['pad']}, {result['outcome']}){_where(result['split'])}: r = {_number(result['r'], '.3f')}, "
        f"p = {_number(result['p'], '.2e')}, n = {result['n']}"
    )


def format_pad_table(result: dict) -> str:
    """Table 2 as plain text: one row per model, KS against the reference."""
    rows = [
        [
            name,
            str(m["n"]),
            _number(m["mean"]),
            _number(m["std"]),
            _number(m["ks_statistic"], ".3f"),
            _number(m["ks_p"], ".2e"),
        ]
        for name, m in result["models"].items()
    ]
    title = f"{result['pad']} distributions{_where(result['split'])}, two-sample KS against {result['reference']!r}"
    return title + "\n" + _text_table(["model", "n", "mean", "std", "KS D", "KS p"], rows)


# ---------------------------------------------------------------------------------------------------------------
# Test-retest reliability: the same people scanned twice (issue 15; Shrout & Fleiss 1979, Bland & Altman 1986).
# ---------------------------------------------------------------------------------------------------------------


def icc(ratings) -> dict[str, float]:
    """Intraclass correlations of an (n subjects, k sessions) matrix, from the two-way ANOVA mean squares.

    ``icc_2_1``: two-way random effects, absolute agreement, single measurement (a systematic offset between
    sessions, e.g. between scanner grades, lowers it); ``icc_3_1``: two-way mixed, consistency (offsets do not
    count). Shrout & Fleiss (1979) ICC(2,1) and ICC(3,1); McGraw & Wong (1996) ICC(A,1) and ICC(C,1).
    """
    y = np.asarray(ratings, dtype=np.float64)
    if y.ndim != 2 or y.shape[0] < 2 or y.shape[1] < 2 or not np.isfinite(y).all():
        raise ValueError(f"ICC needs a finite (subjects >= 2, sessions >= 2) matrix, got shape {y.shape}")
    n, k = y.shape
    grand = y.mean()
    ms_rows = k * ((y.mean(axis=1) - grand) ** 2).sum() / (n - 1)
    ms_cols = n * ((y.mean(axis=0) - grand) ** 2).sum() / (k - 1)
    residual = y - y.mean(axis=1, keepdims=True) - y.mean(axis=0, keepdims=True) + grand
    ms_error = (residual**2).sum() / ((n - 1) * (k - 1))
    return {
        "icc_2_1": float((ms_rows - ms_error) / (ms_rows + (k - 1) * ms_error + k * (ms_cols - ms_error) / n)),
        "icc_3_1": float((ms_rows - ms_error) / (ms_rows + (k - 1) * ms_error)),
        "n": int(n),
    }


def bland_altman(first, second) -> dict[str, float]:
    """Bias (mean of second - first) and the 95 % limits of agreement (bias +- 1.96 sd of the differences)."""
    a, b = as_array(first), as_array(second)
    keep = np.isfinite(a) & np.isfinite(b)
    difference = b[keep] - a[keep]
    if len(difference) < 2:
        raise ValueError("Bland-Altman needs at least 2 paired measurements")
    bias, sd = float(difference.mean()), float(difference.std(ddof=1))
    return {"bias": bias, "sd": sd, "loa_lower": bias - 1.96 * sd, "loa_upper": bias + 1.96 * sd}


def reliability(first_csv: str | Path, second_csv: str | Path, column: str = "predicted_age") -> dict:
    """ICC and Bland-Altman of ``column`` between two predictions.csv of the same people, joined on ``subject``
    (or ``participant_id``); rows without a value on either side are left out."""

    def by_person(path) -> dict[str, float]:
        rows = read_predictions(path)
        key = "participant_id" if rows and rows[0].get("participant_id") else "subject"
        return {str(r[key]): float(r[column]) if r.get(column) not in ("", None) else math.nan for r in rows}

    a, b = by_person(first_csv), by_person(second_csv)
    shared = sorted(s for s in set(a) & set(b) if math.isfinite(a[s]) and math.isfinite(b[s]))
    if len(shared) < 2:
        raise ValueError(f"{first_csv} and {second_csv}: fewer than 2 subjects with a {column} in both")
    pairs = np.array([[a[s], b[s]] for s in shared])
    return {
        "column": column,
        "first": str(first_csv),
        "second": str(second_csv),
        **icc(pairs),
        **bland_altman(pairs[:, 0], pairs[:, 1]),
        "pairs": pairs.tolist(),
        "subjects": shared,
    }
