"""Losses: the paper's semi-supervised objective, and the supervised baselines' age term."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from scripts.networks import unwrap

__all__ = ["LabelledAgeLoss", "SemiSupervisedLoss"]


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

    ``pred`` is :class:`scripts.inferers.AgeInferer`'s output, whose ``age`` and ``target`` are (B, 1) years as the
    regressor and ``AgePrepareBatch`` give them; NaN targets (unlabelled) are left out, so a baseline can share the
    semi-supervised model's datalist and sampler.
    """

    def __init__(self, network: nn.Module) -> None:
        self.network = network

    def __call__(self, pred: Mapping[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        pred, target = pred["age"].float().reshape(-1), target.float().reshape(-1)
        labelled = ~torch.isnan(target)
        if not bool(labelled.any()):
            return pred.sum() * 0.0
        std = unwrap(self.network).age_std
        return torch.mean(((pred[labelled] - target[labelled]) / std) ** 2)
