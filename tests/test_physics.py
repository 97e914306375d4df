"""Dipole kernel and forward model against the analytic field of a uniformly magnetised sphere."""
import numpy as np
import pytest
import torch

from qsmdip.kernel import dipole_kernel, padded_shape
from qsmdip.operator import DipoleOperator, forward_field


def sphere_volume_fraction(shape, voxel_size_mm, centre_mm, radius_mm, supersample=4):
    """Partial-volume sphere: the fraction of each voxel inside the sphere (supersampled)."""
    offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
    frac = np.zeros(shape)
    grids = [np.arange(n) for n in shape]
    for ox in offsets:
        for oy in offsets:
            for oz in offsets:
                x = (grids[0][:, None, None] + ox) * voxel_size_mm[0] - centre_mm[0]
                y = (grids[1][None, :, None] + oy) * voxel_size_mm[1] - centre_mm[1]
                z = (grids[2][None, None, :] + oz) * voxel_size_mm[2] - centre_mm[2]
                frac += (x ** 2 + y ** 2 + z ** 2) <= radius_mm ** 2
    return frac / supersample ** 3


def analytic_sphere_field(shape, voxel_size_mm, centre_mm, radius_mm, chi, b0):
    """dB/B0 of a sphere (Lorentz-corrected): chi/3 (a/r)^3 (3 cos^2 - 1) outside, 0 inside."""
    idx = np.indices(shape).astype(float)
    pos = np.stack([idx[a] * voxel_size_mm[a] - centre_mm[a] for a in range(3)])
    r = np.sqrt((pos ** 2).sum(0))
    b = np.asarray(b0) / np.linalg.norm(b0)
    cos_t = np.tensordot(b, pos, axes=1) / np.maximum(r, 1e-9)
    field = chi / 3 * (radius_mm / np.maximum(r, 1e-9)) ** 3 * (3 * cos_t ** 2 - 1)
    field[r <= radius_mm] = 0.0
    return field, r


@pytest.mark.parametrize(
    "voxel_size_mm, b0",
    [
        ((1.0, 1.0, 1.0), (0.0, 0.0, 1.0)),                                # axial
        ((1.0, 1.0, 1.0), (np.sin(0.5), 0.3, np.cos(0.5))),                # oblique
        ((0.8, 1.0, 1.6), (0.0, 0.0, 1.0)),                                # anisotropic voxels
        ((0.8, 1.0, 1.6), (0.2, np.sin(0.6), np.cos(0.6))),                # both
    ],
)
def test_sphere_field_matches_analytic(voxel_size_mm, b0):
    extent_mm = 56.0
    shape = tuple(int(round(extent_mm / v)) for v in voxel_size_mm)
    centre = [n * v / 2 for n, v in zip(shape, voxel_size_mm)]
    radius, chi = 7.0, 0.5
    chi_map = chi * sphere_volume_fraction(shape, voxel_size_mm, centre, radius)
    simulated = forward_field(chi_map, voxel_size_mm, b0)
    expected, r = analytic_sphere_field(shape, voxel_size_mm, centre, radius, chi, b0)
    # Compare away from the staircased surface and from the box edges.
    shell = (r > radius + 2.5) & (r < 2.5 * radius)
    err = np.abs(simulated - expected)[shell]
    peak = chi / 3 * 2
    assert np.percentile(err, 95) < 0.03 * peak
    assert np.max(err) < 0.08 * peak
    # The pattern is the dipole one: positive along B0, negative across it.
    corr = np.corrcoef(simulated[shell], expected[shell])[0, 1]
    assert corr > 0.995
    # Inside, the Lorentz-corrected field is zero up to discretisation (Gibbs ringing at 1.6 mm).
    inside = r < radius - 2.5
    assert np.abs(simulated[inside]).max() < 0.07 * peak


def test_float32_forward_field_matches_float64():
    """The realistic phantom computes its fine-grid field in float32 to fit 1 mm in memory: it must agree with
    float64 far below any simulated noise (the phantom's is about 1 % of the field's spread)."""
    shape, vs = (40, 44, 36), (1.0, 1.0, 1.0)
    chi_map = 0.5 * sphere_volume_fraction(shape, vs, [20.0, 22.0, 18.0], 6.0, supersample=2)
    wide = forward_field(chi_map, vs, (np.sin(0.3), 0, np.cos(0.3)))
    narrow = forward_field(chi_map, vs, (np.sin(0.3), 0, np.cos(0.3)), dtype=torch.float32)
    assert wide.dtype == np.float64 and narrow.dtype == np.float32
    assert np.abs(narrow - wide).max() < 1e-5 * np.abs(wide).max()


def test_wrong_b0_direction_is_detectably_wrong():
    shape, vs = (48, 48, 48), (1.0, 1.0, 1.0)
    centre = [24.0, 24.0, 24.0]
    chi_map = 0.5 * sphere_volume_fraction(shape, vs, centre, 6.0, supersample=2)
    expected, r = analytic_sphere_field(shape, vs, centre, 6.0, 0.5, (0, 0, 1))
    shell = (r > 8.5) & (r < 15)
    tilted = forward_field(chi_map, vs, (np.sin(0.4), 0, np.cos(0.4)))
    axial = forward_field(chi_map, vs, (0, 0, 1))
    err_axial = np.abs(axial - expected)[shell].mean()
    err_tilted = np.abs(tilted - expected)[shell].mean()
    assert err_tilted > 5 * err_axial


def test_kernel_axis_order_is_ij_not_xy():
    """A non-square matrix: the kernel must follow [i, j, k] (the original code transposed i and j)."""
    shape, vs = (8, 12, 16), (1.0, 2.0, 3.0)
    d = dipole_kernel(shape, vs, (1.0, 0.0, 0.0))
    assert d.shape == shape
    k_i = np.fft.fftfreq(8, 1.0)
    # Along the i axis (j = k = 0), k is parallel to B0 = i: D = 1/3 - 1 = -2/3.
    assert np.allclose(d[1:, 0, 0], -2.0 / 3.0)
    # Along the j axis, k is perpendicular to B0: D = 1/3.
    assert np.allclose(d[0, 1:, 0], 1.0 / 3.0)
    assert d[0, 0, 0] == 0.0
    # Half spectrum equals the first n//2 planes of the full one (the Nyquist plane is +0.5 vs -0.5).
    half = dipole_kernel(shape, vs, (0.3, 0.4, 0.5), half=True)
    full = dipole_kernel(shape, vs, (0.3, 0.4, 0.5))
    assert half.shape == (8, 12, 16 // 2 + 1)
    assert np.allclose(half[..., : 16 // 2], full[..., : 16 // 2])
    assert k_i.shape == (8,)


def test_kernel_uses_voxel_size_scaling():
    """k is in cycles/mm: an oblique B0 in an anisotropic grid gives a different kernel than isotropic."""
    b0 = (0.0, np.sqrt(0.5), np.sqrt(0.5))
    iso = dipole_kernel((16, 16, 16), (1, 1, 1), b0)
    aniso = dipole_kernel((16, 16, 16), (1, 1, 3), b0)
    # Frequency index (0, 1, 1): iso k = (0, 1/16, 1/16) -> k.b = |k|, D = 1/3 - 1.
    assert np.isclose(iso[0, 1, 1], 1 / 3 - 1)
    kj, kk = 1 / 16, 1 / 48
    expected = 1 / 3 - ((kj + kk) * np.sqrt(0.5)) ** 2 / (kj ** 2 + kk ** 2)
    assert np.isclose(aniso[0, 1, 1], expected)


def test_padding_sizes_are_fast_and_large_enough():
    for n in (7, 33, 94, 98, 116, 181):
        (m, _, _) = padded_shape((n, n, n), 2.0)
        assert m >= 2 * n - 1
        factors = m
        for p in (2, 3, 5):
            while factors % p == 0:
                factors //= p
        assert factors == 1
    assert padded_shape((30, 31, 32), 1.0) == (30, 32, 32)
    with pytest.raises(ValueError):
        padded_shape((10, 10, 10), 0.5)


def test_operator_is_self_adjoint_and_batched():
    rng = np.random.default_rng(0)
    shape = (9, 10, 11)
    op = DipoleOperator(shape, (1.0, 1.2, 0.9), (0.1, 0.2, 0.97), dtype=torch.float64)
    x = torch.as_tensor(rng.standard_normal(shape))
    y = torch.as_tensor(rng.standard_normal(shape))
    assert torch.isclose((op(x) * y).sum(), (x * op.adjoint(y)).sum(), rtol=1e-10)
    batch = torch.stack([x, y])[:, None]
    out = op(batch)
    assert out.shape == (2, 1) + shape
    assert torch.allclose(out[1, 0], op(y))
    with pytest.raises(ValueError):
        op(torch.zeros(4, 4, 4, dtype=torch.float64))


def test_unpadded_convolution_wraps_and_padded_does_not():
    """Without padding a source near one edge leaks to the opposite edge; with the default it does not."""
    shape = (32, 32, 32)
    chi = np.zeros(shape)
    chi[15:17, 15:17, 1:3] = 1.0
    wrapped = forward_field(chi, (1, 1, 1), (0, 0, 1), pad_factor=1.0)
    padded = forward_field(chi, (1, 1, 1), (0, 0, 1))
    # Field on the far edge along B0 (k = 31): close to the source only through the wrap-around.
    assert abs(wrapped[16, 16, 31]) > 3 * abs(padded[16, 16, 31])
