"""Generative analyses: DDIM maps, reconstructions with the swapped-z control, generation from z alone,
interpolation with the x_end-only control, counterfactual ageing with the random-direction control."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.networks.schedulers import DDPMScheduler

# tests/ is on sys.path under pytest; one_thread: the autouse single-thread fixture, tiny tensors gain nothing from threads
from test_engine import TINY, one_thread, tiny_model  # noqa: F401

from scripts import generative
from scripts.generative import ddim_decode, ddim_encode, ddim_scheduler
from scripts.networks import DiffusionAutoencoder

# ------------------------------------------------------------------------------------------------------------- DDIM


class TimeOnlyNoise(torch.nn.Module):
    """eps(x_t, t, z) that ignores x_t: DDIM inversion is then exact, which checks the timestep bookkeeping."""

    def denoise(self, x_t, t, z):
        t = t.float()[:, None, None, None]
        wave = torch.linspace(-1.0, 1.0, x_t.shape[-1])
        eps = torch.sin(t / 37.0) * z.mean(1)[:, None, None, None] + torch.cos(t / 100.0) * wave
        return eps.expand_as(x_t)


def test_ddim_scheduler_steps_are_consistent_both_ways():
    scheduler = ddim_scheduler(10)
    assert scheduler.timesteps.tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert not scheduler.clip_sample
    with pytest.raises(ValueError):
        ddim_scheduler(7)


@pytest.mark.parametrize("num_steps", [1, 10, 50])
def test_ddim_round_trip_is_exact_when_eps_ignores_x_t(num_steps):
    scheduler = ddim_scheduler(num_steps)
    x0 = torch.rand(2, 1, 16, 16)
    z = torch.randn(2, 16)
    x_end = ddim_encode(TimeOnlyNoise(), x0, z, scheduler)
    assert x_end.std() > 0.3  # really noised, not a copy of x0
    torch.testing.assert_close(ddim_decode(TimeOnlyNoise(), x_end, z, scheduler), x0, atol=2e-4, rtol=0)


def test_clipped_ddim_keeps_predictions_in_the_data_range_and_is_exact_for_a_perfect_denoiser():
    scheduler = ddim_scheduler(10)
    x0 = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(5))

    class Perfect(torch.nn.Module):  # knows x0: eps from the forward-process identity
        def denoise(self, x_t, t, z):
            alpha = scheduler.alphas_cumprod[t][:, None, None, None]
            return (x_t - alpha.sqrt() * x0) / (1 - alpha).sqrt()

    class Wild(torch.nn.Module):  # wrong by a lot at every step
        def denoise(self, x_t, t, z):
            return 50.0 * torch.ones_like(x_t)

    z = torch.zeros(2, 4)
    torch.testing.assert_close(ddim_decode(Perfect(), noise, z, scheduler, clip=(0.0, 1.0)), x0, atol=1e-4, rtol=0)
    unclipped = ddim_decode(Wild(), noise, z, scheduler)
    clipped = ddim_decode(Wild(), noise, z, scheduler, clip=(0.0, 1.0))
    assert unclipped.abs().max() > 10  # eps errors at high t blow the sample up
    assert clipped.min() >= -1e-5 and clipped.max() <= 1 + 1e-5  # the last step returns the clipped x0


def test_ddim_with_the_untrained_unet_is_an_exact_scaling_and_deterministic():
    torch.manual_seed(0)
    model = DiffusionAutoencoder(**TINY).eval()  # zero-initialised output: eps_hat = 0
    scheduler = ddim_scheduler(20)
    x0 = torch.rand(2, 1, 16, 16)
    z = model.encode(x0)
    x_end = ddim_encode(model, x0, z, scheduler)
    torch.testing.assert_close(x_end, scheduler.alphas_cumprod[999].sqrt() * x0)
    torch.testing.assert_close(ddim_decode(model, x_end, z, scheduler), x0, atol=1e-5, rtol=1e-5)

    trained_like = tiny_model().eval()
    z = trained_like.encode(x0)
    first = ddim_encode(trained_like, x0, z, scheduler)
    assert torch.equal(first, ddim_encode(trained_like, x0, z, scheduler))
    assert torch.equal(ddim_decode(trained_like, first, z, scheduler), ddim_decode(trained_like, first, z, scheduler))


# ---------------------------------------------------------------------------------------------------- reconstruction


class MeanIntensityAge(torch.nn.Module):
    """An 'age head' reading 100 x the mean of z."""

    def forward(self, z):
        return 100.0 * z.mean(1)


class LatentIsTheImage(torch.nn.Module):
    """A diffusion autoencoder whose z_sem is the image itself and whose decoder predicts the noise exactly from it:
    the ideal of a decoder that uses z. DDIM then decodes any x_end to the image z describes."""

    def __init__(self):
        super().__init__()
        self.alphas = DDPMScheduler(1000).alphas_cumprod
        self.age_head = MeanIntensityAge()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # gives the model a device

    def encode(self, x0):
        return x0.flatten(1)

    def denoise(self, x_t, t, z):
        alpha = self.alphas[t][:, None, None, None]
        return (x_t - alpha.sqrt() * z.view_as(x_t)) / (1 - alpha).sqrt()

    def predict_age(self, x0):
        return self.age_head(self.encode(x0))


def distinct_images(n: int) -> torch.Tensor:
    """Images that differ by more than their noise: a brightness ramp across the set, plus texture."""
    return torch.linspace(0.2, 0.8, n)[:, None, None, None] + 0.05 * images(n, seed=5)


def test_the_swapped_z_control_tells_a_decoder_that_uses_z_from_one_that_ignores_it():
    x0 = distinct_images(4)
    uses = generative.reconstruct(LatentIsTheImage(), x0, ddim_steps=10)
    torch.testing.assert_close(uses["reconstructions"], x0, atol=1e-4, rtol=0)  # own z: the image
    torch.testing.assert_close(uses["swapped_reconstructions"], x0.roll(-1, 0), atol=1e-4, rtol=0)  # next image's
    assert float(uses["swap_penalty"]) > 100
    ignores = generative.reconstruct(DiffusionAutoencoder(**TINY), x0, ddim_steps=10)  # eps_hat = 0, any z
    assert torch.equal(ignores["swapped_reconstructions"], ignores["reconstructions"])
    assert float(ignores["swap_penalty"]) == 0.0


def test_generation_from_z_alone_finds_each_subject_only_when_z_carries_it():
    x0 = distinct_images(5)
    result = generative.generate_from_latent(LatentIsTheImage(), x0, ddim_steps=10, seed=3)
    torch.testing.assert_close(result["decodes"], x0, atol=1e-4, rtol=0)  # one shared x_end, each z: each image
    assert result["nearest"].tolist() == [0, 1, 2, 3, 4] and result["nearest_own_share"] == 1.0
    assert result["chance_share"] == 0.2 and result["x_end"].shape == (1, 1, 16, 16)
    assert result["age_r"] == pytest.approx(1.0, abs=1e-6)  # the decodes carry the ages the head read
    torch.testing.assert_close(result["distances"].diagonal(), torch.zeros(5), atol=1e-4, rtol=0)
    ignores = generative.generate_from_latent(DiffusionAutoencoder(**TINY), x0, ddim_steps=10, seed=3)
    assert len(set(ignores["nearest"].tolist())) == 1  # every decode is the same image
    assert ignores["nearest_own_share"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="at least 2"):
        generative.generate_from_latent(LatentIsTheImage(), x0[:1])


def test_latent_statistics_and_rank_helpers():
    model = LatentIsTheImage()
    x0 = distinct_images(6)
    stats = generative.latent_statistics(model, x0)
    z = x0.flatten(1)
    assert stats["between_subject_sd"] == pytest.approx(float(z.std(0).mean()), rel=1e-5)
    assert stats["spread_ratio"] == pytest.approx(stats["between_subject_sd"] / float(z.abs().mean()), rel=1e-6)
    assert generative.spearman_rho([1.0, 2.0, 2.5, 7.0]) == 1.0
    assert generative.spearman_rho([1.0, 3.0, 2.0]) == pytest.approx(0.5)
    assert math.isnan(generative.spearman_rho([1.0, 1.0]))
    reference = np.array([[0.0, -1.0], [2.0, 0.5]])
    assert generative.map_correlation(3 * reference + 0.0, reference) == pytest.approx(1.0)
    assert generative.map_correlation(-reference, reference) == pytest.approx(-1.0)
    assert generative.map_correlation(reference, reference, mask=[[True, True], [False, False]]) == pytest.approx(1.0)


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_reconstruct_returns_the_ddim_latents_and_errors_deterministically():
    model = tiny_model().train()
    x0 = images(3)
    first = generative.reconstruct(model, x0, ddim_steps=10, batch_size=2)
    assert model.training  # the caller's mode comes back
    second = generative.reconstruct(model, x0, ddim_steps=10, batch_size=2)
    assert set(first) == {
        "z_sem",
        "x_end",
        "reconstructions",
        "mse",
        "mae",
        "swapped_reconstructions",
        "swapped_mse",
        "swapped_mae",
        "swap_penalty",
        "median_swap_ratio",
    }
    for key, value in first.items():
        assert torch.equal(value, second[key]), key
    assert set(generative.reconstruct(model, x0, ddim_steps=2, control=False)) == {
        "z_sem",
        "x_end",
        "reconstructions",
        "mse",
        "mae",
    }

    assert first["z_sem"].shape == (3, TINY["z_dim"])
    assert first["x_end"].shape == first["reconstructions"].shape == x0.shape
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(first["z_sem"], model.encode(x0))
        z_sem, scheduler = first["z_sem"], ddim_scheduler(10)
        # batch by batch as reconstruct ran it: float32 kernels round differently for other batch shapes
        x_end = torch.cat(
            [ddim_encode(model, x0[:2], z_sem[:2], scheduler), ddim_encode(model, x0[2:], z_sem[2:], scheduler)]
        )
        torch.testing.assert_close(first["x_end"], x_end)
    difference = first["reconstructions"] - x0
    torch.testing.assert_close(first["mse"], (difference**2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(first["mae"], difference.abs().mean(dim=(1, 2, 3)))
    assert (first["mse"] > 1e-6).all()  # a random eps_theta does depend on x_t: the round trip is not exact
    # the control: each image's x_end decoded with the next image's z
    with torch.no_grad():
        swapped = torch.cat(
            [
                ddim_decode(model, first["x_end"][:2], z_sem.roll(-1, 0)[:2], scheduler),
                ddim_decode(model, first["x_end"][2:], z_sem.roll(-1, 0)[2:], scheduler),
            ]
        )
    torch.testing.assert_close(first["swapped_reconstructions"], swapped)
    torch.testing.assert_close(first["swapped_mse"], ((swapped - x0) ** 2).mean(dim=(1, 2, 3)))
    assert float(first["swap_penalty"]) == pytest.approx(
        float(first["swapped_mse"].double().mean() / first["mse"].double().mean() - 1), abs=1e-6
    )


def test_reconstruct_is_exact_when_eps_ignores_x_t(monkeypatch):
    model = tiny_model()
    monkeypatch.setattr(model, "denoise", TimeOnlyNoise().denoise)
    x0 = images(2)
    result = generative.reconstruct(model, x0, ddim_steps=20)
    assert result["x_end"].std() > 0.3  # really noised
    torch.testing.assert_close(result["reconstructions"], x0, atol=2e-4, rtol=0)
    assert result["mae"].max() < 1e-4 and result["mse"].max() < 1e-8


# ----------------------------------------------------------------------------------------------------- interpolation


def test_interpolation_ends_are_the_reconstructions_and_predictions_of_the_two_images():
    model = tiny_model(seed=3)
    x0 = images(2, seed=1)
    # one image per pass in both calls: float32 kernels round differently for other batch shapes, and a random
    # eps_theta amplifies such differences over the DDIM steps
    result = generative.interpolate(model, x0[0], x0[1], n_frames=5, ddim_steps=10, batch_size=1)
    assert result["frames"].shape == (5, 1, 16, 16)
    assert result["weights"].tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]

    ends = generative.reconstruct(model, x0, ddim_steps=10, batch_size=1, clip=generative.DATA_RANGE)
    for frame, end in ((0, 0), (-1, 1)):
        assert torch.equal(result["z_sem"][frame], ends["z_sem"][end])
        torch.testing.assert_close(result["x_end"][frame], ends["x_end"][end], atol=0, rtol=1e-7)
        torch.testing.assert_close(result["frames"][frame], ends["reconstructions"][end])
    with torch.no_grad():
        torch.testing.assert_close(result["predicted_age"][[0, -1]], model.eval().predict_age(x0))
        torch.testing.assert_close(result["reencoded_age"], model.predict_age(result["frames"]))
    assert abs(float(result["predicted_age"][0] - result["predicted_age"][-1])) > 1e-3  # the two ends differ

    # z_sem on the straight line, x_end spherically interpolated between the ends' x_end
    torch.testing.assert_close(result["z_sem"][2], (ends["z_sem"][0] + ends["z_sem"][1]) / 2)
    torch.testing.assert_close(result["x_end"], generative.slerp(ends["x_end"][0], ends["x_end"][1], result["weights"]))

    # the control: the same x_end path decoded with the young end's z throughout
    assert result["control_frames"].shape == result["frames"].shape
    torch.testing.assert_close(result["control_frames"][0], result["frames"][0])
    with torch.no_grad():
        torch.testing.assert_close(result["control_reencoded_age"], model.predict_age(result["control_frames"]))
    ages = result["reencoded_age"]
    assert result["monotonic"] == bool((ages.diff() >= 0).all())
    assert result["spearman"] == pytest.approx(generative.spearman_rho(ages.numpy()))

    with pytest.raises(ValueError, match="at least 2 frames"):
        generative.interpolate(model, x0[0], x0[1], n_frames=1)


def test_interpolation_between_a_dark_and_a_bright_brain_reads_rising_ages_with_a_latent_that_carries_them():
    x0 = distinct_images(2)
    result = generative.interpolate(LatentIsTheImage(), x0[0], x0[1], n_frames=5, ddim_steps=10)
    assert result["monotonic"] and result["spearman"] == pytest.approx(1.0)
    # x_end alone (z held at the dark end) leaves the decoded brain where it was
    torch.testing.assert_close(
        result["control_reencoded_age"], result["reencoded_age"][:1].expand(5), atol=1e-2, rtol=0
    )


def test_slerp_walks_the_great_circle_at_constant_norm():
    start = torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(0))
    end = torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(1))
    end = end * start.norm() / end.norm()
    weights = torch.linspace(0, 1, 6)
    path = generative.slerp(start, end, weights)
    assert path.shape == (6, 1, 8, 8) and torch.equal(path[0], start)
    torch.testing.assert_close(path[-1], end)
    theta = math.acos(float((start * end).sum() / start.norm() ** 2))
    for point, weight in zip(path, weights.tolist()):
        assert float(point.norm()) == pytest.approx(float(start.norm()), rel=1e-5)
        cosine = float((point * start).sum() / start.norm() ** 2)
        assert math.acos(min(cosine, 1.0)) == pytest.approx(weight * theta, abs=1e-3)
    # parallel ends: the straight line (no division by sin(0))
    torch.testing.assert_close(generative.slerp(start, 2 * start, weights)[2], 1.4 * start)


# ------------------------------------------------------------------------------------------------ counterfactual ageing


def test_age_direction_shift_reaches_the_target_along_the_head_gradient():
    model = tiny_model(seed=4).eval()
    z0 = torch.randn(TINY["z_dim"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        start = float(model.age_head(z0[None])[0])
    for delta in (-15.0, 0.0, 12.0):
        z, age = generative.age_direction_shift(model.age_head, z0, start + delta)
        with torch.no_grad():
            assert float(model.age_head(z[None])[0]) == pytest.approx(age)
        assert age == pytest.approx(start + delta, abs=0.05)
        if delta == 0.0:
            assert torch.equal(z, z0)  # already there: no move
    # a first step is along the gradient: the shift is parallel to it
    z0.requires_grad_(True)
    (gradient,) = torch.autograd.grad(model.age_head(z0[None])[0], z0)
    z, _ = generative.age_direction_shift(model.age_head, z0.detach(), start + 0.01, max_iterations=1, tolerance=0)
    cosine = torch.nn.functional.cosine_similarity(z - z0.detach(), gradient, dim=0)
    assert float(cosine) == pytest.approx(1.0, abs=1e-5)
    # with a latent scale the step follows scale^2 * gradient: dimensions that vary more between subjects move more
    scale = torch.linspace(0.1, 2.0, TINY["z_dim"])
    z, age = generative.age_direction_shift(
        model.age_head, z0.detach(), start + 0.01, scale, max_iterations=1, tolerance=0
    )
    cosine = torch.nn.functional.cosine_similarity(z - z0.detach(), scale**2 * gradient, dim=0)
    assert float(cosine) == pytest.approx(1.0, abs=1e-5)
    z, age = generative.age_direction_shift(model.age_head, z0.detach(), start + 8.0, scale)
    assert age == pytest.approx(start + 8.0, abs=0.05)


def test_latent_spread_is_the_per_dimension_std_of_z_sem():
    model = tiny_model(seed=6)
    x0 = images(5, seed=3)
    with torch.no_grad():
        expected = model.eval().encode(x0).std(0)
    torch.testing.assert_close(generative.latent_spread(model, x0, batch_size=2), expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="at least 2 images"):
        generative.latent_spread(model, x0[:1])


def test_counterfactual_ageing_keeps_x_t_and_moves_only_the_latent_age():
    model = tiny_model(seed=5)
    x0 = images(1, seed=2)[0]
    result = generative.counterfactual_ageing(model, x0, deltas=[-10, 0, 10], ddim_steps=5, batch_size=1)
    assert result["frames"].shape == result["differences"].shape == (3, 1, 16, 16)
    torch.testing.assert_close(result["target_age"], result["predicted_age"] + torch.tensor([-10.0, 0.0, 10.0]))
    torch.testing.assert_close(result["latent_age"], result["target_age"], atol=0.05, rtol=0)
    # delta 0 is the plain reconstruction and the zero point of the difference maps
    reconstruction = generative.reconstruct(model, x0[None], ddim_steps=5, batch_size=1, clip=generative.DATA_RANGE)[
        "reconstructions"
    ][0]
    torch.testing.assert_close(result["frames"][1], reconstruction)
    assert result["latent_shift"][1] == 0 and torch.count_nonzero(result["differences"][1]) == 0
    assert result["latent_shift"][0] > 0 and result["differences"][0].abs().max() > 0
    with torch.no_grad():
        torch.testing.assert_close(result["reencoded_age"], model.eval().predict_age(result["frames"]))
    # the control moves z the same distance along one random direction, signed like the delta
    control_shift = (result["control_frames"] - result["frames"]).abs().flatten(1).sum(1)
    assert control_shift[1] == 0 and torch.count_nonzero(result["control_differences"][1]) == 0
    with torch.no_grad():
        z0 = model.encode(x0[None])[0]
        torch.testing.assert_close(result["control_latent_age"][1], model.age_head(z0[None])[0])
    assert set(result) >= {"control_frames", "control_differences", "control_reencoded_age", "control_latent_age"}


def test_counterfactual_control_moves_as_far_as_the_age_direction_but_not_along_it():
    """With an 'age head' reading the mean of z, the age direction is uniform brightening; a random direction of
    the same length changes the mean (and so the re-read age) far less."""
    model = LatentIsTheImage()
    x0 = distinct_images(2)[0]
    result = generative.counterfactual_ageing(model, x0, deltas=[-10, 0, 10], ddim_steps=10, seed=1, clip=None)
    torch.testing.assert_close(result["latent_age"], result["target_age"], atol=0.05, rtol=0)
    torch.testing.assert_close(result["reencoded_age"], result["target_age"], atol=0.05, rtol=0)  # visible in x0
    control_moves = (result["control_reencoded_age"] - result["reencoded_age"][1]).abs()
    assert float(control_moves.max()) < 0.2 * 10
    control_distance = (result["control_frames"] - result["frames"][1]).flatten(1).norm(dim=1)
    torch.testing.assert_close(control_distance, result["latent_shift"], atol=1e-3, rtol=1e-3)  # same length
