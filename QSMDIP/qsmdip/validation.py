"""Checks on everything a user hands in: field map, mask, units, reference and magnitude.

The command line, the runner and the background worker all call these functions, so a bad input gets
the same one-line :class:`~qsmdip.errors.QSMInputError` wherever it comes from. Fixable oddities (a
probability mask, NaN outside the mask) are repaired and reported as warning strings; anything that
would need a guess (which units? which grid?) is refused.
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import numpy as np

from .errors import QSMInputError
from .io import EchoSeries, Volume
from .units import field_to_ppm, normalise_unit, ppm_per_unit

#: A local field (or a susceptibility map) whose 99th percentile of |value| exceeds this many ppm is
#: almost certainly not in ppm (Hz, radians or ppb): refused.
MAX_PLAUSIBLE_PPM = 10.0
#: Above this, the value is unusual for a local field in ppm but possible (e.g. a large haemorrhage):
#: accepted with a warning.
WARN_PPM = 1.0
#: Below this, a field in ppm is suspiciously weak (e.g. ppm values declared as Hz): warning only.
MIN_TYPICAL_PPM = 1e-3
#: Shared tolerance for "same grid" (see :meth:`qsmdip.io.Volume.geometry_difference`).
GEOMETRY_TOL = 1e-3


def prepare_inputs(field: Volume, mask: Volume, *, units: str, b0_tesla: Optional[float] = None,
                   te_s: Optional[float] = None) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """Check a field map and its mask and return ``(field_ppm, mask_bool, warnings)``.

    ``field_ppm`` is float32 in ppm, ``mask_bool`` a boolean array, both ``[i, j, k]`` on the field's
    grid. NaN/Inf field values outside the mask are set to 0 (with a warning); inside they are an error.
    Mask rules are those of :func:`binarise_mask`.
    """
    factor = ppm_per_unit(units, b0_tesla, te_s)  # refuses unknown units or missing B0 / TE up front
    unit = normalise_unit(units)
    check_same_grid(field, mask, "field", "mask")
    inside, warnings = binarise_mask(mask.array)

    values = np.asarray(field.array, dtype=np.float64)
    bad = ~np.isfinite(values)
    if np.any(bad & inside):
        raise QSMInputError(f"the field has {int(np.count_nonzero(bad & inside))} NaN/Inf voxels inside the"
                            " mask: fix the field map or exclude them from the mask")
    if np.any(bad):
        values = np.where(bad, 0.0, values)
        warnings.append(f"{int(np.count_nonzero(bad))} NaN/Inf field voxels outside the mask were set to 0")

    field_ppm = field_to_ppm(values, unit, b0_tesla, te_s)
    inside_values = field_ppm[inside]
    if not np.any(inside_values != 0):
        raise QSMInputError("the field is zero everywhere inside the mask: there is nothing to reconstruct")
    warnings += _check_ppm_magnitude(inside_values, _unit_hint(unit, factor, b0_tesla, te_s))
    return field_ppm, inside, warnings


def binarise_mask(values: np.ndarray) -> Tuple[np.ndarray, List[str]]:
    """Turn a mask image into a boolean array, saying in a warning what was done.

    - values 0/1 (or boolean): used as they are;
    - other non-negative integers (a label map such as {0, 1, 2, 5}): every non-zero label is inside;
    - fractions in [0, 1] (a probability or resampled mask): inside where the value is > 0.5.
    Negative values, NaN, or non-integer values above 1 (an image rather than a mask) are refused,
    as is a mask that selects no voxel.
    """
    m = np.asarray(values)
    if m.dtype == bool:
        inside, warnings = m.copy(), []
    else:
        m = m.astype(np.float64)
        if not np.all(np.isfinite(m)):
            raise QSMInputError(f"the mask has {int(np.count_nonzero(~np.isfinite(m)))} NaN/Inf voxels")
        low, high = float(m.min()), float(m.max())
        integral = bool(np.all(m == np.round(m)))
        if low < 0:
            raise QSMInputError(f"the mask has negative values (minimum {low:g}): give a binary mask or label map")
        if integral and high <= 1:
            inside, warnings = m > 0, []
        elif integral:
            labels = np.unique(m[m != 0])
            shown = ", ".join(f"{v:g}" for v in labels[:8]) + (", ..." if labels.size > 8 else "")
            inside = m != 0
            warnings = [f"the mask is a label map (labels {shown}): every non-zero label is taken as inside"]
        elif high <= 1:
            inside = m > 0.5
            warnings = [f"the mask has non-binary values in [{low:g}, {high:g}]: thresholded at > 0.5"
                        f" ({int(np.count_nonzero(inside))} voxels inside)"]
        else:
            raise QSMInputError(f"the mask has non-integer values in [{low:g}, {high:g}]: this looks like an"
                                " image, not a mask (give a binary mask, a label map or probabilities in [0, 1])")
    if not np.any(inside):
        raise QSMInputError("the mask is empty: it selects no voxel")
    return inside, warnings


def check_reference(reference: Volume, field: Volume) -> Tuple[np.ndarray, List[str]]:
    """Check a reference susceptibility map (ppm) against the field; return ``(reference_ppm, warnings)``.

    The reference must lie on the field's grid. NaN/Inf are set to 0 with a warning (metrics are taken
    inside the mask); an all-zero reference, or one whose magnitude says it is not in ppm, is refused.
    """
    check_same_grid(field, reference, "field", "reference")
    values = np.asarray(reference.array, dtype=np.float64)
    warnings: List[str] = []
    bad = ~np.isfinite(values)
    if np.any(bad):
        values = np.where(bad, 0.0, values)
        warnings.append(f"{int(np.count_nonzero(bad))} NaN/Inf reference voxels were set to 0")
    if not np.any(values != 0):
        raise QSMInputError("the reference is zero everywhere: metrics against it would be meaningless")
    nonzero = values[values != 0]
    p99 = float(np.percentile(np.abs(nonzero), 99))
    if p99 > MAX_PLAUSIBLE_PPM:
        raise QSMInputError(f"the reference's 99th percentile |value| is {p99:.4g}, implausible for a"
                            " susceptibility map in ppm (is it in ppb? divide it by 1000)")
    return values.astype(np.float32), warnings


def check_magnitude(magnitude: Union[Volume, EchoSeries], field: Volume) -> Tuple[np.ndarray, List[str]]:
    """Check a GRE magnitude against the field; return ``(magnitude float32 [i, j, k], warnings)``.

    A solver that uses the magnitude as an anatomical prior compares it voxel by voxel with the field,
    so it must lie on the field's grid (same rules as the mask). Several echoes (an
    :class:`~qsmdip.io.EchoSeries`) are combined by root sum of squares, which keeps the SNR-weighted
    anatomy of all echoes, with a warning saying so. NaN/Inf, negative values (a phase or a signed
    image given by mistake) and an all-zero image are refused rather than repaired.
    """
    if isinstance(magnitude, EchoSeries):
        grid, echoes = magnitude.echo(0), [magnitude.array[..., e] for e in range(magnitude.echoes)]
    else:
        grid, echoes = magnitude, [magnitude.array]
    check_same_grid(field, grid, "field", "magnitude")
    if np.iscomplexobj(magnitude.array):
        raise QSMInputError("the magnitude holds complex values: give its absolute value")
    combined = np.zeros(grid.shape, dtype=np.float64)
    bad, low = 0, 0.0
    for echo in echoes:  # one echo at a time, so a long series is never held twice in float64
        values = np.asarray(echo, dtype=np.float64)
        finite = np.isfinite(values)
        bad += int(values.size - np.count_nonzero(finite))
        if np.any(finite):
            low = min(low, float(values[finite].min()))
        combined += values * values
    if bad:
        raise QSMInputError(f"the magnitude has {bad} NaN/Inf values: fix the magnitude image")
    if low < 0:
        raise QSMInputError(f"the magnitude has negative values (minimum {low:g}): give a magnitude image,"
                            " not a phase, real/imaginary part or other signed image")
    if not np.any(combined > 0):
        raise QSMInputError("the magnitude is zero everywhere: give the GRE magnitude image")
    warnings: List[str] = []
    if len(echoes) > 1:
        warnings.append(f"magnitude has {len(echoes)} echoes: combined by root sum of squares")
    return np.sqrt(combined).astype(np.float32), warnings


def check_same_grid(a: Volume, b: Volume, a_name: str, b_name: str) -> None:
    """Refuse two volumes that do not share one voxel grid, saying what differs."""
    if a.shape != b.shape:
        raise QSMInputError(f"{a_name} shape {a.shape} and {b_name} shape {b.shape} differ:"
                            f" the {b_name} must be on the {a_name}'s voxel grid (resample it first)")
    difference = a.geometry_difference(b, GEOMETRY_TOL)
    if difference is not None:
        raise QSMInputError(f"{a_name} and {b_name} are on different grids: {difference}"
                            f" (resample the {b_name} onto the {a_name})")


def _check_ppm_magnitude(inside_ppm: np.ndarray, hint: str) -> List[str]:
    """Refuse a field whose size says its units are wrong; warn when it is merely unusual."""
    p99 = float(np.percentile(np.abs(inside_ppm), 99))
    if p99 > MAX_PLAUSIBLE_PPM:
        raise QSMInputError(f"the field's 99th percentile |value| inside the mask is {p99:.4g} ppm,"
                            f" implausible for a local field: {hint}")
    if p99 > WARN_PPM:
        return [f"the field's 99th percentile |value| inside the mask is {p99:.3g} ppm, large for a local"
                f" field: {hint}"]
    if p99 < MIN_TYPICAL_PPM:
        return [f"the field's 99th percentile |value| inside the mask is only {p99:.3g} ppm: {hint}"]
    return []


def _unit_hint(unit: str, factor: float, b0_tesla: Optional[float], te_s: Optional[float]) -> str:
    if unit == "ppm":
        return "if it is in Hz or radians, say so with --units hz (and --b0) or --units rad (and --b0, --te)"
    given = f"B0 {b0_tesla} T" + (f", TE {te_s} s" if unit == "rad" else "")
    return f"check --units ({unit}) and {given} (1 {unit} = {factor:.4g} ppm)"
