"""A whole-head multi-echo GRE acquisition around the realistic brain: what the scanner gives.

:mod:`qsmdip.realistic_phantom` stops at the local field a perfect pipeline would give. This module
simulates what comes before it, so the phase-to-field stages can be checked against a known truth:

- around the brain (its MNI152 mask), a CSF shell, skull bone and scalp, then air; a sinus-like air cavity
  below the orbitofrontal cortex;
- susceptibility relative to water for tissue, bone (-2.1 ppm) and air (+9.4 ppm); the total field is the
  field of all of it (air outside the head as the zero reference of the FFT's padding), so it holds the
  background field of the head's shape, the bone and the cavity: many wraps near the cavity at late echoes;
- a smooth phase offset shared by every echo (what coil combination leaves), and complex noise;
- the signal simulated on a grid twice as fine and averaged per voxel, so strong gradients near
  the cavity cost signal by dephasing, as in vivo.

Truths kept for checking each stage: the offset, the total field, the local field of the brain's own
sources, the brain and head masks, and chi. :func:`true_local_field` gives the reference local field for
any mask a pipeline returns (the field of the sources inside that mask).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import numpy as np
import scipy.ndimage
import torch

from .errors import QSMInputError
from .geometry import SUPERIOR, check_voxel_size, unit_vector
from .operator import forward_field
from .realistic_phantom import (BRAIN_CENTRE_MNI, DEFAULT_ECHO_TIMES_S, LARGE_SIMULATION_VOXELS, R2STAR_3T,
                                REALISTIC_BOX_MM, S0,
                                _block_mean, _dominant_labels, _FineGrid, build_anatomy,
                                check_simulation_arguments)
from .units import GAMMA_BAR_MHZ_PER_T

#: Field of view (mm): the brain's box plus room for the skull, the scalp and some air.
ACQUISITION_BOX_MM = tuple(b + 40.0 for b in REALISTIC_BOX_MM)
#: Thickness (mm) of the layers around the brain, from the inside out.
CSF_SHELL_MM, BONE_MM, SCALP_MM = 2.0, 6.0, 6.0
#: Susceptibility relative to water (ppm): air (0.36 ppm SI minus water's -9.05), cortical bone, scalp.
CHI_AIR, CHI_BONE, CHI_SCALP = 9.4, -2.1, 0.0
#: Proton density and R2* at 3 T (1/s) outside the brain.
S0_OUTSIDE = {"bone": 0.05, "scalp": 0.9, "csf": S0["csf"]}
R2STAR_OUTSIDE_3T = {"bone": 400.0, "scalp": 35.0, "csf": R2STAR_3T["csf"]}
#: The cavity: an ellipsoid (MNI centre and semi-axes, mm) below the frontal lobe, like the ethmoid and
#: frontal sinuses, carved out of everything but the brain and its CSF shell.
SINUS_CENTRE_MNI, SINUS_SEMI_MM = (0.0, 40.0, -38.0), (14.0, 16.0, 10.0)
#: Phase offset: amplitude (rad) of a smooth random map of this smoothing length (mm), plus a linear ramp.
OFFSET_RAD, OFFSET_SMOOTHING_MM, OFFSET_RAMP_RAD = 2.0, 40.0, 1.5


@dataclass
class RealisticAcquisition:
    """A simulated monopolar multi-echo GRE of the realistic head, with the truth of every stage.

    Arrays are [i, j, k]; echo series are [echo, i, j, k]. Fields are in ppm, phases in radians.
    """

    phase_rad: np.ndarray            # wrapped phase per echo, (-pi, pi]
    magnitude: np.ndarray            # magnitude per echo
    echo_times_s: Tuple[float, ...]
    b0_tesla: float
    voxel_size_mm: Tuple[float, float, float]
    b0_dir: Tuple[float, float, float]
    chi_ppm: np.ndarray              # brain susceptibility relative to water, 0 outside the brain
    chi_tissue_ppm: np.ndarray       # every tissue relative to water; air +9.4
    brain_mask: np.ndarray
    head_mask: np.ndarray            # voxels at least half tissue (brain, CSF, bone, scalp)
    total_field_ppm: np.ndarray      # noise-free field of everything, in the head
    local_field_ppm: np.ndarray      # noise-free field of the brain's own sources, in the brain
    offset_rad: np.ndarray           # phase offset shared by the echoes
    labels: np.ndarray
    snr: Optional[float]
    noise_std: float = 0.0
    #: every tissue's susceptibility on the simulation grid, and its block size: the reference local
    #: field of any mask is computed there, like the data (see :func:`true_local_field`)
    chi_tissue_fine_ppm: Optional[np.ndarray] = field(default=None, repr=False)
    fine_factors: Tuple[int, int, int] = (1, 1, 1)

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(self.chi_ppm.shape)  # type: ignore[return-value]


def default_acquisition_shape(voxel_size_mm: Sequence[float]) -> Tuple[int, int, int]:
    """Matrix covering :data:`ACQUISITION_BOX_MM` at this voxel size (104 x 120 x 106 at 2 mm)."""
    vs = check_voxel_size(voxel_size_mm)
    return tuple(max(8, int(round(b / v))) for b, v in zip(ACQUISITION_BOX_MM, vs))  # type: ignore[return-value]


def make_realistic_acquisition(shape: Optional[Sequence[int]] = None,
                               voxel_size_mm: Sequence[float] = (2.0, 2.0, 2.0), *,
                               b0_dir: Sequence[float] = SUPERIOR, snr: Optional[float] = 100.0, seed: int = 0,
                               b0_tesla: float = 3.0, echo_times_s: Sequence[float] = DEFAULT_ECHO_TIMES_S,
                               offsets: bool = True, cavity: bool = True,
                               pad_factor: float = 1.5,
                               supersampling: Optional[int] = None) -> RealisticAcquisition:
    """Simulate the head's multi-echo GRE magnitude and wrapped phase.

    Args:
        shape: matrix (i, j, k); ``None`` covers :data:`ACQUISITION_BOX_MM`.
        voxel_size_mm: voxel size along i, j, k (anisotropic allowed).
        b0_dir: B0 direction in the voxel frame (an oblique acquisition is a tilted B0).
        snr: mean first-echo magnitude in the brain over the noise standard deviation of each of the
            real and imaginary parts; ``None`` for no noise.
        seed: seeds the texture, the offset map and the noise.
        b0_tesla: field strength (phase per ppm; R2* scales with it).
        echo_times_s: echo times (s), monopolar, increasing.
        offsets: add the smooth phase offset shared by the echoes.
        cavity: carve the sinus-like air cavity.
        pad_factor: zero-padding of the forward model's FFT; the padding is air.
        supersampling: simulation voxels per voxel along each axis (1 to 4; ``None``: 2, as the
            local-field phantom). At 1 mm the 0.5 mm grid peaks near 14 GB of memory and takes 3 to 4 minutes
            on 2 cores; 1 point-samples (no intravoxel dephasing, and a truth on the inversion's own grid).
    """
    vs = check_voxel_size(voxel_size_mm)
    b0 = unit_vector(b0_dir)
    shape3, tes = check_simulation_arguments(shape, default_acquisition_shape(vs), snr, b0_tesla, echo_times_s,
                                             what="acquisition", increasing=True)

    rng = np.random.default_rng(seed)
    anatomy = build_anatomy(shape3, vs, rng, supersampling)
    fine, factors = anatomy.grid, anatomy.factors
    brain = anatomy.brain
    layers = _head_layers(brain, fine, cavity)

    # susceptibility relative to water; and relative to air for the forward model (air = padding = 0)
    chi_tissue = anatomy.chi + layers["bone"] * CHI_BONE + layers["scalp"] * CHI_SCALP + layers["air"] * CHI_AIR
    precision = _field_precision(fine.shape)
    field_total = forward_field(chi_tissue - CHI_AIR, fine.spacing, b0, pad_factor=pad_factor, dtype=precision)
    field_local = forward_field(anatomy.chi, fine.spacing, b0, pad_factor=pad_factor, dtype=precision)

    scale = b0_tesla / 3.0
    s0 = ((anatomy.gm * S0["gm"] + anatomy.wm * S0["wm"] + anatomy.csf * S0["csf"]) * brain
          + sum(layers[n] * S0_OUTSIDE[n] for n in ("bone", "scalp", "csf")))
    r2s = ((anatomy.gm * R2STAR_3T["gm"] + anatomy.wm * R2STAR_3T["wm"] + anatomy.csf * R2STAR_3T["csf"]
            + anatomy.r2s_extra) * brain
           + sum(layers[n] * R2STAR_OUTSIDE_3T[n] for n in ("bone", "scalp", "csf"))) * scale
    offset_fine = _offset_map(fine, rng) if offsets else np.zeros(fine.shape)
    hz_per_ppm = GAMMA_BAR_MHZ_PER_T * b0_tesla
    signals = np.stack([
        _block_mean(s0 * np.exp(-te * r2s) * np.exp(1j * (offset_fine + 2 * np.pi * hz_per_ppm * te * field_total)),
                    factors) for te in tes]).astype(np.complex64)

    brain_frac = _block_mean(brain.astype(np.float32), factors)
    brain_mask = scipy.ndimage.binary_fill_holes(brain_frac > 0.5)
    if not brain_mask.any():
        raise QSMInputError(f"acquisition shape {shape3} at {vs} mm holds no brain: use a larger matrix")
    tissue_frac = _block_mean((1.0 - layers["air"]).astype(np.float32), factors)
    head_mask = tissue_frac > 0.5

    noise_std = 0.0
    if snr is not None:
        noise_std = float(np.abs(signals[0][brain_mask]).mean() / snr)
        noise = rng.standard_normal(signals.shape) + 1j * rng.standard_normal(signals.shape)
        signals = (signals + noise_std * noise).astype(np.complex64)

    labels = _dominant_labels(anatomy.gm, anatomy.wm, anatomy.csf, anatomy.fractions, factors, brain_mask)
    offset = np.angle(_block_mean(np.exp(1j * offset_fine), factors))
    return RealisticAcquisition(
        phase_rad=np.angle(signals).astype(np.float32), magnitude=np.abs(signals).astype(np.float32),
        echo_times_s=tuple(float(t) for t in tes), b0_tesla=float(b0_tesla), voxel_size_mm=vs, b0_dir=b0,
        chi_ppm=_block_mean(anatomy.chi, factors).astype(np.float32),
        chi_tissue_ppm=_block_mean(chi_tissue, factors).astype(np.float32),
        brain_mask=brain_mask, head_mask=head_mask,
        total_field_ppm=np.where(head_mask, _block_mean(field_total, factors), 0.0).astype(np.float32),
        local_field_ppm=np.where(brain_mask, _block_mean(field_local, factors), 0.0).astype(np.float32),
        offset_rad=offset.astype(np.float32), labels=labels, snr=snr, noise_std=noise_std,
        chi_tissue_fine_ppm=chi_tissue.astype(np.float32), fine_factors=factors)


def true_local_field(acquisition: RealisticAcquisition, mask: np.ndarray, *, pad_factor: float = 1.5) -> np.ndarray:
    """The local field a perfect background removal would return in ``mask`` (ppm, 0 outside).

    It is the field of the sources inside the mask, with their susceptibility referenced to its mean in the
    mask: a uniform susceptibility in the mask makes a field that is harmonic inside it, which no
    background-removal method keeps, so that part is not measurable from the local field. It is computed on
    the simulation grid, like the data, and averaged per voxel.
    """
    m = np.asarray(mask, dtype=bool)
    if m.shape != acquisition.shape or not m.any():
        raise QSMInputError(f"mask must be a non-empty {acquisition.shape} array, got {m.shape}")
    factors = acquisition.fine_factors
    chi_fine = acquisition.chi_tissue_fine_ppm
    if chi_fine is None:
        chi_fine, factors = acquisition.chi_tissue_ppm, (1, 1, 1)
    m_fine = m
    for axis, f in enumerate(factors):
        m_fine = np.repeat(m_fine, f, axis=axis)
    chi = np.where(m_fine, chi_fine - chi_fine[m_fine].mean(dtype=np.float64), 0.0)
    spacing = [v / f for v, f in zip(acquisition.voxel_size_mm, factors)]
    local = _block_mean(forward_field(chi, spacing, acquisition.b0_dir, pad_factor=pad_factor,
                                      dtype=_field_precision(chi.shape)), factors)
    return np.where(m, local, 0.0).astype(np.float32)


def _field_precision(fine_shape: Sequence[int]) -> torch.dtype:
    """float64 for the forward field, float32 on a large simulation grid (e.g. 1 mm supersampled), where
    float64's FFT would not fit in memory; its relative error, near 1e-7, is far below the noise."""
    return torch.float32 if int(np.prod(fine_shape)) > LARGE_SIMULATION_VOXELS else torch.float64


def wraps_near_cavity(acquisition: RealisticAcquisition, echo: int = -1, radius_mm: float = 30.0) -> float:
    """Number of 2 pi cycles the noise-free phase spans in the brain within ``radius_mm`` of the cavity."""
    vs = np.asarray(acquisition.voxel_size_mm)
    centre = _mni_to_index(SINUS_CENTRE_MNI, acquisition.shape, vs)
    grids = np.meshgrid(*[(np.arange(n) - c) * v for n, c, v in zip(acquisition.shape, centre, vs)], indexing="ij")
    near = (sum(g ** 2 for g in grids) <= radius_mm ** 2) & acquisition.brain_mask
    if not near.any():
        return 0.0
    phase = 2 * np.pi * GAMMA_BAR_MHZ_PER_T * acquisition.b0_tesla * acquisition.echo_times_s[echo] \
        * acquisition.total_field_ppm[near]
    return float((phase.max() - phase.min()) / (2 * np.pi))


def _mni_to_index(point_mni: Sequence[float], shape: Sequence[int], vs: np.ndarray) -> np.ndarray:
    """Voxel index (float) of an MNI point on a grid centred on :data:`BRAIN_CENTRE_MNI`."""
    return np.array([(n - 1) / 2.0 + (p - c) / v for p, c, n, v in zip(point_mni, BRAIN_CENTRE_MNI, shape, vs)])


def _head_layers(brain: np.ndarray, fine: _FineGrid, cavity: bool) -> dict:
    """Binary layers on the simulation grid: CSF shell, bone, scalp and air (outside the head and in the
    cavity), from the distance to the brain."""
    distance = scipy.ndimage.distance_transform_edt(~brain, sampling=fine.spacing)
    csf = (distance > 0) & (distance <= CSF_SHELL_MM)
    bone = (distance > CSF_SHELL_MM) & (distance <= CSF_SHELL_MM + BONE_MM)
    scalp = (distance > CSF_SHELL_MM + BONE_MM) & (distance <= CSF_SHELL_MM + BONE_MM + SCALP_MM)
    air = distance > CSF_SHELL_MM + BONE_MM + SCALP_MM
    if cavity:
        x, y, z = np.meshgrid(*fine.axes, indexing="ij", sparse=True)
        inside = (((x - SINUS_CENTRE_MNI[0]) / SINUS_SEMI_MM[0]) ** 2
                  + ((y - SINUS_CENTRE_MNI[1]) / SINUS_SEMI_MM[1]) ** 2
                  + ((z - SINUS_CENTRE_MNI[2]) / SINUS_SEMI_MM[2]) ** 2) <= 1.0
        carve = inside & (distance > CSF_SHELL_MM + 1.0)   # keep a thin bony wall next to the CSF
        bone, scalp, air = bone & ~carve, scalp & ~carve, air | carve
    return {name: layer.astype(np.float64) for name, layer in
            (("csf", csf), ("bone", bone), ("scalp", scalp), ("air", air))}


def _offset_map(fine: _FineGrid, rng: np.random.Generator) -> np.ndarray:
    """A smooth phase offset (rad): a random map smoothed over tens of mm plus a linear ramp."""
    smooth = scipy.ndimage.gaussian_filter(rng.standard_normal(fine.shape),
                                           [OFFSET_SMOOTHING_MM / s for s in fine.spacing], mode="wrap")
    smooth *= OFFSET_RAD / max(float(np.abs(smooth).max()), 1e-12)
    ramp_axis = [np.linspace(-0.5, 0.5, n) for n in fine.shape]
    ramp = OFFSET_RAMP_RAD * (ramp_axis[0][:, None, None] + 0.5 * ramp_axis[1][None, :, None])
    return smooth + ramp
