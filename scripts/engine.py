"""Pieces that plug the diffusion autoencoder into stock MONAI ``SupervisedTrainer`` / ``SupervisedEvaluator``.

Training contract (see ``monai.engines.SupervisedTrainer._iteration``)::

    inputs, targets, args, kwargs = DiffusionPrepareBatch()(batch)          # x0; {noise, age}; (); {noise, t, labelled}
    pred = DiffusionAutoencoderInferer(scheduler)(inputs, network, **kwargs)  # {"eps": eps_hat, "age": years or NaN}
    loss = SemiSupervisedLoss(network.age_head, lambda_age)(pred, targets)

Evaluation: ``AgePrepareBatch`` + ``AgeInferer`` give (B, 1) ages in years, the shape MONAI's regression metrics
expect. ``LabelledRatioBatchSampler`` fixes the share of labelled images per batch. Handlers: exact BatchNorm
statistics before validation, gradient clipping, the "decoder uses z" signal, loss terms, NaN guard, atomic
checkpoints. (The age-bias correction fitted at validation is :mod:`scripts.calibration`; the DDIM maps of the
analyses are :mod:`scripts.generative`.)
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from ignite.handlers import EMAHandler
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.engines.utils import IterationEvents, PrepareBatch
from monai.handlers import CheckpointSaver
from monai.inferers import Inferer
from monai.networks.schedulers import Scheduler
from monai.utils import convert_to_tensor
from torch import nn
from torch.utils.data import Sampler

from scripts.cli import BundleError
from scripts.precision import autocast

__all__ = [
    "AgeInferer",
    "AgePrepareBatch",
    "AtomicCheckpointSaver",
    "DiffusionAutoencoderInferer",
    "DiffusionPrepareBatch",
    "LabelledAgeLoss",
    "LabelledRatioBatchSampler",
    "LossComponentsHandler",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "SemiSupervisedLoss",
    "GradientClipping",
    "loss_log_transform",
    "resume_state",
    "EMAState",
    "RandomState",
    "SamplerEpoch",
    "WrongLatentPenalty",
    "wrong_latent_penalty",
]


def _batch_ages(batchdata: Mapping, age_key: str, batch_size: int, device: torch.device | str | None) -> torch.Tensor:
    """Ages as float32 (B,), NaN where unknown; a batch without the key is entirely unlabelled."""
    if age_key not in batchdata:
        return torch.full((batch_size,), float("nan"), device=device)
    age = convert_to_tensor(batchdata[age_key], track_meta=False, dtype=torch.float32)
    return age.reshape(batch_size).to(device)


def _image(batchdata: Mapping, image_key: str, device, non_blocking: bool, **kwargs) -> torch.Tensor:
    # Plain tensors: MetaTensor's per-op __torch_function__ bookkeeping costs time in a ~700-op network and the
    # metadata is not needed past this point.
    image = convert_to_tensor(batchdata[image_key], track_meta=False)
    return image.to(device=device, non_blocking=non_blocking, **kwargs)


class DiffusionPrepareBatch(PrepareBatch):
    """Batch dict -> (x0, targets, (), inferer kwargs) with fresh noise and uniform timesteps for every image.

    ``targets = {"noise": eps, "age": years or NaN}`` feed the loss; the inferer receives ``noise``,
    ``timesteps`` and the ``labelled`` mask (~isnan(age)) as keyword arguments. Draws use torch's global RNG,
    so ``torch.manual_seed`` (MONAI's ``set_determinism``) makes them reproducible.
    """

    def __init__(self, num_train_timesteps: int = 1000, image_key: str = "image", age_key: str = "age") -> None:
        self.num_train_timesteps = num_train_timesteps
        self.image_key = image_key
        self.age_key = age_key

    def __call__(
        self,
        batchdata: dict[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], tuple, dict[str, torch.Tensor]]:
        images = _image(batchdata, self.image_key, device, non_blocking, **kwargs)
        age = _batch_ages(batchdata, self.age_key, images.shape[0], images.device)
        noise = torch.randn_like(images)
        timesteps = torch.randint(0, self.num_train_timesteps, (images.shape[0],), device=images.device)
        targets = {"noise": noise, "age": age}
        return images, targets, (), {"noise": noise, "timesteps": timesteps, "labelled": ~torch.isnan(age)}


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


class SemiSupervisedLoss:
    """L = MSE(eps_hat, eps) over every image + lambda_age * MSE of standardised age over labelled images.

    Ages are standardised with the age head's ``age_std`` (the mean cancels in the difference), read at call time
    so statistics set or loaded after construction are honoured. Unlabelled images (NaN target) are never imputed:
    they are dropped from the age term, as are images the model gave no prediction (NaN, see
    ``DiffusionAutoencoder.training_outputs``). A batch with no such pair has an age term of exactly zero that is
    not connected to the age head, so the head receives no gradient from it.
    The terms of the last call are kept in ``components`` (detached) for logging (``LossComponentsHandler``).
    A plain callable rather than an ``nn.Module``, so the head it reads is not registered as its submodule.
    """

    def __init__(self, age_head: nn.Module, lambda_age: float = 1.0) -> None:
        self.age_head = age_head
        self.lambda_age = lambda_age
        self.components: dict[str, torch.Tensor] = {}

    def __call__(self, pred: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> torch.Tensor:
        # float32 whatever the autocast dtype the prediction came in
        noise_loss = torch.mean((pred["eps"].float() - target["noise"].float()) ** 2)
        paired = ~torch.isnan(target["age"]) & ~torch.isnan(pred["age"])
        if bool(paired.any()):
            error = (pred["age"][paired] - target["age"][paired]) / self.age_head.age_std
            age_loss = torch.mean(error**2)
        else:
            age_loss = noise_loss.new_zeros(())
        self.components = {"noise": noise_loss.detach(), "age": age_loss.detach(), "labelled": paired.sum()}
        return noise_loss + self.lambda_age * age_loss


class LabelledAgeLoss:
    """MSE of standardised age over the labelled images of a batch, for supervised baselines (``AgeRegressor``).

    ``pred`` and ``target`` are (B, 1) years as ``AgePrepareBatch`` and the regressor give them; NaN targets
    (unlabelled) are left out, so a baseline can share the semi-supervised model's datalist and sampler.
    """

    def __init__(self, network: nn.Module) -> None:
        self.network = network

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pred, target = pred.float().reshape(-1), target.float().reshape(-1)
        labelled = ~torch.isnan(target)
        if not bool(labelled.any()):
            return pred.sum() * 0.0
        std = getattr(self.network, "module", self.network).age_std
        return torch.mean(((pred[labelled] - target[labelled]) / std) ** 2)


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


class AgePrepareBatch(PrepareBatch):
    """Batch dict -> (image, age) for evaluation; age is (B, 1) float32 years (NaN when unknown)."""

    def __init__(self, image_key: str = "image", age_key: str = "age") -> None:
        self.image_key = image_key
        self.age_key = age_key

    def __call__(
        self,
        batchdata: dict[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images = _image(batchdata, self.image_key, device, non_blocking, **kwargs)
        return images, _batch_ages(batchdata, self.age_key, images.shape[0], images.device)[:, None]


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


class LabelledRatioBatchSampler(Sampler[list[int]]):
    """Batches with a fixed number of labelled items: ceil(ratio * batch_size) labelled, the rest unlabelled.

    An epoch has ``len(labelled) // batch_size`` batches (rounded down to a multiple of ``num_replicas``), so it
    covers about as many images as the dataset holds. Each pool is cut from fresh permutations, so a small labelled
    pool is cycled (oversampled) rather than exhausted, and no item repeats within a batch.
    With no unlabelled item every batch is fully labelled; with no labelled item, fully unlabelled.

    Shuffling is a pure function of ``(seed, epoch)``, identical on every rank; rank ``r`` of ``num_replicas``
    takes global batches ``r, r + num_replicas, ...``, so ranks get disjoint batches of equal count.
    Each iteration advances the epoch (a plain DataLoader reshuffles every epoch); ``set_epoch`` pins it,
    e.g. when resuming. MONAI's workflow only calls ``set_epoch`` on a ``DistributedSampler``.

    Args:
        labelled: per-item flag (True where the age is known), in dataset order.
        batch_size: items per batch on each rank.
        labelled_ratio: share of labelled items per batch, in [0, 1].
        seed: base seed of the shuffles.
        num_replicas, rank: DDP world size and this process' rank (default: from ``torch.distributed`` if
            initialised, else a single process).
    """

    def __init__(
        self,
        labelled: Sequence[bool] | np.ndarray | torch.Tensor,
        batch_size: int,
        labelled_ratio: float = 0.25,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if not 0.0 <= labelled_ratio <= 1.0:
            raise ValueError(f"labelled_ratio must be in [0, 1], got {labelled_ratio}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        distributed = dist.is_available() and dist.is_initialized()
        self.num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if distributed else 1)
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} is not in [0, {self.num_replicas})")

        mask = np.asarray(labelled, dtype=bool).reshape(-1)
        self.labelled_indices = np.flatnonzero(mask)
        self.unlabelled_indices = np.flatnonzero(~mask)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

        n_labelled = min(math.ceil(labelled_ratio * batch_size), batch_size, len(self.labelled_indices))
        if len(self.unlabelled_indices) == 0:
            n_labelled = min(batch_size, len(self.labelled_indices))
        self.n_labelled = n_labelled
        self.n_unlabelled = batch_size - n_labelled
        if self.n_unlabelled > len(self.unlabelled_indices):
            raise ValueError(f"cannot fill batches of {batch_size} from {len(mask)} items")

        self.num_batches = (len(mask) // batch_size) // self.num_replicas
        if self.num_batches == 0:
            raise ValueError(
                f"{len(mask)} items give no batch of {batch_size} for each of {self.num_replicas} replicas"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    @staticmethod
    def _draw(pool: np.ndarray, per_batch: int, num_batches: int, rng: np.random.Generator) -> np.ndarray:
        """(num_batches, per_batch) indices cut from fresh permutations of ``pool``.

        Each permutation is cut into whole batches and its remainder (< per_batch items, random) is dropped, so
        an item never appears twice in a batch even when a small pool is cycled.
        """
        if per_batch == 0:
            return np.empty((num_batches, 0), dtype=np.int64)
        per_permutation = len(pool) // per_batch
        permutations = math.ceil(num_batches / per_permutation)
        cuts = [rng.permutation(pool)[: per_permutation * per_batch] for _ in range(permutations)]
        return np.concatenate(cuts).reshape(-1, per_batch)[:num_batches]

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng((self.seed, self.epoch))
        self.epoch += 1
        num_global = self.num_batches * self.num_replicas
        labelled = self._draw(self.labelled_indices, self.n_labelled, num_global, rng)
        unlabelled = self._draw(self.unlabelled_indices, self.n_unlabelled, num_global, rng)
        batches = np.concatenate([labelled, unlabelled], axis=1)
        batches = rng.permuted(batches, axis=1)  # labelled items at random positions, not always first
        for batch in batches[self.rank :: self.num_replicas]:
            yield batch.tolist()


# ---------------------------------------------------------------------------------------------------------------
# BatchNorm statistics for evaluation.
# ---------------------------------------------------------------------------------------------------------------


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
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def batches(self, device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(images (N, C, H, W), labelled (N,))`` per loader batch; a level axis is unfolded into images."""
        for batch in self.data_loader:
            images = _image(batch, self.image_key, device, non_blocking=False)
            labelled = ~torch.isnan(_batch_ages(batch, self.age_key, images.shape[0], device))
            if images.ndim == 5:  # (B, C, H, W, L): every level is an image the model sees
                levels = images.shape[-1]
                images = images.permute(0, 4, 1, 2, 3).reshape(-1, *images.shape[1:4])
                labelled = labelled.repeat_interleave(levels)
            yield images, labelled

    @torch.no_grad()
    def __call__(self, engine=None) -> None:
        model = getattr(self.network, "module", self.network)  # unwrap DDP
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
    model = getattr(model, "module", model)
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
        from ignite.engine import Events

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


# ---------------------------------------------------------------------------------------------------------------
# Resume: everything a run's future depends on.
# ---------------------------------------------------------------------------------------------------------------


def resume_state(**objects: Any) -> dict[str, Any]:
    """The ``save_dict`` of the resumable last state: every stateful object named, without the disabled (None) ones.

    Used as ``_target_`` in train.yaml so that optional parts (the EMA model) are saved and restored when enabled.
    """
    return {name: obj for name, obj in objects.items() if obj is not None}


class ResumeMismatchError(BundleError, ValueError):
    """A resumable state written by a run with other settings: resuming it would corrupt this run."""


class RunSettings:
    """The settings a training run's future depends on, as a checkpointable object that refuses a different run.

    Saved in the resumable state. Restoring it compares the saved settings with this run's and raises
    :class:`ResumeMismatchError`, naming every key that differs, before anything else is restored. Without it, a
    rerun with another ``max_epochs`` restores the old cosine schedule (learning rates ``[1e-4, 0, 1e-4, 0]``), and
    one with other data or sizes silently continues a different experiment.

    Args:
        settings: plain values (numbers, strings, lists; e.g. ``max_epochs``, ``learning_rate``, the sizes, a
            digest of the training data), compared by equality.
        resume_path: the state file, named in the error with the fix.
    """

    def __init__(self, settings: Mapping[str, Any], resume_path: str | os.PathLike | None = None) -> None:
        self.settings = {key: _plain(value) for key, value in settings.items()}
        self.resume_path = resume_path

    def state_dict(self) -> dict[str, Any]:
        return dict(self.settings)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = {key: _plain(value) for key, value in state.items()}
        keys = sorted(set(saved) | set(self.settings))
        differ = [key for key in keys if saved.get(key) != self.settings.get(key)]
        if differ:
            shown = "; ".join(f"{key} {saved.get(key)!r} there, {self.settings.get(key)!r} now" for key in differ)
            where = self.resume_path or "the resumable state"
            raise ResumeMismatchError(
                f"{where} was written by a run with other settings ({shown}): resuming would corrupt this run; "
                f"rerun with the same settings, or delete {os.path.dirname(str(where)) or where} (or pass another "
                "--output_dir) to start a new run"
            )


def _plain(value: Any) -> Any:
    """Numbers, strings and nested lists as saved and loaded (tuples become lists, tensors numbers)."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class EMAState:
    """ignite's ``EMAHandler`` as a checkpointable object: the averaged weights and the momentum warm-up's position.

    The handler keeps the warm-up in a scheduler it creates on ``attach``, with its own event counter; restoring
    only the EMA weights would restart the warm-up on resume and average differently from the uninterrupted run.
    """

    def __init__(self, handler) -> None:
        self.handler = handler

    def state_dict(self) -> dict[str, Any]:
        scheduler = getattr(self.handler, "momentum_scheduler", None)
        # the scheduler's own state_dict holds its warm-up function object, which weights-only loading refuses
        return {
            "model": self.handler.ema_model.state_dict(),
            "warmup_position": int(scheduler.event_index) if scheduler is not None else 0,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.handler.ema_model.load_state_dict(state["model"])
        scheduler = getattr(self.handler, "momentum_scheduler", None)
        if scheduler is not None:
            scheduler.event_index = int(state["warmup_position"])


class RandomState:
    """The random streams a training run draws from (torch CPU and CUDA, NumPy, Python), as a checkpointable object.

    Noise, timesteps and dropout come from torch's global generator; restoring it with the weights makes a resumed
    run draw what the uninterrupted run would have drawn. Saved as tensors and plain numbers only, so the file
    still loads with ``torch.load(weights_only=True)``.
    """

    def state_dict(self) -> dict[str, Any]:
        kind, keys, position, has_gauss, cached = np.random.get_state()
        version, python_state, gauss_next = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {
                "kind": kind,
                "keys": torch.from_numpy(keys.astype(np.int64)),
                "position": int(position),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached),
            },
            "python": {
                "version": version,
                "state": torch.tensor(python_state, dtype=torch.int64),
                "gauss_next": gauss_next,
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        torch.set_rng_state(state["torch"].cpu())
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
        n = state["numpy"]
        np.random.set_state(
            (n["kind"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"], n["cached_gaussian"])
        )
        p = state["python"]
        random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))


class BestMetricState:
    """The evaluator's best key metric and its epoch, as a checkpointable object.

    MONAI keeps them in ``evaluator.state`` (``best_metric``, ``best_metric_epoch``), where a new run starts from
    "nothing yet": without restoring them a resumed run treats its first validation as the best so far, and the
    best-model checkpoint and the bias correction (both keyed to it) are overwritten whatever the metric.
    """

    def __init__(self, evaluator) -> None:
        self.evaluator = evaluator

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_metric": float(self.evaluator.state.best_metric),
            "best_metric_epoch": int(self.evaluator.state.best_metric_epoch),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.evaluator.state.best_metric = float(state["best_metric"])
        self.evaluator.state.best_metric_epoch = int(state["best_metric_epoch"])


class SamplerEpoch:
    """Pin a sampler's epoch to the trainer's at the start of every epoch (``set_epoch(epoch - 1)``).

    MONAI's workflow does this for ``DistributedSampler`` only. With it, a run resumed at epoch e draws epoch e's
    batches, not epoch 0's again, and the shuffles are a function of (seed, epoch) alone.
    """

    def __init__(self, sampler) -> None:
        self.sampler = sampler

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine) -> None:
        self.sampler.set_epoch(engine.state.epoch - 1)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints that a kill cannot corrupt.
# ---------------------------------------------------------------------------------------------------------------


class CheckpointError(BundleError, ValueError):
    """A checkpoint that cannot be used for prediction, in one line naming the file and the reason."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint where one was expected."""


def read_model_weights(ckpt_path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a best-model file written by training (``torch.load(weights_only=True)``: no code is
    unpickled); :class:`CheckpointError` for anything else, the resumable training state ``last.pt`` included,
    whose ``network`` holds the online weights while the model that was validated is its EMA."""
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise CheckpointNotFoundError(
            f"{ckpt_path}: no checkpoint; train first (python -m monai.bundle run training ...) or pass --ckpt_path"
        )
    try:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = " ".join(str(err).split())[:300]
        raise CheckpointError(
            f"{ckpt_path}: not a readable weights-only checkpoint ({type(err).__name__}: {reason})"
        ) from None
    if not isinstance(state, dict) or any(
        isinstance(state.get(key), dict) for key in ("network", "model", "optimizer")
    ):
        raise CheckpointError(
            f"{ckpt_path}: a training state, not model weights; pass the best-model file that training "
            "writes (models/model.pt)"
        )
    return state


class _AtomicFileSaver(BaseSaveHandler):
    """Ignite save handler: write to a temporary file in the same folder, then rename over the target.

    With a fixed ``filename`` every save replaces the same file and ``remove`` does nothing: MONAI's saver
    deletes the previous file before writing the next, so a run killed in between would leave no model at all.
    Only rank 0 writes (the other ranks hold identical weights under DDP).
    """

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None) -> None:
        self.dirname = Path(dirname)
        self.filename = filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        from scripts.atomic import write_atomic

        path = write_atomic(self.dirname / (self.filename or filename), lambda tmp: torch.save(checkpoint, tmp))
        # a run killed while saving leaves its temporary file (never read: its name is not the checkpoint's)
        for stale in path.parent.glob(f".{path.name}.tmp*"):
            stale.unlink(missing_ok=True)

    def remove(self, filename: str) -> None:
        if self.filename is None and (not dist.is_initialized() or dist.get_rank() == 0):
            (self.dirname / filename).unlink(missing_ok=True)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` writing every file atomically, optionally under one fixed ``filename``.

    Used for the best model (``save_key_metric=True``) and for the last training state (``save_interval=1``):
    whatever kills the process, the file on disk is the previous complete checkpoint or the new complete one.
    """

    def __init__(self, save_dir: str, save_dict: dict, filename: str | None = None, **kwargs: Any) -> None:
        super().__init__(save_dir=save_dir, save_dict=save_dict, **kwargs)
        self.filename = filename
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler = _AtomicFileSaver(save_dir, filename)

    def state_dict(self) -> dict:
        """The key-metric tracking (the scores of the checkpoints kept), for the resume checkpoint; MONAI's
        ``load_state_dict`` restores it, so a resumed run replaces the best model only with a better one."""
        return dict(self._key_metric_checkpoint.state_dict()) if self._key_metric_checkpoint is not None else {}
