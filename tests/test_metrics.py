"""Challenge metrics checked against numbers worked out by hand on tiny volumes."""
import math

import numpy as np
import pytest

from qsmdip import metrics
from qsmdip.errors import QSMInputError

# A 1 x 1 x 4 "line" volume: ref demeaned = [-2, -1, 0, 3], x demeaned = [-3, -1, 0, 4].
REF4 = np.array([1.0, 2.0, 3.0, 6.0]).reshape(1, 1, 4)
X4 = np.array([0.0, 2.0, 3.0, 7.0]).reshape(1, 1, 4)
MASK4 = np.ones((1, 1, 4), dtype=bool)


def _volume(seed: int = 0, n: int = 14):
    """A smooth-ish random volume and a ball mask, for the property tests."""
    rng = np.random.default_rng(seed)
    ref = rng.normal(0.0, 0.05, size=(n, n, n))
    ref[4:9, 3:10, 5:8] += 0.1
    idx = np.indices((n, n, n)) - (n - 1) / 2.0
    mask = (idx ** 2).sum(axis=0) <= (0.42 * n) ** 2
    return ref, mask


def test_nrmse_psnr_pearson_by_hand():
    # diff = [-1, 0, 0, 1]; ||diff|| = sqrt(2); ||r|| = sqrt(4 + 1 + 0 + 9) = sqrt(14)
    assert metrics.nrmse(X4, REF4, MASK4) == pytest.approx(100.0 * math.sqrt(2.0 / 14.0))
    # RMSE = sqrt(2 / 4); peak = max|r| = 3
    assert metrics.psnr(X4, REF4, MASK4) == pytest.approx(20.0 * math.log10(3.0 / math.sqrt(0.5)))
    # sum(x r) = 6 + 1 + 0 + 12 = 19; sum x^2 = 26; sum r^2 = 14
    assert metrics.pearson(X4, REF4, MASK4) == pytest.approx(19.0 / math.sqrt(26.0 * 14.0))


def test_mask_selects_voxels_and_outside_values_do_not_matter():
    mask = np.array([True, True, True, False]).reshape(1, 1, 4)
    x = X4.copy()
    x[0, 0, 3] = 1e6  # outside the mask
    # in mask: ref [1, 2, 3] -> [-1, 0, 1]; x [0, 2, 3] -> [-5/3, 1/3, 4/3]
    diff = np.array([-5 / 3 + 1, 1 / 3, 4 / 3 - 1])
    expected = 100.0 * math.sqrt(float((diff ** 2).sum())) / math.sqrt(2.0)
    assert metrics.nrmse(x, REF4, mask) == pytest.approx(expected)
    ref, m = _volume()
    x = ref + np.random.default_rng(1).normal(0.0, 0.02, size=ref.shape)
    x_changed = np.where(m, x, 123.0)
    ref_changed = np.where(m, ref, -7.0)
    a = metrics.all_metrics(x, ref, m)
    b = metrics.all_metrics(x_changed, ref_changed, m)
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-12), key


def _log_value(d: int, sigma: float = 1.5, half: int = 7) -> float:
    """LoG kernel value at offset (0, 0, d), from 1D Gaussian sums (the 3D sums factorise)."""
    t = range(-half, half + 1)
    g = [math.exp(-u * u / (2 * sigma ** 2)) for u in t]
    g0 = sum(g)
    g2 = sum(gi * u * u for gi, u in zip(g, t))
    total = g0 ** 3  # sum of the unnormalised 3D Gaussian
    # mean over the 15^3 grid of h (|x|^2/s^4 - 3/s^2), with sum g|x|^2 = 3 g2 g0^2
    mean = (3 * g2 * g0 ** 2 / sigma ** 4 - 3 * g0 ** 3 / sigma ** 2) / total / (2 * half + 1) ** 3
    gd = math.exp(-d * d / (2 * sigma ** 2))
    return gd / total * (d * d / sigma ** 4 - 3 / sigma ** 2) - mean


def test_hfen_by_hand():
    ref = np.array([0.0, 1.0, 5.0]).reshape(1, 1, 3)   # demeaned [-2, -1, 3]
    x = np.array([1.0, 1.0, 4.0]).reshape(1, 1, 3)     # demeaned [-1, -1, 2]
    mask = np.ones((1, 1, 3), dtype=bool)
    r, xv = [-2.0, -1.0, 3.0], [-1.0, -1.0, 2.0]
    k = {d: _log_value(d) for d in range(-2, 3)}
    # 'same' filtering with zero padding: f[p] = sum_q K(p - q) v[q]
    fr = [sum(k[p - q] * r[q] for q in range(3)) for p in range(3)]
    fx = [sum(k[p - q] * xv[q] for q in range(3)) for p in range(3)]
    expected = 100.0 * math.sqrt(sum((a - b) ** 2 for a, b in zip(fx, fr))) / math.sqrt(sum(b * b for b in fr))
    assert metrics.hfen(x, ref, mask) == pytest.approx(expected, rel=1e-9)
    kernel = metrics.log_kernel()
    assert kernel.shape == (15, 15, 15)
    assert kernel.sum() == pytest.approx(0.0, abs=1e-12)
    assert kernel[7, 7, 9] == pytest.approx(_log_value(2), rel=1e-12)


def _ssim_by_hand(a, b, c1, c2):
    """SSIM of two length-2 lines (1 x 1 x 2 volumes): 7-tap Gaussian window, replicated ends."""
    w = [math.exp(-t * t / (2 * 1.5 ** 2)) for t in range(-3, 4)]
    w = [v / sum(w) for v in w]

    def local_mean(v, p):
        return sum(wt * v[min(max(p + t, 0), 1)] for wt, t in zip(w, range(-3, 4)))

    values = []
    for p in range(2):
        ma, mb = local_mean(a, p), local_mean(b, p)
        va = local_mean([u * u for u in a], p) - ma * ma
        vb = local_mean([u * u for u in b], p) - mb * mb
        cov = local_mean([u * v for u, v in zip(a, b)], p) - ma * mb
        values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma * ma + mb * mb + c1) * (va + vb + c2)))
    return sum(values) / 2


def test_xsim_and_ssim_by_hand():
    ref = np.array([0.0, 1.0]).reshape(1, 1, 2)   # demeaned [-0.5, 0.5]
    x = np.array([0.0, 0.5]).reshape(1, 1, 2)     # demeaned [-0.25, 0.25]
    mask = np.ones((1, 1, 2), dtype=bool)
    expected_xsim = _ssim_by_hand([-0.25, 0.25], [-0.5, 0.5], 0.01 ** 2, 0.001 ** 2)
    assert metrics.xsim(x, ref, mask) == pytest.approx(expected_xsim, rel=1e-9)
    # joint range [-0.5, 0.5] -> [0, 1]: x -> [0.25, 0.75], ref -> [0, 1]
    expected_ssim = _ssim_by_hand([0.25, 0.75], [0.0, 1.0], 0.01 ** 2, 0.03 ** 2)
    assert metrics.ssim(x, ref, mask) == pytest.approx(expected_ssim, rel=1e-9)
    assert expected_xsim != pytest.approx(expected_ssim)


def test_identity_and_constant_offset():
    ref, mask = _volume()
    for x in (ref, ref + 0.3):  # a constant offset is removed by the demeaning
        m = metrics.all_metrics(x, ref, mask)
        assert m["nrmse"] == pytest.approx(0.0, abs=1e-9)
        assert m["hfen"] == pytest.approx(0.0, abs=1e-9)
        assert m["xsim"] == pytest.approx(1.0)
        assert m["ssim"] == pytest.approx(1.0)
        assert m["pearson"] == pytest.approx(1.0)
        assert m["psnr"] > 150.0


def test_scaling_behaviour():
    ref, mask = _volume()
    for c in (0.5, 2.0, -1.0):
        m = metrics.all_metrics(c * ref, ref, mask)
        assert m["nrmse"] == pytest.approx(100.0 * abs(c - 1.0))
        assert m["hfen"] == pytest.approx(100.0 * abs(c - 1.0))
        assert m["pearson"] == pytest.approx(math.copysign(1.0, c))
        assert m["xsim"] < 1.0
    # XSIM sees a contrast loss that Pearson cannot; the smaller the scale, the lower the XSIM
    assert metrics.xsim(0.5 * ref, ref, mask) > metrics.xsim(0.2 * ref, ref, mask)
    assert metrics.psnr(0.9 * ref, ref, mask) > metrics.psnr(0.5 * ref, ref, mask)
    # NRMSE of a constant (all-zero after demeaning) reconstruction is 100 %, Pearson 0 by convention
    flat = np.zeros_like(ref)
    assert metrics.nrmse(flat, ref, mask) == pytest.approx(100.0)
    assert metrics.pearson(flat, ref, mask) == 0.0


def test_noise_worsens_every_metric():
    ref, mask = _volume()
    noise = np.random.default_rng(3).normal(0.0, 1.0, size=ref.shape)
    low = metrics.all_metrics(ref + 0.01 * noise, ref, mask)
    high = metrics.all_metrics(ref + 0.05 * noise, ref, mask)
    assert set(low) == {"nrmse", "hfen", "ssim", "xsim", "psnr", "pearson"}
    assert all(isinstance(v, float) for v in low.values())
    assert high["nrmse"] > low["nrmse"] and high["hfen"] > low["hfen"]
    assert high["xsim"] < low["xsim"] and high["ssim"] < low["ssim"]
    assert high["psnr"] < low["psnr"] and high["pearson"] < low["pearson"]
    for name in low:
        assert getattr(metrics, name)(ref + 0.01 * noise, ref, mask) == pytest.approx(low[name])


def test_bad_inputs_raise():
    ref, mask = _volume()
    with pytest.raises(QSMInputError, match="shapes differ"):
        metrics.nrmse(ref[:-1], ref, mask)
    with pytest.raises(QSMInputError, match="shapes differ"):
        metrics.xsim(ref, ref, mask[:, :, :-1])
    with pytest.raises(QSMInputError, match="empty"):
        metrics.hfen(ref, ref, np.zeros_like(mask))
    with pytest.raises(QSMInputError, match="3D"):
        metrics.psnr(ref[0], ref[0], mask[0])
    bad = ref.copy()
    bad[mask.nonzero()[0][0], mask.nonzero()[1][0], mask.nonzero()[2][0]] = np.nan
    with pytest.raises(QSMInputError, match="NaN"):
        metrics.all_metrics(bad, ref, mask)
    with pytest.raises(QSMInputError, match="constant"):
        metrics.ssim(ref, np.full_like(ref, 2.0), mask)
