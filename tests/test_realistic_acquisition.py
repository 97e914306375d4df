"""The simulated whole-head acquisition: layers, wraps, offsets, noise, units and the stage truths."""
import numpy as np
import pytest

pytest.importorskip("nilearn")

from qsmdip.errors import QSMInputError
from qsmdip.metrics import nrmse
from qsmdip.realistic_acquisition import (ACQUISITION_BOX_MM, CHI_AIR, CHI_BONE, default_acquisition_shape,
                                          make_realistic_acquisition, true_local_field, wraps_near_cavity)
from qsmdip.realistic_phantom import make_realistic_phantom
from qsmdip.units import GAMMA_BAR_MHZ_PER_T

VS = (4.0, 4.0, 4.0)


@pytest.fixture(scope="module")
def clean():
    return make_realistic_acquisition(voxel_size_mm=VS, snr=None)


def test_shapes_masks_and_layers(clean):
    shape = default_acquisition_shape(VS)
    assert shape == tuple(int(round(b / v)) for b, v in zip(ACQUISITION_BOX_MM, VS)) == clean.shape
    assert clean.phase_rad.shape == clean.magnitude.shape == (4,) + shape
    assert np.all(np.abs(clean.phase_rad) <= np.pi + 1e-6)
    assert np.all(clean.brain_mask <= clean.head_mask)
    assert clean.head_mask.sum() > 1.3 * clean.brain_mask.sum()
    # air (in the cavity and outside) and bone carry their susceptibility; air gives no signal
    assert clean.chi_tissue_ppm.max() == pytest.approx(CHI_AIR, abs=1e-3)
    assert clean.chi_tissue_ppm.min() < 0.5 * CHI_BONE
    outside = ~clean.head_mask
    assert np.median(clean.magnitude[0][outside]) < 0.02 * np.median(clean.magnitude[0][clean.brain_mask])


def test_the_phase_is_offset_plus_field_times_te(clean):
    """Noise-free: each echo's phase is the offset plus 2 pi gamma B0 TE times the total field, wrapped."""
    hz_per_ppm = GAMMA_BAR_MHZ_PER_T * clean.b0_tesla
    # up to the voxel averaging: where the field varies within a voxel the phase of the mean signal is not
    # the mean field's phase (that is the dephasing near the cavity), and more so at late echoes
    for e, te in enumerate(clean.echo_times_s):
        model = clean.offset_rad + 2 * np.pi * hz_per_ppm * te * clean.total_field_ppm
        diff = np.abs(np.angle(np.exp(1j * (clean.phase_rad[e] - model))))[clean.brain_mask]
        assert np.median(diff) < 0.01 and np.percentile(diff, 90) < 0.06, e
    assert np.abs(clean.offset_rad).max() > 1.0


def test_many_wraps_near_the_cavity_and_a_strong_background(clean):
    assert wraps_near_cavity(clean, echo=-1) > 10
    background = (clean.total_field_ppm - clean.local_field_ppm)[clean.brain_mask]
    assert np.ptp(background) > 10 * np.ptp(clean.local_field_ppm[clean.brain_mask])
    # the cavity makes it: without it the background near the frontal lobe is far weaker
    no_cavity = make_realistic_acquisition(voxel_size_mm=VS, snr=None, cavity=False, offsets=False)
    assert wraps_near_cavity(no_cavity, echo=-1) < 0.5 * wraps_near_cavity(clean, echo=-1)
    assert np.all(no_cavity.offset_rad == 0)


def test_brain_matches_the_local_field_phantom(clean):
    """The brain, its chi and its local field are the realistic phantom's, centred in a larger box."""
    phantom = make_realistic_phantom(voxel_size_mm=VS, snr=None)
    pad = [(a - b) // 2 for a, b in zip(clean.shape, phantom.chi_ppm.shape)]
    crop = tuple(slice(p, p + n) for p, n in zip(pad, phantom.chi_ppm.shape))
    assert np.array_equal(clean.brain_mask[crop], phantom.mask)
    # the same structures; only the random texture (+-0.01 ppm) is drawn on a different grid
    assert np.abs(clean.chi_ppm[crop] - phantom.chi_ppm).max() < 0.021
    assert np.corrcoef(clean.chi_ppm[crop].ravel(), phantom.chi_ppm.ravel())[0, 1] > 0.95


def test_true_local_field_depends_on_the_mask_and_ignores_a_uniform_shift(clean):
    truth = true_local_field(clean, clean.brain_mask)
    assert np.all(truth[~clean.brain_mask] == 0)
    assert nrmse(truth, clean.local_field_ppm, clean.brain_mask) < 10.0
    shifted = make_realistic_acquisition(voxel_size_mm=VS, snr=None)
    shifted.chi_tissue_fine_ppm = shifted.chi_tissue_fine_ppm + 0.5
    assert np.allclose(true_local_field(shifted, clean.brain_mask), truth, atol=1e-5)
    with pytest.raises(QSMInputError, match="non-empty"):
        true_local_field(clean, np.zeros(clean.shape, bool))


def test_noise_b0_and_echo_times():
    noisy = make_realistic_acquisition(voxel_size_mm=VS, snr=20.0, seed=1, echo_times_s=(0.005, 0.01))
    assert noisy.phase_rad.shape[0] == 2 and noisy.noise_std > 0
    outside = ~noisy.head_mask
    # pure noise outside the head: uniform phase, Rayleigh magnitude at the stated noise level
    assert np.std(noisy.phase_rad[0][outside]) == pytest.approx(np.pi / np.sqrt(3), rel=0.05)
    assert np.mean(noisy.magnitude[0][outside]) == pytest.approx(noisy.noise_std * np.sqrt(np.pi / 2), rel=0.1)
    at7 = make_realistic_acquisition(voxel_size_mm=VS, snr=None, b0_tesla=7.0, echo_times_s=(0.005, 0.01))
    assert wraps_near_cavity(at7, 0) == pytest.approx(wraps_near_cavity(noisy, 0) * 7 / 3, rel=0.01)
    for bad in [(0.01, 0.005), (5.0,), (-0.01,)]:
        with pytest.raises(QSMInputError, match="echo times"):
            make_realistic_acquisition(voxel_size_mm=VS, echo_times_s=bad)
