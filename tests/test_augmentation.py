"""Acquisition augmentation: MONAI random transforms set by train.yaml's `aug_*_prob` keys, training images only."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.utils import set_determinism

AUG_KEYS = {
    "aug_affine_prob": "RandAffined",
    "aug_bias_field_prob": "RandBiasFieldd",
    "aug_low_resolution_prob": "RandSimulateLowResolutiond",
    "aug_smooth_prob": "RandGaussianSmoothd",
    "aug_gibbs_prob": "RandGibbsNoised",
    "aug_kspace_spike_prob": "RandKSpaceSpikeNoised",
    "aug_noise_prob": "RandGaussianNoised",
    "aug_contrast_prob": "RandAdjustContrastd",
    "aug_histogram_shift_prob": "RandHistogramShiftd",
}


def pipelines(bundle_root, slice_dataset, tiny_network, **probs):
    parser = ConfigParser()
    parser.read_config(str(bundle_root / "configs" / "train.yaml"))
    parser.update({"bundle_root": str(bundle_root), "datalist": str(slice_dataset / "datalist.json"), **tiny_network})
    parser.update(probs)
    return parser.get_parsed_content("train#preprocessing"), parser.get_parsed_content("validate#preprocessing")


@pytest.fixture(scope="module")
def item(slice_dataset):
    first = json.loads((slice_dataset / "datalist.json").read_text())["training"][0]
    return {**first, "image": str(slice_dataset / first["image"]), "age": float(first.get("age", np.nan))}


def test_every_key_sets_its_monai_transform(bundle_root, slice_dataset, tiny_network):
    train, _ = pipelines(bundle_root, slice_dataset, tiny_network, **dict.fromkeys(AUG_KEYS, 0.25))
    found = {type(t).__name__: t for t in train.transforms}
    for key, name in AUG_KEYS.items():
        assert found[name].prob == 0.25, key


def test_off_by_default_training_sees_the_validation_image(bundle_root, slice_dataset, tiny_network, item):
    train, validate = pipelines(bundle_root, slice_dataset, tiny_network)
    out, reference = train(dict(item)), validate(dict(item))
    assert set(out) == set(reference)  # the support mask is gone again
    assert reference["image"].shape == (1, 32, 32, 1)  # validation keeps the level axis (one level here)
    torch.testing.assert_close(out["image"], reference["image"][..., 0])


@pytest.mark.parametrize("key", list(AUG_KEYS))
def test_each_augmentation_changes_the_image_inside_the_brain_only(bundle_root, slice_dataset, tiny_network, item, key):
    set_determinism(0)
    train, validate = pipelines(bundle_root, slice_dataset, tiny_network, **{key: 1.0})
    reference = validate(dict(item))["image"][..., 0]  # the one level of a single-level slice file
    out = train(dict(item))["image"]
    set_determinism(None)
    assert out.shape == reference.shape and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert float((out - reference).abs().mean()) > 1e-3, f"{key} changed nothing"
    if key != "aug_affine_prob":  # the affine moves the brain (and its support) itself
        assert float(out[reference == 0].abs().max()) == 0.0  # nothing appears outside the brain
