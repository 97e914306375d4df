"""Checks and scaling of the multi-echo inputs, on arrays: phase to radians, echo times, B0, swaps.

Scanners store phase in many ways. Radians (-pi..pi, or 0..2 pi) pass as they are. Integer images whose
values fill a power-of-two range, such as Siemens' -4096..4095 or 0..4095 (12 bits), are rescaled so the
full range is 2 pi, with a note; the constant left by a 0..N range is an offset shared by every echo,
which the offset stage removes. Anything else is refused: we never guess a phase scale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..errors import QSMInputError

#: Largest echo time accepted (s): anything longer is almost surely milliseconds.
MAX_ECHO_TIME_S = 0.2
_PI_TOLERANCE = 1e-3


@dataclass
class ScaledPhase:
    """Phase in radians and how it was obtained from the stored values."""

    phase_rad: np.ndarray
    scaling: str                 # "radians", "radians 0..2pi" or "integers a..b"
    notes: List[str] = field(default_factory=list)


def phase_to_radians(values: np.ndarray) -> ScaledPhase:
    """Detect the phase's storage range and return it in radians, or raise a one-line error.

    Accepted: radians in [-pi, pi] or [0, 2 pi]; integers within [-2^n, 2^n - 1] or [0, 2^n - 1] for
    n = 8..16 that use most of that range (vendor scaling, e.g. -4096..4095), mapped to a 2 pi range.
    """
    data = np.asarray(values)
    if np.iscomplexobj(data):
        raise QSMInputError("the phase image is complex: give its angle in radians (numpy.angle) as the phase")
    finite = np.isfinite(data)
    if not finite.all():
        raise QSMInputError(f"the phase image holds {int((~finite).sum())} NaN or infinite values")
    lo, hi = float(data.min()), float(data.max())
    if lo >= -math.pi - _PI_TOLERANCE and hi <= math.pi + _PI_TOLERANCE:
        if hi - lo < 0.5:
            raise QSMInputError(f"the phase image spans only {lo:.3g}..{hi:.3g}: it does not look like a phase "
                                "(is it a field map or a mask?)")
        return ScaledPhase(np.asarray(data, dtype=np.float32), "radians")
    if lo >= -_PI_TOLERANCE and hi <= 2 * math.pi + _PI_TOLERANCE:
        return ScaledPhase(np.asarray(data, dtype=np.float32), "radians 0..2pi",
                           ["phase: values in 0..2 pi read as radians"])
    integral = bool(np.all(np.abs(data - np.round(data)) < 1e-3))
    if integral:
        for bits in range(8, 17):
            top = 2 ** bits
            for start, stop in ((-top, top - 1), (0, top - 1), (0, top)):
                if lo >= start and hi <= stop and (hi - lo) >= 0.75 * (stop - start):
                    span = float(stop - start + 1)
                    rad = (data.astype(np.float64) - start) * (2 * math.pi / span) - math.pi
                    note = (f"phase: integers {lo:.0f}..{hi:.0f} read as the vendor range {start}..{stop} "
                            f"and rescaled to radians")
                    return ScaledPhase(rad.astype(np.float32), f"integers {start}..{stop}", [note])
    raise QSMInputError(f"the phase values range from {lo:.6g} to {hi:.6g}: neither radians (-pi..pi or 0..2pi) "
                        "nor a vendor integer range such as -4096..4095 or 0..4095; rescale the phase to radians")


def check_echo_times(echo_times_s: Optional[Sequence[float]], echoes: int) -> Tuple[float, ...]:
    """Echo times in seconds, one per echo, positive and increasing."""
    if echo_times_s is None or len(echo_times_s) == 0:
        raise QSMInputError("the echo times are missing: give --echo-times in seconds (e.g. 0.004,0.012) "
                            "or JSON sidecars with EchoTime")
    tes = tuple(float(t) for t in echo_times_s)
    if len(tes) != echoes:
        raise QSMInputError(f"{echoes} echoes but {len(tes)} echo times {tes}")
    if not all(math.isfinite(t) and t > 0 for t in tes):
        raise QSMInputError(f"echo times must be positive numbers of seconds, got {tes}")
    if max(tes) > MAX_ECHO_TIME_S:
        raise QSMInputError(f"echo times {tes} look like milliseconds: give them in seconds (e.g. 0.004)")
    if any(b <= a for a, b in zip(tes, tes[1:])):
        raise QSMInputError(f"echo times must increase from echo to echo, got {tes}")
    return tes


def check_b0(b0_tesla: Optional[float]) -> float:
    """The field strength in tesla, plausible for MRI."""
    if b0_tesla is None:
        raise QSMInputError("the field strength is missing: give --b0 in tesla or a sidecar with "
                            "MagneticFieldStrength")
    b0 = float(b0_tesla)
    if not (math.isfinite(b0) and 0.05 <= b0 <= 30):
        raise QSMInputError(f"B0 = {b0_tesla} is not a plausible field strength in tesla")
    return b0


def check_magnitude_series(magnitude: np.ndarray, phase_shape: Tuple[int, ...]) -> np.ndarray:
    """The magnitude as float32 [echo, i, j, k] matching the phase, after the swap test."""
    mag = np.asarray(magnitude)
    if np.iscomplexobj(mag):
        raise QSMInputError("the magnitude image is complex: give its absolute value")
    if mag.shape != tuple(phase_shape):
        raise QSMInputError(f"magnitude shape {mag.shape} differs from phase shape {tuple(phase_shape)} "
                            "(echoes first, then i, j, k)")
    if not np.all(np.isfinite(mag)):
        raise QSMInputError("the magnitude holds NaN or infinite values")
    if mag.min() < 0:
        raise QSMInputError("the magnitude holds negative values: is it a phase image? "
                            "(check that --phase and --magnitude are not swapped)")
    if mag.max() <= 0:
        raise QSMInputError("the magnitude is zero everywhere")
    return mag.astype(np.float32)


def looks_swapped(phase_raw: np.ndarray, magnitude: np.ndarray) -> bool:
    """True when the 'phase' looks like a magnitude and the 'magnitude' like a phase.

    A magnitude is non-negative with most of the field of view (air) near its noise floor, far below its
    tissue signal; a phase fills its range evenly, air included (noise has a uniform phase).
    """
    p = np.asarray(phase_raw, dtype=np.float64).ravel()
    m = np.asarray(magnitude, dtype=np.float64).ravel()
    if p.min() < 0:
        return False
    p_span = p.max() - p.min()
    m_span = m.max() - m.min()
    if p_span <= 0 or m_span <= 0:
        return False
    # fraction of voxels in the lowest tenth of the range: ~10 % for a phase, most of the air for a magnitude
    p_low = np.mean(p < p.min() + 0.1 * p_span)
    m_low = np.mean(m < m.min() + 0.1 * m_span)
    return bool(p_low > 0.3 and m_low < 0.2)
