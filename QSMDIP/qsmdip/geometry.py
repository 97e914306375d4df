"""Image geometry: axis order and the main-field (B0) direction in voxel coordinates.

Axis order, stated once for the whole library: arrays are indexed ``[i, j, k]``, the voxel index order
of ITK/SimpleITK and of Slicer's IJK (first index fastest in the file). ``voxel_size_mm`` and
``b0_dir`` are given in that same order. Only the file-IO module (and the Slicer logic) convert from
the reversed ``[k, j, i]`` order that ``sitk.GetArrayFromImage`` and ``slicer.util.arrayFromVolume``
return.

B0 lies along the scanner's superior axis. A direction matrix whose columns give the physical
direction of the i, j and k axes (LPS for ITK, RAS for Slicer: superior is +z in both) therefore gives
``b0_voxel = direction.T @ b0_physical``.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

from .errors import QSMInputError

#: Scanner superior axis in LPS or RAS world coordinates (the z axis in both).
SUPERIOR = (0.0, 0.0, 1.0)

Vector3 = Tuple[float, float, float]


def unit_vector(vector: Sequence[float], name: str = "B0 direction") -> Vector3:
    """Return ``vector`` normalised to length 1, refusing zero, NaN or wrong-length input."""
    v = np.asarray(vector, dtype=np.float64).reshape(-1)
    if v.size != 3 or not np.all(np.isfinite(v)):
        raise QSMInputError(f"{name} must be three finite numbers, got {list(np.ravel(vector))}")
    norm = float(np.linalg.norm(v))
    if norm < 1e-9:
        raise QSMInputError(f"{name} must not be the zero vector")
    v = v / norm
    return (float(v[0]), float(v[1]), float(v[2]))


def b0_tilted_about_i(degrees: float) -> Vector3:
    """B0 in the voxel frame of an acquisition tilted ``degrees`` about the i axis, from k towards j.

    The benchmarks' and experiments' "oblique" convention, stated once: 0 is axial (B0 along k).
    """
    angle = np.radians(float(degrees))
    return (0.0, float(np.sin(angle)), float(np.cos(angle)))


def check_direction_matrix(direction: np.ndarray) -> np.ndarray:
    """Return the 3x3 direction matrix as float64, refusing one that is not orthonormal."""
    d = np.asarray(direction, dtype=np.float64)
    if d.size != 9:
        raise QSMInputError(f"direction matrix must have 9 entries, got {d.size}")
    d = d.reshape(3, 3)
    if not np.allclose(d.T @ d, np.eye(3), atol=1e-4):
        raise QSMInputError("the image's direction matrix is not orthonormal (sheared images are not supported)")
    return d


def b0_direction_in_voxel_frame(direction: np.ndarray,
                                b0_world: Sequence[float] = SUPERIOR) -> Vector3:
    """Unit B0 direction along the image's (i, j, k) axes.

    ``direction`` is the 3x3 matrix whose columns are the world directions of the i, j, k axes (ITK's
    ``GetDirection()`` reshaped row-major, or Slicer's IJKToRAS direction matrix). ``b0_world`` is the
    main-field direction in the same world frame; the default is the scanner's superior axis.
    """
    d = check_direction_matrix(direction)
    b = np.asarray(unit_vector(b0_world, "B0 direction (world)"))
    return unit_vector(d.T @ b)


def check_voxel_size(voxel_size_mm: Sequence[float]) -> Vector3:
    """Return the voxel size as three positive floats (mm) or raise a clear error."""
    v = np.asarray(voxel_size_mm, dtype=np.float64).reshape(-1)
    if v.size != 3 or not np.all(np.isfinite(v)) or np.any(v <= 0):
        raise QSMInputError(f"voxel size must be three positive numbers in mm, got {list(v)}")
    if np.any(v > 20) or np.any(v < 0.01):
        raise QSMInputError(f"voxel size {list(v)} mm is implausible for MRI (is it in mm?)")
    return (float(v[0]), float(v[1]), float(v[2]))


def mask_bounding_box(mask: np.ndarray, margin: int | Sequence[int] = 0) -> Tuple[slice, slice, slice]:
    """Slices of the smallest box holding the mask, grown by ``margin`` voxels and clipped to the array."""
    idx = np.nonzero(mask)
    if len(idx[0]) == 0:
        raise QSMInputError("the mask is empty: it selects no voxel")
    margins = np.broadcast_to(np.asarray(margin, dtype=int), (mask.ndim,))
    return tuple(
        slice(max(int(a.min()) - m, 0), min(int(a.max()) + 1 + m, n))
        for a, m, n in zip(idx, margins, mask.shape)
    )  # type: ignore[return-value]
