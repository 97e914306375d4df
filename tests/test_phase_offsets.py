"""Phase-offset removal (MCPC-3D-S) against a simulated smooth offset (qsmdip.phase.offsets)."""
import numpy as np
import pytest

from qsmdip.errors import QSMInputError
from qsmdip.phase.offsets import OffsetResult, remove_phase_offsets
from qsmdip.phase.unwrap import wrap
from synthetic_phase import circular_difference, simulate

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def acquisition():
    return simulate()


def test_mcpc3ds_recovers_the_offset(acquisition):
    acq = acquisition
    result = remove_phase_offsets(acq.phases_rad, acq.magnitudes, acq.echo_times_s, acq.mask,
                                  acq.voxel_size_mm)
    assert isinstance(result, OffsetResult) and result.method == "mcpc3ds"
    assert result.phases_rad.shape == acq.phases_rad.shape and result.phases_rad.dtype == np.float32
    assert result.offset_rad.shape == acq.mask.shape and np.all(result.offset_rad[~acq.mask] == 0)
    assert any("MCPC-3D-S" in note for note in result.notes)
    error = np.abs(circular_difference(result.offset_rad, acq.offset_rad))[acq.mask]
    assert np.median(error) < 0.03 and np.percentile(error, 99) < 0.1, (np.median(error), error.max())
    # The offset spans more than 3 rad, so this is not a near-constant guess.
    assert np.ptp(acq.offset_rad[acq.mask]) > 3.0
    # Every echo is left with the field phase alone: wrapped, and within noise of the truth.
    field_phase = acq.true_phase_rad - acq.offset_rad[None]
    residual = np.abs(circular_difference(result.phases_rad, field_phase))[:, acq.mask]
    assert np.all(np.abs(result.phases_rad[:, acq.mask]) <= np.pi + 1e-5)
    assert np.median(residual) < 0.1
    # Outside the mask nothing is changed.
    np.testing.assert_allclose(result.phases_rad[:, ~acq.mask], acq.phases_rad[:, ~acq.mask], atol=1e-6)


def test_mcpc3ds_without_magnitude_and_with_uneven_echo_spacing():
    acq = simulate(echo_times_s=(0.003, 0.0075, 0.016), snr=60.0, seed=1)
    result = remove_phase_offsets(acq.phases_rad, None, acq.echo_times_s, acq.mask, acq.voxel_size_mm)
    error = np.abs(circular_difference(result.offset_rad, acq.offset_rad))[acq.mask]
    assert np.percentile(error, 99) < 0.1


def test_single_echo_is_returned_unchanged_with_a_note(acquisition):
    acq = acquisition
    for phases in (acq.phases_rad[:1], acq.phases_rad[0]):
        result = remove_phase_offsets(phases, None, acq.echo_times_s[:1], acq.mask, acq.voxel_size_mm)
        assert result.phases_rad.shape == (1,) + acq.mask.shape
        np.testing.assert_allclose(result.phases_rad[0], acq.phases_rad[0], atol=1e-6)
        assert np.all(result.offset_rad == 0)
        assert any("single echo" in note for note in result.notes)


def test_none_returns_the_input(acquisition):
    acq = acquisition
    result = remove_phase_offsets(acq.phases_rad, acq.magnitudes, acq.echo_times_s, acq.mask,
                                  acq.voxel_size_mm, method="none")
    assert result.method == "none"
    np.testing.assert_allclose(result.phases_rad, acq.phases_rad, atol=1e-6)
    assert np.all(result.offset_rad == 0)


def test_offset_constant_in_space_is_removed_exactly_without_noise():
    acq = simulate(offset_amplitude_rad=0.0, snr=1e9, seed=2)
    constant = 2.0
    phases = wrap(acq.phases_rad + constant)
    result = remove_phase_offsets(phases, acq.magnitudes, acq.echo_times_s, acq.mask, acq.voxel_size_mm)
    error = np.abs(circular_difference(result.offset_rad, constant))[acq.mask]
    assert error.max() < 1e-3


def test_bad_inputs(acquisition):
    acq = acquisition
    args = (acq.phases_rad, acq.magnitudes, acq.echo_times_s, acq.mask, acq.voxel_size_mm)
    with pytest.raises(QSMInputError, match="unknown phase-offset method 'echo-ratio'"):
        remove_phase_offsets(*args, method="echo-ratio")
    with pytest.raises(QSMInputError, match="3 echo times given for 5"):
        remove_phase_offsets(acq.phases_rad, acq.magnitudes, acq.echo_times_s[:3], acq.mask, acq.voxel_size_mm)
    with pytest.raises(QSMInputError, match="strictly increasing"):
        remove_phase_offsets(acq.phases_rad, acq.magnitudes, [0.004, 0.009, 0.009, 0.019, 0.024], acq.mask,
                             acq.voxel_size_mm)
    with pytest.raises(QSMInputError, match="magnitude shape"):
        remove_phase_offsets(acq.phases_rad, acq.magnitudes[:3], acq.echo_times_s, acq.mask, acq.voxel_size_mm)
    with pytest.raises(QSMInputError, match="mask is empty"):
        remove_phase_offsets(*args[:3], np.zeros(acq.mask.shape, bool), acq.voxel_size_mm)
    with pytest.raises(QSMInputError, match="mask shape"):
        remove_phase_offsets(*args[:3], acq.mask[:, :-1], acq.voxel_size_mm)
