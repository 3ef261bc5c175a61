"""Inferers: how the diffusion autoencoder runs inside ``SupervisedTrainer`` and ``SupervisedEvaluator``.

``DiffusionAutoencoderInferer`` noises x0 and runs one forward pass for noise and age (training);
``AgeInferer`` runs the encoder and age head only, per axial level, combined by the median (evaluation).
"""

from __future__ import annotations

from typing import Any

import torch
from monai.inferers import Inferer
from monai.networks.schedulers import Scheduler
from torch import nn

from scripts.networks import unwrap
from scripts.precision import autocast

__all__ = ["AgeInferer", "DiffusionAutoencoderInferer", "combine_levels", "unpack_age_output"]


class DiffusionAutoencoderInferer(Inferer):
    """Noise x0 to x_t and run the network once for both outputs: ``{"eps": eps_hat, "age": years}``.

    The single encoder pass (z_sem feeding the U-Net and the age head) happens inside the network's
    ``forward(x0, x_t, timesteps, labelled)`` rather than here through ``encode``/``denoise``: going through
    ``forward`` keeps ``DistributedDataParallel`` gradient synchronisation working when the network is wrapped.
    ``age`` is NaN for unlabelled images (the head only sees labelled ones, see ``DiffusionAutoencoder``).

    Args:
        scheduler: the training noise schedule (MONAI ``DDPMScheduler``, T=1000 linear betas in the paper).
        autocast_dtype: e.g. ``"bfloat16"`` to run the forward pass under autocast on the inputs' device;
            the loss is then computed in float32 outside the autocast region.
    """

    def __init__(self, scheduler: Scheduler, autocast_dtype: torch.dtype | str | None = None) -> None:
        super().__init__()
        self.scheduler = scheduler
        self.autocast_dtype = autocast_dtype

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: nn.Module,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        labelled: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        noisy = self.scheduler.add_noise(original_samples=inputs, noise=noise, timesteps=timesteps)
        with autocast(inputs.device, self.autocast_dtype):
            return network(inputs, noisy, timesteps, labelled)


class AgeInferer(Inferer):
    """Encoder + age head only, per axial level, combined by the median: ``{"age": (B, 1), "age_levels": (B, L)}``
    years, plus ``"z"`` (B, z_dim), the centre level's z_sem, for a model that has one (``encode`` and
    ``age_head``: ``DiffusionAutoencoder``, ``AgePredictor``; a plain regressor such as the DenseNet121 baseline
    has no latent). The output is always this dict; evaluators take ``pred`` from it with
    :func:`unpack_age_output`, and the (B, 1) age is the shape MONAI's regression metrics need.

    Several axial levels per scan, ``(B, C, H, W, L)`` (the slice files of preprocessing ``slice_levels``), are
    predicted one level at a time (the same batch shapes, so the same kernels, as single-level inputs) and
    combined by the median, which one bad level cannot move. A ``(B, C, H, W)`` batch is one level.

    Args:
        autocast_dtype: e.g. ``"bfloat16"``: the encoder's autocast (the age head always runs in float32).
        channels_last: feed NHWC inputs; with the network converted too, bf16 age inference on CPU is ~20% faster
            (tests/benchmarks/bench_train_step.py).
        batch_size: in evaluation, run the network on batches of exactly this many images, the last one padded
            with blank images, so a scan's age does not depend on which or how many scans share its batch (oneDNN
            picks its CPU kernels by batch shape: 0.01-0.1 years apart otherwise). A network in training mode is
            run as it comes.
    """

    def __init__(
        self,
        autocast_dtype: torch.dtype | str | None = None,
        channels_last: bool = False,
        batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.autocast_dtype = autocast_dtype
        self.channels_last = channels_last
        self.batch_size = int(batch_size) if batch_size else None

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        levels = [inputs[..., i] for i in range(inputs.shape[-1])] if inputs.ndim == 5 else [inputs]
        per_level = [self._predict(level, network, *args, **kwargs) for level in levels]
        ages = torch.cat([p["age"] for p in per_level], dim=1).float()
        out = dict(per_level[len(per_level) // 2])
        out.update(age=combine_levels(ages) if len(levels) > 1 else out["age"], age_levels=ages)
        return out

    def _predict(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        size = self.batch_size
        if not size or network.training or inputs.shape[0] == size:
            return self._forward(inputs, network, *args, **kwargs)
        parts = []
        for chunk in inputs.split(size):
            n = chunk.shape[0]
            padded = torch.cat([chunk, chunk.new_zeros((size - n, *chunk.shape[1:]))]) if n < size else chunk
            parts.append({key: value[:n] for key, value in self._forward(padded, network, *args, **kwargs).items()})
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}

    def _forward(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        inputs = inputs.contiguous(memory_format=memory_format)  # also a level cut from (B, C, H, W, L)
        model = unwrap(network)
        with autocast(inputs.device, self.autocast_dtype):
            if not (hasattr(model, "encode") and hasattr(model, "age_head")):
                return {"age": network(inputs, *args, **kwargs)}
            z_sem = model.encode(inputs)
            return {"age": model.age_head(z_sem)[:, None], "z": z_sem.float()}


def combine_levels(ages: torch.Tensor) -> torch.Tensor:
    """(B, L) per-level predicted ages -> (B, 1): their median (the mean of the middle two for an even L)."""
    return torch.quantile(ages.float(), 0.5, dim=1, keepdim=True, interpolation="midpoint")


def unpack_age_output(data: dict) -> dict:
    """Evaluator ``postprocessing``: :class:`AgeInferer`'s prediction -> ``pred`` (B, 1) years for the metrics, with
    ``age_levels`` and ``z`` (when the model has one) as output keys of their own for the writers."""
    pred = data["pred"]
    return {**data, "pred": pred["age"], **{key: pred[key] for key in ("z", "age_levels") if key in pred}}
