"""Single-step QSM from the total field, with the phase pipeline's call shape for a background method.

The method itself is the solver :func:`qsmdip.solvers.single_step.solve_single_step_tv` (``--method
single-step-tv``): an SMV high-pass as the background removal and TV inversion of the same model, with a
Huber data term by default. This wrapper returns, besides chi, the mask it is valid in and the notes the pipeline
prints. Measurements: ``docs/results/background-removal.md`` and ``docs/phase-pipeline.md``.

Arrays are [i, j, k]; fields and chi in ppm; lengths in mm.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import List, Optional, Sequence

import numpy as np

from ..geometry import SUPERIOR, check_voxel_size
from ..solvers.single_step import SingleStepSettings, smv_valid_mask, solve_single_step_tv


@dataclass
class SingleStepResult:
    """Susceptibility from the total field, and the mask it is valid in."""

    chi_ppm: np.ndarray          #: float32 [i, j, k], 0 outside ``mask``
    mask: np.ndarray             #: bool: the input mask eroded by ``output_radius_mm`` (default: smallest radius)
    eroded_voxels: int           #: voxels of the input mask dropped
    alpha: float                 #: the TV weight used (relative to the high-passed field's RMS)
    iterations: int
    notes: List[str] = field(default_factory=list)


def single_step_tv(total_field_ppm: np.ndarray, mask: np.ndarray, voxel_size_mm: Sequence[float], *,
                   b0_dir: Sequence[float] = SUPERIOR, radii_mm: Optional[Sequence[float]] = None,
                   output_radius_mm: Optional[float] = None,
                   alpha: Optional[float] = None, iterations: int = SingleStepSettings.iterations,
                   tolerance: float = SingleStepSettings.tolerance,
                   data_term: str = SingleStepSettings.data_term, device: str = "auto") -> SingleStepResult:
    """chi (ppm) from the total field (ppm) in ``mask``: SMV high-passes of ``radii_mm`` + filtered TV.

    ``radii_mm`` None takes the solver's default radii; ``alpha`` None chooses the TV weight by hold-out
    cross-validation. The data term covers the mask eroded by the smallest radius; chi is returned in the mask
    eroded by ``output_radius_mm`` (None: the smallest radius; 0: the whole input mask), whose rim chi is
    fitted through its field inside (less exact). ``data_term``: see
    :class:`qsmdip.solvers.single_step.SingleStepSettings`. ``device``: where the ADMM solve runs ("auto": a
    CUDA GPU when there is one).
    """
    vs = check_voxel_size(voxel_size_mm)
    settings = SingleStepSettings(radii_mm=None if radii_mm is None else tuple(np.ravel(radii_mm)), alpha=alpha,
                                  iterations=iterations, tolerance=tolerance, data_term=data_term)
    radii = settings.radii_for(vs)
    out = radii[0] if output_radius_mm is None else output_radius_mm
    settings = replace(settings, output_radius_mm=out)
    result = solve_single_step_tv(total_field_ppm, mask, vs, b0_dir=b0_dir, settings=settings, device=device)
    m = np.asarray(mask) > 0.5
    keep = m if out == 0 else smv_valid_mask(m, vs, float(out))
    chosen = result.chosen
    n_in = int(m.sum())
    valid_eroded = n_in - int(chosen["valid_voxels"])
    used = ", ".join(f"{r:g}" for r in chosen["radii_mm"])
    notes = [f"SMV high-pass of radii {used} mm (each voxel the largest that fits): data term on the mask eroded "
             f"by {valid_eroded} of {n_in} voxels ({100.0 * valid_eroded / n_in:.1f} %); chi returned on the mask "
             f"eroded by {out:g} mm",
             f"single-step TV ({data_term} data term): weight {chosen['alpha']:.3g} (relative to the high-passed "
             f"field's RMS, {'cross-validated' if alpha is None else 'given'}), {result.iterations} ADMM iterations"]
    return SingleStepResult(chi_ppm=result.chi_ppm, mask=keep, eroded_voxels=int(chosen["eroded_voxels"]),
                            alpha=float(chosen["alpha"]), iterations=int(result.iterations), notes=notes)
