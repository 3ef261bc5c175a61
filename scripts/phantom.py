"""Synthetic ageing-brain phantom: T1w brains whose appearance is driven by a known *brain age*.

Real brain-age cohorts cannot be downloaded at run time, so this generator is the bundle's embedded
default dataset, the data every test uses and the ground truth every benchmark is scored against.

Generative model (one per subject, shared by both outputs):

* **Anatomy** comes from nilearn's offline MNI152 ICBM 2009 template (grey/white-matter and brain
  maps). Around the skull-stripped template the phantom adds extracerebral CSF, a skull with marrow
  and a scalp, so that skull stripping has real work to do.
* **Ageing.** Chronological age ``a``, brain age ``b = a + delta``, ``delta ~ N(shift, sigma)``. The
  image depends on ``b`` only, through the effects in :class:`AgeingModel` (ventricular enlargement,
  cortical thinning with sulcal CSF widening, reduced grey/white contrast, T1-hypointense white-matter
  lesions); ``docs/phantom.md`` tabulates their sizes.
* **Nuisance**: a smooth random deformation (brain shape), subject-level offsets of ventricle size
  and cortical thickness, skull thickness, tissue intensities, noise.
* **Acquisition** (:data:`GRADES`): ``research`` (~1 mm isotropic, high SNR, mild bias field) or
  ``clinical`` (thick slices, low SNR, strong bias field, motion ghosting, contrast changes).

Outputs: raw scanner-space NIfTI volumes (random pose, head size, voxel size, orientation code,
int16 with ``scl_slope``) with each subject's true brain mask in the scan's voxel space (to score
skull stripping), or the fast path: already-preprocessed 128x128 medial axial slices in MNI
space, the same format the preprocessing chain writes. Everything is deterministic by seed, and a
subject's anatomy does not depend on the acquisition grade, so ``--grade research`` and
``--grade clinical`` with one seed render the same people on two kinds of scanner.

Run ``python -m scripts.phantom --help``.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage, stats
from tqdm import tqdm

from scripts import cli
from scripts.atomic import write_atomic, write_csv, write_json
from scripts.figures import save_figure, show_slice
from scripts.mni import (
    GRID_SHAPE,
    axial_index,
    field_of_view,
    grid_affine,
    grid_to_template_mask,
    level_offsets,
    load_template,
    slice_points,
)
from scripts.slices import finalise_slice, slice_nifti
from scripts.transforms import n4_correct

logger = logging.getLogger(__name__)
PHANTOM_VERSION = "6"  # bump when rendering changes: cached embedded datasets are regenerated
SPLITS = ("training", "validation", "calibration", "test")


# --------------------------------------------------------------------------------------------
# Ageing model
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AgeingModel:
    """How brain age ``b`` (years) changes the image. Sizes are at ``b = 90`` relative to ``b = 20``.

    ``x(b) = (b - 20) / 70`` runs from 0 at 20 to 1 at 90 (extrapolated a little beyond).

    * Ventricles: the lateral-ventricle boundary moves outwards by ``ventricle_mm * x**1.5`` mm
      (accelerating with age; the septum stays), 2.6x the ventricle area of the medial slice at 90,
      in line with the 2-4x lateral-ventricle volume increase over the adult lifespan.
    * Cortex and global atrophy: tissue within ``cortex_mm * x`` mm of sulcal/extracerebral CSF
      becomes CSF (cortical thinning, sulcal widening, the brain shrinking from the skull); the
      slice's CSF fraction rises from 0.12 to 0.27, as brain parenchymal fraction falls with age.
    * Grey/white contrast: white-matter intensity moves ``contrast_loss`` of the way towards grey
      matter by 90 (T1w GM/WM contrast falls with age).
    * White-matter hypointensities, growing from 40: a periventricular rim of
      ``wmh_rim_mm * y**2`` mm and ``wmh_lesions * y**2`` deep lesions on average, ``y = (b-40)/50``.
    """

    ventricle_mm: float = 4.5
    cortex_mm: float = 2.5
    contrast_loss: float = 0.3
    wmh_rim_mm: float = 3.0
    wmh_lesions: float = 12.0

    @staticmethod
    def x(brain_age: float) -> float:
        return float(np.clip((brain_age - 20.0) / 70.0, -0.25, 1.3))

    def ventricle_dilation(self, brain_age: float) -> float:
        x = self.x(brain_age)
        return self.ventricle_mm * math.copysign(abs(x) ** 1.5, x)

    def cortical_erosion(self, brain_age: float) -> float:
        return self.cortex_mm * max(self.x(brain_age), 0.0)

    def white_matter_contrast(self, brain_age: float) -> float:
        """Fraction of the young GM/WM intensity gap that remains."""
        return 1.0 - self.contrast_loss * max(self.x(brain_age), 0.0)

    @staticmethod
    def _wmh_y(brain_age: float) -> float:
        return float(np.clip((brain_age - 40.0) / 50.0, 0.0, 1.4))

    def wmh_rim(self, brain_age: float) -> float:
        return self.wmh_rim_mm * self._wmh_y(brain_age) ** 2

    def wmh_count(self, brain_age: float) -> float:
        return self.wmh_lesions * self._wmh_y(brain_age) ** 2


AGEING = AgeingModel()

# T1w intensities (arbitrary units, white matter of a young brain = 0.88).
TISSUE = {"csf": 0.22, "gm": 0.60, "wm": 0.88, "wmh": 0.50, "bone": 0.07, "marrow": 0.45, "scalp": 0.92}


# --------------------------------------------------------------------------------------------
# Acquisition grades
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grade:
    """Scanner/protocol properties of an acquisition grade (noise and bias relative to WM)."""

    name: str
    noise: float  # Rician noise sigma / white-matter intensity
    bias: float  # peak-to-mean amplitude of the multiplicative bias field in the raw scan
    voxel_mm: tuple[float, float]  # in-plane voxel size range
    thickness_mm: tuple[float, float]  # slice thickness range
    ghosting: float  # probability of motion ghosting
    gamma: tuple[float, float]  # contrast (power-law) variation range
    intensity_jitter: float  # relative sd of per-scan tissue intensities
    # what the chain's ANTs registration of such scans leaves beyond removing the affine part of the subject's
    # anatomy (sd of rotation per axis in degrees, of isotropic scale, of shift in mm per axis), which the fast path
    # draws instead of running ANTs (measured against the true pose: tests/benchmarks/bench_fidelity.py)
    registration_error: tuple[float, float, float]


GRADES = {
    "research": Grade("research", 0.02, 0.06, (0.9, 1.1), (0.9, 1.1), 0.0, (0.95, 1.05), 0.03, (0.2, 0.003, 0.15)),
    "clinical": Grade("clinical", 0.06, 0.30, (0.8, 1.0), (4.0, 6.0), 0.7, (0.75, 1.35), 0.08, (0.2, 0.004, 0.35)),
}
GRADE_CHOICES = (*GRADES, "mixed")


# --------------------------------------------------------------------------------------------
# Atlas: template maps plus the distance maps the ageing effects act on
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Atlas:
    """Template-derived maps on the 1 mm MNI grid (with a margin of air), see :func:`_as_volume`."""

    maps: torch.Tensor  # (1, C, Z, Y, X): gm, wm, brain, ventricle sdist, cortical depth, head distance
    affine: np.ndarray
    wm_points: np.ndarray  # (N, 3) MNI mm of deep white matter, where lesions are placed

    CHANNELS = ("gm", "wm", "brain", "ventricle_sdist", "cortical_depth", "head_dist")


# Atlas channel values of air (outside the head): no tissue, far from ventricles, cortex and head.
AIR = (0.0, 0.0, 0.0, 40.0, 15.0, 40.0)


def _signed_distance(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance (mm, 1 mm grid) to the mask boundary: negative inside, positive outside."""
    return ndimage.distance_transform_edt(~mask) - ndimage.distance_transform_edt(mask)


@lru_cache(maxsize=1)
def build_atlas() -> Atlas:
    """Derive the phantom's maps from the template once per process (~5 s)."""
    tpl = load_template(1)
    gm, wm, brain = tpl.gm, tpl.wm, (tpl.mask > 0.5).astype(np.float32)
    csf = np.clip(brain - gm - wm, 0, 1)
    mm = [tpl.affine[d, 3] + np.arange(tpl.shape[d]) for d in range(3)]
    # Lateral ventricles: large CSF components in a box around the midline at ventricle level.
    box = (
        (np.abs(mm[0]) < 30)[:, None, None]
        & ((mm[1] > -50) & (mm[1] < 35))[None, :, None]
        & ((mm[2] > -10) & (mm[2] < 40))[None, None, :]
    )
    labels, n = ndimage.label((csf > 0.5) & box)
    sizes = ndimage.sum(np.ones_like(labels), labels, range(1, n + 1))
    ventricles = np.isin(labels, np.flatnonzero(sizes > 1000) + 1)
    # Depth below the CSF that surrounds the cortex (sulci and the extracerebral space).
    outer_csf = ((csf > 0.5) & ~ventricles) | (brain < 0.5)
    cortical_depth = ndimage.distance_transform_edt(~outer_csf)
    # A smooth envelope around the brain, so the skull does not follow every gyrus.
    envelope = ndimage.gaussian_filter(brain, 4.0) > 0.25
    maps = np.stack(
        [
            gm,
            wm,
            brain,
            np.clip(_signed_distance(ventricles), -15, AIR[3]),
            np.clip(cortical_depth, 0, AIR[4]),
            np.clip(_signed_distance(envelope), -30, AIR[5]),
        ]
    ).astype(np.float32)
    # A margin of air, so that samples beyond the template's box (read with border padding) are air.
    maps = np.stack([np.pad(m, 2, constant_values=v) for m, v in zip(maps, AIR)])
    affine = tpl.affine.copy()
    affine[:3, 3] -= 2 * np.diag(affine)[:3]
    deep_wm = np.argwhere(ndimage.binary_erosion(wm > 0.9, iterations=2))
    wm_points = (deep_wm @ tpl.affine[:3, :3].T + tpl.affine[:3, 3]).astype(np.float32)
    return Atlas(_as_volume(maps), affine, wm_points)


@lru_cache(maxsize=1)
def _brain_sample_points() -> np.ndarray:
    """Every 100th point of the template brain on the 130^3 grid (MNI mm), for fitting affine maps of the anatomy."""

    brain = np.argwhere(grid_to_template_mask())[::100].astype(np.float64)
    return brain @ grid_affine()[:3, :3].T + grid_affine()[:3, 3]


def _as_volume(array: np.ndarray) -> torch.Tensor:
    """``(C, X, Y, Z)`` array -> ``(1, C, Z, Y, X)`` tensor for ``grid_sample``.

    With x fastest in memory, the points of an axial plane read neighbouring memory, which makes
    sampling several times faster than the template's own x-slowest layout.
    """
    return torch.from_numpy(np.ascontiguousarray(np.transpose(array, (0, 3, 2, 1)), dtype=np.float32))[None]


def _sample(volume: torch.Tensor, affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Trilinear samples of a :func:`_as_volume` volume at world points ``(..., 3)`` -> ``(C, ...)``."""
    shape = np.asarray(volume.shape[:1:-1], dtype=np.float64)
    # world -> normalised (x, y, z) grid coordinates, align_corners=True convention
    to_norm = np.diag([*(2.0 / (shape - 1)), 1.0]) @ np.linalg.inv(affine)
    to_norm[:3, 3] -= 1.0
    to_norm = torch.from_numpy(to_norm[:3].astype(np.float32))
    pts = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32).reshape(-1, 3))
    grid = torch.addmm(to_norm[:, 3], pts, to_norm[:, :3].T).view(1, 1, 1, -1, 3)
    out = F.grid_sample(volume, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.view(volume.shape[1], *points.shape[:-1]).numpy()


def _sample_grid(volume: torch.Tensor, affine: np.ndarray, grid_affine_: np.ndarray, dims) -> np.ndarray:
    """Trilinear resampling of a :func:`_as_volume` volume onto a regular ``[x, y, z]`` grid
    (voxel->world affine ``grid_affine_``, shape ``dims``), built by broadcasting."""
    shape = np.asarray(volume.shape[:1:-1], dtype=np.float64)
    to_norm = np.diag([*(2.0 / (shape - 1)), 1.0]) @ np.linalg.inv(affine) @ grid_affine_
    to_norm[:3, 3] -= 1.0
    m = torch.from_numpy(to_norm[:3].astype(np.float32))
    i, j, k = (torch.arange(n, dtype=torch.float32) for n in dims)
    grid = (
        m[:, 3] + i[:, None, None, None] * m[:, 0] + j[None, :, None, None] * m[:, 1] + k[None, None, :, None] * m[:, 2]
    )
    out = F.grid_sample(volume, grid[None], mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0, 0].numpy()


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


# --------------------------------------------------------------------------------------------
# Subjects
# --------------------------------------------------------------------------------------------
@dataclass
class Subject:
    """One phantom participant: labels (what a dataset would record) and truth (what it would not)."""

    subject: str
    age: float
    brain_age: float
    cohort: str  # healthy | disease
    split: str  # training | validation | test | disease
    labelled: bool
    grade: str
    seed: int
    survival_months: float | None = None
    session: int = 0  # acquisition: 0 the first scan; k > 0 a re-scan (fresh noise, pose, bias field)

    @property
    def delta(self) -> float:
        return self.brain_age - self.age


@dataclass(frozen=True)
class CohortSpec:
    """Everything that defines a generated dataset (also its cache key)."""

    n: int = 200
    seed: int = 0
    grade: str = "research"
    age_min: float = 18.0
    age_max: float = 90.0
    sigma: float = 5.0
    n_disease: int | None = None  # default: n // 5
    disease_shift: float = 8.0
    disease_age_mean: float = 61.0
    disease_age_sd: float = 10.9
    survival_median_months: float = 36.0
    survival_per_year: float = 0.06  # log-survival falls by this per year of excess brain age
    survival_noise: float = 0.35  # sd of log-survival not explained by brain age
    unlabelled_fraction: float = 0.25
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    clinical_fraction: float = 0.5  # share of clinical scans when grade == "mixed"
    # a calibration split (labelled healthy people, for the prediction interval): how many, and their grade
    # ("mixed": clinical with clinical_fraction, so the interval is calibrated for both kinds of scan)
    n_calibration: int = 0
    calibration_grade: str = "mixed"
    session: int = 0  # 0: the first scans; k > 0: the same people re-scanned (test-retest)

    def __post_init__(self):
        if self.session < 0:
            raise ValueError(f"session must be >= 0, got {self.session}")
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if not self.age_min < self.age_max:
            raise ValueError(f"age range is empty or reversed: {self.age_min} .. {self.age_max}")
        if self.grade not in GRADE_CHOICES:
            raise ValueError(f"unknown grade {self.grade!r}; choose from {', '.join(GRADE_CHOICES)}")
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must leave subjects for training")
        if self.n_calibration < 0:
            raise ValueError(f"n_calibration must be >= 0, got {self.n_calibration}")
        if self.calibration_grade not in GRADE_CHOICES:
            raise ValueError(
                f"unknown calibration grade {self.calibration_grade!r}; choose from {', '.join(GRADE_CHOICES)}"
            )

    @property
    def disease_count(self) -> int:
        return self.n // 5 if self.n_disease is None else self.n_disease


def sample_cohort(spec: CohortSpec) -> list[Subject]:
    """Draw ages, brain ages, splits and survival for the healthy and disease cohorts."""
    rng = np.random.default_rng([spec.seed, 0])
    seeds = np.random.SeedSequence(spec.seed).generate_state(spec.n + spec.disease_count + spec.n_calibration)
    n_val, n_test = round(spec.n * spec.val_fraction), round(spec.n * spec.test_fraction)
    n_train = spec.n - n_val - n_test
    splits = np.array(["training"] * n_train + ["validation"] * n_val + ["test"] * n_test)
    rng.shuffle(splits)
    train_idx = np.flatnonzero(splits == "training")
    unlabelled = set(rng.permutation(train_idx)[: round(n_train * spec.unlabelled_fraction)].tolist())

    ages = rng.uniform(spec.age_min, spec.age_max, spec.n)
    deltas = rng.normal(0.0, spec.sigma, spec.n)
    clinical = rng.random(spec.n + spec.disease_count) < spec.clinical_fraction

    def grade(i: int) -> str:
        if spec.grade != "mixed":
            return spec.grade
        return "clinical" if clinical[i] else "research"

    subjects = [
        Subject(
            subject=f"sub-{i + 1:04d}",
            age=round(float(ages[i]), 2),
            brain_age=round(float(ages[i] + deltas[i]), 2),
            cohort="healthy",
            split=str(splits[i]),
            labelled=i not in unlabelled,
            grade=grade(i),
            seed=int(seeds[i]),
            session=spec.session,
        )
        for i in range(spec.n)
    ]
    nd = spec.disease_count
    d_ages = np.clip(rng.normal(spec.disease_age_mean, spec.disease_age_sd, nd), spec.age_min, spec.age_max)
    d_deltas = rng.normal(spec.disease_shift, spec.sigma, nd)
    log_surv = (
        math.log(spec.survival_median_months)
        - spec.survival_per_year * (d_deltas - spec.disease_shift)
        + rng.normal(0.0, spec.survival_noise, nd)
    )
    for j in range(nd):
        i = spec.n + j
        subjects.append(
            Subject(
                subject=f"sub-D{j + 1:03d}",
                age=round(float(d_ages[j]), 2),
                brain_age=round(float(d_ages[j] + d_deltas[j]), 2),
                cohort="disease",
                split="disease",
                labelled=True,
                grade=grade(i),
                seed=int(seeds[i]),
                survival_months=round(float(np.exp(log_surv[j])), 1),
                session=spec.session,
            )
        )
    # drawn after everyone else, so that adding a calibration split changes no other person
    nc = spec.n_calibration
    c_ages, c_deltas = rng.uniform(spec.age_min, spec.age_max, nc), rng.normal(0.0, spec.sigma, nc)
    c_clinical = rng.random(nc) < spec.clinical_fraction
    for j in range(nc):
        i = spec.n + nd + j
        c_grade = spec.calibration_grade
        if c_grade == "mixed":
            c_grade = "clinical" if c_clinical[j] else "research"
        subjects.append(
            Subject(
                subject=f"sub-C{j + 1:03d}",
                age=round(float(c_ages[j]), 2),
                brain_age=round(float(c_ages[j] + c_deltas[j]), 2),
                cohort="healthy",
                split="calibration",
                labelled=True,
                grade=c_grade,
                seed=int(seeds[i]),
                session=spec.session,
            )
        )
    return subjects


# --------------------------------------------------------------------------------------------
# Rendering in MNI space
# --------------------------------------------------------------------------------------------
@dataclass
class Anatomy:
    """Subject-specific anatomy: everything about the person, nothing about the scanner."""

    brain_age: float
    warp_k: np.ndarray  # (K, 3) wave vectors (rad/mm) of the smooth deformation
    warp_phase: np.ndarray  # (K,)
    warp_amp: np.ndarray  # (K, 3) displacement amplitude (mm)
    ventricle_offset: float  # mm, subject-level ventricle size independent of age
    cortex_offset: float  # mm
    skull_scale: float
    lesions: np.ndarray  # (L, 4): x, y, z (atlas mm), radius (mm)

    @classmethod
    def draw(cls, subject: Subject, atlas: Atlas, ageing: AgeingModel | None = None) -> "Anatomy":
        ageing = ageing or AGEING
        rng = np.random.default_rng([subject.seed, 1])
        k = 6
        direction = rng.normal(size=(k, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        wavelength = rng.uniform(70.0, 180.0, k)
        # Lesions come from their own stream so that brain age changes nothing else about the person.
        lesion_rng = np.random.default_rng([subject.seed, 1, 1])
        n_lesions = lesion_rng.poisson(ageing.wmh_count(subject.brain_age))
        centres = atlas.wm_points[lesion_rng.integers(0, len(atlas.wm_points), n_lesions)]
        radii = lesion_rng.uniform(1.5, 3.5, (n_lesions, 1)).astype(np.float32)
        return cls(
            brain_age=subject.brain_age,
            warp_k=direction * (2 * np.pi / wavelength)[:, None],
            warp_phase=rng.uniform(0, 2 * np.pi, k),
            warp_amp=rng.normal(0.0, 0.9, (k, 3)),
            ventricle_offset=float(rng.normal(0.0, 0.5)),
            cortex_offset=float(rng.normal(0.0, 0.15)),
            skull_scale=float(rng.uniform(0.85, 1.2)),
            lesions=np.hstack([centres, radii]),
        )

    def to_atlas(self, points: np.ndarray) -> np.ndarray:
        """MNI position of the subject -> corresponding template position (smooth deformation)."""
        pts = points.astype(np.float32)
        waves = np.sin(pts @ self.warp_k.T.astype(np.float32) + self.warp_phase.astype(np.float32))
        return pts + waves @ self.warp_amp.astype(np.float32)

    def affine_part(self) -> np.ndarray:
        """The 4x4 affine map closest (least squares over the template brain) to :meth:`to_atlas`: what an affine
        registration of this subject to the template takes out of its anatomy."""
        points = _brain_sample_points()
        design = np.hstack([points, np.ones((len(points), 1))])
        coefficients, *_ = np.linalg.lstsq(design, self.to_atlas(points).astype(np.float64), rcond=None)
        affine = np.eye(4)
        affine[:3, :] = coefficients.T
        return affine


def render(
    anatomy: Anatomy,
    points: np.ndarray,
    atlas: Atlas | None = None,
    tissue: dict | None = None,
    ageing: AgeingModel | None = None,
) -> dict[str, np.ndarray]:
    """Noise-free T1w intensity and tissue fractions of a subject at MNI points ``(..., 3)``."""
    atlas = atlas or build_atlas()
    ageing = ageing or AGEING
    tissue = tissue or TISSUE
    p = anatomy.to_atlas(points)
    gm, wm, brain, vent_dist, depth, head_dist = _sample(atlas.maps, atlas.affine, p)
    b = anatomy.brain_age
    # The septum pellucidum (midline) keeps the two lateral ventricles apart as they widen.
    lateral = np.clip((np.abs(p[..., 0]) - 1.0) / 3.0, 0.0, 1.0)
    dilation = (ageing.ventricle_dilation(b) + anatomy.ventricle_offset) * lateral
    ventricle = _sigmoid((dilation - vent_dist) / 0.5)
    eroded = _sigmoid((ageing.cortical_erosion(b) + anatomy.cortex_offset - depth) / 0.35) * (depth < 8)
    keep = (1.0 - ventricle) * (1.0 - eroded)
    gm, wm = gm * keep, wm * keep
    rim = ageing.wmh_rim(b)
    lesion = _sigmoid((rim - vent_dist) / 0.7) * (rim > 0)
    for x, y, z, radius in anatomy.lesions:
        d2 = (p[..., 0] - x) ** 2 + (p[..., 1] - y) ** 2 + (p[..., 2] - z) ** 2
        lesion = lesion + np.exp(d2 * (-0.5 / radius**2))
    lesion = np.clip(lesion, 0, 1) * wm
    csf = np.clip(brain - gm - wm, 0, 1)
    wm_level = tissue["gm"] + (tissue["wm"] - tissue["gm"]) * ageing.white_matter_contrast(b)
    # Extracerebral layers by distance outside the brain envelope: CSF, bone (marrow inside), scalp.
    d = head_dist / anatomy.skull_scale
    bone = _sigmoid((d - 1.5) / 0.4) * _sigmoid((7.0 - d) / 0.4)
    marrow = _sigmoid((d - 3.3) / 0.5) * _sigmoid((5.3 - d) / 0.5)
    scalp = _sigmoid((d - 7.0) / 0.4) * _sigmoid((12.5 - d) / 0.6)
    outside = (
        (1 - bone) * (1 - scalp) * _sigmoid((1.5 - d) / 0.4) * tissue["csf"]
        + bone * ((1 - marrow) * tissue["bone"] + marrow * tissue["marrow"])
        + scalp * tissue["scalp"]
    )
    intensity = (
        gm * tissue["gm"]
        + (wm - lesion) * wm_level
        + lesion * tissue["wmh"]
        + csf * tissue["csf"]
        + (1.0 - brain) * outside
    )
    return {"intensity": intensity, "gm": gm, "wm": wm, "csf": csf, "lesion": lesion, "brain": brain}


# --------------------------------------------------------------------------------------------
# Acquisition
# --------------------------------------------------------------------------------------------
def _smooth_field(rng: np.random.Generator, points: np.ndarray, amplitude: float) -> np.ndarray:
    """Multiplicative smooth field (bias) with low spatial frequencies, ~``1 +- amplitude``."""
    k = 4
    direction = rng.normal(size=(k, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    wave = direction * (2 * np.pi / rng.uniform(150.0, 400.0, k))[:, None]
    phase = rng.uniform(0, 2 * np.pi, k)
    weights = rng.normal(size=k)
    weights *= amplitude / max(np.abs(weights).sum(), 1e-6)
    field = np.cos(points.astype(np.float32) @ wave.T.astype(np.float32) + phase.astype(np.float32))
    return np.exp(field @ weights.astype(np.float32))


def _rician(image: np.ndarray, sigma: float, noise_seed: int, index: np.ndarray) -> np.ndarray:
    """The magnitude of ``image`` plus complex Gaussian noise of ``sigma``, the noise a function of the scanner voxel
    ``index`` (uint64, C order over the acquisition's ``dims``; :func:`_voxel_normals`): the raw volume and the fast
    path read the same noise at the same voxel, so the two renderings of a scan are one acquisition."""
    real = image.astype(np.float32) + sigma * _voxel_normals(noise_seed, 2 * index)
    imag = sigma * _voxel_normals(noise_seed, 2 * index + np.uint64(1))
    return np.sqrt(real * real + imag * imag)


def _ghosting(image: np.ndarray, axis: int, period: float, amplitude: float, phase: float) -> np.ndarray:
    """Periodic motion during phase encoding along ``axis``: k-space phase errors -> ghosts."""
    n = image.shape[axis]
    lines = np.arange(n) - n // 2
    modulation = amplitude * np.sin(2 * np.pi * lines / period + phase)
    shape = [1] * image.ndim
    shape[axis] = n
    kspace = np.fft.fftshift(np.fft.fft(image, axis=axis), axes=axis)
    kspace *= np.exp(1j * modulation).reshape(shape)
    return np.abs(np.fft.ifft(np.fft.ifftshift(kspace, axes=axis), axis=axis)).astype(np.float32)


def _ghost_draw(rng: np.random.Generator) -> tuple[float, float, float]:
    """The period, amplitude and phase of a motion ghost, in the order the first phantom versions drew them."""
    return float(rng.uniform(4.0, 16.0)), float(rng.uniform(0.15, 0.6)), float(rng.uniform(0, 2 * np.pi))


def _contrast(rng: np.random.Generator, grade: Grade) -> tuple[dict, float]:
    tissue = {k: v * float(rng.normal(1.0, grade.intensity_jitter)) for k, v in TISSUE.items()}
    return tissue, float(rng.uniform(*grade.gamma))


def _rotation(rng: np.random.Generator, sd_deg: float) -> np.ndarray:
    angles = np.deg2rad(rng.normal(0.0, sd_deg, 3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _acquisition_key(subject: Subject, stream: int) -> list[int]:
    """Seed of a scan's acquisition (noise, pose, bias field, ...): the subject, the output kind, the grade and,
    for a re-scan, the session; session 0 keeps the key of the first phantom versions."""
    key = [subject.seed, stream, list(GRADES).index(subject.grade)]
    return key + [subject.session] if subject.session else key


def render_slice(
    subject: Subject,
    anatomy: Anatomy | None = None,
    channels: int = 1,
    slice_offset: int = 0,
    acquire: bool = True,
    levels: int = 1,
    level_spacing: int = 4,
) -> np.ndarray:
    """The fast path: the preprocessed model input ``(channels, 128, 128)`` in [0, 1], as the chain would make it of
    the subject's raw volume, at a small fraction of the cost.

    The raw volume's acquisition itself (:func:`draw_acquisition`: pose, voxel grid and thick slices, bias field,
    motion ghosting, contrast) is rendered, but only at the scanner voxels the slice is interpolated from; then the
    chain's own steps follow: a registration with the chain's error (``Grade.registration_error``, measured against
    the true pose by ``tests/benchmarks/bench_fidelity.py``), trilinear resampling onto the 130^3 grid's plane, N4
    (:func:`scripts.transforms.n4_correct`, on the plane), HD-BET's mask (:func:`_hdbet_mask`) and
    :func:`scripts.slices.finalise_slice`. Only the expensive steps are emulated: the registration's error
    is drawn rather than estimated, and HD-BET's mask is drawn from the true brain as HD-BET draws it.
    ``acquire=False`` gives the noise-free ground truth of a perfect acquisition and registration. With ``levels``
    > 1: ``(levels * channels, 128, 128)``, the axial levels of :func:`scripts.mni.level_offsets` of one acquisition.
    """
    atlas = build_atlas()
    anatomy = anatomy or Anatomy.draw(subject, atlas)
    grid = grid_affine()
    indices = [
        axial_index(level + c - channels // 2)
        for level in level_offsets(levels, level_spacing, slice_offset)
        for c in range(channels)
    ]
    i, j = np.meshgrid(np.arange(GRID_SHAPE[0]), np.arange(GRID_SHAPE[1]), indexing="ij")
    planes = np.stack([np.stack([i, j, np.full_like(i, k)], -1) for k in indices]).astype(np.float64)
    points = planes @ grid[:3, :3].T + grid[:3, 3]  # (planes, 130, 130, 3) MNI mm
    if not acquire:
        maps = render(anatomy, points, atlas)
        return finalise_slice(np.where(maps["brain"] > 0.5, maps["intensity"], 0.0).astype(np.float32), levels=levels)
    grade = GRADES[subject.grade]
    acquisition = draw_acquisition(subject)
    rng = np.random.default_rng(_acquisition_key(subject, 2))  # the fast path's own: the registration error
    # MNI -> MNI, the chain's estimated map against the true pose: an affine registration to the template removes
    # the affine part of the subject's anatomy (its deformation), and leaves a small error of its own
    error = np.linalg.inv(anatomy.affine_part()) @ _registration_error(rng, grade)
    to_voxels = np.linalg.inv(acquisition.affine) @ acquisition.pose @ error
    coordinates = points @ to_voxels[:3, :3].T + to_voxels[:3, 3]
    scanner = _ScannerVoxels(acquisition, anatomy, atlas, grade)
    image = _interpolate_voxels(coordinates.reshape(-1, 3), scanner, acquisition.dims).reshape(points.shape[:-1])
    spacing = np.diag(grid)[:2]
    image = np.stack([n4_correct(plane, spacing) for plane in image])
    maps = render(anatomy, points @ error[:3, :3].T + error[:3, 3], atlas)  # what the resampled image shows
    mask = np.stack([_hdbet_mask(brain, csf) for brain, csf in zip(maps["brain"], maps["csf"])])
    return finalise_slice(np.where(mask, image, 0.0).astype(np.float32), levels=levels)


# HD-BET's brain mask, emulated from the subject's true brain: HD-BET draws the brain's edge a little inside the
# template's (a brain fraction of 0.8, not 0.5) and trims the rim of outer CSF there (CSF fraction > 0.9 within
# 2 mm of the edge), most in atrophied brains. Its edge is smooth: a network's mask bridges the notches the trimming
# cuts (the interhemispheric fissure at the poles, sulci open to the surface), so the trimmed mask is closed with a
# 5 mm disc, within the template's brain (fraction > 0.5). Fitted to HD-BET 1.x's masks through the chain
# (tests/benchmarks/bench_fidelity.py: Dice with them 0.988-0.992); without the closing, the model read the cut
# notches as atrophy and gave the chain's slices ages 2.4 y (research) and 3.6 y (clinical) younger (docs/phantom.md).
HDBET_BRAIN_FRACTION, HDBET_RIM_MM, HDBET_RIM_CSF, HDBET_CLOSING_MM = 0.8, 2.0, 0.9, 5.0


def _hdbet_mask(brain: np.ndarray, csf: np.ndarray) -> np.ndarray:
    """The mask HD-BET would draw on a plane ``(130, 130)`` of the grid: see :data:`HDBET_BRAIN_FRACTION`."""
    spacing = np.diag(grid_affine())[:2]
    mask = brain > HDBET_BRAIN_FRACTION
    depth = ndimage.distance_transform_edt(mask, sampling=spacing)
    trimmed = mask & ~((csf > HDBET_RIM_CSF) & (depth <= HDBET_RIM_MM))
    return _closing(trimmed, HDBET_CLOSING_MM, spacing) & (brain > 0.5)


def _closing(mask: np.ndarray, radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    """Morphological closing of a 2D mask by a disc of ``radius_mm`` in physical units (exact, by distances)."""
    pad = int(np.ceil(radius_mm / spacing.min())) + 1
    padded = np.pad(mask, pad)
    dilated = ndimage.distance_transform_edt(~padded, sampling=spacing) <= radius_mm
    closed = ndimage.distance_transform_edt(dilated, sampling=spacing) > radius_mm
    return closed[pad:-pad, pad:-pad]


def _registration_error(rng: np.random.Generator, grade: Grade) -> np.ndarray:
    """A 4x4 MNI -> MNI map: rotation, isotropic scale and shift with the grade's sds, about the brain's centre (what
    the chain's registration adds to removing the affine part of the anatomy)."""
    rotation_sd, scale_sd, shift_sd = grade.registration_error
    centre = np.array([0.0, -18.0, 18.0])  # MNI mm, the middle of the template brain
    error = np.eye(4)
    error[:3, :3] = _rotation(rng, rotation_sd) * (1.0 + rng.normal(0.0, scale_sd))
    error[:3, 3] = centre - error[:3, :3] @ centre + rng.normal(0.0, shift_sd, 3)
    return error


class _ScannerVoxels:
    """Values of a raw volume at chosen scanner voxels, computed as :func:`render_volume` would compute them.

    The anatomy of a voxel is the head rendered on the 130^3 MNI grid (only the slab of grid slices the voxels
    need), averaged over the thick-slice profile; times the bias field; with motion ghosting, plus the shifted
    copies of the image along the phase-encoding axis (the k-space phase error ``a sin(2 pi f / P + t)`` is
    ``sum_m J_m(a) e^{i m t}`` times the image shifted by ``m N / P`` voxels; ``|m| <= 2``, J_3 < 0.4 %), rendered
    straight at their (possibly far) positions at the profile's centre; then Rician noise and the contrast curve.
    Noise is keyed by the scanner voxel (:func:`_rician`, the acquisition's ``noise_seed``): the raw volume's own
    noise, voxel for voxel, whichever slices or levels ask for it.
    """

    GHOST_ORDERS = (-2, -1, 1, 2)

    def __init__(self, acquisition: Acquisition, anatomy: Anatomy, atlas: Atlas, grade: Grade) -> None:
        self.acquisition, self.anatomy, self.atlas, self.grade = acquisition, anatomy, atlas, grade
        self.to_grid = np.linalg.inv(acquisition.pose @ grid_affine())  # world -> grid index

    def __call__(self, voxels: np.ndarray) -> np.ndarray:
        acq = self.acquisition
        voxels = voxels.astype(np.float64)
        world = self._world(voxels)
        profile = np.stack([world + dz * np.eye(3)[acq.slice_axis] for dz in acq.profile])  # (profile, N, 3)
        grid_index = profile.reshape(-1, 3) @ self.to_grid[:3, :3].T + self.to_grid[:3, 3]
        image = self._head_on_grid(grid_index).reshape(len(acq.profile), -1).mean(0) * self._bias(voxels)
        if acq.ghost is not None:
            from scipy.special import jv

            period, amplitude, phase = acq.ghost
            n = acq.dims[acq.ghost_axis]
            complex_sum = jv(0, amplitude) * image.astype(np.complex128)
            for m in self.GHOST_ORDERS:
                shifted = voxels.copy()
                shifted[:, acq.ghost_axis] = np.mod(shifted[:, acq.ghost_axis] + m * n / period, n)
                copy = self._head_at(self._world(shifted)) * self._bias(shifted)
                complex_sum += jv(m, amplitude) * np.exp(1j * m * phase) * copy
            image = np.abs(complex_sum)
        index = np.ravel_multi_index(tuple(voxels.astype(np.int64).T), tuple(acq.dims)).astype(np.uint64)
        image = _rician(image, self.grade.noise * TISSUE["wm"], acq.noise_seed, index)
        return np.power(np.clip(image, 0, None) / TISSUE["wm"], acq.gamma) * TISSUE["wm"]

    def _world(self, voxels: np.ndarray) -> np.ndarray:
        return voxels @ self.acquisition.affine[:3, :3].T + self.acquisition.affine[:3, 3]

    def _bias(self, voxels: np.ndarray) -> np.ndarray:
        """The bias field at voxel positions: its coarse grid, trilinear (align_corners) as in render_volume."""
        acq = self.acquisition
        coarse = np.asarray(acq.bias_grid.shape, dtype=np.float64)
        return _interpolate(acq.bias_grid, voxels * (coarse - 1) / (acq.dims - 1))

    def _head_on_grid(self, grid_index: np.ndarray) -> np.ndarray:
        """The head rendered on the 130^3 grid (only the slab of grid slices ``grid_index`` falls between), trilinear
        at grid index positions, 0 off the grid: the head volume :func:`render_volume` samples."""
        low = int(np.clip(np.floor(grid_index[:, 2].min()), 0, GRID_SHAPE[2] - 2))
        high = int(np.clip(np.floor(grid_index[:, 2].max()) + 1, low + 1, GRID_SHAPE[2] - 1))
        grid = grid_affine()
        k = np.arange(low, high + 1, dtype=np.float64)
        y, x = np.arange(GRID_SHAPE[1], dtype=np.float64), np.arange(GRID_SHAPE[0], dtype=np.float64)
        index = np.stack(np.meshgrid(k, y, x, indexing="ij")[::-1], -1)  # (z, y, x, [i, j, k]): x fastest
        slab = render(self.anatomy, index @ grid[:3, :3].T + grid[:3, 3], self.atlas, self.acquisition.tissue)
        return _interpolate(slab["intensity"], grid_index - np.array([0.0, 0.0, low]), layout="zyx")

    def _head_at(self, world: np.ndarray) -> np.ndarray:
        """The head rendered straight at world points (far ghost copies; off the 130^3 grid's box it is air)."""
        mni = world @ np.linalg.inv(self.acquisition.pose)[:3, :3].T + np.linalg.inv(self.acquisition.pose)[:3, 3]
        lo, hi = field_of_view()
        inside = np.all((mni >= lo) & (mni <= hi), axis=1)
        values = np.zeros(len(world))
        values[inside] = render(self.anatomy, mni[inside], self.atlas, self.acquisition.tissue)["intensity"]
        return values


def _voxel_normals(seed: int, index: np.ndarray) -> np.ndarray:
    """Standard normals (float32), one per ``index`` (uint64) and a function of it alone: splitmix64 hashes of
    ``(seed, index)`` as two uniforms, then Box-Muller. Cheap for the few voxels asked, and the same value whenever
    a voxel is asked again."""

    def splitmix(x: np.ndarray) -> np.ndarray:
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))

    with np.errstate(over="ignore"):
        first = splitmix(np.asarray(index, dtype=np.uint64) ^ splitmix(np.full(1, seed, dtype=np.uint64)))
        second = splitmix(first)
    scale = 1.0 / 2.0**53
    u1 = ((first >> np.uint64(11)).astype(np.float64) + 0.5) * scale  # (0, 1)
    u2 = (second >> np.uint64(11)).astype(np.float64) * scale
    return (np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)).astype(np.float32)


def _interpolate(volume: np.ndarray, coordinates: np.ndarray, layout: str = "xyz") -> np.ndarray:
    """Trilinear values of a volume at voxel ``coordinates`` (N, 3) in (x, y, z) order, zero beyond its voxels:
    ``grid_sample`` with ``align_corners=True`` and zero padding, as :func:`_sample_grid`. ``layout`` says how the
    array is indexed: ``"xyz"`` (``[x, y, z]``) or ``"zyx"``."""
    zyx = np.ascontiguousarray(volume if layout == "zyx" else np.transpose(volume, (2, 1, 0)), dtype=np.float32)
    size = np.asarray(zyx.shape[::-1], dtype=np.float64)  # (x, y, z) sizes
    normalised = 2.0 * np.asarray(coordinates, dtype=np.float64) / np.maximum(size - 1, 1) - 1.0
    grid = torch.from_numpy(normalised.astype(np.float32)).view(1, 1, 1, -1, 3)
    out = F.grid_sample(
        torch.from_numpy(zyx)[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True
    )
    return out.view(-1).numpy().astype(np.float64)


def _interpolate_voxels(coordinates: np.ndarray, values_of, dims) -> np.ndarray:
    """Trilinear interpolation at continuous voxel ``coordinates`` (N, 3) of a volume of ``dims`` whose voxel values
    ``values_of(voxels (M, 3))`` computes only for the voxels needed; zero outside the volume (as the chain's
    resampling, zero padding)."""
    dims = np.asarray(dims)
    base = np.floor(coordinates).astype(np.int64)
    frac = coordinates - base
    corners = np.asarray(list(np.ndindex(2, 2, 2)))
    index = base[:, None, :] + corners[None]  # (N, 8, 3)
    valid = np.all((index >= 0) & (index < dims), axis=2)
    keys = np.ravel_multi_index(tuple(np.where(valid[..., None], index, 0).transpose(2, 0, 1)), tuple(dims))
    unique, inverse = np.unique(keys[valid], return_inverse=True)
    voxel_values = np.asarray(values_of(np.stack(np.unravel_index(unique, tuple(dims)), -1)), dtype=np.float64)
    per_corner = np.zeros(index.shape[:2])
    per_corner[valid] = voxel_values[inverse]
    weights = np.prod(np.where(corners[None].astype(bool), frac[:, None, :], 1.0 - frac[:, None, :]), axis=2)
    return (per_corner * weights).sum(axis=1)


@dataclass
class RawScan:
    data: np.ndarray  # float32 array in storage orientation
    affine: np.ndarray
    axcodes: tuple[str, str, str]
    voxel_mm: tuple[float, float, float]
    slope: float
    # The subject's true brain (the template brain mask through the subject's deformation and pose),
    # bool, same storage orientation, shape and affine as ``data``.
    brain_mask: np.ndarray | None = None


AXCODES = [
    ("R", "A", "S"),
    ("L", "A", "S"),
    ("L", "P", "S"),
    ("R", "P", "I"),
    ("L", "I", "P"),
    ("A", "S", "L"),
    ("P", "R", "S"),
    ("S", "L", "A"),
]


@dataclass
class Acquisition:
    """How a scanner acquired one subject's raw volume: everything :func:`render_volume` draws before its noise.

    The pose maps the subject's MNI-space head into scanner world coordinates (``world = pose @ mni``); the voxel
    grid (``affine``, ``dims``) has thick slices along ``slice_axis`` for thick-slice protocols; the bias field is
    ``_smooth_field`` of ``bias_rng_state`` on the coarse grid, interpolated trilinearly; ghosting, when present,
    modulates k-space along ``ghost_axis``. Drawn from the scan's acquisition stream in render_volume's order, so
    the fast path (:func:`render_slice`) can render what the chain makes of the same acquisition.
    """

    tissue: dict
    gamma: float
    pose: np.ndarray
    size: np.ndarray
    affine: np.ndarray  # voxel -> world (RAS), before reorientation to the storage order
    dims: np.ndarray
    slice_axis: int
    thickness: float
    profile: np.ndarray  # offsets (mm) along the slice axis averaged by a thick slice; [0] for thin ones
    bias_grid: np.ndarray  # the coarse multiplicative bias field (coarse grid over the volume)
    ghost_axis: int | None
    ghost: tuple[float, float, float] | None  # period, amplitude, phase of the k-space phase error
    noise_seed: int  # the scan's noise, one value per scanner voxel (_rician)
    rng: np.random.Generator  # the stream, positioned after the acquisition (scanner units, orientation)


def draw_acquisition(subject: Subject) -> Acquisition:
    """The raw volume's acquisition of ``subject`` at its grade (the draws of :func:`render_volume`, in order)."""
    grade = GRADES[subject.grade]
    rng = np.random.default_rng(_acquisition_key(subject, 3))
    tissue, gamma = _contrast(rng, grade)
    # Pose of the head in the scanner: head size/shape, rotation, position (world = pose @ mni).
    size = rng.normal(1.0, 0.05) * rng.normal(1.0, 0.02, 3)
    pose = np.eye(4)
    pose[:3, :3] = _rotation(rng, 8.0) @ np.diag(size)
    pose[:3, 3] = rng.normal(0.0, 10.0, 3) + np.array([0.0, 15.0, 10.0])
    # Scanner grid in RAS world axes; one axis is the slice direction for thick-slice protocols.
    inplane = rng.uniform(*grade.voxel_mm)
    thickness = rng.uniform(*grade.thickness_mm)
    slice_axis = int(rng.choice([2, 2, 0, 1])) if grade.thickness_mm[1] > 2.0 else 2
    voxel = np.full(3, inplane)
    voxel[slice_axis] = thickness if grade.thickness_mm[1] > 2.0 else inplane
    fov = np.array([200.0, 240.0, 220.0]) * size
    dims = np.ceil(fov / voxel).astype(int)
    affine = np.eye(4)
    affine[:3, :3] = np.diag(voxel)
    affine[:3, 3] = pose[:3, 3] - (dims - 1) / 2 * voxel
    profile = np.linspace(-thickness / 2, thickness / 2, 5) if thickness > 2.0 else np.zeros(1)
    coarse = tuple(max(2, d // 8) for d in dims)
    corner = affine[:3, 3]
    far = corner + (dims - 1) * voxel
    coarse_world = np.stack(
        np.meshgrid(*[np.linspace(corner[d], far[d], coarse[d]) for d in range(3)], indexing="ij"), -1
    )
    bias_grid = _smooth_field(rng, coarse_world, grade.bias).astype(np.float32)
    ghost_axis, ghost = None, None
    if rng.random() < grade.ghosting:
        ghost_axis = [a for a in range(3) if a != slice_axis][int(rng.integers(2))]
        ghost = _ghost_draw(rng)
    noise_seed = int(rng.integers(2**63))
    return Acquisition(
        tissue, gamma, pose, size, affine, dims, slice_axis, thickness, profile, bias_grid, ghost_axis, ghost,
        noise_seed, rng,
    )  # fmt: skip


def render_volume(subject: Subject, anatomy: Anatomy | None = None) -> RawScan:
    """A raw scanner-space T1w volume of the subject at its grade (full head, random pose)."""
    atlas = build_atlas()
    anatomy = anatomy or Anatomy.draw(subject, atlas)
    grade = GRADES[subject.grade]
    acq = draw_acquisition(subject)
    rng, dims, affine = acq.rng, acq.dims, acq.affine

    # The subject in MNI space on the paper's 130^3 grid, head included.
    grid = grid_affine()
    # Points in (z, y, x) order: x fastest, matching the atlas layout (see _as_volume).
    z, y, x = (grid[d, 3] + grid[d, d] * np.arange(GRID_SHAPE[d], dtype=np.float32) for d in (2, 1, 0))
    mni_points = np.stack(np.meshgrid(x, y, z, indexing="ij"), -1).transpose(2, 1, 0, 3)
    rendered = render(anatomy, mni_points, atlas, acq.tissue)
    head = torch.from_numpy(rendered["intensity"].astype(np.float32))[None, None]
    brain = torch.from_numpy(rendered["brain"].astype(np.float32))[None, None]

    image = np.zeros(dims, dtype=np.float32)
    for dz in acq.profile:  # thick slices average the anatomy across the slice profile
        shifted = affine.copy()
        shifted[acq.slice_axis, 3] += dz
        image += _sample_grid(head, acq.pose @ grid, shifted, dims)
    image /= len(acq.profile)
    # The true brain: its fraction (trilinear, as the head) at each voxel centre, no slice profile.
    brain_mask = _sample_grid(brain, acq.pose @ grid, affine, dims) > 0.5

    # Scanner effects in scanner space.
    bias = F.interpolate(
        torch.from_numpy(acq.bias_grid)[None, None], size=tuple(dims), mode="trilinear", align_corners=True
    )[0, 0].numpy()
    image *= bias
    if acq.ghost is not None:
        image = _ghosting(image, acq.ghost_axis, *acq.ghost)
    voxel_index = np.arange(image.size, dtype=np.uint64).reshape(tuple(dims))  # C order, as the fast path's
    image = _rician(image, grade.noise * TISSUE["wm"], acq.noise_seed, voxel_index)
    image = np.power(np.clip(image, 0, None) / TISSUE["wm"], acq.gamma) * TISSUE["wm"]
    image *= rng.uniform(600.0, 1500.0)  # arbitrary scanner units

    codes = AXCODES[int(rng.integers(len(AXCODES)))]
    transform = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt(("R", "A", "S")), nib.orientations.axcodes2ornt(codes)
    )
    data = nib.orientations.apply_orientation(image, transform)
    brain_mask = np.ascontiguousarray(nib.orientations.apply_orientation(brain_mask, transform))
    affine = affine @ nib.orientations.inv_ornt_aff(transform, image.shape)
    slope = float(rng.choice([0.25, 0.5, 1.0, 2.0]))
    voxel_mm = tuple(float(v) for v in np.abs(nib.affines.voxel_sizes(affine)))
    return RawScan(data, affine, codes, voxel_mm, slope, brain_mask)


# --------------------------------------------------------------------------------------------
# Accuracy floor
# --------------------------------------------------------------------------------------------
def accuracy_floor(age_min: float = 18.0, age_max: float = 90.0, sigma: float = 5.0) -> dict[str, float]:
    """Best MAE (and highest r) any predictor of chronological age can reach seeing only brain age.

    With ``a ~ U(age_min, age_max)`` and ``b = a + N(0, sigma)``, the MAE-optimal prediction is the
    median of the posterior ``p(a | b)`` (a normal around ``b`` truncated to the age range). Away
    from the range ends this is ``sigma * sqrt(2 / pi)`` (~0.80 sigma); near the ends the prior helps.
    """
    if sigma <= 0:
        return {"mae": 0.0, "r": 1.0, "r2": 1.0}
    a = np.linspace(age_min, age_max, 721)
    b = np.linspace(age_min - 5 * sigma, age_max + 5 * sigma, 1201)
    like = stats.norm.pdf(b[:, None] - a[None, :], scale=sigma)  # p(b | a) on the grid
    post = like / like.sum(1, keepdims=True)
    cdf = np.cumsum(post, 1)
    median = a[np.argmax(cdf >= 0.5, axis=1)]
    p_b = like.sum(1) / like.sum()
    mae = float((p_b * (post * np.abs(a[None, :] - median[:, None])).sum(1)).sum())
    joint = like / like.sum()
    mean_a, mean_m = (joint.sum(0) * a).sum(), (p_b * median).sum()
    cov = (joint * (a[None, :] - mean_a) * (median[:, None] - mean_m)).sum()
    var_a = (joint.sum(0) * (a - mean_a) ** 2).sum()
    var_m = (p_b * (median - mean_m) ** 2).sum()
    r = float(cov / np.sqrt(var_a * var_m))
    mse = float((joint * (a[None, :] - median[:, None]) ** 2).sum())
    return {"mae": mae, "r": r, "r2": 1.0 - mse / float(var_a)}


def true_survival_association(spec: CohortSpec, n: int = 200_000) -> float:
    """Population Pearson r between brain-PAD (delta) and survival months in the disease cohort."""
    rng = np.random.default_rng(12345)
    delta = rng.normal(spec.disease_shift, spec.sigma, n)
    surv = np.exp(
        math.log(spec.survival_median_months)
        - spec.survival_per_year * (delta - spec.disease_shift)
        + rng.normal(0, spec.survival_noise, n)
    )
    return float(np.corrcoef(delta, surv)[0, 1])


# --------------------------------------------------------------------------------------------
# Writing datasets
# --------------------------------------------------------------------------------------------
def _save_nifti(image: nib.Nifti1Image, path: Path) -> None:
    write_atomic(path, lambda tmp: nib.save(image, tmp))


def write_slice(
    subject: Subject,
    path: Path,
    channels: int = 1,
    slice_offset: int = 0,
    acquire: bool = True,
    levels: int = 1,
    level_spacing: int = 4,
) -> None:
    image = render_slice(subject, None, channels, slice_offset, acquire, levels, level_spacing)
    # (128,128), (128,128,k) or (128,128,k,levels), as the chain writes
    _save_nifti(slice_nifti(image, slice_offset, levels), path)


def write_volume(
    subject: Subject, path: Path, singleton_4d: bool = False, brain_mask_path: Path | None = None
) -> RawScan:
    """The raw scan as int16 NIfTI with ``scl_slope``; with ``brain_mask_path`` also its true brain
    mask (uint8, 1 = brain) in the scan's own voxel space: same shape (3D), affine and orientation."""
    scan = render_volume(subject)
    stored = np.clip(np.rint(scan.data / scan.slope), -32768, 32767).astype(np.int16)
    if singleton_4d:
        stored = stored[..., None]
    img = nib.Nifti1Image(stored, scan.affine)
    img.header.set_data_dtype(np.int16)
    img.header.set_slope_inter(scan.slope, 0.0)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_qform(scan.affine, code=1)
    img.header.set_sform(scan.affine, code=1)
    _save_nifti(img, path)
    if brain_mask_path is not None:
        mask = nib.Nifti1Image(scan.brain_mask.astype(np.uint8), scan.affine)
        mask.header.set_xyzt_units("mm", "sec")
        mask.header.set_qform(scan.affine, code=1)
        mask.header.set_sform(scan.affine, code=1)
        _save_nifti(mask, brain_mask_path)
    return scan


def _one_thread() -> None:
    """A generator worker computes on one core: torch, SimpleITK (the fast path's N4) and NumPy's BLAS (twice as many
    subjects per second with two workers than with each worker's BLAS starting a thread per core)."""
    import SimpleITK as sitk  # noqa: N813 (the library's own convention)
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    threadpool_limits(1)


def _generate_one(args: tuple) -> dict:
    subject, out, mode, channels, slice_offset, levels, level_spacing = args
    t0 = time.perf_counter()
    if mode == "slices":
        rel = Path("slices") / f"{subject.subject}_slice.nii.gz"
        write_slice(subject, out / rel, channels, slice_offset, True, levels, level_spacing)
        extra = {}
    else:
        rel = Path("volumes") / f"{subject.subject}_T1w.nii.gz"
        singleton = int(subject.seed) % 6 == 0  # some files carry a singleton 4th dimension
        if mode == "bids":  # sub-*/anat/sub-*_T1w.nii.gz, the ground truth out of the way in derivatives/
            rel = Path(subject.subject) / "anat" / f"{subject.subject}_T1w.nii.gz"
            singleton = False  # BIDS: a T1w image has exactly three dimensions
        truth_dir = Path("derivatives") / "truth" if mode == "bids" else Path("truth")
        mask = truth_dir / f"{subject.subject}_brainmask.nii.gz"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        scan = write_volume(subject, out / rel, singleton_4d=singleton, brain_mask_path=out / mask)
        truth = truth_dir / f"{subject.subject}_slice.nii.gz"
        write_slice(subject, out / truth, channels, slice_offset, False, levels, level_spacing)
        extra = {
            "truth_slice": truth.as_posix(),
            "truth_brain_mask": mask.as_posix(),
            "orientation": "".join(scan.axcodes),
            "voxel_mm": "x".join(f"{v:.2f}" for v in scan.voxel_mm),
        }
    return {"subject": subject.subject, "image": rel.as_posix(), "seconds": time.perf_counter() - t0, **extra}


MODES = ("slices", "volumes", "bids")
# What --mode volumes adds to each datalist item (paths relative to the dataset folder).
VOLUME_ITEM_KEYS = ("truth_slice", "truth_brain_mask", "orientation", "voxel_mm")

PARTICIPANT_COLUMNS = {
    "participant_id": "Subject identifier (matches the datalist's `subject`).",
    "age": "Chronological age in years (the label).",
    "brain_age": "True brain age in years: the age the image was rendered at (never in the datalist).",
    "delta": "brain_age - age: the true brain-PAD.",
    "grade": "Acquisition grade: research or clinical.",
    "cohort": "healthy, or disease (accelerated ageing).",
    "split": "training, validation, test or disease.",
    "labelled": "Whether the datalist gives the age (unlabelled training scans have none).",
    "survival_months": "Disease cohort: months from scan to death; n/a otherwise.",
    "image": "Path of the generated image, relative to the dataset folder.",
}


def generate(
    spec: CohortSpec,
    out: str | Path,
    mode: str = "slices",
    channels: int = 1,
    slice_offset: int = 0,
    workers: int = 1,
    progress: bool = True,
    levels: int = 1,
    level_spacing: int = 4,
) -> dict:
    """Generate a cohort into ``out``: images, ``datalist.json``, ``participants.tsv`` (+ ``.json``)
    and ``phantom.json`` (generator settings, accuracy floor, true survival association)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose {', '.join(MODES)}")
    out = Path(out)
    if mode != "bids":
        (out / mode).mkdir(parents=True, exist_ok=True)
    if mode != "slices":
        (out / ("derivatives/truth" if mode == "bids" else "truth")).mkdir(parents=True, exist_ok=True)
    subjects = sample_cohort(spec)
    build_atlas()  # once, before any worker forks
    level_offsets(levels, level_spacing, slice_offset)  # one-line error before any work
    jobs = [(s, out, mode, channels, slice_offset, levels, level_spacing) for s in subjects]

    bar = tqdm(total=len(jobs), desc=f"phantom {mode}", unit="subject", disable=not progress, file=sys.stderr)
    results = []
    if workers > 1:

        with mp.get_context("fork").Pool(workers, initializer=_one_thread) as pool:
            for r in pool.imap(_generate_one, jobs, chunksize=4):
                results.append(r)
                bar.update()
    else:
        for job in jobs:
            results.append(_generate_one(job))
            bar.update()
    bar.close()
    by_id = {r["subject"]: r for r in results}

    datalist: dict[str, list] = {k: [] for k in (*SPLITS, "disease")}
    for s in subjects:
        item = {"image": by_id[s.subject]["image"], "subject": s.subject}
        if s.labelled:
            item["age"] = s.age
        item["grade"] = s.grade
        if s.survival_months is not None:
            item["survival_months"] = s.survival_months
        item.update({k: v for k, v in by_id[s.subject].items() if k in VOLUME_ITEM_KEYS})
        datalist[s.split].append(item)
    write_json(out / "datalist.json", datalist)

    rows = [
        {
            "participant_id": s.subject,
            # a BIDS dataset gives only the labels a study would have: no age for unlabelled scans
            "age": _bids_age(s) if mode == "bids" else s.age,
            "brain_age": s.brain_age,
            "delta": round(s.delta, 2),
            "grade": s.grade,
            "cohort": s.cohort,
            "split": s.split,
            "labelled": str(s.labelled).lower(),
            "survival_months": "n/a" if s.survival_months is None else s.survival_months,
            "image": by_id[s.subject]["image"],
        }
        for s in subjects
    ]
    write_csv(out / "participants.tsv", rows, PARTICIPANT_COLUMNS, delimiter="\t")
    write_json(out / "participants.json", {k: {"Description": v} for k, v in PARTICIPANT_COLUMNS.items()})
    if mode == "bids":
        description = {"Name": f"Synthetic ageing-brain phantom (seed {spec.seed})", "BIDSVersion": "1.10.0"}
        description.update(DatasetType="raw", License="CC0", Authors=list(BIDS_AUTHORS))
        write_json(out / "dataset_description.json", description)
        write_bids_extras(out, spec)

    floor = accuracy_floor(spec.age_min, spec.age_max, spec.sigma)
    test = [s for s in subjects if s.split == "test"]
    summary = {
        "phantom_version": PHANTOM_VERSION,
        "spec": asdict(spec),
        "mode": mode,
        "channels": channels,
        "slice_offset": slice_offset,
        "levels": levels,
        "level_spacing": level_spacing,
        "ageing_model": asdict(AGEING),
        "accuracy_floor": floor,
        "test_oracle_mae": _oracle_mae(test, spec) if test else None,
        "disease_true_pad_survival_r": true_survival_association(spec),
        "disease_sample_pad_survival_r": _sample_r([s for s in subjects if s.cohort == "disease"]),
        "seconds_per_subject": float(np.mean([r["seconds"] for r in results])),
    }
    write_json(out / "phantom.json", summary)
    return summary


BIDS_AUTHORS = ("The brain-age diffusion autoencoder bundle contributors",)
#: The phantom's own files at the root of a BIDS-mode dataset, which BIDS has no rules for (the validator's
#: NOT_INCLUDED): listed in its .bidsignore, kept where the bundle's readers expect them.
BIDS_IGNORED = ("/datalist.json", "/phantom.json")


def _bids_age(s: Subject):
    """participants.tsv's age in a BIDS dataset: only the labels a study would have (``n/a`` for unlabelled
    scans), and ages of 89 and over as ``89+`` (the de-identification BIDS and HIPAA ask for)."""
    if not s.labelled:
        return "n/a"
    return "89+" if s.age >= 89 else s.age


def write_bids_extras(out: Path, spec: CohortSpec) -> None:
    """The README and .bidsignore of a BIDS-mode phantom."""
    ignore = ["# scripts.phantom's own files: the phantom's datalist and its generator settings", *BIDS_IGNORED]
    write_atomic(out / ".bidsignore", lambda tmp: tmp.write_text("\n".join(ignore) + "\n"))
    readme = f"""# Synthetic ageing-brain phantom (seed {spec.seed})

T1w brains rendered by `scripts/phantom.py` of the brain-age diffusion autoencoder bundle (phantom version
{PHANTOM_VERSION}) from nilearn's MNI152 ICBM 2009 template at a known brain age: not data of any person.

- `sub-*/anat/sub-*_T1w.nii.gz`: the raw scans (random pose, voxel size and orientation; research or clinical
  acquisition grade, so the scanning parameters differ between subjects on purpose).
- `participants.tsv`: the age (`n/a` for the unlabelled training scans, `89+` for ages of 89 and over), the
  true brain age and brain-PAD, the grade, cohort, split and, for the disease cohort, survival months.
- `derivatives/truth/`: each subject's true brain mask in the scan's voxel space and the MNI-space slice.
- `datalist.json`, `phantom.json`: the phantom's datalist and generator settings (not BIDS; in `.bidsignore`).
"""
    write_atomic(out / "README.md", lambda tmp: tmp.write_text(readme))


def _oracle_mae(subjects: list[Subject], spec: CohortSpec) -> float:
    """MAE on these subjects of the ideal predictor that sees brain age (posterior median)."""
    a = np.linspace(spec.age_min, spec.age_max, 721)
    errors = []
    for s in subjects:
        post = stats.norm.pdf(s.brain_age - a, scale=max(spec.sigma, 1e-6))
        median = a[np.argmax(np.cumsum(post) / post.sum() >= 0.5)]
        errors.append(abs(median - s.age))
    return float(np.mean(errors))


def _sample_r(subjects: list[Subject]) -> float | None:
    if len(subjects) < 3:
        return None
    return float(np.corrcoef([s.delta for s in subjects], [s.survival_months for s in subjects])[0, 1])


def ensure_dataset(
    folder: str | Path,
    spec: CohortSpec | None = None,
    mode: str = "slices",
    channels: int = 1,
    workers: int = 1,
    levels: int = 1,
    level_spacing: int = 4,
) -> str:
    """Generate the phantom into ``folder`` unless an identical one is already there; return its datalist.

    Used for the embedded default dataset: the first training run creates it, later runs reuse it.
    Generation happens in a temporary sibling folder that is renamed into place, so an interrupted
    run never leaves a half-written dataset behind.
    """
    spec = spec or CohortSpec()
    folder = Path(folder)
    wanted = {"phantom_version": PHANTOM_VERSION, "spec": asdict(spec), "mode": mode, "channels": channels}
    if levels > 1:  # single-level phantoms written before levels existed stay valid
        wanted.update(levels=levels, level_spacing=level_spacing)
    stamp = folder / "phantom.json"
    if stamp.exists():
        found = json.loads(stamp.read_text())
        if all(found.get(k, 1 if k == "levels" else None) == v for k, v in wanted.items()):
            return str(folder / "datalist.json")
        logger.warning(
            f"{folder}: phantom of other settings or version {found.get('phantom_version')}; regenerating it"
        )
    elif folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder}: exists and is not a phantom dataset; choose an empty or new folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        generate(spec, tmp, mode=mode, channels=channels, workers=workers, levels=levels, level_spacing=level_spacing)
        if folder.exists():  # an empty or partial folder left by something else
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(folder / "datalist.json")


# --------------------------------------------------------------------------------------------
# Description of the ageing effects, measured on the phantom itself
# --------------------------------------------------------------------------------------------
def describe_ageing(ages=(20, 30, 40, 50, 60, 70, 80, 90)) -> list[dict]:
    """Effect sizes at each brain age, measured in the medial slice of a nuisance-free subject."""
    atlas = build_atlas()
    plane = slice_points(0.0)
    mask = _sample(atlas.maps[:, 2:3], atlas.affine, plane)[0] > 0.5
    vent_plane = _sample(atlas.maps[:, 3:4], atlas.affine, plane)[0]
    rows = []
    for b in ages:
        anatomy = Anatomy(
            b, np.zeros((1, 3)), np.zeros(1), np.zeros((1, 3)), 0.0, 0.0, 1.0, np.zeros((0, 4), np.float32)
        )
        maps = render(anatomy, plane, atlas)
        pixel = float(np.prod(np.diag(grid_affine())[:2]))
        ventricle = (maps["csf"] > 0.5) & (vent_plane < 10) & mask
        rows.append(
            {
                "brain_age": b,
                "ventricle_dilation_mm": round(AGEING.ventricle_dilation(b), 2),
                "ventricle_area_cm2": round(float(ventricle.sum()) * pixel / 100, 2),
                "cortical_erosion_mm": round(AGEING.cortical_erosion(b), 2),
                "csf_fraction": round(float(maps["csf"][mask].sum() / maps["brain"][mask].sum()), 3),
                "gm_fraction": round(float(maps["gm"][mask].sum() / maps["brain"][mask].sum()), 3),
                "gm_wm_contrast": round(AGEING.white_matter_contrast(b), 3),
                "wmh_rim_mm": round(AGEING.wmh_rim(b), 2),
                "wmh_mean_lesions": round(AGEING.wmh_count(b), 1),
            }
        )
    return rows


def montage(out: str | Path, ages=(20, 30, 40, 50, 60, 70, 80, 90), seed: int = 0, subject_index: int = 0) -> Path:
    """Medial slices of one phantom subject rendered at increasing brain ages, at both grades (a PNG)."""
    import matplotlib.pyplot as plt

    subject = sample_cohort(CohortSpec(n=max(subject_index + 1, 2), seed=seed))[subject_index]
    grades = list(GRADES)
    fig, axes = plt.subplots(len(grades), len(ages), figsize=(1.9 * len(ages), 2.0 * len(grades) + 0.5), squeeze=False)
    for row, grade in enumerate(grades):
        for col, age in enumerate(ages):
            person = replace(subject, brain_age=float(age), age=float(age), grade=grade)
            show_slice(axes[row, col], render_slice(person)[0], f"brain age {age}" if row == 0 else None)
        axes[row, 0].text(-0.08, 0.5, grade, transform=axes[row, 0].transAxes, rotation=90, va="center", ha="right")
    fig.suptitle(
        f"Synthetic phantom: one subject (seed {seed}) rendered at brain ages {ages[0]}-{ages[-1]}", fontsize=11
    )
    fig.tight_layout()
    return save_figure(fig, out)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m scripts.phantom",
        description="Generate a synthetic ageing-brain cohort: raw T1w volumes or preprocessed 128x128 "
        "MNI slices, datalist.json, participants.tsv (true age, brain age, survival) and the "
        "accuracy floor. Deterministic by seed.",
    )
    p.add_argument("--out", required=False, help="output folder (created); required unless --describe")
    p.add_argument("--n", type=cli.positive_int, default=200, help="number of healthy subjects")
    p.add_argument(
        "--mode",
        choices=MODES,
        default="slices",
        help="slices: preprocessed 128x128 medial axial slices in [0,1] (fast path); "
        "volumes: raw scanner-space NIfTI (plus, in truth/, the MNI ground-truth slice and the "
        "true brain mask in the raw scan's voxel space); bids: the raw volumes as a BIDS dataset "
        "(sub-*/anat/sub-*_T1w.nii.gz, participants.tsv without the unlabelled ages, truth in derivatives/truth)",
    )
    p.add_argument(
        "--session",
        type=int,
        default=0,
        help="0: the first scans; k > 0: the same people (same --seed) re-scanned with fresh noise, pose and "
        "bias field, for test-retest reliability",
    )
    p.add_argument(
        "--grade",
        choices=GRADE_CHOICES,
        default="research",
        help="acquisition grade of every scan; mixed draws research or clinical per subject",
    )
    p.add_argument(
        "--clinical_fraction", type=cli.fraction, default=0.5, help="share of clinical scans with --grade mixed"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed: same seed, same subjects at any grade")
    p.add_argument("--age_min", type=float, default=18.0, help="youngest chronological age (years)")
    p.add_argument("--age_max", type=float, default=90.0, help="oldest chronological age (years)")
    p.add_argument("--sigma", type=float, default=5.0, help="sd of brain age around chronological age (years)")
    p.add_argument("--n_disease", type=cli.non_negative_int, default=None, help="disease-cohort size (default: n/5)")
    p.add_argument(
        "--n_calibration",
        type=cli.non_negative_int,
        default=0,
        help="labelled healthy people in a 'calibration' split (the prediction interval is fitted on them)",
    )
    p.add_argument(
        "--calibration_grade",
        choices=GRADE_CHOICES,
        default="mixed",
        help="acquisition grade of the calibration split (mixed: --clinical_fraction of them clinical)",
    )
    p.add_argument("--disease_shift", type=float, default=8.0, help="mean brain-PAD of the disease cohort (years)")
    p.add_argument(
        "--unlabelled_fraction",
        type=cli.fraction,
        default=0.25,
        help="share of the training split written without an age (semi-supervised)",
    )
    p.add_argument("--val_fraction", type=cli.fraction, default=0.15, help="share of healthy subjects for validation")
    p.add_argument("--test_fraction", type=cli.fraction, default=0.15, help="share of healthy subjects for testing")
    p.add_argument(
        "--channels",
        type=cli.positive_int,
        default=1,
        help="neighbouring axial slices written as channels (odd numbers centre on the medial slice)",
    )
    p.add_argument(
        "--slice_offset", type=int, default=0, help="offset of the slice from the medial one (130-grid slices)"
    )
    p.add_argument(
        "--slice_levels",
        type=cli.positive_int,
        default=1,
        help="axial levels per image (odd; > 1 writes (128, 128, channels, levels) slices, as preprocessing "
        "slice_levels)",
    )
    p.add_argument("--slice_level_spacing", type=cli.positive_int, default=4, help="130-grid slices between the levels")
    p.add_argument("--workers", type=cli.positive_int, default=1, help="worker processes")
    p.add_argument("--describe", action="store_true", help="print the ageing effects by brain age and exit")
    p.add_argument(
        "--montage",
        metavar="PNG",
        default=None,
        help="draw one subject (of --seed) at brain ages 20-90, both grades, into PNG and exit "
        "(docs/figures/phantom_montage.png)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.montage:
        print(montage(args.montage, seed=args.seed))
        return 0
    if args.describe:
        rows = describe_ageing()
        print("\t".join(rows[0]))
        for row in rows:
            print("\t".join(str(v) for v in row.values()))
        return 0
    if not args.out:
        parser.error("--out is required")
    try:
        spec = CohortSpec(
            n=args.n,
            seed=args.seed,
            grade=args.grade,
            age_min=args.age_min,
            age_max=args.age_max,
            sigma=args.sigma,
            n_disease=args.n_disease,
            n_calibration=args.n_calibration,
            calibration_grade=args.calibration_grade,
            disease_shift=args.disease_shift,
            unlabelled_fraction=args.unlabelled_fraction,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            clinical_fraction=args.clinical_fraction,
            session=args.session,
        )
        for level in level_offsets(args.slice_levels, args.slice_level_spacing, args.slice_offset):
            axial_index(level + args.channels // 2)
            axial_index(level - args.channels // 2)
    except ValueError as err:
        parser.error(str(err))
    t0 = time.perf_counter()
    summary = generate(
        spec,
        args.out,
        mode=args.mode,
        channels=args.channels,
        slice_offset=args.slice_offset,
        workers=args.workers,
        progress=not args.quiet,
        levels=args.slice_levels,
        level_spacing=args.slice_level_spacing,
    )
    floor = summary["accuracy_floor"]
    total = spec.n + spec.disease_count + spec.n_calibration
    print(f"wrote {total} subjects ({args.mode}, grade {args.grade}) to {args.out} in {time.perf_counter() - t0:.1f} s")
    print(
        f"accuracy floor (best predictor of age that sees only brain age, sigma={spec.sigma:g}): "
        f"MAE {floor['mae']:.2f} years, r {floor['r']:.3f}, R2 {floor['r2']:.3f}"
    )
    if summary["test_oracle_mae"] is not None:
        print(f"that oracle's MAE on this test split: {summary['test_oracle_mae']:.2f} years")
    print(f"disease cohort: true corr(brain-PAD, survival) {summary['disease_true_pad_survival_r']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
