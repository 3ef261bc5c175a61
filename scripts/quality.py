"""Image quality of a model-input slice: one number per scan, written with every prediction (``quality``).

The score is the coefficient of joint variation of grey and white matter (CJV; Ganzetti et al., Front.
Neuroinform. 2016; one of MRIQC's image-quality metrics):

    CJV = (sd_WM + sd_GM) / |mean_WM - mean_GM|

over the skull-stripped brain of the slice, lower is better. Noise, blur (thick slices) and a flattened contrast
all raise it, and the brain-age error grows with all three, which is what the prediction interval needs: it is
calibrated per band of this score (:class:`scripts.calibration.PredictionInterval`). Grey and white matter are
the two brighter components of a three-class Gaussian mixture of the brain's intensities (CSF, GM, WM), fitted by
EM on the brain away from its edge, so no segmentation model is needed. Grey/white contrast also falls with age,
so old brains score somewhat worse than young ones at the same acquisition quality.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from scipy import ndimage

BRAIN_THRESHOLD = 0.02  # skull stripping leaves exact zeros; resizing blurs the edge into small values
EDGE_PIXELS = 2  # left out next to the brain's edge, where brain and background mix
MIN_PIXELS = 200  # fewer brain pixels than this: no score (NaN)


def gaussian_mixture_1d(values: np.ndarray, components: int = 3, iterations: int = 40):
    """Means, standard deviations and weights (sorted by mean) of a 1D Gaussian mixture fitted by EM."""
    x = np.asarray(values, dtype=np.float64)
    mean = np.quantile(x, np.linspace(0.15, 0.85, components))
    sd = np.full(components, max(x.std() / components, 1e-3))
    weight = np.full(components, 1.0 / components)
    for _ in range(iterations):
        log_p = -0.5 * ((x[:, None] - mean) / sd) ** 2 - np.log(sd) + np.log(weight)
        log_p -= log_p.max(axis=1, keepdims=True)
        resp = np.exp(log_p)
        resp /= resp.sum(axis=1, keepdims=True)
        total = resp.sum(axis=0) + 1e-12
        weight = total / len(x)
        mean = (resp * x[:, None]).sum(axis=0) / total
        sd = np.sqrt((resp * (x[:, None] - mean) ** 2).sum(axis=0) / total).clip(1e-4)
    order = np.argsort(mean)
    return mean[order], sd[order], weight[order]


def slice_quality(image: np.ndarray | torch.Tensor) -> float:
    """CJV of grey and white matter in a skull-stripped slice ``(H, W)`` in [0, 1]; NaN when it has too little brain."""
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2:
        raise ValueError(f"slice_quality takes one (H, W) slice, got shape {image.shape}")
    core = ndimage.binary_erosion(image > BRAIN_THRESHOLD, iterations=EDGE_PIXELS)
    if core.sum() < MIN_PIXELS:
        return math.nan
    mean, sd, _ = gaussian_mixture_1d(image[core])
    contrast = abs(mean[2] - mean[1])
    return float((sd[1] + sd[2]) / contrast) if contrast > 1e-6 else math.inf


def noise_level(image: np.ndarray | torch.Tensor) -> float:
    """Noise sd of a skull-stripped slice ``(H, W)`` by Immerkaer's estimator (CVIU 1996), over the brain away from
    its edge: the mean absolute response to the Laplacian-difference mask, times sqrt(pi/2) / 6."""
    image = np.asarray(image, dtype=np.float64)
    core = ndimage.binary_erosion(image > BRAIN_THRESHOLD, iterations=EDGE_PIXELS)
    if core.sum() < MIN_PIXELS:
        return math.nan
    mask = np.array([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])
    return float(math.sqrt(math.pi / 2) / 6 * np.abs(ndimage.convolve(image, mask))[core].mean())


def slice_agreement(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """How closely ``other`` reproduces ``reference``, two skull-stripped ``(H, W)`` renderings of one slice (e.g.
    the real chain's and the phantom's fast path's), inside the brain both show.

    ``pixel_r`` (Pearson r of the intensities), ``histogram_distance`` (Wasserstein-1 between the two brains'
    intensity distributions, [0, 1] units), ``sharpness_ratio`` (mean gradient magnitude, other / reference),
    ``noise_ratio`` (:func:`noise_level`, other / reference) and ``mask_dice`` (of the two brains).
    """
    from scipy import stats

    reference, other = np.asarray(reference, dtype=np.float64), np.asarray(other, dtype=np.float64)
    first, second = reference > 0, other > 0
    both = first & second
    core = ndimage.binary_erosion(both, iterations=EDGE_PIXELS)

    def sharpness(image: np.ndarray) -> float:
        return float(np.hypot(ndimage.sobel(image, 0), ndimage.sobel(image, 1))[core].mean())

    return {
        "pixel_r": float(np.corrcoef(reference[both], other[both])[0, 1]),
        "histogram_distance": float(stats.wasserstein_distance(reference[first], other[second])),
        "sharpness_ratio": sharpness(other) / sharpness(reference),
        "noise_ratio": noise_level(other) / noise_level(reference),
        "mask_dice": float(2 * both.sum() / (first.sum() + second.sum())),
    }


class SliceQualityd(MapTransform):
    """Store :func:`slice_quality` of a loaded model-input image under ``quality_key``.

    Takes the ``(channels, H, W, levels)`` layout of :class:`scripts.transforms.AsSliceLevelsd` (or ``(channels, H,
    W)``) and scores the centre channel of the centre level, the paper's medial slice. Deterministic, so a
    ``CacheDataset`` computes it once.
    """

    def __init__(self, keys: KeysCollection, quality_key: str = "quality", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.quality_key = quality_key

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key])
            if image.ndim == 4:
                image = image[..., image.shape[-1] // 2]
            d[self.quality_key] = slice_quality(image[image.shape[0] // 2].float().numpy())
        return d
