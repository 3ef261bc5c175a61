"""Image quality of a model-input slice, written with every prediction, and how unlike the model's own scans it is.

Three image-quality metrics (IQMs, as MRIQC computes them on whole volumes), over the skull-stripped brain of the
slice away from its edge:

* ``quality``, the coefficient of joint variation of grey and white matter (CJV; Ganzetti et al., Front.
  Neuroinform. 2016), ``(sd_WM + sd_GM) / |mean_WM - mean_GM|``, lower is better: noise, blur and a flattened
  contrast all raise it. Grey and white matter are the two brighter components of a three-class Gaussian mixture
  of the brain's intensities (CSF, GM, WM), fitted by EM, so no segmentation model is needed. Grey/white contrast
  also falls with age, so old brains score somewhat worse than young ones at the same acquisition quality;
* ``noise_level``, Immerkaer's noise sd;
* ``sharpness``, the mean gradient magnitude (thick slices resampled to 1 mm lower it).

No one of them separates a clinical acquisition from a research one (a thick-slice scan can be smoother, and so
less noisy, than a research scan); together they do. :class:`AcquisitionReference` holds their distribution over
the scans the model was trained and selected on, and a scan's ``atypicality`` is its Mahalanobis distance from it:
the prediction interval is calibrated separately for typical and atypical scans
(:class:`scripts.calibration.PredictionInterval`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from scipy import ndimage

from scripts.slices import centre_level

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
    core = _brain_core(image)
    if core.sum() < MIN_PIXELS:
        return math.nan
    mean, sd, _ = gaussian_mixture_1d(image[core])
    contrast = abs(mean[2] - mean[1])
    return float((sd[1] + sd[2]) / contrast) if contrast > 1e-6 else math.inf


def _brain_core(image: np.ndarray) -> np.ndarray:
    """The brain of a skull-stripped slice, away from its edge."""
    return ndimage.binary_erosion(image > BRAIN_THRESHOLD, iterations=EDGE_PIXELS)


def sharpness(image: np.ndarray, where: np.ndarray | None = None) -> float:
    """Mean gradient magnitude (Sobel) of a slice ``(H, W)`` over ``where`` (default: the brain away from its edge)."""
    image = np.asarray(image, dtype=np.float64)
    where = _brain_core(image) if where is None else where
    if where.sum() < MIN_PIXELS:
        return math.nan
    return float(np.hypot(ndimage.sobel(image, 0), ndimage.sobel(image, 1))[where].mean())


def noise_level(image: np.ndarray | torch.Tensor) -> float:
    """Noise sd of a skull-stripped slice ``(H, W)`` by Immerkaer's estimator (CVIU 1996), over the brain away from
    its edge: the mean absolute response to the Laplacian-difference mask, times sqrt(pi/2) / 6."""
    image = np.asarray(image, dtype=np.float64)
    core = _brain_core(image)
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
    return {
        "pixel_r": float(np.corrcoef(reference[both], other[both])[0, 1]),
        "histogram_distance": float(stats.wasserstein_distance(reference[first], other[second])),
        "sharpness_ratio": sharpness(other, core) / sharpness(reference, core),
        "noise_ratio": noise_level(other) / noise_level(reference),
        "mask_dice": float(2 * both.sum() / (first.sum() + second.sum())),
    }


#: The image-quality metrics of a slice, in the order :func:`slice_metrics` returns them (predictions.csv columns).
QUALITY_METRICS = ("quality", "noise_level", "sharpness")


def slice_metrics(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """:data:`QUALITY_METRICS` of a skull-stripped slice ``(H, W)`` in [0, 1] (NaN when it has too little brain)."""
    image = np.asarray(image, dtype=np.float64)
    return np.array([slice_quality(image), noise_level(image), sharpness(image)])


@dataclass(frozen=True)
class AcquisitionReference:
    """The distribution of :data:`QUALITY_METRICS` (their logarithms: mean and covariance) over reference scans.

    A scan's :meth:`atypicality` is the Mahalanobis distance of its log-metrics from the reference: about the
    length of a 3-d standard normal vector (median 1.5; 99.9 % below :data:`ATYPICAL`) for scans drawn like the
    reference, and larger for other acquisitions (thick slices, more noise, another contrast).
    """

    mean: tuple[float, ...]
    covariance: tuple[tuple[float, ...], ...]
    n: int

    @classmethod
    def fit(cls, metrics) -> "AcquisitionReference":
        """From an ``(N, 3)`` array of metrics; rows with a missing or non-positive metric are left out."""
        logs = _log_metrics(metrics)
        logs = logs[np.isfinite(logs).all(axis=1)]
        if len(logs) < MIN_REFERENCE:
            raise ValueError(f"an acquisition reference needs >= {MIN_REFERENCE} scored scans, got {len(logs)}")
        covariance = np.cov(logs.T) + 1e-9 * np.eye(logs.shape[1])  # never singular
        return cls(tuple(logs.mean(axis=0).tolist()), tuple(map(tuple, covariance.tolist())), len(logs))

    def atypicality(self, metrics) -> np.ndarray:
        """Mahalanobis distance of each scan's log-metrics from the reference (NaN where a metric is missing)."""
        offset = _log_metrics(metrics) - np.asarray(self.mean)
        distance = np.sqrt(np.einsum("ij,jk,ik->i", offset, np.linalg.inv(np.asarray(self.covariance)), offset))
        return np.where(np.isfinite(distance), distance, np.nan)


#: Scans farther than this from the reference are atypical: the 99.9th percentile of the distance of a 3-d
#: standard normal vector (chi with 3 degrees of freedom). Not the 99th: a covariance estimated from ~100
#: validation scans makes the tail heavier, and the 99th put 2-3 % of research scans in the atypical band.
ATYPICAL = 4.033
MIN_REFERENCE = 6  # a 3 x 3 covariance needs more scans than metrics; below 20 or so it is noisy


def _log_metrics(metrics) -> np.ndarray:
    values = np.asarray(metrics, dtype=np.float64).reshape(-1, len(QUALITY_METRICS))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(values > 0, np.log(np.where(values > 0, values, 1.0)), np.nan)


class SliceQualityd(MapTransform):
    """Store :func:`slice_metrics` of a loaded model-input image under ``quality_key`` (a float32 tensor of 3).

    Takes the ``(channels, H, W, levels)`` layout of :class:`scripts.slices.AsSliceLevelsd` (or ``(channels, H,
    W)``) and scores the centre channel of the centre level, the paper's medial slice. Deterministic, so a
    ``CacheDataset`` computes it once.
    """

    def __init__(self, keys: KeysCollection, quality_key: str = "quality", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.quality_key = quality_key

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            image = centre_level(torch.as_tensor(d[key])[None])[0]
            metrics = slice_metrics(image[image.shape[0] // 2].float().numpy())
            d[self.quality_key] = torch.as_tensor(metrics, dtype=torch.float32)
        return d
