"""Checkpoints: reading model weights (never a training state by mistake), and saving them atomically."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointSaver

from scripts.atomic import write_atomic
from scripts.cli import BundleError

__all__ = ["AtomicCheckpointSaver", "CheckpointError", "CheckpointNotFoundError", "read_model_weights"]


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
