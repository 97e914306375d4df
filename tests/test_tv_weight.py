"""TV's weight: free of the field's scale, chosen per case from the data alone, and logged."""
import logging

import numpy as np
import pytest

pytest.importorskip("nilearn")

from qsmdip.metrics import nrmse
from qsmdip.realistic_phantom import make_realistic_phantom
from qsmdip.solvers.tv import TVSettings, solve_tv


@pytest.fixture(scope="module")
def small_realistic():
    """A 4 mm realistic phantom cropped around the brain's centre, with noise typical of 3 T."""
    return make_realistic_phantom(shape=(36, 44, 36), voxel_size_mm=(4.0, 4.0, 4.0), snr=60.0, seed=1)


def _tv(ph, **kwargs):
    return solve_tv(ph.field_ppm, ph.mask, ph.voxel_size_mm, b0_dir=ph.b0_dir,
                    settings=TVSettings(**kwargs), device="cpu")


def test_weight_is_free_of_the_field_scale(small_realistic):
    ph = small_realistic
    one = _tv(ph, alpha=0.03, iterations=40)
    scaled = solve_tv(ph.field_ppm * 10.0, ph.mask, ph.voxel_size_mm, b0_dir=ph.b0_dir,
                      settings=TVSettings(alpha=0.03, iterations=40), device="cpu")
    np.testing.assert_allclose(scaled.chi_ppm, 10.0 * one.chi_ppm, rtol=1e-3, atol=1e-6)


def test_automatic_weight_lands_near_the_best_and_is_logged(small_realistic, caplog):
    ph = small_realistic
    sweep = {alpha: nrmse(_tv(ph, alpha=alpha).chi_ppm, ph.chi_ppm, ph.mask) for alpha in (0.0125, 0.025, 0.05)}
    with caplog.at_level(logging.INFO, logger="qsmdip"):
        auto = _tv(ph)
    assert "chosen by hold-out cross-validation" in caplog.text
    chosen = auto.chosen["alpha"]
    assert 0.005 < chosen < 0.1 and auto.chosen["alpha_rule"] == "holdout"
    best = min(sweep.values())
    assert nrmse(auto.chi_ppm, ph.chi_ppm, ph.mask) <= 1.05 * best, (chosen, sweep)


def test_noisier_data_get_a_larger_weight():
    """Cross-validation sees the noise: ten times the noise must not pick a smaller weight."""
    quiet = make_realistic_phantom(shape=(36, 44, 36), voxel_size_mm=(4.0, 4.0, 4.0), snr=200.0, seed=2)
    loud = make_realistic_phantom(shape=(36, 44, 36), voxel_size_mm=(4.0, 4.0, 4.0), snr=20.0, seed=2)
    assert _tv(loud).chosen["alpha"] > _tv(quiet).chosen["alpha"]


def test_automatic_weight_does_not_read_the_truth(small_realistic):
    """Same data, same seed: the same weight and map, whatever truth a caller scores against."""
    ph = small_realistic
    seen = []
    first = solve_tv(ph.field_ppm, ph.mask, ph.voxel_size_mm, b0_dir=ph.b0_dir, device="cpu",
                     callback=lambda p: seen.append(nrmse(p.chi_ppm, -ph.chi_ppm, ph.mask)))
    second = _tv(ph)
    assert first.chosen["alpha"] == second.chosen["alpha"]
    np.testing.assert_array_equal(first.chi_ppm, second.chi_ppm)
    assert seen  # the callback did score every preview


def test_l1_data_term_resists_grossly_wrong_voxels(small_realistic):
    """A few voxels whose field is far off (dephased phase in a bleed) streak a least-squares TV map; the l1
    data term, with its own hold-out choice of weight, keeps the map close to the one from clean data."""
    ph = small_realistic
    rng = np.random.default_rng(3)
    inside = np.flatnonzero(ph.mask)
    bad = rng.choice(inside, size=max(1, inside.size // 200), replace=False)  # 0.5 % of the mask
    field = ph.field_ppm.copy()
    rms = float(np.sqrt(np.mean(field[ph.mask] ** 2)))
    field.flat[bad] += rng.choice([-1.0, 1.0], size=bad.size) * 10.0 * rms
    scores = {}
    for term in ("l2", "l1", "huber"):
        result = solve_tv(field, ph.mask, ph.voxel_size_mm, b0_dir=ph.b0_dir, device="cpu",
                          settings=TVSettings(data_term=term))
        scores[term] = nrmse(result.chi_ppm, ph.chi_ppm, ph.mask)
    clean = nrmse(_tv(ph).chi_ppm, ph.chi_ppm, ph.mask)
    assert scores["l1"] < 0.8 * scores["l2"], scores
    assert scores["l1"] < 1.4 * clean, (scores, clean)  # measured 76.7 (l2) and 33.0 (l1) against 26.1 clean
    # Huber is l1 beyond its switch point (0.1 of the field's RMS, far below these errors): as robust
    assert scores["huber"] < 0.8 * scores["l2"] and scores["huber"] < 1.4 * clean, (scores, clean)


def test_huber_data_term_is_least_squares_below_its_switch_point(small_realistic):
    """With a switch point far above every residual, Huber TV fits r^2 / (2 delta): least-squares TV with its
    data term scaled by 1 / delta, so the same map as l2 at alpha * delta (every ADMM penalty scaled by delta
    too, so both runs take the same steps; delta mu2 = 3, not 1, so a wrong power of it in the update shows)."""
    ph = small_realistic
    delta = 50.0
    huber = solve_tv(ph.field_ppm, ph.mask, ph.voxel_size_mm, b0_dir=ph.b0_dir, device="cpu",
                     settings=TVSettings(alpha=0.02, data_term="huber", huber_delta=delta, mu1=0.06, mu2=3.0 / delta,
                                         iterations=60, tolerance=0.0))
    l2 = solve_tv(ph.field_ppm, ph.mask, ph.voxel_size_mm, b0_dir=ph.b0_dir, device="cpu",
                  settings=TVSettings(alpha=0.02 * delta, mu1=0.06 * delta, mu2=3.0, iterations=60, tolerance=0.0))
    np.testing.assert_allclose(huber.chi_ppm, l2.chi_ppm, atol=1e-4 * float(np.abs(l2.chi_ppm).max()))


def test_data_term_is_checked():
    with pytest.raises(Exception, match="data_term"):
        TVSettings(data_term="cauchy")
    for delta in (0.0, -1.0, float("nan")):
        with pytest.raises(Exception, match="huber_delta"):
            TVSettings(data_term="huber", huber_delta=delta)
