"""The model input: 128x128 axial slices of the MNI grid in [0, 1], as arrays, files and batches.

One home for the format every stage shares. The chain's last step and the phantom's fast path make it
(:func:`finalise_slice`) and write it (:func:`slice_nifti`); inference recognises and checks a file of it
(:func:`is_model_input`, :func:`check_slice`); the loaders read it (:class:`AsSliceLevelsd`); whatever needs the
paper's medial slice of a multi-level input takes :func:`centre_level` (batches) or :func:`centre_channels`
(level-major arrays). Its geometry (grid, levels, affine) is :mod:`scripts.mni`'s.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Resize, ScaleIntensityRangePercentiles

from scripts.mni import SLICE_SIZE, level_offsets, slice_affine

__all__ = [
    "AsSliceLevelsd",
    "UPPER_PERCENTILE",
    "centre_channels",
    "centre_level",
    "check_slice",
    "finalise_slice",
    "is_model_input",
    "slice_nifti",
]

# The [0, 1] scaling maps the 99.5th percentile (bright white matter, not a single noisy voxel) to 1.
UPPER_PERCENTILE = 99.5


def finalise_slice(
    image: np.ndarray | torch.Tensor,
    size: tuple[int, int] = SLICE_SIZE,
    upper_percentile: float = UPPER_PERCENTILE,
    levels: int = 1,
) -> np.ndarray:
    """Resize a channel-first skull-stripped slice ``(C, H, W)`` to ``size`` and scale it to [0, 1].

    The last step of the chain, shared with the phantom's fast path so both write identical inputs. With
    ``levels`` > 1 the C channels are ``levels`` axial levels of C / levels channels each, and every level is
    scaled on its own, so a level is the slice a single-level run at its offset would give.
    """
    image = torch.as_tensor(image)
    if levels > 1:
        return np.concatenate([finalise_slice(chunk, size, upper_percentile) for chunk in image.chunk(levels)])
    resized = Resize(spatial_size=size, mode="bilinear", anti_aliasing=False)(image)
    scaled = ScaleIntensityRangePercentiles(
        lower=0, upper=upper_percentile, b_min=0.0, b_max=1.0, clip=True, channel_wise=False
    )(resized)
    return np.asarray(scaled, dtype=np.float32)


def slice_nifti(image: np.ndarray, offset: int = 0, levels: int = 1) -> nib.Nifti1Image:
    """A finalised slice ``(C, 128, 128)`` as MNI-space NIfTI: ``(128, 128)`` for C = 1, else ``(128, 128, C)``.

    With ``levels`` > 1 the C channels are ``levels`` axial levels (level-major, as :func:`finalise_slice`):
    ``(128, 128, C / levels, levels)``, the affine that of the centre level.
    """
    image = np.asarray(image, dtype=np.float32)
    if levels > 1:
        if image.shape[0] % levels:
            raise ValueError(f"{image.shape[0]} channels do not split into {levels} levels")
        data = image.reshape(levels, -1, *image.shape[1:]).transpose(2, 3, 1, 0)
    else:
        data = image[0] if image.shape[0] == 1 else np.moveaxis(image, 0, -1)
    return nib.Nifti1Image(np.ascontiguousarray(data), slice_affine(offset))


class AsSliceLevelsd(MapTransform):
    """A loaded model-input slice file -> ``(channels, H, W, levels)``: its centre ``levels`` axial levels.

    Slice files are ``(H, W)``, ``(H, W, channels)`` or, with several levels (preprocessing ``slice_levels``),
    ``(H, W, channels, stored levels)``, the medial level in the middle (:func:`slice_nifti`). Taking the
    centre levels lets a model use fewer levels than were stored (1: the paper's medial slice). Replaces
    ``EnsureChannelFirstd``, which cannot tell a level axis from a channel axis.
    """

    def __init__(self, keys: KeysCollection, channels: int = 1, levels: int = 1, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.channels, self.levels = int(channels), int(levels)
        level_offsets(self.levels)  # validates: odd, >= 1

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            img = torch.as_tensor(d[key])
            shape = tuple(img.shape)
            if img.ndim == 2:
                img = img[..., None, None]
            elif img.ndim == 3:
                img = img[..., None]
            if img.ndim != 4:
                raise ValueError(f"a model-input slice file has 2 to 4 dimensions, got shape {shape}")
            channels, stored = img.shape[2], img.shape[3]
            if channels != self.channels:
                raise ValueError(
                    f"slice file of shape {shape} has {channels} channel(s), the model takes {self.channels} "
                    "(in_channels = preprocessing slice_channels)"
                )
            if stored < self.levels or stored % 2 == 0:
                raise ValueError(
                    f"slice file of shape {shape} holds {stored} axial level(s), slice_levels is {self.levels}: "
                    f"preprocess (or generate the phantom) with --slice_levels {self.levels} or more"
                )
            start = stored // 2 - self.levels // 2
            d[key] = img[..., start : start + self.levels].permute(2, 0, 1, 3)
        return d


def is_model_input(path: str | Path) -> bool:
    """Whether a NIfTI file already is a 128x128 MNI slice (as written by the chain or the phantom)."""
    img = nib.load(str(path))
    return (
        tuple(img.shape[:2]) == SLICE_SIZE
        and len(img.shape) in (2, 3, 4)  # (H, W), (H, W, channels), (H, W, channels, levels)
        and np.allclose(img.affine[:3, :3], slice_affine()[:3, :3], atol=1e-3)
    )


def check_slice(path: str | Path) -> None:
    """Reject a model-input slice file the network should not see (non-finite or empty), with the reason."""
    data = np.asarray(nib.load(str(path)).get_fdata(dtype=np.float32))
    if not np.isfinite(data).all():
        raise ValueError("the slice has NaN or infinite values")
    if data.max() <= 0:
        raise ValueError("the slice is empty")


def centre_level(images: torch.Tensor) -> torch.Tensor:
    """The medial level of a ``(B, C, H, W, L)`` multi-level batch; a ``(B, C, H, W)`` batch as it is."""
    return images[..., images.shape[-1] // 2] if images.ndim == 5 else images


def centre_channels(image: np.ndarray, levels: int) -> np.ndarray:
    """The centre (medial) level's channels of a level-major ``(levels * C, H, W)`` array (:func:`finalise_slice`'s
    layout); the array itself for one level."""
    return np.array_split(np.asarray(image), levels)[levels // 2] if levels > 1 else np.asarray(image)
