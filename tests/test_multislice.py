"""Several axial levels per scan: the phantom and the chain write them, training samples one level per image,
validation and inference combine them by the median (docs/accuracy.md#several-axial-levels)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import predict, read_csv
from monai.bundle import ConfigParser

from scripts import phantom
from scripts.inferers import AgeInferer, combine_levels, unpack_age_output
from scripts.mni import level_offsets
from scripts.slices import AsSliceLevelsd, slice_nifti
from scripts.transforms import ExtractAxialSliced, FinaliseSliced

LEVELS = 3


@pytest.fixture(scope="module")
def level_dataset(tmp_path_factory):
    """The conftest cohort (40 + 8 subjects, seed 7) as 3-level slices, 4 grid slices apart."""
    out = tmp_path_factory.mktemp("phantom_levels")
    phantom.generate(phantom.CohortSpec(n=40, seed=7, n_disease=8), out, mode="slices", progress=False, levels=LEVELS)
    return out


def test_level_offsets_are_centred_and_odd():
    assert level_offsets(1) == [0]
    assert level_offsets(5, 4) == [-8, -4, 0, 4, 8]
    assert level_offsets(3, 2, offset=5) == [3, 5, 7]
    for bad in (0, 2, -1):
        with pytest.raises(ValueError, match="odd"):
            level_offsets(bad)


def test_phantom_levels_keep_the_single_level_image_in_the_middle(level_dataset, slice_dataset):
    """The centre level of a 3-level phantom file is the single-level phantom's slice of the same subject."""
    items = json.loads((level_dataset / "datalist.json").read_text())["test"][:3]
    single = {i["subject"]: i for i in json.loads((slice_dataset / "datalist.json").read_text())["test"]}
    for item in items:
        data = nib.load(level_dataset / item["image"]).get_fdata()
        assert data.shape == (128, 128, 1, LEVELS)
        medial = nib.load(slice_dataset / single[item["subject"]]["image"]).get_fdata()
        np.testing.assert_allclose(data[:, :, 0, LEVELS // 2], medial, atol=1e-4)
        # the other levels are other anatomy with their own noise, each scaled to [0, 1] on its own
        assert np.abs(data[:, :, 0, 0] - medial).mean() > 0.01
        assert all(data[..., level].max() == pytest.approx(1.0, abs=1e-6) for level in range(LEVELS))
    stamp = json.loads((level_dataset / "phantom.json").read_text())
    assert (stamp["levels"], stamp["level_spacing"]) == (LEVELS, 4)


def test_chain_cuts_and_writes_levels_level_major():
    """ExtractAxialSliced + FinaliseSliced on a volume whose value is its slice index: each level is its own
    slice, scaled on its own, and slice_nifti stores (128, 128, channels, levels)."""
    volume = torch.arange(130, dtype=torch.float32).expand(1, 130, 130, 130).clone() + 1.0
    data = ExtractAxialSliced(keys="image", channels=3, levels=3, level_spacing=4)({"image": volume})
    cut = data["image"]
    assert cut.shape == (9, 130, 130) and data["slice_levels"] == 3
    expected = [65 + level + c - 1 + 1 for level in (-4, 0, 4) for c in range(3)]
    assert cut[:, 0, 0].tolist() == expected
    finalised = FinaliseSliced(keys="image")(data)["image"]
    assert finalised.shape == (9, 128, 128)
    for level in range(3):  # every level's brightest channel is 1 after its own scaling
        assert finalised[3 * level : 3 * level + 3].max() == pytest.approx(1.0)
    img = slice_nifti(finalised, levels=3)
    assert img.shape == (128, 128, 3, 3)
    np.testing.assert_array_equal(np.asarray(img.dataobj)[:, :, 2, 1], finalised[5])
    # single level: no level settings in the cache key, and the file layout of before levels existed
    assert ExtractAxialSliced(keys="image").settings == {"offset": 0, "channels": 1, "min_brain_in_view": 0.98}
    assert slice_nifti(finalised[:1]).shape == (128, 128)


def test_loader_takes_the_centre_levels_and_refuses_what_does_not_fit():
    file = torch.arange(5.0).expand(128, 128, 2, 5).clone()  # (H, W, channels=2, levels=5), value = level
    out = AsSliceLevelsd(keys="image", channels=2, levels=3)({"image": file})["image"]
    assert out.shape == (2, 128, 128, 3) and out[0, 0, 0].tolist() == [1.0, 2.0, 3.0]
    medial = AsSliceLevelsd(keys="image", channels=2, levels=1)({"image": file})["image"]
    assert medial.shape == (2, 128, 128, 1) and float(medial.max()) == 2.0
    assert AsSliceLevelsd(keys="image")({"image": torch.zeros(128, 128)})["image"].shape == (1, 128, 128, 1)
    with pytest.raises(ValueError, match="holds 1 axial level"):
        AsSliceLevelsd(keys="image", levels=3)({"image": torch.zeros(128, 128)})
    with pytest.raises(ValueError, match="2 channel"):
        AsSliceLevelsd(keys="image", channels=1, levels=1)({"image": file})
    with pytest.raises(ValueError, match="odd"):
        AsSliceLevelsd(keys="image", levels=2)


class _MeanAge(torch.nn.Module):
    """A stand-in age predictor: age = 100 x the image mean, so each level's age is known exactly."""

    def forward(self, x):
        return 100 * x.float().mean(dim=(1, 2, 3))[:, None]


def test_inferer_predicts_each_level_and_takes_the_median():
    images = torch.zeros(2, 1, 8, 8, 3)
    images[0, ..., 0], images[0, ..., 1], images[0, ..., 2] = 0.5, 0.1, 0.95  # one outlying level
    images[1, ..., 0], images[1, ..., 1], images[1, ..., 2] = 0.3, 0.4, 0.32
    detailed = AgeInferer()(images, _MeanAge())
    assert set(detailed) == {"age", "age_levels"}  # a model without a latent gives no z
    np.testing.assert_allclose(detailed["age"].numpy(), [[50.0], [32.0]], atol=1e-4)  # the means: 51.7 and 34
    np.testing.assert_allclose(detailed["age_levels"].numpy(), [[50, 10, 95], [30, 40, 32]], atol=1e-4)
    # a single-level 5D batch is the 4D prediction, and has one level
    one_level, plain = AgeInferer()(images[..., :1], _MeanAge()), AgeInferer()(images[..., 0], _MeanAge())
    np.testing.assert_allclose(one_level["age"], plain["age"])
    np.testing.assert_allclose(plain["age_levels"], plain["age"])
    assert combine_levels(torch.tensor([[1.0, 5.0, 2.0, 3.0]])).item() == pytest.approx(2.5)
    unpacked = unpack_age_output({"pred": detailed, "label": torch.zeros(2, 1)})
    assert unpacked["pred"] is detailed["age"] and unpacked["age_levels"] is detailed["age_levels"]


def test_training_samples_one_level_per_image(bundle_root, level_dataset):
    """train#preprocessing gives (k, H, W) images whose level varies between draws; validation keeps them all."""
    parser = ConfigParser()
    parser.read_config(str(bundle_root / "configs" / "train.yaml"))
    parser.update(
        {"bundle_root": str(bundle_root), "datalist": str(level_dataset / "datalist.json"), "slice_levels": LEVELS}
    )
    item = parser.get_parsed_content("train_items")[0]
    train = parser.get_parsed_content("train#preprocessing")
    train.set_random_state(seed=0)
    levels = parser.get_parsed_content("validate#preprocessing")(item)["image"]
    assert levels.shape == (1, 128, 128, LEVELS)
    seen = set()
    for _ in range(30):
        image = train(item)["image"]
        assert image.shape == (1, 128, 128)
        seen.add(next(i for i in range(LEVELS) if torch.equal(image, levels[..., i])))
    assert seen == set(range(LEVELS))


@pytest.fixture(scope="module")
def level_model(tmp_path_factory, run_workflow, level_dataset):
    root = tmp_path_factory.mktemp("trained_levels")
    run_workflow(
        "train.yaml",
        "training",
        datalist=str(level_dataset / "datalist.json"),
        output_dir=str(root / "run"),
        ckpt_path=str(root / "model.pt"),
        max_epochs=1,
        batch_size=4,
        val_batch_size=8,
        slice_levels=LEVELS,
        interval_coverage=0.6,
    )
    return {"ckpt_path": root / "model.pt", "root": root}


def test_multilevel_training_inference_and_evaluate(run_workflow, level_model, level_dataset, tmp_path):
    """Trained with slice_levels 3 from config alone; inference and evaluate write the median of 3 levels with
    its spread, and inference with 1 level predicts the medial slice alone from the same files: refused with the
    3-level calibration beside the model, predicted (without interval) by the model alone."""
    import shutil

    from scripts.calibration import CalibrationError
    from scripts.cli import root_cause

    assert level_model["ckpt_path"].is_file()
    rows = predict(
        run_workflow,
        level_model,
        level_dataset / "datalist.json",
        tmp_path / "three",
        slice_levels=3,
        input_splits=["test"],
    )
    with pytest.raises(Exception) as refused:
        predict(run_workflow, level_model, level_dataset / "datalist.json", tmp_path / "x", slice_levels=1)
    assert isinstance(root_cause(refused.value), CalibrationError)
    assert "slice_levels 3 there, 1 here" in str(root_cause(refused.value))
    alone = tmp_path / "model_alone" / "model.pt"
    alone.parent.mkdir()
    shutil.copy(level_model["ckpt_path"], alone)
    one = predict(
        run_workflow,
        {"ckpt_path": alone},
        level_dataset / "datalist.json",
        tmp_path / "one",
        slice_levels=1,
        input_splits=["test"],
    )
    assert len(rows) == len(one) == 6
    assert {r["slice_levels"] for r in rows} == {"3"} and {r["slice_levels"] for r in one} == {"1"}
    assert all(float(r["level_sd"]) > 0 for r in rows) and {r["level_sd"] for r in one} == {""}
    assert any(abs(float(a["predicted_age"]) - float(b["predicted_age"])) > 1e-3 for a, b in zip(rows, one))
    assert all(r["predicted_age_lower"] and r["predicted_age_upper"] for r in rows)
    assert not any(r["predicted_age_lower"] for r in one)  # no calibration for one level: no interval

    evaluated = tmp_path / "eval"
    run_workflow(
        ["train.yaml", "evaluate.yaml"],
        "evaluate",
        datalist=str(level_dataset / "datalist.json"),
        output_dir=str(evaluated),
        ckpt_path=str(level_model["ckpt_path"]),
        slice_levels=3,
    )
    evaluate_rows = read_csv(evaluated / "predictions.csv")
    by_subject = {r["subject"]: r for r in rows}
    for r in evaluate_rows:  # evaluate and inference combine the levels the same way
        assert float(r["predicted_age"]) == pytest.approx(float(by_subject[r["subject"]]["predicted_age"]), abs=0.05)
        assert r["slice_levels"] == "3" and float(r["level_sd"]) > 0
    metrics = json.loads((evaluated / "metrics.json").read_text())
    mae = np.mean([abs(float(r["predicted_age"]) - float(r["age"])) for r in evaluate_rows])
    assert metrics["mae"] == pytest.approx(mae, abs=1e-2)


def test_raw_scan_inference_preprocesses_the_levels(run_workflow, level_model, volume_dataset, tmp_path):
    """A raw scan with slice_levels 3: the chain writes its 3 levels, and the row is their median with a spread."""
    item = json.loads((volume_dataset / "datalist.json").read_text())["training"][0]
    rows = predict(run_workflow, level_model, volume_dataset / item["image"], tmp_path / "raw", slice_levels=3)
    assert len(rows) == 1 and rows[0]["error"] == "" and rows[0]["slice_levels"] == "3"
    assert float(rows[0]["level_sd"]) > 0
    slab = next((tmp_path / "raw" / "preprocessed" / "slices").glob("*.nii.gz"))
    assert nib.load(slab).shape == (128, 128, 1, 3)
