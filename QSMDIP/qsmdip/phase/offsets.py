"""Phase offsets shared by all echoes: estimate and remove them (MCPC-3D-S), so that phase is proportional to TE.

A monopolar multi-echo GRE phase is phi_n = phi_0 + omega * TE_n (plus 2 pi multiples): phi_0 comes from the
coil combination and the transmit phase and is not field. Temporal unwrapping and the echo fit assume it is
gone. MCPC-3D-S (Eckstein et al., MRM 2018) estimates it from the first two echoes:
phi_0 = phi_1 - TE_1 * unwrapped(phi_2 - phi_1) / (TE_2 - TE_1), then smooths it (it varies slowly in space)
to keep the noise of three phase images out of every echo.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
import scipy.ndimage

from ..errors import QSMInputError
from .unwrap import unwrap_along_quality_tree, check_echoes, wrap

#: Standard deviation (mm) of the Gaussian that smooths the estimated offset (complex, magnitude-weighted).
SMOOTHING_SIGMA_MM = 4.0

OFFSET_METHODS = ("mcpc3ds", "none")


@dataclass
class OffsetResult:
    """Phases with the offset removed (``[echo, i, j, k]``, radians wrapped to [-pi, pi)), the offset removed
    (``[i, j, k]``, radians, 0 outside the mask), the method used and notes for the user."""

    phases_rad: np.ndarray
    offset_rad: np.ndarray
    method: str
    notes: List[str] = field(default_factory=list)


def _smooth_complex(signal: np.ndarray, mask: np.ndarray, voxel_size_mm: Sequence[float]) -> np.ndarray:
    """Gaussian smoothing (``SMOOTHING_SIGMA_MM``) of a complex image that is zero outside the mask."""
    sigma = [SMOOTHING_SIGMA_MM / v for v in voxel_size_mm]
    signal = np.where(mask, signal, 0.0)
    real = scipy.ndimage.gaussian_filter(signal.real, sigma, mode="constant")
    imag = scipy.ndimage.gaussian_filter(signal.imag, sigma, mode="constant")
    return real + 1j * imag


def remove_phase_offsets(phases_rad: np.ndarray, magnitudes: Optional[np.ndarray],
                         echo_times_s: Sequence[float], mask: np.ndarray, voxel_size_mm: Sequence[float], *,
                         method: str = "mcpc3ds") -> OffsetResult:
    """Remove the per-voxel phase offset shared by all echoes of a monopolar multi-echo phase.

    ``mcpc3ds``: the echo-difference phase angle(z_2 conj(z_1)) is unwrapped by region growing, scaled to
    TE_1 and taken from echo 1 (complex arithmetic) to give phi_0; phi_0 is smoothed as the complex image
    |z_1| exp(i phi_0) with a Gaussian of ``SMOOTHING_SIGMA_MM`` inside the mask, then divided out of every
    echo. Outside the mask the phases are returned unchanged (offset 0). The difference is unwrapped only up
    to a global multiple of 2 pi, so phi_0 may carry a constant 2 pi k TE_1 / (TE_2 - TE_1): the field then
    differs by a constant, which background-field removal takes out. With one echo the offset cannot be told
    from the field: the phases are returned unchanged with a note. ``none`` returns the input unchanged.
    ``magnitudes`` may be None (then every voxel weighs the same).
    """
    p, mag, te, m, vs = check_echoes(phases_rad, magnitudes, echo_times_s, mask, voxel_size_mm)
    if method not in OFFSET_METHODS:
        raise QSMInputError(f"unknown phase-offset method {method!r}; choose one of {list(OFFSET_METHODS)}")
    unchanged = np.zeros(p.shape[1:], dtype=np.float32)
    if method == "none":
        return OffsetResult(p.astype(np.float32), unchanged, "none", ["phase offsets not removed (method 'none')"])
    if p.shape[0] < 2:
        return OffsetResult(p.astype(np.float32), unchanged, "none",
                            ["single echo: phase offsets cannot be separated from the field, so none were "
                             "removed (the offset stays in the field estimate)"])
    mag1 = np.ones(p.shape[1:]) if mag is None else mag[0]
    mag2 = np.ones(p.shape[1:]) if mag is None else mag[1]
    z1 = mag1 * np.exp(1j * p[0])
    z2 = mag2 * np.exp(1j * p[1])
    difference = np.angle(z2[m] * np.conj(z1[m]))
    weight = np.sqrt(mag1[m] * mag2[m]) if mag is not None else None
    difference_unwrapped = unwrap_along_quality_tree(difference, m, weight)
    raw_offset = np.zeros(p.shape[1:], dtype=np.complex128)
    raw_offset[m] = z1[m] * np.exp(-1j * te[0] * difference_unwrapped / (te[1] - te[0]))
    smooth = _smooth_complex(raw_offset, m, vs)
    offset = np.where(m, np.angle(smooth), 0.0)
    corrected = np.where(m[None], wrap(p - offset[None]), p).astype(np.float32)
    notes = [f"phase offsets removed by MCPC-3D-S from echoes 1 and 2 (TE {te[0] * 1e3:.2f} and "
             f"{te[1] * 1e3:.2f} ms), smoothed with a {SMOOTHING_SIGMA_MM:g} mm Gaussian"]
    return OffsetResult(corrected, offset.astype(np.float32), "mcpc3ds", notes)
