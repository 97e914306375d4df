"""The realistic phantom: MNI anatomy, literature values, the simulated GRE acquisition, units, geometry."""
import numpy as np
import scipy.ndimage
import pytest

pytest.importorskip("nilearn")

from qsmdip.operator import forward_field
from qsmdip.phantom import LABEL
from qsmdip.realistic_phantom import (DEFAULT_ECHO_TIMES_S, default_realistic_shape, make_realistic_phantom,
                                      REALISTIC_BOX_MM)
from qsmdip.errors import QSMInputError
from qsmdip.units import GAMMA_BAR_MHZ_PER_T

VS = (4.0, 4.0, 4.0)


@pytest.fixture(scope="module")
def clean():
    return make_realistic_phantom(voxel_size_mm=VS, snr=None)


@pytest.fixture(scope="module")
def noisy():
    return make_realistic_phantom(voxel_size_mm=VS, snr=50.0, seed=3)


def test_shapes_types_and_files_content(clean):
    shape = default_realistic_shape(VS)
    assert shape == tuple(int(round(b / v)) for b, v in zip(REALISTIC_BOX_MM, VS))
    for name in ("chi_ppm", "field_ppm", "magnitude", "labels", "mask"):
        assert getattr(clean, name).shape == shape, name
    assert clean.echoes.shape == (len(DEFAULT_ECHO_TIMES_S),) + shape and np.iscomplexobj(clean.echoes)
    assert clean.mask.dtype == bool and 0.2 < clean.mask.mean() < 0.6
    assert np.all(clean.field_ppm[~clean.mask] == 0)
    # chi keeps the partial-volume brain at the mask's edge (it makes field too); far outside it is 0
    assert np.all(clean.chi_ppm[~scipy.ndimage.binary_dilation(clean.mask, iterations=2)] == 0)


def test_tissue_values_follow_the_literature(clean):
    """Voxel-averaged susceptibility by dominant tissue: WM < 0 < GM; iron-rich nuclei well above GM."""
    mean = {name: float(clean.chi_ppm[clean.labels == LABEL[name]].mean())
            for name in ("white matter", "cortical grey matter", "globus pallidus", "putamen", "vein", "haemorrhage")
            if np.any(clean.labels == LABEL[name])}
    assert -0.04 < mean["white matter"] < -0.01
    assert 0.005 < mean["cortical grey matter"] < 0.03
    assert mean["globus pallidus"] > 0.07 and mean["putamen"] > mean["cortical grey matter"]
    assert mean["haemorrhage"] > 0.4
    # partial volumes: values are continuous, not a handful of labels
    assert np.unique(np.round(clean.chi_ppm[clean.mask], 4)).size > 200


def test_field_is_the_dipole_field_of_chi_up_to_the_fine_grid(clean):
    """Without noise the measured field is the forward field; it is made on a grid twice as fine (no
    inverse crime), so it agrees with the coarse-grid forward model only approximately."""
    coarse = forward_field(clean.chi_ppm, VS, clean.b0_dir) * clean.mask
    m = clean.mask
    rel = np.linalg.norm(clean.field_ppm[m] - coarse[m]) / np.linalg.norm(coarse[m])
    assert 0.001 < rel < 0.25
    assert np.corrcoef(clean.field_ppm[m], coarse[m])[0, 1] > 0.97


def test_magnitude_darkens_with_iron_and_blood(clean):
    mag = clean.magnitude
    wm = mag[clean.labels == LABEL["white matter"]].mean()
    assert mag[clean.labels == LABEL["haemorrhage"]].mean() < 0.7 * wm
    assert mag[clean.labels == LABEL["CSF"]].mean() > wm
    assert mag[~scipy.ndimage.binary_dilation(clean.mask, iterations=2)].max() == 0  # no signal outside the head


def test_noise_is_complex_and_gives_the_expected_field_noise(clean, noisy):
    m = clean.mask
    measured = np.std(noisy.field_ppm[m] - clean.field_ppm[m])
    assert noisy.noise_std_ppm == pytest.approx(measured, rel=0.15)
    # phase noise 1/SNR per echo; the magnitude-weighted TE fit pools the echoes
    hz_per_ppm = GAMMA_BAR_MHZ_PER_T * 3.0
    te = np.asarray(DEFAULT_ECHO_TIMES_S)
    ideal = 1.0 / (50.0 * 2 * np.pi * hz_per_ppm * np.sqrt(np.sum(te ** 2)))
    assert ideal < measured < 6 * ideal
    # the magnitude outside the brain is Rician noise, not zero
    assert noisy.magnitude[~m].mean() > 0


def test_oblique_b0_and_field_strength(clean):
    tilted = make_realistic_phantom(voxel_size_mm=VS, snr=None, b0_dir=(0.0, np.sin(0.35), np.cos(0.35)))
    assert np.allclose(tilted.chi_ppm, clean.chi_ppm)
    assert not np.allclose(tilted.field_ppm, clean.field_ppm, atol=1e-4)
    seven = make_realistic_phantom(voxel_size_mm=VS, snr=None, b0_tesla=7.0)
    # ppm does not depend on B0 (only intravoxel dephasing at the bleed and veins does) ...
    m = clean.mask
    assert np.median(np.abs(seven.field_ppm[m] - clean.field_ppm[m])) < 1e-4
    assert np.corrcoef(seven.field_ppm[m], clean.field_ppm[m])[0, 1] > 0.99
    assert seven.magnitude[clean.mask].mean() < clean.magnitude[clean.mask].mean()  # ... R2* does


def test_anisotropic_voxels_keep_the_anatomy():
    ph = make_realistic_phantom(voxel_size_mm=(3.0, 3.0, 5.0), snr=None)
    assert ph.chi_ppm.shape == default_realistic_shape((3.0, 3.0, 5.0))
    volume_ml = ph.mask.sum() * 45.0 / 1000.0
    assert 1300 < volume_ml < 2200  # the MNI template's intracranial volume (mm^3 -> ml)


@pytest.mark.parametrize("kwargs", [dict(snr=0.0), dict(b0_tesla=-3.0), dict(echo_times_s=(5.0, 10.0)),
                                    dict(shape=(0, 10, 10))])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(QSMInputError):
        make_realistic_phantom(voxel_size_mm=VS, **kwargs)


def test_cli_writes_the_realistic_phantom_with_its_magnitude(tmp_path, capsys):
    from qsmdip import io as qio
    from qsmdip.cli import main

    out = tmp_path / "real"
    assert main(["phantom", str(out), "--kind", "realistic", "--voxel", "4,4,5", "--snr", "80",
                 "--oblique", "15", "--b0", "7", "--echo-times", "0.005,0.010"]) == 0
    assert "realistic phantom" in capsys.readouterr().out
    vols = {n: qio.read_volume(str(out / f"{n}.nii.gz")) for n in ("field", "mask", "chi", "labels", "magnitude")}
    assert vols["magnitude"].same_geometry(vols["field"]) and vols["field"].spacing_mm == (4.0, 4.0, 5.0)
    assert np.any(vols["magnitude"].array > 0)
    assert main(["phantom", str(tmp_path / "bad"), "--kind", "realistic", "--echo-times", "5,10"]) == 2


@pytest.mark.parametrize("vs, shape", [((2.0, 2.0, 2.0), (24, 28, 24)), ((1.5, 1.5, 1.5), (24, 28, 24))])
def test_supersampling_can_be_chosen(vs, shape):
    """2 simulation voxels per axis is the default at every voxel size (below 2 mm too, where point samples
    would leave the magnitude without dephasing); 1 and finer grids can be asked for: the matrix stays the
    same, the signal's average changes."""
    default = make_realistic_phantom(shape, vs, snr=None)
    two = make_realistic_phantom(shape, vs, snr=None, supersampling=2)
    one = make_realistic_phantom(shape, vs, snr=None, supersampling=1)
    np.testing.assert_array_equal(default.magnitude, two.magnitude)
    assert one.chi_ppm.shape == two.chi_ppm.shape == shape
    assert not np.allclose(one.magnitude, two.magnitude)
    np.testing.assert_array_equal(make_realistic_phantom(shape, vs, snr=None, supersampling=None).magnitude,
                                  default.magnitude)
    for bad in (0, 5, 1.5, True):
        with pytest.raises(QSMInputError, match="supersampling"):
            make_realistic_phantom(shape, vs, snr=None, supersampling=bad)


def test_whole_head_acquisition_supersamples_below_2mm_too():
    """The acquisition, like the local-field phantom, simulates on a grid twice as fine at every voxel size
    (it point-sampled below 2 mm until 2026-12-05); 1 can still be asked for, and changes the signal."""
    from qsmdip.realistic_acquisition import make_realistic_acquisition
    from qsmdip.realistic_phantom import build_anatomy
    assert build_anatomy((8, 8, 8), (1.0, 1.0, 3.0), np.random.default_rng(0)).factors == (2, 2, 2)
    shape, vs = (20, 24, 20), (1.5, 1.5, 1.5)
    default = make_realistic_acquisition(shape, vs, snr=None)
    one = make_realistic_acquisition(shape, vs, snr=None, supersampling=1)
    assert default.fine_factors == (2, 2, 2) and one.fine_factors == (1, 1, 1)
    assert default.magnitude.shape[1:] == one.magnitude.shape[1:] == shape
    assert not np.allclose(default.magnitude, one.magnitude)
    with pytest.raises(QSMInputError, match="supersampling"):
        make_realistic_acquisition(shape, vs, snr=None, supersampling=0)


def test_a_large_simulation_grid_is_warned_about(monkeypatch, caplog):
    """A fine grid past the threshold (1 mm is just under it) says how much memory to expect."""
    import qsmdip.realistic_phantom as rp
    monkeypatch.setattr(rp, "LARGE_SIMULATION_VOXELS", 10_000)
    with caplog.at_level("WARNING", logger="qsmdip.realistic_phantom"):
        make_realistic_phantom((12, 14, 12), (3.0, 3.0, 3.0), snr=None)
    assert any("simulation grid" in r.message and "GB" in r.message for r in caplog.records)
