"""Preprocessing as MONAI transforms: raw T1w scan -> 128x128 slice in [0, 1] (paper, Appendix B)."""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import Resize, ScaleIntensityRangePercentiles

from scripts.mni import SLICE_SIZE

# The [0, 1] scaling maps the 99.5th percentile (bright white matter, not a single noisy voxel) to 1.
UPPER_PERCENTILE = 99.5


def finalise_slice(
    image: np.ndarray | torch.Tensor, size: tuple[int, int] = SLICE_SIZE, upper_percentile: float = UPPER_PERCENTILE
) -> np.ndarray:
    """Resize a channel-first skull-stripped slice ``(C, H, W)`` to ``size`` and scale it to [0, 1].

    The last step of the chain, shared with the phantom's fast path so both write identical inputs.
    """
    resized = Resize(spatial_size=size, mode="bilinear", anti_aliasing=False)(torch.as_tensor(image))
    scaled = ScaleIntensityRangePercentiles(
        lower=0, upper=upper_percentile, b_min=0.0, b_max=1.0, clip=True, channel_wise=False
    )(resized)
    return np.asarray(scaled, dtype=np.float32)
