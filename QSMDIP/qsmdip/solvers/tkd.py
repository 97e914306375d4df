"""Truncated k-space division (TKD): the fastest, crudest dipole inversion.

chi = F^-1[ F(M f) / D_t ],  D_t(k) = D(k) where |D(k)| >= t, else sign(D(k)) * t  (and t where D = 0).

Dividing by the dipole kernel amplifies noise without bound near the magic-angle cone where D vanishes;
clamping |D| to at least ``t`` trades those streaks for an underestimate of the susceptibility (the
attenuated frequencies are divided by t instead of the true, smaller D). The default t = 0.19 is a
common choice; published implementations use 0.1 to 0.2 (Shmueli et al., MRM 2009; Wharton et al.,
MRM 2010). No "TKD correction" (the global rescaling some authors apply) is done. The solver works on
the mask's bounding box and a zero-padded FFT grid.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ..device import resolve_device
from ..errors import QSMInputError
from ..geometry import SUPERIOR, check_voxel_size
from ..operator import DipoleOperator
from .base import Callback, check_magnitude, Progress, SolveResult, Stopwatch, check_inputs, crop_to_mask


@dataclass
class TKDSettings:
    """Settings of truncated k-space division.

    Attributes:
        threshold: smallest |D| divided by, in (0, 2/3); 0.19 by default (see the module docstring).
            Smaller keeps more of the cone (sharper, more streaks), larger suppresses streaks and
            underestimates more.
        pad_factor: FFT grid = pad_factor x the mask's bounding box (>= 1; 2 avoids wrap-around).
    """

    threshold: float = 0.19
    pad_factor: float = 2.0

    def __post_init__(self) -> None:
        if not (0.0 < float(self.threshold) < 2.0 / 3.0):
            raise QSMInputError(f"TKD threshold must lie in (0, 2/3), got {self.threshold}")
        if not (float(self.pad_factor) >= 1.0):
            raise QSMInputError(f"pad_factor must be >= 1, got {self.pad_factor}")


def truncated_inverse_kernel(kernel: torch.Tensor, threshold: float) -> torch.Tensor:
    """1 / D_t: the reciprocal of the dipole kernel with |D| clamped to at least ``threshold``."""
    sign = torch.where(kernel < 0, -1.0, 1.0).to(kernel.dtype)
    clamped = torch.where(kernel.abs() < threshold, sign * threshold, kernel)
    return 1.0 / clamped


def solve_tkd(field_ppm: np.ndarray, mask: np.ndarray, voxel_size_mm: Sequence[float], *,
              b0_dir: Sequence[float] = SUPERIOR, settings: Optional[TKDSettings] = None,
              callback: Optional[Callback] = None, callback_every: int = 10,
              device: str = "auto", magnitude: Optional[np.ndarray] = None) -> SolveResult:
    """Susceptibility (ppm) by truncated k-space division of the masked local field (ppm).

    Closed form: ``iterations`` is 0. The callback, if given, is called once with the final map
    (iteration 1 of 1) so progress displays and snapshot streams see the result; its return value
    is ignored since there is nothing left to cancel. ``callback_every`` is accepted for the common
    call shape and unused. The reported loss is the data misfit 0.5 ||M (D chi - f)||^2 (sum over
    voxels, ppm^2) of the returned map.
    """
    settings = settings or TKDSettings()
    watch = Stopwatch()
    field32, mask_bool = check_inputs(field_ppm, mask)
    check_magnitude(magnitude, mask_bool)  # accepted for the common call shape; this method has no use for it
    voxel_size_mm = check_voxel_size(voxel_size_mm)
    torch_device, _ = resolve_device(device)
    crop = crop_to_mask(field32, mask_bool)

    with torch.no_grad():
        op = DipoleOperator(crop.field_ppm.shape, voxel_size_mm, b0_dir, pad_factor=settings.pad_factor,
                            device=torch_device, dtype=torch.float32)
        field_t = torch.as_tensor(crop.field_ppm, device=torch_device)
        mask_t = torch.as_tensor(crop.mask, device=torch_device, dtype=torch.float32)
        inverse = truncated_inverse_kernel(op.kernel, float(settings.threshold))
        chi_t = op.apply_kspace_filter(field_t, inverse) * mask_t
        residual = mask_t * (op(chi_t) - field_t)
        loss = float(0.5 * torch.sum(residual ** 2))
        chi_full = crop.paste(chi_t.cpu().numpy())

    if callback is not None:
        callback(Progress(1, 1, loss, watch.elapsed_s, chi_full))
    return SolveResult(chi_ppm=chi_full, method="tkd", iterations=0, elapsed_s=watch.elapsed_s,
                       stop_reason="completed", loss_history=[loss], device=str(torch_device))
