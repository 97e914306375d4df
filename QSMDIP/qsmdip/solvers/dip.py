"""Deep Image Prior dipole inversion: fit a 3D U-Net's output to the measured field.

We look for chi = mask * (chi_base + f_theta(z)) minimising

    data(mask * (D * chi - field)) + reg_weight * reg(chi)

over the network weights theta, with a fixed input z (Gaussian noise, the field, or the base). No
training data is involved: the network's structure is the prior, which favours smooth piecewise images
over the streaks that the dipole kernel's zero cone lets through.

By default ``chi_base`` is the library's own TV-ADMM estimate with a Huber data term, solved at 1.5x the
weight its hold-out search chose unless that is the search's smallest (a smoother start, from which the
network gains more), and the network, whose last layer starts at zero, learns a correction to it under a
Huber data fit (a hybrid, model-based DIP): TV supplies a good start within seconds, and the network then
restores the contrast and the cone-direction detail that TV flattens. The Huber loss is least squares for
the noise and linear for the few voxels whose measured field is grossly wrong (a bleed's dephased signal,
partial volumes at the brain's edge), which a least-squares fit would chase. Without a magnitude image, TV's
penalty at the base's chosen weight (in least-squares units) is added to the loss, which keeps the late fit
out of the noise. It lowers TV's NRMSE on both phantoms (simple 3 mm: 4.04 against 7.08 %; realistic 2 mm:
16.08 against 18.97 % for Huber TV; docs/dip-experiments.md). ``base="none"`` is the classical DIP from a random
start; the "original" preset is the published method. The field is divided by its RMS inside the mask
before fitting, so the network's output is of order one whatever the field strength, and the result is
scaled back to ppm.

Reference: Ulyanov, Vedaldi, Lempitsky, "Deep Image Prior", CVPR 2018; the original QSM-DIP settings
are kept as the "original" preset (see ``PRESETS``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..device import cpu_has_native_bf16, resolve_device
from ..errors import QSMInputError
from ..geometry import SUPERIOR, check_voxel_size, unit_vector
from ..networks import DECODER_ORDERS, UNet3d
from ..operator import DipoleOperator
from .base import Callback, check_magnitude, Progress, SolveResult, Stopwatch, check_inputs, crop_to_mask
from .noise import huber_switch
from .tv import DATA_TERMS as TV_DATA_TERMS

DATA_LOSSES = ("l1", "l2", "huber")
REGULARISERS = ("auto", "none", "laplacian", "tv")
#: TV-ADMM minimises 0.5 |r|^2 + alpha TV and this loss mean(r^2) + reg_weight TV, so TV's own weight would be
#: reg_weight = 2 alpha; the default penalty is half of it, reg_weight = alpha, which measured best (realistic
#: 2 mm, no magnitude: 19.18 % at alpha, 19.24 at alpha / 2, 19.65 at 2 alpha, 20.06 at 3 alpha;
#: docs/dip-experiments.md, "Half TV's weight, with the hold-out on")
TV_PENALTY_PER_ALPHA = 1.0
#: share of mask voxels kept out of the fit to stop on, unless the settings say otherwise
DEFAULT_HOLDOUT_FRACTION = 0.05
INPUT_MODES = ("noise", "field", "base")
BASES = ("none", "tikhonov", "tv")

log = logging.getLogger(__name__)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(float(value))


@dataclass
class DIPSettings:
    """Settings of :func:`solve_dip`; every field is checked on construction.

    The defaults are the "default" preset: the network corrects a Huber TV-ADMM estimate under a Huber data
    fit, plus TV's penalty when no magnitude is used (docs/dip-experiments.md says what each choice did to
    the benchmark figures). The original method's settings are the "original" preset.
    """

    #: maximum number of Adam steps (>= 1). 300: with the Huber loss the realistic fits still improved at 200
    #: (2 mm with the magnitude 14.76 -> 14.53 %, at 20 degrees 17.41 -> 16.80); the hold-out rule ends most
    #: runs without the magnitude before it (docs/dip-experiments.md, "A 300-iteration cap")
    iterations: int = 300
    learning_rate: float = 2e-3                #: Adam step size (> 0)
    betas: Tuple[float, float] = (0.9, 0.999)  #: Adam moment decays, each in [0, 1) (original: 0.5, 0.999)
    width: int = 16                            #: U-Net channels at full resolution (>= 1)
    depth: int = 3                             #: U-Net stride-2 downsamplings (>= 1)
    #: U-Net decoder: "conv-first" (halve the channels on the coarse grid, then upsample: 1.45x faster at 2 mm
    #: for the same map; docs/dip-experiments.md, "A cheaper decoder") or "upsample-first" (the original)
    decoder: str = "conv-first"
    input: str = "noise"                       #: network input: "noise" (fixed Gaussian), "field" or "base"
    noise_channels: int = 1                    #: channels of the noise input (>= 1; ignored for "field")
    #: "huber" (default: r^2 up to huber_delta, then linear: the noise is fitted by least squares and a few
    #: grossly wrong voxels, such as a bleed's dephased phase, count less), "l1" (mean |r|) or "l2" (mean r^2).
    #: With the Huber base, realistic 2 mm, 200 iterations: 16.13 % without the magnitude and 14.76 with it,
    #: against 19.18 and 17.36 for l2 on the l2 base (docs/dip-experiments.md, "A Huber loss for the network").
    #: On a local field with background-removal error (the phase pipeline's) it is worse: 71 against 57 % for l2
    #: on the Huber base, both behind TV (docs/phase-pipeline.md, "DIP from the phase")
    data_loss: str = "huber"
    #: where the "huber" loss, and the TV base's "huber" data term, turn linear, relative to the field's RMS in
    #: the mask (> 0); raised to 1.345 noise standard deviations where the field is that noisy (noise.py)
    huber_delta: float = 0.1
    #: "auto" (default: TV when no magnitude is used and the TV base gives its weight, else none), "none",
    #: "laplacian" (26-neighbour, L1) or "tv" (isotropic, per mm). Without the magnitude the network drifts into
    #: the noise late in the fit and the hold-out rule does not always catch it (realistic 2 mm, bf16: 20.70 %
    #: at 200 from 19.9 at 100); under the penalty it keeps improving (19.18 %). With the magnitude the
    #: penalty cost 1.2 points (2 mm: 18.55 against 17.33 %), so "auto" leaves it out there (a magnitude with
    #: both of its uses switched off counts as none; docs/dip-experiments.md)
    regulariser: str = "auto"
    #: weight of the regulariser (>= 0); None: TV_PENALTY_PER_ALPHA x the TV base's chosen alpha, so it follows
    #: the field's noise (a Laplacian penalty, or TV without the TV base, needs a number)
    reg_weight: Optional[float] = None
    seed: int = 0                              #: seeds the weights and the noise input (>= 0)
    #: autocast of the network (FFTs stay fp32): bf16 (fp16 without bf16) on CUDA, bf16 on a CPU with hardware bf16
    mixed_precision: bool = True
    max_seconds: Optional[float] = None        #: wall-time limit in seconds (> 0), None for none
    pad_factor: float = 2.0                    #: FFT zero-padding factor (>= 1; 2 avoids wrap-around)
    normalise: bool = True                     #: fit the field divided by its RMS in the mask (not in the original)
    base: str = "tv"                           #: "none", "tikhonov" or "tv": chi = classical estimate + network
    base_iterations: int = 150                 #: TV-ADMM iterations of the "tv" base (>= 1)
    base_alpha: Optional[float] = None         #: relative TV weight of the base; None: chosen from the data
    #: the chosen base weight times this (> 0; used when base_alpha is None): the network gains more from a
    #: smoother start than from TV's own best map (realistic 3 mm with the magnitude: 18.46 % at 1.5, 18.04 at
    #: 2, 19.32 at 1); not applied when TV's search ends at its smallest weight (a clean field, as the simple
    #: phantom's, where the factor cost 0.28 points)
    base_alpha_factor: float = 1.5
    #: data term of the "tv" base (TVSettings.data_term): "huber" (default), "l2" or "l1". Huber TV is the
    #: better start on both phantoms; under an l2 network loss it let the fit drift without the magnitude
    #: (docs/dip-experiments.md, "A Huber data term for TV"), under the Huber loss it does not
    base_data_term: str = "huber"
    input_jitter: float = 0.0                  #: std of fresh noise added to the noise input each step (>= 0)
    #: decay of an exponential moving average of the iterates, returned instead of the last one and judged by
    #: the hold-out rule (0 = off): it damps the step-to-step jitter of the larger learning rate
    ema: float = 0.9
    #: share of mask voxels kept out of the fit to stop on (0 = off); it stays on under the penalty, which
    #: alone let a noisy fit drift past TV (SNR 7 ellipsoids: 11.96 % against TV's 7.42, 7.56 with the hold-out)
    holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION
    holdout_rise: float = 0.1                  #: stop once the held-out misfit is this much above its minimum
    magnitude_input: bool = True               #: given a magnitude, feed it to the network as an extra channel
    magnitude_weighting: bool = True           #: given a magnitude, weight the data term by magnitude^2 (noise model)

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> QSMInputError:
            return QSMInputError(f"DIP setting {name}={getattr(self, name)!r} is invalid: {rule}")

        for name, minimum in (("iterations", 1), ("width", 1), ("depth", 1), ("noise_channels", 1), ("seed", 0),
                              ("base_iterations", 1)):
            value = getattr(self, name)
            if not _is_int(value) or value < minimum:
                raise bad(name, f"must be an integer >= {minimum}")
        if not _is_number(self.learning_rate) or self.learning_rate <= 0:
            raise bad("learning_rate", "must be a positive number")
        betas = tuple(self.betas) if isinstance(self.betas, (tuple, list)) else ()
        if len(betas) != 2 or not all(_is_number(b) and 0 <= b < 1 for b in betas):
            raise bad("betas", "must be two numbers in [0, 1)")
        self.betas = (float(betas[0]), float(betas[1]))
        for name, choices in (("input", INPUT_MODES), ("data_loss", DATA_LOSSES),
                              ("regulariser", REGULARISERS), ("base", BASES), ("decoder", DECODER_ORDERS),
                              ("base_data_term", TV_DATA_TERMS)):
            if getattr(self, name) not in choices:
                raise bad(name, f"must be one of {', '.join(choices)}")
        if self.reg_weight is not None and (not _is_number(self.reg_weight) or self.reg_weight < 0):
            raise bad("reg_weight", "must be a number >= 0, or None for TV's own weight")
        if self.regulariser == "laplacian" and self.reg_weight is None:
            raise bad("reg_weight", "a Laplacian penalty needs a number")
        if self.regulariser == "tv" and self.reg_weight is None and self.base != "tv":
            raise bad("reg_weight", "a TV penalty without the TV base needs a number (the base chooses it)")
        if not isinstance(self.mixed_precision, bool):
            raise bad("mixed_precision", "must be True or False")
        if not isinstance(self.normalise, bool):
            raise bad("normalise", "must be True or False")
        for name in ("magnitude_input", "magnitude_weighting"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be True or False")
        if self.max_seconds is not None and (not _is_number(self.max_seconds) or self.max_seconds <= 0):
            raise bad("max_seconds", "must be a positive number of seconds or None")
        if not _is_number(self.huber_delta) or self.huber_delta <= 0:
            raise bad("huber_delta", "must be a positive number (relative to the field's RMS)")
        if not _is_number(self.pad_factor) or self.pad_factor < 1:
            raise bad("pad_factor", "must be a number >= 1")
        if self.base_alpha is not None and (not _is_number(self.base_alpha) or self.base_alpha <= 0):
            raise bad("base_alpha", "must be a positive number or None")
        if not _is_number(self.base_alpha_factor) or self.base_alpha_factor <= 0:
            raise bad("base_alpha_factor", "must be a positive number")
        if not _is_number(self.input_jitter) or self.input_jitter < 0:
            raise bad("input_jitter", "must be a number >= 0")
        if self.input == "base" and self.base == "none":
            raise bad("input", "'base' needs a base estimate (base 'tikhonov' or 'tv')")
        if not _is_number(self.ema) or not 0 <= self.ema < 1:
            raise bad("ema", "must be a number in [0, 1)")
        if not _is_number(self.holdout_fraction) or not 0 <= self.holdout_fraction <= 0.5:
            raise bad("holdout_fraction", "must be a number in [0, 0.5]")
        if not _is_number(self.holdout_rise) or self.holdout_rise <= 0:
            raise bad("holdout_rise", "must be a positive number (a relative rise, 0.1 = 10 %)")


#: Named settings. "default" is the best we measured (docs/dip-experiments.md); "fast" halves the network
#: width and stops at 200 iterations for a few minutes on a laptop CPU; "original" is the published QSM-DIP
#: configuration (its code fed the field as the input, did not normalise it, and ran 500 iterations of Adam
#: with betas 0.5, 0.999).
PRESETS: Dict[str, DIPSettings] = {
    "default": DIPSettings(),
    "fast": DIPSettings(width=8, iterations=200),
    "original": DIPSettings(iterations=500, learning_rate=1e-3, betas=(0.5, 0.999), width=16, depth=3,
                            input="field", data_loss="l1", regulariser="laplacian", reg_weight=1e-3,
                            normalise=False, base="none", mixed_precision=False, holdout_fraction=0.0, ema=0.0,
                            decoder="upsample-first"),
}


def dip_settings(preset: str = "default", **overrides: object) -> DIPSettings:
    """The settings of a named preset with some fields replaced, e.g. ``dip_settings("fast", seed=3)``."""
    if preset not in PRESETS:
        raise QSMInputError(f"unknown DIP preset {preset!r}: use one of {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(DIPSettings)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise QSMInputError(f"unknown DIP setting {unknown[0]!r}: valid ones are {', '.join(sorted(fields))}")
    return dataclasses.replace(PRESETS[preset], **overrides)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Regularisers, on the normalised chi (the Laplacian in units of the smallest voxel side, TV per mm),
# evaluated inside the mask eroded by one voxel so that the jump to zero at the mask's edge, which the
# output mask imposes, is not penalised.

def _neighbour_weights(voxel_size_mm: Sequence[float]) -> torch.Tensor:
    """3x3x3 stencil of the distance-weighted 26-neighbour Laplacian: w = 1/distance, centre = -sum w.

    Distances are in units of the smallest voxel side, so isotropic voxels give 1, 1/sqrt2, 1/sqrt3.
    """
    h = np.asarray(voxel_size_mm, dtype=np.float64) / min(voxel_size_mm)
    offsets = np.stack(np.meshgrid(*[np.array([-1.0, 0.0, 1.0])] * 3, indexing="ij"), axis=-1)
    dist = np.sqrt(((offsets * h) ** 2).sum(-1))
    with np.errstate(divide="ignore"):
        w = np.where(dist > 0, 1.0 / dist, 0.0)
    w[1, 1, 1] = -w.sum()
    return torch.as_tensor(w, dtype=torch.float32).reshape(1, 1, 3, 3, 3)


def _interior(mask: torch.Tensor) -> torch.Tensor:
    """Mask voxels whose 26 neighbours are all in the mask (binary erosion by a 3x3x3 cube)."""
    m = mask.float()[None, None]
    eroded = -F.max_pool3d(-m, kernel_size=3, stride=1, padding=1)
    return eroded[0, 0] > 0.5


class _Regulariser:
    """The chosen penalty, as a callable on a (i, j, k) float32 tensor."""

    def __init__(self, kind: str, mask: torch.Tensor, voxel_size_mm: Sequence[float]):
        self.kind = kind
        self.region = _interior(mask)
        if not bool(self.region.any()):
            self.region = mask
        self.count = float(self.region.sum())
        self.stencil = _neighbour_weights(voxel_size_mm).to(mask.device)
        self.voxel_size_mm = tuple(float(h) for h in voxel_size_mm)

    def __call__(self, chi: torch.Tensor) -> torch.Tensor:
        if self.kind == "laplacian":
            lap = F.conv3d(chi[None, None], self.stencil, padding=1)[0, 0]
            return (lap.abs() * self.region).sum() / self.count
        if self.kind == "tv":
            squared = chi.new_zeros(chi.shape)
            for axis, h in enumerate(self.voxel_size_mm):
                diff = torch.diff(chi, dim=axis, append=chi.narrow(axis, chi.shape[axis] - 1, 1)) / h
                squared = squared + diff.square()
            return (torch.sqrt(squared + 1e-12) * self.region).sum() / self.count
        return chi.new_zeros(())


# --------------------------------------------------------------------------------------------------

class _HoldoutStop:
    """Early stopping on mask voxels the fit never sees: no ground truth, only the measured field.

    A random ``fraction`` of the mask is left out of the data loss. While the network learns the
    susceptibility, the field it predicts there improves and then levels off at the noise floor (most of
    what DIP adds later lies near the dipole's zero cone, which the field barely shows, so a plateau is no
    reason to stop). Once the network starts fitting the noise of the other voxels, the held-out misfit
    rises: when its smoothed value is ``rise`` above its minimum we stop and return the estimate at the
    minimum.
    """

    MIN_VOXELS = 64      #: fewer held-out voxels than this give too noisy a signal: the rule is then off
    SMOOTHING = 0.9      #: decay of the exponential average of the per-iteration held-out misfit

    def __init__(self, mask: torch.Tensor, fraction: float, rise: float, generator: torch.Generator,
                 misfit: Callable[[torch.Tensor], torch.Tensor] = torch.square):
        self.misfit = misfit
        pick = torch.rand(tuple(mask.shape), generator=generator).to(mask.device) < fraction
        held = (pick & mask).float()
        self.active = fraction > 0 and float(held.sum()) >= self.MIN_VOXELS
        self.held = held if self.active else torch.zeros_like(held)
        self.fit = mask.float() - self.held
        self.rise = rise
        self.smoothed: Optional[float] = None
        self.best = math.inf
        self.best_estimate: Optional[torch.Tensor] = None

    def update(self, residual: torch.Tensor, estimate: torch.Tensor) -> bool:
        """Record this iteration's residual and estimate; True when the held-out misfit has risen."""
        value = float(self.misfit(residual).mul(self.held).sum() / self.held.sum())
        self.smoothed = value if self.smoothed is None else \
            self.SMOOTHING * self.smoothed + (1 - self.SMOOTHING) * value
        if self.smoothed < self.best:
            self.best = self.smoothed
            self.best_estimate = estimate.clone()
        return self.smoothed > (1 + self.rise) * self.best


def _autocast_dtype(mixed_precision: bool, device: torch.device) -> Tuple[bool, torch.dtype]:
    """Whether to autocast the network, and to what: bf16 where the hardware has it, fp16 on older GPUs."""
    if not mixed_precision:
        return False, torch.float32
    if device.type == "cuda":
        return True, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return True, torch.bfloat16
    return False, torch.float32


def _device_label(device: torch.device) -> str:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)


def _base_estimate(settings: DIPSettings, field32: np.ndarray, mask: np.ndarray, voxel_size: Sequence[float],
                   b0: Sequence[float], device: str, callback: Optional[Callback], callback_every: int,
                   max_iterations: int) -> Tuple[np.ndarray, Optional[float], Optional[float], bool]:
    """The classical estimate (ppm, full volume) the network corrects, TV's chosen weight (before the
    smoothing factor; None for Tikhonov), the Huber switch point TV used (None unless its data term is
    Huber) and whether the user cancelled.

    It is the library's own Tikhonov or TV-ADMM solver, each with its weight chosen from the data. Its
    progress reaches the callback as iteration 0 of the DIP run, so a caller sees the base map early and can
    cancel during it.
    """
    from .tikhonov import solve_tikhonov
    from .tv import TVSettings, solve_tv

    cancelled = False

    def forward(progress: Progress) -> bool:
        nonlocal cancelled
        cancelled = bool(callback(dataclasses.replace(progress, iteration=0, max_iterations=max_iterations)))
        return cancelled

    if settings.base == "tikhonov":
        result = solve_tikhonov(field32, mask, voxel_size, b0_dir=b0, device=device)
        return result.chi_ppm, None, None, cancelled
    tv_settings = TVSettings(alpha=settings.base_alpha, iterations=settings.base_iterations,
                             max_seconds=settings.max_seconds, alpha_factor=settings.base_alpha_factor,
                             data_term=settings.base_data_term, huber_delta=settings.huber_delta)
    result = solve_tv(field32, mask, voxel_size, b0_dir=b0, settings=tv_settings, device=device,
                      callback=forward if callback is not None else None, callback_every=callback_every)
    alpha = result.chosen.get("alpha_chosen", settings.base_alpha)  # none yet if cancelled during the search
    delta = result.chosen.get("huber_delta")
    return result.chi_ppm, None if alpha is None else float(alpha), delta, cancelled


def _penalty(settings: DIPSettings, base_alpha: Optional[float], base_delta: Optional[float],
             has_magnitude: bool) -> Tuple[str, float]:
    """The regulariser and its weight this run uses (what "auto" and a reg_weight of None resolve to).

    A Huber TV base's alpha weighs TV against H(r) = r^2 / (2 delta) for small residuals, so it is 1 / delta
    times the weight TV would have against 0.5 r^2: it is scaled back by the base's delta (``base_delta``)
    before it sets the penalty, which is calibrated on least-squares TV's alpha.
    """
    kind = settings.regulariser
    if kind == "auto":
        kind = "tv" if not has_magnitude and (settings.reg_weight is not None or base_alpha is not None) else "none"
    weight = 0.0
    if kind != "none":
        if settings.reg_weight is not None:
            weight = float(settings.reg_weight)
        else:
            least_squares_alpha = base_alpha * (base_delta if base_delta is not None else 1.0)
            weight = TV_PENALTY_PER_ALPHA * least_squares_alpha
    return kind, weight


def _pointwise_loss(residual: torch.Tensor, kind: str, delta: float) -> torch.Tensor:
    """The data loss of each residual: |r|, r^2, or Huber's r^2 up to delta and 2 delta |r| - delta^2 beyond
    (continuous with its slope, and equal to r^2 where the noise lives, so penalty weights carry over)."""
    if kind == "l1":
        return residual.abs()
    if kind == "huber":
        size = residual.abs()
        return torch.where(size <= delta, size.square(), 2 * delta * size - delta * delta)
    return residual.square()


def solve_dip(field_ppm: np.ndarray, mask: np.ndarray, voxel_size_mm: Sequence[float], *,
              b0_dir: Sequence[float] = SUPERIOR, settings: Optional[DIPSettings] = None,
              callback: Optional[Callback] = None, callback_every: int = 10,
              device: str = "auto", magnitude: Optional[np.ndarray] = None) -> SolveResult:
    """Susceptibility (ppm) by Deep Image Prior; see the module docstring for the objective.

    The fit runs on the mask's bounding box. The result is reproducible bit for bit on the CPU for the
    same ``settings.seed`` (weights and noise come from a private generator; the global RNG is left
    alone). The estimate is the moving average of the iterates when ``settings.ema`` > 0, else the last
    iterate. Stops after ``settings.iterations`` ("completed"), when the estimate's misfit on held-out mask
    voxels has risen by ``settings.holdout_rise`` above its minimum ("holdout", see :class:`_HoldoutStop`;
    the result is then the estimate at that minimum), at ``settings.max_seconds`` ("time_limit") or when
    ``callback`` returns True ("cancelled"). The loss reported is the objective on the normalised field,
    over the fitted voxels.
    """
    settings = settings if settings is not None else dip_settings("default")
    if not isinstance(settings, DIPSettings):
        raise QSMInputError(f"settings must be a DIPSettings, got {type(settings).__name__}")
    if not _is_int(callback_every) or callback_every < 1:
        raise QSMInputError(f"callback_every must be an integer >= 1, got {callback_every!r}")
    field32, mask_bool = check_inputs(field_ppm, mask)
    magnitude32 = check_magnitude(magnitude, mask_bool)
    voxel_size = check_voxel_size(voxel_size_mm)
    b0 = unit_vector(b0_dir)
    torch_device, _ = resolve_device(device)
    clock = Stopwatch(settings.max_seconds)

    base_ppm, base_alpha, base_delta = None, None, None
    if settings.base != "none":
        base_ppm, base_alpha, base_delta, cancelled = _base_estimate(settings, field32, mask_bool, voxel_size, b0,
                                                         str(torch_device), callback, callback_every,
                                                         settings.iterations)
        if cancelled:
            return SolveResult(chi_ppm=base_ppm, method="dip", iterations=0, elapsed_s=clock.elapsed_s,
                               stop_reason="cancelled", device=_device_label(torch_device))

    crop = crop_to_mask(field32, mask_bool)
    scale = 1.0
    if settings.normalise:
        scale = crop.field_scale()
    field_t = torch.as_tensor(crop.field_ppm / scale, dtype=torch.float32, device=torch_device)
    mask_t = torch.as_tensor(crop.mask, device=torch_device)
    maskf = mask_t.float()
    op = DipoleOperator(crop.field_ppm.shape, voxel_size, b0, pad_factor=settings.pad_factor, device=torch_device)
    magnitude_used = magnitude32 is not None and (settings.magnitude_input or settings.magnitude_weighting)
    reg_kind, reg_weight = _penalty(settings, base_alpha, base_delta, magnitude_used)
    holdout_fraction = float(settings.holdout_fraction)
    chosen = {"regulariser": reg_kind, "reg_weight": reg_weight, "holdout_fraction": holdout_fraction}
    if base_delta is not None:
        chosen["base_huber_delta"] = base_delta
    if base_alpha is not None:
        chosen["base_alpha_chosen"] = base_alpha
    log.info("dip: penalty %s, weight %.4g; hold-out share %.3g", reg_kind, reg_weight, holdout_fraction)
    regulariser = _Regulariser(reg_kind, mask_t, voxel_size)
    base = (torch.as_tensor(base_ppm[crop.box] / scale, dtype=torch.float32, device=torch_device)
            if base_ppm is not None else torch.zeros_like(field_t))

    generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    in_channels = settings.noise_channels if settings.input == "noise" else 1
    use_magnitude = magnitude32 is not None and settings.magnitude_input
    net = UNet3d(in_channels + int(use_magnitude), 1, width=settings.width, depth=settings.depth,
                 decoder=settings.decoder)
    net.reset_parameters(generator)
    if settings.base != "none":
        torch.nn.init.zeros_(net.head.weight)  # start the fit from the base estimate itself
    net.to(torch_device)
    if settings.input == "field":
        net_input = field_t[None, None].clone()
    elif settings.input == "base":
        net_input = base[None, None].clone()
    else:
        noise = torch.randn((1, in_channels) + crop.field_ppm.shape, generator=generator)
        net_input = noise.to(torch_device)
    if use_magnitude:
        # the anatomy as a second channel (mean 1 in the mask, 0 outside): edges the network can follow
        anatomy = torch.as_tensor(magnitude32[crop.box], dtype=torch.float32, device=torch_device)
        net_input = torch.cat([net_input, anatomy[None, None]], dim=1)
    jitter = settings.input_jitter if settings.input == "noise" else 0.0
    jitter_channels = in_channels  # never jitter the magnitude channel
    jitter_generator = torch.Generator(device=torch_device).manual_seed(settings.seed + 1) if jitter > 0 else None

    optimiser = torch.optim.Adam(net.parameters(), lr=settings.learning_rate, betas=settings.betas)
    use_amp, amp_dtype = _autocast_dtype(settings.mixed_precision, torch_device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    def network_output() -> torch.Tensor:
        ctx = torch.autocast(torch_device.type, dtype=amp_dtype) if use_amp else contextlib.nullcontext()
        x = net_input
        if jitter > 0:
            fresh = torch.zeros_like(x)
            fresh[:, :jitter_channels] = torch.randn(x[:, :jitter_channels].shape, generator=jitter_generator,
                                                     device=torch_device)
            x = x + jitter * fresh
        with ctx:
            out = net(x)
        return out[0, 0].float()

    def to_ppm(chi_norm: torch.Tensor) -> np.ndarray:
        return crop.paste((chi_norm.detach() * scale).cpu().numpy().astype(np.float32))

    delta = 0.0
    if settings.data_loss == "huber":
        # the switch point relative to the field's RMS, raised to the noise as TV's is (the Huber base already
        # did it on the same crop), then in the fitted field's units
        relative = base_delta if base_delta is not None else \
            huber_switch(settings.huber_delta, crop.field_ppm, crop.mask, crop.field_scale())
        chosen["huber_delta"] = relative
        delta = relative * (1.0 if settings.normalise else crop.field_scale())

    def data_misfit(residual: torch.Tensor) -> torch.Tensor:
        return _pointwise_loss(residual, settings.data_loss, delta)

    # the held-out voxels are judged by the fit's own loss, so a few gross outliers among them do not steer it
    holdout = _HoldoutStop(mask_t, holdout_fraction, settings.holdout_rise, generator, misfit=data_misfit)
    fit_mask, n_fit = holdout.fit, float(holdout.fit.sum())
    if magnitude32 is not None and settings.magnitude_weighting:
        # the field's noise variance goes as 1 / magnitude^2: scale each residual by the magnitude, so the
        # squared misfit is weighted by magnitude^2 (mean 1 over the fitted voxels), as MEDI's data term is
        weight = torch.as_tensor(magnitude32[crop.box], dtype=torch.float32, device=torch_device)
        weight = weight / torch.sqrt(torch.clamp((weight.square() * fit_mask).sum() / n_fit, min=1e-12))
        fit_mask = fit_mask * weight

    history = []
    stop_reason = "completed"
    estimate = base
    average: Optional[torch.Tensor] = None
    d_average: Optional[torch.Tensor] = None  # D applied to the average, kept as the same average of D chi
    iteration = 0
    loop_start = clock.elapsed_s
    for iteration in range(1, settings.iterations + 1):
        if iteration > 1 and clock.expired((clock.elapsed_s - loop_start) / (iteration - 1)):
            # the next iteration would end past the limit (its mean time, callbacks included): stop now
            iteration -= 1
            stop_reason = "time_limit"
            if callback is not None and iteration % callback_every != 0:
                callback(Progress(iteration, settings.iterations, history[-1], clock.elapsed_s, to_ppm(estimate)))
            break
        optimiser.zero_grad(set_to_none=True)
        chi = (base + network_output()) * maskf
        d_chi = op(chi)
        residual = (d_chi - field_t) * maskf
        fitted = residual * fit_mask
        data = data_misfit(fitted).sum()
        loss = data / n_fit
        if reg_kind != "none" and reg_weight > 0:
            loss = loss + reg_weight * regulariser(chi)
        scaler.scale(loss).backward()
        scaler.step(optimiser)
        scaler.update()

        value = float(loss.detach())
        history.append(value)
        if not math.isfinite(value):
            raise FloatingPointError(f"DIP loss became {value} at iteration {iteration}; lower the learning rate")
        held_residual = residual.detach()
        with torch.no_grad():
            current = chi.detach()
            if settings.ema > 0:
                average = current.clone() if average is None else average.mul_(settings.ema).add_(
                    current, alpha=1 - settings.ema)
                current = average
                if holdout.active:
                    # judge what would be returned: the averaged estimate's misfit on the held-out voxels.
                    # D is linear, so D(average) is the same average of the D chi already computed: no FFTs
                    d_now = d_chi.detach()
                    d_average = d_now.clone() if d_average is None else d_average.mul_(settings.ema).add_(
                        d_now, alpha=1 - settings.ema)
                    held_residual = (d_average - field_t) * maskf
            estimate = current
        if holdout.active and holdout.update(held_residual, estimate):
            stop_reason = "holdout"
            estimate = holdout.best_estimate
        elif clock.expired() and iteration < settings.iterations:
            stop_reason = "time_limit"
        last = iteration == settings.iterations or stop_reason != "completed"
        if callback is not None and (iteration % callback_every == 0 or last):
            progress = Progress(iteration, settings.iterations, value, clock.elapsed_s, to_ppm(estimate))
            if callback(progress):
                stop_reason = "cancelled"
                break
        if last:
            break

    return SolveResult(chi_ppm=to_ppm(estimate), method="dip", iterations=iteration, elapsed_s=clock.elapsed_s,
                       stop_reason=stop_reason, loss_history=history, chosen=chosen,
                       device=_device_label(torch_device) + (f" ({str(amp_dtype).split('.')[-1]} network)" if use_amp else ""))
