"""Networks: the paper-size model, shapes of every part, conditioning, fused ops, autocast/channels_last, export."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from monai.bundle import verify_net_in_out

# tests/ is on sys.path under pytest: the tiny model sizes shared with the engine tests
from test_engine import TINY

from scripts.networks import (
    AgeHead,
    AgePredictor,
    AttentionBlock,
    ConditionalUNet,
    ConditionedResBlock,
    DiffusionAutoencoder,
    SemanticEncoder,
    count_parameters,
)

AUTHORS_PARAMETER_COUNT = 10_611_394  # printed by the authors' code as "10.12 M" (= count / 2**20)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy CPU every op would wait for both to be scheduled."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomise_zero_init(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Give the zero-initialised residual-branch layers random weights so outputs depend on every input."""
    torch.manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and not weight.any():
                weight.normal_(0.0, std)
    return model


def test_paper_configuration_matches_the_authors_parameter_count():
    paper = DiffusionAutoencoder(head_norm="batch")  # Appendix D's head: ReLU, BatchNorm, dropout
    count = count_parameters(paper)
    # Same layer structure as the authors' diffae configuration, parameter for parameter.
    assert count == AUTHORS_PARAMETER_COUNT
    assert count_parameters(paper.age_head) == 512 * 128 + 128 + 2 * 128 + 128 * 32 + 32 + 2 * 32 + 32 + 1
    # The bundle's default head has no BatchNorm (docs/latent.md): its 2 * (128 + 32) affine parameters fewer.
    # The latent's standardisation has no parameters at all.
    assert count_parameters(DiffusionAutoencoder()) == AUTHORS_PARAMETER_COUNT - 2 * (128 + 32)
    assert count_parameters(DiffusionAutoencoder(latent_norm="none")) == count_parameters(DiffusionAutoencoder())


def test_paper_configuration_channel_path():
    unet = ConditionalUNet()
    widths = [stage.block.in_conv.out_channels for stage in unet.down]
    assert unet.conv_in.out_channels == 32
    assert widths == [32, 32, 32, 64, 64, 64, 96, 96, 96, 128, 128]
    assert [stage.block.in_conv.out_channels for stage in unet.up] == [128] * 3 + [96] * 3 + [64] * 3 + [32] * 3
    # attention at 16x16 (the coarsest level, 128 channels) and in the middle block
    n_attention = sum(isinstance(m, AttentionBlock) for m in unet.modules())
    assert n_attention == 2 + 1 + 3
    assert SemanticEncoder().out.out_features == 512


def test_shapes_of_every_part():
    torch.manual_seed(0)
    model = DiffusionAutoencoder(**TINY)
    x0 = torch.rand(3, 1, 16, 16)
    t = torch.tensor([0, 500, 999])
    z = model.encode(x0)
    assert z.shape == (3, 16)
    assert model.denoise(x0, t, z).shape == (3, 1, 16, 16)
    assert model.age_head(z).shape == (3,)
    assert model.predict_age(x0).shape == (3,)
    assert model(x0).shape == (3, 1)  # channel axis for MONAI's verify_net_in_out and metrics
    assert model.age_predictor()(x0).shape == (3, 1)
    out = model(x0, x0, t)
    assert out["eps"].shape == (3, 1, 16, 16) and out["age"].shape == (3,)


def test_k_slice_input_predicts_noise_for_every_slice():
    model = DiffusionAutoencoder(in_channels=3, **TINY)
    x0 = torch.rand(2, 3, 16, 16)
    t = torch.tensor([1, 2])
    assert model.denoise(x0, t, model.encode(x0)).shape == (2, 3, 16, 16)
    assert model(x0).shape == (2, 1)


def test_unet_starts_as_zero_noise_prediction_and_is_conditioned_on_t_and_z():
    torch.manual_seed(0)
    model = DiffusionAutoencoder(**TINY).eval()
    x = torch.randn(2, 1, 16, 16)
    t = torch.tensor([10, 10])
    z = torch.randn(2, 16)
    # diffae's zero-initialised output conv: eps_hat = 0 before training
    assert torch.count_nonzero(model.denoise(x, t, z)) == 0
    randomise_zero_init(model)
    eps = model.denoise(x, t, z)
    assert not torch.allclose(eps, model.denoise(x, torch.tensor([900, 900]), z), atol=1e-6)
    assert not torch.allclose(eps, model.denoise(x, t, z + 1.0), atol=1e-6)


def test_conditioned_block_matches_the_unfused_diffae_formula():
    torch.manual_seed(0)
    block = randomise_zero_init(ConditionedResBlock(8, 16, embed_dim=12, cond_dim=6)).eval()
    with torch.no_grad():
        block.out_norm.weight.normal_()
        block.out_norm.bias.normal_()
    x, time_act, cond_act = torch.randn(2, 8, 6, 6), torch.randn(2, 12), torch.randn(2, 6)

    h = block.in_conv(F.silu(block.in_norm(x)))
    time_scale, time_shift = block.time_proj(time_act)[:, :, None, None].chunk(2, dim=1)
    cond_scale = block.cond_proj(cond_act)[:, :, None, None]
    h = block.out_norm(h) * (1 + time_scale) + time_shift
    h = h * (1 + cond_scale)
    expected = block.skip(x) + block.out_conv(F.silu(h))

    torch.testing.assert_close(block(x, time_act, cond_act), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_heads", [1, 2])
def test_attention_matches_explicit_softmax_attention(num_heads):
    torch.manual_seed(0)
    block = randomise_zero_init(AttentionBlock(8, num_heads)).eval()
    x = torch.randn(2, 8, 4, 5)
    tokens = block.norm(x).flatten(2).transpose(1, 2)
    q, k, v = block.qkv(tokens).chunk(3, dim=-1)

    def heads(a):
        return a.reshape(2, 20, num_heads, 8 // num_heads).transpose(1, 2)

    weights = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / (8 // num_heads) ** 0.5, dim=-1)
    attended = (weights @ heads(v)).transpose(1, 2).reshape(2, 20, 8)
    expected = x + block.proj(attended).transpose(1, 2).reshape(2, 8, 4, 5)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_age_head_outputs_years_from_its_buffers():
    head = AgeHead(in_features=16, hidden_features=(8, 4), age_mean=0.0, age_std=1.0).eval()
    head.set_age_stats(mean=60.0, std=10.0)
    with torch.no_grad():
        head.mlp[-1].weight.zero_()
        head.mlp[-1].bias.fill_(0.5)  # standardised output 0.5 -> 60 + 0.5 * 10 years
    torch.testing.assert_close(head(torch.randn(5, 16)), torch.full((5,), 65.0))
    assert {"age_mean", "age_std"} <= set(head.state_dict())
    with pytest.raises(ValueError):
        head.set_age_stats(60.0, 0.0)


@pytest.mark.parametrize("norm, kind", [("none", "Identity"), ("batch", "BatchNorm1d"), ("layer", "LayerNorm")])
def test_age_head_layer_order(norm, kind):
    head = AgeHead(norm=norm)
    kinds = [type(m).__name__ for m in head.mlp]
    assert kinds == ["Linear", "ReLU", kind, "Dropout"] * 2 + ["Linear"]
    assert [m.p for m in head.mlp if isinstance(m, torch.nn.Dropout)] == [0.5, 0.5]
    assert head.has_batchnorm == (norm == "batch")
    with pytest.raises(ValueError, match="head norm"):
        AgeHead(norm="group")


@pytest.mark.parametrize("head_norm", ["none", "batch"])
def test_training_outputs_run_the_head_on_labelled_images_only(head_norm):
    """The head never sees an unlabelled image: spy on its input, and check a BatchNorm head's statistics."""
    torch.manual_seed(0)
    model = DiffusionAutoencoder(**{**TINY, "head_norm": head_norm}).train()
    x0 = torch.rand(4, 1, 16, 16)
    t = torch.tensor([1, 2, 3, 4])
    seen = []
    model.age_head.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
    z_seen = []
    model.encoder.register_forward_hook(lambda *args: z_seen.append(args[2].detach().clone()))
    labelled = torch.tensor([True, False, True, False])
    out = model(x0, x0, t, labelled)
    assert torch.isnan(out["age"]).tolist() == [False, True, False, True]
    assert len(seen) == 1 and torch.equal(seen[0], z_seen[0][labelled])  # exactly the labelled rows' z
    if head_norm == "batch":  # its running statistics moved by the labelled rows' batch mean only (momentum 0.1)
        with torch.no_grad():
            hidden = model.age_head.mlp[1](model.age_head.mlp[0](z_seen[0][labelled]))
        torch.testing.assert_close(model.age_head.mlp[2].running_mean, 0.1 * hidden.mean(0))
    with torch.no_grad():  # the labelled ages are the head's output on those rows (dropout is 0 here)
        torch.testing.assert_close(out["age"][labelled], model.age_head(z_seen[0][labelled]))
    if head_norm == "batch":
        with pytest.warns(UserWarning, match="single labelled"):
            single = model(x0, x0, t, torch.tensor([False, True, False, False]))
        assert torch.isnan(single["age"]).all()
    else:  # without BatchNorm a single labelled image gets its prediction
        single = model(x0, x0, t, torch.tensor([False, True, False, False]))
        assert torch.isnan(single["age"]).tolist() == [True, False, True, True]
    model.eval()
    assert torch.isnan(model(x0, x0, t, torch.tensor([False, True, False, False]))["age"]).tolist() == [
        True,
        False,
        True,
        True,
    ]
    with pytest.raises(ValueError, match="at least 2 images"):
        model.train()(x0[:1], x0[:1], t[:1])


# torch.jit is deprecated in torch 2.13 but is what MONAI's ckpt_export uses; the tracer warning comes from
# torch's own group_norm batch-size check.
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_torchscript_and_trace_export_of_the_age_predictor():
    torch.manual_seed(0)
    model = DiffusionAutoencoder(**TINY).eval()
    x0 = torch.rand(2, 1, 16, 16)
    predictor = model.age_predictor()
    assert isinstance(predictor, AgePredictor)
    expected = model(x0)
    torch.testing.assert_close(torch.jit.script(predictor)(x0), expected)
    torch.testing.assert_close(torch.jit.trace(predictor, x0)(x0), expected)
    torch.testing.assert_close(torch.jit.script(model)(x0), expected)  # the whole model scripts too


@pytest.fixture(scope="module")
def phantom_slices(slice_dataset) -> torch.Tensor:
    """24 phantom brains (research grade) at 64x64: real between-subject differences, not random pixels."""
    import nibabel as nib

    items = json.loads((slice_dataset / "datalist.json").read_text())["training"][:24]
    images = [torch.from_numpy(nib.load(slice_dataset / it["image"]).get_fdata().astype("float32")) for it in items]
    return F.interpolate(torch.stack(images)[:, None], size=(64, 64), mode="area")


def calibrate(model: DiffusionAutoencoder, images: torch.Tensor) -> DiffusionAutoencoder:
    """Exact BatchNorm statistics on these images, as training does before every validation."""
    from scripts.handlers import PreciseBatchNorm

    PreciseBatchNorm(model, [{"image": images, "age": torch.full((len(images),), 50.0)}])()
    return model.eval()


def test_z_sem_has_an_order_one_between_subject_scale_at_initialisation(phantom_slices):
    """The paper-size encoder's latent varies between brains by O(1), not by ~1 % of a constant offset."""
    torch.manual_seed(0)
    model = DiffusionAutoencoder(image_size=64)
    with torch.no_grad():
        z = model.train().encode(phantom_slices)  # what the U-Net and the head see in training
    spread, size = z.std(0).mean(), z.abs().mean()
    assert 0.9 < float(spread) < 1.1 and float(spread / size) > 1.0  # a standardised latent: sd 1, |z| ~ 0.8
    # ... and so the U-Net's z modulation (1 + W silu(z)) of its first block differs between subjects by O(0.1)
    with torch.no_grad():
        modulation = model.unet.down[0].block.cond_proj(F.silu(z))
    assert float(modulation.std(0).mean()) > 0.05
    with torch.no_grad():  # the same in evaluation, with the statistics training computes before validating
        z_eval = calibrate(model, phantom_slices).encode(phantom_slices)
    assert 0.9 < float(z_eval.std(0).mean()) < 1.1
    # the paper's plain linear output, for contrast: a between-subject spread of a few % of |z|
    torch.manual_seed(0)
    plain = DiffusionAutoencoder(image_size=64, latent_norm="none").eval()
    with torch.no_grad():
        z_plain = plain.encode(phantom_slices)
    assert float(z_plain.std(0).mean() / z_plain.abs().mean()) < 0.2


def test_bf16_autocast_does_not_move_the_predicted_age(phantom_slices):
    """The encoder, z_sem and the head run in float32 under any autocast: bf16 is the U-Net's speed-up only."""
    torch.manual_seed(0)
    model = calibrate(randomise_zero_init(DiffusionAutoencoder(image_size=64)), phantom_slices)
    with torch.no_grad():
        reference = model.predict_age(phantom_slices)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.predict_age(phantom_slices)
            z = model.encode(phantom_slices)
    assert float(reference.std()) > 1.0  # the untrained head does tell these brains apart
    assert z.dtype == torch.float32 and low.dtype == torch.float32
    difference = (low - reference).abs()
    assert float(difference.mean()) <= 0.1 and float(difference.max()) <= 0.5  # years (issue bound)


def test_bf16_autocast_and_channels_last_agree_with_float32():
    torch.manual_seed(0)
    model = randomise_zero_init(DiffusionAutoencoder(**TINY)).eval()
    x0 = torch.rand(2, 1, 16, 16)
    t = torch.tensor([5, 700])
    with torch.no_grad():
        reference = model(x0, x0, t)
        model_cl = model.to(memory_format=torch.channels_last)
        channels_last = model_cl(x0.contiguous(memory_format=torch.channels_last), x0, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model_cl(x0, x0, t)
    torch.testing.assert_close(channels_last["eps"], reference["eps"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(channels_last["age"], reference["age"], atol=1e-4, rtol=1e-5)
    assert low["age"].dtype == torch.float32  # years stay float32 under autocast
    scale = reference["eps"].abs().max()
    assert low["eps"].dtype == torch.bfloat16  # the U-Net does run in bf16
    assert (low["eps"].float() - reference["eps"]).abs().max() < 0.05 * scale
    torch.testing.assert_close(low["age"], reference["age"], atol=1e-4, rtol=1e-5)  # encoder and head in float32


def test_monai_bundle_verify_net_in_out_accepts_the_network(tmp_path):
    meta = {
        "network_data_format": {
            "inputs": {"image": {"num_channels": 1, "spatial_shape": [16, 16], "dtype": "float32"}},
            "outputs": {"pred": {"num_channels": 1, "dtype": "float32"}},
        }
    }
    config = {"network_def": {"_target_": "scripts.networks.DiffusionAutoencoder", **TINY}}
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    (tmp_path / "inference.json").write_text(json.dumps(config))
    verify_net_in_out(
        net_id="network_def", meta_file=str(tmp_path / "metadata.json"), config_file=str(tmp_path / "inference.json")
    )
    # the check can fail: metadata promising two output channels does not fit the (B, 1) age
    meta["network_data_format"]["outputs"]["pred"]["num_channels"] = 2
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="channel"):
        verify_net_in_out(
            net_id="network_def",
            meta_file=str(tmp_path / "metadata.json"),
            config_file=str(tmp_path / "inference.json"),
        )


def test_fast_cpu_dropout_matches_the_stock_semantics():
    from scripts.networks import Dropout

    dropout = Dropout(0.1).train()
    x = torch.ones(4, 8, 64, 64, requires_grad=True)
    torch.manual_seed(0)
    y = dropout(x)
    kept = y != 0
    assert abs(1.0 - float(kept.float().mean()) - 0.1) < 0.003  # 131,072 draws: 4 sigma is 0.0033
    assert torch.allclose(y[kept], torch.tensor(65536 / (65536 - 6554)))  # p rounded to 6554/65536
    assert abs(float(y.mean()) - 1.0) < 0.005  # unbiased
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient is the same mask and scale
    torch.manual_seed(0)
    assert torch.equal(dropout(x), y)  # seeded by the global generator
    bf16 = torch.randn(2, 3, 5, 7).bfloat16()  # odd sizes: the mask is cut from whole 64-bit words
    assert dropout(bf16).dtype == torch.bfloat16 and dropout(bf16).shape == bf16.shape
    assert torch.equal(dropout.eval()(x), x)
