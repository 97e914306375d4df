"""A numerical head phantom built in code: true susceptibility, brain mask and local field.

The anatomy is defined in physical millimetres around the centre of the volume, so every matrix and
voxel size shows the same head: axis i runs left-right, j posterior -> anterior, k inferior -> superior
(B0 along +k by default). It holds a brain with a flattened base, a cerebellum and a brainstem, a
cortical grey-matter shell around white matter, CSF ventricles, paired deep grey nuclei, veins, a
diamagnetic calcification and a strongly paramagnetic bleed, with the literature susceptibilities of
REFERENCE.md (ppm; offsets do not matter to the demeaned challenge metrics). Susceptibility outside the
brain is 0, so the forward field inside the mask is a background-free local field.

Structures thinner than a voxel would vanish between voxel centres; their radii are therefore widened to
at least 0.9 voxel so that each structure shows at any resolution.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import scipy.ndimage

from .errors import QSMInputError
from .geometry import SUPERIOR, check_voxel_size, unit_vector
from .operator import forward_field

#: Physical size (mm, along i, j, k) of the default field of view.
HEAD_BOX_MM = (196.0, 232.0, 188.0)

#: label -> (name, susceptibility in ppm)
TISSUES: Dict[int, Tuple[str, float]] = {
    0: ("background", 0.0),
    1: ("white matter", -0.030),
    2: ("cortical grey matter", 0.020),
    3: ("CSF", 0.019),
    4: ("caudate", 0.044),
    5: ("putamen", 0.038),
    6: ("globus pallidus", 0.131),
    7: ("thalamus", 0.020),
    8: ("red nucleus", 0.100),
    9: ("substantia nigra", 0.111),
    10: ("dentate nucleus", 0.152),
    11: ("vein", 0.30),
    12: ("calcification", -0.20),
    13: ("haemorrhage", 0.80),
}
LABEL = {name: label for label, (name, _) in TISSUES.items()}

#: Cortical thickness (mm) of the grey-matter shell.
CORTEX_MM = 4.0

# Brain envelope (mm): centre and semi-axes of the cerebrum; base cut; cerebellum; brainstem.
_CEREBRUM = ((0.0, -15.0, 15.0), (66.0, 84.0, 58.0))
_BASE_Z_MM = -22.0
_CEREBELLUM = ((0.0, -62.0, -38.0), (50.0, 30.0, 22.0))
_BRAINSTEM = ((0.0, -25.0, -40.0), (13.0, 13.0, 32.0))

# (label, centre mm, semi-axes mm); paired structures are mirrored in i with the left one listed.
_VENTRICLES = [((-10.0, -8.0, 18.0), (5.5, 26.0, 8.0)), ((9.0, -8.0, 18.0), (5.0, 24.0, 7.5)),
               ((0.0, -12.0, 2.0), (2.0, 10.0, 6.0)), ((0.0, -52.0, -30.0), (4.0, 4.0, 5.0))]
_NUCLEI = [
    ("caudate", (12.0, 10.0, 10.0), (5.0, 9.0, 8.0)),
    ("putamen", (25.0, 2.0, 0.0), (5.0, 14.0, 9.0)),
    ("globus pallidus", (18.5, -3.0, -1.0), (3.5, 8.0, 5.0)),
    ("thalamus", (10.0, -20.0, 6.0), (6.0, 13.0, 8.0)),
    ("red nucleus", (5.0, -20.0, -8.0), (3.0, 3.0, 3.5)),
    ("substantia nigra", (11.0, -16.0, -14.0), (3.0, 7.0, 2.5)),
    ("dentate nucleus", (15.0, -62.0, -34.0), (6.0, 8.0, 5.0)),
]
# Straight veins: (start mm, end mm, radius mm), at different angles to B0.
_STRAIGHT_VEINS = [
    ((0.0, -40.0, 12.0), (0.0, -5.0, 14.0), 2.0),      # internal-cerebral-like, perpendicular to B0
    ((-45.0, 20.0, 30.0), (-30.0, 5.0, 60.0), 1.5),     # oblique cortical vein
    ((40.0, -50.0, 20.0), (40.0, -50.0, 55.0), 1.5),    # parallel to B0
    ((-50.0, -20.0, 5.0), (-25.0, 30.0, 5.0), 1.5),     # in-plane, oblique in i-j
]
_SINUS_RADIUS_MM = 3.0
_CALCIFICATION = ((28.0, 30.0, 30.0), 2.5)
_BLEED = ((-32.0, -45.0, 28.0), 6.0)


@dataclass
class HeadPhantom:
    """A phantom volume, arrays indexed [i, j, k]; ``field_ppm`` is zero outside ``mask``."""

    chi_ppm: np.ndarray
    mask: np.ndarray
    field_ppm: np.ndarray
    voxel_size_mm: Tuple[float, float, float]
    b0_dir: Tuple[float, float, float]
    labels: np.ndarray
    label_names: Dict[int, str] = field(default_factory=dict)
    noise_std_ppm: float = 0.0


def default_shape(voxel_size_mm: Sequence[float]) -> Tuple[int, int, int]:
    """Matrix that covers :data:`HEAD_BOX_MM` at this voxel size (98 x 116 x 94 at 2 mm)."""
    vs = check_voxel_size(voxel_size_mm)
    return tuple(max(1, int(round(b / v))) for b, v in zip(HEAD_BOX_MM, vs))  # type: ignore[return-value]


class _Grid:
    """Physical voxel-centre coordinates (mm, volume centre at 0) with sub-box evaluation."""

    def __init__(self, shape: Tuple[int, int, int], vs: Tuple[float, float, float]):
        self.shape, self.vs = shape, vs
        self.axes = [(np.arange(n) - (n - 1) / 2.0) * v for n, v in zip(shape, vs)]
        self.min_radius = 0.9 * max(vs)

    def box(self, lo: Sequence[float], hi: Sequence[float]):
        """Slices of the voxels whose centres lie in [lo, hi] and their open-mesh coordinates."""
        slices, coords = [], []
        for d, ax in enumerate(self.axes):
            i0, i1 = np.searchsorted(ax, lo[d], "left"), np.searchsorted(ax, hi[d], "right")
            slices.append(slice(int(i0), int(max(i0, i1))))
            coords.append(ax[i0:max(i0, i1)])
        x, y, z = np.ix_(*coords)
        return tuple(slices), x, y, z

    def ellipsoid(self, centre: Sequence[float], semi: Sequence[float]):
        semi = [max(s, self.min_radius) for s in semi]
        sl, x, y, z = self.box(np.subtract(centre, semi), np.add(centre, semi))
        inside = ((x - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2 \
            + ((z - centre[2]) / semi[2]) ** 2 <= 1.0
        return sl, inside

    def tube(self, p0: Sequence[float], p1: Sequence[float], radius: float):
        """Voxels within ``radius`` of the segment p0-p1."""
        r = max(radius, self.min_radius)
        p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
        sl, x, y, z = self.box(np.minimum(p0, p1) - r, np.maximum(p0, p1) + r)
        d = p1 - p0
        rel = (x - p0[0], y - p0[1], z - p0[2])
        t = np.clip((rel[0] * d[0] + rel[1] * d[1] + rel[2] * d[2]) / float(d @ d), 0.0, 1.0)
        dist2 = sum((rel[a] - t * d[a]) ** 2 for a in range(3))
        return sl, dist2 <= r * r


def _paint(labels: np.ndarray, where, label: int, within: Optional[np.ndarray] = None) -> None:
    sl, inside = where
    if within is not None:
        inside = inside & within[sl]
    labels[sl][inside] = label


def _brain_mask(grid: _Grid) -> np.ndarray:
    """Cerebrum (wider at the back and slightly asymmetric, flat base) + cerebellum + brainstem."""
    x, y, z = np.ix_(*grid.axes)
    (cx, cy, cz), (ax, ay, az) = _CEREBRUM
    # Occipital end wider than frontal, left hemisphere 3 % larger (petalia).
    ax_local = ax * (1.0 - 0.08 * (y - cy) / ay) * np.where(x < 0, 1.03, 1.0)
    cerebrum = ((x - cx) / ax_local) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2 <= 1.0
    cerebrum &= z >= _BASE_Z_MM
    mask = np.zeros(grid.shape, dtype=bool)
    mask |= cerebrum
    for centre, semi in (_CEREBELLUM, _BRAINSTEM):
        sl, inside = grid.ellipsoid(centre, semi)
        mask[sl] |= inside
    return mask


def _sagittal_sinus(grid: _Grid, labels: np.ndarray, within: np.ndarray) -> None:
    """A vein curving along the top of the midline, 8 mm below the brain surface, as short segments."""
    (cx, cy, cz), (_, ay, az) = _CEREBRUM
    angles = np.deg2rad(np.linspace(25.0, 160.0, 13))
    pts = [(cx, cy + (ay - 8.0) * np.cos(a), cz + (az - 8.0) * np.sin(a)) for a in angles]
    for p0, p1 in zip(pts[:-1], pts[1:]):
        _paint(labels, grid.tube(p0, p1, _SINUS_RADIUS_MM), LABEL["vein"], within)


def _label_map(grid: _Grid) -> np.ndarray:
    mask = _brain_mask(grid)
    labels = np.where(mask, LABEL["white matter"], LABEL["background"]).astype(np.int16)
    depth = scipy.ndimage.distance_transform_edt(mask, sampling=grid.vs)
    labels[mask & (depth <= CORTEX_MM)] = LABEL["cortical grey matter"]
    for centre, semi in _VENTRICLES:
        _paint(labels, grid.ellipsoid(centre, semi), LABEL["CSF"], mask)
    for name, (cx, cy, cz), semi in _NUCLEI:
        for side in (-1.0, 1.0):
            _paint(labels, grid.ellipsoid((side * cx, cy, cz), semi), LABEL[name], mask)
    _sagittal_sinus(grid, labels, mask)
    for p0, p1, radius in _STRAIGHT_VEINS:
        _paint(labels, grid.tube(p0, p1, radius), LABEL["vein"], mask)
    for name, (centre, radius) in (("calcification", _CALCIFICATION), ("haemorrhage", _BLEED)):
        _paint(labels, grid.ellipsoid(centre, (radius,) * 3), LABEL[name], mask)
    return labels


def make_head_phantom(shape: Optional[Sequence[int]] = None, voxel_size_mm: Sequence[float] = (2.0, 2.0, 2.0),
                      *, b0_dir: Sequence[float] = SUPERIOR, snr: Optional[float] = None, seed: int = 0,
                      pad_factor: float = 2.0, texture_ppm: float = 0.005) -> HeadPhantom:
    """Build the head phantom and its local field.

    Args:
        shape: matrix (i, j, k); ``None`` covers :data:`HEAD_BOX_MM` (about 196 x 232 x 188 mm) at this
            voxel size. A smaller matrix crops the same anatomy around the centre.
        voxel_size_mm: voxel size along i, j, k.
        b0_dir: B0 direction in the voxel frame (any non-zero vector; normalised here).
        snr: field signal-to-noise ratio. Gaussian noise of standard deviation
            ``rms(noise-free field in mask) / snr`` is added inside the mask; ``None`` adds none.
        seed: seed of the noise generator (the anatomy itself is deterministic).
        pad_factor: zero-padding of the forward-model FFT (2 avoids wrap-around).
        texture_ppm: amplitude of a smooth sinusoidal variation added inside white and grey matter
            (0 gives piecewise-constant tissue values).

    Returns:
        a :class:`HeadPhantom`: ``field_ppm = mask * forward_field(chi_ppm) (+ noise)``.
    """
    vs = check_voxel_size(voxel_size_mm)
    b0 = unit_vector(b0_dir)
    if shape is None:
        shape3 = default_shape(vs)
    else:
        shape3 = tuple(int(n) for n in np.ravel(shape))
        if len(shape3) != 3 or min(shape3) < 1:
            raise QSMInputError(f"phantom shape must be three positive integers, got {tuple(np.ravel(shape))}")
    if snr is not None and not (np.isfinite(snr) and snr > 0):
        raise QSMInputError(f"snr must be a positive number or None, got {snr}")
    if not np.isfinite(texture_ppm) or texture_ppm < 0:
        raise QSMInputError(f"texture_ppm must be a non-negative number, got {texture_ppm}")

    grid = _Grid(shape3, vs)  # type: ignore[arg-type]
    labels = _label_map(grid)
    mask = labels != LABEL["background"]
    if not mask.any():
        raise QSMInputError(f"phantom shape {shape3} at {vs} mm holds no brain: use a larger matrix")

    values = np.array([TISSUES[k][1] for k in sorted(TISSUES)], dtype=np.float64)
    chi = values[labels]
    if texture_ppm > 0:
        x, y, z = np.ix_(*grid.axes)
        wave = np.sin(2 * np.pi * x / 41.0) * np.sin(2 * np.pi * y / 53.0 + 0.7) * np.sin(2 * np.pi * z / 47.0 + 1.3)
        soft = np.isin(labels, (LABEL["white matter"], LABEL["cortical grey matter"]))
        chi = chi + texture_ppm * np.where(soft, wave, 0.0)

    field_ppm = forward_field(chi, vs, b0, pad_factor=pad_factor) * mask
    noise_std = 0.0
    if snr is not None:
        noise_std = float(np.sqrt(np.mean(field_ppm[mask] ** 2)) / snr)
        rng = np.random.default_rng(seed)
        field_ppm = field_ppm + np.where(mask, rng.normal(0.0, noise_std, size=shape3), 0.0)

    return HeadPhantom(
        chi_ppm=chi.astype(np.float32), mask=mask, field_ppm=field_ppm.astype(np.float32),
        voxel_size_mm=vs, b0_dir=b0, labels=labels,
        label_names={k: name for k, (name, _) in TISSUES.items()}, noise_std_ppm=noise_std,
    )
