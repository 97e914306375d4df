"""A realistic head phantom from the MNI152 (ICBM 2009) tissue maps, with a multi-echo GRE acquisition.

The blocky phantom of ``phantom.py`` is piecewise constant and flatters every prior. This one starts
from the 1 mm grey- and white-matter probability maps and the brain-extracted T1 template that ship
inside the ``nilearn`` wheel (``pip install qsmdip[phantom]``; nothing is downloaded), so it has the
continuous partial volumes and the folded cortex of a real brain. On top of the tissue mix it adds:

- slowly varying texture in grey and white matter (white-matter susceptibility depends on fibre
  orientation; a smooth random field of +-0.01 ppm stands in for it);
- the deep grey nuclei at their MNI positions, each with an iron gradient around the literature value
  of REFERENCE.md (e.g. putamen richer posteriorly, caudate richer in the head);
- veins of several calibres (0.6 to 2.5 mm radius) at several angles to B0, a diamagnetic calcification
  and a strongly paramagnetic haemorrhage.

Anti-aliasing and anti-"inverse crime": the anatomy and its field are built on a simulation grid twice as
fine as the requested one at every voxel size (1 mm for 2 mm voxels) and block-averaged, so the data are not made
with the discretisation the solvers invert. The acquisition is simulated on that fine grid too: a
monopolar multi-echo GRE with S0 by tissue and R2* that rises with iron and |chi|, complex signals
averaged over each voxel (so veins and the bleed lose signal by dephasing, as in vivo), complex Gaussian
noise at the requested SNR, and a magnitude-weighted fit of the echo phases over TE that gives the
local field in ppm. Phase wraps are left out here: the field is what a perfect unwrapper would give.

Axes: i runs left -> right, j posterior -> anterior, k inferior -> superior (MNI's RAS), B0 along +k
unless ``b0_dir`` says otherwise (an oblique acquisition is a B0 tilted in the voxel frame).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import scipy.ndimage
import torch

from .errors import MissingDependencyError, QSMInputError
from .geometry import SUPERIOR, check_voxel_size, unit_vector
from .operator import forward_field
from .phantom import LABEL, TISSUES, HeadPhantom
from .units import GAMMA_BAR_MHZ_PER_T

log = logging.getLogger(__name__)

#: Field of view (mm, along i, j, k) around the brain's centre; 84 x 100 x 86 voxels at 2 mm.
REALISTIC_BOX_MM = (168.0, 200.0, 172.0)
#: MNI coordinates (mm) of the field of view's centre: the centre of the brain's bounding box.
BRAIN_CENTRE_MNI = (0.0, -16.5, 5.5)

#: Tissue susceptibility (ppm) of the partial-volume classes (REFERENCE.md).
CHI_WM, CHI_GM, CHI_CSF = -0.030, 0.020, 0.019
#: Proton density (relative) and R2* at 3 T (1/s) of the classes; R2* scales linearly with B0.
S0 = {"wm": 0.70, "gm": 0.82, "csf": 1.0}
R2STAR_3T = {"wm": 21.0, "gm": 16.0, "csf": 4.0}
#: R2* rise per ppm of susceptibility above the tissue mix, at 3 T (iron, veins, blood, calcium).
R2STAR_PER_PPM_3T = 150.0
#: Amplitude (ppm) of the smooth texture in grey and white matter, and its smoothing length (mm).
TEXTURE_PPM, TEXTURE_MM = 0.010, 6.0

#: Deep grey nuclei: name, centre (MNI mm, left side; mirrored to the right), semi-axes (mm),
#: iron gradient (unit direction, relative change from one end to the other).
_NUCLEI = [
    ("caudate", (-13.0, 12.0, 10.0), (4.5, 9.0, 8.0), ((0.0, 1.0, 0.0), 0.4)),
    ("putamen", (-25.0, 2.0, 1.0), (4.5, 14.0, 8.0), ((0.0, -1.0, 0.0), 0.5)),
    ("globus pallidus", (-19.0, -3.0, -1.0), (3.5, 8.0, 4.5), ((1.0, 0.0, 0.0), 0.3)),
    ("thalamus", (-11.0, -18.0, 7.0), (6.5, 12.0, 7.5), ((0.0, -1.0, 0.0), 0.5)),
    ("red nucleus", (-5.0, -20.0, -9.0), (3.0, 3.5, 3.5), ((0.0, 0.0, 1.0), 0.2)),
    ("substantia nigra", (-11.0, -17.0, -13.0), (2.5, 7.0, 3.0), ((0.0, -1.0, 0.0), 0.3)),
    ("dentate nucleus", (-15.0, -57.0, -36.0), (6.0, 8.0, 5.0), ((1.0, 0.0, 0.0), 0.3)),
]
#: Veins: start and end (MNI mm) and radius (mm): deep veins, a straight sinus and cortical veins of
#: several calibres at different angles to B0.
_VEINS = [
    ((-2.0, -40.0, 12.0), (-2.0, -5.0, 16.0), 1.5),      # internal cerebral vein (perpendicular to B0)
    ((2.0, -40.0, 12.0), (2.0, -5.0, 16.0), 1.5),
    ((0.0, -42.0, 12.0), (0.0, -70.0, 30.0), 2.5),       # straight sinus (oblique)
    ((40.0, -50.0, 15.0), (40.0, -50.0, 48.0), 1.2),     # parallel to B0
    ((-48.0, -25.0, 20.0), (-30.0, 30.0, 24.0), 1.0),    # in-plane
    ((-40.0, 25.0, 30.0), (-25.0, 5.0, 55.0), 0.8),      # oblique cortical vein
    ((30.0, 10.0, 40.0), (50.0, -30.0, 30.0), 0.6),      # thin medullary-like vein
    ((20.0, -70.0, 10.0), (35.0, -60.0, 40.0), 0.8),
]
CHI_VEIN = 0.30
_CALCIFICATION = ((28.0, 20.0, 24.0), 2.5, -0.20)
_HAEMORRHAGE = ((-30.0, -45.0, 30.0), (7.0, 5.5, 5.0), 0.80)

#: Echo times (s) of the simulated monopolar multi-echo GRE.
DEFAULT_ECHO_TIMES_S = (0.004, 0.012, 0.020, 0.028)


@dataclass
class RealisticPhantom(HeadPhantom):
    """A :class:`~qsmdip.phantom.HeadPhantom` with its simulated acquisition.

    ``magnitude`` is the root sum of squares of the noisy echo magnitudes (what DIP takes as a prior);
    ``echoes`` holds the noisy complex signal per echo (echo first, [e, i, j, k]) for phase pipelines.
    """

    magnitude: Optional[np.ndarray] = None
    echoes: Optional[np.ndarray] = None
    echo_times_s: Tuple[float, ...] = DEFAULT_ECHO_TIMES_S
    b0_tesla: float = 3.0
    snr: Optional[float] = None


def load_mni_maps() -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The 1 mm MNI152 2009 T1, GM and WM maps shipped with nilearn, and the MNI mm of voxel [0, 0, 0].

    Raises :class:`MissingDependencyError` with the install line when nilearn is missing.
    """
    try:
        from nilearn import datasets
    except ImportError as error:
        raise MissingDependencyError(
            "the realistic phantom needs nilearn, which ships the MNI152 tissue maps: "
            "pip install 'qsmdip[phantom]' (or use the simple phantom)") from error
    images = [datasets.load_mni152_template(), datasets.load_mni152_gm_template(),
              datasets.load_mni152_wm_template()]
    affine = images[0].affine
    if not np.allclose(affine[:3, :3], np.eye(3)):
        raise MissingDependencyError(f"unexpected MNI template geometry {affine.tolist()} in this nilearn version")
    t1, gm, wm = (np.asarray(im.get_fdata(), dtype=np.float32) for im in images)
    return t1, gm, wm, affine[:3, 3].astype(float)


def default_realistic_shape(voxel_size_mm: Sequence[float]) -> Tuple[int, int, int]:
    """Matrix covering :data:`REALISTIC_BOX_MM` at this voxel size (84 x 100 x 86 at 2 mm)."""
    vs = check_voxel_size(voxel_size_mm)
    return tuple(max(8, int(round(b / v))) for b, v in zip(REALISTIC_BOX_MM, vs))  # type: ignore[return-value]


PHANTOM_SUPERSAMPLING = 2
"""Simulation voxels per voxel and axis of :func:`make_realistic_phantom` and of the whole-head acquisition, at
every voxel size: averaging the complex signal over them gives the magnitude its intravoxel dephasing where chi
changes within a voxel, and keeps the truth off the inversion's own grid (point samples at 1 mm let TV on the
whole head's true local field invert its own forward model: 6.07 % NRMSE, against 9.06 % supersampled)."""
#: A simulation grid larger than this is warned about (the 1 mm phantom's 46 million voxels are not).
LARGE_SIMULATION_VOXELS = 50_000_000
#: Peak memory per simulation voxel, measured: 9.0 GB for the 1 mm phantom (the 1 mm whole head: 14.3 GB).
BYTES_PER_SIMULATION_VOXEL = 195


def _block_mean(x: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Average non-overlapping blocks of ``factors`` voxels (the partial-volume effect of a coarse voxel)."""
    if all(f == 1 for f in factors):
        return x
    shape = []
    for n, f in zip(x.shape[-3:], factors):
        shape += [n // f, f]
    y = x.reshape(x.shape[:-3] + tuple(shape))
    return y.mean(axis=(-5, -3, -1))


class _FineGrid:
    """Voxel centres (MNI mm) of the simulation grid, with soft (partial-volume) shapes on it."""

    def __init__(self, shape: Sequence[int], spacing: Sequence[float], centre: Sequence[float]):
        self.shape = tuple(int(n) for n in shape)
        self.spacing = tuple(float(s) for s in spacing)
        self.axes = [c + (np.arange(n) - (n - 1) / 2.0) * s for n, s, c in zip(self.shape, self.spacing, centre)]
        self.edge = 0.5 * max(self.spacing)  # half-width of the soft edge, mm

    def _box(self, lo, hi):
        sl, coords = [], []
        for ax, a, b in zip(self.axes, lo, hi):
            i0, i1 = int(np.searchsorted(ax, a, "left")), int(np.searchsorted(ax, b, "right"))
            sl.append(slice(i0, max(i0, i1)))
            coords.append(ax[i0:max(i0, i1)])
        return tuple(sl), np.ix_(*coords)

    def ellipsoid(self, centre, semi):
        """(slices, fraction in [0, 1]) of a soft-edged ellipsoid."""
        pad = self.edge + 1.0
        sl, (x, y, z) = self._box(np.subtract(centre, semi) - pad, np.add(centre, semi) + pad)
        rho = np.sqrt(((x - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2
                      + ((z - centre[2]) / semi[2]) ** 2)
        distance = (rho - 1.0) * min(semi)  # approximate signed distance to the surface, mm
        return sl, np.clip(0.5 - distance / (2 * self.edge), 0.0, 1.0), (x, y, z)

    def tube(self, p0, p1, radius):
        """(slices, fraction) of a soft-edged cylinder of ``radius`` mm around the segment p0-p1."""
        p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
        pad = radius + self.edge + 1.0
        sl, (x, y, z) = self._box(np.minimum(p0, p1) - pad, np.maximum(p0, p1) + pad)
        d = p1 - p0
        rel = (x - p0[0], y - p0[1], z - p0[2])
        t = np.clip((rel[0] * d[0] + rel[1] * d[1] + rel[2] * d[2]) / float(d @ d), 0.0, 1.0)
        dist = np.sqrt(sum((rel[a] - t * d[a]) ** 2 for a in range(3)))
        return sl, np.clip(0.5 - (dist - radius) / (2 * self.edge), 0.0, 1.0)


def _sample_mni(maps: Sequence[np.ndarray], origin_mni: np.ndarray, grid: _FineGrid) -> List[np.ndarray]:
    """Trilinear samples of the 1 mm MNI maps at the grid's voxel centres (zero outside the template)."""
    idx = [ax - o for ax, o in zip(grid.axes, origin_mni)]   # MNI voxel index = mm - origin (1 mm spacing)
    coords = np.stack(np.meshgrid(*idx, indexing="ij"))
    return [scipy.ndimage.map_coordinates(m, coords, order=1, mode="constant", cval=0.0).astype(np.float32)
            for m in maps]


def _overlay(chi: np.ndarray, r2s_extra: np.ndarray, labels_frac: Dict[str, np.ndarray], name: str,
             sl, fraction: np.ndarray, value, within: np.ndarray) -> None:
    """Replace the tissue in ``fraction`` of each voxel (inside ``within``) by a structure of ``value``."""
    w = fraction * within[sl]
    chi[sl] = (1.0 - w) * chi[sl] + w * value
    r2s_extra[sl] = (1.0 - w) * r2s_extra[sl] + w * R2STAR_PER_PPM_3T * np.abs(value)
    frac = labels_frac.setdefault(name, np.zeros(chi.shape, dtype=np.float32))
    frac[sl] = np.maximum(frac[sl], w)


@dataclass
class Anatomy:
    """The brain on the simulation grid (up to 2x finer than the voxels): what both the local-field
    phantom and the full acquisition (``realistic_acquisition``) are built from.

    ``chi`` is susceptibility relative to water (ppm), zero outside ``brain``; ``gm``, ``wm``, ``csf`` are
    partial volumes; ``r2s_extra`` is the R2* (1/s at 3 T) the structures add; ``fractions`` the share of
    each voxel taken by each named structure.
    """

    grid: "_FineGrid"
    factors: Tuple[int, int, int]
    chi: np.ndarray
    brain: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    r2s_extra: np.ndarray
    fractions: Dict[str, np.ndarray]


def build_anatomy(shape: Sequence[int], voxel_size_mm: Sequence[float], rng: np.random.Generator,
                  supersampling: Optional[int] = None) -> Anatomy:
    """Tissue, nuclei, veins, calcification and bleed on the simulation grid of a ``shape`` matrix of
    ``voxel_size_mm`` voxels centred on the brain (:data:`BRAIN_CENTRE_MNI`); ``rng`` draws the texture.
    ``supersampling``: simulation voxels per voxel along each axis (1 to 4; None:
    :data:`PHANTOM_SUPERSAMPLING`, what the local-field phantom and the whole-head acquisition use)."""
    vs = check_voxel_size(voxel_size_mm)
    shape3 = tuple(int(n) for n in shape)
    if supersampling is None:
        supersampling = PHANTOM_SUPERSAMPLING
    if isinstance(supersampling, (int, np.integer)) and not isinstance(supersampling, bool) and \
            1 <= supersampling <= 4:
        factors = (int(supersampling),) * 3
    else:
        raise QSMInputError(f"phantom supersampling must be a whole number from 1 to 4, got {supersampling!r}")
    fine = _FineGrid([n * f for n, f in zip(shape3, factors)], [v / f for v, f in zip(vs, factors)],
                     BRAIN_CENTRE_MNI)
    fine_voxels = int(np.prod(fine.shape))
    if fine_voxels > LARGE_SIMULATION_VOXELS:
        log.warning("the realistic anatomy's simulation grid has %.0f million voxels: expect %.0f GB of memory "
                    "or more, and minutes (supersampling=1 would point-sample instead: a smaller grid, no dephasing)",
                    fine_voxels / 1e6, fine_voxels * BYTES_PER_SIMULATION_VOXEL / 1e9)
    t1, gm_map, wm_map, origin = load_mni_maps()
    brain_t1, gm, wm = _sample_mni([(t1 > 0).astype(np.float32), gm_map, wm_map], origin, fine)
    brain = brain_t1 > 0.5
    brain = scipy.ndimage.binary_fill_holes(brain)
    tissue = np.clip(gm + wm, 0.0, 1.0)
    scale = np.where(gm + wm > 1.0, 1.0 / np.maximum(gm + wm, 1e-6), 1.0)
    gm, wm = gm * scale * brain, wm * scale * brain
    csf = np.clip(1.0 - tissue, 0.0, 1.0) * brain

    texture = scipy.ndimage.gaussian_filter(rng.standard_normal(fine.shape).astype(np.float32),
                                            [TEXTURE_MM / s for s in fine.spacing])
    texture *= TEXTURE_PPM / max(float(np.abs(texture).max()), 1e-12)
    chi = (gm * CHI_GM + wm * CHI_WM + csf * CHI_CSF + (gm + wm) * texture).astype(np.float64)
    r2s_extra = np.zeros(fine.shape, dtype=np.float64)
    fractions: Dict[str, np.ndarray] = {}

    for name, (cx, cy, cz), semi, (direction, gradient) in _NUCLEI:
        value = TISSUES[LABEL[name]][1]
        for side in (1.0, -1.0):
            centre = (side * cx, cy, cz)
            sl, frac, (x, y, z) = fine.ellipsoid(centre, semi)
            dx = np.asarray(direction, float) * np.array([side, 1.0, 1.0])
            # position along the gradient axis, -1 .. 1 across the nucleus
            t = ((x - centre[0]) * dx[0] / semi[0] + (y - centre[1]) * dx[1] / semi[1]
                 + (z - centre[2]) * dx[2] / semi[2])
            local = value * (1.0 + 0.5 * gradient * np.clip(t, -1.0, 1.0))
            _overlay(chi, r2s_extra, fractions, name, sl, frac, local, brain)
    for p0, p1, radius in _VEINS:
        sl, frac = fine.tube(p0, p1, radius)
        _overlay(chi, r2s_extra, fractions, "vein", sl, frac, CHI_VEIN, brain)
    centre, radius, value = _CALCIFICATION
    sl, frac, _ = fine.ellipsoid(centre, (radius,) * 3)
    _overlay(chi, r2s_extra, fractions, "calcification", sl, frac, value, brain)
    centre, semi, value = _HAEMORRHAGE
    sl, frac, _ = fine.ellipsoid(centre, semi)
    _overlay(chi, r2s_extra, fractions, "haemorrhage", sl, frac, value, brain)
    chi *= brain
    return Anatomy(fine, factors, chi, brain, gm, wm, csf, r2s_extra, fractions)


def check_simulation_arguments(shape: Optional[Sequence[int]], default_shape: Tuple[int, int, int],
                               snr: Optional[float], b0_tesla: float, echo_times_s: Sequence[float], *,
                               what: str, increasing: bool = False) -> Tuple[Tuple[int, ...], np.ndarray]:
    """The matrix and echo times of a simulated acquisition, with one clear error for a bad argument.

    ``what`` names the object in the messages; ``increasing`` also requires increasing echo times.
    """
    shape3 = default_shape if shape is None else tuple(int(n) for n in np.ravel(shape))
    if len(shape3) != 3 or min(shape3) < 1:
        raise QSMInputError(f"{what} shape must be three positive integers, got {tuple(np.ravel(shape))}")
    if snr is not None and not (np.isfinite(snr) and snr > 0):
        raise QSMInputError(f"snr must be a positive number or None, got {snr}")
    if not (np.isfinite(b0_tesla) and b0_tesla > 0):
        raise QSMInputError(f"B0 must be a positive field strength in tesla, got {b0_tesla}")
    tes = np.asarray(echo_times_s, dtype=np.float64).ravel()
    if tes.size < 1 or not np.all(np.isfinite(tes)) or np.any(tes <= 0) or np.any(tes > 0.2):
        raise QSMInputError(f"echo times must be positive and in seconds (<= 0.2 s), got {tuple(tes)}")
    if increasing and np.any(np.diff(tes) <= 0):
        raise QSMInputError(f"echo times must be increasing, got {tuple(tes)}")
    return shape3, tes


def make_realistic_phantom(shape: Optional[Sequence[int]] = None,
                           voxel_size_mm: Sequence[float] = (2.0, 2.0, 2.0), *,
                           b0_dir: Sequence[float] = SUPERIOR, snr: Optional[float] = 100.0, seed: int = 0,
                           b0_tesla: float = 3.0, echo_times_s: Sequence[float] = DEFAULT_ECHO_TIMES_S,
                           pad_factor: float = 2.0,
                           supersampling: Optional[int] = PHANTOM_SUPERSAMPLING) -> RealisticPhantom:
    """Build the realistic phantom, its multi-echo GRE signal and the local field measured from it.

    Args:
        shape: matrix (i, j, k); ``None`` covers :data:`REALISTIC_BOX_MM`. A smaller matrix crops the
            same anatomy around the brain's centre (tests use this).
        voxel_size_mm: voxel size along i, j, k (anisotropic allowed).
        b0_dir: B0 direction in the voxel frame (normalised).
        snr: signal-to-noise ratio of the complex signal: mean first-echo magnitude in the brain divided
            by the noise standard deviation of each of the real and imaginary parts. ``None``: no noise.
        seed: seeds the noise and the tissue texture.
        b0_tesla: field strength (sets the phase per ppm and scales R2*).
        echo_times_s: echo times in seconds (monopolar; at least one).
        pad_factor: zero-padding of the forward model's FFT (2 avoids wrap-around).
        supersampling: simulation voxels per voxel along each axis (1 to 4; default and None: 2);
            the signal is averaged over them, so the magnitude shows intravoxel dephasing. 1 point-samples:
            each voxel's signal is that of its centre, with no dephasing (before 2026-12-04 the default below
            2 mm, which flattered every method there). A 1 mm phantom peaks near 9 GB of memory at 2; a
            simulation grid over 5e7 voxels is warned about.

    Returns:
        a :class:`RealisticPhantom`: ``chi_ppm`` and ``field_ppm`` (zero outside ``mask``) on the
        requested grid, ``magnitude`` (root sum of squares over echoes), ``echoes`` (complex, [e, i, j, k])
        and ``labels`` (the dominant tissue of each voxel, :data:`qsmdip.phantom.TISSUES`).
    """
    vs = check_voxel_size(voxel_size_mm)
    b0 = unit_vector(b0_dir)
    shape3, tes = check_simulation_arguments(shape, default_realistic_shape(vs), snr, b0_tesla, echo_times_s,
                                             what="phantom")

    rng = np.random.default_rng(seed)
    anatomy = build_anatomy(shape3, vs, rng, supersampling)
    fine, factors, chi, brain = anatomy.grid, anatomy.factors, anatomy.chi, anatomy.brain
    gm, wm, csf, r2s_extra, fractions = anatomy.gm, anatomy.wm, anatomy.csf, anatomy.r2s_extra, anatomy.fractions

    field_fine = forward_field(chi, fine.spacing, b0, pad_factor=pad_factor, dtype=torch.float32)

    # The acquisition, voxel by fine voxel, then averaged: S = S0 exp(-TE R2*) exp(i 2 pi gamma B0 TE f).
    hz_per_ppm = GAMMA_BAR_MHZ_PER_T * b0_tesla
    s0 = (gm * S0["gm"] + wm * S0["wm"] + csf * S0["csf"]) * brain
    r2s = ((gm * R2STAR_3T["gm"] + wm * R2STAR_3T["wm"] + csf * R2STAR_3T["csf"]) + r2s_extra) * (b0_tesla / 3.0)
    signals = np.stack([_block_mean(s0 * np.exp(-te * r2s) * np.exp(2j * np.pi * hz_per_ppm * te * field_fine),
                                    factors) for te in tes]).astype(np.complex64)
    chi_ppm = _block_mean(chi, factors)
    field_true = _block_mean(field_fine, factors)
    brain_frac = _block_mean(brain.astype(np.float32), factors)
    mask = scipy.ndimage.binary_fill_holes(brain_frac > 0.5)
    if not mask.any():
        raise QSMInputError(f"phantom shape {shape3} at {vs} mm holds no brain: use a larger matrix")

    noise_std = 0.0
    if snr is not None:
        noise_std = float(np.abs(signals[0][mask]).mean() / snr)
        noise = rng.standard_normal(signals.shape) + 1j * rng.standard_normal(signals.shape)
        signals = (signals + noise_std * noise).astype(np.complex64)

    # Phase of each echo unwrapped around the noise-free phase (a perfect unwrapper), then the
    # magnitude-weighted least-squares fit over TE through the origin gives the local field.
    reference = 2 * np.pi * hz_per_ppm * tes[:, None, None, None] * field_true[None]
    phases = reference + np.angle(signals * np.exp(-1j * reference))
    weights = np.abs(signals) ** 2
    te_col = tes[:, None, None, None]
    field_ppm = (np.sum(weights * te_col * phases, axis=0)
                 / np.maximum(np.sum(weights * te_col ** 2, axis=0), 1e-30) / (2 * np.pi * hz_per_ppm))
    field_ppm = np.where(mask, field_ppm, 0.0)
    magnitude = np.sqrt(np.sum(np.abs(signals) ** 2, axis=0))

    labels = _dominant_labels(gm, wm, csf, fractions, factors, mask)
    field_noise = float(np.sqrt(np.mean((field_ppm - field_true)[mask] ** 2)))
    return RealisticPhantom(
        chi_ppm=chi_ppm.astype(np.float32), mask=mask, field_ppm=field_ppm.astype(np.float32),
        voxel_size_mm=vs, b0_dir=b0, labels=labels,
        label_names={k: name for k, (name, _) in TISSUES.items()}, noise_std_ppm=field_noise,
        magnitude=magnitude.astype(np.float32), echoes=signals, echo_times_s=tuple(float(t) for t in tes),
        b0_tesla=float(b0_tesla), snr=snr)


def _dominant_labels(gm, wm, csf, fractions, factors, mask) -> np.ndarray:
    """The tissue label (``phantom.TISSUES``) with the largest share of each voxel; 0 outside the mask."""
    names = ["white matter", "cortical grey matter", "CSF"] + sorted(fractions)
    stack = [wm, gm, csf] + [fractions[n] for n in sorted(fractions)]
    # a structure wins where it fills at least half the voxel, else the tissue class with the largest share
    shares = np.stack([_block_mean(np.asarray(s, dtype=np.float32), factors) for s in stack])
    shares[3:] = np.where(shares[3:] >= 0.5, shares[3:] + 1.0, 0.0)
    codes = np.array([LABEL[n] for n in names], dtype=np.int16)
    return np.where(mask, codes[np.argmax(shares, axis=0)], 0).astype(np.int16)
