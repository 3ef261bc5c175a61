"""The resumable training state: what ``last.pt`` holds beyond the network and optimizer, and the settings a
resumed run must share with the one it continues.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from ignite.engine import Events

from scripts.cli import BundleError

__all__ = [
    "BestMetricState",
    "EMAState",
    "RandomState",
    "ResumeMismatchError",
    "RunSettings",
    "SamplerEpoch",
    "resume_state",
]


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
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine) -> None:
        self.sampler.set_epoch(engine.state.epoch - 1)
