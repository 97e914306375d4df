"""Background-field removal (qsmdip.phase.background) against simulated truth.

The 4 mm head phantom gives the susceptibility inside the brain mask; strong sources outside it (air at
+9.4 ppm relative to tissue beyond a 10 mm tissue shell around the brain, and a sinus-like air sphere)
give the background. A uniform susceptibility inside the mask makes a field harmonic in the mask that no
method can tell from background, so the truth is the field of ``chi - mean_in_mask(chi)`` inside the mask,
and NRMSE (``qsmdip.metrics.nrmse``) demeans both fields in the mask it is evaluated in.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Tuple

import numpy as np
import pytest
import scipy.fft
import scipy.ndimage

from qsmdip.errors import QSMInputError
from qsmdip.geometry import SUPERIOR, unit_vector
from qsmdip.metrics import nrmse
from qsmdip.operator import forward_field
from qsmdip.phantom import make_head_phantom
from qsmdip.phase.background import (BACKGROUND_REMOVERS, BackgroundResult, PDFSettings, VSharpSettings,
                                     remove_background_pdf, remove_background_smv, remove_background_vsharp)
from qsmdip.phase.single_step import single_step_tv
from qsmdip.solvers import get_solver
from qsmdip.solvers.tv import TVSettings

AIR_PPM = 9.4          # air relative to tissue
SHELL_MM = 10.0        # tissue (scalp, skull) between the brain and the air around the head
SINUS_CENTRE_MM = (0.0, 45.0, -40.0)
SINUS_RADIUS_MM = 14.0


@dataclass
class Case:
    total: np.ndarray        # total field (ppm) everywhere
    truth: np.ndarray        # local field of the demeaned in-mask susceptibility (ppm)
    background: np.ndarray   # field of the sources outside the mask (ppm)
    mask: np.ndarray
    voxel_size_mm: Tuple[float, float, float]
    b0_dir: Tuple[float, float, float]


def _coordinates(shape, vs):
    return np.ix_(*[(np.arange(n) - (n - 1) / 2.0) * v for n, v in zip(shape, vs)])


def _sinus_ball(mask, vs):
    x, y, z = _coordinates(mask.shape, vs)
    c = SINUS_CENTRE_MM
    return (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 <= SINUS_RADIUS_MM ** 2


def _sphere_field(mask, vs, b0, chi_ppm, centre_mm, radius_mm):
    """Exact field (ppm) of a uniformly magnetised sphere outside it: chi/3 (a/r)^3 (3 cos^2 - 1)."""
    x, y, z = _coordinates(mask.shape, vs)
    b = unit_vector(b0)
    dx, dy, dz = x - centre_mm[0], y - centre_mm[1], z - centre_mm[2]
    r2 = dx * dx + dy * dy + dz * dz
    cos2 = (dx * b[0] + dy * b[1] + dz * b[2]) ** 2 / r2
    return np.where(r2 > radius_mm ** 2, chi_ppm / 3.0 * (radius_mm ** 2 / r2) ** 1.5 * (3.0 * cos2 - 1.0), 0.0)


def _head(vs, b0=SUPERIOR):
    ph = make_head_phantom(None, vs, b0_dir=b0)
    mask = ph.mask
    chi = ph.chi_ppm.astype(np.float64)
    truth = forward_field(np.where(mask, chi - chi[mask].mean(), 0.0), ph.voxel_size_mm, ph.b0_dir) * mask
    inside = forward_field(chi * mask, ph.voxel_size_mm, ph.b0_dir)
    return ph, mask, truth, inside


def _discrete_case(vs, b0=SUPERIOR) -> Case:
    """Air around the head and a sinus-like air ball, all through the discrete forward model."""
    ph, mask, truth, inside = _head(vs, b0)
    distance = scipy.ndimage.distance_transform_edt(~mask, sampling=ph.voxel_size_mm)
    air = (distance > SHELL_MM) | (_sinus_ball(mask, ph.voxel_size_mm) & (distance > 4.0))
    background = forward_field(np.where(air, AIR_PPM, 0.0), ph.voxel_size_mm, ph.b0_dir)
    return Case(inside + background, truth, background, mask, ph.voxel_size_mm, ph.b0_dir)


def _analytic_case(vs, b0) -> Case:
    """A sinus-like air ball with its exact (continuous) field: harmonic in the mask for any B0 direction.

    A discrete k-space dipole kernel with an oblique B0 is not symmetric across the Nyquist frequency, so
    the simulated field of huge discrete sources carries ringing that is not harmonic; a real background
    has none, so oblique cases use the exact field of a sphere instead.
    """
    ph, mask, truth, inside = _head(vs, b0)
    background = _sphere_field(mask, ph.voxel_size_mm, ph.b0_dir, AIR_PPM, SINUS_CENTRE_MM, SINUS_RADIUS_MM)
    assert not np.any(_sinus_ball(mask, ph.voxel_size_mm) & mask)
    return Case(inside + background, truth, background, mask, ph.voxel_size_mm, ph.b0_dir)


OBLIQUE = unit_vector((0.35, -0.2, 1.0))


@functools.lru_cache(maxsize=None)
def _case(kind: str, vs: Tuple[float, float, float], b0: Tuple[float, float, float]) -> Case:
    return (_discrete_case if kind == "discrete" else _analytic_case)(vs, b0)


@pytest.fixture(scope="module")
def head4() -> Case:
    return _case("discrete", (4.0, 4.0, 4.0), SUPERIOR)


def _run(method, case: Case, **kwargs) -> BackgroundResult:
    return BACKGROUND_REMOVERS[method](case.total, case.mask, case.voxel_size_mm, b0_dir=case.b0_dir, **kwargs)


# ------------------------------------------------------------------------------------ removal quality

# (background, voxel size, B0, method) -> NRMSE (%) limit, about 1.2 x what the current code measures. The
# discrete background flatters PDF (it fits with the very kernel that made the data) and handicaps V-SHARP
# (the grid's field of a 9.4 ppm step is not quite harmonic); the exact sphere field is fair to both.
QUALITY = [
    ("discrete", (4.0, 4.0, 4.0), SUPERIOR, "vsharp", 75.0),   # measured 64
    ("discrete", (4.0, 4.0, 4.0), SUPERIOR, "pdf", 55.0),      # 46
    ("analytic", (4.0, 4.0, 4.0), OBLIQUE, "vsharp", 45.0),    # 37
    ("analytic", (4.0, 4.0, 4.0), OBLIQUE, "pdf", 60.0),       # 51
    ("analytic", (3.0, 3.0, 6.0), SUPERIOR, "vsharp", 58.0),   # 48
    ("analytic", (3.0, 3.0, 6.0), SUPERIOR, "pdf", 54.0),      # 45
]


@pytest.mark.parametrize("kind, vs, b0, method, limit", QUALITY)
def test_background_is_removed(kind, vs, b0, method, limit):
    """Oblique B0 and anisotropic voxels included: the local field is close to the truth, the total is not."""
    case = _case(kind, vs, b0)
    result = _run(method, case)
    before = nrmse(case.total, case.truth, result.mask)
    after = nrmse(result.local_field_ppm, case.truth, result.mask)
    assert before > 250.0  # the background is several times the local field (50x for the discrete one)
    assert after < limit, f"{method}: NRMSE {after:.1f} %"


def test_result_shape_and_bookkeeping(head4):
    for method in ("vsharp", "pdf"):
        result = _run(method, head4)
        assert isinstance(result, BackgroundResult) and result.method == method
        assert result.local_field_ppm.dtype == np.float32 and result.local_field_ppm.shape == head4.mask.shape
        assert result.mask.dtype == bool and not np.any(result.mask & ~head4.mask)
        assert np.all(result.local_field_ppm[~result.mask] == 0.0)
        assert result.eroded_voxels == int(head4.mask.sum() - result.mask.sum())
        assert result.notes[0].startswith({"vsharp": "V-SHARP:", "pdf": "PDF:"}[method])


def _left_over(result: BackgroundResult, background: np.ndarray) -> float:
    m = result.mask
    background = background[m] - background[m].mean()
    left = result.local_field_ppm[m] - result.local_field_ppm[m].mean()
    return float(np.linalg.norm(left) / np.linalg.norm(background))


@pytest.mark.parametrize("kind, b0, method, limit", [
    ("discrete", SUPERIOR, "vsharp", 0.03), ("discrete", SUPERIOR, "pdf", 0.01),      # measured 0.010, 0.002
    ("analytic", OBLIQUE, "vsharp", 0.015), ("analytic", OBLIQUE, "pdf", 0.01),       # 0.005, 0.002
])
def test_external_sources_alone_leave_almost_no_local_field(kind, b0, method, limit):
    """No susceptibility inside the mask: whatever is left is error, a small fraction of the background."""
    case = _case(kind, (4.0, 4.0, 4.0), b0)
    result = BACKGROUND_REMOVERS[method](case.background, case.mask, case.voxel_size_mm, b0_dir=case.b0_dir)
    assert _left_over(result, case.background) < limit


def test_pdf_fits_along_the_given_b0():
    """A background made by the discrete dipole kernel along an oblique B0 is fitted ten times better along
    that B0 than along the scanner axis (the kernel's oblique Nyquist ringing is only in the right model)."""
    case = _case("discrete", (4.0, 4.0, 4.0), OBLIQUE)
    right = remove_background_pdf(case.background, case.mask, case.voxel_size_mm, b0_dir=OBLIQUE)
    wrong = remove_background_pdf(case.background, case.mask, case.voxel_size_mm, b0_dir=SUPERIOR)
    assert _left_over(right, case.background) < 0.2 * _left_over(wrong, case.background)


# ------------------------------------------------------------------------------------------ V-SHARP

def _ball(radius_mm, vs):
    reach = [int(np.floor(radius_mm / v)) for v in vs]
    x, y, z = np.ix_(*[np.arange(-g, g + 1) * v for g, v in zip(reach, vs)])
    return x * x + y * y + z * z <= radius_mm ** 2 * (1 + 1e-9)


@pytest.mark.parametrize("vs, min_radius_mm", [((4.0, 4.0, 4.0), None), ((4.0, 4.0, 4.0), 8.0),
                                               ((3.0, 3.0, 6.0), None)])
def test_vsharp_mask_is_eroded_by_the_smallest_ball(vs, min_radius_mm):
    """The valid mask is the input mask eroded by a ball of the smallest radius in mm (one coarsest voxel
    side by default), so anisotropic voxels erode fewer voxels along their fine axes."""
    ph = make_head_phantom(None, vs)
    result = remove_background_vsharp(ph.field_ppm, ph.mask, vs, settings=VSharpSettings(min_radius_mm=min_radius_mm))
    expected = scipy.ndimage.binary_erosion(ph.mask, _ball(min_radius_mm or max(vs), vs), border_value=0)
    assert np.array_equal(result.mask, expected)
    assert 0 < result.eroded_voxels < 0.6 * ph.mask.sum()
    assert f"{result.eroded_voxels} of {int(ph.mask.sum())}" in result.notes[0]


def test_vsharp_larger_smallest_radius_erodes_more_and_small_radii_keep_the_edge(head4):
    default = _run("vsharp", head4)
    sharp = _run("vsharp", head4, settings=VSharpSettings(min_radius_mm=12.0))  # one radius: plain SHARP
    assert sharp.eroded_voxels > 2 * default.eroded_voxels
    assert not np.any(sharp.mask & ~default.mask)


# ---------------------------------------------------------------------------------------------- PDF

def test_pdf_keeps_the_whole_mask(head4):
    result = _run("pdf", head4)
    assert result.eroded_voxels == 0 and np.array_equal(result.mask, head4.mask)


def test_pdf_weight_discounts_corrupted_voxels(head4):
    """Voxels whose field is garbage (e.g. a noisy edge) harm the fit unless their weight is low."""
    rng = np.random.default_rng(1)
    mask = head4.mask
    x, y, z = _coordinates(mask.shape, head4.voxel_size_mm)
    patch = mask & ((x - 40.0) ** 2 + (y + 10.0) ** 2 + (z - 20.0) ** 2 <= 20.0 ** 2)
    assert patch.sum() > 100
    corrupted = head4.total + np.where(patch, rng.normal(0.0, 0.5, mask.shape), 0.0)
    weight = np.where(patch, 1e-3, 1.0)
    unweighted = remove_background_pdf(corrupted, mask, head4.voxel_size_mm)
    weighted = remove_background_pdf(corrupted, mask, head4.voxel_size_mm, weight=weight)
    clean = mask & ~patch
    assert nrmse(weighted.local_field_ppm, head4.truth, clean) < 0.8 * nrmse(unweighted.local_field_ppm,
                                                                            head4.truth, clean)


def test_pdf_padding_changes_little(head4):
    """The fit and the subtraction share the circular operator, so a tight FFT grid costs little accuracy."""
    tight = _run("pdf", head4, settings=PDFSettings(pad_factor=1.0))
    exact = _run("pdf", head4, settings=PDFSettings(pad_factor=2.0))
    assert abs(nrmse(tight.local_field_ppm, head4.truth, head4.mask)
               - nrmse(exact.local_field_ppm, head4.truth, head4.mask)) < 5.0


# ------------------------------------------------------------------------- SMV high-pass, single step

def test_smv_high_pass_drops_the_background_and_its_filter_matches():
    """The high-passed total field equals the high-passed local field (``kspace_filter`` applied to the
    truth in k-space) in the mask eroded by the radius: the exact oblique sphere field leaves almost nothing."""
    case = _case("analytic", (4.0, 4.0, 4.0), OBLIQUE)
    radius = 8.0
    result = remove_background_smv(case.total, case.mask, case.voxel_size_mm, b0_dir=case.b0_dir, radius_mm=radius)
    expected_mask = scipy.ndimage.binary_erosion(case.mask, _ball(radius, case.voxel_size_mm), border_value=0)
    assert result.method == "smv" and np.array_equal(result.mask, expected_mask)
    assert result.eroded_voxels == int(case.mask.sum() - expected_mask.sum())
    shape = [2 * n for n in case.mask.shape]
    kfilter = result.kspace_filter(shape, case.voxel_size_mm)
    high_truth = scipy.fft.irfftn(scipy.fft.rfftn(np.where(case.mask, case.truth, 0.0), s=shape) * kfilter,
                                  s=shape)[tuple(slice(0, n) for n in case.mask.shape)]
    m = result.mask
    error = np.linalg.norm(result.local_field_ppm[m] - high_truth[m]) / np.linalg.norm(high_truth[m])
    background = remove_background_smv(case.background, case.mask, case.voxel_size_mm, radius_mm=radius)
    assert error < 0.05   # measured 0.01
    assert np.linalg.norm(background.local_field_ppm[m]) < 0.05 * np.linalg.norm(high_truth[m])
    assert "smv" not in BACKGROUND_REMOVERS  # not a drop-in local field: the inversion must use the filter


def test_single_step_tv_inverts_the_total_field():
    """Single-step TV on the total field (strong air background) gets within reach of TV on the true local
    field in the same mask, and the chi it returns lies in the eroded mask."""
    vs = (4.0, 4.0, 4.0)
    case = _case("analytic", vs, SUPERIOR)
    chi_true = make_head_phantom(None, vs).chi_ppm
    alpha = 0.01  # fixed for speed (the cross-validated weights are close)
    result = single_step_tv(case.total, case.mask, vs, b0_dir=case.b0_dir, radii_mm=(8.0,), alpha=alpha)
    assert np.all(result.chi_ppm[~result.mask] == 0.0) and not np.any(result.mask & ~case.mask)
    reference = get_solver("tv")(np.where(result.mask, case.truth, 0.0), result.mask, vs, b0_dir=case.b0_dir,
                                 settings=TVSettings(alpha=alpha)).chi_ppm
    ours, best = nrmse(result.chi_ppm, chi_true, result.mask), nrmse(reference, chi_true, result.mask)
    # measured 5.4 against 12.1 % (cross-validated weights: 5.3 against 8.2; V-SHARP then TV: 32 %)
    assert ours < 1.2 * best, f"single-step {ours:.1f} %, TV on the true local field {best:.1f} %"
    assert result.notes[-1].startswith("single-step TV")


def test_single_step_tv_can_return_chi_on_the_whole_mask():
    """output_radius_mm=0 keeps the input mask: the rim's chi comes from its field inside, and the map there
    is better than nothing (zeros there would score 100 % NRMSE)."""
    vs = (4.0, 4.0, 4.0)
    case = _case("analytic", vs, SUPERIOR)
    chi_true = make_head_phantom(None, vs).chi_ppm
    whole = single_step_tv(case.total, case.mask, vs, b0_dir=case.b0_dir, radii_mm=(8.0,), alpha=0.01,
                           output_radius_mm=0.0)
    inner = single_step_tv(case.total, case.mask, vs, b0_dir=case.b0_dir, radii_mm=(8.0,), alpha=0.01)
    np.testing.assert_array_equal(whole.mask, case.mask > 0.5)
    assert whole.eroded_voxels == 0 and inner.eroded_voxels > 0
    np.testing.assert_allclose(whole.chi_ppm[inner.mask], inner.chi_ppm[inner.mask], rtol=1e-5, atol=1e-7)
    rim = whole.mask & ~inner.mask
    assert nrmse(whole.chi_ppm, chi_true, rim) < 90.0  # measured 75.8 (the inner map: 5.8)


def test_single_step_radii_partition_the_valid_mask():
    """Each voxel of the data term is fitted through exactly one radius: the largest whose ball fits around it."""
    import torch
    from qsmdip.kernel import smv_spectrum
    from qsmdip.operator import DipoleOperator
    from qsmdip.solvers.single_step import _stack_radii, smv_valid_mask
    from qsmdip.solvers.tv import _TVProblem

    vs = (2.0, 2.0, 2.0)
    mask = np.zeros((30, 30, 30), bool)
    mask[2:28, 2:28, 2:28] = True
    radii = (3.0, 6.0, 12.0)
    valids = [smv_valid_mask(mask, vs, r) for r in radii]
    problem = _TVProblem(np.zeros(mask.shape, np.float32), valids[0], vs, SUPERIOR, 1.5, torch.device("cpu"))
    _stack_radii(problem, [np.full(mask.shape, float(i + 1), np.float32) for i in range(3)], valids, radii, vs)
    n0, n1, n2 = mask.shape
    shells = problem.mask_pad[:, :n0, :n1, :n2].numpy() > 0
    assert problem.kernel.shape[0] == problem.field_pad.shape[0] == 3
    np.testing.assert_array_equal(shells.sum(axis=0), valids[0])          # a partition of the valid mask
    assert shells[2].any() and np.array_equal(shells[2], valids[2])       # the deepest voxels: the largest ball
    np.testing.assert_array_equal(shells[1], valids[1] & ~valids[2])
    assert shells[0].any() and not np.any(shells[0] & valids[1])          # the rim: the smallest ball only
    for term, radius in enumerate(radii):   # each term carries its own field and the kernel times its high-pass
        assert np.all(problem.field_pad[term, :n0, :n1, :n2].numpy()[valids[0]] == term + 1)
        high_pass = torch.as_tensor(1.0 - smv_spectrum(problem.size, vs, radius), dtype=torch.float32)
        kernel = DipoleOperator(mask.shape, vs, SUPERIOR, pad_factor=1.5).kernel
        torch.testing.assert_close(problem.kernel[term], kernel * high_pass)


def test_several_radii_beat_each_radius_alone_from_phase():
    """On a simulated 3 mm acquisition (realistic head, air cavity, noise), through the phase pipeline, the
    default radii fit the total field better than any one of them: the small ball keeps the edge, the large
    one the local field's low frequencies inside."""
    pytest.importorskip("nilearn")
    from qsmdip.phase.pipeline import phase_to_local_field
    from qsmdip.realistic_acquisition import make_realistic_acquisition
    from qsmdip.solvers.single_step import SingleStepSettings

    acq = make_realistic_acquisition(voxel_size_mm=(3.0, 3.0, 3.0), snr=100.0, seed=2)
    pipe = phase_to_local_field(acq.phase_rad, acq.magnitude, acq.echo_times_s, acq.b0_tesla, acq.voxel_size_mm,
                                b0_dir=acq.b0_dir)
    radii = SingleStepSettings().radii_for(acq.voxel_size_mm)
    assert radii == (4.5, 6.0, 12.0)   # 3 mm raised to 1.5 voxels

    def error(radii_mm):
        chi = single_step_tv(pipe.total_field_ppm, pipe.field_mask, acq.voxel_size_mm, b0_dir=acq.b0_dir,
                             radii_mm=radii_mm, alpha=0.071, output_radius_mm=0.0).chi_ppm
        return nrmse(chi, acq.chi_ppm, pipe.mask)

    together, alone = error(radii), [error((r,)) for r in radii]
    # measured 39.6 % against 42.7, 41.0 and 45.0
    assert together < 0.98 * min(alone), (together, alone)


def test_single_step_chooses_its_weight_by_hold_out_over_all_radii():
    """The default (no alpha): the hold-out rule runs on the stacked data terms and picks a weight from its grid
    whose map is near the better of the grid's ends and far from the worse (4 mm code-built head, strong air
    background, no noise: the largest weight is best here)."""
    from qsmdip.solvers.single_step import SingleStepSettings, solve_single_step_tv
    from qsmdip.solvers.tv import TVSettings

    vs = (4.0, 4.0, 4.0)
    case = _case("analytic", vs, SUPERIOR)
    chi_true = make_head_phantom(None, vs).chi_ppm
    result = solve_single_step_tv(case.total, case.mask, vs, b0_dir=case.b0_dir, device="cpu")
    chosen = result.chosen
    grid = TVSettings().alpha_grid
    assert chosen["alpha_rule"] == "holdout" and chosen["radii_mm"] == [6.0, 12.0]
    assert min(grid) <= chosen["alpha"] <= max(grid)
    ours = nrmse(result.chi_ppm, chi_true, case.mask)
    ends = [nrmse(solve_single_step_tv(case.total, case.mask, vs, b0_dir=case.b0_dir, device="cpu",
                                       settings=SingleStepSettings(alpha=a)).chi_ppm, chi_true, case.mask)
            for a in (max(grid), min(grid))]
    # measured 22.5 % against 22.0 (largest weight) and 27.1 (smallest)
    assert ours < 1.05 * min(ends) and ours < 0.9 * max(ends), (ours, ends)


def test_smv_and_single_step_refuse_bad_radii():
    mask = np.zeros((20, 20, 20), bool)
    mask[4:16, 4:16, 4:16] = True
    for radius, text in ((1.0, "at least the finest voxel side"), (20.0, "too small for an SMV radius")):
        with pytest.raises(QSMInputError, match=text):
            remove_background_smv(np.zeros(mask.shape), mask, (2.0, 2.0, 2.0), radius_mm=radius)
    with pytest.raises(QSMInputError, match="iterations"):
        single_step_tv(np.zeros(mask.shape), mask, (2.0, 2.0, 2.0), iterations=0)
    with pytest.raises(QSMInputError, match="at least the finest voxel side"):
        single_step_tv(np.zeros(mask.shape), mask, (2.0, 2.0, 2.0), radii_mm=(1.0, 4.0))
    # a ball that fits nowhere in this small mask is left out; the others still run
    fitted = single_step_tv(np.zeros(mask.shape), mask, (2.0, 2.0, 2.0), radii_mm=(2.0, 30.0), alpha=0.01,
                            iterations=2)
    assert "radii 2 mm" in fitted.notes[0]


def test_single_step_runs_where_it_is_asked():
    """The ADMM solve honours ``device`` as TV does: an unknown device, or CUDA on a machine without one, is an
    error rather than a silent run on the CPU; 'auto' reports the device it used."""
    import torch

    from qsmdip.solvers.single_step import SingleStepSettings, solve_single_step_tv

    mask = np.zeros((20, 20, 20), bool)
    mask[3:17, 3:17, 3:17] = True
    field = np.where(mask, np.random.default_rng(0).normal(0, 0.01, mask.shape), 0.0)
    with pytest.raises(QSMInputError, match="unknown device"):
        solve_single_step_tv(field, mask, (2.0, 2.0, 2.0), device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(QSMInputError, match="no CUDA GPU"):
            single_step_tv(field, mask, (2.0, 2.0, 2.0), device="cuda")
    result = solve_single_step_tv(field, mask, (2.0, 2.0, 2.0), device="auto",
                                  settings=SingleStepSettings(radii_mm=(4.0,), alpha=0.05, iterations=3))
    assert result.device == ("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("method", ["vsharp", "pdf"])
def test_bad_inputs_are_one_line_errors(method):
    remove = BACKGROUND_REMOVERS[method]
    field = np.zeros((20, 20, 20), np.float32)
    mask = np.zeros((20, 20, 20), bool)
    mask[4:16, 4:16, 4:16] = True
    cases = [
        ((field, mask[:-1], (2, 2, 2)), {}, "differ in size"),
        ((field[0], mask[0], (2, 2, 2)), {}, "3D"),
        ((field, np.zeros_like(mask), (2, 2, 2)), {}, "empty"),
        ((np.where(mask, np.nan, 0.0), mask, (2, 2, 2)), {}, "NaN"),
        ((field, mask, (2, 2, 0)), {}, "voxel size"),
        ((field, mask, (2, 2, 2)), {"b0_dir": (0, 0, 0)}, "zero vector"),
        ((field, mask, (2, 2, 2)), {"weight": np.ones((3, 3, 3))}, "weight"),
        ((field, mask, (2, 2, 2)), {"weight": -np.ones_like(field)}, "non-negative"),
        ((field, mask, (2, 2, 2)), {"weight": np.zeros_like(field)}, "zero everywhere"),
    ]
    for args, kwargs, text in cases:
        with pytest.raises(QSMInputError, match=text) as info:
            remove(*args, **kwargs)
        assert "\n" not in str(info.value)


def test_nan_outside_the_mask_is_ignored(head4):
    field = np.where(head4.mask, head4.total, np.nan)
    for method in ("vsharp", "pdf"):
        result = BACKGROUND_REMOVERS[method](field, head4.mask, head4.voxel_size_mm)
        assert np.all(np.isfinite(result.local_field_ppm))


def test_vsharp_refuses_a_mask_thinner_than_its_smallest_ball():
    mask = np.zeros((24, 24, 24), bool)
    mask[4:20, 4:20, 11:13] = True  # a 2-voxel slab: no voxel has all six neighbours inside
    with pytest.raises(QSMInputError, match="too small for V-SHARP"):
        remove_background_vsharp(np.zeros(mask.shape), mask, (2.0, 2.0, 2.0))


def test_vsharp_refuses_a_ball_without_neighbours():
    mask = np.ones((20, 20, 20), bool)
    with pytest.raises(QSMInputError, match="below the finest voxel side"):
        remove_background_vsharp(np.zeros(mask.shape), mask, (2.0, 2.0, 2.0),
                                 settings=VSharpSettings(min_radius_mm=1.0))


@pytest.mark.parametrize("make", [
    lambda: VSharpSettings(threshold=0.0), lambda: VSharpSettings(threshold=1.5),
    lambda: VSharpSettings(max_radius_mm=-1), lambda: VSharpSettings(min_radius_mm=20.0),
    lambda: VSharpSettings(radius_step_mm=0.0), lambda: PDFSettings(margin_mm=0.0),
    lambda: PDFSettings(pad_factor=0.5), lambda: PDFSettings(max_iterations=0), lambda: PDFSettings(tolerance=1.0),
])
def test_bad_settings_are_refused(make):
    with pytest.raises(QSMInputError):
        make()
