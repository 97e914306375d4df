"""Spatial and temporal phase unwrapping against simulated truth (qsmdip.phase.unwrap)."""
import numpy as np
import pytest
import scipy.ndimage

from qsmdip.errors import QSMInputError
from qsmdip.phase.offsets import remove_phase_offsets
from qsmdip.phase.unwrap import (UNWRAPPERS, unwrap_echoes, unwrap_laplacian, unwrap_region_growing,
                                 wrap)
from synthetic_phase import fraction_exact, simulate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOXEL_MM = (2.0, 2.0, 2.5)


def smooth_truth(shape=(56, 64, 52), voxel_size_mm=VOXEL_MM):
    """An ellipsoid mask and a smooth, non-polynomial phase (rad) with more than 10 wraps across it and
    less than pi between neighbours."""
    vs = np.asarray(voxel_size_mm)
    pos = (np.indices(shape, dtype=float) - ((np.asarray(shape) - 1) / 2)[:, None, None, None]) \
        * vs[:, None, None, None]
    semi = 0.42 * np.asarray(shape) * vs
    mask = ((pos / semi[:, None, None, None]) ** 2).sum(0) < 1
    x, y, z = pos / 50.0
    phase = 30 * np.exp(-((x - 0.2) ** 2 + y ** 2 + (z + 0.1) ** 2) / 0.72) + 6 * np.sin(1.3 * x + 0.5 * z) \
        + 32 * y
    return phase, mask, pos


def noisy(phase, sigma_rad, seed=0):
    rng = np.random.default_rng(seed)
    return wrap(phase + sigma_rad * rng.standard_normal(phase.shape))


def seven_point_laplacian(f, voxel_size_mm):
    out = np.zeros_like(f)
    for axis, h in enumerate(voxel_size_mm):
        out += (np.roll(f, 1, axis) + np.roll(f, -1, axis) - 2 * f) / h ** 2
    return out


def test_truth_has_many_wraps():
    phase, mask, _ = smooth_truth()
    assert np.ptp(phase[mask]) / (2 * np.pi) > 10


@pytest.mark.parametrize("with_magnitude", [False, True])
def test_region_growing_is_exact_up_to_one_multiple_of_two_pi(with_magnitude):
    phase, mask, pos = smooth_truth()
    magnitude = 1.0 + 0.2 * np.cos(pos[0] / 20.0) if with_magnitude else None
    out = unwrap_region_growing(noisy(phase, 0.2), mask, VOXEL_MM, magnitude=magnitude)
    assert out.dtype == np.float32 and out.shape == phase.shape
    assert np.all(out[~mask] == 0)
    fraction, turns = fraction_exact(out, phase, mask)
    assert fraction >= 0.99
    # The global multiple puts the median closest to 0.
    assert abs(np.median(out[mask])) <= np.pi + 1e-5
    assert turns == -np.round(np.median(phase[mask]) / (2 * np.pi))


def test_region_growing_is_exact_where_quality_is_high():
    """A noise-only hole (no signal) inside the mask must not spoil the rest."""
    phase, mask, pos = smooth_truth()
    rng = np.random.default_rng(3)
    hole = ((pos[0] - 10) ** 2 + (pos[1] + 15) ** 2 + pos[2] ** 2) < 18 ** 2
    magnitude = np.where(hole, 0.05, 1.0)
    data = np.where(hole, rng.uniform(-np.pi, np.pi, phase.shape), noisy(phase, 0.15, seed=4))
    assert 0.02 < hole[mask].mean() < 0.1
    good = mask & ~scipy.ndimage.binary_dilation(hole, iterations=1)
    out = unwrap_region_growing(data, mask, VOXEL_MM, magnitude=magnitude)
    assert fraction_exact(out, phase, good)[0] >= 0.995


def test_region_growing_unwraps_each_part_of_the_mask_on_its_own():
    phase, mask, pos = smooth_truth()
    parts = mask & (np.abs(pos[1]) > 6)  # two halves with a gap: two parts
    assert scipy.ndimage.label(parts)[1] == 2
    out = unwrap_region_growing(noisy(phase, 0.1), parts, VOXEL_MM)
    for side in (pos[1] > 0, pos[1] < 0):
        part = parts & side
        assert fraction_exact(out, phase, part)[0] >= 0.99
        assert abs(np.median(out[part])) <= np.pi + 1e-5


def test_laplacian_keeps_the_laplacian_but_is_not_exact():
    """The Laplacian unwrapper differs from the truth by a smooth (harmonic) part: where the phase changes
    slowly between voxels the Laplacian of the difference is near zero inside the mask (the sine in the
    formula underestimates steep changes), yet the result is not the input plus multiples of 2 pi."""
    phase, mask, _ = smooth_truth()
    gentle = 0.2 * phase  # at most ~0.5 rad between neighbours
    out = unwrap_laplacian(wrap(gentle), mask, VOXEL_MM).astype(float)
    assert np.all(out[~mask] == 0)
    inner = scipy.ndimage.binary_erosion(mask, iterations=3)
    error = seven_point_laplacian(np.where(mask, out - gentle, 0), VOXEL_MM)[inner]
    reference = seven_point_laplacian(gentle, VOXEL_MM)[inner]
    assert np.median(np.abs(error)) < 0.05 * np.median(np.abs(reference))

    wrapped = wrap(phase)
    out = unwrap_laplacian(wrapped, mask, VOXEL_MM).astype(float)
    congruent = np.abs(wrap(out - wrapped))[mask] < 0.05
    assert congruent.mean() < 0.5
    assert fraction_exact(out, phase, mask)[0] < 0.9
    assert fraction_exact(unwrap_region_growing(wrapped, mask, VOXEL_MM), phase, mask)[0] == 1.0


def test_unwrappers_registry_and_anisotropic_voxels():
    assert set(UNWRAPPERS) == {"laplacian", "region-growing"}
    phase, mask, _ = smooth_truth(voxel_size_mm=(2.0, 3.0, 4.0))
    for unwrap in UNWRAPPERS.values():
        out = unwrap(noisy(phase, 0.1), mask, (2.0, 3.0, 4.0))
        assert out.shape == phase.shape and out.dtype == np.float32 and np.all(np.isfinite(out))


@pytest.fixture(scope="module")
def acquisition():
    return simulate()


def test_temporal_unwrapping_makes_echoes_proportional_to_te(acquisition):
    acq = acquisition
    field_phase = acq.true_phase_rad - acq.offset_rad[None]
    assert np.ptp(field_phase[-1][acq.mask]) / (2 * np.pi) > 10
    corrected = remove_phase_offsets(acq.phases_rad, acq.magnitudes, acq.echo_times_s, acq.mask,
                                     acq.voxel_size_mm).phases_rad
    out = unwrap_echoes(corrected, acq.magnitudes, acq.echo_times_s, acq.mask, acq.voxel_size_mm)
    assert out.shape == acq.phases_rad.shape and out.dtype == np.float32
    fractions = [fraction_exact(out[e], field_phase[e], acq.mask) for e in range(out.shape[0])]
    assert all(f >= 0.99 for f, _ in fractions), fractions
    assert all(turns == 0 for _, turns in fractions), fractions
    # Each voxel's echoes lie on a line through the origin: residual of the per-voxel fit within noise.
    te = acq.echo_times_s
    series = out[:, acq.mask].astype(float)
    slope = (te @ series) / (te @ te)
    residual = np.abs(series - np.outer(te, slope))
    assert np.mean(residual.max(axis=0) < 1.0) >= 0.99
    # Near the air cavity the last echo changes by more than pi between neighbours; unwrapping it
    # spatially on its own is worse than unwrapping it along time.
    alone = unwrap_region_growing(corrected[-1], acq.mask, acq.voxel_size_mm, magnitude=acq.magnitudes[-1])
    assert fraction_exact(alone, field_phase[-1], acq.mask)[0] <= fractions[-1][0]


def test_laplacian_echoes_are_unwrapped_one_by_one(acquisition):
    acq = acquisition
    out = unwrap_echoes(acq.phases_rad, acq.magnitudes, acq.echo_times_s, acq.mask, acq.voxel_size_mm,
                        method="laplacian")
    for echo in (0, 2):
        np.testing.assert_array_equal(out[echo], unwrap_laplacian(acq.phases_rad[echo], acq.mask,
                                                                  acq.voxel_size_mm))


def test_single_echo(acquisition):
    acq = acquisition
    truth = acq.true_phase_rad[1]
    for phases in (acq.phases_rad[1:2], acq.phases_rad[1]):
        out = unwrap_echoes(phases, None, [acq.echo_times_s[1]], acq.mask, acq.voxel_size_mm)
        assert out.shape == (1,) + acq.mask.shape
        assert fraction_exact(out[0], truth, acq.mask)[0] >= 0.99


def test_bad_inputs(acquisition):
    acq = acquisition
    args = (acq.phases_rad, acq.magnitudes, acq.echo_times_s, acq.mask, acq.voxel_size_mm)
    bad = [
        ((acq.phases_rad, acq.magnitudes[:, :-1], *args[2:]), "magnitude shape"),
        ((*args[:3], acq.mask[:-1], acq.voxel_size_mm), "mask shape"),
        ((*args[:2], acq.echo_times_s[:-1], *args[3:]), "echo times given for 5"),
        ((*args[:2], acq.echo_times_s[::-1], *args[3:]), "strictly increasing"),
        ((*args[:2], acq.echo_times_s * 1e3, *args[3:]), "seconds"),
        ((*args[:3], np.zeros_like(acq.mask), acq.voxel_size_mm), "mask is empty"),
        ((acq.phases_rad[0, 0], *args[1:]), "phases must be"),
    ]
    for call_args, message in bad:
        with pytest.raises(QSMInputError, match=message):
            unwrap_echoes(*call_args)
    with pytest.raises(QSMInputError, match="unknown unwrapping method 'goldstein'"):
        unwrap_echoes(*args, method="goldstein")
    nan_phase = acq.phases_rad[0].copy()
    nan_phase[acq.mask.nonzero()[0][0], acq.mask.nonzero()[1][0], acq.mask.nonzero()[2][0]] = np.nan
    for unwrap in UNWRAPPERS.values():
        with pytest.raises(QSMInputError, match="NaN"):
            unwrap(nan_phase, acq.mask, acq.voxel_size_mm)
        with pytest.raises(QSMInputError, match="voxel size"):
            unwrap(acq.phases_rad[0], acq.mask, (0.0, 1.0, 1.0))
        with pytest.raises(QSMInputError, match="3D"):
            unwrap(acq.phases_rad, acq.mask, acq.voxel_size_mm)


def test_offsets_and_unwrapping_on_the_realistic_head():
    """Whole-head simulation (4 mm, sinus-like cavity, >10 wraps near it at the last echo), in the brain
    mask: MCPC-3D-S finds the offset, and offset removal + temporal region growing give the true phase up
    to no multiple of 2 pi wherever the measured phase can be compared with the truth (near the cavity,
    dephasing within a voxel moves the measured phase away from the mean field's phase); the Laplacian
    unwrapper does not."""
    pytest.importorskip("nilearn")
    from qsmdip.realistic_acquisition import make_realistic_acquisition, wraps_near_cavity
    from qsmdip.units import GAMMA_BAR_MHZ_PER_T

    acq = make_realistic_acquisition(voxel_size_mm=(4.0, 4.0, 4.0), snr=50, seed=0)
    assert wraps_near_cavity(acq) > 10
    te, mask = np.asarray(acq.echo_times_s), acq.brain_mask
    corrected = remove_phase_offsets(acq.phase_rad, acq.magnitude, te, mask, acq.voxel_size_mm)
    offset_error = np.abs(wrap(corrected.offset_rad - acq.offset_rad))[mask]
    assert np.percentile(offset_error, 99) < 0.1
    truth = 2 * np.pi * GAMMA_BAR_MHZ_PER_T * acq.b0_tesla * te[:, None, None, None] * acq.total_field_ppm[None]
    comparable = np.abs(wrap(acq.phase_rad - acq.offset_rad[None] - truth)) < 1.0
    region_growing = unwrap_echoes(corrected.phases_rad, acq.magnitude, te, mask, acq.voxel_size_mm)
    laplacian = unwrap_echoes(corrected.phases_rad, acq.magnitude, te, mask, acq.voxel_size_mm,
                              method="laplacian")
    for echo in range(len(te)):
        where = mask & comparable[echo]
        assert where.sum() > 0.97 * mask.sum()
        fraction, turns = fraction_exact(region_growing[echo], truth[echo], where)
        assert fraction >= 0.995 and turns == 0, (echo, fraction, turns)
        assert fraction_exact(laplacian[echo], truth[echo], where)[0] < 0.9
