"""Inferers: how the diffusion autoencoder runs inside ``SupervisedTrainer`` and ``SupervisedEvaluator``.

``DiffusionAutoencoderInferer`` noises x0 and runs one forward pass for noise and age (training);
``AgeInferer`` runs the encoder and age head only, per axial level, combined by the median (evaluation).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.inferers import Inferer
from monai.networks.schedulers import Scheduler
from torch import nn

from scripts.precision import autocast

__all__ = ["AgeInferer", "DiffusionAutoencoderInferer", "centre_level", "combine_levels", "unpack_age_output"]


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
    """Encoder + age head only: ``network(x0)`` -> (B, 1) years, for a ``DiffusionAutoencoder`` or ``AgePredictor``.

    The (B, 1) shape is what MONAI's regression metrics need, matched by ``AgePrepareBatch``'s labels. With
    ``return_latent`` (a ``DiffusionAutoencoder`` only) the output is ``{"age": (B, 1), "z": (B, z_dim)}`` from the
    same single encoder pass, for inference that also stores z_sem. ``channels_last`` feeds NHWC inputs: with the
    network converted too, bf16 age inference on CPU is ~20% faster (tests/benchmarks/bench_train_step.py).

    Several axial levels per scan, ``(B, C, H, W, L)`` (the slice files of preprocessing ``slice_levels``), are
    predicted one level at a time (the same batch shapes, so the same kernels, as single-level inputs) and
    combined by the median, which one bad level cannot move; z_sem is the centre (medial) level's.
    ``return_levels`` adds the per-level ages, ``"age_levels": (B, L)``, to the dict output.
    Evaluators unpack a dict output with :func:`unpack_age_output`.

    ``batch_size``: evaluation runs the network on batches of exactly this many images, the last one padded with
    blank images, so a scan's age does not depend on which or how many scans share its batch (oneDNN picks its
    CPU kernels by batch shape: 0.01-0.1 years apart otherwise). A network in training mode is run as it comes.
    """

    def __init__(
        self,
        autocast_dtype: torch.dtype | str | None = None,
        return_latent: bool = False,
        channels_last: bool = False,
        return_levels: bool = False,
        batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.autocast_dtype = autocast_dtype
        self.return_latent = return_latent
        self.channels_last = channels_last
        self.return_levels = return_levels
        self.batch_size = int(batch_size) if batch_size else None

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any):
        if inputs.ndim == 5:
            per_level = [self._predict(inputs[..., i], network, *args, **kwargs) for i in range(inputs.shape[-1])]
            ages = torch.cat([p["age"] if isinstance(p, dict) else p for p in per_level], dim=1).float()
            out = per_level[len(per_level) // 2]
            out = dict(out) if isinstance(out, dict) else {}
            out.update(age=combine_levels(ages), age_levels=ages)
        else:
            out = self._predict(inputs, network, *args, **kwargs)
            if not isinstance(out, dict):
                out = {"age": out}
            out.setdefault("age_levels", out["age"].float())
        if not (self.return_latent or self.return_levels):
            return out["age"]
        if not self.return_levels:
            out.pop("age_levels")
        return out

    def _predict(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any):
        size = self.batch_size
        if not size or network.training or inputs.shape[0] == size:
            return self._forward(inputs, network, *args, **kwargs)
        parts = []
        for chunk in inputs.split(size):
            n = chunk.shape[0]
            padded = torch.cat([chunk, chunk.new_zeros((size - n, *chunk.shape[1:]))]) if n < size else chunk
            out = self._forward(padded, network, *args, **kwargs)
            parts.append({k: v[:n] for k, v in out.items()} if isinstance(out, dict) else out[:n])
        if isinstance(parts[0], dict):
            return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
        return torch.cat(parts)

    def _forward(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any):
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        inputs = inputs.contiguous(memory_format=memory_format)  # also a level cut from (B, C, H, W, L)
        with autocast(inputs.device, self.autocast_dtype):
            if not self.return_latent:
                return network(inputs, *args, **kwargs)
            model = getattr(network, "module", network)
            z_sem = model.encode(inputs)
            return {"age": model.age_head(z_sem)[:, None], "z": z_sem.float()}


def combine_levels(ages: torch.Tensor) -> torch.Tensor:
    """(B, L) per-level predicted ages -> (B, 1): their median (the mean of the middle two for an even L)."""
    return torch.quantile(ages.float(), 0.5, dim=1, keepdim=True, interpolation="midpoint")


def unpack_age_output(data: dict) -> dict:
    """Evaluator ``postprocessing``: a dict prediction of :class:`AgeInferer` -> ``pred`` (B, 1) years for the
    metrics, with ``z`` and ``age_levels`` as output keys of their own for the writers."""
    pred = data.get("pred")
    if isinstance(pred, Mapping):
        data = dict(data)
        data["pred"] = pred["age"]
        data.update({key: pred[key] for key in ("z", "age_levels") if key in pred})
    return data


def centre_level(images: torch.Tensor) -> torch.Tensor:
    """The medial level of a ``(B, C, H, W, L)`` multi-level batch; a ``(B, C, H, W)`` batch as it is."""
    return images[..., images.shape[-1] // 2] if images.ndim == 5 else images
