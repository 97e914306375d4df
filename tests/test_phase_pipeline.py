"""Phase to local field: input scaling and checks, echo fit, mask, files, and the whole chain on a simulated
whole-head acquisition (4 mm, so it stays fast)."""
import json
import math
import re

import numpy as np
import pytest

from qsmdip.errors import QSMInputError
from qsmdip.io import Volume
from qsmdip.metrics import nrmse
from qsmdip.phase import files
from qsmdip.phase.echo_fit import fit_field, hz_to_ppm, refit_early_echoes
from qsmdip.phase.inputs import check_b0, check_echo_times, looks_swapped, phase_to_radians
from qsmdip.phase.masking import (ball, mask_from_magnitude, otsu_threshold, peel_poor_edges, poor_edge,
                                  quality_limit)
from qsmdip.phase.pipeline import STAGES, TEXTBOOK, PipelineCancelled, PipelineSettings, phase_to_local_field
from qsmdip.units import GAMMA_BAR_MHZ_PER_T

VS = (4.0, 4.0, 4.0)


@pytest.fixture(scope="module")
def acq():
    pytest.importorskip("nilearn")
    from qsmdip.realistic_acquisition import make_realistic_acquisition
    return make_realistic_acquisition(voxel_size_mm=VS, snr=100.0, seed=2)


def run(acq, phase=None, **settings):
    return phase_to_local_field(acq.phase_rad if phase is None else phase, acq.magnitude, acq.echo_times_s,
                                acq.b0_tesla, acq.voxel_size_mm, b0_dir=acq.b0_dir,
                                settings=PipelineSettings(**settings))


# ---------------------------------------------------------------------------------------------- inputs

def test_phase_scaling_radians_and_vendor_ranges():
    rng = np.random.default_rng(0)
    rad = rng.uniform(-np.pi, np.pi, (2, 5, 5, 5)).astype(np.float32)
    assert phase_to_radians(rad).scaling == "radians"
    assert np.array_equal(phase_to_radians(rad).phase_rad, rad)
    assert phase_to_radians(rad + np.pi).scaling == "radians 0..2pi"
    siemens = np.round(rad / np.pi * 4096).clip(-4096, 4095)
    scaled = phase_to_radians(siemens)
    assert scaled.scaling == "integers -4096..4095" and "rescaled" in scaled.notes[0]
    assert np.abs(np.angle(np.exp(1j * (scaled.phase_rad - rad)))).max() < 2 * np.pi / 8192 + 1e-6
    unsigned = phase_to_radians(siemens + 4096)     # 0..8191 stored unsigned: a constant shift only
    difference = np.angle(np.exp(1j * (unsigned.phase_rad - scaled.phase_rad)))
    assert np.ptp(difference) < 1e-5
    twelve_bit = phase_to_radians(np.round((rad + np.pi) / (2 * np.pi) * 4095))
    assert twelve_bit.scaling == "integers 0..4095"


@pytest.mark.parametrize("values, match", [
    (np.linspace(-180, 180, 250), "neither radians"),             # degrees
    (np.linspace(0, 1, 250), "spans only|neither"),               # a field-like map in 0..1? spans 1 rad: radians
    (np.linspace(-0.1, 0.1, 250), "spans only"),                  # a field map in ppm
    (np.array([np.nan, 0.0, 1.0]), "NaN"),
    (np.array([1 + 1j, 0.0]), "complex"),
])
def test_unknown_phase_ranges_are_refused(values, match):
    if match == "spans only|neither":
        assert phase_to_radians(values).scaling == "radians"   # 0..1 rad is a plausible (small) phase
        return
    with pytest.raises(QSMInputError, match=match):
        phase_to_radians(values)


def test_echo_times_and_b0_checks():
    assert check_echo_times([0.004, 0.012], 2) == (0.004, 0.012)
    for tes, echoes, match in [(None, 2, "missing"), ([0.01, 0.005], 2, "increase"), ([0.01, 0.01], 2, "increase"),
                               ([4.0, 12.0], 2, "milliseconds"), ([0.004], 2, "2 echoes but 1"),
                               ([-0.001, 0.01], 2, "positive")]:
        with pytest.raises(QSMInputError, match=match):
            check_echo_times(tes, echoes)
    assert check_b0(3) == 3.0
    for b0, match in [(None, "missing"), (float("nan"), "plausible"), (3000, "plausible")]:
        with pytest.raises(QSMInputError, match=match):
            check_b0(b0)


def test_swapped_phase_and_magnitude_are_detected(acq):
    assert not looks_swapped(acq.phase_rad, acq.magnitude)
    assert looks_swapped(acq.magnitude, acq.phase_rad + np.pi)      # 0..2pi "magnitude": no negative value
    with pytest.raises(QSMInputError, match="swapped"):
        phase_to_local_field(acq.magnitude, acq.phase_rad, acq.echo_times_s, 3.0, VS)
    # a radian phase given as the magnitude has negative values: also named as a swap
    with pytest.raises(QSMInputError, match="swapped"):
        phase_to_local_field(acq.phase_rad, acq.phase_rad, acq.echo_times_s, 3.0, VS)


@pytest.mark.parametrize("change, match", [
    (dict(magnitude=lambda a: a.magnitude[:3]), "shape"),
    (dict(echo_times_s=lambda a: a.echo_times_s[:3]), "4 echoes but 3"),
    (dict(echo_times_s=lambda a: a.echo_times_s[::-1]), "increase"),
    (dict(echo_times_s=lambda a: None), "echo times are missing"),
    (dict(b0_tesla=lambda a: None), "field strength is missing"),
    (dict(mask=lambda a: np.zeros(a.shape, bool)), "empty"),
    (dict(mask=lambda a: np.ones((3, 3, 3), bool)), "shape"),
])
def test_bad_pipeline_inputs_fail_in_one_line(acq, change, match):
    args = dict(phase=acq.phase_rad, magnitude=acq.magnitude, echo_times_s=acq.echo_times_s,
                b0_tesla=acq.b0_tesla, voxel_size_mm=VS, mask=None)
    for key, make in change.items():
        args[key] = make(acq)
    with pytest.raises(QSMInputError, match=match) as info:
        phase_to_local_field(**args)
    assert "\n" not in str(info.value)


# -------------------------------------------------------------------------------------------- echo fit

def test_echo_fit_recovers_the_frequency_and_flags_misfit():
    tes = (0.004, 0.012, 0.020)
    f_hz = np.full((1, 4, 4, 4), 37.5)
    f_hz[0, 0, 0, 0] = -80.0
    phase = 2 * np.pi * f_hz * np.array(tes)[:, None, None, None]
    mag = np.ones_like(phase) * np.array([3.0, 2.0, 1.0])[:, None, None, None]
    fit = fit_field(phase, mag, tes)
    assert np.allclose(fit.field_hz, f_hz[0], atol=1e-4)
    assert fit.residual_rad.max() < 1e-6
    # with an offset, the line through the origin misfits; a free intercept recovers the slope exactly
    fit_offset = fit_field(phase + 0.7, mag, tes)
    assert fit_offset.residual_rad.min() > 0.05
    assert np.allclose(fit_field(phase + 0.7, mag, tes, intercept=True).field_hz, f_hz[0], atol=1e-3)
    # weights: the reliability grows with the magnitude and the echo times
    assert np.allclose(fit.reliability, math.sqrt(sum((m * t) ** 2 for m, t in zip((3, 2, 1), tes))))
    assert hz_to_ppm(np.array([GAMMA_BAR_MHZ_PER_T * 3.0]), 3.0)[0] == pytest.approx(1.0)
    with pytest.raises(QSMInputError, match="two echoes"):
        fit_field(phase[:1], mag[:1], tes[:1], intercept=True)


def test_voxels_whose_phase_leaves_the_line_are_refitted_from_their_early_echoes():
    tes = np.array([0.004, 0.012, 0.020, 0.028])
    f_hz = np.full((2, 2, 2), 20.0)
    phase = 2 * np.pi * f_hz[None] * tes[:, None, None, None]
    phase[3, 0, 0, 0] += 2 * np.pi          # the last echo's temporal unwrapping picked the wrong multiple
    phase[1:, 0, 0, 1] += [1.0, 2.0, 3.0]    # dephasing: the phase bends away after the first echo
    mag = np.ones_like(phase) * np.array([4.0, 3.0, 2.0, 1.0])[:, None, None, None]
    mask = np.ones(f_hz.shape, bool)
    fit = fit_field(phase, mag, tes, mask)
    assert abs(fit.field_hz[0, 0, 0] - 20.0) > 5 and abs(fit.field_hz[0, 0, 1] - 20.0) > 5
    refit, kept = refit_early_echoes(phase, mag, tes, fit, mask, residual_limit_rad=0.06)
    assert kept == {3: 1, 1: 1}
    assert np.allclose(refit.field_hz, 20.0, atol=1e-4)
    # voxels on the line are untouched; the refitted ones are trusted as their echoes deserve
    assert np.array_equal(refit.field_hz[1], fit.field_hz[1]) and np.array_equal(refit.reliability[1], fit.reliability[1])
    assert refit.reliability[0, 0, 0] == pytest.approx(math.sqrt(sum((m * t) ** 2 for m, t in zip((4, 3, 2), tes))))
    assert refit.reliability[0, 0, 1] == pytest.approx(4 * tes[0])
    assert np.array_equal(refit.residual_rad, fit.residual_rad)     # the mask's phase-quality test still sees it
    # outside the mask nothing is refitted
    outside, none = refit_early_echoes(phase, mag, tes, fit, ~mask, residual_limit_rad=0.06)
    assert none == {} and np.array_equal(outside.field_hz, fit.field_hz)
    with pytest.raises(QSMInputError, match="residual limit"):
        refit_early_echoes(phase, mag, tes, fit, mask, residual_limit_rad=0.0)
    with pytest.raises(QSMInputError, match="one echo time per echo"):
        refit_early_echoes(phase, mag, tes[:3], fit, mask, residual_limit_rad=0.06)


# ------------------------------------------------------------------------------------------------ mask

def test_mask_from_magnitude_keeps_the_brain(acq):
    result = mask_from_magnitude(acq.magnitude, VS)
    brain = acq.brain_mask
    assert (result.mask & brain).sum() / brain.sum() > 0.98
    assert (result.mask & ~acq.head_mask).sum() < 0.08 * result.mask.sum()   # 4 mm: the skull is 1.5 voxels
    rng = np.random.default_rng(1)
    two_classes = np.r_[rng.normal(0.0, 0.1, 5000), rng.normal(1.0, 0.1, 5000)]
    assert 0.3 < otsu_threshold(two_classes) < 0.7      # anywhere in the gap separates the classes
    assert ball(4.0, (2.0, 2.0, 4.0)).shape == (5, 5, 3)


def test_mask_refinement_drops_noisy_edge_voxels_only():
    magnitude = np.zeros((20, 20, 20))
    magnitude[4:16, 4:16, 4:16] = 1.0
    residual = np.zeros_like(magnitude)
    residual[4, 4:16, 4:16] = 1.0          # a noisy face of the cube
    residual[10, 10, 10] = 1.0             # an inner voxel with a bad fit (kept: the inversion needs it)
    result = mask_from_magnitude(magnitude, (1.0, 1.0, 1.0), residual_rad=residual, threshold=0.5, opening_mm=1.0)
    assert not result.mask[4, 5:15, 5:15].any()
    assert result.mask[10, 10, 10] and result.mask[5:15, 5:15, 5:15].all()
    assert result.removed_by_quality >= 100


def test_the_quality_limit_rises_with_the_interiors_noise_only():
    mask = np.zeros((30, 30, 30), bool)
    mask[3:27, 3:27, 3:27] = True
    rng = np.random.default_rng(0)
    quiet = np.where(mask, rng.uniform(0.005, 0.015, mask.shape), 0.0)
    assert quality_limit(quiet, mask, (1.0, 1.0, 1.0), 0.06) == 0.06       # high SNR: the fixed limit
    noisy = np.where(mask, rng.uniform(0.04, 0.08, mask.shape), 0.0)        # low SNR: median 0.06 inside
    noisy[3] = 1.0                                                          # a face whose phase is off the line
    noisy[26] = 0.15                                                        # a face of ordinary noise, weak signal
    limit = quality_limit(noisy, mask, (1.0, 1.0, 1.0), 0.06)
    interior = noisy[11:19, 11:19, 11:19]                # deeper than 8 voxels: the faces are not in it
    assert limit == pytest.approx(4 * np.median(interior)) and 0.23 < limit < 0.25
    kept = peel_poor_edges(mask, noisy, limit)
    assert not kept[3].any() and kept[26].sum() == mask[26].sum() and kept[4:26].sum() == mask[4:26].sum()
    fixed = peel_poor_edges(mask, noisy, 0.06)       # the fixed limit eats into the noise, layer after layer
    assert fixed.sum() < kept.sum() - 2 * 24 * 24 and not fixed[26].all()
    with pytest.raises(QSMInputError, match="non-empty mask"):
        quality_limit(noisy, np.zeros_like(mask), (1.0, 1.0, 1.0), 0.06)
    # no voxel deeper than 8 mm (the grid's edge counts as outside): the residual is the edge's own, the limit fixed
    assert quality_limit(noisy, mask, (1.0, 1.0, 1.0), 0.06) > 0.06
    assert quality_limit(noisy[3:27, 3:27, 3:27], np.ones((24, 24, 24), bool), (0.5, 0.5, 0.5), 0.06) == 0.06
    # the poor edge of a mask in two pieces: the smaller piece keeps its good voxels (peel_poor_edges drops it)
    two = mask.copy()
    two[0:2, 0:2, 0:2] = True
    edge = poor_edge(two, noisy, limit)
    assert edge[3, 3:27, 3:27].all() and not edge[0:2, 0:2, 0:2].any() and not edge[4:26].any()
    assert not peel_poor_edges(two, noisy, limit)[0:2, 0:2, 0:2].any()


def test_the_mask_keeps_the_brain_at_low_snr(acq):
    from qsmdip.realistic_acquisition import make_realistic_acquisition
    noisy = make_realistic_acquisition(voxel_size_mm=VS, snr=15.0, seed=2)
    result = run(noisy)
    brain = noisy.brain_mask
    fixed = run(noisy, relative_residual_limit=0)
    assert (result.mask & brain).sum() / brain.sum() > 0.85 > 0.5 > (fixed.mask & brain).sum() / brain.sum()
    refinement = " ".join(result.stages[STAGES.index("mask refinement")].notes)
    assert "above 0.06 rad" not in refinement
    smoothed = run(noisy, unwrap="laplacian")     # its residual is the smoothing's, not noise: the fixed limit stays
    assert "above 0.06 rad" in " ".join(smoothed.stages[STAGES.index("mask refinement")].notes)
    for bad in (-1.0, math.inf, "4", True):
        with pytest.raises(QSMInputError, match="relative_residual_limit"):
            PipelineSettings(relative_residual_limit=bad)
    assert "above 0.06 rad" in " ".join(run(acq).stages[STAGES.index("mask refinement")].notes)   # SNR 100: as before


# ----------------------------------------------------------------------------------------------- files

def test_bids_and_4d_files_round_trip(acq, tmp_path):
    grid = Volume(np.zeros(acq.shape), VS)
    phases, mags = files.write_multi_echo(tmp_path / "bids", acq.phase_rad, acq.magnitude, grid, acq.echo_times_s,
                                          3.0, phase_scale="siemens")
    read = files.read_multi_echo([phases[2]])          # any echo of the set finds its siblings and the magnitude
    assert [p.name for p in read.phase_paths] == [p.name for p in phases]
    assert read.echo_times_s == pytest.approx(acq.echo_times_s) and read.b0_tesla == 3.0
    assert read.phase.shape == acq.phase_rad.shape and read.magnitude is not None
    assert phase_to_radians(read.phase).scaling == "integers -4096..4095"
    four_d = files.write_multi_echo(tmp_path / "4d", acq.phase_rad, acq.magnitude, grid, acq.echo_times_s, 3.0,
                                    layout="4d")
    read4 = files.read_multi_echo(four_d[0], four_d[1])
    assert np.allclose(read4.phase, acq.phase_rad, atol=1e-6) and read4.echo_times_s == pytest.approx(acq.echo_times_s)
    # per-echo 3D files given one by one, in order, without sidecars
    for p in phases + mags:
        files.sidecar_path(p).unlink()
    loose = files.read_multi_echo(phases, mags)
    assert loose.echo_times_s is None and loose.b0_tesla is None and loose.phase.shape[0] == 4
    assert files.merge_acquisition_parameters(loose, acq.echo_times_s, 3.0) == (tuple(acq.echo_times_s), 3.0)


def test_file_errors(acq, tmp_path):
    grid = Volume(np.zeros(acq.shape), VS)
    phases, mags = files.write_multi_echo(tmp_path, acq.phase_rad, acq.magnitude, grid, acq.echo_times_s, 3.0)
    read = files.read_multi_echo([phases[0]])
    with pytest.raises(QSMInputError, match="disagree"):
        files.merge_acquisition_parameters(read, (0.005, 0.01, 0.015, 0.02), None)
    with pytest.raises(QSMInputError, match="disagrees"):
        files.merge_acquisition_parameters(read, None, 7.0)
    with pytest.raises(QSMInputError, match="magnitude has 3"):
        files.read_multi_echo([phases[0]], mags[:3])
    phases[1].unlink()
    with pytest.raises(QSMInputError, match="missing"):
        files.read_multi_echo([phases[0]])
    files.sidecar_path(phases[2]).write_text("{not json")
    with pytest.raises(QSMInputError, match="does not exist"):
        files.read_multi_echo([tmp_path / "nothing.nii.gz"])
    other = Volume(np.zeros(acq.shape), (4.0, 4.0, 5.0))
    odd = files.write_multi_echo(tmp_path / "odd", acq.phase_rad[:1], acq.magnitude[:1], other, acq.echo_times_s[:1],
                                 3.0, layout="4d")
    with pytest.raises(QSMInputError, match="differ"):
        files.read_multi_echo([phases[0], odd[0][0]])
    assert json.loads(files.sidecar_path(mags[0]).read_text())["EchoTime"] == acq.echo_times_s[0]


# ---------------------------------------------------------------------------------------- whole chain

def test_the_chain_recovers_the_local_field_better_than_the_textbook(acq):
    from qsmdip.realistic_acquisition import true_local_field
    seen = []
    ours = phase_to_local_field(acq.phase_rad, acq.magnitude, acq.echo_times_s, acq.b0_tesla, VS, b0_dir=acq.b0_dir,
                                settings=PipelineSettings(background="vsharp"), on_stage=lambda r: seen.append(r.name))
    assert seen == list(STAGES)
    assert set(ours.seconds) == set(STAGES) and ours.notes
    textbook = run(acq, **TEXTBOOK, refine_mask=False)
    error_ours = nrmse(ours.local_field_ppm, true_local_field(acq, ours.mask), ours.mask)
    error_textbook = nrmse(textbook.local_field_ppm, true_local_field(acq, textbook.mask), textbook.mask)
    assert error_ours < 0.7 * error_textbook and error_ours < 50.0
    # the mask is the brain's: nothing outside the head, most of the brain
    assert not ours.mask[~acq.head_mask].any()
    assert (ours.mask & acq.brain_mask).sum() > 0.6 * acq.brain_mask.sum()    # 4 mm voxels: edges weigh a lot
    assert np.all(ours.local_field_ppm[~ours.mask] == 0)


def test_the_refit_leaves_noise_alone_and_still_finds_a_wrong_multiple():
    # SNR so low that the noise alone misfits most voxels by more than the fixed 0.06 rad limit
    tes = np.array([0.004, 0.012, 0.020, 0.028])
    rng = np.random.default_rng(3)
    mag = np.ones((4, 20, 20, 20)) * np.array([4.0, 3.0, 2.0, 1.0])[:, None, None, None]
    phase = 2 * np.pi * 20.0 * tes[:, None, None, None] + rng.normal(0.0, 0.25, mag.shape) / mag
    phase[3, 0, 0, 0] += 2 * np.pi
    fit = fit_field(phase, mag, tes)
    assert np.mean(fit.residual_rad > 0.06) > 0.5
    refit, kept = refit_early_echoes(phase, mag, tes, fit, None, residual_limit_rad=0.06)
    assert sum(kept.values()) < 0.005 * phase[0].size      # about 0.1 % flagged by chance (NOISE_QUANTILE)
    assert abs(refit.field_hz[0, 0, 0] - 20.0) < abs(fit.field_hz[0, 0, 0] - 20.0) / 3
    with pytest.raises(QSMInputError, match="echo times must increase"):
        refit_early_echoes(phase, mag, tes[::-1], fit, None, residual_limit_rad=0.06)


def test_no_refit_without_offset_removal_and_a_bad_limit_is_refused(acq):
    plain = run(acq, offsets="none", background="vsharp")
    assert any("no early-echo refit" in note for note in plain.notes)
    assert not any("refitted" in note for note in plain.notes)
    # the residual of a line through the origin is the offsets', not noise: the mask keeps the fixed limit
    assert "above 0.06 rad" in " ".join(plain.stages[STAGES.index("mask refinement")].notes)
    for bad in (0.0, -0.1, float("nan"), "0.06"):
        with pytest.raises(QSMInputError, match="residual_limit_rad"):
            PipelineSettings(residual_limit_rad=bad)


def test_a_users_mask_keeps_its_poor_edge_out_of_the_refit(acq):
    from qsmdip.realistic_acquisition import true_local_field

    def local_error(refit):
        result = phase_to_local_field(acq.phase_rad, acq.magnitude, acq.echo_times_s, acq.b0_tesla, VS,
                                      b0_dir=acq.b0_dir, mask=acq.brain_mask,
                                      settings=PipelineSettings(early_echo_refit=refit))
        assert np.array_equal(result.mask, acq.brain_mask)           # PDF keeps the user's mask as given
        return nrmse(result.local_field_ppm, true_local_field(acq, result.mask), result.mask), result.notes
    without, _ = local_error(False)
    with_refit, notes = local_error(True)
    # refitting the rim's partial volumes from their first echoes made this 167.9 % against 99.8 %
    assert with_refit < 1.05 * without
    refitted = [re.search(r"(\d+) voxels whose phase left the line", note) for note in notes]
    counts = [int(found.group(1)) for found in refitted if found]
    assert counts and 0 < counts[0] < 200


def test_refitting_from_early_echoes_lowers_the_total_fields_local_error(acq):
    from qsmdip.solvers.single_step import smv_high_pass

    def high_passed_error(result):
        error, valid = smv_high_pass(result.total_field_ppm - acq.total_field_ppm, result.field_mask, VS, 8.0)
        return float(np.sqrt(np.mean(error[valid].astype(np.float64) ** 2)))

    refitted, plain = run(acq, background="vsharp"), run(acq, background="vsharp", early_echo_refit=False)
    assert any("refitted from their early echoes" in note for note in refitted.notes)
    assert not any("refitted" in note for note in plain.notes)
    assert np.array_equal(refitted.field_mask, plain.field_mask)   # the phase-quality peel reads the same residual
    assert high_passed_error(refitted) < 0.8 * high_passed_error(plain)   # 1.68 -> 1.01 ppb when written


def test_vendor_integers_and_a_single_echo(acq):
    reference = run(acq, background="vsharp")
    siemens = np.clip(np.round(acq.phase_rad / np.pi * 4096), -4096, 4095)
    scaled = run(acq, phase=siemens, background="vsharp")
    assert "rescaled" in scaled.stages[0].notes[0]
    both = reference.mask & scaled.mask
    assert nrmse(scaled.local_field_ppm, reference.local_field_ppm, both) < 5.0
    single = phase_to_local_field(acq.phase_rad[1], acq.magnitude[1], acq.echo_times_s[1:2], acq.b0_tesla, VS,
                                  b0_dir=acq.b0_dir, settings=PipelineSettings(background="vsharp"))
    assert any("single echo" in note for note in single.notes)
    from qsmdip.realistic_acquisition import true_local_field
    # the offset cannot be removed from one echo and stays in the field (about 0.2 ppm here): worse, not garbage
    assert nrmse(single.local_field_ppm, true_local_field(acq, single.mask), single.mask) < 150.0


def test_user_mask_is_used_as_given_and_cancel_stops(acq):
    result = phase_to_local_field(acq.phase_rad, acq.magnitude, acq.echo_times_s, acq.b0_tesla, VS,
                                  mask=acq.brain_mask, settings=PipelineSettings(background="pdf"))
    assert np.array_equal(result.field_mask, acq.brain_mask) and np.array_equal(result.mask, acq.brain_mask)
    with pytest.raises(PipelineCancelled, match="unwrap"):
        phase_to_local_field(acq.phase_rad, acq.magnitude, acq.echo_times_s, acq.b0_tesla, VS,
                             on_stage=lambda report: report.name == "unwrap")
    with pytest.raises(QSMInputError, match="unknown unwrapping"):
        PipelineSettings(unwrap="magic")
