"""Field units and B0 direction from image geometry."""
import math

import numpy as np
import pytest

from qsmdip.errors import QSMInputError
from qsmdip.geometry import (b0_direction_in_voxel_frame, b0_tilted_about_i, check_voxel_size, mask_bounding_box,
                             unit_vector)
from qsmdip.units import GAMMA_BAR_MHZ_PER_T, field_to_ppm, ppm_per_unit, ppm_to_unit


def test_ppm_is_identity():
    f = np.array([0.01, -0.02], dtype=np.float32)
    assert np.array_equal(field_to_ppm(f, "ppm"), f)


def test_hz_to_ppm_at_3t():
    # 1 ppm at 3 T is 127.73 Hz (gamma_bar * B0).
    hz = np.array([GAMMA_BAR_MHZ_PER_T * 3.0])
    assert np.allclose(field_to_ppm(hz, "Hz", b0_tesla=3.0), 1.0)
    assert np.isclose(ppm_per_unit("hz", 3.0), 1 / 127.732, rtol=1e-4)


def test_rad_to_ppm_uses_te():
    # 1 ppm at 7 T over TE = 20 ms accumulates 2 pi * 298.04 Hz * 0.02 s = 37.45 rad.
    rad = 2 * math.pi * GAMMA_BAR_MHZ_PER_T * 7.0 * 0.02
    assert np.isclose(field_to_ppm(np.array([rad]), "rad", b0_tesla=7.0, te_s=0.02)[0], 1.0, rtol=1e-6)
    assert np.isclose(rad, 37.45, rtol=1e-3)


def test_round_trip_units():
    f = np.linspace(-0.1, 0.1, 7).astype(np.float32)
    for unit in ("ppm", "hz", "rad"):
        back = field_to_ppm(ppm_to_unit(f, unit, 3.0, 0.025), unit, 3.0, 0.025)
        assert np.allclose(back, f, atol=1e-7)


@pytest.mark.parametrize("unit, b0, te, needle", [
    ("hz", None, None, "B0"),
    ("rad", None, 0.02, "B0"),
    ("rad", 3.0, None, "echo time"),
    ("rad", 3.0, 20.0, "seconds"),
    ("hz", 3000.0, None, "tesla"),
    ("hz", -3.0, None, "positive"),
    ("gauss", 3.0, None, "unknown field unit"),
])
def test_units_never_guess(unit, b0, te, needle):
    with pytest.raises(QSMInputError, match=needle):
        field_to_ppm(np.zeros(3), unit, b0_tesla=b0, te_s=te)


def rotation_x(angle):
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def test_b0_axial_and_oblique():
    assert np.allclose(b0_direction_in_voxel_frame(np.eye(3)), (0, 0, 1))
    # Slices tilted by 30 degrees about x: B0 has a component along j in the voxel frame.
    d = rotation_x(math.radians(30))
    b = b0_direction_in_voxel_frame(d)
    assert np.allclose(b, (0, math.sin(math.radians(30)), math.cos(math.radians(30))))
    # the benchmarks' "tilt" is exactly that acquisition's B0, and 0 degrees is axial
    assert np.allclose(b0_tilted_about_i(30), b) and b0_tilted_about_i(0) == (0.0, 0.0, 1.0)
    # Sagittal acquisition: k axis along world x, j along world z -> B0 along j.
    sag = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], dtype=float)
    assert np.allclose(np.abs(b0_direction_in_voxel_frame(sag)), (0, 1, 0))
    # A user-given world B0 direction is honoured.
    assert np.allclose(b0_direction_in_voxel_frame(np.eye(3), (0, 2, 0)), (0, 1, 0))


def test_geometry_errors():
    with pytest.raises(QSMInputError, match="orthonormal"):
        b0_direction_in_voxel_frame(np.array([[1, 0.5, 0], [0, 1, 0], [0, 0, 1]]))
    with pytest.raises(QSMInputError, match="zero vector"):
        unit_vector((0, 0, 0))
    with pytest.raises(QSMInputError, match="voxel size"):
        check_voxel_size((1, 1, 0))
    with pytest.raises(QSMInputError, match="implausible"):
        check_voxel_size((1, 1, 100))


def test_mask_bounding_box():
    m = np.zeros((10, 12, 14), bool)
    m[3:5, 4:9, 0:2] = True
    box = mask_bounding_box(m, 2)
    assert box == (slice(1, 7), slice(2, 11), slice(0, 4))
    with pytest.raises(QSMInputError, match="empty"):
        mask_bounding_box(np.zeros((3, 3, 3), bool))
