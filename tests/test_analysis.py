"""Analyses: PAD-outcome association, PAD distribution tests, DDIM reconstructions, age interpolations, CLI."""

from __future__ import annotations

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import stats
# tests/ is on sys.path under pytest; one_thread: the autouse single-thread fixture, tiny tensors gain nothing from threads
from test_engine import TINY, TimeOnlyNoise, one_thread, tiny_model  # noqa: F401

from scripts import analysis
from scripts.engine import ddim_encode, ddim_scheduler
from scripts.inference import read_predictions
from scripts.mni import slice_affine


def write_predictions(path, pads, survival, splits, corrected=None):
    """A predictions.csv as inference writes it: empty cells for unknown values, survival as an extra column."""
    columns = ["subject", "image", "predicted_age", "age", "brain_pad", "brain_pad_corrected", "split", "error",
               "survival_months"]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for i, (pad, months, split) in enumerate(zip(pads, survival, splits)):
            known = not math.isnan(pad)
            writer.writerow({
                "subject": f"sub-{i:03d}", "image": f"sub-{i:03d}.nii.gz", "predicted_age": 60.0 + i % 7 + (pad if known else 0),
                "age": 60.0 + i % 7 if known else "", "brain_pad": pad if known else "",
                "brain_pad_corrected": "" if corrected is None else corrected[i], "split": split, "error": "",
                "survival_months": months,
            })
    return path


@pytest.fixture
def predictions_csv(tmp_path):
    rng = np.random.default_rng(0)
    pads = rng.normal(5.0, 6.0, 40)
    survival = [f"{v:.1f}" for v in 36.0 - 0.8 * pads + rng.normal(0, 6.0, 40)]
    pads[[3, 11]] = math.nan          # no prediction
    survival[5], survival[17] = "", "n/a"  # outcome unknown
    splits = ["disease"] * 30 + ["test"] * 10
    return write_predictions(tmp_path / "predictions.csv", pads, survival, splits, corrected=np.nan_to_num(pads) - np.arange(40) / 20)


# ------------------------------------------------------------------------------------------------------ association


def test_association_is_pearson_over_complete_pairs_of_the_split(predictions_csv):
    rows = read_predictions(predictions_csv)
    pads = np.array([r["brain_pad"] for r in rows])
    survival = np.array([float(r["survival_months"]) if r["survival_months"] not in ("", "n/a") else math.nan for r in rows])
    for split, selected in (("disease", slice(0, 30)), (None, slice(0, 40))):
        x, y = pads[selected], survival[selected]
        keep = np.isfinite(x) & np.isfinite(y)
        expected = stats.pearsonr(x[keep], y[keep])
        result = analysis.pad_outcome_association(rows, split=split)
        assert result["n"] == keep.sum() == (26 if split else 36)
        assert result["r"] == pytest.approx(expected.statistic, abs=1e-12)
        assert result["p"] == pytest.approx(expected.pvalue, rel=1e-9)
        assert result["r"] < -0.5 and (result["outcome"], result["pad"], result["split"]) == ("survival_months", "brain_pad", split)

    corrected = analysis.pad_outcome_association(rows, pad="brain_pad_corrected", split="disease")
    x = np.array([r["brain_pad_corrected"] for r in rows[:30]])
    keep = np.isfinite(x) & np.isfinite(survival[:30])  # the corrected column is complete: only survival is missing
    assert corrected["n"] == 28
    assert corrected["r"] == pytest.approx(stats.pearsonr(x[keep], survival[:30][keep]).statistic, abs=1e-12)


def test_association_rejects_unknown_columns_splits_and_text(predictions_csv):
    rows = read_predictions(predictions_csv)
    with pytest.raises(ValueError, match="no column 'grade'"):
        analysis.pad_outcome_association(rows, outcome="grade")
    with pytest.raises(ValueError, match="no predictions in split 'validation'.*disease, test"):
        analysis.pad_outcome_association(rows, split="validation")
    rows[0]["survival_months"] = "alive"
    with pytest.raises(ValueError, match="sub-000: 'alive' is not a number"):
        analysis.pad_outcome_association(rows)


# ---------------------------------------------------------------------------------------------------------- KS tests


def test_pad_distributions_match_scipy_and_write_the_box_plot(tmp_path):
    rng = np.random.default_rng(1)
    samples = {"diffae": rng.normal(-6.0, 27.0, 50), "densenet": rng.normal(-1.6, 7.7, 50), "brainager": rng.normal(-19.0, 11.0, 45)}
    named_rows = {}
    for name, pads in samples.items():
        with_gaps = np.append(pads, math.nan)  # an unpredicted subject is left out
        path = write_predictions(tmp_path / f"{name}.csv", with_gaps, [""] * len(with_gaps), ["disease"] * len(with_gaps))
        named_rows[name] = read_predictions(path)
    named_rows["brainager"] += [{**named_rows["brainager"][0], "split": "test"}]  # another split: filtered out

    png = tmp_path / "box.png"
    result = analysis.compare_pad_distributions(named_rows, split="disease", boxplot=png)
    assert result["reference"] == "diffae"
    for name, pads in samples.items():
        model = result["models"][name]
        assert model["n"] == len(pads)
        assert model["mean"] == pytest.approx(pads.mean(), abs=1e-3)  # the CSV stores 3 decimals
        assert model["std"] == pytest.approx(pads.std(ddof=1), abs=1e-3)
    assert result["models"]["diffae"]["ks_statistic"] is None and result["models"]["diffae"]["ks_p"] is None
    rounded = {name: np.round(pads, 3) for name, pads in samples.items()}
    for name in ("densenet", "brainager"):
        expected = stats.ks_2samp(rounded[name], rounded["diffae"])
        assert result["models"][name]["ks_statistic"] == pytest.approx(expected.statistic, abs=1e-12)
        assert result["models"][name]["ks_p"] == pytest.approx(expected.pvalue, rel=1e-9)
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000
    assert "KS D" in analysis.format_pad_table(result) and "brainager" in analysis.format_pad_table(result)

    against_densenet = analysis.compare_pad_distributions(named_rows, reference="densenet", split="disease")
    assert against_densenet["models"]["diffae"]["ks_statistic"] == pytest.approx(result["models"]["densenet"]["ks_statistic"])
    with pytest.raises(ValueError, match="reference 'x' is not one of"):
        analysis.compare_pad_distributions(named_rows, reference="x")
    with pytest.raises(ValueError, match="at least two models"):
        analysis.compare_pad_distributions({"diffae": named_rows["diffae"]})


# ---------------------------------------------------------------------------------------------------- reconstruction


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_reconstruct_returns_the_ddim_latents_and_errors_deterministically():
    model = tiny_model().train()
    x0 = images(3)
    first = analysis.reconstruct(model, x0, ddim_steps=10, batch_size=2)
    assert model.training  # the caller's mode comes back
    second = analysis.reconstruct(model, x0, ddim_steps=10, batch_size=2)
    assert set(first) == {"z_sem", "x_T", "reconstructions", "mse", "mae"}
    for key, value in first.items():
        assert torch.equal(value, second[key]), key

    assert first["z_sem"].shape == (3, TINY["z_dim"])
    assert first["x_T"].shape == first["reconstructions"].shape == x0.shape
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(first["z_sem"], model.encode(x0))
        z_sem, scheduler = first["z_sem"], ddim_scheduler(10)
        # batch by batch as reconstruct ran it: float32 kernels round differently for other batch shapes
        x_T = torch.cat([ddim_encode(model, x0[:2], z_sem[:2], scheduler), ddim_encode(model, x0[2:], z_sem[2:], scheduler)])
        torch.testing.assert_close(first["x_T"], x_T)
    difference = first["reconstructions"] - x0
    torch.testing.assert_close(first["mse"], (difference**2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(first["mae"], difference.abs().mean(dim=(1, 2, 3)))
    assert (first["mse"] > 1e-6).all()  # a random eps_theta does depend on x_t: the round trip is not exact


def test_reconstruct_is_exact_when_eps_ignores_x_t(monkeypatch):
    model = tiny_model()
    monkeypatch.setattr(model, "denoise", TimeOnlyNoise().denoise)
    x0 = images(2)
    result = analysis.reconstruct(model, x0, ddim_steps=20)
    assert result["x_T"].std() > 0.3  # really noised
    torch.testing.assert_close(result["reconstructions"], x0, atol=2e-4, rtol=0)
    assert result["mae"].max() < 1e-4 and result["mse"].max() < 1e-8


# ----------------------------------------------------------------------------------------------------- interpolation


def test_interpolation_ends_are_the_reconstructions_and_predictions_of_the_two_images():
    model = tiny_model(seed=3)
    x0 = images(2, seed=1)
    # one image per pass in both calls: float32 kernels round differently for other batch shapes, and a random
    # eps_theta amplifies such differences over the DDIM steps
    result = analysis.interpolate(model, x0[0], x0[1], n_frames=5, ddim_steps=10, batch_size=1)
    assert result["frames"].shape == (5, 1, 16, 16)
    assert result["weights"].tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]

    ends = analysis.reconstruct(model, x0, ddim_steps=10, batch_size=1)
    for frame, end in ((0, 0), (-1, 1)):
        assert torch.equal(result["z_sem"][frame], ends["z_sem"][end])
        torch.testing.assert_close(result["x_T"][frame], ends["x_T"][end], atol=0, rtol=1e-7)
        torch.testing.assert_close(result["frames"][frame], ends["reconstructions"][end])
    with torch.no_grad():
        torch.testing.assert_close(result["predicted_age"][[0, -1]], model.eval().predict_age(x0))
        torch.testing.assert_close(result["reencoded_age"], model.predict_age(result["frames"]))
    assert abs(float(result["predicted_age"][0] - result["predicted_age"][-1])) > 1e-3  # the two ends differ

    # z_sem on the straight line, x_T spherically interpolated between the ends' x_T
    torch.testing.assert_close(result["z_sem"][2], (ends["z_sem"][0] + ends["z_sem"][1]) / 2)
    torch.testing.assert_close(result["x_T"], analysis.slerp(ends["x_T"][0], ends["x_T"][1], result["weights"]))

    with pytest.raises(ValueError, match="at least 2 frames"):
        analysis.interpolate(model, x0[0], x0[1], n_frames=1)


def test_slerp_walks_the_great_circle_at_constant_norm():
    start = torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(0))
    end = torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(1))
    end = end * start.norm() / end.norm()
    weights = torch.linspace(0, 1, 6)
    path = analysis.slerp(start, end, weights)
    assert path.shape == (6, 1, 8, 8) and torch.equal(path[0], start)
    torch.testing.assert_close(path[-1], end)
    theta = math.acos(float((start * end).sum() / start.norm() ** 2))
    for point, weight in zip(path, weights.tolist()):
        assert float(point.norm()) == pytest.approx(float(start.norm()), rel=1e-5)
        cosine = float((point * start).sum() / start.norm() ** 2)
        assert math.acos(min(cosine, 1.0)) == pytest.approx(weight * theta, abs=1e-3)
    # parallel ends: the straight line (no division by sin(0))
    torch.testing.assert_close(analysis.slerp(start, 2 * start, weights)[2], 1.4 * start)


# ------------------------------------------------------------------------------------------------ counterfactual ageing


def test_age_direction_shift_reaches_the_target_along_the_head_gradient():
    model = tiny_model(seed=4).eval()
    z0 = torch.randn(TINY["z_dim"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        start = float(model.age_head(z0[None])[0])
    for delta in (-15.0, 0.0, 12.0):
        z, age = analysis.age_direction_shift(model.age_head, z0, start + delta)
        with torch.no_grad():
            assert float(model.age_head(z[None])[0]) == pytest.approx(age)
        assert age == pytest.approx(start + delta, abs=0.05)
        if delta == 0.0:
            assert torch.equal(z, z0)  # already there: no move
    # a first step is along the gradient: the shift is parallel to it
    z0.requires_grad_(True)
    (gradient,) = torch.autograd.grad(model.age_head(z0[None])[0], z0)
    z, _ = analysis.age_direction_shift(model.age_head, z0.detach(), start + 0.01, max_iterations=1, tolerance=0)
    cosine = torch.nn.functional.cosine_similarity(z - z0.detach(), gradient, dim=0)
    assert float(cosine) == pytest.approx(1.0, abs=1e-5)
    # with a latent scale the step follows scale^2 * gradient: dimensions that vary more between subjects move more
    scale = torch.linspace(0.1, 2.0, TINY["z_dim"])
    z, age = analysis.age_direction_shift(model.age_head, z0.detach(), start + 0.01, scale, max_iterations=1,
                                          tolerance=0)
    cosine = torch.nn.functional.cosine_similarity(z - z0.detach(), scale**2 * gradient, dim=0)
    assert float(cosine) == pytest.approx(1.0, abs=1e-5)
    z, age = analysis.age_direction_shift(model.age_head, z0.detach(), start + 8.0, scale)
    assert age == pytest.approx(start + 8.0, abs=0.05)


def test_latent_spread_is_the_per_dimension_std_of_z_sem():
    model = tiny_model(seed=6)
    x0 = images(5, seed=3)
    with torch.no_grad():
        expected = model.eval().encode(x0).std(0)
    torch.testing.assert_close(analysis.latent_spread(model, x0, batch_size=2), expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="at least 2 images"):
        analysis.latent_spread(model, x0[:1])


def test_counterfactual_ageing_keeps_x_t_and_moves_only_the_latent_age():
    model = tiny_model(seed=5)
    x0 = images(1, seed=2)[0]
    result = analysis.counterfactual_ageing(model, x0, deltas=[-10, 0, 10], ddim_steps=5, batch_size=1)
    assert result["frames"].shape == result["differences"].shape == (3, 1, 16, 16)
    torch.testing.assert_close(result["target_age"], result["predicted_age"] + torch.tensor([-10.0, 0.0, 10.0]))
    torch.testing.assert_close(result["latent_age"], result["target_age"], atol=0.05, rtol=0)
    # delta 0 is the plain reconstruction and the zero point of the difference maps
    reconstruction = analysis.reconstruct(model, x0[None], ddim_steps=5, batch_size=1)["reconstructions"][0]
    torch.testing.assert_close(result["frames"][1], reconstruction)
    assert result["latent_shift"][1] == 0 and torch.count_nonzero(result["differences"][1]) == 0
    assert result["latent_shift"][0] > 0 and result["differences"][0].abs().max() > 0
    with torch.no_grad():
        torch.testing.assert_close(result["reencoded_age"], model.eval().predict_age(result["frames"]))


# --------------------------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def tiny_bundle(tmp_path, bundle_root):
    """A config + checkpoint of a tiny model and three labelled model-input slices in a datalist."""
    torch.save(tiny_model(seed=2).state_dict(), tmp_path / "tiny.pt")
    config = {
        "imports": ["$import torch"],
        "device": "$torch.device('cpu')",
        "ckpt_path": str(tmp_path / "tiny.pt"),
        "image_size": TINY["image_size"],
        "in_channels": 1,
        "network_def": {"_target_": "scripts.networks.DiffusionAutoencoder", **TINY},
        "slice_transforms": f"%{bundle_root}/configs/train.yaml::slice_transforms",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    items = []
    for subject, age in (("sub-a", 50.0), ("sub-b", 23.0), ("sub-c", 81.0)):
        nib.save(nib.Nifti1Image(rng.random((128, 128)).astype(np.float32), slice_affine()), tmp_path / f"{subject}.nii.gz")
        items.append({"image": f"{subject}.nii.gz", "subject": subject, "age": age})
    (tmp_path / "datalist.json").write_text(json.dumps({"test": items}))
    return tmp_path


def test_cli_reconstruct_and_interpolate_write_figures_and_json(tiny_bundle, capsys):
    common = ["--config_file", str(tiny_bundle / "config.json"), "--ddim-steps", "2", "--out", str(tiny_bundle / "out")]
    datalist = str(tiny_bundle / "datalist.json")
    assert analysis.main(["reconstruct", "--input", datalist, str(tiny_bundle / "sub-a.nii.gz"), "--n", "2", *common]) == 0
    summary = json.loads((tiny_bundle / "out" / "reconstructions.json").read_text())
    # the youngest and oldest labelled subjects of the datalist, then the single file
    assert [image["subject"] for image in summary["images"]] == ["sub-b", "sub-c", "sub-a"]
    assert [image["age"] for image in summary["images"]] == [23.0, 81.0, None]
    assert all(0 < image["mae"] <= math.sqrt(image["mse"]) < math.inf for image in summary["images"])
    assert (tiny_bundle / "out" / "reconstructions.png").stat().st_size > 10_000
    assert "sub-c" in capsys.readouterr().out

    assert analysis.main(["interpolate", "--datalist", datalist, "--frames", "3", *common]) == 0
    summary = json.loads((tiny_bundle / "out" / "interpolation.json").read_text())
    assert (summary["young"]["subject"], summary["old"]["subject"]) == ("sub-b", "sub-c")
    assert [frame["weight"] for frame in summary["frames"]] == [0.0, 0.5, 1.0]
    assert (tiny_bundle / "out" / "interpolation.png").is_file()

    assert analysis.main(["counterfactual", "--datalist", datalist, "--deltas", "-5", "0", "5", *common]) == 0
    assert json.loads((tiny_bundle / "out" / "counterfactual.json").read_text())["ddim_steps"] == 2
    summary = json.loads((tiny_bundle / "out" / "counterfactual.json").read_text())
    assert summary["subject"]["subject"] == "sub-a"  # the median-age labelled subject
    assert [frame["delta"] for frame in summary["frames"]] == [-5.0, 0.0, 5.0]
    assert summary["frames"][1]["mean_abs_difference"] == 0.0
    assert (tiny_bundle / "out" / "counterfactual.png").is_file()

    # without --ddim-steps: the config's ddim_steps key
    config = json.loads((tiny_bundle / "config.json").read_text())
    (tiny_bundle / "config.json").write_text(json.dumps({**config, "ddim_steps": 4}))
    assert analysis.main(["reconstruct", "--input", datalist, "--n", "1", "--config_file", str(tiny_bundle / "config.json"),
                          "--out", str(tiny_bundle / "out")]) == 0
    assert json.loads((tiny_bundle / "out" / "reconstructions.json").read_text())["ddim_steps"] == 4
    assert analysis.config_ddim_steps("configs/inference.yaml") == 50


def test_cli_metrics_association_and_ks(predictions_csv, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert analysis.main(["metrics", str(predictions_csv), "--out", out]) == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["n"] == 38
    assert analysis.main(["association", str(predictions_csv), "--split", "disease", "--out", out]) == 0
    saved = json.loads((tmp_path / "out" / "association.json").read_text())
    assert saved["n"] == 26 and saved["split"] == "disease"
    assert "r = " in capsys.readouterr().out
    assert analysis.main(["ks", str(predictions_csv), str(predictions_csv), "--names", "a", "b", "--out", out]) == 0
    saved = json.loads((tmp_path / "out" / "pad_distributions.json").read_text())
    assert saved["models"]["b"]["ks_statistic"] == 0.0 and saved["models"]["b"]["ks_p"] == 1.0
    assert (tmp_path / "out" / "pad_boxplot.png").is_file()


@pytest.mark.parametrize("argv, reason", [
    (["association", "missing.csv"], "missing.csv: no such file"),
    (["association", "{csv}", "--outcome", "grade"], "no column 'grade'"),
    (["association", "{csv}", "--pad", "age"], "invalid choice"),
    (["ks", "{csv}", "{csv}", "--names", "a"], "--names gives 1 names for 2"),
    (["ks", "{csv}", "{csv}"], "model names must be unique"),
    (["reconstruct", "--input", "{csv}", "--n", "0"], "--n: must be a positive integer"),
    (["reconstruct", "--input", "missing.nii.gz"], "missing.nii.gz: no such file"),
    (["reconstruct", "--input", "{datalist}", "--split", "validation", "--config_file", "{config}"], "no 'validation' items"),
    (["reconstruct", "--input", "{datalist}", "--config_file", "{config}", "--ckpt_path", "none.pt"], "none.pt: no checkpoint"),
    (["reconstruct", "--input", "{datalist}", "--config_file", "{config}", "--ddim-steps", "7"], "num_steps must divide"),
    (["interpolate", "--young", "{image}"], "give --young and --old images, or --datalist"),
    (["interpolate", "--datalist", "{datalist}", "--frames", "1"], "--frames: must be >= 2"),
    (["counterfactual", "--image", "{image}", "--datalist", "{datalist}"], "give --image, or --datalist"),
])
def test_cli_bad_input_is_one_line_and_exit_2(argv, reason, predictions_csv, tiny_bundle, capsys):
    paths = {"csv": predictions_csv, "datalist": tiny_bundle / "datalist.json", "config": tiny_bundle / "config.json",
             "image": tiny_bundle / "sub-a.nii.gz"}
    with pytest.raises(SystemExit) as exit_info:
        analysis.main([arg.format(**paths) for arg in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m scripts.analysis") and reason in err


@pytest.mark.parametrize("command, options", [
    ("metrics", ["PRED.csv", "--bias-correction", "--out"]),
    ("association", ["PRED.csv", "--outcome", "--pad", "--split", "--out"]),
    ("ks", ["PRED.csv", "--names", "--reference", "--pad", "--split", "--out"]),
    ("reconstruct", ["--input", "--split", "--n", "--config_file", "--ckpt_path", "--device", "--autocast-dtype",
                     "--ddim-steps", "--batch-size", "--out"]),
    ("interpolate", ["--young", "--old", "--datalist", "--split", "--frames", "--config_file", "--ckpt_path",
                     "--device", "--autocast-dtype", "--ddim-steps", "--batch-size", "--out"]),
    ("counterfactual", ["--image", "--datalist", "--reference", "--reference-size", "--split", "--deltas", "--config_file", "--ckpt_path", "--device",
                        "--autocast-dtype", "--ddim-steps", "--batch-size", "--out"]),
])
def test_cli_help_documents_every_option(command, options, capsys):
    with pytest.raises(SystemExit) as exit_info:
        analysis.main([command, "--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    for option in options:
        assert option in shown
