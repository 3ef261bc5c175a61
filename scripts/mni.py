"""The MNI152 space every model input lives in.

One place defines the geometry that the phantom (``scripts.phantom``) and the preprocessing chain
(``scripts.transforms``) must agree on: nilearn's offline copy of the ICBM 2009 symmetric template,
the paper's 130x130x130 grid spanning the template's field of view, and the medial axial slice that
becomes the 128x128 network input (Ijishakin et al., Appendix B).

Slice arrays are indexed ``[x, y]`` (x: left -> right, y: posterior -> anterior, RAS), like the
template itself; plot them transposed with ``origin="lower"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

GRID_SHAPE = (130, 130, 130)
SLICE_SIZE = (128, 128)


@dataclass(frozen=True)
class Template:
    """The MNI152 ICBM 2009 template as float32 arrays on its own 1 mm (or 2 mm) grid."""

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    mask: np.ndarray
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.t1.shape


@lru_cache(maxsize=2)
def load_template(resolution: int = 1) -> Template:
    """Load the template from the files shipped inside nilearn (no network access)."""
    from nilearn import datasets

    images = {
        "t1": datasets.load_mni152_template(resolution=resolution),
        "gm": datasets.load_mni152_gm_template(resolution=resolution),
        "wm": datasets.load_mni152_wm_template(resolution=resolution),
        "mask": datasets.load_mni152_brain_mask(resolution=resolution),
    }
    arrays = {k: np.clip(np.asarray(v.get_fdata(), dtype=np.float32), 0, 1) for k, v in images.items()}
    for a in arrays.values():
        a.setflags(write=False)
    return Template(affine=np.asarray(images["t1"].affine, dtype=np.float64), **arrays)


def field_of_view(resolution: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper corner (mm) of the box covered by the template's voxels."""
    tpl = load_template(resolution)
    spacing = np.diag(tpl.affine)[:3]
    lo = tpl.affine[:3, 3] - spacing / 2
    return lo, lo + spacing * np.asarray(tpl.shape)


def grid_affine(shape: tuple[int, int, int] = GRID_SHAPE) -> np.ndarray:
    """Voxel -> MNI mm affine of a grid of ``shape`` spanning the template's field of view.

    The paper resamples registered scans to 130^3; over the 197x233x189 mm template box that gives
    anisotropic voxels of about 1.52 x 1.79 x 1.45 mm.
    """
    lo, hi = field_of_view()
    spacing = (hi - lo) / np.asarray(shape, dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing)
    affine[:3, 3] = lo + spacing / 2
    return affine


def axial_index(offset: int = 0, shape: tuple[int, int, int] = GRID_SHAPE) -> int:
    """Index of the medial axial slice (plus ``offset`` slices) in a grid of ``shape``."""
    index = shape[2] // 2 + int(offset)
    if not 0 <= index < shape[2]:
        raise ValueError(f"slice offset {offset} leaves the {shape[2]}-slice grid")
    return index


def level_offsets(levels: int = 1, spacing: int = 4, offset: int = 0) -> list[int]:
    """Slice offsets of ``levels`` axial levels ``spacing`` grid slices apart, centred on ``offset``.

    ``levels`` is odd so the centre level is the medial slice the paper uses; e.g. 5 levels 4 slices apart
    span +-8 slices (+-11.6 mm) around it.
    """
    levels, spacing = int(levels), int(spacing)
    if levels < 1 or levels % 2 == 0:
        raise ValueError(f"slice levels must be an odd number >= 1 (the medial slice in the middle), got {levels}")
    if levels > 1 and spacing < 1:
        raise ValueError(f"slice level spacing must be >= 1 grid slice, got {spacing}")
    return [int(offset) + spacing * (i - levels // 2) for i in range(levels)]


def slice_affine(
    offset: int = 0, size: tuple[int, int] = SLICE_SIZE, shape: tuple[int, int, int] = GRID_SHAPE
) -> np.ndarray:
    """Pixel -> MNI mm affine of the ``size`` model-input slice cut at ``axial_index(offset)``.

    The in-plane resize from ``shape[:2]`` to ``size`` keeps the same physical box, so the pixel
    spacing grows by ``shape/size``; the third column is the 130-grid slice thickness.
    """
    grid = grid_affine(shape)
    lo, hi = field_of_view()
    spacing_xy = (hi[:2] - lo[:2]) / np.asarray(size, dtype=np.float64)
    affine = grid.copy()
    affine[0, 0], affine[1, 1] = spacing_xy
    affine[:2, 3] = lo[:2] + spacing_xy / 2
    affine[2, 3] = (grid @ np.array([0, 0, axial_index(offset, shape), 1.0]))[2]
    return affine


def slice_points(
    offsets_mm: np.ndarray | float = 0.0, offset: int = 0, shape: tuple[int, int, int] = GRID_SHAPE
) -> np.ndarray:
    """MNI mm coordinates of the 130x130 grid points of the medial axial plane.

    Returns shape ``(len(offsets_mm), shape[0], shape[1], 3)``: one plane per extra z offset (mm),
    which the phantom uses for neighbouring slices and for thick clinical slice profiles.
    """
    grid = grid_affine(shape)
    i, j = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    k = np.full_like(i, axial_index(offset, shape))
    vox = np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(np.float64)
    plane = (vox @ grid.T)[..., :3]
    dz = np.atleast_1d(np.asarray(offsets_mm, dtype=np.float64))
    planes = np.repeat(plane[None], len(dz), axis=0)
    planes[..., 2] += dz[:, None, None]
    return planes


def grid_to_template_mask(shape: tuple[int, int, int] = GRID_SHAPE) -> np.ndarray:
    """The template brain mask resampled (nearest) onto a grid of ``shape``; used for skull stripping."""
    tpl = load_template(1)
    grid = grid_affine(shape)
    idx = np.indices(shape).reshape(3, -1)
    world = grid[:3, :3] @ idx + grid[:3, 3:4]
    vox = np.linalg.solve(tpl.affine[:3, :3], world - tpl.affine[:3, 3:4])
    vox = np.clip(np.rint(vox).astype(int), 0, np.asarray(tpl.shape)[:, None] - 1)
    return (tpl.mask[vox[0], vox[1], vox[2]] > 0.5).reshape(shape)
