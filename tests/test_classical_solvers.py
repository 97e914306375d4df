"""TKD, closed-form Tikhonov and TV-ADMM on small piecewise-constant phantoms.

The phantom: a few ellipsoids of different susceptibility inside a spherical mask, placed off-centre in
a non-cubic grid (so the bounding-box crop and the [i, j, k] axis order both matter), its field from
the forward model. NRMSE is computed here with plain NumPy so that these tests do not depend on the
metrics module.
"""
import numpy as np
import pytest

from qsmdip.errors import QSMInputError
from qsmdip.operator import forward_field
from qsmdip.phantom import make_head_phantom
from qsmdip.solvers.base import Progress
from qsmdip.solvers.tikhonov import TikhonovSettings, solve_tikhonov
from qsmdip.solvers.tkd import TKDSettings, solve_tkd
from qsmdip.solvers.tv import TVSettings, solve_tv

SHAPE = (40, 36, 32)
ISO = (1.0, 1.0, 1.0)
AXIAL = (0.0, 0.0, 1.0)
OBLIQUE = (0.35, -0.25, 0.9)
NOISE_PPM = 0.002


def ellipsoid(shape, voxel_size_mm, centre_mm, radii_mm):
    idx = np.indices(shape).astype(float)
    return sum(((idx[a] * voxel_size_mm[a] - centre_mm[a]) / radii_mm[a]) ** 2 for a in range(3)) <= 1.0


def make_phantom(voxel_size_mm=ISO, b0=AXIAL, noise_ppm=0.0, shape=SHAPE, seed=0):
    """(chi_ppm, mask, field_ppm): ellipsoids of 0.1, -0.05, 0.2 and 0.04 ppm in a sphere of radius 14 mm."""
    c = np.array([17.0, 17.0, 16.0])      # mm: off-centre along i
    mask = ellipsoid(shape, voxel_size_mm, c, (14.0, 14.0, 14.0))
    chi = np.zeros(shape)
    for offset, radii, value in [((-5, 0, 0), (4, 3, 6), 0.1), ((5, 3, -2), (3, 5, 3), -0.05),
                                 ((0, -6, 5), (3, 3, 3), 0.2), ((2, 6, 6), (5, 3, 2.5), 0.04)]:
        chi[ellipsoid(shape, voxel_size_mm, c + np.array(offset), radii)] = value
    chi *= mask
    field = forward_field(chi, voxel_size_mm, b0)
    if noise_ppm:
        field = field + noise_ppm * np.random.default_rng(seed).standard_normal(shape)
    return chi, mask, (field * mask).astype(np.float32)


def nrmse(x, ref, mask):
    """100 ||x - r|| / ||r|| over the mask, both demeaned in the mask."""
    x = x[mask] - x[mask].mean()
    r = ref[mask] - ref[mask].mean()
    return 100.0 * np.linalg.norm(x - r) / np.linalg.norm(r)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def clean():
    return make_phantom()


@pytest.fixture(scope="module")
def noisy():
    return make_phantom(noise_ppm=NOISE_PPM)


FAST_TV = TVSettings(iterations=60)


def test_tkd_recovers_phantom(clean):
    chi, mask, field = clean
    result = solve_tkd(field, mask, ISO, device="cpu")
    assert result.method == "tkd" and result.iterations == 0 and result.stop_reason == "completed"
    assert nrmse(result.chi_ppm, chi, mask) < 40.0
    # A lower threshold inverts more of the cone: better on noise-free data.
    sharper = solve_tkd(field, mask, ISO, settings=TKDSettings(threshold=0.08), device="cpu")
    assert nrmse(sharper.chi_ppm, chi, mask) < nrmse(result.chi_ppm, chi, mask)


def test_tikhonov_recovers_phantom(noisy):
    chi, mask, field = noisy
    result = solve_tikhonov(field, mask, ISO, settings=TikhonovSettings(lambda_=3e-3), device="cpu")
    assert result.method == "tikhonov" and result.iterations == 0
    assert nrmse(result.chi_ppm, chi, mask) < 40.0
    assert len(result.loss_history) == 1 and result.loss_history[0] > 0


def test_tikhonov_trade_off_is_monotone(clean):
    """More regularisation: smaller chi, worse data fit."""
    chi, mask, field = clean
    norms, misfits = [], []
    for lam in (1e-3, 1e-1, 10.0, 1e3):
        x = solve_tikhonov(field, mask, ISO, settings=TikhonovSettings(lambda_=lam), device="cpu").chi_ppm
        norms.append(np.linalg.norm(x[mask] - x[mask].mean()))
        misfits.append(np.linalg.norm((forward_field(x, ISO, AXIAL) - field)[mask]))
    assert all(a > b for a, b in zip(norms, norms[1:]))
    assert all(a < b for a, b in zip(misfits, misfits[1:]))
    assert norms[-1] < 0.02 * np.linalg.norm(chi[mask] - chi[mask].mean())


def test_tv_recovers_and_beats_tkd_on_piecewise_constant(noisy):
    chi, mask, field = noisy
    tv = solve_tv(field, mask, ISO, settings=FAST_TV, device="cpu")
    tkd = solve_tkd(field, mask, ISO, device="cpu")
    err_tv, err_tkd = nrmse(tv.chi_ppm, chi, mask), nrmse(tkd.chi_ppm, chi, mask)
    assert tv.method == "tv" and tv.device == "cpu"
    assert err_tv < 23.0  # automatic weight (22 % measured; the old tuned weight gave < 20 %)
    assert err_tv < 0.6 * err_tkd
    assert len(tv.loss_history) == tv.iterations
    # ADMM is not monotone step by step, but the objective must come well down from its start
    # (from a cold start: the automatic weight's final solve starts warm, from its best candidate).
    fixed = solve_tv(field, mask, ISO, settings=TVSettings(alpha=tv.chosen["alpha"], iterations=60), device="cpu")
    assert fixed.loss_history[-1] < 0.8 * fixed.loss_history[0]


def test_tv_final_start_cold_is_a_solve_at_the_chosen_weight(noisy):
    """final_start='cold' solves the chosen weight from zero, exactly as a given weight is solved; the warm
    default starts from the search's state, so it converges in fewer iterations to a different map."""
    chi, mask, field = noisy
    cold = solve_tv(field, mask, ISO, settings=TVSettings(final_start="cold"), device="cpu")
    warm = solve_tv(field, mask, ISO, settings=TVSettings(), device="cpu")
    given = solve_tv(field, mask, ISO, settings=TVSettings(alpha=cold.chosen["alpha"]), device="cpu")
    assert cold.chosen["alpha"] == warm.chosen["alpha"]
    np.testing.assert_array_equal(cold.chi_ppm, given.chi_ppm)
    assert warm.iterations < cold.iterations and not np.array_equal(warm.chi_ppm, cold.chi_ppm)
    with pytest.raises(QSMInputError, match="final_start"):
        TVSettings(final_start="hot")


def test_tv_alpha_factor_scales_the_chosen_weight_only(noisy):
    chi, mask, field = noisy
    plain = solve_tv(field, mask, ISO, settings=FAST_TV, device="cpu")
    smoother = solve_tv(field, mask, ISO, settings=TVSettings(iterations=60, alpha_factor=2.0), device="cpu")
    # the same search picks the same weight; only the final solve uses twice it, and the map is smoother
    assert smoother.chosen["alpha_chosen"] == plain.chosen["alpha_chosen"] == plain.chosen["alpha"]
    assert smoother.chosen["alpha"] == pytest.approx(2.0 * plain.chosen["alpha"])

    def total_variation(x):
        return sum(np.abs(np.diff(x, axis=a)).sum() for a in range(3))
    assert total_variation(smoother.chi_ppm) < total_variation(plain.chi_ppm)


def test_tv_alpha_factor_is_not_applied_at_the_grids_smallest_weight(clean):
    # on a noise-free field the held-out misfit keeps falling down a short grid: its last weight wins, and
    # the factor (meant to smooth away noise TV let through) is left out
    chi, mask, field = clean
    grid = (0.05, 0.035, 0.025)
    r = solve_tv(field, mask, ISO, settings=TVSettings(iterations=60, alpha_grid=grid, alpha_factor=2.0), device="cpu")
    assert r.chosen["alpha_chosen"] == 0.025 and r.chosen["alpha"] == 0.025


def test_tv_converges_before_the_cap(clean):
    chi, mask, field = clean
    result = solve_tv(field, mask, ISO, settings=TVSettings(iterations=500, tolerance=5e-3), device="cpu")
    assert result.stop_reason == "converged"
    assert result.iterations < 500


def test_tv_callback_progress_and_cancel(clean):
    chi, mask, field = clean
    seen = []

    def watch(progress):
        seen.append(progress)
        return False

    full = solve_tv(field, mask, ISO, settings=TVSettings(alpha=0.03, iterations=12, tolerance=0.0),
                    callback=watch, callback_every=5, device="cpu")
    assert full.stop_reason == "completed" and full.iterations == 12
    assert [p.iteration for p in seen] == [5, 10, 12]   # every 5, and after the last one
    for p in seen:
        assert isinstance(p, Progress) and p.max_iterations == 12 and np.isfinite(p.loss)
        assert p.chi_ppm.shape == SHAPE and p.chi_ppm.dtype == np.float32
        assert np.all(p.chi_ppm[~mask] == 0)
    np.testing.assert_array_equal(seen[-1].chi_ppm, full.chi_ppm)

    calls = []

    def cancel(progress):
        calls.append(progress.iteration)
        return progress.iteration >= 4

    cancelled = solve_tv(field, mask, ISO, settings=TVSettings(alpha=0.03, iterations=50, tolerance=0.0),
                         callback=cancel, callback_every=2, device="cpu")
    assert cancelled.stop_reason == "cancelled"
    assert cancelled.iterations == 4 and calls == [2, 4]
    assert np.any(cancelled.chi_ppm != 0)


def test_tv_time_limit(clean):
    chi, mask, field = clean
    result = solve_tv(field, mask, ISO, settings=TVSettings(iterations=100000, tolerance=0.0,
                                                              max_seconds=0.3), device="cpu")
    assert result.stop_reason == "time_limit"
    assert 1 <= result.iterations < 100000
    assert result.elapsed_s < 10.0


def test_closed_form_callbacks_get_the_final_map(clean):
    chi, mask, field = clean
    for solve in (solve_tkd, solve_tikhonov):
        seen = []
        result = solve(field, mask, ISO, callback=seen.append, device="cpu")
        assert len(seen) == 1 and seen[0].iteration == seen[0].max_iterations == 1
        np.testing.assert_array_equal(seen[0].chi_ppm, result.chi_ppm)


@pytest.mark.parametrize("voxel_size_mm", [(1.0, 1.0, 1.0), (0.8, 1.0, 1.6)])
def test_oblique_b0_and_anisotropic_voxels(voxel_size_mm):
    """Matching kernel: low error; the same data read as axial or with swapped voxel sizes: clearly worse."""
    shape = tuple(int(round(34.0 / v)) for v in voxel_size_mm)
    chi, mask, field = make_phantom(voxel_size_mm, OBLIQUE, shape=shape)
    tik = TikhonovSettings(lambda_=1e-3)
    right = nrmse(solve_tikhonov(field, mask, voxel_size_mm, b0_dir=OBLIQUE, settings=tik,
                                 device="cpu").chi_ppm, chi, mask)
    wrong_b0 = nrmse(solve_tikhonov(field, mask, voxel_size_mm, b0_dir=AXIAL, settings=tik,
                                    device="cpu").chi_ppm, chi, mask)
    assert right < 25.0
    assert wrong_b0 > right + 20.0
    tkd = nrmse(solve_tkd(field, mask, voxel_size_mm, b0_dir=OBLIQUE, device="cpu").chi_ppm, chi, mask)
    assert tkd < 40.0
    if voxel_size_mm[0] != voxel_size_mm[2]:
        swapped = tuple(reversed(voxel_size_mm))
        wrong_vs = nrmse(solve_tikhonov(field, mask, swapped, b0_dir=OBLIQUE, settings=tik,
                                        device="cpu").chi_ppm, chi, mask)
        assert wrong_vs > right + 10.0


def test_tv_oblique_anisotropic():
    voxel_size_mm = (0.8, 1.0, 1.6)
    shape = tuple(int(round(34.0 / v)) for v in voxel_size_mm)
    chi, mask, field = make_phantom(voxel_size_mm, OBLIQUE, shape=shape)
    right = solve_tv(field, mask, voxel_size_mm, b0_dir=OBLIQUE, settings=FAST_TV, device="cpu")
    wrong = solve_tv(field, mask, voxel_size_mm, b0_dir=AXIAL, settings=FAST_TV, device="cpu")
    assert nrmse(right.chi_ppm, chi, mask) < 15.0
    assert nrmse(wrong.chi_ppm, chi, mask) > nrmse(right.chi_ppm, chi, mask) + 20.0


@pytest.mark.parametrize("solve", [solve_tkd, solve_tikhonov, solve_tv])
def test_output_shape_dtype_and_zero_outside_mask(solve, clean):
    chi, mask, field = clean
    # The field outside the mask must be ignored: garbage there changes nothing.
    dirty = np.where(mask, field, 5.0).astype(np.float32)
    kwargs = {"settings": TVSettings(iterations=5)} if solve is solve_tv else {}
    result = solve(dirty, mask.astype(np.uint8), ISO, device="cpu", **kwargs)
    reference = solve(field, mask, ISO, device="cpu", **kwargs)
    assert result.chi_ppm.shape == SHAPE and result.chi_ppm.dtype == np.float32
    assert np.all(result.chi_ppm[~mask] == 0)
    assert np.any(result.chi_ppm[mask] != 0)
    np.testing.assert_allclose(result.chi_ppm, reference.chi_ppm, atol=1e-6)
    assert result.elapsed_s > 0


@pytest.mark.parametrize("solve", [solve_tkd, solve_tikhonov, solve_tv])
def test_bad_input_raises(solve, clean):
    chi, mask, field = clean
    with pytest.raises(QSMInputError, match="differ"):
        solve(field, mask[:-1], ISO, device="cpu")
    with pytest.raises(QSMInputError, match="empty"):
        solve(field, np.zeros_like(mask), ISO, device="cpu")
    with pytest.raises(QSMInputError, match="voxel size"):
        solve(field, mask, (1.0, 0.0, 1.0), device="cpu")
    with pytest.raises(QSMInputError, match="B0"):
        solve(field, mask, ISO, b0_dir=(0.0, 0.0, 0.0), device="cpu")
    with pytest.raises(QSMInputError, match="NaN"):
        solve(np.where(mask, np.nan, 0.0), mask, ISO, device="cpu")


@pytest.mark.parametrize("make", [
    lambda: TKDSettings(threshold=0.0), lambda: TKDSettings(threshold=0.7), lambda: TKDSettings(pad_factor=0.5),
    lambda: TikhonovSettings(lambda_=0.0), lambda: TikhonovSettings(lambda_=-1.0),
    lambda: TVSettings(alpha=0.0), lambda: TVSettings(mu1=-1.0), lambda: TVSettings(mu2=0.0),
    lambda: TVSettings(iterations=0), lambda: TVSettings(iterations=2.5),
    lambda: TVSettings(tolerance=-1e-3), lambda: TVSettings(max_seconds=0.0),
    lambda: TVSettings(alpha_factor=0.0), lambda: TVSettings(alpha_factor=float("nan")),
])
def test_bad_settings_raise(make):
    with pytest.raises(QSMInputError):
        make()


def test_tv_bad_callback_every(clean):
    chi, mask, field = clean
    with pytest.raises(QSMInputError, match="callback_every"):
        solve_tv(field, mask, ISO, callback_every=0, device="cpu")


def test_single_step_tv_has_the_common_call_shape_and_checks_its_settings():
    """Registered as a method: the callback sees progress and can cancel; bad settings are one clear error."""
    from qsmdip.solvers import get_solver, make_settings
    from qsmdip.solvers.single_step import SingleStepSettings

    ph = make_head_phantom(None, (4.0, 4.0, 4.0))
    seen = []
    result = get_solver("single-step-tv")(ph.field_ppm, ph.mask, (4.0, 4.0, 4.0), b0_dir=ph.b0_dir,
                                          settings=make_settings("single-step-tv", None, {"alpha": 0.01}),
                                          callback=lambda p: seen.append(p.iteration) or len(seen) >= 2,
                                          callback_every=5)
    assert result.method == "single-step-tv" and result.stop_reason == "cancelled" and seen == [5, 10]
    assert result.chosen["alpha_rule"] == "given" and result.chosen["eroded_voxels"] == 0
    assert np.all(result.chi_ppm[~ph.mask] == 0) and np.count_nonzero(result.chi_ppm[ph.mask]) > 0
    for bad in ({"radii_mm": (0.0,)}, {"radii_mm": ()}, {"radii_mm": "wide"}, {"output_radius_mm": 13.0},
                {"radii_mm": (4.0,), "output_radius_mm": 5.0}, {"data_term": "cauchy"}, {"iterations": 0},
                {"huber_delta": 0.0}):
        with pytest.raises(QSMInputError):
            SingleStepSettings(**bad)
