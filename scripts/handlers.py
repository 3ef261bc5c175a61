"""Ignite handlers of training and validation: loss terms and their NaN guard, exact BatchNorm statistics,
the foreach EMA, gradient clipping, and the "decoder uses z" probe.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import torch
from ignite.engine import Events
from ignite.handlers import EMAHandler
from monai.engines.utils import IterationEvents
from monai.networks.schedulers import Scheduler
from torch import nn

from scripts.cli import BundleError
from scripts.losses import SemiSupervisedLoss
from scripts.networks import unwrap
from scripts.precision import autocast
from scripts.prepare_batch import batch_ages, batch_images
from scripts.slices import centre_level

__all__ = [
    "ForeachEMAHandler",
    "GradientClipping",
    "LossComponentsHandler",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "PreciseBatchNorm",
    "WrongLatentPenalty",
    "loss_log_transform",
    "wrong_latent_penalty",
]


class LossComponentsHandler:
    """Copy the loss terms into ``engine.state.output`` as ``loss_noise``, ``loss_age`` and ``n_labelled``.

    Runs at ``IterationEvents.LOSS_COMPLETED``, before the trainer decollates the output, so the values are
    replicated into every item like ``loss`` is and any handler can log them (see ``loss_log_transform``).
    """

    def __init__(self, loss_function: SemiSupervisedLoss | None = None) -> None:
        self.loss_function = loss_function

    def attach(self, engine) -> None:
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)

    def __call__(self, engine) -> None:
        loss_function = self.loss_function or engine.loss_function
        components = loss_function.components
        engine.state.output["loss_noise"] = components["noise"]
        engine.state.output["loss_age"] = components["age"]
        engine.state.output["n_labelled"] = components["labelled"]


class NonFiniteLossError(BundleError, RuntimeError):
    """The training loss became NaN or infinite; raised before the weights were updated."""


class NonFiniteLossGuard:
    """Stop training at the first NaN/Inf loss, before ``backward`` and the optimizer step can spread it.

    Runs at ``IterationEvents.LOSS_COMPLETED``. Raising (rather than ``engine.terminate()``) means no later handler
    runs, so neither the best-model checkpoint nor the resumable last state is overwritten: both still hold the
    last good epoch, and the run resumes from there once the cause is fixed. The message names the epoch,
    iteration and loss terms, and the usual causes.
    """

    def __init__(self, checkpoint: str | os.PathLike | None = None) -> None:
        self.checkpoint = checkpoint

    def attach(self, engine) -> None:
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)

    def __call__(self, engine) -> None:
        output = engine.state.output
        loss = float(output["loss"])
        if math.isfinite(loss):
            return
        terms = ", ".join(f"{key} {float(output[key]):.4g}" for key in ("loss_noise", "loss_age") if key in output)
        kept = f"; the last good state is kept in {self.checkpoint}" if self.checkpoint else ""
        raise NonFiniteLossError(
            f"training stopped: the loss is {loss} at epoch {engine.state.epoch}, iteration {engine.state.iteration}"
            f"{f' ({terms})' if terms else ''}, before any weight was updated{kept}. Usual causes: NaN/Inf voxels in a "
            "training slice, or a learning rate too high (try a lower --learning_rate, or --autocast_dtype None)."
        )


def loss_log_transform(output: Any) -> dict[str, float]:
    """``output_transform`` for StatsHandler / TensorBoardStatsHandler: total loss and its two terms."""
    first = output[0] if isinstance(output, list) else output
    return {key: float(first[key]) for key in ("loss", "loss_noise", "loss_age") if key in first}


class PreciseBatchNorm:
    """Recompute the model's BatchNorm statistics on the training images before every validation ("precise BN").

    The statistics are the model's business (``recalibrate_batchnorm`` of :class:`scripts.networks.
    DiffusionAutoencoder` and :class:`scripts.networks.AgeRegressor`); this handler feeds it the training images,
    un-augmented and with their labelled mask, each axial level as an image of its own. Running averages would
    describe weights that have since moved, and the EMA weights validation uses never produced any (ignite's
    ``EMAHandler`` shares the online model's BatchNorm buffers). Measured before this existed: a validation MAE of
    150 years from running statistics, against 10 after recalibration. Attach it before ``ValidationHandler``
    (handlers run in attach order).

    Args:
        network: the model validation will use (the EMA model, or the trained network; a DDP wrapper is unwrapped).
        data_loader: the training images in order, without augmentation (``image`` and ``age`` keys; NaN age =
            unlabelled).
        autocast_dtype: as the inferers'.
        interval: every N epochs (match the validation interval).
    """

    def __init__(
        self,
        network: nn.Module,
        data_loader,
        autocast_dtype: torch.dtype | str | None = None,
        interval: int = 1,
        image_key: str = "image",
        age_key: str = "age",
    ) -> None:
        self.network = network
        self.data_loader = data_loader
        self.autocast_dtype = autocast_dtype
        self.interval = interval
        self.image_key = image_key
        self.age_key = age_key

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def batches(self, device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(images (N, C, H, W), labelled (N,))`` per loader batch; a level axis is unfolded into images."""
        for batch in self.data_loader:
            images = batch_images(batch, self.image_key, device, non_blocking=False)
            labelled = ~torch.isnan(batch_ages(batch, self.age_key, images.shape[0], device))
            if images.ndim == 5:  # (B, C, H, W, L): every level is an image the model sees
                levels = images.shape[-1]
                images = images.permute(0, 4, 1, 2, 3).reshape(-1, *images.shape[1:4])
                labelled = labelled.repeat_interleave(levels)
            yield images, labelled

    @torch.no_grad()
    def __call__(self, engine=None) -> None:
        model = unwrap(self.network)
        device = next(model.parameters()).device
        with autocast(device, self.autocast_dtype):
            model.recalibrate_batchnorm(self.batches(device))


class ForeachEMAHandler(EMAHandler):
    """ignite's ``EMAHandler`` with the average updated in one ``torch._foreach_lerp_`` over every parameter.

    The stock handler updates each of the model's ~500 parameter tensors with two ops of its own (``mul_``,
    ``add_``): about 1,000 small kernel launches per training step. ``lerp_(ema, online, m)`` is
    ``(1 - m) * ema + m * online``, the same average. Buffers are handled as the stock handler does.
    """

    def _update_ema_model(self, engine, name: str) -> None:
        momentum = getattr(engine.state, name)
        ema = [p.data for p in self.ema_model.parameters()]
        online = [p.data for p in self.model.parameters()]
        torch._foreach_lerp_(ema, online, momentum)
        for ema_b, model_b in zip(self.ema_model.buffers(), self.model.buffers()):
            if self.handle_buffers == "update" and ema_b.is_floating_point():
                ema_b.lerp_(model_b.data, momentum)
            elif self.handle_buffers in ("copy", "update"):
                ema_b.data = model_b.data


class GradientClipping:
    """Clip the gradient norm of the trainer's network after ``backward`` and before ``optimizer.step``.

    MONAI's ``SupervisedTrainer`` fires ``IterationEvents.BACKWARD_COMPLETED`` between the two; diffae clips at
    norm 1. The norm before clipping is logged as ``grad_norm`` in the iteration output. A ``max_norm`` of 0 or
    None leaves the gradients alone.
    """

    def __init__(self, max_norm: float | None = 1.0, norm_type: float = 2.0) -> None:
        self.max_norm = max_norm
        self.norm_type = norm_type

    def attach(self, engine) -> None:
        if self.max_norm:
            engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine) -> None:
        if getattr(engine, "scaler", None) is not None:  # CUDA AMP: clip the true, unscaled gradients
            engine.scaler.unscale_(engine.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_norm, self.norm_type)
        if isinstance(engine.state.output, dict):
            engine.state.output["grad_norm"] = norm.detach()


@torch.no_grad()
def wrong_latent_penalty(
    model: nn.Module,
    images: torch.Tensor,
    scheduler: Scheduler,
    timestep: int = 300,
    autocast_dtype: torch.dtype | str | None = None,
    seed: int = 0,
    batch_size: int = 32,
) -> dict[str, float]:
    """How much the decoder needs z_sem: the relative rise in noise-prediction MSE when z is swapped.

    Every image is noised to ``timestep`` with fixed noise (``seed``) and its noise predicted twice, once with its
    own z_sem and once with the next image's (z rolled by one). A decoder that ignores z scores 0; one that
    reconstructs from z scores well above 0. Returns ``{"penalty", "mse_own", "mse_wrong"}``. Eval mode, on the
    model's device; needs at least two images.
    """
    if len(images) < 2:
        raise ValueError(f"swapping z needs at least 2 images, got {len(images)}")
    model = unwrap(model)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    x0 = images.detach().float().cpu()
    noise = torch.randn(x0.shape, generator=generator)
    timesteps = torch.full((len(x0),), int(timestep), dtype=torch.long)
    x_t = scheduler.add_noise(original_samples=x0, noise=noise, timesteps=timesteps)
    was_training = model.training
    model.eval()
    try:
        with autocast(device, autocast_dtype):
            z = torch.cat([model.encode(chunk.to(device)).float() for chunk in x0.split(batch_size)])
            wrong = z.roll(1, dims=0)
            own_sq, wrong_sq = 0.0, 0.0
            for i in range(0, len(x0), batch_size):
                rows = slice(i, i + batch_size)
                x, t, target = x_t[rows].to(device), timesteps[rows].to(device), noise[rows].to(device)
                own_sq += float(((model.denoise(x, t, z[rows]).float() - target) ** 2).sum())
                wrong_sq += float(((model.denoise(x, t, wrong[rows]).float() - target) ** 2).sum())
    finally:
        model.train(was_training)
    penalty = wrong_sq / own_sq - 1.0 if own_sq > 0 else (math.inf if wrong_sq > 0 else 0.0)
    return {"penalty": penalty, "mse_own": own_sq / noise.numel(), "mse_wrong": wrong_sq / noise.numel()}


class WrongLatentPenalty:
    """Evaluator handler: the "decoder uses z" signal, :func:`wrong_latent_penalty`, as a validation metric.

    Keeps the first ``num_images`` validation images the evaluator sees and, at the end of every validation,
    stores the penalty in ``engine.state.metrics[metric_name]`` so the epoch line (``StatsHandler``) and
    TensorBoard log it next to the MAE. The noise is fixed, so the values are comparable between epochs.
    Attach it before the logging handlers.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        timestep: int = 300,
        num_images: int = 32,
        autocast_dtype: torch.dtype | str | None = None,
        network: nn.Module | None = None,
        metric_name: str = "val_wrong_z_penalty",
        seed: int = 0,
    ) -> None:
        self.scheduler = scheduler
        self.timestep = timestep
        self.num_images = num_images
        self.autocast_dtype = autocast_dtype
        self.network = network
        self.metric_name = metric_name
        self.seed = seed
        self._images: list[torch.Tensor] = []

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _reset(self, engine) -> None:
        self._images = []

    def _collect(self, engine) -> None:
        kept = sum(len(x) for x in self._images)
        if kept < self.num_images:
            images = engine.state.output["image"]
            images = centre_level(images if isinstance(images, torch.Tensor) else torch.stack(list(images)))
            self._images.append(images[: self.num_images - kept].detach().float().cpu())

    def __call__(self, engine) -> None:
        images = torch.cat(self._images) if self._images else torch.empty(0)
        if len(images) < 2:
            return
        network = self.network if self.network is not None else engine.network
        result = wrong_latent_penalty(network, images, self.scheduler, self.timestep, self.autocast_dtype, self.seed)
        engine.state.metrics[self.metric_name] = result["penalty"]
