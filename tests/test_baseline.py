"""The DenseNet121 baseline overlay (configs/baseline_densenet.yaml): same trainer, data, outputs and analyses."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from scripts import statistics
from scripts.inference import PREDICTION_COLUMNS, read_predictions
from scripts.losses import LabelledAgeLoss
from scripts.networks import AgeRegressor


def test_labelled_age_loss_is_the_standardised_mse_over_labelled_images_only():
    model = AgeRegressor(torch.nn.Linear(2, 1), age_mean=50.0, age_std=10.0)
    pred = torch.tensor([[60.0], [40.0], [70.0]], requires_grad=True)
    target = torch.tensor([[50.0], [float("nan")], [50.0]])
    loss = LabelledAgeLoss(model)({"age": pred}, target)  # AgeInferer's output
    assert float(loss) == ((1.0**2) + (2.0**2)) / 2  # (10/10)^2 and (20/10)^2; the NaN target is left out
    loss.backward()
    assert pred.grad[1] == 0 and pred.grad[0] != 0
    unlabelled = LabelledAgeLoss(model)({"age": pred}, torch.full((3, 1), float("nan")))
    assert float(unlabelled) == 0.0


def labelled_items(workflow) -> list[dict]:
    return workflow.parser.get_parsed_content("train_items")


def test_precise_batchnorm_of_a_regressor_is_the_average_of_batch_statistics_for_its_own_weights():
    """AgeRegressor.recalibrate_batchnorm: running statistics from equal-sized batches equal the statistics over
    all images (mean exactly, variance as the average of per-batch unbiased variances); dropout stays off."""
    backbone = torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3),
        torch.nn.BatchNorm2d(3),
        torch.nn.Dropout(0.9),
        torch.nn.Flatten(),
        torch.nn.LazyLinear(1),
    )
    model = AgeRegressor(backbone, 50.0, 10.0)
    images = torch.rand(8, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    model(images)  # materialise the lazy layer
    model.backbone[1].running_mean.fill_(5.0)  # statistics of other weights
    model.eval()
    model.recalibrate_batchnorm(
        [(images[:4], torch.ones(4, dtype=torch.bool)), (images[4:], torch.ones(4, dtype=torch.bool))]
    )
    assert not model.training and model.backbone[1].momentum == 0.1  # modes and momentum restored
    with torch.no_grad():
        features = model.backbone[0](images)
    norm = model.backbone[1]
    torch.testing.assert_close(norm.running_mean, features.mean((0, 2, 3)))
    per_batch = [f.transpose(0, 1).reshape(3, -1).var(1) for f in features.split(4)]
    torch.testing.assert_close(norm.running_var, sum(per_batch) / 2)


def test_densenet_baseline_trains_and_evaluates_through_the_same_workflow(run_workflow, slice_dataset, tmp_path):
    overlays = ["train.yaml", "baseline_densenet.yaml"]
    ckpt = tmp_path / "models" / "baseline.pt"
    settings = {
        "datalist": str(slice_dataset / "datalist.json"),
        "ckpt_path": str(ckpt),
        "batch_size": 4,
        "val_batch_size": 8,
    }
    workflow = run_workflow(overlays, "training", output_dir=str(tmp_path / "run"), max_epochs=2, **settings)
    network = workflow.parser.get_parsed_content("network")
    assert isinstance(network, AgeRegressor) and type(network.backbone).__name__ == "DenseNet121"
    # trained on the labelled training items only, with their age statistics
    training = json.loads((slice_dataset / "datalist.json").read_text())["training"]
    labelled = [item for item in training if "age" in item]
    assert len(workflow.parser.get_parsed_content("train_items")) == len(labelled) < len(training)
    state = torch.load(ckpt, weights_only=True)
    assert float(state["age_std"]) > 0 and any(key.startswith("backbone.features") for key in state)
    assert (tmp_path / "models" / "baseline_bias_correction.json").is_file()
    # the saved (EMA) model's first BatchNorm holds its own statistics over the training images, not the online
    # model's running averages that ignite's EMAHandler shares with it
    model = workflow.parser.get_parsed_content("network_def")
    model.load_state_dict(state)
    loading = workflow.parser.get_parsed_content("validate#preprocessing")
    images = torch.stack([loading(dict(item))["image"][..., 0] for item in labelled_items(workflow)])
    first_norm = model.backbone.features.norm0
    with torch.no_grad():
        inputs = model.backbone.features.conv0(images)
    torch.testing.assert_close(first_norm.running_mean, inputs.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)

    out = tmp_path / "eval"
    run_workflow([*overlays, "evaluate.yaml"], "evaluate", output_dir=str(out), **settings)
    with open(out / "predictions.csv", newline="") as fh:
        columns = next(csv.reader(fh))
    assert columns[: len(PREDICTION_COLUMNS)] == list(PREDICTION_COLUMNS)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == len(json.loads((slice_dataset / "datalist.json").read_text())["test"])

    # Table 2 across the two kinds of model: the baseline against a copy of itself shifted by 5 years
    rows = read_predictions(out / "predictions.csv")
    shifted = [{**row, "brain_pad": row["brain_pad"] + 5.0} for row in rows]
    result = statistics.compare_pad_distributions({"densenet": rows, "shifted": shifted})
    assert result["models"]["shifted"]["mean"] - result["models"]["densenet"]["mean"] == pytest.approx(5.0)
    assert result["models"]["shifted"]["std"] == pytest.approx(result["models"]["densenet"]["std"])
