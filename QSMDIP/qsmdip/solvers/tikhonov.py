"""Closed-form Tikhonov inversion with a gradient regulariser (one FFT division, no iterations).

Minimises, on the zero-padded FFT grid with the field set to zero outside the mask,

    0.5 ||D chi - M f||^2 + 0.5 lambda ||grad chi||^2,

whose minimiser is chi = F^-1[ D F(M f) / (D^2 + lambda |G|^2) ], |G|^2 being the Fourier symbol of the
periodic forward-difference gradient (``kernel.laplacian_kernel``, in 1/mm^2, so ``lambda_`` is in mm^2).
This is the closed-form L2 method of Bilgic et al. (JMRI 2014) with the gradient as regulariser. The
k = 0 term (where D and G both vanish) is set to 0: QSM leaves the mean undetermined.

With ``lambda_=None`` (the default) the weight is chosen per case from the field alone (never from a
reference map), over a log grid of :data:`LAMBDA_GRID_SIZE` weights from :data:`LAMBDA_MIN` to
:data:`LAMBDA_MAX` mm^2: every third weight is scored, then the grid weights next to the best one, and a
parabola through the best and its neighbours refines it. The field's spectrum is computed once and every
weight is scored from it (the filter is diagonal in k-space). Rules (``weight_rule``):

- ``"gcv_mask"`` (default): generalised cross-validation of the data inside the mask,
  ``||M r||^2 / (1 - tr(A)/N)^2``, with r the residual D chi - M f of the weight, A the diagonal influence
  D^2 / (D^2 + lambda |G|^2) and N the padded grid size (for a shift-invariant A every diagonal entry is
  tr(A)/N, so the trace over the mask's voxels is n_mask tr(A)/N). One inverse FFT per weight.
- ``"gcv"``: classical GCV over the whole padded grid, ``||r||^2 / (N - tr A)^2``, analytic in k-space
  (no FFT per weight). It also scores the zeros outside the mask as data.
- ``"lcurve"``: the corner of the L-curve, the maximum curvature of (log ||r||^2, log ||grad chi||^2)
  with analytic derivatives in log lambda (no FFT per weight).

``benchmarks/tikhonov_weight.py`` compares them with the best weight of a sweep against the truth
(``docs/results/tikhonov-weight.md``): ``gcv_mask`` came within 1.5 % of that oracle's NRMSE on the
realistic phantom (2 and 3 mm, axial and tilted B0) and the tilted simple one, ``gcv`` within 6 %, the
L-curve 32 to 49 % above it. All miss on the axial simple phantom (``gcv_mask`` 2.0x at 2 mm): there a
few of the lowest frequencies lie next to the dipole cone (D = 0.0027 at 2 mm), and the error they carry
is invisible to any fit of the data (see the results file).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from ..device import resolve_device
from ..errors import QSMInputError
from ..geometry import SUPERIOR, check_voxel_size
from ..kernel import laplacian_kernel
from ..operator import DipoleOperator
from .base import Callback, check_magnitude, Progress, SolveResult, Stopwatch, check_inputs, crop_to_mask

log = logging.getLogger("qsmdip")

#: Rules of the automatic weight (``TikhonovSettings.weight_rule``) and how the log names them.
WEIGHT_RULES: Dict[str, str] = {
    "gcv_mask": "generalised cross-validation in the mask",
    "gcv": "generalised cross-validation",
    "lcurve": "the L-curve",
}
#: The log grid the automatic weight is chosen from (mm^2).
LAMBDA_MIN = 1e-4
LAMBDA_MAX = 1.0
LAMBDA_GRID_SIZE = 30


@dataclass
class TikhonovSettings:
    """Settings of closed-form Tikhonov inversion.

    Attributes:
        lambda_: weight of the squared-gradient regulariser, mm^2 (> 0), or None to choose it per case
            from the field by ``weight_rule`` (default). Larger values smooth more and shrink chi towards
            0. The best fixed weight depends on the data: on the head phantom at SNR 200 a sweep picked
            0.03 for 2 mm with axial B0 and 1e-3 for 1 mm or an oblique B0
            (``benchmarks/benchmark.py``), hence the automatic choice.
        weight_rule: how ``lambda_=None`` chooses the weight: ``"gcv_mask"``, ``"gcv"`` or ``"lcurve"``
            (see the module docstring); ignored when ``lambda_`` is given.
        pad_factor: FFT grid = pad_factor x the mask's bounding box (>= 1; 2 avoids wrap-around).
    """

    lambda_: Optional[float] = None
    weight_rule: str = "gcv_mask"
    pad_factor: float = 2.0

    def __post_init__(self) -> None:
        if self.lambda_ is not None:
            try:
                value = float(self.lambda_)
            except (TypeError, ValueError):
                value = math.nan
            if not (value > 0.0 and np.isfinite(value)):
                raise QSMInputError(f"Tikhonov lambda_ must be a positive number, or None to choose it "
                                    f"automatically, got {self.lambda_!r}")
        if self.weight_rule not in WEIGHT_RULES:
            raise QSMInputError(f"Tikhonov weight_rule must be one of {', '.join(WEIGHT_RULES)}, "
                                f"got {self.weight_rule!r}")
        if not (float(self.pad_factor) >= 1.0):
            raise QSMInputError(f"pad_factor must be >= 1, got {self.pad_factor}")


def lambda_grid() -> np.ndarray:
    """The weights the automatic choice scores (mm^2, increasing)."""
    return np.logspace(math.log10(LAMBDA_MIN), math.log10(LAMBDA_MAX), LAMBDA_GRID_SIZE)


def _half_spectrum_weights(size: Sequence[int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """How many full-spectrum entries each rfftn entry stands for (1 or 2); 0 at k = 0 (the mean)."""
    n_last = int(size[-1])
    w = torch.full((n_last // 2 + 1,), 2.0, dtype=dtype, device=device)
    w[0] = 1.0
    if n_last % 2 == 0:
        w[-1] = 1.0
    w = w.expand(int(size[0]), int(size[1]), -1).clone()
    w[0, 0, 0] = 0.0
    return w


def _refine(log_lams: np.ndarray, scores: np.ndarray, best: int) -> float:
    """log lambda at the vertex of the parabola through the best score and its neighbours (a minimum)."""
    if best == 0 or best == len(scores) - 1:
        return float(log_lams[best])
    x, y = log_lams[best - 1: best + 2], scores[best - 1: best + 2]
    if not np.all(np.isfinite(y)):
        return float(log_lams[best])
    a, b, _ = np.polyfit(x - x[1], y, 2)
    if not a > 0:
        return float(log_lams[best])
    return float(np.clip(x[1] - b / (2.0 * a), x[0], x[2]))


def choose_lambda(field_spec: torch.Tensor, kernel: torch.Tensor, grad_sq: torch.Tensor, size: Sequence[int],
                  mask_box: torch.Tensor, rule: str) -> Tuple[float, Dict[float, float]]:
    """The weight ``rule`` picks for a field given by its padded half-spectrum, and the scores it computed.

    Scores are minimised (the L-curve's is minus the curvature). Every third weight of
    :func:`lambda_grid` is scored first, then the grid weights around the best one, then a parabola
    through the best and its neighbours in log lambda refines it. The choice depends on the field only up
    to its scale: a field c times larger multiplies every norm by c^2 and moves no minimiser.
    """
    if rule not in WEIGHT_RULES:
        raise QSMInputError(f"Tikhonov weight_rule must be one of {', '.join(WEIGHT_RULES)}, got {rule!r}")
    device, real = field_spec.device, field_spec.real.dtype
    acc = torch.float32 if device.type == "mps" else torch.float64  # sums accumulate in double (MPS has none)
    d2 = kernel.to(real) ** 2
    g2 = grad_sq.to(real)
    w = _half_spectrum_weights(size, device, real)
    power = w * (field_spec.real ** 2 + field_spec.imag ** 2)
    if not float(torch.sum(power)) > 0.0:  # no field left once the mean is removed: any weight gives chi = 0
        return math.sqrt(LAMBDA_MIN * LAMBDA_MAX), {}
    n_total = float(np.prod(size))
    shape = tuple(mask_box.shape)
    inside = mask_box > 0.5
    lams = lambda_grid()

    def score(lam: float) -> float:
        den = d2 + lam * g2
        den[0, 0, 0] = 1.0
        damp = lam * g2 / den  # 1 - filter: the share of the data this weight leaves unexplained
        if rule in ("gcv_mask", "gcv"):
            trace = float(torch.sum(w * d2 / den, dtype=acc))
            if rule == "gcv":
                misfit = float(torch.sum(power * damp ** 2, dtype=acc))
                return math.log(max(misfit, 1e-300)) - 2 * math.log(n_total - trace)
            resid = torch.fft.irfftn(-damp * field_spec, s=tuple(size), dim=(-3, -2, -1))
            misfit = float(torch.sum(resid[: shape[0], : shape[1], : shape[2]][inside] ** 2, dtype=acc))
            return math.log(max(misfit, 1e-300)) - 2 * math.log(1.0 - trace / n_total)
        # L-curve: rho = ||r||^2 and eta = ||grad chi||^2 with their lambda-derivatives, then the
        # curvature of (x, y) = (log rho, log eta) as functions of t = log lambda
        rho = float(torch.sum(power * damp ** 2, dtype=acc))
        q = power * g2 * d2 / den ** 2
        eta = float(torch.sum(q, dtype=acc))
        eta1 = -2.0 * float(torch.sum(q * g2 / den, dtype=acc))
        eta2 = 6.0 * float(torch.sum(q * (g2 / den) ** 2, dtype=acc))
        if not (rho > 0.0 and eta > 0.0):
            return math.nan
        rho1, rho2 = -lam * eta1, -eta1 - lam * eta2
        x1, y1 = lam * rho1 / rho, lam * eta1 / eta
        x2 = x1 + lam ** 2 * rho2 / rho - x1 ** 2
        y2 = y1 + lam ** 2 * eta2 / eta - y1 ** 2
        return -(x1 * y2 - x2 * y1) / (x1 ** 2 + y1 ** 2) ** 1.5

    scores = np.full(len(lams), np.nan)

    def best_scored() -> int:
        return int(np.argmin(np.where(np.isfinite(scores), scores, np.inf)))

    for i in sorted(set(range(0, len(lams), 3)) | {len(lams) - 1}):
        scores[i] = score(float(lams[i]))
    todo = range(max(best_scored() - 2, 0), min(best_scored() + 3, len(lams)))
    while True:
        for i in todo:
            if np.isnan(scores[i]):
                scores[i] = score(float(lams[i]))
        best = best_scored()
        todo = [i for i in (best - 1, best + 1) if 0 <= i < len(lams) and np.isnan(scores[i])]
        if not todo:
            break
    chosen = float(np.exp(_refine(np.log(lams), scores, best)))
    return chosen, {float(lam): float(v) for lam, v in zip(lams, scores) if np.isfinite(v)}


def solve_tikhonov(field_ppm: np.ndarray, mask: np.ndarray, voxel_size_mm: Sequence[float], *,
                   b0_dir: Sequence[float] = SUPERIOR, settings: Optional[TikhonovSettings] = None,
                   callback: Optional[Callback] = None, callback_every: int = 10,
                   device: str = "auto", magnitude: Optional[np.ndarray] = None) -> SolveResult:
    """Susceptibility (ppm) by closed-form gradient-regularised least squares.

    Closed form: ``iterations`` is 0 and the callback, if given, is called once with the final map
    (iteration 1 of 1); its return value is ignored and ``callback_every`` is unused. The reported
    loss is the objective in the module docstring (data misfit plus regulariser, sums over the padded
    grid) at the minimiser, before the final masking. ``result.chosen`` holds the weight used
    (``lambda_``), how it was set (``lambda_rule``: the rule, or ``"given"``) and, when chosen, every
    grid weight's score (``lambda_scores``, lower is better); the choice is also logged at INFO.
    """
    settings = settings or TikhonovSettings()
    watch = Stopwatch()
    field32, mask_bool = check_inputs(field_ppm, mask)
    check_magnitude(magnitude, mask_bool)  # accepted for the common call shape; this method has no use for it
    voxel_size_mm = check_voxel_size(voxel_size_mm)
    torch_device, _ = resolve_device(device)
    crop = crop_to_mask(field32, mask_bool)

    with torch.no_grad():
        op = DipoleOperator(crop.field_ppm.shape, voxel_size_mm, b0_dir, pad_factor=settings.pad_factor,
                            device=torch_device, dtype=torch.float32)
        grad_sq = torch.as_tensor(laplacian_kernel(op.fft_shape, voxel_size_mm, half=True),
                                  dtype=torch.float32, device=torch_device)
        dims, size = (-3, -2, -1), op.fft_shape
        field_t = torch.as_tensor(crop.field_ppm, device=torch_device)
        field_spec = torch.fft.rfftn(field_t, s=size, dim=dims)
        mask_t = torch.as_tensor(crop.mask, device=torch_device, dtype=torch.float32)
        if settings.lambda_ is None:
            lam, scores = choose_lambda(field_spec, op.kernel, grad_sq, size, mask_t, settings.weight_rule)
            chosen = {"lambda_": lam, "lambda_rule": settings.weight_rule, "lambda_scores": scores}
            log.info("tikhonov: lambda %.3g chosen by %s (grid %g..%g mm^2, %d weights)%s", lam,
                     WEIGHT_RULES[settings.weight_rule], LAMBDA_MIN, LAMBDA_MAX, LAMBDA_GRID_SIZE,
                     "; at the grid's edge" if lam <= LAMBDA_MIN * 1.0001 or lam >= LAMBDA_MAX * 0.9999 else "")
        else:
            lam = float(settings.lambda_)
            chosen = {"lambda_": lam, "lambda_rule": "given"}
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
        chi_full = crop.paste((chi_pad[:n0, :n1, :n2] * mask_t).cpu().numpy())

    if callback is not None:
        callback(Progress(1, 1, loss, watch.elapsed_s, chi_full))
    return SolveResult(chi_ppm=chi_full, method="tikhonov", iterations=0, elapsed_s=watch.elapsed_s,
                       stop_reason="completed", loss_history=[loss], device=str(torch_device), chosen=chosen)
