"""The unit dipole kernel in k-space and the zero-padding that goes with it.

D(k) = 1/3 - (k . b)^2 / |k|^2, with k in cycles/mm along the (i, j, k) voxel axes and b the unit B0
direction in that frame. D(0) is undefined; we use 0 by default (MEDI, FANSI, QSM.jl): it only shifts
the mean, which QSM leaves undetermined anyway and the challenge metrics remove.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np
import scipy.fft

from .geometry import SUPERIOR, check_voxel_size, unit_vector

Shape3 = Tuple[int, int, int]


def padded_shape(shape: Sequence[int], pad_factor: float = 2.0) -> Shape3:
    """FFT grid for a volume of ``shape``: each axis grown to ``pad_factor`` times, then to a fast length.

    A factor of 2 (the default) makes the circular convolution equal the linear one for every pair of
    voxels in the volume (2n - 1 would be the minimum), so the field does not wrap around the edges.
    A factor of 1 means no padding (only rounding up to a fast FFT length).
    """
    if len(shape) != 3:
        raise ValueError(f"expected a 3D shape, got {tuple(shape)}")
    if not (pad_factor >= 1.0):
        raise ValueError(f"pad_factor must be >= 1, got {pad_factor}")
    out = []
    for n in shape:
        target = n if pad_factor == 1.0 else max(n, int(math.ceil(pad_factor * n - 1)))
        out.append(int(scipy.fft.next_fast_len(target, real=True)))
    return tuple(out)  # type: ignore[return-value]


def kspace_grid(shape: Sequence[int], voxel_size_mm: Sequence[float], half: bool = False):
    """Spatial frequencies (cycles/mm) along each axis, broadcastable to ``shape``.

    With ``half`` the last axis holds only the non-negative frequencies of a real FFT (``rfftn``).
    """
    vs = check_voxel_size(voxel_size_mm)
    n0, n1, n2 = (int(n) for n in shape)
    k0 = np.fft.fftfreq(n0, d=vs[0]).reshape(-1, 1, 1)
    k1 = np.fft.fftfreq(n1, d=vs[1]).reshape(1, -1, 1)
    k2 = (np.fft.rfftfreq(n2, d=vs[2]) if half else np.fft.fftfreq(n2, d=vs[2])).reshape(1, 1, -1)
    return k0, k1, k2


def dipole_kernel(shape: Sequence[int], voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0),
                  b0_dir: Sequence[float] = SUPERIOR, *, half: bool = False,
                  dc_value: float = 0.0) -> np.ndarray:
    """Dipole kernel D(k) on an FFT grid of ``shape`` (float64, ``ij`` indexing, DC at index 0).

    ``half=True`` returns the ``rfftn`` half-spectrum (last axis ``n // 2 + 1``).
    """
    b = unit_vector(b0_dir)
    k0, k1, k2 = kspace_grid(shape, voxel_size_mm, half=half)
    k_dot_b = k0 * b[0] + k1 * b[1] + k2 * b[2]
    k_sq = k0 ** 2 + k1 ** 2 + k2 ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        d = 1.0 / 3.0 - k_dot_b ** 2 / k_sq
    d[0, 0, 0] = dc_value
    return d


def laplacian_kernel(shape: Sequence[int], voxel_size_mm: Sequence[float], *, half: bool = False) -> np.ndarray:
    """Fourier symbol of the periodic forward-difference gradient's squared norm, sum |G_a(k)|^2 (1/mm^2).

    |G_a|^2 = (2 - 2 cos(2 pi k_a h_a)) / h_a^2: the regulariser of closed-form Tikhonov and the
    quadratic term of TV-ADMM's chi sub-problem.
    """
    vs = check_voxel_size(voxel_size_mm)
    grids = kspace_grid(shape, vs, half=half)
    total = 0.0
    for k, h in zip(grids, vs):
        total = total + (2.0 - 2.0 * np.cos(2.0 * np.pi * k * h)) / h ** 2
    return np.asarray(total, dtype=np.float64)


def smv_spectrum(fft_shape: Sequence[int], voxel_size_mm: Sequence[float], radius_mm: float) -> np.ndarray:
    """Real-FFT half spectrum of the normalised ball of ``radius_mm`` (voxel centres within it), centred at 0.

    The spherical mean value (SMV) filter: a field harmonic in a region equals its mean over any ball inside
    it, so ``1 - smv_spectrum`` removes the background field there (SHARP, V-SHARP, single-step QSM).
    """
    vs = check_voxel_size(voxel_size_mm)
    axes = [np.fft.fftfreq(n, 1.0 / n) * v for n, v in zip(fft_shape, vs)]  # signed offsets in mm
    x, y, z = np.ix_(*axes)
    ball = (x * x + y * y + z * z <= radius_mm * radius_mm * (1 + 1e-9)).astype(np.float64)
    ball /= ball.sum()
    return scipy.fft.rfftn(ball).real

