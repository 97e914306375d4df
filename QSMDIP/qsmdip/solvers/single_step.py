"""Single-step QSM: SMV high-pass of the field as the background removal, TV inversion of the same model.

A harmonic background field equals its mean over any ball inside the mask, so ``g = f - SMV_r(f)``
holds no background wherever a ball of radius r fits in the mask (the valid mask V_r). SHARP-type methods
then deconvolve ``g``, which loses the local field; here no local field is made: TV-ADMM
(:mod:`qsmdip.solvers.tv`) fits ``M_V (1 - S_r) D chi = M_V g`` with the dipole kernel multiplied by the
high-pass ``1 - S_r(k)`` (Chatnuntawech et al., MRM 2017, "SS-TV"; TGV-QSM's Laplacian form is its
r -> one voxel limit). The input may be a **total** field (``qsmdip reconstruct --phase --method
single-step-tv`` hands it the pipeline's total field) or a local one (the high-pass removes nothing of
the background that is not there).

**Several radii** (the default, 3, 6 and 12 mm): as in V-SHARP, each voxel is fitted through the high-pass
of the largest ball that fits around it, so the data term is a sum of one term per radius over the shells
``V_r minus V_next``. A small ball alone keeps the edge but removes the low frequencies of the local field
everywhere; a large one alone keeps them but loses the edge. Unlike V-SHARP nothing is deconvolved: each
term carries its own kernel.

The data term is Huber by default (``SingleStepSettings.data_term``): l1 for large residuals, because the high-pass
spreads each badly measured voxel (dephased phase in a bleed or a vein) over a ball, which least squares turns
into streaks; quadratic for small ones, the noise, which least squares fits best. The weight is
chosen by the same hold-out rule as TV, on the high-passed field. chi is returned on the input mask eroded by
``output_radius_mm`` (0, the default: the whole mask; the rim's chi is fitted through its field inside).

Measured (``docs/phase-pipeline.md``, realistic head from phase, SNR 100, on the pipeline's mask): at 2 mm the
default radii and Huber term give 28.0 % NRMSE axial and 27.9 % at 20 degrees (l1: 28.5 and 28.7 %; one 6 mm
radius: 34.0 and 34.6 %; TV after PDF: 52.0 and 48.7 %), at 1 mm 22.5 % (l1: 22.6 %; one radius: 28.6 %). Since
the echo fit refits dephased voxels from their early echoes: 27.1 and 27.2 % at 2 mm; 23.5 % at 1 mm on the head
simulated at 0.5 mm (docs/phase-pipeline.md, last section).

Arrays are [i, j, k]; fields and chi in ppm; lengths in mm.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import scipy.fft
import scipy.ndimage
import torch

from ..device import resolve_device
from ..errors import QSMInputError
from ..geometry import SUPERIOR, check_voxel_size, mask_bounding_box, unit_vector
from ..kernel import smv_spectrum
from .base import Callback, Progress, SolveResult, Stopwatch, check_inputs, check_magnitude, crop_to_mask
from .tv import DATA_TERMS, TVSettings, _TVProblem, _check_callback_every, _pad_pair, _relative_change, choose_alpha


#: SMV radii (mm) of the default multi-radius data term: each voxel is fitted through the high-pass of the
#: largest ball that fits around it in the mask. Picked on the realistic 2 mm head from phase, axial, at a
#: fixed weight (``docs/phase-pipeline.md``): one radius of 6 mm 33.9 % NRMSE, (2, 6, 12) 29.1 %,
#: (2, 4, 8, 12) 28.7 %, (3, 4, 8, 12) 28.5 %, **(3, 6, 12) 28.4 %** (and the fastest of the several-radii).
DEFAULT_RADII_MM = (3.0, 6.0, 12.0)
#: The default radii are raised to at least this many coarsest voxel sides: a ball of one voxel's radius (7
#: voxels) is a noisy high-pass. On the 4 mm head (4, 8, 12) gave 48.3 % where (6, 12) gave 46.3 (one 6 mm
#: radius 46.0); on the 3 mm head (3, 4, 8, 12) 41.0 % and (4.5, 6, 12) 39.9 (one 6 mm radius 41.1;
#: ``docs/results/single-step-radii-3mm-4mm.log``).
MIN_RADIUS_VOXELS = 1.5


@dataclass
class SingleStepSettings:
    """Settings of single-step TV.

    Attributes:
        radii_mm: SMV radii (mm, each at least the finest voxel side), or None for
            :data:`DEFAULT_RADII_MM`, raised to at least :data:`MIN_RADIUS_VOXELS` coarsest voxel sides. Each voxel's
            data term uses the largest ball that fits around it in the mask (as V-SHARP does), so the
            interior keeps the low frequencies a large ball leaves while the edge is still fitted. One
            radius is the classic single-step TV.
        output_radius_mm: chi is returned in the mask eroded by this (mm; 0 = the whole mask, at most the
            largest radius).
        alpha: TV weight relative to the high-passed field's RMS, or None to choose it by hold-out.
        iterations: ADMM iteration cap (>= 1).
        tolerance: stop once the relative change of chi falls below it (>= 0). 1e-3, as TV's: 1e-4 took 2.4x
            longer for no better map (realistic head from phase, 1 mm: 28.37 against 28.56 % in 1280 against
            537 s; 2 mm: 34.27 against 33.96 % in 33 against 14 s; ``docs/phase-pipeline.md``).
        data_term: "huber" (default: quadratic for residuals under ``huber_delta``, l1 above: the noise is
            fitted by least squares, grossly wrong voxels are discounted), "l1" (the default until 2026-12-05) or
            "l2". On the realistic head from phase, SNR 100: 2 mm 28.04 / 27.87 % (axial / 20 degrees) against
            28.52 / 28.71 for l1, 3 mm 38.05 against 39.86, 4 mm 43.87 against 46.39; noise-free 2 mm 24.08
            against 24.17 (``docs/phase-pipeline.md``, "A Huber data term").
        huber_delta: the Huber term's switch point, relative to the high-passed field's RMS (> 0).
    """

    radii_mm: Optional[Tuple[float, ...]] = None
    output_radius_mm: float = 0.0
    alpha: Optional[float] = None
    iterations: int = 300
    tolerance: float = 1e-3
    data_term: str = "huber"
    huber_delta: float = 0.1

    def __post_init__(self) -> None:
        if self.radii_mm is not None:
            radii = np.ravel(np.asarray(self.radii_mm, dtype=object))
            try:
                values = tuple(sorted({float(r) for r in radii}))
            except (TypeError, ValueError):
                values = ()
            if not values or not all(math.isfinite(r) and r > 0 for r in values):
                raise QSMInputError(f"single-step radii_mm must be positive numbers of mm, got {self.radii_mm}")
            self.radii_mm = values
        largest = max(self.radii_mm or DEFAULT_RADII_MM)
        if not (0.0 <= float(self.output_radius_mm) <= largest):
            raise QSMInputError(f"single-step output_radius_mm must be between 0 and the largest radius "
                                f"({largest:g} mm), got {self.output_radius_mm}")
        if int(self.iterations) != self.iterations or self.iterations < 1:
            raise QSMInputError(f"single-step TV iterations must be a whole number >= 1, got {self.iterations}")
        if self.data_term not in DATA_TERMS:
            raise QSMInputError(f"single-step data_term must be one of {', '.join(DATA_TERMS)}, got {self.data_term!r}")
        # alpha and tolerance are checked by TVSettings
        self.tv_settings()

    def radii_for(self, voxel_size_mm: Sequence[float]) -> Tuple[float, ...]:
        """The radii (mm, increasing) on this voxel grid: the given ones, or the defaults raised to at least
        :data:`MIN_RADIUS_VOXELS` coarsest voxel sides."""
        if self.radii_mm is not None:
            return tuple(self.radii_mm)
        smallest = MIN_RADIUS_VOXELS * max(check_voxel_size(voxel_size_mm))
        return tuple(sorted({max(r, smallest) for r in DEFAULT_RADII_MM}))

    def tv_settings(self) -> TVSettings:
        return TVSettings(alpha=self.alpha, iterations=int(self.iterations), tolerance=float(self.tolerance),
                          data_term=self.data_term, huber_delta=float(self.huber_delta))


def mask_depth_mm(mask: np.ndarray, voxel_size_mm: Sequence[float]) -> np.ndarray:
    """Distance (mm) from each voxel of ``mask`` to the nearest voxel outside it (0 outside); the mask's
    bounding box counts as outside. One distance transform serves every SMV radius."""
    vs = check_voxel_size(voxel_size_mm)
    m = np.asarray(mask) > 0.5
    box = mask_bounding_box(m)
    depth = np.zeros(m.shape)
    depth[box] = scipy.ndimage.distance_transform_edt(np.pad(m[box], 1), sampling=vs)[1:-1, 1:-1, 1:-1]
    return depth


def smv_valid_mask(mask: np.ndarray, voxel_size_mm: Sequence[float], radius_mm: float,
                   depth_mm: Optional[np.ndarray] = None) -> np.ndarray:
    """The voxels of ``mask`` farther than ``radius_mm`` from its edge, whose SMV ball lies in it (bool).
    ``depth_mm``: the mask's :func:`mask_depth_mm`, when the caller already has it."""
    vs = check_voxel_size(voxel_size_mm)
    if not (math.isfinite(radius_mm) and radius_mm >= min(vs)):
        raise QSMInputError(f"SMV radius {radius_mm} mm must be at least the finest voxel side {min(vs):g} mm")
    depth = mask_depth_mm(mask, vs) if depth_mm is None else depth_mm
    return depth > radius_mm * (1 + 1e-9)


def smv_high_pass(field_ppm: np.ndarray, mask: np.ndarray, voxel_size_mm: Sequence[float],
                  radius_mm: float, depth_mm: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """``f - SMV_r(f)`` of the field inside ``mask`` (float32, 0 outside the valid mask), and the valid mask:
    the voxels farther than ``radius_mm`` from the mask's edge, whose ball lies in the mask (bool).
    ``depth_mm``: the mask's :func:`mask_depth_mm`, when the caller already has it."""
    vs = check_voxel_size(voxel_size_mm)
    valid = smv_valid_mask(mask, vs, radius_mm, depth_mm)
    m = np.asarray(mask) > 0.5
    box = mask_bounding_box(m)
    f_box = np.where(m[box], np.asarray(field_ppm, dtype=np.float64)[box], 0.0)
    valid_box = valid[box]
    if not valid_box.any():
        raise QSMInputError(f"the mask is too small for an SMV radius of {radius_mm:g} mm: no voxel is that far "
                            f"from its edge")
    fft_shape = [scipy.fft.next_fast_len(n + int(math.ceil(radius_mm / v)), real=True)
                 for n, v in zip(f_box.shape, vs)]
    crop = tuple(slice(0, n) for n in f_box.shape)
    high_box = scipy.fft.irfftn(scipy.fft.rfftn(f_box, s=fft_shape) * (1.0 - smv_spectrum(fft_shape, vs, radius_mm)),
                                s=fft_shape)[crop]
    high = np.zeros(m.shape, dtype=np.float32)
    high[box] = np.where(valid_box, high_box, 0.0)
    return high, valid


def _stack_radii(problem: _TVProblem, highs_box: Sequence[np.ndarray], valids_box: Sequence[np.ndarray],
                 radii: Sequence[float], vs: Sequence[float]) -> None:
    """Give ``problem`` one data term per radius (increasing): the dipole kernel times that radius' high-pass,
    its high-passed field, and as its mask the voxels where that ball is the largest that fits."""
    kernels, fields, masks = [], [], []
    device = problem.kernel.device
    for index, radius in enumerate(radii):
        shell = valids_box[index] if index + 1 == len(radii) else valids_box[index] & ~valids_box[index + 1]
        mask_pad, field_pad = _pad_pair(torch.as_tensor(shell, dtype=torch.float32, device=device),
                                        torch.as_tensor(np.asarray(highs_box[index], dtype=np.float32), device=device),
                                        problem.size)
        high_pass = torch.as_tensor(1.0 - smv_spectrum(problem.size, vs, radius), dtype=torch.float32, device=device)
        kernels.append(problem.kernel * high_pass)
        fields.append(field_pad)
        masks.append(mask_pad)
    problem.kernel, problem.field_pad, problem.mask_pad = torch.stack(kernels), torch.stack(fields), torch.stack(masks)


def solve_single_step_tv(field_ppm: np.ndarray, mask: np.ndarray, voxel_size_mm: Sequence[float], *,
                         b0_dir: Sequence[float] = SUPERIOR, settings: Optional[SingleStepSettings] = None,
                         callback: Optional[Callback] = None, callback_every: int = 10,
                         device: str = "auto", magnitude: Optional[np.ndarray] = None) -> SolveResult:
    """Susceptibility (ppm) from a total (or local) field in ``mask`` by single-step TV (module docstring).

    The SMV high-passes run in NumPy; the ADMM solve runs on ``device`` ("auto": a CUDA GPU when there is
    one, as TV does; the 1 mm head's four-term stack takes minutes on 2 CPU cores). ``magnitude`` is
    accepted for the common call shape and unused. The callback gets a :class:`Progress` every
    ``callback_every`` iterations and after the last one; returning True stops with 'cancelled'.
    ``result.chosen`` holds the weight, its rule, the radii used and the voxels eroded from the mask.
    """
    settings = settings or SingleStepSettings()
    every = _check_callback_every(callback_every)
    watch = Stopwatch()
    field32, mask_bool = check_inputs(field_ppm, mask)
    check_magnitude(magnitude, mask_bool)
    vs = check_voxel_size(voxel_size_mm)
    b0 = unit_vector(b0_dir)
    radii = settings.radii_for(vs)
    depth = mask_depth_mm(mask_bool, vs)
    # a ball that fits nowhere in the mask adds nothing (a small mask); the smallest one must fit somewhere
    radii = tuple(r for r in radii if smv_valid_mask(mask_bool, vs, r, depth).any()) or radii[:1]
    tv_settings = settings.tv_settings()
    highs, valids = zip(*(smv_high_pass(field32, mask_bool, vs, r, depth) for r in radii))
    high, valid = highs[0], valids[0]   # the smallest ball fits wherever any does
    output_radius = float(settings.output_radius_mm)
    keep = mask_bool if output_radius == 0 else smv_valid_mask(mask_bool, vs, output_radius, depth)
    if not keep.any():
        raise QSMInputError(f"the mask is too small for an output_radius_mm of {output_radius:g} mm: no voxel is "
                            f"that far from its edge")
    # the box reaches the smallest radius beyond the valid mask, to the input mask's edge where chi is returned
    # (a margin of the largest radius gave the same maps, 1.2-1.4x slower: docs/phase-pipeline.md)
    crop = crop_to_mask(high, valid, margin=2 + int(math.ceil(max(radii[0] / v for v in vs))))
    scale = crop.field_scale()
    torch_device, _ = resolve_device(device)
    iteration, reason = 0, None
    with torch.no_grad():
        problem = _TVProblem(crop.field_ppm / scale, crop.mask, vs, b0, tv_settings.pad_factor, torch_device)
        _stack_radii(problem, [h[crop.box] / scale for h in highs], [v[crop.box] for v in valids], radii, vs)
        if settings.alpha is None:
            choice, state = choose_alpha(problem, tv_settings, torch_device)
            alpha, rule = float(choice.chosen), "holdout"
        else:
            state, alpha, rule = None, float(settings.alpha), "given"
        mu1 = tv_settings.gradient_penalty(alpha)
        if state is None:
            state = problem.initial_state(mu1)
        # the data term stays on the valid mask (problem.mask_pad); chi is returned on the whole box
        problem.mask_box = torch.ones_like(problem.mask_box)
        last = {"chi": None}

        def on_iteration(it: int, loss: float, chi_box: torch.Tensor) -> Optional[str]:
            old, last["chi"] = last["chi"], chi_box
            stop = None
            if old is not None and _relative_change(chi_box, old) < tv_settings.tolerance:
                stop = "converged"
            if stop is None and it == int(settings.iterations):
                stop = "completed"
            if callback is not None and (stop is not None or it % every == 0):
                preview = np.where(keep, crop.paste((chi_box * scale).cpu().numpy()), 0.0).astype(np.float32)
                if callback(Progress(it, int(settings.iterations), math.nan, watch.elapsed_s, preview)) and stop is None:
                    stop = "cancelled"
            return stop

        iteration, reason, chi_box, _ = problem.run(state, alpha, mu1, float(tv_settings.mu2), int(settings.iterations),
                                                    problem.mask_pad, on_iteration, track_loss=False,
                                                    data_term=tv_settings.data_term, huber_delta=tv_settings.huber_delta)
        chi = crop.paste((chi_box * scale).cpu().numpy())
    chi = np.where(keep, chi, 0.0).astype(np.float32)
    chosen = {"alpha": alpha, "alpha_rule": rule, "radii_mm": list(radii), "data_term": settings.data_term,
              "eroded_voxels": int(mask_bool.sum() - keep.sum()), "valid_voxels": int(valid.sum())}
    return SolveResult(chi_ppm=chi, method="single-step-tv", iterations=int(iteration), elapsed_s=watch.elapsed_s,
                       stop_reason=reason or "completed", device=str(torch_device), chosen=chosen)
