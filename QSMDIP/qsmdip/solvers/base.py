"""What every solver shares: the progress report, the callback contract and the result.

One call shape for every method::

    result = solve_xxx(field_ppm, mask, voxel_size_mm, *, b0_dir=..., settings=XxxSettings(...),
                       callback=None, callback_every=10, device="auto", magnitude=None)

``field_ppm`` and ``mask`` are NumPy arrays indexed [i, j, k] (see ``geometry.py``). The callback gets a
:class:`Progress` every ``callback_every`` iterations (and after the last one) and may return True to
stop: that one mechanism serves progress bars, snapshot streaming and cancel.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from ..errors import QSMInputError


@dataclass
class Progress:
    """State of an iterative solver, handed to the callback."""

    iteration: int            #: iterations done so far (1-based after the first)
    max_iterations: int       #: the planned number of iterations
    loss: float               #: the method's objective (data term plus regulariser) at this iteration
    elapsed_s: float          #: wall time since the solver started
    chi_ppm: np.ndarray       #: current susceptibility estimate, [i, j, k], float32, zero outside the mask

    @property
    def remaining_s(self) -> float:
        """Time left if the remaining iterations run at the average speed so far (NaN before the first)."""
        if self.iteration <= 0:
            return math.nan
        return self.elapsed_s / self.iteration * max(self.max_iterations - self.iteration, 0)


#: Return True to stop the solver (cancel); None or False to go on.
Callback = Callable[[Progress], Optional[bool]]


@dataclass
class SolveResult:
    """A reconstruction and how it ended."""

    chi_ppm: np.ndarray                   #: susceptibility map [i, j, k] in ppm, float32, zero outside the mask
    method: str                           #: 'tkd', 'tikhonov', 'tv' or 'dip'
    iterations: int = 0                   #: iterations run (0 for closed-form methods)
    elapsed_s: float = 0.0
    stop_reason: str = "completed"        #: 'completed', 'converged', 'time_limit', 'cancelled', 'discrepancy'...
    loss_history: List[float] = field(default_factory=list)
    device: str = "cpu"
    chosen: Dict[str, Any] = field(default_factory=dict)  #: settings chosen from the data (e.g. the TV weight)


class Stopwatch:
    """Wall time since creation, and whether a time limit has passed."""

    def __init__(self, max_seconds: Optional[float] = None):
        self.start = time.perf_counter()
        self.max_seconds = max_seconds

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.start

    def expired(self, next_step_s: float = 0.0) -> bool:
        """True once the limit has passed, or when a next step of ``next_step_s`` would end past it (so a
        loop of slow iterations stops before the limit instead of one iteration after it)."""
        return self.max_seconds is not None and self.elapsed_s + next_step_s >= self.max_seconds


def check_inputs(field_ppm: np.ndarray, mask: np.ndarray) -> tuple:
    """Validate a field/mask pair for a solver and return (field float32, mask bool).

    File-level checks (geometry, NaN, thresholding) live in ``validation.py``; this is the last line of
    defence for library callers who pass arrays directly.
    """
    field_arr = np.asarray(field_ppm)
    mask_arr = np.asarray(mask)
    if field_arr.ndim != 3:
        raise QSMInputError(f"the field must be a 3D volume, got {field_arr.ndim} dimensions {field_arr.shape}")
    if mask_arr.shape != field_arr.shape:
        raise QSMInputError(f"field {field_arr.shape} and mask {mask_arr.shape} differ in size")
    mask_bool = mask_arr > 0.5 if mask_arr.dtype != bool else mask_arr
    if not mask_bool.any():
        raise QSMInputError("the mask is empty: it selects no voxel")
    field32 = field_arr.astype(np.float32)
    if not np.all(np.isfinite(field32[mask_bool])):
        raise QSMInputError("the field has NaN or Inf values inside the mask")
    field32 = np.where(mask_bool, field32, 0.0).astype(np.float32)
    return field32, mask_bool


def check_magnitude(magnitude: Optional[np.ndarray], mask: np.ndarray) -> Optional[np.ndarray]:
    """Validate an optional GRE magnitude for a solver and return it as float32 scaled to mean 1 in the mask.

    Every solver accepts ``magnitude=`` (one call shape); methods that use it as an anatomical prior get
    it here in a unit-free form. File-level checks (grid, echoes) are in ``validation.check_magnitude``.
    """
    if magnitude is None:
        return None
    mag = np.asarray(magnitude, dtype=np.float64)
    if mag.shape != mask.shape:
        raise QSMInputError(f"magnitude {mag.shape} and mask {mask.shape} differ in size")
    inside = mag[mask]
    if not np.all(np.isfinite(inside)):
        raise QSMInputError("the magnitude has NaN or Inf values inside the mask")
    if np.any(inside < 0):
        raise QSMInputError(f"the magnitude has negative values (minimum {inside.min():.4g}): "
                            "give a magnitude image, not a phase or a signed image")
    mean = float(inside.mean())
    if not mean > 0:
        raise QSMInputError("the magnitude is zero everywhere inside the mask")
    return np.where(mask, mag / mean, 0.0).astype(np.float32)


@dataclass
class MaskCrop:
    """A field/mask pair cut to the mask's bounding box, and the way back to the full volume.

    Solving on the box instead of the whole field of view saves FFT and network work in proportion to
    the empty space around the brain; the zero-padded FFT grid keeps the convolution from wrapping.
    """

    field_ppm: np.ndarray
    mask: np.ndarray
    box: tuple
    full_shape: tuple

    def field_scale(self) -> float:
        """The field's RMS inside the mask (1 for an all-zero field): the divisor that makes weights scale-free."""
        rms = float(np.sqrt(np.mean(np.square(self.field_ppm[self.mask], dtype=np.float64))))
        return rms if rms > 0 else 1.0

    def paste(self, chi_box: np.ndarray) -> np.ndarray:
        """Place a box-sized map into a zero volume of the full shape (float32)."""
        full = np.zeros(self.full_shape, dtype=np.float32)
        full[self.box] = chi_box
        return full


def crop_to_mask(field_ppm: np.ndarray, mask: np.ndarray, margin: int = 2) -> MaskCrop:
    """Cut field and mask to the mask's bounding box grown by ``margin`` voxels."""
    from ..geometry import mask_bounding_box

    box = mask_bounding_box(mask, margin)
    return MaskCrop(np.ascontiguousarray(field_ppm[box]), np.ascontiguousarray(mask[box]), box, mask.shape)
