"""The brain mask from the magnitude, refined by phase quality.

Peers run BET; here the mask comes from the data with plain image operations, in three steps:

1. threshold the root-sum-of-squares magnitude between air and tissue (Otsu's threshold of the log signal,
   which separates the noise floor from tissue whatever the scale);
2. cut the brain from the scalp: the skull is dark on GRE, so an opening of ``opening_mm`` breaks the
   bridges, the largest component is the brain, and holes (dark veins, a bleed, dephased nuclei) are filled;
3. drop the voxels whose phase does not follow the echo model (the echo fit's weighted residual above
   ``residual_limit_rad``) where they touch the mask's edge: the noisy, dephased rim that the consensus
   paper warns dominates the errors. Inner voxels are kept, because the inversion needs them. At low SNR
   the pipeline raises the limit with the noise (:func:`quality_limit`).
"""
from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
import scipy.ndimage

from ..errors import QSMInputError
from ..geometry import check_voxel_size
from ..solvers.single_step import mask_depth_mm


@dataclass
class MaskResult:
    """The mask and what each step did (counts in voxels)."""

    mask: np.ndarray
    threshold: float
    removed_by_quality: int = 0
    notes: List[str] = field(default_factory=list)


def ball(radius_mm: float, voxel_size_mm: Sequence[float]) -> np.ndarray:
    """A ball-shaped structuring element of ``radius_mm`` on an (anisotropic) voxel grid."""
    vs = np.asarray(voxel_size_mm, dtype=float)
    half = np.maximum(np.floor(radius_mm / vs + 1e-6).astype(int), 0)
    grids = np.meshgrid(*[np.arange(-h, h + 1) * v for h, v in zip(half, vs)], indexing="ij")
    return sum(g ** 2 for g in grids) <= radius_mm ** 2 + 1e-9


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the cut that maximises the between-class variance of a 1D sample."""
    values = np.asarray(values, dtype=np.float64).ravel()
    hist, edges = np.histogram(values, bins=bins)
    centres = 0.5 * (edges[1:] + edges[:-1])
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centres)
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected component of a binary mask (empty stays empty)."""
    labels, count = scipy.ndimage.label(mask)
    if count <= 1:
        return labels > 0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def mask_from_magnitude(magnitude: np.ndarray, voxel_size_mm: Sequence[float], *,
                        residual_rad: Optional[np.ndarray] = None, threshold: Optional[float] = None,
                        opening_mm: float = 4.0, residual_limit_rad: float = 0.5) -> MaskResult:
    """Brain mask from a GRE magnitude ([i, j, k], or [echo, i, j, k] combined by root sum of squares).

    Args:
        magnitude: the magnitude image(s).
        voxel_size_mm: voxel size along i, j, k.
        residual_rad: the echo fit's weighted phase residual (:class:`echo_fit.EchoFit`), for step 3.
        threshold: magnitude threshold; ``None`` chooses it (Otsu on the log signal).
        opening_mm: radius of the opening that separates the brain from the scalp.
        residual_limit_rad: edge voxels with a larger residual are dropped.
    """
    vs = check_voxel_size(voxel_size_mm)
    mag = np.asarray(magnitude, dtype=np.float64)
    if mag.ndim == 4:
        mag = np.sqrt(np.sum(mag ** 2, axis=0))
    if mag.ndim != 3:
        raise QSMInputError(f"the magnitude must be 3D or [echo, i, j, k], got shape {mag.shape}")
    if not np.all(np.isfinite(mag)) or mag.max() <= 0:
        raise QSMInputError("the magnitude must be finite with some signal to make a mask from")
    notes: List[str] = []
    if threshold is None:
        positive = mag[mag > 0]
        threshold = float(np.exp(otsu_threshold(np.log(positive))))
    head = mag > threshold
    if not head.any():
        raise QSMInputError(f"no voxel of the magnitude is above the threshold {threshold:.4g}")
    opened = scipy.ndimage.binary_opening(head, structure=ball(opening_mm, vs))
    brain = largest_component(opened if opened.any() else head)
    brain = scipy.ndimage.binary_dilation(brain, structure=ball(opening_mm, vs)) & head
    brain = scipy.ndimage.binary_fill_holes(largest_component(brain))
    notes.append(f"mask: magnitude threshold {threshold:.4g}, {int(brain.sum())} voxels after the opening "
                 f"({opening_mm:g} mm) and hole filling")

    removed = 0
    if residual_rad is not None:
        kept = peel_poor_edges(brain, residual_rad, residual_limit_rad)
        removed = int(brain.sum() - kept.sum())
        brain = kept
        notes.append(f"mask: {removed} edge voxels dropped for poor phase quality "
                     f"(echo-fit residual above {residual_limit_rad:g} rad)")
    return MaskResult(mask=brain, threshold=threshold, removed_by_quality=removed, notes=notes)


#: the phase-quality limit is raised to this many times the median echo-fit residual of the mask's interior
#: (deeper than :data:`INTERIOR_DEPTH_MM`), where noise dominates it. Empirical: the largest whole factor with
#: which SNR 100 keeps the fixed limit (4 mm head: 4 x 0.014 = 0.056 rad < 0.06; 5 would not). For a voxel of
#: typical signal noise alone passes 4 times its median in under 0.01 % of voxels with 4 echoes (chi-square, 3
#: degrees of freedom), 0.7 % with one degree of freedom (2 echoes, or 3 with an intercept)
RELATIVE_RESIDUAL_LIMIT = 4.0
#: depth (mm) beyond which the residual is the noise's, away from the edge's partial volumes
INTERIOR_DEPTH_MM = 8.0


def quality_limit(residual_rad: np.ndarray, mask: np.ndarray, voxel_size_mm: Sequence[float],
                  residual_limit_rad: float, relative: float = RELATIVE_RESIDUAL_LIMIT) -> float:
    """The echo-fit residual (rad) above which an edge voxel's phase counts as poor: ``residual_limit_rad``, or
    ``relative`` times the median residual of the mask's interior where that is larger (0: the fixed limit).

    At low SNR noise alone exceeds a fixed limit almost everywhere (the 2 mm head at SNR 15: the interior's
    median residual is 0.063 rad), and peeling by 0.06 rad kept 66 % of the brain (docs/phase-pipeline.md). The
    fixed limit stays where the noise is below it: PDF's local field is sensitive to the edge's partial volumes.
    A mask with no voxel deeper than :data:`INTERIOR_DEPTH_MM` (the edge of the grid counts as outside) keeps
    the fixed limit: its residual would be its edge's own.
    """
    vs = check_voxel_size(voxel_size_mm)
    brain = np.asarray(mask, dtype=bool)
    residual = np.asarray(residual_rad, dtype=np.float64)
    if not (math.isfinite(relative) and relative >= 0):
        raise QSMInputError(f"the relative residual limit must be a number >= 0, got {relative}")
    if residual.shape != brain.shape or not brain.any():
        raise QSMInputError(f"the residual map {residual.shape} must be on the grid of a non-empty mask {brain.shape}")
    interior = mask_depth_mm(brain, vs) > INTERIOR_DEPTH_MM
    if not interior.any():
        return float(residual_limit_rad)
    return max(float(residual_limit_rad), float(relative) * float(np.median(residual[interior])))


def poor_edge(mask: np.ndarray, residual_rad: np.ndarray, residual_limit_rad: float) -> np.ndarray:
    """The voxels of ``mask`` whose residual exceeds the limit and that reach its edge, peeled layer by layer (at
    most 8; bool): partial volumes with bone, CSF or air. Enclosed ones are not part of it."""
    brain = np.asarray(mask, dtype=bool)
    residual = np.asarray(residual_rad, dtype=np.float64)
    if residual.shape != brain.shape:
        raise QSMInputError(f"the residual map's shape {residual.shape} differs from the mask's {brain.shape}")
    bad = brain & (residual > residual_limit_rad)
    kept = brain.copy()
    for _ in range(8):
        edge = kept & ~scipy.ndimage.binary_erosion(kept)
        peel = edge & bad
        if not peel.any():
            break
        kept &= ~peel
    return brain & ~kept


def without_edge(mask: np.ndarray, edge: np.ndarray) -> np.ndarray:
    """``mask`` without the voxels of ``edge`` (its :func:`poor_edge`); the largest part is kept with its holes
    filled."""
    return scipy.ndimage.binary_fill_holes(largest_component(np.asarray(mask, dtype=bool) & ~np.asarray(edge, bool)))


def peel_poor_edges(mask: np.ndarray, residual_rad: np.ndarray, residual_limit_rad: float) -> np.ndarray:
    """``mask`` without its :func:`poor_edge`; the largest part is kept with its holes filled."""
    return without_edge(mask, poor_edge(mask, residual_rad, residual_limit_rad))
