"""Shared fixtures: small phantom datasets generated once per test session."""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the bundle root holds the `scripts` package, as for monai.bundle
torch.set_num_threads(min(2, os.cpu_count() or 1))

from scripts import phantom  # noqa: E402

# A network small enough to train a few steps in seconds; every size is a top-level config key.
TINY_NETWORK = {
    "image_size": 32,
    "base_channels": 8,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "attention_resolutions": [8],
    "embed_dim": 32,
    "z_dim": 16,
    "head_hidden_features": [8, 4],
}


@pytest.fixture(scope="session")
def tiny_network() -> dict:
    return dict(TINY_NETWORK)


@pytest.fixture(scope="session")
def run_workflow(bundle_root):
    """Run a bundle workflow in this process (as ``python -m monai.bundle run``), tiny network and CPU."""
    from monai.bundle import ConfigWorkflow

    def run(config_files, run_id: str, before_run=None, **overrides):
        """``before_run(workflow)``, if given, runs after ``initialize`` (e.g. to attach a test's own handlers)."""
        files = [
            str(bundle_root / "configs" / f)
            for f in ([config_files] if isinstance(config_files, str) else config_files)
        ]
        settings = {
            "bundle_root": str(bundle_root),
            "device": "$torch.device('cpu')",
            "autocast_dtype": "float32",
            **TINY_NETWORK,
            **overrides,
        }
        workflow = ConfigWorkflow(
            config_file=files,
            meta_file=str(bundle_root / "configs" / "metadata.json"),
            logging_file=False,
            workflow_type=None,
            run_id=run_id,
            **settings,
        )
        workflow.initialize()
        if before_run is not None:
            before_run(workflow)
        workflow.run()
        return workflow

    return run


def read_csv(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def predict(run_workflow, trained_model, input, output_dir, **overrides) -> list[dict]:
    """``run inference`` with the tiny trained model on ``input``; the rows of its predictions.csv."""
    overrides.setdefault("skull_strip", "template")  # the real HD-BET network is tested in test_transforms.py
    run_workflow(
        "inference.yaml",
        "inference",
        input=str(input),
        output_dir=str(output_dir),
        ckpt_path=str(trained_model["ckpt_path"]),
        num_workers=1,
        **overrides,
    )
    return read_csv(Path(output_dir) / "predictions.csv")


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory, run_workflow, slice_dataset) -> dict:
    """A tiny model trained 2 epochs on ``slice_dataset``: its checkpoint, bias correction and run folder."""
    root = tmp_path_factory.mktemp("trained")
    ckpt = root / "models" / "model.pt"
    run_workflow(
        "train.yaml",
        "training",
        datalist=str(slice_dataset / "datalist.json"),
        output_dir=str(root / "run"),
        ckpt_path=str(ckpt),
        max_epochs=2,
        batch_size=4,
        val_batch_size=8,
        interval_coverage=0.6,  # 6 validation subjects bound a 60 % interval; 90 % needs 19 (else it is infinite)
    )
    return {
        "ckpt_path": ckpt,
        "bias_correction_path": root / "models" / "model_bias_correction.json",
        "output_dir": root / "run",
        "datalist": slice_dataset / "datalist.json",
    }


@pytest.fixture(scope="session")
def bundle_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def slice_dataset(tmp_path_factory) -> Path:
    """40 healthy + 8 disease research-grade subjects and a calibration split of 12 (mixed grades) as preprocessed
    slices (fast path)."""
    out = tmp_path_factory.mktemp("phantom_slices")
    spec = phantom.CohortSpec(n=40, seed=7, n_disease=8, n_calibration=12)
    phantom.generate(spec, out, mode="slices", progress=False)
    return out


@pytest.fixture(scope="session")
def volume_dataset(tmp_path_factory) -> Path:
    """Raw scanner-space volumes of 5 subjects (mixed grades) with their MNI ground-truth slices."""
    out = tmp_path_factory.mktemp("phantom_volumes")
    phantom.generate(phantom.CohortSpec(n=4, seed=3, n_disease=1, grade="mixed"), out, mode="volumes", progress=False)
    return out


def write_tiny_hdbet_weights(folder: Path, trainer: str = "nnUNetTrainer") -> Path:
    """An HD-BET weights folder laid out as the real release (plans.json, dataset.json,
    fold_all/checkpoint_final.pth) around a tiny, randomly initialised nnU-Net PlainConvUNet.

    nnU-Net rebuilds the network from plans.json with the checkpoint's trainer class, so HD-BET's
    own prediction code runs on it end to end in about a second.
    """
    import json

    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    architecture = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": 2,
            "features_per_stage": [4, 8],
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3], [3, 3, 3]],
            "strides": [[1, 1, 1], [2, 2, 2]],
            "n_conv_per_stage": [1, 1],
            "n_conv_per_stage_decoder": [1],
            "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    linear = {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}
    plans = {
        "dataset_name": "Dataset000_TinyHDBET",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
        "original_median_shape_after_transp": [130, 130, 130],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 1,
                "patch_size": [32, 32, 32],
                "median_image_size_in_voxels": [32, 40, 32],
                "spacing": [6.0, 6.0, 6.0],
                "normalization_schemes": ["ZScoreNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": linear,
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_seg_kwargs": {**linear, "is_seg": True},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": linear,
                "architecture": architecture,
                "batch_dice": False,
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {
                "max": 1.0,
                "mean": 0.5,
                "median": 0.5,
                "min": 0.0,
                "percentile_00_5": 0.0,
                "percentile_99_5": 1.0,
                "std": 0.2,
            }
        },
    }
    dataset = {
        "channel_names": {"0": "T1"},
        "labels": {"background": 0, "brain": 1},
        "numTraining": 1,
        "file_ending": ".nii.gz",
    }
    torch.manual_seed(0)
    network = get_network_from_plans(
        architecture["network_class_name"],
        architecture["arch_kwargs"],
        architecture["_kw_requires_import"],
        1,
        2,
        allow_init=True,
        deep_supervision=False,
    )
    (folder / "fold_all").mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset))
    torch.save(
        {
            "network_weights": network.state_dict(),
            "trainer_name": trainer,
            "init_args": {"configuration": "3d_fullres", "fold": "all"},
            "inference_allowed_mirroring_axes": (0, 1, 2),
        },
        folder / "fold_all" / "checkpoint_final.pth",
    )
    return folder


@pytest.fixture(scope="session")
def tiny_hdbet_weights(tmp_path_factory) -> Path:
    """A randomly initialised HD-BET weights folder (see write_tiny_hdbet_weights)."""
    return write_tiny_hdbet_weights(tmp_path_factory.mktemp("hdbet_weights"))
