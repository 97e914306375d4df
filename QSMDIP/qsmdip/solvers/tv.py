"""Total-variation dipole inversion by ADMM, in the manner of FANSI's linear solver.

Minimises, on the zero-padded FFT grid (M = the mask, zero in the padding),

    0.5 ||M (D chi - f)||^2 + alpha ||grad chi||_1        (isotropic TV: sum of per-voxel gradient norms)

with two splittings (Milovic et al., MRM 2018, "FANSI"): z = grad chi (penalty mu1) and v = D chi
(penalty mu2). Each iteration then has only closed-form steps:

    chi <- F^-1[ (mu1 G^H F(z - s) + mu2 D F(v - u)) / (mu1 |G|^2 + mu2 D^2) ]      (one FFT division)
    z   <- shrink(grad chi + s, alpha / mu1)                                       (isotropic soft-threshold)
    v   <- (M f + mu2 (D chi + u)) / (M + mu2)                                     (voxelwise data prox)
    s   <- s + grad chi - z,   u <- u + D chi - v                                  (scaled dual updates)

(written for the l2 data term, the default; with ``data_term`` "l1" or "huber" the data term is
sum |D chi - f| or the Huber function, and only the v-step changes: it becomes a voxelwise shrink.)

Gradients are forward differences with periodic boundaries over the padded grid (per mm). The field is
divided by its RMS inside the mask before the solve and chi is scaled back after it, so ``alpha`` is
free of the field's scale: the same weight suits a field in ppm of any strength (a weaker field, or
fewer echoes, needs no retuning). The mask keeps the data term to the voxels that hold a measured field;
outside it chi is shaped only by TV and by the field it induces inside the mask. The result is masked
before it is returned.

With ``alpha=None`` (the default) the weight is chosen per case from the data alone, by hold-out
cross-validation: a seeded 10 % of the mask voxels is left out of the data term, TV runs down a
decreasing grid of weights (each warm-started from the previous one), and the weight whose map best
predicts the field on the left-out voxels wins (refined by a parabola through its neighbours in
log alpha). The final map is then solved with all voxels, starting from that candidate's state.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import logging
import math
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..device import resolve_device
from ..errors import QSMInputError
from ..geometry import SUPERIOR, check_voxel_size
from ..kernel import laplacian_kernel
from ..operator import DipoleOperator
from .base import Callback, check_magnitude, Progress, SolveResult, Stopwatch, check_inputs, crop_to_mask
from .noise import huber_switch

_DIMS = (-3, -2, -1)
#: default ADMM penalty of the gradient splitting per unit of alpha (normalised field; see TVSettings.mu1)
MU1_PER_ALPHA = 3.0
#: data terms TV-ADMM can fit (TVSettings.data_term)
DATA_TERMS = ("l2", "l1", "huber")
#: where the final solve after an automatic weight choice starts (``TVSettings.final_start``)
FINAL_STARTS = ("cold", "warm")
log = logging.getLogger("qsmdip")


@dataclass
class TVSettings:
    """Settings of TV-ADMM.

    Attributes:
        alpha: TV weight relative to the field's RMS in the mask (> 0, in mm; scale-free, see the module
            docstring), or None to choose it per case by hold-out cross-validation (default). With the
            3 x alpha penalty the best fixed value of the 3 mm sweep was 0.0177 on the realistic phantom, and
            on the simple one the automatic choice (0.0011) beat every fixed value of 0.00625 to 0.05
            (``benchmarks/benchmark.py``); larger values give flatter, more cartoon-like maps.
        mu1: ADMM penalty of the gradient splitting (> 0, same units as alpha); None means
            ``MU1_PER_ALPHA`` * alpha. FANSI's 100 * alpha suits a field in ppm; on the RMS-normalised field
            here it made ADMM crawl (realistic 3 mm: 22.81 % against 22.61 %; simple: 11.69 against 7.72 %).
        mu2: ADMM penalty of the data splitting (> 0), 1 as in FANSI.
        iterations: iteration cap of the final solve (>= 1).
        tolerance: stop with 'converged' once ||chi_k - chi_(k-1)|| / ||chi_k|| inside the mask falls
            below it (>= 0; 0 runs all iterations).
        max_seconds: stop with 'time_limit' after this wall time (None: no limit).
        pad_factor: FFT grid = pad_factor x the mask's bounding box (>= 1). 1.5 is 3.7x faster than 2 on a
            2 mm brain and cost 0.8 % of NRMSE on the realistic 3 mm phantom (22.81 against 22.63 %);
            the chi that wraps around lies outside the mask, where the data term does not look.
        alpha_grid: relative weights tried by the automatic choice, largest first (steps of sqrt 2); the
            search stops once the held-out misfit has risen twice past its minimum.
        cv_iterations: ADMM iteration cap per candidate weight after the first, which is warm-started
            from its larger neighbour (>= 1; each also stops at ``tolerance``).
        holdout_fraction: share of the mask voxels the automatic choice leaves out (0 < f <= 0.5).
        seed: seeds the choice of left-out voxels (>= 0).
        alpha_factor: the automatic choice's weight is multiplied by this before the final solve (> 0; 1
            solves at the chosen weight). DIP's base uses it to start the network from a smoother map. It is
            not applied when the choice is the grid's smallest weight: the held-out misfit was still falling
            there, so the field is clean enough that TV's detail is signal, and smoothing it only loses it.
        data_term: "l2" (least squares, default: right for Gaussian noise) or "l1" (sum of absolute residuals,
            robust to a few grossly wrong voxels, such as the phase of dephased voxels in a bleed, which
            least squares spreads as streaks; Milovic et al., MRM 2021). With "l1" the hold-out choice scores
            the mean absolute held-out residual. Measured in ``docs/results/background-removal.md``. "huber"
            is quadratic for residuals below ``huber_delta`` and l1 above: the noise is fitted by least squares
            and the grossly wrong voxels are still discounted (single-step TV's default; hold-out scored as
            with "l1"; ``docs/phase-pipeline.md``, "A Huber data term").
        huber_delta: where the "huber" data term turns from quadratic to linear, relative to the field's RMS
            in the mask (> 0; the field is normalised by that RMS, so the threshold is scale-free). It is
            raised to 1.345 noise standard deviations where the field is that noisy (``noise.huber_switch``),
            so noise is never treated as outliers; ``result.chosen['huber_delta']`` is the value used.
        final_start: where the final solve after an automatic choice starts: "warm" (from the chosen
            candidate's ADMM state; default) or "cold" (from zero, as a solve at a given weight does). Warm
            gets nearer TV's minimiser; cold stops on the way there, which smooths the map further and can
            make it better: realistic 1 mm at 0.0073, 13.64 % warm (10 iterations) against 12.01 % cold (127
            iterations, at a higher objective), but on the simple phantom 7.08 % warm against 12.71 % cold
            (docs/dip-experiments.md, "TV's automatic weight at 1 mm").
    """

    alpha: Optional[float] = None
    mu1: Optional[float] = None
    mu2: float = 1.0
    iterations: int = 150
    tolerance: float = 1e-3
    max_seconds: Optional[float] = None
    pad_factor: float = 1.5
    alpha_grid: Tuple[float, ...] = (0.071, 0.05, 0.035, 0.025, 0.0177, 0.0125, 0.0088, 0.0063, 0.0044, 0.0031,
                                     0.0022, 0.0016, 0.0011)
    cv_iterations: int = 50
    holdout_fraction: float = 0.1
    seed: int = 0
    alpha_factor: float = 1.0
    data_term: str = "l2"
    final_start: str = "warm"
    huber_delta: float = 0.1

    def __post_init__(self) -> None:
        if self.final_start not in FINAL_STARTS:
            raise QSMInputError(f"TV final_start must be one of {', '.join(FINAL_STARTS)}, got {self.final_start!r}")
        if self.data_term not in DATA_TERMS:
            raise QSMInputError(f"TV data_term must be one of {', '.join(DATA_TERMS)}, got {self.data_term!r}")
        for name in (("alpha",) if self.alpha is not None else ()) + ("mu2", "alpha_factor", "huber_delta") + \
                (("mu1",) if self.mu1 is not None else ()):
            value = float(getattr(self, name))
            if not (value > 0.0 and np.isfinite(value)):
                raise QSMInputError(f"TV {name} must be a positive number, got {getattr(self, name)}")
        for name, minimum in (("iterations", 1), ("cv_iterations", 1), ("seed", 0)):
            value = getattr(self, name)
            if int(value) != value or value < minimum:
                raise QSMInputError(f"TV {name} must be a whole number >= {minimum}, got {value}")
        if not (float(self.tolerance) >= 0.0):
            raise QSMInputError(f"tolerance must be >= 0, got {self.tolerance}")
        if self.max_seconds is not None and not (float(self.max_seconds) > 0.0):
            raise QSMInputError(f"max_seconds must be positive or None, got {self.max_seconds}")
        if not (float(self.pad_factor) >= 1.0):
            raise QSMInputError(f"pad_factor must be >= 1, got {self.pad_factor}")
        grid = tuple(float(a) for a in np.ravel(self.alpha_grid))
        if len(grid) < 1 or not all(a > 0 and np.isfinite(a) for a in grid):
            raise QSMInputError(f"TV alpha_grid must hold positive weights, got {self.alpha_grid}")
        self.alpha_grid = tuple(sorted(grid, reverse=True))
        if not (0.0 < float(self.holdout_fraction) <= 0.5):
            raise QSMInputError(f"TV holdout_fraction must be in (0, 0.5], got {self.holdout_fraction}")

    def gradient_penalty(self, alpha: float) -> float:
        """mu1 as used for this alpha: the given value, or ``MU1_PER_ALPHA`` * alpha."""
        return float(self.mu1) if self.mu1 is not None else MU1_PER_ALPHA * float(alpha)


def _gradient(x: torch.Tensor, voxel_size_mm: Sequence[float]) -> torch.Tensor:
    """Periodic forward differences along i, j, k, stacked on a new first axis (per mm)."""
    return torch.stack([(torch.roll(x, -1, dims=a) - x) / h for a, h in enumerate(voxel_size_mm)])


def _gradient_adjoint(y: torch.Tensor, voxel_size_mm: Sequence[float]) -> torch.Tensor:
    """Adjoint of :func:`_gradient` (minus the backward-difference divergence)."""
    return sum((torch.roll(y[a], 1, dims=a) - y[a]) / h for a, h in enumerate(voxel_size_mm))


def _relative_change(new: torch.Tensor, old: torch.Tensor) -> float:
    """||new - old|| / ||new||: how much an iterate still moves (the convergence test of every solve here)."""
    return float(torch.linalg.vector_norm(new - old) / torch.clamp(torch.linalg.vector_norm(new), min=1e-12))


def _check_callback_every(callback_every: int) -> int:
    if int(callback_every) != callback_every or callback_every < 1:
        raise QSMInputError(f"callback_every must be a whole number >= 1, got {callback_every}")
    return int(callback_every)


@dataclass
class _State:
    """ADMM variables: the splittings z = grad chi, v = D chi and their scaled duals s, u."""

    z: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor
    u: torch.Tensor
    mu1: float

    def clone(self) -> "_State":
        return _State(self.z.clone(), self.s.clone(), self.v.clone(), self.u.clone(), self.mu1)


class _TVProblem:
    """The padded, normalised problem of one field and mask, solved by ADMM for any weight and data mask."""

    def __init__(self, field_box: np.ndarray, mask_box: np.ndarray, voxel_size_mm, b0_dir, pad_factor: float,
                 device: torch.device):
        self.voxel_size_mm = voxel_size_mm
        op = DipoleOperator(field_box.shape, voxel_size_mm, b0_dir, pad_factor=pad_factor,
                            device=device, dtype=torch.float32)
        self.size = op.fft_shape
        self.kernel = op.kernel
        self.grad_sq = torch.as_tensor(laplacian_kernel(self.size, voxel_size_mm, half=True),
                                       dtype=torch.float32, device=device)
        self.mask_box = torch.as_tensor(mask_box, device=device, dtype=torch.float32)
        self.mask_pad, self.field_pad = _pad_pair(self.mask_box, torch.as_tensor(field_box, device=device), self.size)
        self.box = tuple(slice(0, n) for n in mask_box.shape)

    def initial_state(self, mu1: float) -> _State:
        z = torch.zeros((3,) + tuple(self.size), dtype=torch.float32, device=self.field_pad.device)
        # start from D chi = f: the first chi is Tikhonov-like
        return _State(z, torch.zeros_like(z), self.field_pad.clone(), torch.zeros_like(self.field_pad), mu1)

    def run(self, state: _State, alpha: float, mu1: float, mu2: float, iterations: int, weight: torch.Tensor,
            on_iteration: Optional[Callable[[int, float, torch.Tensor], Optional[str]]] = None,
            track_loss: bool = True, data_term: str = "l2", huber_delta: float = 0.1):
        """Run up to ``iterations`` ADMM steps from ``state`` (changed in place); ``weight`` is the data mask.

        ``on_iteration(iteration, loss, chi_box)`` may return a stop reason; ``loss`` is NaN unless
        ``track_loss`` (the objective costs a pass over the padded grid that the weight search does not
        need). Returns (iterations done, stop reason or None, chi on the box, D chi on the padded grid).
        ``data_term`` "l1" fits sum(weight |D chi - f|) instead of 0.5 sum((weight (D chi - f))^2): the split
        variable's update is then a soft threshold of the residual (weight / mu2), not a weighted mean;
        "huber" fits sum(weight H(D chi - f)) with H(r) = r^2 / (2 delta) up to ``huber_delta`` and |r| - delta / 2
        beyond: the update shrinks small residuals by 1 / (1 + weight / (delta mu2)) and soft-thresholds large ones.

        The data term may be a stack: ``kernel`` (R, ...) with ``field_pad`` and ``weight`` (R, ...) fits
        the sum of R terms, each with its own kernel, field and mask (multi-radius single-step TV); then
        ``state.v``, ``state.u`` and the returned D chi are stacks too. The stack is walked one term at a
        time, which keeps each pass over the grid in cache (twice as fast as batched on 2 cores).
        """
        l1 = data_term in ("l1", "huber")
        delta = float(huber_delta) if data_term == "huber" else 0.0
        if state.mu1 != mu1:  # scaled duals are duals / mu1: rescale when the penalty changes
            state.s.mul_(state.mu1 / mu1)
            state.mu1 = mu1
        stacked = self.kernel.dim() == 4
        kernels = self.kernel if stacked else self.kernel[None]
        fields = self.field_pad if stacked else self.field_pad[None]
        weights = weight if stacked else weight[None]
        if weights.shape != fields.shape:
            raise ValueError(f"data weight {tuple(weight.shape)} does not match the field "
                             f"{tuple(self.field_pad.shape)}")
        voxel = self.voxel_size_mm
        inverse = 1.0 / (mu1 * self.grad_sq + mu2 * torch.sum(kernels ** 2, dim=0))
        inverse[0, 0, 0] = 0.0  # both terms vanish at k = 0: the mean is left at 0
        weighted_fields = None if l1 else weights * fields
        chi = None
        d_chis = torch.zeros_like(fields)
        reason = None
        iteration = 0
        for iteration in range(1, iterations + 1):
            v_terms, u_terms = (state.v, state.u) if stacked else (state.v[None], state.u[None])
            numerator = mu1 * torch.fft.rfftn(_gradient_adjoint(state.z - state.s, voxel), s=self.size, dim=_DIMS)
            for term, kernel in enumerate(kernels):
                numerator += mu2 * kernel * torch.fft.rfftn(v_terms[term] - u_terms[term], s=self.size, dim=_DIMS)
            chi_spec = numerator * inverse
            chi = torch.fft.irfftn(chi_spec, s=self.size, dim=_DIMS)

            grad = _gradient(chi, voxel)
            shifted = grad + state.s
            norm = torch.sqrt(torch.sum(shifted ** 2, dim=0))
            state.z = shifted * torch.clamp(1.0 - (alpha / mu1) / torch.clamp(norm, min=1e-12), min=0.0)
            state.s = shifted - state.z

            for term, kernel in enumerate(kernels):
                d_chis[term] = torch.fft.irfftn(kernel * chi_spec, s=self.size, dim=_DIMS)
                target = d_chis[term] + u_terms[term]
                if l1:  # where weight is 0 the threshold is 0 and v = target, as in the l2 update
                    residual = target - fields[term]
                    size = residual.abs()
                    shrunk = torch.clamp(size - weights[term] / mu2, min=0.0)
                    step = torch.sign(residual) * shrunk
                    if delta > 0:  # Huber: the quadratic part's prox below its (continuous) switch point
                        step = torch.where(size <= delta + weights[term] / mu2,
                                           residual / (1.0 + weights[term] / (delta * mu2)), step)
                    v_terms[term] = fields[term] + step
                else:
                    v_terms[term] = (weighted_fields[term] + mu2 * target) / (weights[term] + mu2)
                u_terms[term] = target - v_terms[term]
            if on_iteration is not None:
                loss = math.nan
                if track_loss:
                    tv_norm = torch.sum(torch.sqrt(torch.sum(grad ** 2, dim=0)))
                    if delta > 0:
                        size = (d_chis - fields).abs()
                        data = torch.sum(weights * torch.where(size <= delta, size ** 2 / (2 * delta), size - delta / 2))
                    else:
                        misfit = weights * (d_chis - fields)
                        data = torch.sum(misfit.abs()) if l1 else 0.5 * torch.sum(misfit ** 2)
                    loss = float(data + alpha * tv_norm)
                reason = on_iteration(iteration, loss, chi[self.box] * self.mask_box)
                if reason is not None:
                    break
        d_chi = d_chis if stacked else d_chis[0]
        return iteration, reason, chi[self.box] * self.mask_box, d_chi


@dataclass
class WeightChoice:
    """The automatic choice of a regularisation weight: the candidates, their scores and the winner."""

    chosen: float
    candidates: List[float]
    scores: List[float]          #: held-out misfit (mean squared, or mean absolute for l1 and huber; normalised field)
    rule: str = "holdout"


def choose_alpha(problem: _TVProblem, settings: TVSettings, device: torch.device,
                 on_candidate: Optional[Callable[[float, torch.Tensor], None]] = None,
                 cancelled: Optional[Callable[[], bool]] = None) -> Tuple[WeightChoice, Optional[_State]]:
    """Pick alpha by hold-out cross-validation down ``settings.alpha_grid`` (see the module docstring).

    Returns the choice and the ADMM state of the best candidate (a warm start for the final solve).
    ``on_candidate(alpha, chi_box)`` sees each candidate's map (benchmarks score it; the rule does not);
    ``cancelled()`` is asked at every iteration (time limit, cancel) and ends the search with what it has.
    """
    generator = torch.Generator(device="cpu").manual_seed(int(settings.seed))
    pick = torch.rand(tuple(problem.mask_box.shape), generator=generator).to(device) < settings.holdout_fraction
    held_box = (pick & (problem.mask_box > 0)).float()
    held, _ = _pad_pair(held_box, held_box, problem.size)
    fit_weight = problem.mask_pad * (1.0 - held)  # (a stacked data term's masks each lose the held voxels)
    n_held = float(held.sum())
    grid = list(settings.alpha_grid)
    if n_held < 64 or len(grid) == 1:
        return WeightChoice(grid[len(grid) // 2], grid, [], rule="fixed (too few voxels to hold out)"), None
    state = problem.initial_state(settings.gradient_penalty(grid[0]))
    scores: List[float] = []
    best_state, best_score = None, math.inf
    for index, alpha in enumerate(grid):
        previous = {"chi": None}

        def until_converged(iteration: int, loss: float, chi_box: torch.Tensor) -> Optional[str]:
            old, previous["chi"] = previous["chi"], chi_box
            if cancelled is not None and cancelled():
                return "stopped"
            if old is None:
                return None
            return "converged" if _relative_change(chi_box, old) < settings.tolerance else None

        # the first candidate starts cold; the others start from their larger neighbour's solution
        budget = int(settings.iterations) if index == 0 else int(settings.cv_iterations)
        _, _, chi_box, d_chi = problem.run(state, alpha, settings.gradient_penalty(alpha), float(settings.mu2),
                                            budget, fit_weight, until_converged, track_loss=False,
                                            data_term=settings.data_term, huber_delta=settings.huber_delta)
        residual = held * problem.mask_pad * (d_chi - problem.field_pad)
        score = float(torch.sum(residual.abs() if settings.data_term != "l2" else residual ** 2) / n_held)
        scores.append(score)
        if on_candidate is not None:
            on_candidate(alpha, chi_box)
        if score < best_score:
            best_score, best_state = score, state.clone()
        if cancelled is not None and cancelled():
            break
        if len(scores) >= 3 and min(scores[-2:]) > best_score:  # two rises past the minimum: it is behind us
            break
    best = int(np.argmin(scores))
    chosen = grid[best]
    if 0 < best < len(scores) - 1:  # parabola through the minimum and its neighbours, in log alpha
        x = np.log([grid[best - 1], grid[best], grid[best + 1]])
        y = np.asarray(scores[best - 1: best + 2])
        curvature = (y[0] - 2 * y[1] + y[2])
        if curvature > 0:
            step = 0.5 * (y[0] - y[2]) / curvature * (x[0] - x[1])
            chosen = float(np.exp(x[1] + np.clip(step, -abs(x[0] - x[1]), abs(x[0] - x[1]))))
    return WeightChoice(float(chosen), grid[: len(scores)], scores), best_state


def _final_alpha(chosen: float, settings: TVSettings) -> float:
    """The final solve's weight: the chosen one times ``alpha_factor``, unless it is the grid's smallest
    (the held-out misfit was still falling there: see ``TVSettings.alpha_factor``)."""
    return chosen if chosen <= min(settings.alpha_grid) else chosen * float(settings.alpha_factor)


def solve_tv(field_ppm: np.ndarray, mask: np.ndarray, voxel_size_mm: Sequence[float], *,
             b0_dir: Sequence[float] = SUPERIOR, settings: Optional[TVSettings] = None,
             callback: Optional[Callback] = None, callback_every: int = 10,
             device: str = "auto", magnitude: Optional[np.ndarray] = None) -> SolveResult:
    """Susceptibility (ppm) by TV-regularised, mask-weighted least squares (ADMM, float32 torch).

    The callback gets a :class:`Progress` every ``callback_every`` iterations and after the last one;
    returning True stops with stop_reason 'cancelled'. Other stop reasons: 'completed' (iteration cap),
    'converged' (``tolerance``), 'time_limit' (``max_seconds``). ``loss_history`` holds the objective
    of the module docstring (normalised field, sums over the padded grid) after each iteration. With
    ``settings.alpha`` None the weight is chosen first (logged; ``result.chosen['alpha']`` says which).
    ``magnitude`` is accepted for the common call shape and not used by TV.
    """
    settings = settings or TVSettings()
    every = _check_callback_every(callback_every)
    watch = Stopwatch(settings.max_seconds)
    field32, mask_bool = check_inputs(field_ppm, mask)
    check_magnitude(magnitude, mask_bool)
    voxel_size_mm = check_voxel_size(voxel_size_mm)
    torch_device, _ = resolve_device(device)
    crop = crop_to_mask(field32, mask_bool)
    scale = crop.field_scale()
    mu2 = float(settings.mu2)
    max_iterations = int(settings.iterations)
    chosen = {}
    if settings.data_term == "huber":  # the switch point, raised to the noise, for the search and the solve
        settings = dataclasses.replace(settings,
                                       huber_delta=huber_switch(settings.huber_delta, crop.field_ppm, crop.mask, scale))

    with torch.no_grad():
        problem = _TVProblem(crop.field_ppm / scale, crop.mask, voxel_size_mm, b0_dir, settings.pad_factor,
                             torch_device)
        state = None
        cancelled = False
        if settings.alpha is None:
            def show_candidate(candidate_alpha: float, chi_box: torch.Tensor) -> None:
                # each candidate's map reaches the callback as iteration 0: a preview, and a chance to cancel
                nonlocal cancelled
                if callback is not None and not cancelled:
                    preview = crop.paste((chi_box * scale).cpu().numpy())
                    cancelled = bool(callback(Progress(0, max_iterations, math.nan, watch.elapsed_s, preview)))

            choice, state = choose_alpha(problem, settings, torch_device, on_candidate=show_candidate,
                                         cancelled=lambda: cancelled or watch.expired())
            if settings.final_start == "cold":
                state = None
            alpha = _final_alpha(choice.chosen, settings)
            log.info("tv: alpha %.4g (relative to the field RMS) chosen by hold-out cross-validation over %s; "
                     "final solve at %.4g", choice.chosen, ", ".join(f"{a:g}" for a in choice.candidates), alpha)
            chosen = {"alpha": alpha, "alpha_rule": choice.rule, "alpha_chosen": choice.chosen,
                      "alpha_scores": dict(zip(choice.candidates, choice.scores))}
        else:
            alpha = float(settings.alpha)
            chosen = {"alpha": alpha, "alpha_rule": "given"}
        if settings.data_term == "huber":
            chosen["huber_delta"] = settings.huber_delta
        mu1 = settings.gradient_penalty(alpha)
        if state is None:
            state = problem.initial_state(mu1)
        losses: List[float] = []
        last = {"chi": torch.zeros_like(problem.mask_box), "reason": "cancelled" if cancelled else None}

        def on_iteration(iteration: int, loss: float, chi_box: torch.Tensor) -> Optional[str]:
            losses.append(loss)
            change = _relative_change(chi_box, last["chi"])
            last["chi"] = chi_box
            reason = None
            if change < settings.tolerance:
                reason = "converged"
            elif iteration == max_iterations:
                reason = "completed"
            elif watch.expired():
                reason = "time_limit"
            if callback is not None and (reason is not None or iteration % every == 0):
                progress = Progress(iteration, max_iterations, loss, watch.elapsed_s,
                                    crop.paste((chi_box * scale).cpu().numpy()))
                if callback(progress) and reason is None:
                    reason = "cancelled"
            return reason

        iteration = 0
        if not cancelled:
            iteration, reason, _, _ = problem.run(state, alpha, mu1, mu2, max_iterations, problem.mask_pad,
                                                  on_iteration, data_term=settings.data_term,
                                                  huber_delta=settings.huber_delta)
            last["reason"] = reason or "completed"
        chi_full = crop.paste((last["chi"] * scale).cpu().numpy())

    return SolveResult(chi_ppm=chi_full, method="tv", iterations=iteration, elapsed_s=watch.elapsed_s,
                       stop_reason=last["reason"], loss_history=losses, device=str(torch_device), chosen=chosen)


def _pad_pair(mask_box: torch.Tensor, field_box: torch.Tensor,
              size: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mask and field zero-padded to the FFT grid."""
    n0, n1, n2 = mask_box.shape
    weight = torch.zeros(tuple(size), dtype=torch.float32, device=mask_box.device)
    field_pad = torch.zeros_like(weight)
    weight[:n0, :n1, :n2] = mask_box
    field_pad[:n0, :n1, :n2] = field_box
    return weight, field_pad
