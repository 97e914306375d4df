"""The chain from multi-echo phase and magnitude to a local field: the one function every front end calls.

    phase (stored values) --inputs--> radians --mask--> first mask --offsets--> offset-free phase
      --unwrap--> unwrapped echoes --echo_fit--> total field (Hz -> ppm) --mask refinement--> mask
      --background--> local field (ppm) and the mask it is valid in

The command line (``qsmdip field``, ``qsmdip reconstruct --phase``), the worker and the Slicer panel all call
:func:`phase_to_local_field`. After each stage it calls ``on_stage`` with a :class:`StageReport` (its seconds,
notes and the maps it made), so a front end can show progress and the intermediate volumes, and stop by
returning True.
"""
from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import scipy.ndimage

from ..errors import QSMInputError
from ..geometry import SUPERIOR, check_voxel_size, unit_vector
from .background import BACKGROUND_REMOVERS
from .echo_fit import fit_field, hz_to_ppm, refit_early_echoes
from .inputs import check_b0, check_echo_times, check_magnitude_series, looks_swapped, phase_to_radians
from .masking import RELATIVE_RESIDUAL_LIMIT, mask_from_magnitude, poor_edge, quality_limit, without_edge
from .offsets import OFFSET_METHODS, remove_phase_offsets
from .unwrap import UNWRAPPERS, WHOLE_TURN_UNWRAPPERS, unwrap_echoes

#: The stages in order, as reported to ``on_stage`` (front ends size their progress bars with it).
STAGES = ("inputs", "mask", "offsets", "unwrap", "echo fit", "mask refinement", "background")


def _is_real(value: object) -> bool:
    """A real number, not a bool (True would pass as 1)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


class PipelineCancelled(Exception):
    """``on_stage`` asked the pipeline to stop."""


@dataclass
class PipelineSettings:
    """Which method each stage uses (defaults: the best measured, see docs/phase-pipeline.md)."""

    offsets: str = "mcpc3ds"
    unwrap: str = "region-growing"
    background: str = "pdf"
    #: fit a free intercept per voxel (the textbook fit when offsets are not removed first)
    fit_intercept: bool = False
    mask_opening_mm: float = 4.0
    #: echo-fit residual (rad) above which a voxel's phase counts as off the line: its edge voxels are peeled from
    #: the mask, and with ``early_echo_refit`` every such voxel is refitted from its early echoes
    residual_limit_rad: float = 0.06
    #: the mask refinement raises that limit to this many times the median residual of the mask's interior, the
    #: noise's (:func:`masking.quality_limit`; 0: the fixed limit alone, which at SNR 15 kept 66 % of the brain);
    #: not after a Laplacian unwrapping or with offsets left in a fit through the origin (the residual is not noise)
    relative_residual_limit: float = RELATIVE_RESIDUAL_LIMIT
    #: refit the voxels whose phase left the line from their first echoes (:func:`echo_fit.refit_early_echoes`;
    #: through-origin fits of offset-free phase only: not with ``fit_intercept`` or ``offsets="none"``)
    early_echo_refit: bool = True
    #: layers of voxels peeled off the magnitude mask's edge: partial volumes with skull and scalp, whose
    #: phase and susceptibility are far from the brain's (measured in docs/phase-pipeline.md)
    mask_erosion_voxels: int = 1
    #: refine the mask by phase quality (never done to a mask the user gives)
    refine_mask: bool = True

    def __post_init__(self) -> None:
        if not (_is_real(self.residual_limit_rad) and self.residual_limit_rad > 0):
            raise QSMInputError(f"residual_limit_rad must be a positive number of radians (inf: no limit), got "
                                f"{self.residual_limit_rad!r}")
        if not (_is_real(self.relative_residual_limit) and 0 <= self.relative_residual_limit < math.inf):
            raise QSMInputError(f"relative_residual_limit must be a number >= 0 (0: the fixed limit alone), got "
                                f"{self.relative_residual_limit!r}")
        if self.offsets not in OFFSET_METHODS:
            raise QSMInputError(f"unknown phase-offset method {self.offsets!r}; choose one of {list(OFFSET_METHODS)}")
        if self.unwrap not in UNWRAPPERS:
            raise QSMInputError(f"unknown unwrapping method {self.unwrap!r}; choose one of {sorted(UNWRAPPERS)}")
        if self.background not in BACKGROUND_REMOVERS:
            raise QSMInputError(f"unknown background-removal method {self.background!r}; "
                                f"choose one of {sorted(BACKGROUND_REMOVERS)}")


#: The textbook chain the issue measures against: Laplacian unwrapping, a linear fit, V-SHARP.
TEXTBOOK = dict(offsets="none", unwrap="laplacian", background="vsharp", fit_intercept=True, early_echo_refit=False)


@dataclass
class StageReport:
    """One finished stage: its name, seconds, notes, and the maps it made (ppm, rad or bool)."""

    name: str
    index: int
    seconds: float
    notes: List[str] = field(default_factory=list)
    outputs: Dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class FieldResult:
    """The local field and everything a user may want to check on the way to it."""

    local_field_ppm: np.ndarray     # 0 outside ``mask``
    mask: np.ndarray                # where the local field is valid (after background removal)
    total_field_ppm: np.ndarray     # 0 outside ``field_mask``
    field_mask: np.ndarray          # the mask before background removal
    reliability: np.ndarray         # the echo fit's reliability, proportional to 1 / field noise
    magnitude: np.ndarray           # root sum of squares over echoes (the DIP prior)
    stages: List[StageReport] = field(default_factory=list)
    settings: Optional[PipelineSettings] = None

    @property
    def notes(self) -> List[str]:
        return [note for stage in self.stages for note in stage.notes]

    @property
    def seconds(self) -> Dict[str, float]:
        return {stage.name: stage.seconds for stage in self.stages}


def phase_to_local_field(phase: np.ndarray, magnitude: np.ndarray, echo_times_s: Optional[Sequence[float]],
                         b0_tesla: Optional[float], voxel_size_mm: Sequence[float], *,
                         b0_dir: Sequence[float] = SUPERIOR, mask: Optional[np.ndarray] = None,
                         settings: Optional[PipelineSettings] = None,
                         on_stage: Optional[Callable[[StageReport], Optional[bool]]] = None) -> FieldResult:
    """Multi-echo GRE phase and magnitude -> local field in ppm, with its mask.

    Args:
        phase: [echo, i, j, k] (or [i, j, k] for one echo), radians or a vendor integer range (detected).
        magnitude: the magnitude of the same echoes, same shape.
        echo_times_s: echo times in seconds, increasing.
        b0_tesla: field strength in tesla.
        voxel_size_mm: voxel size along i, j, k.
        b0_dir: B0 direction in the voxel frame.
        mask: the user's brain mask ([i, j, k]); ``None`` makes one from the magnitude.
        settings: methods per stage.
        on_stage: called after each stage; returning True cancels (raises :class:`PipelineCancelled`).
    """
    settings = settings or PipelineSettings()
    vs = check_voxel_size(voxel_size_mm)
    b0_unit = unit_vector(b0_dir)
    stages: List[StageReport] = []

    def finish(name: str, started: float, notes: List[str], outputs: Dict[str, np.ndarray]) -> None:
        report = StageReport(name, STAGES.index(name), time.perf_counter() - started, notes, outputs)
        stages.append(report)
        if on_stage is not None and on_stage(report):
            raise PipelineCancelled(f"cancelled after the {name} stage")

    # inputs: shapes, scaling, echo times, B0, swapped images
    started = time.perf_counter()
    raw = np.asarray(phase)
    mag = np.asarray(magnitude)
    if raw.ndim == 3:
        raw, mag = raw[None], (mag[None] if mag.ndim == 3 else mag)
    if raw.ndim != 4:
        raise QSMInputError(f"the phase must be [echo, i, j, k] or one 3D echo, got shape {raw.shape}")
    if looks_swapped(raw, mag):
        raise QSMInputError("the phase looks like a magnitude image and the magnitude like a phase: "
                            "are --phase and --magnitude swapped?")
    scaled = phase_to_radians(raw)
    mag = check_magnitude_series(mag, raw.shape)
    tes = check_echo_times(echo_times_s, raw.shape[0])
    b0 = check_b0(b0_tesla)
    notes = list(scaled.notes) + [f"{len(tes)} echo(es), TE {', '.join(f'{t * 1e3:g}' for t in tes)} ms, B0 {b0:g} T"]
    finish("inputs", started, notes, {})

    # first mask: where to unwrap and fit
    started = time.perf_counter()
    user_mask = mask is not None
    if user_mask:
        m = np.asarray(mask)
        if m.shape != raw.shape[1:]:
            raise QSMInputError(f"the mask's shape {m.shape} differs from the phase's grid {raw.shape[1:]}")
        m = m != 0
        if not m.any():
            raise QSMInputError("the mask is empty: it selects no voxel")
        notes = [f"mask: the user's, {int(m.sum())} voxels"]
    else:
        first = mask_from_magnitude(mag, vs, opening_mm=settings.mask_opening_mm)
        m, notes = first.mask, first.notes
    finish("mask", started, notes, {"mask": m})

    started = time.perf_counter()
    offsets = remove_phase_offsets(scaled.phase_rad, mag, tes, m, vs, method=settings.offsets)
    finish("offsets", started, offsets.notes, {"offset_rad": offsets.offset_rad})

    started = time.perf_counter()
    unwrapped = unwrap_echoes(offsets.phases_rad, mag, tes, m, vs, method=settings.unwrap)
    finish("unwrap", started, [f"unwrap: {settings.unwrap}"], {})

    started = time.perf_counter()
    intercept = settings.fit_intercept and len(tes) > 1
    fit = fit_field(unwrapped, mag, tes, m, intercept=intercept)
    notes = [f"echo fit: magnitude-weighted, {'with' if intercept else 'no'} intercept"]
    refit = settings.early_echo_refit and len(tes) > 1 and settings.offsets != "none" and not intercept
    refine = settings.refine_mask and not user_mask and len(tes) > 1
    if settings.early_echo_refit and len(tes) > 1 and settings.offsets == "none":
        notes.append("echo fit: no early-echo refit, as the phase offsets were not removed")
    limit = settings.residual_limit_rad
    edge = np.zeros_like(m)
    if refit or refine:
        if (intercept or settings.offsets != "none") and settings.unwrap in WHOLE_TURN_UNWRAPPERS:
            # the typical voxel's residual is its noise: not so when a line through the origin misfits the offsets,
            # nor after a Laplacian unwrapping, whose phase is smoothed
            limit = quality_limit(fit.residual_rad, m, vs, limit, settings.relative_residual_limit)
        # the mask's edge voxels whose phase is poor (partial volumes with bone, CSF or air): the refinement peels
        # them, and refitting them from early echoes made a user's mask's local field worse (docs/phase-pipeline.md)
        edge = poor_edge(m, fit.residual_rad, limit)
    if refit:
        # the noise is estimated on the whole mask, as before the poor edge was left out of the refit
        fit, kept = refit_early_echoes(unwrapped, mag, tes, fit, m & ~edge, settings.residual_limit_rad, noise_mask=m)
        if kept:
            counts = ", ".join(f"{n} echo{'es' if n > 1 else ''}: {v}" for n, v in sorted(kept.items(), reverse=True))
            notes.append(f"echo fit: {sum(kept.values())} voxels whose phase left the line (residual above "
                         f"{settings.residual_limit_rad:g} rad and above the noise's) refitted from their early "
                         f"echoes ({counts}); the mask's poor edge is not refitted")
    total_ppm = hz_to_ppm(fit.field_hz, b0)
    finish("echo fit", started, notes, {"total_field_ppm": total_ppm})

    started = time.perf_counter()
    notes = []
    if refine:
        # the first mask is the magnitude mask itself: peel its poor edge rather than make it again
        before = int(m.sum())
        m = without_edge(m, edge)
        notes = [f"mask: {before - int(m.sum())} edge voxels dropped for poor phase quality (echo-fit residual "
                 f"above {limit:.3g} rad)"]
        if settings.mask_erosion_voxels > 0:
            before = int(m.sum())
            m = scipy.ndimage.binary_erosion(m, iterations=settings.mask_erosion_voxels)
            if not m.any():
                raise QSMInputError("the mask vanished when its edge was peeled: give a mask (--mask) or check "
                                    "the magnitude")
            notes.append(f"mask: {before - int(m.sum())} voxels peeled off the edge "
                         f"({settings.mask_erosion_voxels} voxel layer) where tissue meets skull")
    else:
        notes = ["mask: not refined" + (" (the user's mask is used as given)" if user_mask else "")]
    # The field's absolute level is arbitrary (scanner frequency, the 2 pi ambiguity of the offsets), and a
    # constant is harmonic, so referencing it to its median changes no local field and spares PDF a fit of it.
    total_ppm = np.where(m, total_ppm - np.median(total_ppm[m]), 0.0).astype(np.float32)
    finish("mask refinement", started, notes, {"mask": m})

    started = time.perf_counter()
    remover = BACKGROUND_REMOVERS[settings.background]
    background = remover(total_ppm, m, vs, b0_dir=b0_unit, weight=np.where(m, fit.reliability, 0.0))
    notes = list(background.notes) + [f"background: {background.method}, {background.eroded_voxels} voxels eroded "
                                      f"({100.0 * background.eroded_voxels / max(int(m.sum()), 1):.1f} % of the mask)"]
    finish("background", started, notes, {"local_field_ppm": background.local_field_ppm, "mask": background.mask})

    return FieldResult(local_field_ppm=background.local_field_ppm, mask=background.mask, total_field_ppm=total_ppm,
                       field_mask=m, reliability=fit.reliability, magnitude=np.sqrt(np.sum(mag ** 2, axis=0)),
                       stages=stages, settings=settings)
