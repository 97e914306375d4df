"""Spatial and temporal phase unwrapping (radians in, radians out).

Two spatial unwrappers with one call shape, ``unwrap_<name>(phase_rad, mask, voxel_size_mm, *,
magnitude=None)`` -> float32 array, 0 outside the mask:

- ``laplacian``: the FFT Laplacian unwrapper (Schofield & Zhu, Opt Lett 2003). Fast and robust to noise, but
  not exact: its result differs from the true phase by a smooth (harmonic) function, so it also removes some
  of the field, and it is not congruent with the wrapped input (not the input plus multiples of 2 pi).
- ``region-growing``: quality-guided region growing in the spirit of ROMEO (Dymerska et al., MRM 2021).
  Adds exact multiples of 2 pi, so where the quality is high the result is the true phase up to one global
  multiple of 2 pi per connected part of the mask.

:func:`unwrap_echoes` unwraps multi-echo phase ``[echo, i, j, k]``: every echo on its own (Laplacian), or one
template echo spatially and the others along time (region growing, as ROMEO does).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import scipy.fft
import scipy.sparse
import scipy.sparse.csgraph

from ..errors import QSMInputError
from ..geometry import check_voxel_size
from ..kernel import laplacian_kernel, padded_shape

TWO_PI = 2.0 * np.pi


def wrap(phase_rad: np.ndarray) -> np.ndarray:
    """Phase wrapped to [-pi, pi)."""
    return (phase_rad + np.pi) % TWO_PI - np.pi


# ----------------------------------------------------------------------------------------------------------
# Input checks shared by the phase stages (offsets.py imports them)
# ----------------------------------------------------------------------------------------------------------

def check_mask(mask: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """The mask as a boolean array of ``shape``; refuses a wrong shape or an empty mask."""
    m = np.asarray(mask)
    if m.shape != tuple(shape):
        raise QSMInputError(f"mask shape {m.shape} differs from the phase's {tuple(shape)}")
    m = m != 0
    if not m.any():
        raise QSMInputError("the mask is empty: it selects no voxel")
    return m


def check_phase_volume(phase_rad: np.ndarray, mask: np.ndarray,
                       magnitude: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """One 3D phase (float64), its boolean mask and optional magnitude, checked for shape and finiteness."""
    p = np.asarray(phase_rad, dtype=np.float64)
    if p.ndim != 3:
        raise QSMInputError(f"phase must be a 3D array [i, j, k], got shape {p.shape}")
    m = check_mask(mask, p.shape)
    if not np.all(np.isfinite(p[m])):
        raise QSMInputError("phase has NaN or infinite values inside the mask")
    mag = None
    if magnitude is not None:
        mag = np.asarray(magnitude, dtype=np.float64)
        if mag.shape != p.shape:
            raise QSMInputError(f"magnitude shape {mag.shape} differs from the phase's {p.shape}")
        if not np.all(np.isfinite(mag[m])):
            raise QSMInputError("magnitude has NaN or infinite values inside the mask")
    return p, m, mag


def check_echoes(phases_rad: np.ndarray, magnitudes: Optional[np.ndarray], echo_times_s: Sequence[float],
                 mask: np.ndarray, voxel_size_mm: Sequence[float]):
    """Multi-echo inputs checked: phases ``[echo, i, j, k]`` (a 3D array is one echo), magnitudes of the same
    shape or None, strictly increasing echo times in seconds, a non-empty mask on the same grid.

    Returns ``(phases float64 [e,i,j,k], magnitudes float64 or None, echo times float64 [e], mask bool,
    voxel size)``.
    """
    p = np.asarray(phases_rad, dtype=np.float64)
    if p.ndim == 3:
        p = p[None]
    if p.ndim != 4:
        raise QSMInputError(f"phases must be [echo, i, j, k] (or one 3D echo), got shape {p.shape}")
    te = np.asarray(echo_times_s, dtype=np.float64).reshape(-1)
    if te.size != p.shape[0]:
        raise QSMInputError(f"{te.size} echo times given for {p.shape[0]} phase echoes")
    if not np.all(np.isfinite(te)) or np.any(te <= 0):
        raise QSMInputError(f"echo times must be positive numbers in seconds, got {te.tolist()}")
    if np.any(te >= 1.0):
        raise QSMInputError(f"echo times {te.tolist()} are not in seconds (milliseconds given?)")
    if np.any(np.diff(te) <= 0):
        raise QSMInputError(f"echo times must be strictly increasing, got {te.tolist()}")
    m = check_mask(mask, p.shape[1:])
    if not np.all(np.isfinite(p[:, m])):
        raise QSMInputError("phase has NaN or infinite values inside the mask")
    mag = None
    if magnitudes is not None:
        mag = np.asarray(magnitudes, dtype=np.float64)
        if mag.ndim == 3:
            mag = mag[None]
        if mag.shape != p.shape:
            raise QSMInputError(f"magnitude shape {mag.shape} differs from the phase's {p.shape}")
        if not np.all(np.isfinite(mag[:, m])):
            raise QSMInputError("magnitude has NaN or infinite values inside the mask")
    return p, mag, te, m, check_voxel_size(voxel_size_mm)


# ----------------------------------------------------------------------------------------------------------
# Laplacian unwrapping
# ----------------------------------------------------------------------------------------------------------

def unwrap_laplacian(phase_rad: np.ndarray, mask: np.ndarray, voxel_size_mm: Sequence[float], *,
                     magnitude: Optional[np.ndarray] = None) -> np.ndarray:
    """Laplacian unwrapping: phi = invLap[cos(p) Lap sin(p) - sin(p) Lap cos(p)] (Schofield & Zhu 2003).

    The discrete 7-point Laplacian (anisotropic voxels) is applied and inverted by FFT on a 2x zero-padded
    grid; the complex signal is zero outside the mask, so only differences inside the mask contribute. The
    result is then shifted by the constant that makes it agree best with the wrapped input (circular mean)
    and by the multiple of 2 pi that puts its median closest to 0. Not exact: it differs from the true phase
    by a smooth function. ``magnitude`` is accepted for the common call shape and not used.
    """
    p, m, _ = check_phase_volume(phase_rad, mask, magnitude)
    vs = check_voxel_size(voxel_size_mm)
    fft_shape = padded_shape(p.shape, 2.0)
    sin_p = np.where(m, np.sin(p), 0.0)
    cos_p = np.where(m, np.cos(p), 0.0)
    # laplacian_kernel is the symbol of -Lap (sum of squared forward-difference gradients).
    minus_lap = laplacian_kernel(fft_shape, vs, half=True)
    axes = (0, 1, 2)
    lap_sin = -scipy.fft.irfftn(scipy.fft.rfftn(sin_p, s=fft_shape, axes=axes) * minus_lap,
                                s=fft_shape, axes=axes)[: p.shape[0], : p.shape[1], : p.shape[2]]
    lap_cos = -scipy.fft.irfftn(scipy.fft.rfftn(cos_p, s=fft_shape, axes=axes) * minus_lap,
                                s=fft_shape, axes=axes)[: p.shape[0], : p.shape[1], : p.shape[2]]
    lap_phi = np.where(m, cos_p * lap_sin - sin_p * lap_cos, 0.0)
    inverse = np.zeros_like(minus_lap)
    nonzero = minus_lap > 0
    inverse[nonzero] = -1.0 / minus_lap[nonzero]
    phi = scipy.fft.irfftn(scipy.fft.rfftn(lap_phi, s=fft_shape, axes=axes) * inverse,
                           s=fft_shape, axes=axes)[: p.shape[0], : p.shape[1], : p.shape[2]]
    inside = phi[m]
    inside = inside + np.angle(np.mean(np.exp(1j * (p[m] - inside))))
    inside = inside - TWO_PI * np.round(np.median(inside) / TWO_PI)
    out = np.zeros(p.shape, dtype=np.float32)
    out[m] = inside
    return out


# ----------------------------------------------------------------------------------------------------------
# Region growing along the maximum spanning tree of edge quality
# ----------------------------------------------------------------------------------------------------------

def _neighbour_edges(mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The 6-neighbour edges inside the mask as two arrays of masked-voxel numbers (C order of ``mask``)."""
    number = np.full(mask.shape, -1, dtype=np.int64)
    number[mask] = np.arange(int(mask.sum()))
    first, second = [], []
    for axis in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis] = slice(None, -1)
        hi[axis] = slice(1, None)
        both = mask[tuple(lo)] & mask[tuple(hi)]
        first.append(number[tuple(lo)][both])
        second.append(number[tuple(hi)][both])
    return np.concatenate(first), np.concatenate(second)


def _edge_quality(values: np.ndarray, a: np.ndarray, b: np.ndarray, magnitude: Optional[np.ndarray],
                  linear_phase: Optional[Tuple[np.ndarray, float]]) -> np.ndarray:
    """Quality in [0, 1] of each edge (a, b): high where unwrapping across it is safe.

    Product of: phase coherence 1 - |wrapped difference| / pi; with a magnitude, magnitude coherence
    min/max of the two voxels times the smaller magnitude relative to the median magnitude (capped at 1);
    with a second echo (phase, TE ratio), phase linearity: 1 - |wrap(d2 - ratio * d1)| / pi, where d1, d2 are
    the wrapped differences across the edge in this echo and the second one.
    """
    d = wrap(values[b] - values[a])
    quality = 1.0 - np.abs(d) / np.pi
    if magnitude is not None:
        ma, mb = magnitude[a], magnitude[b]
        low, high = np.minimum(ma, mb), np.maximum(ma, mb)
        reference = max(float(np.median(magnitude)), np.finfo(float).tiny)
        with np.errstate(divide="ignore", invalid="ignore"):
            coherence = np.where(high > 0, low / high, 0.0)
        quality *= coherence * np.clip(low / reference, 0.0, 1.0)
    if linear_phase is not None:
        second, ratio = linear_phase
        d2 = wrap(second[b] - second[a])
        quality *= 1.0 - np.abs(wrap(d2 - ratio * d)) / np.pi
    return np.clip(quality, 0.0, 1.0)


def _first_per_group(group: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Index of the highest ``score`` within each group label 0..G-1 (every label must occur)."""
    order = np.lexsort((-score, group))
    starts = np.flatnonzero(np.r_[True, group[order][1:] != group[order][:-1]])
    return order[starts]


def _group_median(group: np.ndarray, values: np.ndarray, n_groups: int) -> np.ndarray:
    """Median of ``values`` within each group label 0..G-1 (lower middle element)."""
    order = np.lexsort((values, group))
    counts = np.bincount(group, minlength=n_groups)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    return values[order][starts + (counts - 1) // 2]


def unwrap_along_quality_tree(values: np.ndarray, mask: np.ndarray, magnitude: Optional[np.ndarray] = None,
                              linear_phase: Optional[Tuple[np.ndarray, float]] = None) -> np.ndarray:
    """Unwrap the masked phase ``values`` (1D, C order of ``mask``) along the maximum spanning forest of
    edge quality; returns the unwrapped 1D values.

    Growing a region from a seed, always across the best edge on its border, visits the edges of the
    maximum spanning tree (Prim's algorithm), so the tree gives the same result without a voxel queue. Each
    voxel gets its parent's integer number of turns plus the rounding that makes the step to it a wrapped
    difference; the turns are summed to the root by pointer jumping (log2(depth) vectorised passes).
    """
    n = values.size
    a, b = _neighbour_edges(mask)
    quality = _edge_quality(values, a, b, magnitude, linear_phase)
    cost = 2.0 - quality  # strictly positive: csgraph drops zero weights
    graph = scipy.sparse.coo_matrix((cost, (a, b)), shape=(n, n)).tocsr()
    tree = scipy.sparse.csgraph.minimum_spanning_tree(graph).tocoo()

    # One seed per connected part: the voxel with the best summed edge quality (ties: first in C order).
    n_parts, part = scipy.sparse.csgraph.connected_components(tree, directed=False)
    score = np.bincount(a, quality, minlength=n) + np.bincount(b, quality, minlength=n)
    if magnitude is not None:
        score = score * (1.0 + magnitude / max(float(magnitude.max()), np.finfo(float).tiny))
    seeds = _first_per_group(part, score)

    # A virtual root joined to every seed makes the forest one tree, traversed once.
    root = n
    rows = np.concatenate([tree.row, np.full(n_parts, root)])
    cols = np.concatenate([tree.col, seeds])
    joined = scipy.sparse.coo_matrix((np.ones(rows.size), (rows, cols)), shape=(n + 1, n + 1)).tocsr()
    _, parent = scipy.sparse.csgraph.breadth_first_order(joined, root, directed=False,
                                                         return_predecessors=True)
    parent[root] = root
    parent[seeds] = root
    # Turns added at each voxel relative to its parent: values[v] + 2 pi turns = unwrapped parent + wrapped step.
    extended = np.append(values, 0.0)
    turns = np.round((extended[parent] - extended) / TWO_PI).astype(np.int64)
    turns[seeds] = 0
    turns[root] = 0
    ancestor = parent.copy()
    while True:
        pending = ancestor != root
        if not pending.any():
            break
        turns[pending] += turns[ancestor[pending]]
        ancestor[pending] = ancestor[ancestor[pending]]
    unwrapped = values + TWO_PI * turns[:n]
    # The global multiple of 2 pi of each part is free: put each part's median closest to 0.
    median = _group_median(part, unwrapped, n_parts)
    return unwrapped - TWO_PI * np.round(median / TWO_PI)[part]


def unwrap_region_growing(phase_rad: np.ndarray, mask: np.ndarray, voxel_size_mm: Sequence[float], *,
                          magnitude: Optional[np.ndarray] = None) -> np.ndarray:
    """Quality-guided region growing (in the spirit of ROMEO): adds exact multiples of 2 pi to the wrapped
    phase, growing from the best voxel across the highest-quality edges first.

    Edge quality (6 neighbours inside the mask) comes from phase coherence (small wrapped difference) and,
    with ``magnitude``, magnitude coherence and magnitude. Each 6-connected part of the mask is unwrapped on
    its own, and its global multiple of 2 pi is chosen so that its median is closest to 0. Where the true
    phase changes by less than pi between neighbours along the chosen paths, the result is the true phase
    up to that global multiple. Returns float32, 0 outside the mask.
    """
    p, m, mag = check_phase_volume(phase_rad, mask, magnitude)
    check_voxel_size(voxel_size_mm)
    out = np.zeros(p.shape, dtype=np.float32)
    out[m] = unwrap_along_quality_tree(wrap(p[m]), m, None if mag is None else mag[m])
    return out


UNWRAPPERS: Dict[str, Callable[..., np.ndarray]] = {
    "laplacian": unwrap_laplacian,
    "region-growing": unwrap_region_growing,
}
#: the unwrappers that only add whole multiples of 2 pi to the wrapped phase (list a new one here if it does), so
#: that an echo fit's residual is the noise's wherever they are right (the Laplacian's is a smooth estimate: its
#: residual in the 2 mm head's interior is 0.34 rad even without noise)
WHOLE_TURN_UNWRAPPERS = ("region-growing",)


# ----------------------------------------------------------------------------------------------------------
# Multi-echo
# ----------------------------------------------------------------------------------------------------------

def unwrap_echoes(phases_rad: np.ndarray, magnitudes: Optional[np.ndarray], echo_times_s: Sequence[float],
                  mask: np.ndarray, voxel_size_mm: Sequence[float], *,
                  method: str = "region-growing") -> np.ndarray:
    """Unwrap multi-echo phase ``[echo, i, j, k]`` (radians); returns float32 ``[echo, i, j, k]``, 0 outside
    the mask.

    ``laplacian``: every echo unwrapped on its own (the textbook chain). ``region-growing``: the first echo
    is unwrapped spatially (its edge quality also uses the second echo's phase linearity when there is one),
    then each later echo along time, from the phase predicted by a line through the origin fitted to the
    echoes unwrapped so far: echo_n = wrapped_n + 2 pi round((predicted_n - wrapped_n) / 2 pi). This
    assumes the phase is proportional to TE, i.e. the phase offsets were removed first
    (:func:`qsmdip.phase.offsets.remove_phase_offsets`).
    """
    p, mag, te, m, vs = check_echoes(phases_rad, magnitudes, echo_times_s, mask, voxel_size_mm)
    if method not in UNWRAPPERS:
        raise QSMInputError(f"unknown unwrapping method {method!r}; choose one of {sorted(UNWRAPPERS)}")
    out = np.zeros(p.shape, dtype=np.float32)
    if method == "laplacian":
        for echo in range(p.shape[0]):
            out[echo] = unwrap_laplacian(p[echo], m, vs)
        return out
    wrapped = wrap(p[:, m])
    linear = (wrapped[1], te[1] / te[0]) if p.shape[0] > 1 else None
    template = unwrap_along_quality_tree(wrapped[0], m, None if mag is None else mag[0][m], linear)
    done = [template]
    for echo in range(1, p.shape[0]):
        slope = sum(u * t for u, t in zip(done, te[:echo])) / float(np.sum(te[:echo] ** 2))
        predicted = slope * te[echo]
        done.append(wrapped[echo] + TWO_PI * np.round((predicted - wrapped[echo]) / TWO_PI))
    for echo, values in enumerate(done):
        out[echo][m] = values
    return out
