"""The truth-free noise estimate behind the Huber switch point, and the switch point it gives."""
import numpy as np
import pytest

from qsmdip.operator import forward_field
from qsmdip.solvers.noise import HUBER_NOISE_MULTIPLE, field_noise_std, huber_switch
from qsmdip.solvers.tv import TVSettings, solve_tv

VOXEL_MM = (1.0, 1.0, 1.0)


def _smooth_field_in_a_ball(noise_std: float, seed: int = 0):
    """A dipole field of a few smooth sources (chi a sum of Gaussians), plus white noise, in a ball mask."""
    shape = (40, 44, 36)
    idx = np.indices(shape, dtype=float)
    centre = [(n - 1) / 2 for n in shape]
    radius2 = sum(((idx[a] - centre[a]) / (0.42 * shape[a])) ** 2 for a in range(3))
    mask = radius2 <= 1.0
    chi = np.zeros(shape)
    for offset, width, value in (((-6, 4, 0), 4.0, 0.1), ((7, -3, 3), 3.0, -0.08), ((0, 0, -6), 5.0, 0.05)):
        chi += value * np.exp(-sum((idx[a] - centre[a] - offset[a]) ** 2 for a in range(3)) / (2 * width ** 2))
    field = forward_field(chi, VOXEL_MM)
    noise = noise_std * np.random.default_rng(seed).standard_normal(shape)
    return (field + noise) * mask, mask, float(np.sqrt(np.mean(field[mask] ** 2)))


@pytest.mark.parametrize("noise_std", [2e-4, 1e-3, 4e-3])
def test_noise_estimate_matches_the_added_noise(noise_std):
    field, mask, _ = _smooth_field_in_a_ball(noise_std)
    assert field_noise_std(field, mask) == pytest.approx(noise_std, rel=0.1)


def test_noise_estimate_ignores_the_smooth_field_and_the_scale():
    clean, mask, _ = _smooth_field_in_a_ball(0.0)
    noisy, _, _ = _smooth_field_in_a_ball(1e-3)
    assert field_noise_std(clean, mask) < 0.05 * field_noise_std(noisy, mask)
    assert field_noise_std(1e3 * noisy, mask) == pytest.approx(1e3 * field_noise_std(noisy, mask), rel=1e-9)


def test_a_mask_too_thin_for_a_block_gives_zero():
    field = np.random.default_rng(0).standard_normal((8, 8, 8))
    mask = np.zeros((8, 8, 8), bool)
    mask[:, :, 3] = True  # one slice: no 2x2x2 block lies inside it
    assert field_noise_std(field, mask) == 0.0


def test_switch_point_is_raised_to_the_noise_only_where_the_field_is_that_noisy():
    clean, mask, rms = _smooth_field_in_a_ball(1e-5)
    assert huber_switch(0.1, clean, mask, rms) == 0.1
    noisy, _, _ = _smooth_field_in_a_ball(0.5 * rms)
    switch = huber_switch(0.1, noisy, mask, rms)
    assert switch == pytest.approx(HUBER_NOISE_MULTIPLE * 0.5, rel=0.1)


def test_tv_reports_the_switch_point_it_used():
    noisy, mask, rms = _smooth_field_in_a_ball(0.0)
    noisy = noisy + 0.3 * rms * np.random.default_rng(1).standard_normal(noisy.shape) * mask
    result = solve_tv(noisy, mask, VOXEL_MM, settings=TVSettings(alpha=0.02, data_term="huber", iterations=5),
                      device="cpu")
    scale = float(np.sqrt(np.mean(noisy[mask] ** 2)))  # TV's own RMS, of the noisy field
    expected = HUBER_NOISE_MULTIPLE * field_noise_std(noisy, mask) / scale
    # (TV estimates it on the mask's bounding box, whose 2x2x2 blocks may fall one voxel over)
    assert expected > 0.1 and result.chosen["huber_delta"] == pytest.approx(expected, rel=0.05)
    plain = solve_tv(noisy, mask, VOXEL_MM, settings=TVSettings(alpha=0.02, iterations=5), device="cpu")
    assert "huber_delta" not in plain.chosen
