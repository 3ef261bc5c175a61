"""Export of the age predictor (encoder + head) to TorchScript with MONAI's ``ckpt_export``."""

from __future__ import annotations

import json

import pytest
import torch
from monai.bundle import ckpt_export, verify_net_in_out

from scripts import inference
from scripts.checkpoint import CheckpointError
from scripts.networks import AgePredictor, ArchitectureMismatchError, DiffusionAutoencoder


def tiny_model(sizes: dict) -> DiffusionAutoencoder:
    """The network train.yaml builds with these sizes (its encoder has the U-Net's block count)."""
    return DiffusionAutoencoder(**sizes, encoder_num_res_blocks=sizes["num_res_blocks"])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated in torch 2.13; MONAI uses it
def test_ckpt_export_writes_a_torchscript_age_predictor_giving_the_eager_ages(
    bundle_root, trained_model, tiny_network, tmp_path, monkeypatch
):
    monkeypatch.chdir(bundle_root)  # the `%configs/...` references of inference.yaml are relative to the bundle root
    exported = tmp_path / "model.ts"
    ckpt_export(
        net_id="age_predictor_def",
        filepath=str(exported),
        ckpt_file=str(trained_model["ckpt_path"]),
        meta_file="configs/metadata.json",
        config_file="configs/inference.yaml",
        **tiny_network,
    )
    scripted = torch.jit.load(str(exported))
    extra = {"metadata.json": "", "inference.json": ""}
    torch.jit.load(str(exported), _extra_files=extra)
    assert (
        json.loads(extra["metadata.json"])["version"]
        == json.loads((bundle_root / "configs/metadata.json").read_text())["version"]
    )
    assert "age_predictor_def" in json.loads(extra["inference.json"])

    model = tiny_model(tiny_network)
    model.load_state_dict(torch.load(trained_model["ckpt_path"], weights_only=True))
    model.eval()
    x0 = torch.rand(
        5, 1, tiny_network["image_size"], tiny_network["image_size"], generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        expected = model(x0)
        got = scripted(x0)
    assert got.shape == (5, 1)
    torch.testing.assert_close(got, expected)
    assert float(expected.std()) > 0  # a trained model, not a constant


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_checkpoint_refuses_other_architecture_settings_naming_them(
    bundle_root, trained_model, tiny_network, tmp_path, monkeypatch
):
    """The architecture record saved with the weights catches what shapes cannot: num_heads splits the same
    attention weights differently, and MONAI's ``copy_model_state`` (ckpt_export) copies only the entries whose
    shapes match, leaving the others at their random initialisation."""
    ckpt = trained_model["ckpt_path"]
    state = torch.load(ckpt, weights_only=True)
    unrecorded = {key: value for key, value in state.items() if key != "_extra_state"}
    with pytest.warns(UserWarning, match="weights without an architecture record"):  # loads, strictly
        tiny_model({**tiny_network, "num_heads": 2}).load_state_dict(unrecorded)  # every weight's shape fits
    with pytest.raises(CheckpointError, match=r"model.pt: trained with num_heads 1 \(configured 2\); pass the"):
        inference.load_weights(tiny_model({**tiny_network, "num_heads": 2}), ckpt)
    assert inference.load_weights(tiny_model(tiny_network), ckpt).architecture["num_heads"] == 1
    # training-only settings (dropout, the encoder's initial gain) and its precision may differ
    inference.load_weights(
        tiny_model({**tiny_network, "dropout": 0.3, "latent_gain": 0.5, "encoder_fp32": False}), ckpt
    )
    monkeypatch.chdir(bundle_root)
    with pytest.raises(ArchitectureMismatchError, match=r"z_dim 16 \(configured 8\)"):
        ckpt_export(
            net_id="age_predictor_def",
            filepath=str(tmp_path / "model.ts"),
            ckpt_file=str(ckpt),
            meta_file="configs/metadata.json",
            config_file="configs/inference.yaml",
            **{**tiny_network, "z_dim": 8},
        )
    assert not (tmp_path / "model.ts").exists()


def test_age_predictor_loads_a_full_model_checkpoint_strictly_but_not_a_foreign_one(trained_model, tiny_network):
    model = tiny_model(tiny_network)
    state = torch.load(trained_model["ckpt_path"], weights_only=True)
    predictor = model.age_predictor()
    predictor.load_state_dict(state)  # U-Net keys left out, nothing else missing
    torch.testing.assert_close(predictor.age_head.age_mean, state["age_head.age_mean"])
    with pytest.raises(RuntimeError, match="Missing key"):
        predictor.load_state_dict({k: v for k, v in state.items() if not k.startswith("encoder.")})
    assert isinstance(predictor, AgePredictor)


def test_verify_net_in_out_accepts_the_exported_network_and_would_reject_a_wrong_one(
    bundle_root, tiny_network, monkeypatch, tmp_path
):
    monkeypatch.chdir(bundle_root)
    check = dict(net_id="age_predictor_def", config_file="configs/inference.yaml", device="cpu", **tiny_network)
    verify_net_in_out(meta_file="configs/metadata.json", **check)  # raises when the network does not fit
    # the same check against metadata promising a 3-channel input: the 1-channel network fails it
    meta = json.loads((bundle_root / "configs" / "metadata.json").read_text())
    meta["network_data_format"]["inputs"]["image"]["num_channels"] = 3
    wrong = tmp_path / "metadata.json"
    wrong.write_text(json.dumps(meta))
    with pytest.raises(Exception, match="channels"):
        verify_net_in_out(meta_file=str(wrong), **check)
