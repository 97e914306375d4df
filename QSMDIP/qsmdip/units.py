"""Field-unit conversion to ppm, the only unit the solvers see.

A local field map comes in ppm (already normalised by B0), in Hz, or in radians of phase accumulated
over one echo time. The conversion needs B0 (tesla) for Hz and B0 plus echo time (seconds) for radians;
we never guess them.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import numpy as np

from .errors import QSMInputError

#: Proton gyromagnetic ratio over 2 pi, in MHz/T (CODATA 2018: 42.577 478 518).
GAMMA_BAR_MHZ_PER_T = 42.577478518

FIELD_UNITS = ("ppm", "hz", "rad")


def normalise_unit(units: str) -> str:
    """Return the canonical unit name ('ppm', 'hz' or 'rad') or raise a clear error."""
    key = str(units).strip().lower()
    aliases = {"ppm": "ppm", "hz": "hz", "rad": "rad", "radian": "rad", "radians": "rad"}
    if key not in aliases:
        raise QSMInputError(f"unknown field unit {units!r}: use one of ppm, hz, rad")
    return aliases[key]


def ppm_per_unit(units: str, b0_tesla: Optional[float] = None, te_s: Optional[float] = None) -> float:
    """Factor that turns a field in ``units`` into ppm.

    ppm = Hz / (gamma_bar[MHz/T] * B0)  and  ppm = rad / (2 pi * gamma_bar[MHz/T] * B0 * TE).
    A B0 or TE that is given is checked even where the unit does not need it, so a mistyped value
    (``--b0 nan``) is an error rather than silently ignored.
    """
    unit = normalise_unit(units)
    if b0_tesla is not None:
        b0_tesla = _positive_number(b0_tesla, "B0", "tesla")
        if b0_tesla > 30:
            raise QSMInputError(f"B0 = {b0_tesla:g} T is not a plausible MRI field strength (give it in tesla)")
    if te_s is not None:
        te_s = _positive_number(te_s, "echo time", "seconds")
        if te_s > 1.0:
            raise QSMInputError(f"echo time {te_s:g} s is implausible: give it in seconds (e.g. 0.02), not ms")
    if unit == "ppm":
        return 1.0
    if b0_tesla is None:
        raise QSMInputError(f"a field in {unit} needs the B0 field strength in tesla (--b0)")
    if unit == "hz":
        return 1.0 / (GAMMA_BAR_MHZ_PER_T * b0_tesla)
    if te_s is None:
        raise QSMInputError("a field in rad needs the echo time in seconds (--te)")
    return 1.0 / (2.0 * math.pi * GAMMA_BAR_MHZ_PER_T * b0_tesla * te_s)


def _positive_number(value: object, name: str, unit: str) -> float:
    """``value`` as a float if it is a finite positive real number, else a one-line error naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)) \
            or float(value) <= 0:
        shown = f"{float(value):g}" if isinstance(value, numbers.Real) and not isinstance(value, bool) else repr(value)
        raise QSMInputError(f"{name} must be a positive number of {unit}, got {shown}")
    return float(value)


def field_to_ppm(field: np.ndarray, units: str, b0_tesla: Optional[float] = None,
                 te_s: Optional[float] = None) -> np.ndarray:
    """Convert a field map to ppm (float32), checking that the needed B0 / TE are given."""
    factor = ppm_per_unit(units, b0_tesla, te_s)
    return (np.asarray(field, dtype=np.float64) * factor).astype(np.float32)


def ppm_to_unit(field_ppm: np.ndarray, units: str, b0_tesla: Optional[float] = None,
                te_s: Optional[float] = None) -> np.ndarray:
    """Inverse of :func:`field_to_ppm` (used to write phantoms in Hz or rad)."""
    factor = ppm_per_unit(units, b0_tesla, te_s)
    return (np.asarray(field_ppm, dtype=np.float64) / factor).astype(np.float32)
