"""Inference (configs/inference.yaml) and evaluation (configs/evaluate.yaml overlay) with a tiny trained model."""

from __future__ import annotations

import gzip
import json
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import predict, read_csv

from scripts import calibration, inference, statistics


def best_model_predictions(trained_model, tiny_network, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The saved best model's predictions and the true ages on a datalist split, computed here independently."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config("configs/inference.yaml")
    parser.update({**tiny_network, "autocast_dtype": "float32"})
    network = inference.load_weights(parser.get_parsed_content("network_def"), trained_model["ckpt_path"]).eval()
    items = json.loads(trained_model["datalist"].read_text())[split]
    root = trained_model["datalist"].parent
    images = [nib.load(root / it["image"]).get_fdata(dtype=np.float32) for it in items]
    size = tiny_network["image_size"]
    x = torch.nn.functional.interpolate(torch.from_numpy(np.stack(images))[:, None], size=(size, size), mode="area")
    with torch.no_grad():
        return network(x)[:, 0].numpy(), np.array([it["age"] for it in items])


def test_training_fits_the_bias_correction_on_validation(trained_model, tiny_network):
    """The correction beside model.pt is the fit to *that* model's validation predictions (its best epoch)."""
    correction = calibration.BiasCorrection.load(trained_model["bias_correction_path"])
    predicted, age = best_model_predictions(trained_model, tiny_network, "validation")
    expected = calibration.BiasCorrection.fit(predicted, age, "beheshti")
    assert correction.method == "beheshti" and correction.n == len(age)
    assert (correction.slope, correction.intercept) == pytest.approx((expected.slope, expected.intercept), abs=1e-3)


def test_datalist_slices_predicted_with_pad_and_corrected_pad(run_workflow, trained_model, tiny_network, tmp_path):
    rows = predict(
        run_workflow,
        trained_model,
        trained_model["datalist"],
        tmp_path,
        input_splits=["test", "disease"],
        save_latents=True,
    )
    datalist = json.loads(trained_model["datalist"].read_text())
    assert len(rows) == len(datalist["test"]) + len(datalist["disease"])
    assert list(rows[0])[: len(inference.PREDICTION_COLUMNS)] == list(inference.PREDICTION_COLUMNS)
    correction = calibration.BiasCorrection.load(trained_model["bias_correction_path"])
    for row in rows:
        predicted, age = float(row["predicted_age"]), float(row["age"])
        assert 0 < predicted < 150 and row["error"] == ""
        assert float(row["brain_pad"]) == pytest.approx(predicted - age, abs=2e-3)
        expected = correction.corrected_pad([predicted], [age])[0]
        assert float(row["brain_pad_corrected"]) == pytest.approx(expected, abs=2e-3)
    disease = [r for r in rows if r["split"] == "disease"]
    assert disease and all(float(r["survival_months"]) > 0 for r in disease)  # datalist columns carried over
    latent = np.load(tmp_path / "latents" / f"test_{rows[0]['subject']}.npy")
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config("configs/inference.yaml")
    parser.update(tiny_network)
    network = inference.load_weights(parser.get_parsed_content("network_def"), trained_model["ckpt_path"]).eval()
    image = torch.from_numpy(nib.load(rows[0]["image"]).get_fdata(dtype=np.float32))[None, None]
    with torch.no_grad():
        expected = network.encode(torch.nn.functional.interpolate(image, size=(32, 32), mode="area"))[0].numpy()
    np.testing.assert_allclose(latent, expected, atol=1e-4)  # the scan's own z_sem, not just any 16 numbers


def test_predictions_match_the_model_on_the_same_slices(run_workflow, trained_model, tiny_network, tmp_path):
    from monai.bundle import ConfigParser

    rows = predict(run_workflow, trained_model, trained_model["datalist"], tmp_path, input_splits=["test"])
    parser = ConfigParser()
    parser.read_config("configs/inference.yaml")
    parser.update(tiny_network)
    network = inference.load_weights(parser.get_parsed_content("network_def"), trained_model["ckpt_path"]).eval()
    images = [nib.load(r["image"]).get_fdata(dtype=np.float32) for r in rows[:4]]
    x = torch.nn.functional.interpolate(torch.from_numpy(np.stack(images))[:, None], size=(32, 32), mode="area")
    with torch.no_grad():
        expected = network(x)[:, 0].numpy()
    # inference runs the CPU network channels_last (another float32 summation order): agreement to 0.01 years
    np.testing.assert_allclose([float(r["predicted_age"]) for r in rows[:4]], expected, atol=1e-2)


@pytest.mark.parametrize("autocast_dtype", [None, "bfloat16"])
@pytest.mark.parametrize("weights", ["trained", "initial"])
def test_a_scans_age_does_not_depend_on_its_batch(trained_model, tiny_network, autocast_dtype, weights):
    """The inference inferer (channels-last on the CPU, with or without bf16 autocast) gives a scan exactly the same
    age alone, with one other scan, or in a batch of any size: it always runs batches of one shape. Checked for the
    trained test model and for freshly initialised weights (whose kernels, unlike the trained tiny model's, do give
    ages 4e-6 years apart between batch shapes when run as they come)."""
    from monai.bundle import ConfigParser

    from scripts.inferers import AgeInferer

    parser = ConfigParser()
    parser.read_config("configs/inference.yaml")
    parser.update(tiny_network)
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    if weights == "trained":
        network = inference.load_weights(network, trained_model["ckpt_path"])
    network = network.eval().to(memory_format=torch.channels_last)
    images = torch.rand(9, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    inferer = AgeInferer(autocast_dtype, channels_last=True, batch_size=8)

    def age(batch):
        return inferer(batch, network)["age"]

    with torch.no_grad():
        alone = age(images[:1])
        pair = age(images[[0, 5]])
        full = age(images[:8])
        spill = age(images)  # 8 + a padded batch of 1
        reversed_order = age(images.flip(0)).flip(0)
        every_size = [age(images[:n])[0] for n in range(1, 10)]  # oneDNN picks kernels per shape
        latents = inferer(images, network)["z"]
    assert latents.shape == (9, network.encoder.out.out_features)  # the centre level's z_sem, always returned
    assert all(torch.equal(alone[0], age) for age in every_size)
    assert alone.shape == (1, 1) and full.shape == (8, 1) and spill.shape == (9, 1)
    assert torch.equal(alone[0], pair[0]) and torch.equal(alone[0], full[0]) and torch.equal(full, spill[:8])
    assert torch.equal(spill, reversed_order)
    assert len(torch.unique(full)) == 8  # eight different images, eight different ages


def test_the_float32_override_reaches_inference_and_bf16_does_not_move_the_ages(
    trained_model, bundle_root, tiny_network, tmp_path
):
    """Through the real command line: `python -m monai.bundle run` drops a None override, so the setting is a
    string; the encoder and head run in float32 either way, so the ages agree."""
    import subprocess
    import sys

    network_args = []
    for key, value in tiny_network.items():
        network_args += [f"--{key}", json.dumps(value)]
    ages, logs = {}, {}
    for setting in ("float32", "bfloat16"):
        out = tmp_path / setting
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "monai.bundle",
                "run",
                "inference",
                "--config_file",
                "configs/inference.yaml",
                "--input",
                str(trained_model["datalist"]),
                "--input_splits",
                "['test']",
                "--output_dir",
                str(out),
                "--ckpt_path",
                str(trained_model["ckpt_path"]),
                "--device",
                "$torch.device('cpu')",
                "--autocast_dtype",
                setting,
                *network_args,
            ],
            cwd=bundle_root,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        logs[setting] = proc.stdout + proc.stderr
        ages[setting] = np.array([float(r["predicted_age"]) for r in read_csv(out / "predictions.csv")])
    assert "precision float32" in logs["float32"] and "bfloat16 autocast" not in logs["float32"]
    assert "precision bfloat16 autocast" in logs["bfloat16"]
    difference = np.abs(ages["float32"] - ages["bfloat16"])
    assert len(ages["float32"]) > 3 and difference.mean() <= 0.1 and difference.max() <= 0.5


def test_raw_scans_are_preprocessed_then_predicted(run_workflow, trained_model, volume_dataset, tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    for scan in sorted((volume_dataset / "volumes").glob("*.nii.gz"))[:2]:
        shutil.copy(scan, folder / scan.name)
    (folder / "broken_T1w.nii.gz").write_bytes(gzip.compress(b"not a nifti header at all"))
    out = tmp_path / "out"
    rows = predict(run_workflow, trained_model, folder, out)
    by_subject = {r["subject"]: r for r in rows}
    assert set(by_subject) == {"sub-0001_T1w", "sub-0002_T1w", "broken_T1w"}
    for subject in ("sub-0001_T1w", "sub-0002_T1w"):
        assert by_subject[subject]["error"] == ""
        assert by_subject[subject]["age"] == ""  # unknown for bare files: no PAD
    assert (
        by_subject["broken_T1w"]["predicted_age"] == "" and "not a readable NIfTI" in by_subject["broken_T1w"]["error"]
    )
    slices = sorted((out / "preprocessed" / "slices").glob("*.nii.gz"))
    assert len(slices) == 2
    # each raw scan's age is the model's age for the slice the chain made of that scan
    again = {
        r["subject"]: float(r["predicted_age"])
        for r in predict(run_workflow, trained_model, out / "preprocessed" / "slices", tmp_path / "again")
    }
    for subject in ("sub-0001_T1w", "sub-0002_T1w"):
        (name,) = [key for key in again if key.startswith(subject)]
        assert float(by_subject[subject]["predicted_age"]) == pytest.approx(again[name], abs=1e-3)


def test_single_file_input_and_unusable_inputs(run_workflow, trained_model, slice_dataset, tmp_path):
    one = slice_dataset / json.loads((slice_dataset / "datalist.json").read_text())["test"][0]["image"]
    rows = predict(run_workflow, trained_model, one, tmp_path / "one")
    assert len(rows) == 1 and float(rows[0]["predicted_age"]) > 0

    bad = tmp_path / "bad"
    bad.mkdir()
    nan_slice = nib.load(one)
    data = nan_slice.get_fdata(dtype=np.float32)
    data[5, 5] = np.nan
    nib.save(nib.Nifti1Image(data, nan_slice.affine), bad / "nan_slice.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros_like(data), nan_slice.affine), bad / "zero_slice.nii.gz")
    with pytest.raises(SystemExit, match="none of the 2 inputs"):
        predict(run_workflow, trained_model, bad, tmp_path / "bad_out")
    errors = {Path(r["image"]).name: r["error"] for r in read_csv(tmp_path / "bad_out" / "predictions.csv")}
    assert errors == {
        "nan_slice.nii.gz": "load: the slice has NaN or infinite values",
        "zero_slice.nii.gz": "load: the slice is empty",
    }


def test_scan_ids_are_unique_paths_and_no_output_leaves_the_output_folder(
    run_workflow, trained_model, slice_dataset, tmp_path
):
    """A folder input names a scan by its path below the folder (a/T1w and b/T1w are two scans, two latents), and
    an id that is a path (../../x from a datalist) still writes only inside OUT."""
    test = json.loads((slice_dataset / "datalist.json").read_text())["test"]
    folder = tmp_path / "scans"
    for name, item in zip(("a", "b"), test):
        (folder / name).mkdir(parents=True)
        shutil.copy(slice_dataset / item["image"], folder / name / "T1w.nii.gz")
    rows = predict(run_workflow, trained_model, folder, tmp_path / "out", save_latents=True)
    assert sorted(r["subject"] for r in rows) == ["a/T1w", "b/T1w"]
    assert len({r["predicted_age"] for r in rows}) == 2  # two scans, not one twice
    latents = sorted(p.name for p in (tmp_path / "out" / "latents").iterdir())
    assert len(latents) == 2 and all(name.startswith(("a_T1w-", "b_T1w-")) for name in latents)

    escape = tmp_path / "deep" / "escape.json"
    escape.parent.mkdir()
    image = str(slice_dataset / test[0]["image"])
    escape.write_text(json.dumps({"test": [{"image": image, "subject": "../../x", "age": 50.0}]}))
    rows = predict(run_workflow, trained_model, escape, tmp_path / "deep" / "out", save_latents=True)
    assert rows[0]["subject"] == "../../x"
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "x" in p.name and p.suffix == ".npy"]
    assert written and all((tmp_path / "deep" / "out") in p.parents for p in written)
    assert not (tmp_path / "x.npy").exists() and not (tmp_path / "test_x.npy").exists()


def test_a_datalist_with_an_empty_list_is_predicted(run_workflow, trained_model, slice_dataset, tmp_path):
    """The phantom with --n_disease 0 writes "disease": []; inference predicts the other lists."""
    datalist = json.loads((slice_dataset / "datalist.json").read_text())
    datalist = {"test": [{**it, "image": str(slice_dataset / it["image"])} for it in datalist["test"]], "disease": []}
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(datalist))
    rows = predict(run_workflow, trained_model, path, tmp_path / "out")
    assert len(rows) == len(datalist["test"]) and {r["split"] for r in rows} == {"test"}


def test_evaluate_overlay_writes_metrics_table_and_scatter(run_workflow, trained_model, tmp_path, capsys):
    out = tmp_path / "eval"
    run_workflow(
        ["train.yaml", "evaluate.yaml"],
        "evaluate",
        datalist=str(trained_model["datalist"]),
        output_dir=str(out),
        ckpt_path=str(trained_model["ckpt_path"]),
    )
    metrics = json.loads((out / "metrics.json").read_text())
    rows = inference.read_predictions(out / "predictions.csv")
    test = json.loads(trained_model["datalist"].read_text())["test"]
    assert len(rows) == len(test) == metrics["n"]
    predicted = np.array([r["predicted_age"] for r in rows])
    age = np.array([r["age"] for r in rows])
    assert metrics["mae"] == pytest.approx(np.abs(predicted - age).mean(), abs=1e-3)
    assert metrics["r"] == pytest.approx(np.corrcoef(predicted, age)[0, 1], abs=1e-3)
    assert metrics["bias_correction"] == "beheshti"
    # corrected with the validation fit, never refitted here: a refit on these rows would make this exactly 0
    correction = calibration.BiasCorrection.load(trained_model["bias_correction_path"])
    expected = np.corrcoef(correction.corrected_pad(predicted, age), age)[0, 1]
    assert metrics["pad_corrected_age_r"] == pytest.approx(expected, abs=1e-3)
    refit = calibration.BiasCorrection.fit(predicted, age, "beheshti")
    assert abs(np.corrcoef(refit.corrected_pad(predicted, age), age)[0, 1]) < 1e-6
    assert abs(metrics["pad_corrected_age_r"]) > 1e-3
    from PIL import Image

    with Image.open(out / "scatter.png") as png:
        assert png.width > 400 and png.height > 400
    printed = capsys.readouterr().out
    assert "MAE (years)" in printed and "corr(corrected PAD, age)" in printed
    # the report is written once metrics.json exists, and shows it
    page = (out / "report.html").read_text()
    assert f"<h1>Brain-age report: {len(test)} scans</h1>" in page and "<h2>Accuracy (metrics.json)</h2>" in page
    assert f"<dt>mae</dt><dd>{metrics['mae']:.3g}</dd>" in page


def test_checkpoint_loading_is_weights_only(tmp_path, trained_model):
    from scripts.networks import DiffusionAutoencoder

    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    evil = tmp_path / "evil.pt"
    torch.save({"model": Payload()}, evil)
    with pytest.raises(ValueError, match="not a readable weights-only checkpoint"):
        inference.load_weights(DiffusionAutoencoder(), evil)
    # tiny weights, paper network: refused by the architecture record, naming the settings
    with pytest.raises(ValueError, match=r"model.pt: trained with .*image_size 32 \(configured 128\)"):
        inference.load_weights(DiffusionAutoencoder(), trained_model["ckpt_path"])
    with pytest.raises(FileNotFoundError, match="train first"):
        inference.load_weights(DiffusionAutoencoder(), tmp_path / "missing.pt")
    # the resumable training state holds the online weights, not the validated EMA model: refused, not loaded
    state = {"network": torch.load(trained_model["ckpt_path"], weights_only=True), "optimizer": {"state": {}}}
    torch.save(state, tmp_path / "last.pt")
    with pytest.raises(ValueError, match="a training state, not model weights"):
        inference.load_weights(DiffusionAutoencoder(), tmp_path / "last.pt")


def test_bias_corrections_remove_the_age_dependence_they_were_fitted_on():
    rng = np.random.default_rng(0)
    age = rng.uniform(20, 90, 500)
    predicted = 0.7 * age + 16 + rng.normal(0, 4, age.size)  # regression to the mean
    for method in ("beheshti", "cole"):
        correction = calibration.BiasCorrection.fit(predicted, age, method)
        corrected = correction.corrected_pad(predicted, age)
        assert abs(np.corrcoef(corrected, age)[0, 1]) < 0.05
        assert abs(np.corrcoef(predicted - age, age)[0, 1]) > 0.5
    cole = calibration.BiasCorrection.fit(predicted, age, "cole")
    assert cole.slope == pytest.approx(0.7, abs=0.02) and cole.intercept == pytest.approx(16, abs=1.5)
    none = calibration.BiasCorrection.fit(predicted, age, "none")
    np.testing.assert_allclose(none.corrected_pad(predicted, age), predicted - age)
    with pytest.raises(ValueError, match="unknown bias correction"):
        calibration.BiasCorrection.fit(predicted, age, "quantile")


def test_regression_metrics_values():
    age = np.array([20.0, 40.0, 60.0, 80.0])
    predicted = np.array([25.0, 38.0, 61.0, 70.0])
    m = statistics.regression_metrics(predicted, age)
    assert m["mae"] == pytest.approx(np.mean([5, 2, 1, 10]))
    assert m["rmse"] == pytest.approx(math.sqrt(np.mean([25, 4, 1, 100])))
    assert m["r2"] == pytest.approx(1 - 130 / 2000)
    assert m["pad_mean"] == pytest.approx(-1.5)  # PADs 5, -2, 1, -10
    assert m["n"] == 4 and 0 < m["r_p"] < 0.05
