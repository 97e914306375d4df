"""The numerical head phantom: geometry in mm, labels and values, forward field, noise, B0 direction."""
import numpy as np
import pytest

from qsmdip.errors import QSMInputError
from qsmdip.operator import forward_field
from qsmdip.phantom import HEAD_BOX_MM, TISSUES, default_shape, make_head_phantom

VS = (4.0, 4.0, 4.0)


@pytest.fixture(scope="module")
def flat():
    """Piecewise-constant phantom at 4 mm, noise-free."""
    return make_head_phantom(voxel_size_mm=VS, texture_ppm=0.0)


def test_default_shape_follows_voxel_size():
    assert default_shape((2.0, 2.0, 2.0)) == (98, 116, 94)
    assert default_shape((1.0, 1.0, 1.0)) == (196, 232, 188)
    for vs in [(4.0, 4.0, 4.0), (3.0, 2.5, 3.5)]:
        extent = np.array(default_shape(vs)) * np.array(vs)
        assert np.all(np.abs(extent - np.array(HEAD_BOX_MM)) <= np.array(vs) / 2 + 1e-9)


def test_fields_types_and_shapes(flat):
    assert flat.chi_ppm.shape == flat.mask.shape == flat.field_ppm.shape == flat.labels.shape == (49, 58, 47)
    assert flat.chi_ppm.dtype == np.float32 and flat.field_ppm.dtype == np.float32
    assert flat.mask.dtype == bool
    assert np.issubdtype(flat.labels.dtype, np.integer)
    assert flat.voxel_size_mm == VS and flat.b0_dir == (0.0, 0.0, 1.0)
    assert flat.label_names == {k: name for k, (name, _) in TISSUES.items()}


def test_every_label_present_with_its_value(flat):
    present = set(np.unique(flat.labels).tolist())
    assert present == set(TISSUES)
    for label, (name, value) in TISSUES.items():
        assert np.allclose(flat.chi_ppm[flat.labels == label], value, atol=1e-7), name
    np.testing.assert_array_equal(flat.mask, flat.labels != 0)
    # paired nuclei on both sides of the midline (axis i)
    i_mm = (np.arange(flat.labels.shape[0]) - (flat.labels.shape[0] - 1) / 2) * VS[0]
    for label in (4, 5, 6, 7, 8, 9, 10):
        where_i = i_mm[np.nonzero(flat.labels == label)[0]]
        assert (where_i < 0).any() and (where_i > 0).any(), TISSUES[label][0]
    # the calcification is diamagnetic, the bleed strongly paramagnetic
    assert flat.chi_ppm[flat.labels == 12].max() < -0.1
    assert flat.chi_ppm[flat.labels == 13].min() > 0.5


def test_mask_is_brain_like(flat):
    m = flat.mask
    assert 0.10 < m.mean() < 0.25
    volume_ml = m.sum() * np.prod(VS) / 1000.0
    assert 1000.0 < volume_ml < 1800.0
    # longer front-to-back than left-right than top-to-bottom extent of the cerebrum... and not a ball
    extent = [np.ptp(np.nonzero(m)[a]) * VS[a] for a in range(3)]
    assert extent[1] > extent[0]
    # not symmetric top-bottom (flat base, cerebellum, brainstem) nor front-back
    assert (m != m[:, :, ::-1]).mean() > 0.03
    assert (m != m[:, ::-1, :]).mean() > 0.03
    # grey-matter shell around white matter: the mask's border voxels are cortex (or vein)
    border = m & ~np.pad(m, 1)[2:, 1:-1, 1:-1]
    assert np.isin(flat.labels[border], (2, 11)).mean() > 0.9


def test_anatomy_is_defined_in_mm():
    small = make_head_phantom((45, 54, 43), VS, texture_ppm=0.0)
    full = make_head_phantom(voxel_size_mm=VS, texture_ppm=0.0)
    # both grids are centred on the same point: the smaller matrix is the central crop
    np.testing.assert_array_equal(small.labels, full.labels[2:47, 2:56, 2:45])
    coarse = make_head_phantom(voxel_size_mm=(3.0, 3.0, 3.0), texture_ppm=0.0)
    v_full = full.mask.sum() * 64.0
    v_coarse = coarse.mask.sum() * 27.0
    assert v_coarse == pytest.approx(v_full, rel=0.03)
    for label in (5, 7):  # putamen, thalamus: big enough to compare volumes across resolutions
        assert (coarse.labels == label).sum() * 27.0 == pytest.approx((full.labels == label).sum() * 64.0, rel=0.35)


def test_field_is_forward_model_of_chi_inside_mask(flat):
    expected = forward_field(flat.chi_ppm, VS, (0.0, 0.0, 1.0))
    np.testing.assert_allclose(flat.field_ppm[flat.mask], expected[flat.mask], atol=1e-6)
    assert np.all(flat.field_ppm[~flat.mask] == 0)
    assert np.abs(flat.field_ppm[flat.mask]).max() > 0.05  # the bleed and veins make a real field


def test_noise_matches_its_definition(flat):
    noisy = make_head_phantom(voxel_size_mm=VS, texture_ppm=0.0, snr=4.0, seed=7)
    m = flat.mask
    rms = np.sqrt(np.mean(flat.field_ppm[m].astype(np.float64) ** 2))
    noise = noisy.field_ppm.astype(np.float64) - flat.field_ppm
    assert noisy.noise_std_ppm == pytest.approx(rms / 4.0, rel=1e-5)
    assert noise[m].std() == pytest.approx(rms / 4.0, rel=0.03)
    assert abs(noise[m].mean()) < 4 * noisy.noise_std_ppm / np.sqrt(m.sum())
    assert np.all(noise[~m] == 0)
    np.testing.assert_array_equal(noisy.chi_ppm, flat.chi_ppm)
    assert flat.noise_std_ppm == 0.0


def test_seed_determinism():
    a = make_head_phantom(voxel_size_mm=VS, snr=10.0, seed=1)
    b = make_head_phantom(voxel_size_mm=VS, snr=10.0, seed=1)
    c = make_head_phantom(voxel_size_mm=VS, snr=10.0, seed=2)
    np.testing.assert_array_equal(a.field_ppm, b.field_ppm)
    np.testing.assert_array_equal(a.chi_ppm, c.chi_ppm)
    assert not np.array_equal(a.field_ppm, c.field_ppm)


def test_oblique_b0_changes_the_field(flat):
    tilted = make_head_phantom(voxel_size_mm=VS, texture_ppm=0.0, b0_dir=(1.0, 0.0, 1.0))
    assert tilted.b0_dir == pytest.approx((2 ** -0.5, 0.0, 2 ** -0.5))
    np.testing.assert_array_equal(tilted.chi_ppm, flat.chi_ppm)
    m = flat.mask
    assert np.abs(tilted.field_ppm[m] - flat.field_ppm[m]).max() > 0.02
    expected = forward_field(tilted.chi_ppm, VS, tilted.b0_dir)
    np.testing.assert_allclose(tilted.field_ppm[m], expected[m], atol=1e-6)


def test_texture_is_mild_and_only_in_white_and_grey_matter(flat):
    textured = make_head_phantom(voxel_size_mm=VS, texture_ppm=0.005)
    diff = textured.chi_ppm - flat.chi_ppm
    soft = np.isin(flat.labels, (1, 2))
    assert np.abs(diff[soft]).max() == pytest.approx(0.005, rel=0.2)
    assert np.all(diff[~soft] == 0)


@pytest.mark.parametrize("kwargs", [
    {"shape": (10, 10)}, {"shape": (10, 0, 10)}, {"snr": 0.0}, {"snr": -3.0},
    {"b0_dir": (0.0, 0.0, 0.0)}, {"voxel_size_mm": (4.0, -4.0, 4.0)}, {"texture_ppm": -1.0},
])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(QSMInputError):
        make_head_phantom(**{"voxel_size_mm": VS, **kwargs})
