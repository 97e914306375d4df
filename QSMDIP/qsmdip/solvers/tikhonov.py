"""Closed-form Tikhonov inversion with a gradient regulariser (one FFT division, no iterations).

Minimises, on the zero-padded FFT grid with the field set to zero outside the mask,

    0.5 ||D chi - M f||^2 + 0.5 lambda ||grad chi||^2,

whose minimiser is chi = F^-1[ D F(M f) / (D^2 + lambda |G|^2) ], |G|^2 being the Fourier symbol of the
periodic forward-difference gradient (``kernel.laplacian_kernel``, in 1/mm^2, so ``lambda_`` is in mm^2).
This is the closed-form L2 method of Bilgic et al. (JMRI 2014) with the gradient as regulariser. The
k = 0 term (where D and G both vanish) is set to 0: QSM leaves the mean undetermined.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ..device import resolve_device
from ..errors import QSMInputError
from ..geometry import SUPERIOR, check_voxel_size
from ..kernel import laplacian_kernel
from ..operator import DipoleOperator
from .base import Callback, check_magnitude, Progress, SolveResult, Stopwatch, check_inputs, crop_to_mask


@dataclass
class TikhonovSettings:
    """Settings of closed-form Tikhonov inversion.

    Attributes:
        lambda_: weight of the squared-gradient regulariser, mm^2 (> 0); larger values smooth more and
            shrink chi towards 0. The best weight depends on the data: on the head phantom at SNR 200
            (``benchmarks/benchmark.py``) a sweep of 1e-3 to 0.3 picked 0.03 for 2 mm with axial B0 and
            1e-3 for 1 mm or an oblique B0; the default 0.01 lies between them.
        pad_factor: FFT grid = pad_factor x the mask's bounding box (>= 1; 2 avoids wrap-around).
    """

    lambda_: float = 0.01
    pad_factor: float = 2.0

    def __post_init__(self) -> None:
        if not (float(self.lambda_) > 0.0 and np.isfinite(float(self.lambda_))):
            raise QSMInputError(f"Tikhonov lambda_ must be a positive number, got {self.lambda_}")
        if not (float(self.pad_factor) >= 1.0):
            raise QSMInputError(f"pad_factor must be >= 1, got {self.pad_factor}")


def solve_tikhonov(field_ppm: np.ndarray, mask: np.ndarray, voxel_size_mm: Sequence[float], *,
                   b0_dir: Sequence[float] = SUPERIOR, settings: Optional[TikhonovSettings] = None,
                   callback: Optional[Callback] = None, callback_every: int = 10,
                   device: str = "auto", magnitude: Optional[np.ndarray] = None) -> SolveResult:
    """Susceptibility (ppm) by closed-form gradient-regularised least squares.

    Closed form: ``iterations`` is 0 and the callback, if given, is called once with the final map
    (iteration 1 of 1); its return value is ignored and ``callback_every`` is unused. The reported
    loss is the objective in the module docstring (data misfit plus regulariser, sums over the padded
    grid) at the minimiser, before the final masking.
    """
    settings = settings or TikhonovSettings()
    watch = Stopwatch()
    field32, mask_bool = check_inputs(field_ppm, mask)
    check_magnitude(magnitude, mask_bool)  # accepted for the common call shape; this method has no use for it
    voxel_size_mm = check_voxel_size(voxel_size_mm)
    torch_device, _ = resolve_device(device)
    crop = crop_to_mask(field32, mask_bool)
    lam = float(settings.lambda_)

    with torch.no_grad():
        op = DipoleOperator(crop.field_ppm.shape, voxel_size_mm, b0_dir, pad_factor=settings.pad_factor,
                            device=torch_device, dtype=torch.float32)
        grad_sq = torch.as_tensor(laplacian_kernel(op.fft_shape, voxel_size_mm, half=True),
                                  dtype=torch.float32, device=torch_device)
        dims, size = (-3, -2, -1), op.fft_shape
        field_t = torch.as_tensor(crop.field_ppm, device=torch_device)
        field_spec = torch.fft.rfftn(field_t, s=size, dim=dims)
        denominator = op.kernel ** 2 + lam * grad_sq
        denominator[0, 0, 0] = 1.0  # D and G vanish at k = 0: the mean is set to 0
        chi_spec = op.kernel * field_spec / denominator
        chi_pad = torch.fft.irfftn(chi_spec, s=size, dim=dims)
        field_pad = torch.zeros(size, dtype=torch.float32, device=torch_device)
        field_pad[: field_t.shape[0], : field_t.shape[1], : field_t.shape[2]] = field_t
        misfit = torch.fft.irfftn(op.kernel * chi_spec, s=size, dim=dims) - field_pad
        grad_energy = torch.sum(chi_pad * torch.fft.irfftn(grad_sq * chi_spec, s=size, dim=dims))
        loss = float(0.5 * torch.sum(misfit ** 2) + 0.5 * lam * grad_energy)
        n0, n1, n2 = op.shape
        mask_t = torch.as_tensor(crop.mask, device=torch_device, dtype=torch.float32)
        chi_full = crop.paste((chi_pad[:n0, :n1, :n2] * mask_t).cpu().numpy())

    if callback is not None:
        callback(Progress(1, 1, loss, watch.elapsed_s, chi_full))
    return SolveResult(chi_ppm=chi_full, method="tikhonov", iterations=0, elapsed_s=watch.elapsed_s,
                       stop_reason="completed", loss_history=[loss], device=str(torch_device))
