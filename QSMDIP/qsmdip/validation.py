"""Checks on everything a user hands in: field map, mask, units, reference and magnitude.

The command line, the runner and the background worker all call these functions, so a bad input gets
the same one-line :class:`~qsmdip.errors.QSMInputError` wherever it comes from. Fixable oddities (a
probability mask, NaN outside the mask) are repaired and reported as warning strings; anything that
would need a guess (which units? which grid?) is refused.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import math
import numbers
import os
import typing
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from .errors import QSMInputError
from .io import EchoSeries, Volume
from .units import field_to_ppm, normalise_unit, ppm_per_unit

# How large a field in ppm may be. The statistic is the spread of the field inside the mask: the
# FIELD_SPREAD_PERCENTILE-th percentile of |field - median(field)|, which ignores a few bad voxels and a
# constant offset. A local field in ppm rarely exceeds ~1 ppm there, even with a large haemorrhage or
# veins; a field that still holds part of the background field reaches a few ppm near the sinuses. A
# local field in Hz spreads over ~5-20 "ppm" at 1.5 T and ~10-40 at 3 T (127.7 Hz per ppm there).
FIELD_SPREAD_PERCENTILE = 99.9
#: Spread (ppm) above which a field given in ppm is refused: it looks like Hz or radians.
MAX_PLAUSIBLE_PPM = 5.0
#: Spread (ppm) above which a field is unusual for a local field but possible (a large haemorrhage, a
#: residual background field): accepted with a warning.
WARN_PPM = 1.0
#: Below this spread, a field in ppm is suspiciously weak (e.g. ppm values declared as Hz): warning only.
MIN_TYPICAL_PPM = 1e-3
#: No voxel of a field may differ from the field's median by more than this (ppm): the largest
#: susceptibility difference in the head (air / tissue, ~9.4 ppm) cannot make such a field, and one such
#: voxel is enough to spoil the whole map (or overflow it to NaN).
MAX_VOXEL_PPM = 50.0
#: A reference susceptibility map whose 99th percentile |value| exceeds this (ppm) is taken to be in ppb.
MAX_PLAUSIBLE_CHI_PPM = 10.0
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

    warnings += _unused_acquisition_values(unit, b0_tesla, te_s)
    field_ppm = field_to_ppm(values, unit, b0_tesla, te_s)
    inside_values = field_ppm[inside]
    if not np.any(inside_values != 0):
        raise QSMInputError("the field is zero everywhere inside the mask: there is nothing to reconstruct")
    warnings += _check_ppm_magnitude(field_ppm, inside, _unit_hint(unit, factor, b0_tesla, te_s))
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
    if p99 > MAX_PLAUSIBLE_CHI_PPM:
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


def check_network_fits(mask: np.ndarray, depth: int, margin: int = 2) -> None:
    """Refuse a mask too small for a U-Net of ``depth`` stride-2 levels (DIP's network).

    DIP fits the mask's bounding box grown by ``margin`` voxels (``solvers.base.crop_to_mask``), padded to
    a multiple of 2**depth; if that is 2**depth voxels along every axis, the deepest level holds a single
    voxel, which instance normalisation cannot handle.
    """
    from .geometry import mask_bounding_box

    box = tuple(s.stop - s.start for s in mask_bounding_box(mask, margin))
    if all(n <= 2 ** depth for n in box):
        raise QSMInputError(f"the mask's bounding box ({box[0]}x{box[1]}x{box[2]} voxels with a {margin}-voxel margin)"
                            f" is too small for DIP's network of depth {depth}: it needs more than {2 ** depth}"
                            " voxels along at least one axis; use --method tv, or a lower --set depth")


def check_same_grid(a: Volume, b: Volume, a_name: str, b_name: str) -> None:
    """Refuse two volumes that do not share one voxel grid, saying what differs."""
    if a.shape != b.shape:
        raise QSMInputError(f"{a_name} shape {a.shape} and {b_name} shape {b.shape} differ:"
                            f" the {b_name} must be on the {a_name}'s voxel grid (resample it first)")
    difference = a.geometry_difference(b, GEOMETRY_TOL)
    if difference is not None:
        raise QSMInputError(f"{a_name} and {b_name} are on different grids: {difference}"
                            f" (resample the {b_name} onto the {a_name})")


def _check_ppm_magnitude(field_ppm: np.ndarray, inside: np.ndarray, hint: str) -> List[str]:
    """Refuse a field whose size says its units are wrong, or with a voxel no field can have; warn when
    it is merely unusual. See FIELD_SPREAD_PERCENTILE for the statistic and the thresholds."""
    inside_ppm = field_ppm[inside].astype(np.float64)
    deviation = np.abs(inside_ppm - np.median(inside_ppm))
    spread = float(np.percentile(deviation, FIELD_SPREAD_PERCENTILE))
    described = (f"the field inside the mask spreads over {spread:.3g} ppm ({FIELD_SPREAD_PERCENTILE:g}th"
                 " percentile of |field - median|)")
    if spread > MAX_PLAUSIBLE_PPM:
        raise QSMInputError(f"{described}, implausible for a local field in ppm (refused above"
                            f" {MAX_PLAUSIBLE_PPM:g}): {hint}")
    extreme = deviation > MAX_VOXEL_PPM
    if np.any(extreme):
        worst = int(np.argmax(deviation))
        where = tuple(int(n) for n in np.argwhere(inside)[worst])
        raise QSMInputError(f"{int(np.count_nonzero(extreme))} voxel(s) inside the mask differ from the field's"
                            f" median by more than {MAX_VOXEL_PPM:g} ppm (the largest, {float(inside_ppm[worst]):.4g}"
                            f" ppm, at voxel {list(where)}): no local field is that large; fix them or leave"
                            " them out of the mask")
    if spread > WARN_PPM:
        return [f"{described}, large for a local field (a large haemorrhage, or a background field not"
                f" fully removed?): {hint}"]
    if spread < MIN_TYPICAL_PPM:
        return [f"{described}, only: {hint}"]
    return []


def _unit_hint(unit: str, factor: float, b0_tesla: Optional[float], te_s: Optional[float]) -> str:
    if unit == "ppm":
        return ("it looks like Hz or radians: give --units hz --b0 TESLA, or --units rad --b0 TESLA --te"
                " SECONDS (and remove the background field first if it is a total field)")
    given = f"B0 {b0_tesla:g} T" + (f", TE {te_s:g} s" if unit == "rad" else "")
    return f"check --units ({unit}) and {given} (1 {unit} = {factor:.4g} ppm)"


def _unused_acquisition_values(unit: str, b0_tesla: Optional[float], te_s: Optional[float]) -> List[str]:
    """Warnings for a B0 or an echo time that the field's units make unnecessary (they are still checked)."""
    warnings = []
    if b0_tesla is not None and unit == "ppm":
        warnings.append(f"B0 {b0_tesla:g} T is not used: the field is already in ppm")
    if te_s is not None and unit != "rad":
        warnings.append(f"the echo time {te_s:g} s is not used: only a field in rad needs it")
    return warnings


def check_types(cls: type, values: Mapping[str, Any], what: str,
                names: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """Check ``values`` against the field types of the dataclass ``cls``; return them converted.

    For values that come from text (``--set NAME=VALUE``) or a JSON job file, so that a wrong type is a one-line
    :class:`QSMInputError` naming the value instead of a crash deep inside a solver: numbers must be finite real
    numbers (``Infinity`` and ``NaN`` are refused), whole numbers integers, flags true/false, tuples lists of
    numbers (or of texts, where the field holds texts). ``what`` prefixes the message ("tv setting"); ``names``
    maps a field to the name the user typed (a job-file key). Names that are not fields are left to the caller.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    checked: Dict[str, Any] = {}
    for name, value in values.items():
        if name not in fields:
            checked[name] = value
            continue
        ok, converted, expected = _convert(hints.get(name, Any), value)
        if not ok:
            shown = (names or {}).get(name, name)
            raise QSMInputError(f"{what} {shown}={_show(value)} is invalid: it must be {expected}")
        checked[name] = converted
    return checked


def _convert(hint: Any, value: Any) -> Tuple[bool, Any, str]:
    """(whether ``value`` fits the type ``hint``, the value converted, what was expected in words)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        if value is None and type(None) in args:
            return True, None, ""
        inner = [a for a in args if a is not type(None)]
        ok, converted, expected = _convert(inner[0], value) if len(inner) == 1 else (True, value, "")
        return ok, converted, expected
    if hint is bool:
        return isinstance(value, (bool, np.bool_)), bool(value) if isinstance(value, (bool, np.bool_)) else value, \
            "true or false"
    if hint is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
        return ok, int(value) if ok else value, "a whole number"
    if hint is float:
        ok = _is_finite_real(value)
        return ok, float(value) if ok else value, "a finite number"
    if hint is str:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        return isinstance(value, str), value, "a text"
    if origin in (tuple, list, collections.abc.Sequence) and args and args[0] is str:
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        return ok, list(value) if ok else value, "a list of texts"
    if origin in (tuple, list, collections.abc.Sequence):
        fixed = len(args) if origin is tuple and args and Ellipsis not in args else None
        if isinstance(value, np.ndarray) and value.ndim == 1:
            value = value.tolist()
        ok = isinstance(value, (list, tuple)) and all(_is_finite_real(v) for v in value) \
            and (fixed is None or len(value) == fixed) and len(value) > 0
        expected = f"a list of {fixed} finite numbers" if fixed else "a list of finite numbers"
        return ok, tuple(float(v) for v in value) if ok else value, expected
    if origin in (dict, collections.abc.Mapping) or hint is dict:
        return isinstance(value, dict), value, "an object of NAME: VALUE pairs"
    return True, value, ""


def _is_finite_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(float(value))


def _show(value: Any) -> str:
    """A value as the user typed it: no ``np.float64(...)`` wrappers."""
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        return repr(float(value)) if not isinstance(value, numbers.Integral) else str(int(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return repr(value)
