"""Resume is the same run: a killed and resumed training ends where the uninterrupted one does, and a resumed run
never replaces the best model with a worse or equal one. (The SIGKILL test is in test_fault_tolerance.py.)"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from ignite.engine import Events

from scripts.calibration import BiasCorrection, CalibrationFitter

SETTINGS = {"batch_size": 4, "val_batch_size": 8, "max_epochs": 3}


def train(run_workflow, folder, datalist, before_run=None, **overrides):
    return run_workflow(
        "train.yaml",
        "training",
        before_run=before_run,
        datalist=str(datalist),
        output_dir=str(folder / "run"),
        ckpt_path=str(folder / "models" / "model.pt"),
        **{**SETTINGS, **overrides},
    )


def outcome(workflow, folder) -> dict:
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    return {
        "best": torch.load(folder / "models" / "model.pt", weights_only=True),
        "last": torch.load(folder / "run" / "last.pt", weights_only=True),
        "correction": json.loads((folder / "models" / "model_bias_correction.json").read_text()),
        "metrics": dict(evaluator.state.metrics),
        "best_metric": evaluator.state.best_metric,
        "best_metric_epoch": evaluator.state.best_metric_epoch,
    }


def test_a_killed_and_resumed_run_ends_exactly_as_the_uninterrupted_run(run_workflow, slice_dataset, tmp_path):
    datalist = slice_dataset / "datalist.json"
    whole = outcome(train(run_workflow, tmp_path / "whole", datalist), tmp_path / "whole")

    def stop_after_epoch_2(workflow):  # the kill: last.pt of epoch 2 is written, epoch 3 never starts
        trainer = workflow.parser.get_parsed_content("train#trainer")
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=2), lambda engine: engine.terminate())

    first = train(run_workflow, tmp_path / "split", datalist, before_run=stop_after_epoch_2)
    assert first.parser.get_parsed_content("train#trainer").state.epoch == 2
    iterations = []

    def count_iterations(workflow):
        trainer = workflow.parser.get_parsed_content("train#trainer")
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: iterations.append(engine.state.iteration))

    resumed = outcome(
        train(run_workflow, tmp_path / "split", datalist, before_run=count_iterations), tmp_path / "split"
    )
    steps = whole["last"]["trainer"]["epoch_length"]
    assert iterations == list(range(2 * steps + 1, 3 * steps + 1))  # epoch 3 only: resumed, not restarted

    assert resumed["best_metric_epoch"] == whole["best_metric_epoch"]
    assert resumed["best_metric"] == pytest.approx(whole["best_metric"], rel=1e-6)
    assert resumed["metrics"] == pytest.approx(whole["metrics"], rel=1e-6)
    assert resumed["correction"].pop("method") == whole["correction"].pop("method") == "beheshti"
    assert resumed["correction"].pop("fitted_for") == whole["correction"].pop("fitted_for")  # the same model
    assert resumed["correction"] == pytest.approx(whole["correction"], rel=1e-6)
    for key, value in whole["best"].items():  # the same best model
        torch.testing.assert_close(resumed["best"][key], value, rtol=1e-5, atol=1e-6)
    for key, value in whole["last"]["network"].items():  # and the same final weights and EMA
        torch.testing.assert_close(resumed["last"]["network"][key], value, rtol=1e-5, atol=1e-6)
    for key, value in whole["last"]["ema"]["model"].items():
        torch.testing.assert_close(resumed["last"]["ema"]["model"][key], value, rtol=1e-5, atol=1e-6)
    assert resumed["last"]["ema"]["warmup_position"] == whole["last"]["ema"]["warmup_position"] == 3 * steps
    assert resumed["last"]["best_metric"] == whole["last"]["best_metric"]
    assert resumed["last"]["best_model_saver"] == whole["last"]["best_model_saver"]


def test_a_resumed_run_keeps_the_best_model_when_it_scores_no_better(run_workflow, slice_dataset, tmp_path, caplog):
    """The issue's reproduction: epoch 1 trained (the age loss off throughout), then resumed with a head that now
    predicts 40 years too old. Epoch 2 validates far worse; model.pt and the bias correction must stay epoch 1's."""
    datalist = slice_dataset / "datalist.json"

    def killed_after_epoch_1(workflow):
        trainer = workflow.parser.get_parsed_content("train#trainer")
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda engine: engine.terminate())

    train(run_workflow, tmp_path, datalist, before_run=killed_after_epoch_1, max_epochs=2, lambda_age=0.0)
    best, correction = tmp_path / "models" / "model.pt", tmp_path / "models" / "model_bias_correction.json"
    before = {path: path.read_bytes() for path in (best, correction)}
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    first_mae = state["best_metric"]["best_metric"]
    assert state["best_metric"]["best_metric_epoch"] == 1
    state["network"]["age_head.age_mean"] += 40.0  # a much worse model from here on
    state["ema"]["model"]["age_head.age_mean"] += 40.0
    torch.save(state, tmp_path / "run" / "last.pt")

    with caplog.at_level(logging.INFO):
        workflow = train(run_workflow, tmp_path, datalist, max_epochs=2, lambda_age=0.0)
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    assert evaluator.state.metrics["val_mae"] > first_mae + 20
    assert (evaluator.state.best_metric, evaluator.state.best_metric_epoch) == (first_mae, 1)
    assert {path: path.read_bytes() for path in (best, correction)} == before
    assert "Got new best metric" not in caplog.text


class _Scripted:
    """An inferer returning preset predictions per validation epoch: (B, 1) years."""

    def __init__(self, table):
        self.table, self.evaluator = table, None

    def __call__(self, inputs, network):
        rows = inputs.reshape(-1).long()
        return self.table[self.evaluator.state.epoch - 1][rows][:, None]


def _validate_three_epochs(tmp_path, table, method="beheshti"):
    """A real SupervisedEvaluator run for three validation epochs with the fitter attached."""
    from monai.engines import SupervisedEvaluator
    from monai.handlers import MeanAbsoluteError, from_engine

    from scripts.prepare_batch import AgePrepareBatch

    ages = torch.linspace(20.0, 80.0, 10)
    data = [{"image": torch.arange(10.0)[:, None, None, None], "age": ages}]
    inferer = _Scripted(table)
    fitter = CalibrationFitter(tmp_path / "correction.json", method)
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=data,
        network=torch.nn.Identity(),
        inferer=inferer,
        prepare_batch=AgePrepareBatch(),
        val_handlers=[fitter],
        decollate=False,
        key_val_metric={"val_mae": MeanAbsoluteError(output_transform=from_engine(["pred", "label"]))},
        metric_cmp_fn=lambda current, best: current < best,
    )
    inferer.evaluator = evaluator
    for epoch in (1, 2, 3):
        evaluator.run(epoch)
    return ages, evaluator


def test_the_bias_correction_is_fitted_on_the_best_epoch_only(tmp_path):
    ages = torch.linspace(20.0, 80.0, 10)
    table = [
        0.5 * ages + 30 + 4.0,  # epoch 1: MAE ~ 15
        0.8 * ages + 11,  # epoch 2: the best (MAE ~ 2)
        0.3 * ages + 40,
    ]  # epoch 3: worse again
    _, evaluator = _validate_three_epochs(tmp_path, table)
    assert evaluator.state.best_metric_epoch == 2
    saved = BiasCorrection.load(tmp_path / "correction.json")
    expected = BiasCorrection.fit(table[1], ages, "beheshti")
    assert (saved.slope, saved.intercept, saved.n) == pytest.approx((expected.slope, expected.intercept, 10))
    assert saved.slope != pytest.approx(BiasCorrection.fit(table[2], ages, "beheshti").slope)


def test_cole_on_a_model_that_ignores_age_is_refused_and_training_goes_on(tmp_path, caplog):
    flat = torch.full((10,), 50.0)
    table = [flat + 20, flat, flat + 10]  # predictions that do not vary with age; epoch 2 the best
    with caplog.at_level(logging.WARNING):
        _, evaluator = _validate_three_epochs(tmp_path, table, method="cole")
    assert evaluator.state.epoch == 3  # no exception stopped the evaluations
    assert not (tmp_path / "correction.json").exists()
    assert "epoch 1: age-bias correction not fitted" in caplog.text and "cole" in caplog.text
