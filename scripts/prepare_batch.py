"""Batch preparation for the stock MONAI engines: a batch dict becomes the network's inputs and targets.

``DiffusionPrepareBatch`` draws the noise and timesteps of a training step; ``AgePrepareBatch`` gives (image, age)
for evaluation. Ages are float32 years, NaN where unknown (unlabelled).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.engines.utils import PrepareBatch
from monai.utils import convert_to_tensor

__all__ = ["AgePrepareBatch", "DiffusionPrepareBatch", "batch_ages", "batch_images"]


def batch_ages(batchdata: Mapping, age_key: str, batch_size: int, device: torch.device | str | None) -> torch.Tensor:
    """Ages as float32 (B,), NaN where unknown; a batch without the key is entirely unlabelled."""
    if age_key not in batchdata:
        return torch.full((batch_size,), float("nan"), device=device)
    age = convert_to_tensor(batchdata[age_key], track_meta=False, dtype=torch.float32)
    return age.reshape(batch_size).to(device)


def batch_images(batchdata: Mapping, image_key: str, device, non_blocking: bool, **kwargs) -> torch.Tensor:
    """The images of a batch as a plain tensor on ``device``."""
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
        images = batch_images(batchdata, self.image_key, device, non_blocking, **kwargs)
        age = batch_ages(batchdata, self.age_key, images.shape[0], images.device)
        noise = torch.randn_like(images)
        timesteps = torch.randint(0, self.num_train_timesteps, (images.shape[0],), device=images.device)
        targets = {"noise": noise, "age": age}
        return images, targets, (), {"noise": noise, "timesteps": timesteps, "labelled": ~torch.isnan(age)}


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
        images = batch_images(batchdata, self.image_key, device, non_blocking, **kwargs)
        return images, batch_ages(batchdata, self.age_key, images.shape[0], images.device)[:, None]
