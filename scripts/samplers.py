"""Batch samplers: a fixed share of labelled images in every training batch."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["LabelledRatioBatchSampler"]


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
