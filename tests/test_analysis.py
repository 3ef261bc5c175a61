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
from test_engine import TINY, one_thread, tiny_model  # noqa: F401

from scripts import analysis, statistics
from scripts.inference import PREDICTION_COLUMNS, read_predictions
from scripts.mni import slice_affine


def write_predictions(path, pads, survival, splits, corrected=None):
    """A predictions.csv as inference writes it: empty cells for unknown values, survival as an extra column."""
    columns = [*PREDICTION_COLUMNS, "survival_months"]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for i, (pad, months, split) in enumerate(zip(pads, survival, splits)):
            known = not math.isnan(pad)
            writer.writerow(
                {
                    "subject": f"sub-{i:03d}",
                    "image": f"sub-{i:03d}.nii.gz",
                    "predicted_age": 60.0 + i % 7 + (pad if known else 0),
                    "age": 60.0 + i % 7 if known else "",
                    "brain_pad": pad if known else "",
                    "brain_pad_corrected": "" if corrected is None else corrected[i],
                    "split": split,
                    "error": "",
                    "survival_months": months,
                }
            )
    return path


@pytest.fixture
def predictions_csv(tmp_path):
    rng = np.random.default_rng(0)
    pads = rng.normal(5.0, 6.0, 40)
    survival = [f"{v:.1f}" for v in 36.0 - 0.8 * pads + rng.normal(0, 6.0, 40)]
    pads[[3, 11]] = math.nan  # no prediction
    survival[5], survival[17] = "", "n/a"  # outcome unknown
    splits = ["disease"] * 30 + ["test"] * 10
    return write_predictions(
        tmp_path / "predictions.csv", pads, survival, splits, corrected=np.nan_to_num(pads) - np.arange(40) / 20
    )


# ------------------------------------------------------------------------------------------------------ association


def test_association_is_pearson_over_complete_pairs_of_the_split(predictions_csv):
    rows = read_predictions(predictions_csv)
    pads = np.array([r["brain_pad"] for r in rows])
    survival = np.array(
        [float(r["survival_months"]) if r["survival_months"] not in ("", "n/a") else math.nan for r in rows]
    )
    for split, selected in (("disease", slice(0, 30)), (None, slice(0, 40))):
        x, y = pads[selected], survival[selected]
        keep = np.isfinite(x) & np.isfinite(y)
        expected = stats.pearsonr(x[keep], y[keep])
        result = statistics.pad_outcome_association(rows, split=split)
        assert result["n"] == keep.sum() == (26 if split else 36)
        assert result["r"] == pytest.approx(expected.statistic, abs=1e-12)
        assert result["p"] == pytest.approx(expected.pvalue, rel=1e-9)
        assert result["r"] < -0.5 and (result["outcome"], result["pad"], result["split"]) == (
            "survival_months",
            "brain_pad",
            split,
        )

    corrected = statistics.pad_outcome_association(rows, pad="brain_pad_corrected", split="disease")
    x = np.array([r["brain_pad_corrected"] for r in rows[:30]])
    keep = np.isfinite(x) & np.isfinite(survival[:30])  # the corrected column is complete: only survival is missing
    assert corrected["n"] == 28
    assert corrected["r"] == pytest.approx(stats.pearsonr(x[keep], survival[:30][keep]).statistic, abs=1e-12)


def test_association_rejects_unknown_columns_splits_and_text(predictions_csv):
    rows = read_predictions(predictions_csv)
    with pytest.raises(ValueError, match="no column 'grade'"):
        statistics.pad_outcome_association(rows, outcome="grade")
    with pytest.raises(ValueError, match="no predictions in split 'validation'.*disease, test"):
        statistics.pad_outcome_association(rows, split="validation")
    rows[0]["survival_months"] = "alive"
    with pytest.raises(ValueError, match="sub-000: 'alive' is not a number"):
        statistics.pad_outcome_association(rows)


# ---------------------------------------------------------------------------------------------------------- KS tests


def test_pad_distributions_match_scipy_and_write_the_box_plot(tmp_path):
    rng = np.random.default_rng(1)
    samples = {
        "diffae": rng.normal(-6.0, 27.0, 50),
        "densenet": rng.normal(-1.6, 7.7, 50),
        "brainager": rng.normal(-19.0, 11.0, 45),
    }
    named_rows = {}
    for name, pads in samples.items():
        with_gaps = np.append(pads, math.nan)  # an unpredicted subject is left out
        path = write_predictions(
            tmp_path / f"{name}.csv", with_gaps, [""] * len(with_gaps), ["disease"] * len(with_gaps)
        )
        named_rows[name] = read_predictions(path)
    named_rows["brainager"] += [{**named_rows["brainager"][0], "split": "test"}]  # another split: filtered out

    png = tmp_path / "box.png"
    result = statistics.compare_pad_distributions(named_rows, split="disease", boxplot=png)
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
    from PIL import Image

    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 400 and image.height > 300
    assert "KS D" in statistics.format_pad_table(result) and "brainager" in statistics.format_pad_table(result)

    against_densenet = statistics.compare_pad_distributions(named_rows, reference="densenet", split="disease")
    assert against_densenet["models"]["diffae"]["ks_statistic"] == pytest.approx(
        result["models"]["densenet"]["ks_statistic"]
    )
    with pytest.raises(ValueError, match="reference 'x' is not one of"):
        statistics.compare_pad_distributions(named_rows, reference="x")
    with pytest.raises(ValueError, match="at least two models"):
        statistics.compare_pad_distributions({"diffae": named_rows["diffae"]})


# --------------------------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def tiny_bundle(tmp_path, bundle_root):
    """A config + checkpoint of a tiny model and three labelled model-input slices in a datalist."""
    from scripts.handlers import PreciseBatchNorm

    model = tiny_model(seed=2)  # its latent statistics from training-like images, as training leaves them
    PreciseBatchNorm(
        model,
        [
            {
                "image": torch.rand(16, 1, 16, 16, generator=torch.Generator().manual_seed(9)),
                "age": torch.full((16,), 50.0),
            }
        ],
    )()
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    torch.save({"network": model.state_dict(), "optimizer": {"state": {}}}, tmp_path / "last.pt")  # a training state
    config = {
        "imports": ["$import torch"],
        "device": "$torch.device('cpu')",
        "ckpt_path": str(tmp_path / "tiny.pt"),
        "image_size": TINY["image_size"],
        "in_channels": 1,
        "slice_levels": 1,
        "network_def": {"_target_": "scripts.networks.DiffusionAutoencoder", **TINY},
        "preprocessing": {"_target_": "Compose", "transforms": f"%{bundle_root}/configs/train.yaml::slice_loading"},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    items = []
    for subject, age in (("sub-a", 50.0), ("sub-b", 23.0), ("sub-c", 81.0)):
        nib.save(
            nib.Nifti1Image(rng.random((128, 128)).astype(np.float32), slice_affine()), tmp_path / f"{subject}.nii.gz"
        )
        items.append({"image": f"{subject}.nii.gz", "subject": subject, "age": age})
    (tmp_path / "datalist.json").write_text(json.dumps({"test": items}))
    return tmp_path


def test_cli_reconstruct_and_interpolate_write_figures_and_json(tiny_bundle, capsys):
    common = ["--config_file", str(tiny_bundle / "config.json"), "--ddim_steps", "2", "--out", str(tiny_bundle / "out")]
    datalist = str(tiny_bundle / "datalist.json")
    assert (
        analysis.main(["reconstruct", "--input", datalist, str(tiny_bundle / "sub-a.nii.gz"), "--n", "2", *common]) == 0
    )
    summary = json.loads((tiny_bundle / "out" / "reconstructions.json").read_text())
    # the youngest and oldest labelled subjects of the datalist, then the single file
    assert [image["subject"] for image in summary["images"]] == ["sub-b", "sub-c", "sub-a"]
    assert [image["age"] for image in summary["images"]] == [23.0, 81.0, None]
    assert all(0 < image["mae"] <= math.sqrt(image["mse"]) < math.inf for image in summary["images"])
    # the swapped-z control: every image's x_T decoded with the next image's z, in the JSON and in the figure
    assert [image["swapped_z_from"] for image in summary["images"]] == ["sub-c", "sub-a", "sub-b"]
    assert all(image["swapped_mse"] > 0 for image in summary["images"])
    mean_mse = sum(image["mse"] for image in summary["images"]) / 3
    mean_swapped = sum(image["swapped_mse"] for image in summary["images"]) / 3
    assert summary["swap_penalty"] == pytest.approx(mean_swapped / mean_mse - 1, rel=1e-4, abs=1e-6)
    from PIL import Image

    with Image.open(tiny_bundle / "out" / "reconstructions.png") as png:
        assert png.height > 1000  # five rows: original, reconstruction, error, control, control error
    printed = capsys.readouterr().out
    assert "sub-c" in printed and "swapped-z control" in printed

    assert analysis.main(["generate", "--input", datalist, "--n", "3", *common]) == 0
    summary = json.loads((tiny_bundle / "out" / "generation.json").read_text())
    assert [image["subject"] for image in summary["images"]] == ["sub-b", "sub-a", "sub-c"]  # by age
    assert summary["chance_share"] == pytest.approx(1 / 3)
    assert summary["nearest_own_share"] in (0.0, pytest.approx(1 / 3), pytest.approx(2 / 3), 1.0)
    assert {image["nearest"] for image in summary["images"]} <= {"sub-a", "sub-b", "sub-c"}
    assert (tiny_bundle / "out" / "generation.png").is_file()

    assert analysis.main(["interpolate", "--datalist", datalist, "--frames", "3", *common]) == 0
    summary = json.loads((tiny_bundle / "out" / "interpolation.json").read_text())
    assert (summary["young"]["subject"], summary["old"]["subject"]) == ("sub-b", "sub-c")
    assert [frame["weight"] for frame in summary["frames"]] == [0.0, 0.5, 1.0]
    ages = [frame["reencoded_age"] for frame in summary["frames"]]
    assert summary["monotonic"] == (ages[0] <= ages[1] <= ages[2])
    assert summary["frames"][0]["control_reencoded_age"] == pytest.approx(ages[0], abs=1e-3)  # same z, same x_T
    assert (tiny_bundle / "out" / "interpolation.png").is_file()

    assert analysis.main(["counterfactual", "--datalist", datalist, "--deltas", "-5", "0", "5", *common]) == 0
    assert json.loads((tiny_bundle / "out" / "counterfactual.json").read_text())["ddim_steps"] == 2
    summary = json.loads((tiny_bundle / "out" / "counterfactual.json").read_text())
    assert summary["subject"]["subject"] == "sub-a"  # the median-age labelled subject
    assert [frame["delta"] for frame in summary["frames"]] == [-5.0, 0.0, 5.0]
    assert summary["frames"][1]["mean_abs_difference"] == 0.0
    assert summary["frames"][1]["reread_shift"] == 0.0 and summary["frames"][1]["control_reread_shift"] == 0.0
    assert summary["frames"][0]["control_mean_abs_difference"] > 0
    assert (tiny_bundle / "out" / "counterfactual.png").is_file()

    # without --ddim_steps: the config's ddim_steps key
    config = json.loads((tiny_bundle / "config.json").read_text())
    (tiny_bundle / "config.json").write_text(json.dumps({**config, "ddim_steps": 4}))
    assert (
        analysis.main(
            [
                "reconstruct",
                "--input",
                datalist,
                "--n",
                "1",
                "--config_file",
                str(tiny_bundle / "config.json"),
                "--out",
                str(tiny_bundle / "out"),
            ]
        )
        == 0
    )
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


@pytest.mark.parametrize(
    "argv, reason",
    [
        (["association", "missing.csv"], "missing.csv: no such file"),
        (["association", "{csv}", "--outcome", "grade"], "no column 'grade'"),
        (["association", "{csv}", "--pad", "age"], "invalid choice"),
        (["ks", "{csv}", "{csv}", "--names", "a"], "--names gives 1 names for 2"),
        (["ks", "{csv}", "{csv}"], "model names must be unique"),
        (["reconstruct", "--input", "{csv}", "--n", "0"], "--n: must be a positive integer"),
        (["reconstruct", "--input", "missing.nii.gz"], "missing.nii.gz: no such file"),
        (
            ["reconstruct", "--input", "{datalist}", "--split", "validation", "--config_file", "{config}"],
            "no 'validation' items",
        ),
        (
            ["reconstruct", "--input", "{datalist}", "--config_file", "{config}", "--ckpt_path", "none.pt"],
            "none.pt: no checkpoint",
        ),
        (
            ["reconstruct", "--input", "{datalist}", "--config_file", "{config}", "--ddim_steps", "7"],
            "num_steps must divide",
        ),
        (
            ["reconstruct", "--input", "{datalist}", "--config_file", "{config}", "--ckpt_path", "{last}"],
            "a training state, not model weights",
        ),
        (["interpolate", "--young", "{image}"], "give --young and --old images, or --datalist"),
        (["interpolate", "--datalist", "{datalist}", "--frames", "1"], "--frames: must be >= 2"),
        (["counterfactual", "--image", "{image}", "--datalist", "{datalist}"], "give --image, or --datalist"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(argv, reason, predictions_csv, tiny_bundle, capsys):
    paths = {
        "csv": predictions_csv,
        "datalist": tiny_bundle / "datalist.json",
        "config": tiny_bundle / "config.json",
        "image": tiny_bundle / "sub-a.nii.gz",
        "last": tiny_bundle / "last.pt",
    }
    with pytest.raises(SystemExit) as exit_info:
        analysis.main([arg.format(**paths) for arg in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m scripts.analysis") and reason in err


@pytest.mark.parametrize(
    "command, options",
    [
        ("metrics", ["PRED.csv", "--bias_correction", "--out"]),
        ("association", ["PRED.csv", "--outcome", "--pad", "--split", "--out"]),
        ("ks", ["PRED.csv", "--names", "--reference", "--pad", "--split", "--out"]),
        (
            "reconstruct",
            [
                "--input",
                "--split",
                "--n",
                "--config_file",
                "--ckpt_path",
                "--device",
                "--autocast_dtype",
                "--ddim_steps",
                "--batch_size",
                "--out",
            ],
        ),
        (
            "interpolate",
            [
                "--young",
                "--old",
                "--datalist",
                "--split",
                "--frames",
                "--config_file",
                "--ckpt_path",
                "--device",
                "--autocast_dtype",
                "--ddim_steps",
                "--batch_size",
                "--out",
            ],
        ),
        (
            "counterfactual",
            [
                "--image",
                "--datalist",
                "--reference",
                "--reference_size",
                "--split",
                "--deltas",
                "--seed",
                "--config_file",
                "--ckpt_path",
                "--device",
                "--autocast_dtype",
                "--ddim_steps",
                "--batch_size",
                "--out",
            ],
        ),
        (
            "generate",
            [
                "--input",
                "--split",
                "--n",
                "--seed",
                "--config_file",
                "--ckpt_path",
                "--device",
                "--autocast_dtype",
                "--ddim_steps",
                "--batch_size",
                "--out",
            ],
        ),
    ],
)
def test_cli_help_documents_every_option(command, options, capsys):
    with pytest.raises(SystemExit) as exit_info:
        analysis.main([command, "--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    for option in options:
        assert option in shown
