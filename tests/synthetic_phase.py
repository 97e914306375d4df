"""A small simulated monopolar multi-echo GRE acquisition with known truth, for the phase-stage tests.

A head-shaped ellipsoid mask, an air-like sphere (chi +9 ppm relative to tissue) just outside it in front and
below (a sinus), a linear shim residual; field (ppm) from the dipole forward model; a smooth phase offset
shared by all echoes; magnitude with T2* decay; complex Gaussian noise.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.ndimage

from qsmdip.operator import forward_field

GAMMA_BAR_MHZ_PER_T = 42.577478


@dataclass
class Acquisition:
    phases_rad: np.ndarray      # [echo, i, j, k], wrapped, with offset and noise
    magnitudes: np.ndarray      # [echo, i, j, k]
    echo_times_s: np.ndarray    # [echo]
    mask: np.ndarray            # [i, j, k] bool
    voxel_size_mm: tuple
    field_ppm: np.ndarray       # true total field
    offset_rad: np.ndarray      # true phase offset
    true_phase_rad: np.ndarray  # [echo, i, j, k]: offset + 2 pi gamma B0 TE field, unwrapped, noise-free


def simulate(shape=(48, 56, 44), voxel_size_mm=(3.0, 3.0, 3.0), echo_times_s=(0.004, 0.009, 0.014, 0.019, 0.024),
             b0_t=3.0, snr=40.0, offset_amplitude_rad=1.5, sinus_chi_ppm=9.0, seed=0) -> Acquisition:
    """Simulated acquisition; ``snr`` is the mean magnitude at TE 0 over the noise standard deviation."""
    rng = np.random.default_rng(seed)
    vs = np.asarray(voxel_size_mm, dtype=float)
    centre = (np.asarray(shape) - 1) / 2 * vs
    pos = np.indices(shape, dtype=float) * vs[:, None, None, None] - centre[:, None, None, None]  # mm
    semi = np.array([0.40, 0.40, 0.38]) * np.asarray(shape) * vs
    head = ((pos / semi[:, None, None, None]) ** 2).sum(0) < 1
    sinus_centre = np.array([0.0, 0.62, -0.45]) * semi
    sinus = ((pos - sinus_centre[:, None, None, None]) ** 2).sum(0) < (0.2 * semi.min()) ** 2
    mask = head & ~scipy.ndimage.binary_dilation(sinus, iterations=2)
    chi = np.where(sinus, sinus_chi_ppm, 0.0)
    field = forward_field(chi, tuple(vs)) + 1.0 * pos[1] / semi[1] - 0.5 * pos[2] / semi[2]
    offset = offset_amplitude_rad * (np.sin(pos[0] / 40.0) + 0.5 * np.cos(pos[1] / 55.0 + pos[2] / 70.0))
    te = np.asarray(echo_times_s, dtype=float)
    omega = 2 * np.pi * GAMMA_BAR_MHZ_PER_T * b0_t * field  # rad/s (MHz/T * T * ppm = Hz)
    true_phase = offset[None] + omega[None] * te[:, None, None, None]
    m0 = 1.0 + 0.3 * np.cos(pos[0] / 30.0) * np.sin(pos[2] / 45.0)
    magnitude = m0[None] * np.exp(-te[:, None, None, None] / 0.05)
    noise = rng.standard_normal(true_phase.shape) + 1j * rng.standard_normal(true_phase.shape)
    signal = magnitude * np.exp(1j * true_phase) + noise * (m0.mean() / snr / np.sqrt(2))
    return Acquisition(np.angle(signal), np.abs(signal), te, mask, tuple(vs), field, offset, true_phase)


def fraction_exact(unwrapped: np.ndarray, truth: np.ndarray, mask: np.ndarray):
    """(fraction of the mask where ``unwrapped`` equals ``truth`` plus the most common multiple of 2 pi, to
    within 1 rad of noise; that multiple in turns)."""
    diff = (np.asarray(unwrapped, dtype=float) - truth)[mask]
    turns = np.round(diff / (2 * np.pi))
    values, counts = np.unique(turns, return_counts=True)
    common = values[np.argmax(counts)]
    residual = np.abs(diff - 2 * np.pi * common)
    return float(np.mean(residual < 1.0)), int(common)


def circular_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.angle(np.exp(1j * (a - b)))
