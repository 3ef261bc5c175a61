"""Prediction intervals: Mondrian split-conformal for typical and atypical acquisitions, fitted on a calibration split that did
not choose the checkpoint, recording what they were fitted for, and refused for another model or other settings."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from scripts.calibration import BiasCorrection, CalibrationError, PredictionInterval, check_fitted_for, fitted_for
from scripts.quality import QUALITY_METRICS
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


@pytest.mark.parametrize("n", [19, 108, 1000])
def test_the_stated_coverage_spread_is_where_single_calibration_sets_land(n):
    """Exact coverage (normal residuals, known CDF) of 3,000 calibration sets of n scans: 95 % of them inside
    ``coverage_spread()``, 2.5 % on either side (within sampling error); and the spread narrows as n grows."""
    from scipy.stats import norm

    rng = np.random.default_rng(n)
    covered = []
    for _ in range(3000):
        interval = PredictionInterval.fit(rng.normal(0, 5, n), np.zeros(n), coverage=0.9)
        covered.append(norm.cdf(interval.upper[0], scale=5) - norm.cdf(interval.lower[0], scale=5))
    (low, high), covered = PredictionInterval.fit(np.zeros(n), np.zeros(n)).coverage_spread()[0], np.array(covered)
    assert abs(np.mean(covered < low) - 0.025) < 0.012 and abs(np.mean(covered > high) - 0.025) < 0.012
    assert {19: (0.82, 1.0), 108: (0.85, 0.95), 1000: (0.88, 0.92)}[n] == (round(low, 2), round(high, 2))
    assert (
        "coverage 85-95 % for 95 % of calibration sets"
        in PredictionInterval.fit(np.zeros(108), np.zeros(108)).describe()
    )


def draw_scans(rng, n, clinical_share=0.5):
    """Residuals and quality metrics of research scans (tight metrics, residual sd 3, unbiased) and clinical ones
    (metrics spread on both sides of the research ones, CJV overlapping theirs; residual sd 9, 10 y too young)."""
    clinical = rng.permutation(n) < round(n * clinical_share)
    age = rng.uniform(20, 90, n)
    research = np.exp(np.log([0.65, 0.0057, 0.51]) + rng.normal(0, [0.05, 0.05, 0.05], (n, 3)))
    spread = np.exp(np.log([0.85, 0.010, 0.45]) + rng.normal(0, [0.15, 0.4, 0.15], (n, 3)))
    quality = np.where(clinical[:, None], spread, research)
    predicted = age + np.where(clinical, rng.normal(-10, 9.0, n), rng.normal(0, 3.0, n))
    return predicted, age, quality, clinical


def test_acquisition_bands_keep_coverage_for_clinical_scans_and_research_widths_that_one_band_misses():
    """Half the calibration scans are clinical: biased, three times the spread, and with a CJV that overlaps the
    research scans'. One band under-covers clinical scans and gives research ones an interval twice too wide; the
    atypicality against the validation scans' metrics separates them, so each kind is covered, and the
    research interval stays as narrow as research scans alone give."""
    from scripts.quality import ATYPICAL, AcquisitionReference

    rng = np.random.default_rng(1)
    reference = AcquisitionReference.fit(draw_scans(rng, 90, clinical_share=0.0)[2])  # a research validation split
    pred, age, quality, _ = draw_scans(rng, 240)
    test_pred, test_age, test_quality, test_clinical = draw_scans(rng, 20000)
    single = PredictionInterval.fit(pred, age, coverage=0.9)
    banded = PredictionInterval.fit(pred, age, quality, reference, coverage=0.9)
    assert banded.reference == reference and len(banded.n) == 2 and sum(banded.n) == 240
    assert np.mean(reference.atypicality(test_quality[~test_clinical]) > ATYPICAL) < 0.05  # 1 % + estimation
    assert np.mean(reference.atypicality(test_quality[test_clinical]) > ATYPICAL) > 0.9
    for clinical in (False, True):
        rows = test_clinical == clinical
        assert 0.88 <= coverage(banded, test_pred[rows], test_age[rows], test_quality[rows]) <= 0.93
    assert coverage(single, test_pred[test_clinical], test_age[test_clinical]) < 0.87
    assert single.upper[0] - single.lower[0] > 2 * (banded.upper[0] - banded.lower[0])  # research: 2x too wide
    typical = reference.atypicality(quality) <= ATYPICAL
    research_alone = PredictionInterval.fit(pred[typical], age[typical], coverage=0.9)
    assert banded.upper[0] - banded.lower[0] == pytest.approx(research_alone.upper[0] - research_alone.lower[0])
    # a scan without metrics gets the widest band
    assert banded.group(np.array([[np.nan, 0.0057, 0.51], [0.65, 0.0057, 0.51], [2.0, 0.03, 0.2]])).tolist() == [
        1,
        0,
        1,
    ]


def test_interval_ranks_by_hand_and_bands_need_enough_scans():
    from scripts.quality import AcquisitionReference

    # residuals predicted - age = -4..5 (n = 10); coverage 0.8: ranks floor(11 * 0.1) = 1 and ceil(11 * 0.9) = 10
    age = np.full(10, 50.0)
    predicted = age + np.arange(-4, 6)
    interval = PredictionInterval.fit(predicted, age, coverage=0.8)
    assert (interval.lower, interval.upper, interval.n, interval.reference) == ((-4.0,), (5.0,), (10,), None)
    lower, upper = interval.bounds([70.0], np.array([[0.6, 0.005, 0.5]]))
    assert (lower[0], upper[0]) == (65.0, 74.0)  # [p - upper, p - lower]
    # too few calibration scans for 90 %: the interval is unbounded, as split-conformal must say
    small = PredictionInterval.fit(predicted[:5], age[:5], coverage=0.9)
    assert small.lower == (-math.inf,) and small.upper == (math.inf,)
    # bands of at least 40 scans: 40 atypical ones make a band of their own, 39 do not
    rng = np.random.default_rng(0)
    reference = AcquisitionReference.fit(np.exp(np.log([0.65, 0.0057, 0.51]) + rng.normal(0, 0.05, (50, 3))))
    for atypical, bands in ((40, 2), (39, 1)):
        quality = np.tile([0.65, 0.0057, 0.51], (80, 1))
        quality[:atypical] = [1.2, 0.02, 0.3]
        fitted = PredictionInterval.fit(np.tile(predicted, 8), np.tile(age, 8), quality, reference, coverage=0.8)
        assert len(fitted.n) == bands and sum(fitted.n) == 80 and fitted.reference == reference
    with pytest.raises(ValueError, match="between 0 and 1"):
        PredictionInterval.fit(predicted, age, coverage=90)
    with pytest.raises(ValueError, match=">= 6 scored scans"):
        AcquisitionReference.fit(np.vstack([np.ones((5, 3)), [[np.nan, 1, 1]]]))
    metrics = interval_metrics([65, 0, np.nan], [74, 1, 3], [70, 5, 2])
    assert metrics == {"interval_coverage": 0.5, "interval_width": 5.0}


def regression_to_the_mean(rng, n):
    """Predictions shrunk 30 % towards age 55 (what an age regressor does), with noise of sd 4."""
    age = rng.uniform(18, 90, n)
    return age + 0.3 * (55 - age) + rng.normal(0, 4, n), age


def test_the_age_conditional_interval_covers_each_age_third_where_the_marginal_one_misses_the_ends(tmp_path):
    """Regression to the mean: the marginal interval over-covers middle age and under-covers the young and the old.
    With the age-bias correction (fitted on other scans, as training fits it on the validation split), the corrected
    PAD's interval holds 0 for 87-93 % of healthy scans in every third of the age range, and is narrower."""
    rng = np.random.default_rng(5)
    correction = BiasCorrection.fit(*regression_to_the_mean(rng, 300), "beheshti")
    interval = PredictionInterval.fit(*regression_to_the_mean(rng, 300), coverage=0.9, correction=correction)
    predicted, age = regression_to_the_mean(rng, 30000)
    lower, upper = interval.bounds(predicted)
    pad_lower, pad_upper = interval.corrected_pad_bounds(predicted, age, correction)
    marginal = []
    for low, high in ((18, 42), (42, 66), (66, 90)):
        third = (age >= low) & (age < high)
        marginal.append(np.mean((lower[third] <= age[third]) & (age[third] <= upper[third])))
        conditional = np.mean((pad_lower[third] <= 0) & (0 <= pad_upper[third]))
        assert 0.87 <= conditional <= 0.93, (low, conditional)
    assert marginal[1] > 0.97 and marginal[2] < 0.85, marginal  # 99 % of the middle-aged, 83 % of the old
    assert np.mean(pad_upper - pad_lower) < 0.8 * np.mean(upper - lower)
    # the corrected bands belong to their correction: with another, or from a file without them, there are none
    interval.save(tmp_path / "model_interval.json")
    loaded = PredictionInterval.load(tmp_path / "model_interval.json")
    assert np.allclose(loaded.corrected_pad_bounds(predicted, age, correction), (pad_lower, pad_upper))
    other = BiasCorrection.fit(*regression_to_the_mean(rng, 300), "beheshti")
    assert loaded.corrected_pad_bounds(predicted, age, other) is None
    assert PredictionInterval.fit(predicted, age).corrected_pad_bounds(predicted, age, correction) is None


def test_an_interval_file_keeps_its_bands_and_reference_and_an_older_one_is_refused(tmp_path):
    rng = np.random.default_rng(2)
    from scripts.quality import AcquisitionReference

    reference = AcquisitionReference.fit(draw_scans(rng, 60, clinical_share=0.0)[2])
    pred, age, quality, _ = draw_scans(rng, 200)
    fitted = PredictionInterval.fit(pred, age, quality, reference, coverage=0.9)
    fitted.save(tmp_path / "model_interval.json")
    loaded = PredictionInterval.load(tmp_path / "model_interval.json")
    assert loaded.n == fitted.n and loaded.lower == fitted.lower and loaded.upper == fitted.upper
    assert np.allclose(loaded.atypicality(quality), fitted.atypicality(quality))
    old = json.loads((tmp_path / "model_interval.json").read_text())
    old.update(method="mondrian-split-conformal", quality_edges=[0.7])
    (tmp_path / "old_interval.json").write_text(json.dumps(old))
    with pytest.raises(CalibrationError, match="refit it: python -m scripts.calibration"):
        PredictionInterval.load(tmp_path / "old_interval.json")


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
    assert stored["method"] == "acquisition-mondrian-split-conformal" and stored["coverage"] == 0.6
    assert stored["reference"]["n"] == len(json.loads(trained_model["datalist"].read_text())["validation"])
    assert sum(stored["n"]) == len(calibration)  # fitted on the calibration split, every scan of it
    assert stored["fitted_for"]["split"] == "calibration" and stored["fitted_for"]["slice_levels"] == 1
    assert all(math.isfinite(v) for v in stored["lower"] + stored["upper"])
    correction = json.loads(trained_model["ckpt_path"].with_name("model_bias_correction.json").read_text())
    assert stored["correction"] == {k: correction[k] for k in ("method", "slope", "intercept")}
    assert len(stored["corrected_lower"]) == len(stored["n"])
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
        predicted = float(row["predicted_age"])
        quality = np.array([float(row[m]) for m in QUALITY_METRICS])
        assert 0.3 < quality[0] < 3 and 0 < quality[1] < 0.1 and 0 < quality[2] < 2
        band = int(interval.group(quality)[0])
        assert int(row["interval_band"]) == band + 1
        assert float(row["atypicality"]) == pytest.approx(float(interval.atypicality(quality)[0]), abs=0.02)
        assert float(row["predicted_age_lower"]) == pytest.approx(predicted - interval.upper[band], abs=2e-3)
        assert float(row["predicted_age_upper"]) == pytest.approx(predicted - interval.lower[band], abs=2e-3)
        age = float(row["age"])
        assert float(row["brain_pad_lower"]) == pytest.approx(float(row["predicted_age_lower"]) - age, abs=2e-3)
        assert float(row["brain_pad_upper"]) == pytest.approx(float(row["predicted_age_upper"]) - age, abs=2e-3)
        pad = float(row["brain_pad_corrected"])  # the age-conditional interval, fitted with the model's correction
        assert float(row["brain_pad_corrected_lower"]) == pytest.approx(pad - interval.corrected_upper[band], abs=2e-3)
        assert float(row["brain_pad_corrected_upper"]) == pytest.approx(pad - interval.corrected_lower[band], abs=2e-3)


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
