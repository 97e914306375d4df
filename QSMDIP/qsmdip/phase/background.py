"""Background-field removal: total field (ppm) in a mask -> local field (ppm) and the mask it is valid in.

The total field inside the brain is the sum of the local field (made by the susceptibility inside the
mask) and the background field (made by everything outside it: air in the sinuses and ear canals, the
tissue/air boundary of the head, shim residue). Outside its sources the background field is harmonic
(its Laplacian vanishes), and that is what every method uses, each with a different assumption:

- **V-SHARP** (Schweser et al., NeuroImage 2011; Wu et al., MRM 2012): a harmonic function equals its
  mean over any sphere inside the region where it is harmonic, so ``f - SMV_r(f)`` removes the background
  exactly wherever a sphere of radius r fits in the mask, and the local field is recovered by
  deconvolving that high-pass (a truncated inverse, which loses the lowest spatial frequencies of the
  local field). Assumes nothing about the sources outside; pays with an eroded mask, softened here by
  using smaller spheres near the edge. Closed form, a few FFTs per radius.
- **PDF**, projection onto dipole fields (Liu et al., NMR Biomed 2011): fits the susceptibility outside
  the mask whose dipole field best matches the total field inside it (weighted least squares, conjugate
  gradient), and subtracts that field. Assumes the background is a dipole field of sources outside the
  mask (within a margin around it); keeps the whole mask, but the part of the local field that dipoles
  outside could also have made (mostly near the mask's edge) is absorbed into the fit. Iterative.

Arrays are indexed [i, j, k]; fields are in ppm; lengths in mm. Each method has one call shape:
``remove_background_<method>(total_field_ppm, mask, voxel_size_mm, *, b0_dir, settings, weight)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import scipy.fft
import scipy.ndimage

from ..errors import QSMInputError
from ..geometry import SUPERIOR, check_voxel_size, unit_vector
from ..kernel import dipole_kernel, padded_shape, smv_spectrum
from ..solvers.single_step import mask_depth_mm, smv_high_pass

Box = Tuple[Tuple[int, int, int], Tuple[int, int, int]]


@dataclass
class BackgroundResult:
    """A local field and the mask it is valid in."""

    local_field_ppm: np.ndarray   #: float32 [i, j, k], 0 outside ``mask``
    mask: np.ndarray              #: bool, the mask the local field is valid in (eroded for SHARP-type methods)
    method: str                   #: 'vsharp', 'pdf', 'smv'
    eroded_voxels: int            #: voxels of the input mask dropped
    notes: List[str] = field(default_factory=list)  #: what was done, for the user and the log
    #: None for a true local field. Otherwise ``local_field_ppm`` is a filtered field, and an inversion must
    #: use the dipole kernel times ``kspace_filter(fft_shape, voxel_size_mm)`` (a real half spectrum, as
    #: ``scipy.fft.rfftn`` lays it out) on its own FFT grid: see :mod:`qsmdip.phase.single_step`.
    kspace_filter: Optional[Callable[[Sequence[int], Sequence[float]], np.ndarray]] = None


@dataclass
class VSharpSettings:
    """Settings of V-SHARP.

    Attributes:
        max_radius_mm: radius of the largest spherical-mean-value kernel, used wherever it fits in the
            mask and for the deconvolution (12 mm, Wu et al. 2012).
        min_radius_mm: radius of the smallest kernel, which decides the erosion at the edge; None: one
            voxel along the coarsest axis (so every sphere reaches a neighbour along every axis).
        radius_step_mm: spacing of the radii from the largest down; None: the coarsest voxel side.
        threshold: truncation of the deconvolution: frequencies where 1 - SMV_max(k) is below it are
            dropped (0.05, Wu et al. 2012); larger is more robust to noise and loses more low frequencies.
            On the code-built head phantom (4 mm and 2 mm, with and without noise, exact or discrete
            background fields) 0.15 to 0.2 gave a 10 to 20 points lower NRMSE than 0.05 (the inverse
            amplifies the errors of the small kernels at the edge by up to 1 / threshold); on the
            realistic 4 mm head with an exact sinus field 0.05 was better (35 against 39 %). So the
            published value stays the default.
    """

    max_radius_mm: float = 12.0
    min_radius_mm: Optional[float] = None
    radius_step_mm: Optional[float] = None
    threshold: float = 0.05

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_radius_mm) and self.max_radius_mm > 0):
            raise QSMInputError(f"V-SHARP max_radius_mm must be a positive number, got {self.max_radius_mm}")
        for name in ("min_radius_mm", "radius_step_mm"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise QSMInputError(f"V-SHARP {name} must be a positive number or None, got {value}")
        if self.min_radius_mm is not None and self.min_radius_mm > self.max_radius_mm:
            raise QSMInputError(f"V-SHARP min_radius_mm {self.min_radius_mm} exceeds max_radius_mm "
                                f"{self.max_radius_mm}")
        if not (0.0 < self.threshold < 1.0):
            raise QSMInputError(f"V-SHARP threshold must lie in (0, 1), got {self.threshold}")


@dataclass
class PDFSettings:
    """Settings of projection onto dipole fields.

    Attributes:
        margin_mm: background sources are fitted in the mask's bounding box grown by this much on every
            side (it may reach beyond the field of view, where real sources often lie).
        pad_factor: FFT grid = pad_factor x that box (>= 1). The convolution is circular on this grid;
            the fit and the subtraction use the same operator, so the wrap-around costs little (1.0 to 2.0
            changed the NRMSE by about 1 point on the 4 mm test head) and larger grids cost time.
        max_iterations: CGLS iterations at most.
        tolerance: stop when an iteration lowers the weighted misfit by less than this fraction. The fit
            semi-converges: early iterations remove the background, later ones slowly absorb the local
            field (on the test heads the error is lowest after 40 to 60 iterations with a strong
            background, after 5 to 15 with a weak one); the misfit stalls near that point, whatever the
            background's strength. 0.001 stopped within 2 NRMSE points of the best iteration there.
    """

    margin_mm: float = 16.0
    pad_factor: float = 1.2
    max_iterations: int = 100
    tolerance: float = 0.001

    def __post_init__(self) -> None:
        if not (math.isfinite(self.margin_mm) and self.margin_mm > 0):
            raise QSMInputError(f"PDF margin_mm must be a positive number, got {self.margin_mm}")
        if not (self.pad_factor >= 1.0):
            raise QSMInputError(f"PDF pad_factor must be >= 1, got {self.pad_factor}")
        if int(self.max_iterations) < 1:
            raise QSMInputError(f"PDF max_iterations must be at least 1, got {self.max_iterations}")
        if not (0.0 < self.tolerance < 1.0):
            raise QSMInputError(f"PDF tolerance must lie in (0, 1), got {self.tolerance}")


# --------------------------------------------------------------------------------------------- inputs

def _check_inputs(total_field_ppm: np.ndarray, mask: np.ndarray, voxel_size_mm: Sequence[float],
                  weight: Optional[np.ndarray]):
    """(field float64 zero outside the mask, mask bool, voxel size, weight float64 mean 1 in the mask or None)."""
    f = np.asarray(total_field_ppm)
    m = np.asarray(mask)
    if f.ndim != 3:
        raise QSMInputError(f"the total field must be a 3D volume, got shape {f.shape}")
    if m.shape != f.shape:
        raise QSMInputError(f"total field {f.shape} and mask {m.shape} differ in size")
    m = m.astype(bool) if m.dtype == bool else m > 0.5
    if not m.any():
        raise QSMInputError("the mask is empty: it selects no voxel")
    f = f.astype(np.float64)
    if not np.all(np.isfinite(f[m])):
        raise QSMInputError(f"the total field has {int(np.sum(~np.isfinite(f[m])))} NaN or Inf values inside the mask")
    vs = check_voxel_size(voxel_size_mm)
    w = None
    if weight is not None:
        w = np.asarray(weight, dtype=np.float64)
        if w.shape != f.shape:
            raise QSMInputError(f"weight {w.shape} and total field {f.shape} differ in size")
        inside = w[m]
        if not np.all(np.isfinite(inside)) or np.any(inside < 0):
            raise QSMInputError("the weight must be finite and non-negative inside the mask")
        if not np.any(inside > 0):
            raise QSMInputError("the weight is zero everywhere inside the mask")
        w = np.where(m, w / inside.mean(), 0.0)
    return np.where(m, f, 0.0), m, vs, w


def _grown_box(mask: np.ndarray, margin: Sequence[int]) -> Box:
    """Lower and upper (exclusive) corners of the mask's bounding box grown by ``margin`` voxels per axis,
    not clipped to the array."""
    idx = np.nonzero(mask)
    lo = tuple(int(a.min()) - int(g) for a, g in zip(idx, margin))
    hi = tuple(int(a.max()) + 1 + int(g) for a, g in zip(idx, margin))
    return lo, hi  # type: ignore[return-value]


def _box_slices(box: Box, shape: Sequence[int]):
    """(slices into the array, slices into the box) of the part of the box inside the array."""
    lo, hi = box
    src, dst = [], []
    for a, b, n in zip(lo, hi, shape):
        s0, s1 = max(a, 0), min(b, n)
        src.append(slice(s0, s1))
        dst.append(slice(s0 - a, s1 - a))
    return tuple(src), tuple(dst)


def _extract(array: np.ndarray, box: Box) -> np.ndarray:
    """The box's contents, zero where it lies beyond the array."""
    lo, hi = box
    out = np.zeros([b - a for a, b in zip(lo, hi)], dtype=array.dtype)
    src, dst = _box_slices(box, array.shape)
    out[dst] = array[src]
    return out


def _paste(values: np.ndarray, box: Box, shape: Sequence[int]) -> np.ndarray:
    """A zero array of ``shape`` holding the part of the box's ``values`` that lies inside it."""
    out = np.zeros(tuple(shape), dtype=values.dtype)
    src, dst = _box_slices(box, shape)
    out[src] = values[dst]
    return out


def _result(local_box: np.ndarray, valid_box: np.ndarray, box: Box, mask: np.ndarray, method: str,
            notes: List[str]) -> BackgroundResult:
    valid = _paste(valid_box, box, mask.shape) & mask
    local = np.where(valid, _paste(local_box, box, mask.shape), 0.0).astype(np.float32)
    return BackgroundResult(local_field_ppm=local, mask=valid, method=method,
                            eroded_voxels=int(mask.sum() - valid.sum()), notes=notes)


# -------------------------------------------------------------------------------------------- V-SHARP

def _radii_mm(settings: VSharpSettings, vs: Sequence[float]) -> List[float]:
    """Kernel radii from the largest down to the smallest (mm)."""
    coarsest = max(vs)
    r_min = settings.min_radius_mm if settings.min_radius_mm is not None else coarsest
    step = settings.radius_step_mm if settings.radius_step_mm is not None else coarsest
    r_max = max(settings.max_radius_mm, r_min)
    radii = list(np.arange(r_max, r_min - 1e-6, -step))
    if radii[-1] - r_min > 1e-6:
        radii.append(r_min)
    return [float(r) for r in radii]


def remove_background_vsharp(total_field_ppm: np.ndarray, mask: np.ndarray, voxel_size_mm: Sequence[float], *,
                             b0_dir: Sequence[float] = SUPERIOR, settings: Optional[VSharpSettings] = None,
                             weight: Optional[np.ndarray] = None) -> BackgroundResult:
    """Local field by V-SHARP: multi-radius spherical-mean-value filtering and a truncated deconvolution.

    For radii r_1 > r_2 > ... (mm), every voxel takes ``f - SMV_r(f)`` of the largest r whose ball fits
    in the mask; the result is deconvolved by ``1 - SMV_r1`` where that exceeds ``settings.threshold``
    (other frequencies set to 0) and kept in the mask eroded by the smallest radius. ``b0_dir`` and
    ``weight`` are accepted for the common call shape and unused: the method is geometry-free.
    """
    settings = settings or VSharpSettings()
    f, m, vs, _ = _check_inputs(total_field_ppm, mask, voxel_size_mm, weight)
    unit_vector(b0_dir)
    radii = _radii_mm(settings, vs)
    if radii[-1] < min(vs):
        raise QSMInputError(f"V-SHARP's smallest radius {radii[-1]:g} mm is below the finest voxel side "
                            f"{min(vs):g} mm: its ball would hold no neighbour")
    box = _grown_box(m, (0, 0, 0))
    f_box = _extract(f, box)
    # Distance (mm) from each voxel to the nearest voxel outside the mask; the box's border counts as outside.
    depth = _extract(mask_depth_mm(m, vs), box)
    if not np.any(depth > radii[-1] * (1 + 1e-9)):
        raise QSMInputError(f"the mask is too small for V-SHARP: no voxel is more than {radii[-1]:g} mm "
                            f"(the smallest kernel radius) from its edge")
    reach = [int(math.ceil(radii[0] / v)) for v in vs]
    fft_shape = [scipy.fft.next_fast_len(n + g, real=True) for n, g in zip(f_box.shape, reach)]
    spectrum = scipy.fft.rfftn(f_box, s=fft_shape)
    crop = tuple(slice(0, n) for n in f_box.shape)

    high_pass = np.zeros_like(f_box)
    done = np.zeros(f_box.shape, dtype=bool)
    deconvolver = None
    for radius in radii:
        smv = smv_spectrum(fft_shape, vs, radius)
        fits = depth > radius * (1 + 1e-9)  # the whole ball lies in the mask
        new = fits & ~done
        if new.any():
            filtered = scipy.fft.irfftn(spectrum * (1.0 - smv), s=fft_shape)[crop]
            high_pass[new] = filtered[new]
            done |= new
        if deconvolver is None:
            deconvolver = 1.0 - smv
    kept = np.abs(deconvolver) > settings.threshold
    inverse = np.divide(1.0, deconvolver, out=np.zeros_like(deconvolver), where=kept)
    local = scipy.fft.irfftn(scipy.fft.rfftn(high_pass, s=fft_shape) * inverse, s=fft_shape)[crop]
    result = _result(local, done, box, m, "vsharp", [])
    n_in = int(m.sum())
    result.notes.append(
        f"V-SHARP: {len(radii)} kernel radii from {radii[0]:g} to {radii[-1]:g} mm, deconvolution threshold "
        f"{settings.threshold:g}; mask eroded by {result.eroded_voxels} of {n_in} voxels "
        f"({100.0 * result.eroded_voxels / n_in:.1f} %)")
    return result


# ------------------------------------------------------------------------------------- SMV high-pass

def remove_background_smv(total_field_ppm: np.ndarray, mask: np.ndarray, voxel_size_mm: Sequence[float], *,
                          b0_dir: Sequence[float] = SUPERIOR, radius_mm: float = 4.0,
                          weight: Optional[np.ndarray] = None) -> BackgroundResult:
    """The SMV high-passed total field ``f - SMV_r(f)`` in the mask eroded by ``radius_mm``, not deconvolved.

    It holds no background field (harmonic in the mask), but it is a filtered local field: the result's
    ``kspace_filter`` is ``1 - SMV_r(k)``, which an inversion must apply to its dipole kernel (single-step
    QSM, :func:`qsmdip.solvers.single_step.solve_single_step_tv`). Not a drop-in local field, so not in
    :data:`BACKGROUND_REMOVERS`. ``b0_dir`` and ``weight`` are accepted for the common call shape, unused.
    """
    f, m, vs, _ = _check_inputs(total_field_ppm, mask, voxel_size_mm, weight)
    unit_vector(b0_dir)
    high, valid = smv_high_pass(f, m, vs, radius_mm)
    n_in = int(m.sum())
    eroded = n_in - int(valid.sum())
    notes = [f"SMV high-pass of radius {radius_mm:g} mm (to be inverted with the filtered kernel); mask eroded by "
             f"{eroded} of {n_in} voxels ({100.0 * eroded / n_in:.1f} %)"]
    return BackgroundResult(local_field_ppm=high, mask=valid, method="smv", eroded_voxels=eroded, notes=notes,
                            kspace_filter=lambda shape, voxel: 1.0 - smv_spectrum(shape, voxel, radius_mm))


# ------------------------------------------------------------------------------------------------ PDF

def _sq(x: np.ndarray) -> float:
    """Squared norm accumulated in float64 (float32 sums over a million voxels lose the digits CG needs)."""
    x64 = x.astype(np.float64).ravel()
    return float(np.dot(x64, x64))


def _cgls(forward: Callable[[np.ndarray], np.ndarray], adjoint: Callable[[np.ndarray], np.ndarray],
          data: np.ndarray, max_iterations: int, tolerance: float) -> Tuple[np.ndarray, int, float]:
    """Least squares ``min ||forward(x) - data||`` by conjugate gradient on the normal equations (CGLS).

    Stops when an iteration lowers the misfit by less than ``tolerance`` (relative) or after
    ``max_iterations``. Written out instead of scipy's ``cg`` because the misfit, which decides when to
    stop, comes free here. Returns (x, iterations, misfit / ||data||).
    """
    misfit = data.copy()
    gradient = adjoint(misfit)
    x = np.zeros_like(gradient)
    direction = gradient.copy()
    gamma = _sq(gradient)
    data_norm = math.sqrt(_sq(data))
    misfit_norm = data_norm
    iteration = 0
    while iteration < max_iterations and gamma > 0.0:
        iteration += 1
        q = forward(direction)
        qq = _sq(q)
        if qq == 0.0:
            break
        alpha = gamma / qq
        x += alpha * direction
        misfit -= alpha * q
        previous, misfit_norm = misfit_norm, math.sqrt(_sq(misfit))
        if previous - misfit_norm < tolerance * previous:
            break
        gradient = adjoint(misfit)
        gamma, gamma_old = _sq(gradient), gamma
        direction *= gamma / gamma_old
        direction += gradient
    return x, iteration, (misfit_norm / data_norm if data_norm > 0 else 0.0)


def remove_background_pdf(total_field_ppm: np.ndarray, mask: np.ndarray, voxel_size_mm: Sequence[float], *,
                          b0_dir: Sequence[float] = SUPERIOR, settings: Optional[PDFSettings] = None,
                          weight: Optional[np.ndarray] = None) -> BackgroundResult:
    """Local field by projection onto dipole fields: ``f - D chi_b`` in the mask, chi_b outside it.

    chi_b minimises ``|| W M (D chi_b - f) ||^2`` over susceptibilities in the mask's bounding box grown by
    ``settings.margin_mm``, minus the mask, by CGLS (stopped early: see :class:`PDFSettings`). ``D`` is the
    project's dipole kernel (:func:`qsmdip.kernel.dipole_kernel`, D(0) = 0) along ``b0_dir`` on a
    zero-padded FFT grid. ``weight`` is a per-voxel reliability (e.g. the magnitude, or the inverse noise
    of the echo fit), scaled here to mean 1 in the mask; None weighs all voxels alike. The mask is kept whole.
    """
    settings = settings or PDFSettings()
    f, m, vs, w = _check_inputs(total_field_ppm, mask, voxel_size_mm, weight)
    b0 = unit_vector(b0_dir)
    box = _grown_box(m, [int(math.ceil(settings.margin_mm / v)) for v in vs])
    f_box = _extract(f, box).astype(np.float32)
    m_box = _extract(m, box)
    data_weight = (m_box if w is None else _extract(w, box) * m_box).astype(np.float32)
    sources = (~m_box).astype(np.float32)
    fft_shape = padded_shape(f_box.shape, settings.pad_factor)
    kernel = dipole_kernel(fft_shape, vs, b0, half=True).astype(np.float32)
    crop = tuple(slice(0, n) for n in f_box.shape)

    def dipole(x: np.ndarray) -> np.ndarray:  # D is real and even: its own adjoint
        return scipy.fft.irfftn(scipy.fft.rfftn(x, s=fft_shape) * kernel, s=fft_shape)[crop]

    chi_b, iterations, misfit = _cgls(lambda x: data_weight * dipole(sources * x),
                                      lambda s: sources * dipole(data_weight * s),
                                      data_weight * f_box, int(settings.max_iterations), float(settings.tolerance))
    local = np.where(m_box, f_box - dipole(sources * chi_b), 0.0)
    stop = "the fit stalled" if iterations < settings.max_iterations else "the iteration limit was reached"
    notes = [f"PDF: {iterations} CGLS iterations (stopped: {stop}), weighted misfit {100 * misfit:.1f} % of the "
             f"total field; sources fitted up to {settings.margin_mm:g} mm outside the mask's bounding box; "
             f"mask kept whole"]
    return _result(local, m_box, box, m, "pdf", notes)


#: method name -> remove_background_<method>
BACKGROUND_REMOVERS: Dict[str, Callable[..., BackgroundResult]] = {
    "vsharp": remove_background_vsharp,
    "pdf": remove_background_pdf,
}
