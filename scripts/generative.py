"""What the diffusion autoencoder's latent carries, and whether its decoder uses it.

Notation: ``x_end`` is the paper's x_T, the end of the forward process (for a real image, its DDIM inversion).

The paper's argument rests on z_sem: the U-Net needs it to reconstruct the image and the age head reads it. Every
analysis here therefore comes with a control that would look the same if the decoder ignored z:

* :func:`reconstruct` (paper Figure 4): DDIM-encode x0 to x_end given z and decode back; control: decode each
  x_end with another subject's z (the swapped-z reconstruction must be worse).
* :func:`generate_from_latent`: decode one shared random x_end with every subject's z. Each decode should be
  nearest its own subject (chance is 1/N), and the age head should read the decodes' ages back.
* :func:`interpolate` (paper Figure 3): z linear and x_end spherical between a young and an old brain; the ages
  read from the decoded frames should rise monotonically. Control: the same x_end path with z held at the young
  end, which shows what x_end alone changes.
* :func:`counterfactual_ageing`: z moved along the age head's direction by +/- years, x_end kept; the re-read
  age should follow and the image should change where ageing shows. Control: a random latent direction of
  the same length, which should change neither.
* :func:`latent_statistics`: the between-subject spread of z relative to its size.

Everything runs in eval mode, on the model's device, in float32 unless an autocast dtype is given (DDIM inversion
accumulates rounding error over its steps). The deterministic DDIM maps (:func:`ddim_encode`, :func:`ddim_decode`)
are MONAI's ``DDIMScheduler`` steps run forwards and backwards.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable

import numpy as np
import torch
from monai.networks.schedulers import DDIMScheduler
from torch import nn

from scripts.precision import autocast
from scripts.statistics import pearson_r

__all__ = [
    "counterfactual_ageing",
    "ddim_decode",
    "ddim_encode",
    "ddim_scheduler",
    "generate_from_latent",
    "interpolate",
    "latent_spread",
    "latent_statistics",
    "map_correlation",
    "reconstruct",
    "slerp",
    "spearman_rho",
]


# ---------------------------------------------------------------------------------------------------------------
# Deterministic DDIM maps x0 <-> x_end given z_sem (diffae's "stochastic encoding" and its decoder).
# ---------------------------------------------------------------------------------------------------------------


def ddim_scheduler(
    num_steps: int, num_train_timesteps: int = 1000, schedule: str = "linear_beta", **schedule_args: Any
) -> DDIMScheduler:
    """A MONAI ``DDIMScheduler`` for ``num_steps`` evenly spaced steps that can be run both ways.

    MONAI's ``step`` goes from t to t - T // num_steps, while ``set_timesteps`` spaces the steps by
    (T - 1 - steps_offset) / (num_steps - 1) from T - 1; the offset chosen here makes the two agree
    (t_k = T // num_steps - 1 + k * T // num_steps), so decoding and ``reversed_step`` visit the same noise
    levels and the last step lands on the clean image (alpha = 1). This needs num_steps to divide T. No clipping
    of the predicted x0: it would break invertibility.
    """
    if num_steps < 1 or num_train_timesteps % num_steps:
        raise ValueError(f"num_steps must divide num_train_timesteps={num_train_timesteps}, got {num_steps}")
    stride = num_train_timesteps // num_steps
    scheduler = DDIMScheduler(
        num_train_timesteps=num_train_timesteps,
        schedule=schedule,
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=stride - 1,
        **schedule_args,
    )
    scheduler.set_timesteps(num_steps)
    return scheduler


def _timesteps(t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    return torch.full((like.shape[0],), int(t), dtype=torch.long, device=like.device)


DATA_RANGE = (0.0, 1.0)  # preprocessed slices are scaled to [0, 1]


@torch.no_grad()
def ddim_decode(
    model: nn.Module,
    x_end: torch.Tensor,
    z_sem: torch.Tensor,
    scheduler: DDIMScheduler,
    clip: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Deterministic DDIM sampling (eta = 0) from x_end to x0, conditioned on z_sem.

    ``model.denoise`` is eps_theta; put the model in eval mode first (dropout would make the map random).
    Without ``clip`` this is exactly MONAI's ``DDIMScheduler.step`` (the inverse of :func:`ddim_encode`). With
    ``clip=(low, high)`` every step's predicted x0 is clipped to the data range and the noise re-derived from it
    (the "clipped" DDIM of diffae's sampler and diffusers): decoding from a random x_end, or from an x_end paired
    with another latent, otherwise lets eps errors at high t (amplified 1/sqrt(alpha_T) ~ 150-fold) leave the
    data range and blow up.
    """
    x = x_end
    if clip is None:
        for t in scheduler.timesteps:
            eps = model.denoise(x, _timesteps(t, x), z_sem).to(x.dtype)
            x, _ = scheduler.step(eps, int(t), x)
        return x
    stride = scheduler.num_train_timesteps // scheduler.num_inference_steps
    alphas = scheduler.alphas_cumprod.to(x)
    for t in scheduler.timesteps.tolist():
        alpha, previous = alphas[t], t - stride
        alpha_previous = alphas[previous] if previous >= 0 else scheduler.final_alpha_cumprod.to(x)
        eps = model.denoise(x, _timesteps(t, x), z_sem).to(x.dtype)
        x0 = ((x - (1 - alpha).sqrt() * eps) / alpha.sqrt()).clamp(*clip)
        eps = (x - alpha.sqrt() * x0) / (1 - alpha).sqrt()
        x = alpha_previous.sqrt() * x0 + (1 - alpha_previous).sqrt() * eps
    return x


@torch.no_grad()
def ddim_encode(model: nn.Module, x0: torch.Tensor, z_sem: torch.Tensor, scheduler: DDIMScheduler) -> torch.Tensor:
    """Deterministic DDIM inversion from x0 to x_end given z_sem: the decoder's steps run backwards.

    Decoding steps t_k -> t_(k-1) with eps_theta(x_(t_k), t_k). Inverting that step needs eps at its unknown end
    point; as diffusers' ``DDIMInverseScheduler`` (diffae instead uses the start point's timestep) we use
    eps_theta at the end point's timestep and the current sample, so ``ddim_decode(ddim_encode(x0))`` is exactly
    x0 whenever eps does not depend on x_t, and the round-trip error otherwise comes only from eps's dependence on
    x_t. The first step leaves the clean image (alpha = 1), which MONAI's ``reversed_step`` cannot start from:
    x_(t_0) = sqrt(a_(t_0)) x0 + sqrt(1 - a_(t_0)) eps_theta(x0, t_0). Use the model in eval mode.
    """
    ascending = scheduler.timesteps.flip(0).tolist()
    alpha = scheduler.alphas_cumprod[ascending[0]].to(x0)
    eps = model.denoise(x0, _timesteps(ascending[0], x0), z_sem).to(x0.dtype)
    x = alpha.sqrt() * x0 + (1 - alpha).sqrt() * eps
    for t, t_next in zip(ascending[:-1], ascending[1:]):
        eps = model.denoise(x, _timesteps(t_next, x), z_sem).to(x.dtype)
        x, _ = scheduler.reversed_step(eps, t, x)
    return x


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


@contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode for the duration (dropout would make the DDIM maps random), then the caller's mode back."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _in_batches(function: Callable, batch_size: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Apply ``function`` to matching chunks of ``tensors`` (split on dim 0); concatenate its outputs on the CPU."""
    outputs = [function(*chunk) for chunk in zip(*(t.split(batch_size) for t in tensors))]
    return tuple(torch.cat([out[i].cpu() for out in outputs]) for i in range(len(outputs[0])))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _ddim_maps(
    model: nn.Module, ddim_steps: int, autocast_dtype: torch.dtype | str | None, clip: tuple[float, float] | None = None
):
    """(encode: x0 -> (z_sem, x_end), decode: (z_sem, x_end) -> x0) on the model's device, float32 in and out."""
    scheduler = ddim_scheduler(ddim_steps)
    device = _device(model)

    def encode(x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = x0.to(device, torch.float32)
        with autocast(device, autocast_dtype):
            z_sem = model.encode(x0).float()
            return z_sem, ddim_encode(model, x0, z_sem, scheduler)

    def decode(z_sem: torch.Tensor, x_end: torch.Tensor) -> tuple[torch.Tensor]:
        with autocast(device, autocast_dtype):
            return (ddim_decode(model, x_end.to(device, torch.float32), z_sem.to(device), scheduler, clip),)

    return encode, decode


def _plain(images: torch.Tensor) -> torch.Tensor:
    """A plain float32 CPU tensor (MONAI's MetaTensor bookkeeping is not needed here)."""
    images = images.as_tensor() if hasattr(images, "as_tensor") else images
    return images.detach().cpu().float()


def _ages(model: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The age head's reading of images (the encoder and head run in float32 whatever the autocast)."""
    device = _device(model)
    (ages,) = _in_batches(lambda x: (model.predict_age(x.to(device, torch.float32)),), batch_size, images)
    return ages


def _rms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image root-mean-square difference of two (N, ...) batches."""
    return (a - b).pow(2).flatten(1).mean(1).sqrt()


def relative_rise(own: torch.Tensor | float, other: torch.Tensor | float) -> torch.Tensor:
    """other / own - 1: 0 when equal (including both 0), +inf when only ``own`` is 0."""
    own, other = torch.as_tensor(own, dtype=torch.float64), torch.as_tensor(other, dtype=torch.float64)
    if own > 0:
        return other / own - 1
    return torch.tensor(math.inf if other > 0 else 0.0, dtype=torch.float64)


def spearman_rho(values) -> float:
    """Spearman rank correlation of ``values`` with their position (1 = strictly increasing)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2 or np.ptp(values) == 0:
        return float("nan")
    from scipy import stats

    return float(stats.spearmanr(np.arange(len(values)), values).statistic)


def map_correlation(difference, reference, mask=None) -> float:
    """Pearson correlation of two difference maps (e.g. a counterfactual's and the phantom's true ageing), over
    ``mask`` (default: where either is non-zero). 1 = the model changes the image where and how ageing does."""
    a, b = np.asarray(difference, dtype=np.float64).ravel(), np.asarray(reference, dtype=np.float64).ravel()
    keep = (a != 0) | (b != 0) if mask is None else np.asarray(mask, dtype=bool).ravel()
    a, b = a[keep] - a[keep].mean(), b[keep] - b[keep].mean()
    denominator = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


# ---------------------------------------------------------------------------------------------------------------
# The latent itself
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def latent_spread(
    model: nn.Module, images: torch.Tensor, batch_size: int = 32, autocast_dtype: torch.dtype | str | None = None
) -> torch.Tensor:
    """Per-dimension standard deviation of z_sem over a cohort of images: the unit latent moves are measured in."""
    images = _plain(images)
    if len(images) < 2:
        raise ValueError(f"the spread of z_sem needs at least 2 images, got {len(images)}")
    device = _device(model)
    with _eval_mode(model):
        latents = []
        for chunk in images.split(batch_size):
            with autocast(device, autocast_dtype):
                latents.append(model.encode(chunk.to(device)).float().cpu())
    return torch.cat(latents).std(0).clamp_min(1e-12)


@torch.no_grad()
def latent_statistics(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> dict[str, float]:
    """How much z_sem varies between subjects relative to its size, in eval mode.

    ``between_subject_sd``: the per-dimension standard deviation over the images, averaged over dimensions;
    ``mean_abs``: mean |z|; ``spread_ratio``: their ratio (about 1.25 for a standardised Gaussian latent, ~0.01
    for a latent whose between-subject differences vanish against a constant offset).
    """
    images = _plain(images)
    spread = latent_spread(model, images, batch_size)
    device = _device(model)
    with _eval_mode(model):
        z = torch.cat([model.encode(chunk.to(device)).float().cpu() for chunk in images.split(batch_size)])
    mean_abs = float(z.abs().mean())
    sd = float(spread.mean())
    return {"between_subject_sd": sd, "mean_abs": mean_abs, "spread_ratio": sd / mean_abs if mean_abs else math.nan}


# ---------------------------------------------------------------------------------------------------------------
# Reconstructions (Figure 4) with the swapped-z control
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def reconstruct(
    model: nn.Module,
    images: torch.Tensor,
    ddim_steps: int = 50,
    batch_size: int = 8,
    autocast_dtype: torch.dtype | str | None = None,
    control: bool = True,
    clip: tuple[float, float] | None = None,
) -> dict[str, torch.Tensor]:
    """Encode images to (z_sem, x_end) and decode them back: the paper's Figure 4, with a swapped-z control.

    x_end comes from the deterministic DDIM inversion of x0 given z_sem (:func:`ddim_encode`), so a decoder that
    ignored z would still reconstruct from x_end alone. The control decodes every image's x_end with the next
    image's z_sem (``swapped_reconstructions``; image i gets z of image i + 1, cyclically): only if the decoder
    uses z is it worse than the reconstruction with the image's own z. ``swap_penalty`` is their relative
    difference in mean MSE (0: z unused); ``median_swap_ratio`` the median over images of swapped / own MSE, which
    a few exploding decodes cannot dominate. Decoding is the exact inverse of the encoding (``clip`` None) by
    default, so the own-z reconstruction measures the model, not the sampler.

    Returns CPU tensors ``z_sem`` (N, z_dim), ``x_end`` and ``reconstructions`` (shape of ``images``), per-image
    ``mse`` and ``mae`` in the images' intensity units, and with the control (N >= 2) ``swapped_reconstructions``,
    ``swapped_mse``, ``swapped_mae`` and the scalar ``swap_penalty``.
    """
    images = _plain(images)
    with _eval_mode(model):
        encode, decode = _ddim_maps(model, ddim_steps, autocast_dtype, clip)
        z_sem, x_end = _in_batches(encode, batch_size, images)
        (reconstructions,) = _in_batches(decode, batch_size, z_sem, x_end)
        result = {"z_sem": z_sem, "x_end": x_end, "reconstructions": reconstructions}
        originals = images
        difference = reconstructions - originals
        result.update(mse=difference.pow(2).flatten(1).mean(1), mae=difference.abs().flatten(1).mean(1))
        if control and len(images) > 1:
            (swapped,) = _in_batches(decode, batch_size, z_sem.roll(-1, dims=0), x_end)
            swapped_difference = swapped - originals
            result.update(
                swapped_reconstructions=swapped,
                swapped_mse=swapped_difference.pow(2).flatten(1).mean(1),
                swapped_mae=swapped_difference.abs().flatten(1).mean(1),
            )
            result["swap_penalty"] = relative_rise(result["mse"].mean(), result["swapped_mse"].mean())
            result["median_swap_ratio"] = (result["swapped_mse"] / result["mse"].clamp_min(1e-12)).median()
    return result


# ---------------------------------------------------------------------------------------------------------------
# Generation from z alone
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_from_latent(
    model: nn.Module,
    images: torch.Tensor,
    ddim_steps: int = 50,
    batch_size: int = 8,
    autocast_dtype: torch.dtype | str | None = None,
    seed: int = 0,
    clip: tuple[float, float] | None = DATA_RANGE,
) -> dict[str, Any]:
    """Decode one shared random x_end with every image's z_sem: what z carries on its own.

    With x_end shared, any difference between the decodes comes from z. ``distances[i, j]`` is the RMS difference
    between decode i and original j; ``nearest`` is the original each decode is closest to, and
    ``nearest_own_share`` the share of decodes closest to their own subject (chance: 1/N). ``decoded_age`` is the
    age head's reading of each decode and ``predicted_age`` its reading of the original; ``age_r`` their Pearson
    correlation (the decodes carry the age the model saw). Decoding from random noise uses clipped DDIM (see
    :func:`ddim_decode`).
    """
    images = _plain(images)
    if len(images) < 2:
        raise ValueError(f"generation from z needs at least 2 images to compare, got {len(images)}")
    device = _device(model)
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn((1, *images.shape[1:]), generator=generator)
    with _eval_mode(model):
        _, decode = _ddim_maps(model, ddim_steps, autocast_dtype, clip)
        (z_sem,) = _in_batches(lambda x: (model.encode(x.to(device, torch.float32)).float(),), batch_size, images)
        (decodes,) = _in_batches(decode, batch_size, z_sem, shared.expand(len(images), *shared.shape[1:]))
        predicted_age = _ages(model, images, batch_size)
        decoded_age = _ages(model, decodes, batch_size)
    originals = images
    distances = torch.cdist(decodes.flatten(1).double(), originals.flatten(1).double()) / math.sqrt(
        originals[0].numel()
    )
    nearest = distances.argmin(dim=1)

    return {
        "z_sem": z_sem,
        "x_end": shared,
        "decodes": decodes,
        "distances": distances.float(),
        "nearest": nearest,
        "nearest_own_share": float((nearest == torch.arange(len(images))).float().mean()),
        "chance_share": 1.0 / len(images),
        "predicted_age": predicted_age,
        "decoded_age": decoded_age,
        "age_r": pearson_r(decoded_age, predicted_age),
    }


# ---------------------------------------------------------------------------------------------------------------
# Interpolation (Figure 3) with the x_end-only control
# ---------------------------------------------------------------------------------------------------------------


def slerp(start: torch.Tensor, end: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between two tensors (each one vector) at ``weights`` in [0, 1]; (K, *start.shape).

    Used for x_end as in diffae: Gaussian noise lives near a sphere, and a straight line between two noise samples
    would pass through lower-norm, atypical noise half-way. Computed in float64; (anti)parallel ends fall back to
    the straight line.
    """
    a, b = start.flatten().double(), end.flatten().double()
    w = torch.as_tensor(weights, dtype=torch.float64, device=a.device)[:, None]
    theta = torch.arccos((a @ b / (a.norm() * b.norm())).clamp(-1.0, 1.0))
    if torch.sin(theta) < 1e-6:
        mixed = (1 - w) * a + w * b
    else:
        mixed = (torch.sin((1 - w) * theta) * a + torch.sin(w * theta) * b) / torch.sin(theta)
    return mixed.reshape(-1, *start.shape).to(start.dtype)


@torch.no_grad()
def interpolate(
    model: nn.Module,
    young: torch.Tensor,
    old: torch.Tensor,
    n_frames: int = 7,
    ddim_steps: int = 50,
    batch_size: int = 8,
    autocast_dtype: torch.dtype | str | None = None,
    control: bool = True,
    clip: tuple[float, float] | None = DATA_RANGE,
) -> dict[str, Any]:
    """Decode a path between two images, z_sem linearly and x_end spherically interpolated: the paper's Figure 3.

    ``young``/``old`` are single images (C, H, W). The first and last frames are the two images' reconstructions.
    ``predicted_age`` is the age head applied to each frame's interpolated z_sem (what the model believes along
    the path); ``reencoded_age`` is the age read from the decoded frame itself, which says whether the ageing
    shows in the image and not only in the latent; ``monotonic`` says whether it never falls along the path and
    ``spearman`` is its rank correlation with the position. The control (``control_frames``,
    ``control_reencoded_age``) follows the same x_end path with z held at the young end: what x_end alone changes.
    Returns CPU tensors ``weights`` (K,), ``z_sem``, ``x_end``, ``frames`` (K, C, H, W) and the ages (K,). Frames
    between the ends pair latents and noise that no image was inverted to: decoded with clipped DDIM.
    """
    if n_frames < 2:
        raise ValueError(f"an interpolation needs at least 2 frames, got {n_frames}")
    device = _device(model)
    young, old = _plain(young), _plain(old)
    with _eval_mode(model):
        encode, decode = _ddim_maps(model, ddim_steps, autocast_dtype, clip)
        ends_z, ends_x_end = _in_batches(encode, batch_size, torch.stack([young, old]))
        weights = torch.linspace(0.0, 1.0, n_frames)
        z_sem = torch.lerp(ends_z[0], ends_z[1], weights[:, None])
        x_end = slerp(ends_x_end[0], ends_x_end[1], weights)
        (frames,) = _in_batches(decode, batch_size, z_sem, x_end)
        predicted_age = model.age_head(z_sem.to(device)).cpu()
        reencoded_age = _ages(model, frames, batch_size)
        result = {
            "weights": weights,
            "z_sem": z_sem,
            "x_end": x_end,
            "frames": frames,
            "predicted_age": predicted_age,
            "reencoded_age": reencoded_age,
            "monotonic": bool((reencoded_age.diff() >= 0).all()),
            "spearman": spearman_rho(reencoded_age.numpy()),
        }
        if control:
            (control_frames,) = _in_batches(decode, batch_size, ends_z[:1].expand(n_frames, -1), x_end)
            result.update(control_frames=control_frames, control_reencoded_age=_ages(model, control_frames, batch_size))
    return result


# ---------------------------------------------------------------------------------------------------------------
# Counterfactual ageing with the random-direction control
# ---------------------------------------------------------------------------------------------------------------


def age_direction_shift(
    age_head: nn.Module,
    z_sem: torch.Tensor,
    target_age: float,
    latent_scale: torch.Tensor | None = None,
    max_iterations: int = 50,
    tolerance: float = 0.05,
) -> tuple[torch.Tensor, float]:
    """Move ``z_sem`` (z_dim,) along the direction the age head reads until the head says ``target_age``.

    Newton steps along the head's gradient g, re-linearised at every step because the head (ReLU) is only
    piecewise linear: ``z <- z + (target - head(z)) * d / (g . d)`` with ``d = latent_scale**2 * g``, the
    gradient measured in units of how much each latent dimension varies between subjects (``latent_scale``: the
    per-dimension standard deviation of z_sem over a cohort; None: raw units). Returns the shifted latent and the
    age the head gives it (short of the target where the head saturates).
    """
    z = z_sem.detach().clone().float()[None]
    scale2 = None if latent_scale is None else latent_scale.detach().float().to(z.device).pow(2)[None]
    with torch.enable_grad():
        for _ in range(max_iterations):
            z.requires_grad_(True)
            age = age_head(z)[0]
            if abs(float(age.detach()) - target_age) <= tolerance:
                break
            (gradient,) = torch.autograd.grad(age, z)
            direction = gradient if scale2 is None else scale2 * gradient
            slope = float((gradient * direction).sum())
            if slope < 1e-12:  # flat region: the head cannot be moved from here
                break
            z = (z + (target_age - age.detach()) * direction / slope).detach()
        z = z.detach()
    return z[0], float(age_head(z)[0])


@torch.no_grad()
def counterfactual_ageing(
    model: nn.Module,
    image: torch.Tensor,
    deltas=(-20, -10, 0, 10, 20),
    ddim_steps: int = 50,
    batch_size: int = 8,
    autocast_dtype: torch.dtype | str | None = None,
    latent_scale: torch.Tensor | None = None,
    control: bool = True,
    seed: int = 0,
    clip: tuple[float, float] | None = DATA_RANGE,
) -> dict[str, Any]:
    """The same brain decoded younger and older: z_sem moved along the age head's direction, x_end kept.

    ``image`` (C, H, W) is encoded once (z_sem and its DDIM-inverted x_end); for each ``delta`` (years relative to
    the model's own prediction for the image) z_sem is shifted with :func:`age_direction_shift` and decoded with
    the subject's x_end, so what changes between frames is only what the latent change means. ``differences`` are
    each frame minus the unshifted (delta 0) decoding; ``reencoded_age`` re-reads each decoded frame through
    encoder and head: whether the change is visible to the model. The control moves z by the same distance
    (in the same units) along one random direction (``seed``), signed as the delta: ``control_frames``,
    ``control_differences``, ``control_reencoded_age``; a latent that encodes age specifically changes the
    re-read age along the age direction and not along the random one.
    Returns CPU tensors ``deltas``, ``target_age``, ``latent_age`` (what the head gives the shifted z),
    ``reencoded_age``, ``latent_shift`` (|dz|, in units of ``latent_scale`` when given), ``frames`` and
    ``differences`` (K, C, H, W). Shifted latents are decoded with clipped DDIM (the delta-0 frame too, so all
    frames share one decoder).
    """
    image = _plain(image)
    deltas = torch.as_tensor(deltas, dtype=torch.float32)
    if deltas.ndim != 1 or len(deltas) == 0:
        raise ValueError("deltas must be a non-empty list of years")
    device = _device(model)
    scale = torch.ones(1) if latent_scale is None else latent_scale.detach().float().cpu()
    with _eval_mode(model):
        encode, decode = _ddim_maps(model, ddim_steps, autocast_dtype, clip)
        z0, x_end = _in_batches(encode, batch_size, image[None])
        head = model.age_head
        predicted = float(head(z0.to(device))[0])
        shifted = [age_direction_shift(head, z0[0].to(device), predicted + float(d), latent_scale) for d in deltas]
        z_sem = torch.stack([z for z, _ in shifted]).cpu()
        x_end_k = x_end.expand(len(deltas), *x_end.shape[1:])
        (frames,) = _in_batches(decode, batch_size, z_sem, x_end_k)
        zero = torch.nonzero(deltas == 0)
        baseline = frames[int(zero[0])] if len(zero) else decode(z0, x_end)[0].cpu()[0]
        latent_shift = ((z_sem - z0) / scale).norm(dim=1)
        result = {
            "deltas": deltas,
            "predicted_age": torch.tensor(predicted),
            "target_age": predicted + deltas,
            "latent_age": torch.tensor([age for _, age in shifted]),
            "reencoded_age": _ages(model, frames, batch_size),
            "latent_shift": latent_shift,
            "frames": frames,
            "differences": frames - baseline,
        }
        if control:
            generator = torch.Generator().manual_seed(seed)
            direction = torch.randn(z0.shape[1], generator=generator)
            direction = direction / direction.norm()
            control_z = z0 + (torch.sign(deltas) * latent_shift)[:, None] * direction[None] * scale
            (control_frames,) = _in_batches(decode, batch_size, control_z, x_end_k)
            result.update(
                control_frames=control_frames,
                control_differences=control_frames - baseline,
                control_latent_age=head(control_z.to(device)).cpu(),
                control_reencoded_age=_ages(model, control_frames, batch_size),
            )
    return result
