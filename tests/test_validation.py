"""User-input checks: every bad field / mask / units combination gets a clear one-line error."""
import numpy as np
import pytest

from qsmdip.errors import QSMInputError
from qsmdip.io import EchoSeries, Volume, volume_like
from qsmdip.units import GAMMA_BAR_MHZ_PER_T
from qsmdip.validation import binarise_mask, check_magnitude, check_reference, prepare_inputs

SHAPE = (12, 10, 8)
SPACING = (1.0, 1.0, 2.0)
ORIGIN = (10.0, -20.0, 30.0)


def ball_mask():
    i, j, k = np.indices(SHAPE)
    return ((i - 6) ** 2 + (j - 5) ** 2 + ((k - 4) * 2) ** 2 <= 16).astype(np.uint8)


def field_volume(values=None):
    if values is None:
        values = 0.05 * np.random.default_rng(1).standard_normal(SHAPE)
    return Volume(np.asarray(values, dtype=np.float32), SPACING, ORIGIN)


def test_good_inputs_pass_unchanged():
    field, mask = field_volume(), volume_like(field_volume(), ball_mask())
    field_ppm, inside, warnings = prepare_inputs(field, mask, units="ppm")
    assert field_ppm.dtype == np.float32 and inside.dtype == bool
    assert np.array_equal(field_ppm, field.array)
    assert np.array_equal(inside, ball_mask() == 1)
    assert warnings == []


def test_hz_field_is_converted_to_ppm():
    field = field_volume()
    hz = volume_like(field, field.array * GAMMA_BAR_MHZ_PER_T * 3.0)
    field_ppm, _, warnings = prepare_inputs(hz, volume_like(field, ball_mask()), units="Hz", b0_tesla=3.0)
    np.testing.assert_allclose(field_ppm, field.array, rtol=1e-5, atol=1e-8)
    assert warnings == []


def test_shape_mismatch_gives_both_shapes():
    mask = Volume(np.ones((12, 10, 9)), SPACING, ORIGIN)
    with pytest.raises(QSMInputError, match=r"\(12, 10, 8\).*\(12, 10, 9\)"):
        prepare_inputs(field_volume(), mask, units="ppm")


@pytest.mark.parametrize("change, word", [
    (dict(spacing_mm=(1.0, 1.0, 2.5)), "spacing"),
    (dict(origin=(10.0, -20.0, 31.0)), "origin"),
    (dict(direction=np.diag([-1.0, -1.0, 1.0])), "direction"),
])
def test_geometry_mismatch_says_what_differs(change, word):
    geometry = dict(spacing_mm=SPACING, origin=ORIGIN, direction=np.eye(3))
    geometry.update(change)
    mask = Volume(ball_mask(), **geometry)
    with pytest.raises(QSMInputError, match=f"different grids: {word}"):
        prepare_inputs(field_volume(), mask, units="ppm")


def test_empty_mask_is_refused():
    field = field_volume()
    with pytest.raises(QSMInputError, match="mask is empty"):
        prepare_inputs(field, volume_like(field, np.zeros(SHAPE)), units="ppm")
    with pytest.raises(QSMInputError, match="mask is empty"):  # nothing survives the 0.5 threshold
        prepare_inputs(field, volume_like(field, np.full(SHAPE, 0.3)), units="ppm")


def test_nan_inside_mask_is_refused_with_count():
    values = field_volume().array.copy()
    values[6, 5, 4] = np.nan
    values[6, 5, 3] = np.inf
    field = field_volume(values)
    with pytest.raises(QSMInputError, match="2 NaN/Inf voxels inside the mask"):
        prepare_inputs(field, volume_like(field, ball_mask()), units="ppm")


def test_nan_outside_mask_is_zeroed_with_warning():
    values = field_volume().array.copy()
    values[0, 0, 0] = np.nan
    field = field_volume(values)
    field_ppm, _, warnings = prepare_inputs(field, volume_like(field, ball_mask()), units="ppm")
    assert field_ppm[0, 0, 0] == 0 and np.all(np.isfinite(field_ppm))
    assert any("1 NaN/Inf field voxels outside the mask" in w for w in warnings)


def test_probability_mask_is_thresholded_with_warning():
    field = field_volume()
    probabilities = 0.9 * ball_mask() + 0.2 * (1 - ball_mask())
    _, inside, warnings = prepare_inputs(field, volume_like(field, probabilities), units="ppm")
    assert np.array_equal(inside, ball_mask() == 1)
    assert len(warnings) == 1 and "thresholded at > 0.5" in warnings[0]


def test_label_map_takes_every_label_as_inside():
    labels = ball_mask() * 3
    labels[6, 5, 4] = 7
    inside, warnings = binarise_mask(labels)
    assert np.array_equal(inside, ball_mask() == 1)
    assert "label map (labels 3, 7)" in warnings[0]
    assert binarise_mask(ball_mask().astype(bool))[1] == []


@pytest.mark.parametrize("values, message", [
    (np.linspace(0, 200.5, np.prod(SHAPE)).reshape(SHAPE), "looks like an image"),
    (np.where(ball_mask() == 1, 1.0, -1.0), "negative"),
    (np.where(ball_mask() == 1, 1.0, np.nan), "NaN/Inf"),
])
def test_masks_that_are_not_masks_are_refused(values, message):
    with pytest.raises(QSMInputError, match=message):
        binarise_mask(values)


@pytest.mark.parametrize("units, kwargs, message", [
    ("hz", {}, "B0"),
    ("rad", {"b0_tesla": 3.0}, "echo time"),
    ("gauss", {}, "unknown field unit"),
])
def test_units_without_b0_or_te_are_refused(units, kwargs, message):
    field = field_volume()
    with pytest.raises(QSMInputError, match=message):
        prepare_inputs(field, volume_like(field, ball_mask()), units=units, **kwargs)


def test_field_in_hz_declared_as_ppm_is_refused():
    field = field_volume()
    hz = volume_like(field, field.array * 300.0)  # a field of tens of Hz, as at 3-7 T
    with pytest.raises(QSMInputError, match="implausible for a local field.*--units hz"):
        prepare_inputs(hz, volume_like(field, ball_mask()), units="ppm")


def test_large_but_possible_field_warns():
    field = field_volume()
    strong = volume_like(field, field.array * 20.0 + 3.0)  # spread about 3 ppm, and an offset
    _, _, warnings = prepare_inputs(strong, volume_like(field, ball_mask()), units="ppm")
    assert len(warnings) == 1 and "large for a local field" in warnings[0]


def head_fields():
    """The 4 mm head phantom's local field, and the same with a haemorrhage and the background field of the
    head in air (unshimmed, 9.4 ppm between tissue and air) added: the most a field in ppm should hold."""
    from scipy import ndimage

    from qsmdip.operator import forward_field
    from qsmdip.phantom import make_head_phantom

    ph = make_head_phantom(None, (4.0, 4.0, 4.0))
    i, j, k = np.indices(ph.mask.shape)
    centre = np.argwhere(ph.mask).mean(axis=0) + (6, 0, 0)
    bleed = (i - centre[0]) ** 2 + (j - centre[1]) ** 2 + (k - centre[2]) ** 2 <= 2.5 ** 2   # 10 mm radius
    head = ndimage.binary_dilation(ph.mask, iterations=3)   # tissue around the brain; air outside the head
    extra = forward_field(np.where(bleed, 1.5, 0.0) + np.where(head, 9.4, 0.0), ph.voxel_size_mm, ph.b0_dir)
    total = np.where(ph.mask, ph.field_ppm + extra, 0.0)
    return ph, total


def test_realistic_ppm_fields_are_accepted_and_hz_refused():
    ph, total = head_fields()
    grid = Volume(ph.field_ppm, ph.voxel_size_mm)
    mask = volume_like(grid, ph.mask.astype(np.uint8))
    assert prepare_inputs(grid, mask, units="ppm")[2] == []                       # a local field
    _, _, warnings = prepare_inputs(volume_like(grid, total), mask, units="ppm")  # haemorrhage + background
    assert len(warnings) == 1 and "large for a local field" in warnings[0]
    for b0 in (1.5, 3.0):   # the local field in Hz, declared as ppm
        hz = volume_like(grid, ph.field_ppm * GAMMA_BAR_MHZ_PER_T * b0)
        with pytest.raises(QSMInputError, match="implausible for a local field in ppm.*--units hz --b0"):
            prepare_inputs(hz, mask, units="ppm")
        converted, _, warnings = prepare_inputs(hz, mask, units="hz", b0_tesla=b0)
        assert warnings == [] and np.allclose(converted, ph.field_ppm, atol=1e-6)


def test_all_zero_field_is_refused():
    field = field_volume(np.where(ball_mask() == 1, 0.0, 0.1))  # non-zero only outside the mask
    with pytest.raises(QSMInputError, match="zero everywhere inside the mask"):
        prepare_inputs(field, volume_like(field, ball_mask()), units="ppm")


def test_reference_checks():
    field = field_volume()
    chi = 0.1 * ball_mask().astype(np.float32)
    chi[0, 0, 0] = np.nan
    reference, warnings = check_reference(volume_like(field, chi), field)
    assert reference[0, 0, 0] == 0 and reference[6, 5, 4] == pytest.approx(0.1)
    assert "1 NaN/Inf reference voxels" in warnings[0]
    with pytest.raises(QSMInputError, match="ppb"):
        check_reference(volume_like(field, 100.0 * ball_mask()), field)
    with pytest.raises(QSMInputError, match="zero everywhere"):
        check_reference(volume_like(field, np.zeros(SHAPE)), field)
    with pytest.raises(QSMInputError, match="reference shape"):
        check_reference(Volume(np.ones((3, 3, 3))), field)


def magnitude_array(seed=2):
    """A GRE-magnitude-like image: positive, brighter inside the ball, integer-valued as scanners store it."""
    noise = np.random.default_rng(seed).uniform(0, 50, SHAPE)
    return np.round(300.0 * ball_mask() + 100 + noise).astype(np.uint16)


def test_3d_magnitude_is_accepted_as_float32():
    field = field_volume()
    magnitude, warnings = check_magnitude(volume_like(field, magnitude_array()), field)
    assert magnitude.dtype == np.float32 and magnitude.shape == SHAPE
    assert np.array_equal(magnitude, magnitude_array().astype(np.float32))
    assert warnings == []


def test_echoes_are_combined_by_root_sum_of_squares():
    field = field_volume()
    echoes = np.stack([magnitude_array(1), magnitude_array(2) // 2, magnitude_array(3) // 4], axis=-1)
    echoes[0, 0, 0] = (3, 4, 12)   # sqrt(9 + 16 + 144) = 13
    series = EchoSeries(echoes, SPACING, ORIGIN)
    magnitude, warnings = check_magnitude(series, field)
    assert magnitude[0, 0, 0] == 13.0
    expected = np.sqrt(np.sum(echoes.astype(np.float64) ** 2, axis=-1))
    np.testing.assert_allclose(magnitude, expected, rtol=1e-6)
    assert warnings == ["magnitude has 3 echoes: combined by root sum of squares"]
    one = EchoSeries(magnitude_array()[..., None], SPACING, ORIGIN)   # a 3D file read as a series
    assert np.array_equal(check_magnitude(one, field)[0], magnitude_array()) and check_magnitude(one, field)[1] == []


@pytest.mark.parametrize("geometry, message", [
    (dict(spacing_mm=SPACING, origin=ORIGIN, shape=(12, 10, 9)), r"field shape \(12, 10, 8\) and magnitude shape"),
    (dict(spacing_mm=(1.0, 1.0, 2.5), origin=ORIGIN), "field and magnitude are on different grids: spacing"),
    (dict(spacing_mm=SPACING, origin=(10.0, -20.0, 31.0)), "field and magnitude are on different grids: origin"),
    (dict(spacing_mm=SPACING, origin=ORIGIN, direction=np.diag([-1.0, -1.0, 1.0])), "different grids: direction"),
])
def test_magnitude_on_another_grid_is_refused(geometry, message):
    shape = geometry.pop("shape", SHAPE)
    for magnitude in (Volume(np.ones(shape), **geometry), EchoSeries(np.ones(shape + (2,)), **geometry)):
        with pytest.raises(QSMInputError, match=message):
            check_magnitude(magnitude, field_volume())


def with_value(values, index, value):
    values = np.array(values, dtype=np.float32)
    values[index] = value
    return values


@pytest.mark.parametrize("values, message", [
    (np.zeros(SHAPE), "the magnitude is zero everywhere"),
    (with_value(magnitude_array(), (6, 5, 4), -2.5), r"negative values \(minimum -2\.5\)"),
    (with_value(magnitude_array(), (6, 5, 4), np.nan), "the magnitude has 1 NaN/Inf values"),
    (with_value(magnitude_array(), (0, 0, 0), np.inf), "the magnitude has 1 NaN/Inf values"),
])
def test_bad_magnitudes_are_refused_with_one_line(values, message):
    field = field_volume()
    with pytest.raises(QSMInputError, match=message) as info:
        check_magnitude(volume_like(field, values), field)
    assert "\n" not in str(info.value)


def test_negative_echo_is_refused_although_its_square_would_hide_it():
    echoes = np.stack([magnitude_array(), with_value(magnitude_array(), (3, 3, 3), -1.0)], axis=-1)
    with pytest.raises(QSMInputError, match="negative values"):
        check_magnitude(EchoSeries(echoes, SPACING, ORIGIN), field_volume())


def test_lists_of_text_are_checked_as_text_and_lists_of_numbers_as_numbers():
    import dataclasses
    from typing import List, Sequence

    from qsmdip.validation import check_types

    @dataclasses.dataclass
    class Fields:
        notes: List[str]
        radii: Sequence[float]

    checked = check_types(Fields, {"notes": ("a", "b"), "radii": [3, 6]}, "x")
    assert checked == {"notes": ["a", "b"], "radii": (3.0, 6.0)}
    assert check_types(Fields, {"notes": []}, "x") == {"notes": []}  # no notes is fine; no radii is not
    with pytest.raises(QSMInputError, match="x notes=\\[1\\] is invalid: it must be a list of texts"):
        check_types(Fields, {"notes": [1]}, "x")
    with pytest.raises(QSMInputError, match="a list of finite numbers"):
        check_types(Fields, {"radii": ["3"]}, "x")
    with pytest.raises(QSMInputError, match="a list of finite numbers"):
        check_types(Fields, {"radii": []}, "x")
