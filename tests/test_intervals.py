"""Prediction intervals: Mondrian split-conformal per band of image quality, fitted on a calibration split that did
not choose the checkpoint, recording what they were fitted for, and refused for another model or other settings."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from scripts.calibration import CalibrationError, PredictionInterval, check_fitted_for, fitted_for
from scripts.statistics import interval_metrics


def coverage(interval, predicted, age, quality=None) -> float:
    lower, upper = interval.bounds(predicted, quality)
    return float(np.mean((lower <= age) & (age <= upper)))


def test_coverage_on_exchangeable_data_meets_the_guarantee_on_average_not_for_every_calibration_set():
    """Skewed, age-dependent residuals; 400 calibration/test draws: mean coverage in [0.90, 0.90 + 2/(n+1)]. The
    guarantee is over calibration sets: a good share of single calibration sets cover less than 90 %."""
    rng = np.random.default_rng(0)
    n, coverages = 60, []
    for _ in range(400):
        age = rng.uniform(20, 90, n + 500)
        predicted = age + 0.2 * (60 - age) + rng.gamma(2.0, 2.0, len(age)) - 4  # biased, skewed
        interval = PredictionInterval.fit(predicted[:n], age[:n], coverage=0.9)
        coverages.append(coverage(interval, predicted[n:], age[n:]))
    assert 0.90 <= np.mean(coverages) <= 0.90 + 2 / (n + 1)
    assert 0.2 < np.mean(np.array(coverages) < 0.9) < 0.6


def test_mondrian_bands_keep_coverage_for_noisy_scans_that_a_single_band_under_covers():
    """Half the scans are noisy (residual sd 3x, a higher quality score). One band over-covers the clean ones and
    under-covers the noisy ones; bands of the quality score cover each kind, and the clean ones' interval stays
    as narrow as if calibrated on clean scans alone."""
    rng = np.random.default_rng(1)

    def draw(n):
        noisy = rng.permutation(n) < n // 2  # exactly half
        age = rng.uniform(20, 90, n)
        quality = np.where(noisy, rng.uniform(0.9, 1.2, n), rng.uniform(0.6, 0.8, n))
        return age + rng.normal(0, np.where(noisy, 9.0, 3.0)), age, quality, noisy

    pred, age, quality, _ = draw(240)
    test_pred, test_age, test_quality, test_noisy = draw(20000)
    single = PredictionInterval.fit(pred, age, coverage=0.9)
    mondrian = PredictionInterval.fit(pred, age, quality, coverage=0.9, max_groups=2)
    assert len(mondrian.quality_edges) == 1 and 0.8 <= mondrian.quality_edges[0] <= 0.9 and sum(mondrian.n) == 240
    for noisy in (False, True):
        rows = test_noisy == noisy
        plain = coverage(single, test_pred[rows], test_age[rows])
        banded = coverage(mondrian, test_pred[rows], test_age[rows], test_quality[rows])
        assert (plain < 0.85) if noisy else (plain > 0.97)
        assert 0.86 <= banded <= 0.95
    clean_alone = PredictionInterval.fit(pred[quality < 0.85], age[quality < 0.85], coverage=0.9)
    clean_band = mondrian.upper[0] - mondrian.lower[0]
    assert clean_band == pytest.approx(clean_alone.upper[0] - clean_alone.lower[0])
    # a scan without a score gets the widest band; one beyond the calibration range the nearest band
    assert mondrian.group([np.nan, 0.1, 5.0]).tolist() == [1, 0, 1]


def test_interval_ranks_by_hand_and_bands_need_enough_scans():
    # residuals predicted - age = -4..5 (n = 10); coverage 0.8: ranks floor(11 * 0.1) = 1 and ceil(11 * 0.9) = 10
    age = np.full(10, 50.0)
    predicted = age + np.arange(-4, 6)
    interval = PredictionInterval.fit(predicted, age, np.linspace(0, 1, 10), coverage=0.8)
    assert (interval.lower, interval.upper, interval.n, interval.quality_edges) == ((-4.0,), (5.0,), (10,), ())
    lower, upper = interval.bounds([70.0], [0.5])
    assert (lower[0], upper[0]) == (65.0, 74.0)  # [p - upper, p - lower]
    # too few calibration scans for 90 %: the interval is unbounded, as split-conformal must say
    small = PredictionInterval.fit(predicted[:5], age[:5], coverage=0.9)
    assert small.lower == (-math.inf,) and small.upper == (math.inf,)
    # 80 scored scans and bands of at least 40: two bands, cut at the median score
    many = PredictionInterval.fit(np.tile(predicted, 8), np.tile(age, 8), np.arange(80.0), coverage=0.8)
    assert many.n == (40, 40) and many.quality_edges == (39.5,)
    with pytest.raises(ValueError, match="between 0 and 1"):
        PredictionInterval.fit(predicted, age, coverage=90)
    metrics = interval_metrics([65, 0, np.nan], [74, 1, 3], [70, 5, 2])
    assert metrics == {"interval_coverage": 0.5, "interval_width": 5.0}


def test_a_calibration_records_what_it_was_fitted_for_and_refuses_anything_else(tmp_path):
    import torch

    state = {"w": torch.ones(3)}
    record = fitted_for(state, slice_levels=1, image_size=128, split="calibration")
    assert (
        set(record) == {"weights_sha256", "slice_levels", "image_size", "split"} and len(record["weights_sha256"]) == 64
    )
    path = tmp_path / "model_interval.json"
    PredictionInterval.fit(np.arange(30.0), np.arange(30.0) + 1, coverage=0.9, fitted_for=record).save(path)
    assert PredictionInterval.load(path).fitted_for == record
    check_fitted_for(path, record, {**record, "split": "other"})  # the split is information, not a condition
    for change, shown in [
        ({"slice_levels": 5}, "slice_levels 1 there, 5 here"),
        ({"image_size": 64}, "image_size 128 there, 64 here"),
        (fitted_for({"w": torch.zeros(3)}, 1, 128, ""), "weights_sha256"),
    ]:
        with pytest.raises(CalibrationError, match=shown) as raised:
            check_fitted_for(path, record, {**record, **change})
        assert str(path) in str(raised.value) and "python -m scripts.calibration" in str(raised.value)
    with pytest.raises(CalibrationError, match="does not say which model"):
        check_fitted_for(path, {}, record)


def test_training_fits_the_interval_on_the_calibration_split_and_inference_applies_it(
    run_workflow, trained_model, tmp_path
):
    path = trained_model["ckpt_path"].with_name("model_interval.json")
    stored = json.loads(path.read_text())
    calibration = json.loads(trained_model["datalist"].read_text())["calibration"]
    assert stored["method"] == "mondrian-split-conformal" and stored["coverage"] == 0.6
    assert sum(stored["n"]) == len(calibration)  # fitted on the calibration split, every scan of it
    assert stored["fitted_for"]["split"] == "calibration" and stored["fitted_for"]["slice_levels"] == 1
    assert all(math.isfinite(v) for v in stored["lower"] + stored["upper"])
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
    interval = PredictionInterval.load(path)
    with open(tmp_path / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        predicted, quality = float(row["predicted_age"]), float(row["quality"])
        assert 0.3 < quality < 3
        band = int(interval.group([quality])[0])
        assert int(row["interval_band"]) == band + 1
        assert float(row["predicted_age_lower"]) == pytest.approx(predicted - interval.upper[band], abs=2e-3)
        assert float(row["predicted_age_upper"]) == pytest.approx(predicted - interval.lower[band], abs=2e-3)
        age = float(row["age"])
        assert float(row["brain_pad_lower"]) == pytest.approx(float(row["predicted_age_lower"]) - age, abs=2e-3)
        assert float(row["brain_pad_upper"]) == pytest.approx(float(row["predicted_age_upper"]) - age, abs=2e-3)


@pytest.mark.parametrize("change", ["checkpoint", "slice_levels"])
def test_inference_refuses_a_calibration_fitted_for_another_model_or_level_count(
    run_workflow, trained_model, tmp_path, change
):
    """A 5-level median must not get a 1-level calibration, nor a checkpoint another model's."""
    import shutil

    import torch

    from scripts.cli import root_cause

    models = tmp_path / "models"
    shutil.copytree(trained_model["ckpt_path"].parent, models)
    overrides = {}
    if change == "checkpoint":
        state = torch.load(models / "model.pt", weights_only=True)
        state["age_head.age_mean"] += 1.0
        torch.save(state, models / "model.pt")
    else:
        overrides["slice_levels"] = 3
    with pytest.raises(Exception) as raised:
        run_workflow(
            "inference.yaml",
            "inference",
            input=str(trained_model["datalist"]),
            input_splits=["test"],
            output_dir=str(tmp_path / "out"),
            ckpt_path=str(models / "model.pt"),
            **overrides,
        )
    err = root_cause(raised.value)
    assert isinstance(err, CalibrationError), err
    assert "fitted for another model or other settings" in str(err)
    assert ("weights_sha256" if change == "checkpoint" else "slice_levels 1 there, 3 here") in str(err)
    assert not (tmp_path / "out" / "predictions.csv").exists()  # refused before any work
