"""Split-conformal prediction intervals: coverage, fitted on validation only, written with every prediction."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from scripts.calibration import PredictionInterval
from scripts.statistics import interval_metrics


def test_coverage_on_exchangeable_data_meets_the_guarantee():
    """Skewed, age-dependent residuals; 400 calibration/test draws: mean coverage in [0.90, 0.90 + 2/(n+1)]."""
    rng = np.random.default_rng(0)
    n, coverages = 60, []
    for _ in range(400):
        age = rng.uniform(20, 90, n + 500)
        predicted = age + 0.2 * (60 - age) + rng.gamma(2.0, 2.0, len(age)) - 4  # biased, skewed
        interval = PredictionInterval.fit(predicted[:n], age[:n], coverage=0.9)
        lower, upper = interval.bounds(predicted[n:])
        coverages.append(np.mean((lower <= age[n:]) & (age[n:] <= upper)))
    assert 0.90 <= np.mean(coverages) <= 0.90 + 2 / (n + 1)
    assert np.std(coverages) > 0  # a real distribution of coverages, not a constant


def test_interval_ranks_by_hand():
    # residuals predicted - age = -4..5 (n = 10); coverage 0.8: ranks floor(11 * 0.1) = 1 and ceil(11 * 0.9) = 10
    age = np.full(10, 50.0)
    predicted = age + np.arange(-4, 6)
    interval = PredictionInterval.fit(predicted, age, coverage=0.8)
    assert (interval.lower, interval.upper, interval.n) == (-4.0, 5.0, 10)
    lower, upper = interval.bounds([70.0])
    assert (lower[0], upper[0]) == (65.0, 74.0)  # [p - upper, p - lower]
    # too few validation scans for 90 %: the interval is unbounded, as split-conformal must say
    small = PredictionInterval.fit(predicted[:5], age[:5], coverage=0.9)
    assert small.lower == -math.inf and small.upper == math.inf
    with pytest.raises(ValueError, match="between 0 and 1"):
        PredictionInterval.fit(predicted, age, coverage=90)
    metrics = interval_metrics([65, 0, np.nan], [74, 1, 3], [70, 5, 2])
    assert metrics == {"interval_coverage": 0.5, "interval_width": 5.0}


def test_training_fits_the_interval_on_validation_and_inference_applies_it(run_workflow, trained_model, tmp_path):
    path = trained_model["ckpt_path"].with_name("model_interval.json")
    stored = json.loads(path.read_text())
    validation = json.loads(trained_model["datalist"].read_text())["validation"]
    assert stored["method"] == "split-conformal" and stored["coverage"] == 0.6
    assert stored["n"] == len(validation)  # fitted on the validation split, every scan of it
    assert math.isfinite(stored["lower"]) and math.isfinite(stored["upper"]) and stored["lower"] < stored["upper"]
    before = path.read_bytes()
    run_workflow(
        "inference.yaml",
        "inference",
        input=str(trained_model["datalist"]),
        input_splits=["test"],
        output_dir=str(tmp_path),
        ckpt_path=str(trained_model["ckpt_path"]),
    )
    assert path.read_bytes() == before  # predicting never refits it
    with open(tmp_path / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        predicted = float(row["predicted_age"])
        assert float(row["predicted_age_lower"]) == pytest.approx(predicted - stored["upper"], abs=2e-3)
        assert float(row["predicted_age_upper"]) == pytest.approx(predicted - stored["lower"], abs=2e-3)
        age = float(row["age"])
        assert float(row["brain_pad_lower"]) == pytest.approx(float(row["predicted_age_lower"]) - age, abs=2e-3)
        assert float(row["brain_pad_upper"]) == pytest.approx(float(row["predicted_age_upper"]) - age, abs=2e-3)
