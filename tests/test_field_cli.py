"""``qsmdip field`` and ``qsmdip reconstruct --phase`` on a simulated multi-echo acquisition, run for real.

The acquisition is the realistic 4 mm head (tests/gre_data.py), written as BIDS with sidecars, as 4D files
with Siemens integer phase, and as plain 3D files per echo. Each bad input ends in one line on stderr and
exit status 2, writes nothing, and leaves the inputs as they were; Ctrl-C ends in 130 with no output.
"""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import gre_data
from qsmdip import io as qio
from qsmdip.cli import build_parser, main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "QSMDIP"), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
#: the simulated B0 direction seen from the oblique grid, as the command line prints it
B0_LINE = "B0 direction in the voxel frame (i, j, k): (0.000, 0.259, 0.966)"


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """The acquisition as BIDS, as 4D Siemens-integer files, and as plain 3D files; inputs checked unchanged after."""
    d = tmp_path_factory.mktemp("gre")
    bids = gre_data.write_set(d / "bids")
    four_d = gre_data.write_set(d / "4d", layout="4d", phase_scale="siemens")
    plain = gre_data.per_echo_files(d / "plain")
    files = [p for group in (bids, four_d, plain) for paths in group for p in paths]
    before = {p: p.read_bytes() for p in files}
    yield {"bids": bids, "4d": four_d, "plain": plain, "dir": d}
    for path, data in before.items():
        assert path.read_bytes() == data, f"the input {path} was changed"


def run(args, capsys):
    """Run the command line; return (exit status, stdout, stderr lines), failing on any traceback."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, [line for line in captured.err.splitlines() if line.strip()]


def refused(args, capsys, needle, *absent):
    """Exit status 2, one line on stderr holding ``needle``, and none of ``absent`` written."""
    code, _, lines = run(args, capsys)
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert needle in lines[0], lines[0]
    for path in absent:
        assert not os.path.exists(path), path
    return lines[0]


def field_args(phase, out_dir, *extra, magnitude=None):
    args = ["field", "--phase", *phase, "--out-field", out_dir / "field.nii.gz", "--out-mask", out_dir / "mask.nii.gz"]
    if magnitude:
        args += ["--magnitude", *magnitude]
    return args + list(extra)


def stage_lines(lines, command="field"):
    return [line for line in lines if line.startswith(f"{command}: stage ")]


# -- qsmdip field ---------------------------------------------------------------------------------------------
def test_field_from_a_bids_set_reads_echo_times_b0_and_magnitude_from_beside_it(sets, tmp_path, capsys):
    phase, _ = sets["bids"]
    code, out, lines = run(field_args(phase[:1], tmp_path), capsys)
    assert code == 0, lines
    stages = stage_lines(lines)
    assert [s.split()[2] for s in stages] == [f"{n}/7" for n in range(1, 8)]
    assert "inputs" in stages[0] and "echo times from the sidecars: 0.004, 0.012, 0.02, 0.028 s" in stages[0]
    assert "B0 from the sidecars: 3 T" in stages[0] and "part-mag files beside the phase" in stages[0]
    assert stages[-1].startswith("field: stage 7/7 background (") and "background: pdf" in stages[-1]
    assert f"field: {B0_LINE}" in lines
    acq, grid = gre_data.acquisition()
    field, mask = qio.read_volume(tmp_path / "field.nii.gz"), qio.read_volume(tmp_path / "mask.nii.gz")
    assert field.same_geometry(grid) and mask.same_geometry(grid)
    inside = mask.array > 0
    assert set(np.unique(mask.array)) == {0.0, 1.0}
    assert np.all(field.array[~inside] == 0)
    assert (inside & acq.brain_mask).sum() > 0.6 * acq.brain_mask.sum()
    assert np.corrcoef(field.array[inside], acq.local_field_ppm[inside])[0, 1] > 0.7
    assert str(tmp_path / "field.nii.gz") in out and not (tmp_path / "total.nii.gz").exists()


def test_field_from_4d_vendor_integers_with_typed_parameters_and_other_methods(sets, tmp_path, capsys):
    phase, magnitude = sets["4d"]
    total = tmp_path / "total.nii.gz"
    code, _, lines = run(field_args(phase, tmp_path, "--echo-times", "0.004,0.012,0.020,0.028", "--b0", "3",
                                    "--unwrap", "laplacian", "--bfr", "vsharp", "--offsets", "none",
                                    "--total-field", total, magnitude=magnitude), capsys)
    assert code == 0, lines
    stages = stage_lines(lines)
    assert "read as the vendor range -4096..4095 and rescaled to radians" in stages[0]
    assert "unwrap: laplacian" in stages[3] and "background: vsharp" in stages[6]
    assert "phase offsets not removed (method 'none')" in stages[2]
    mask = qio.read_volume(tmp_path / "mask.nii.gz").array > 0
    total_field = qio.read_volume(total).array
    # the total field covers the mask before V-SHARP's erosion: the local field's mask and a rim around it
    assert np.count_nonzero(total_field[mask]) > 0.99 * mask.sum() and np.count_nonzero(total_field[~mask]) > 0


def test_field_from_plain_files_per_echo_needs_the_echo_times(sets, tmp_path, capsys):
    phase, magnitude = sets["plain"]
    refused(field_args(phase, tmp_path, "--b0", "3", magnitude=magnitude), capsys, "the echo times are missing",
            tmp_path / "field.nii.gz", tmp_path / "mask.nii.gz")
    refused(field_args(phase, tmp_path, "--echo-times", "0.004,0.012,0.02,0.028", magnitude=magnitude), capsys,
            "the field strength is missing", tmp_path / "field.nii.gz")
    code, _, lines = run(field_args(phase, tmp_path, "--echo-times", "0.004,0.012,0.02,0.028", "--b0", "3",
                                    magnitude=magnitude), capsys)
    assert code == 0, lines
    assert "4 echo(es), TE 4, 12, 20, 28 ms, B0 3 T" in stage_lines(lines)[0]


def test_field_from_a_single_echo(sets, tmp_path, capsys):
    phase, magnitude = sets["plain"]
    code, _, lines = run(field_args(phase[:1], tmp_path, "--echo-times", "0.004", "--b0", "3",
                                    magnitude=magnitude[:1]), capsys)
    assert code == 0, lines
    stages = stage_lines(lines)
    assert "1 echo(es), TE 4 ms, B0 3 T" in stages[0] and "single echo" in stages[2]
    assert (qio.read_volume(tmp_path / "mask.nii.gz").array > 0).any()


def test_field_with_the_users_mask_keeps_it(sets, tmp_path, capsys):
    phase, _ = sets["bids"]
    acq, grid = gre_data.acquisition()
    user = qio.write_volume(tmp_path / "user.nii.gz", acq.brain_mask.astype(np.float32), like=grid)
    code, _, lines = run(field_args(phase[:1], tmp_path, "--mask", user), capsys)
    assert code == 0, lines
    assert f"mask: the user's, {int(acq.brain_mask.sum())} voxels" in stage_lines(lines)[1]
    assert "the user's mask is used as given" in stage_lines(lines)[5]
    out = qio.read_volume(tmp_path / "mask.nii.gz").array > 0
    assert out.sum() > 0 and not np.any(out & ~acq.brain_mask)


@pytest.mark.parametrize("case, needle", [
    ("ms", "look like milliseconds"),
    ("count", "4 echoes but 3 echo times"),
    ("order", "echo times must increase"),
    ("sidecar", "disagree with the sidecars' EchoTime"),
    ("b0", "disagrees with the sidecars' MagneticFieldStrength"),
    ("swapped", "are --phase and --magnitude swapped?"),
    ("fewer", "the phase has 4 echoes but the magnitude has 3"),
    ("missing", "does not exist"),
    ("grid", "is not on the phase's grid"),
    ("unknown", "invalid choice: 'romeo'"),
])
def test_bad_field_inputs_are_one_line_and_write_nothing(sets, tmp_path, capsys, case, needle):
    bids, _ = sets["bids"]
    phase, magnitude = sets["plain"]
    acq, grid = gre_data.acquisition()
    tes = "0.004,0.012,0.02,0.028"
    extra = {"ms": ["--echo-times", "4,12,20,28", "--b0", "3"],
             "count": ["--echo-times", "0.004,0.012,0.02", "--b0", "3"],
             "order": ["--echo-times", "0.004,0.02,0.012,0.028", "--b0", "3"],
             "swapped": ["--echo-times", tes, "--b0", "3"],
             "fewer": ["--echo-times", tes, "--b0", "3"],
             "missing": ["--echo-times", tes, "--b0", "3"],
             "unknown": ["--echo-times", tes, "--b0", "3", "--unwrap", "romeo"]}.get(case, [])
    if case in ("sidecar", "b0"):
        args = field_args(bids[:1], tmp_path, *(["--echo-times", "0.005,0.012,0.02,0.028"] if case == "sidecar"
                                                 else ["--b0", "7"]))
    elif case == "swapped":
        args = field_args(magnitude, tmp_path, *extra, magnitude=phase)
    elif case == "fewer":
        args = field_args(phase, tmp_path, *extra, magnitude=magnitude[:3])
    elif case == "missing":
        args = field_args([tmp_path / "nope.nii.gz"], tmp_path, *extra, magnitude=magnitude)
    elif case == "grid":
        shifted = qio.Volume(grid.array, grid.spacing_mm, (0.0, 0.0, 0.0), grid.direction)
        user = qio.write_volume(tmp_path / "user.nii.gz", acq.brain_mask.astype(np.float32), like=shifted)
        args = field_args(bids[:1], tmp_path, "--mask", user)
    else:
        args = field_args(phase, tmp_path, *extra, magnitude=magnitude)
    if case == "unknown":  # a usage error: argparse's one line
        with pytest.raises(SystemExit) as stop:
            main([str(a) for a in args])
        assert stop.value.code == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and needle in lines[0]
    else:
        refused(args, capsys, needle, tmp_path / "field.nii.gz", tmp_path / "mask.nii.gz")


@pytest.mark.parametrize("case, needle", [
    ("input", "is the input file"),
    ("sibling", "is the input file"),
    ("twice", "outputs are both"),
    ("suffix", "cannot write"),
    ("folder", "is a folder"),
])
def test_bad_outputs_are_refused_before_any_stage(sets, tmp_path, capsys, case, needle):
    bids, _ = sets["bids"]
    field, mask = tmp_path / "field.nii.gz", tmp_path / "mask.nii.gz"
    outputs = {"input": (bids[0], mask), "sibling": (bids[2], mask), "twice": (field, field),
               "suffix": (tmp_path / "field.txt", mask), "folder": (tmp_path / "dir.nii.gz", mask)}[case]
    (tmp_path / "dir.nii.gz").mkdir()
    args = ["field", "--phase", bids[0], "--out-field", outputs[0], "--out-mask", outputs[1]]
    code, _, lines = run(args, capsys)
    assert code == 2 and len(lines) == 1 and needle in lines[0], lines
    assert not stage_lines(lines) and not mask.exists() and not (tmp_path / "field.txt").exists()


def test_ctrl_c_during_the_stages_exits_130_and_writes_nothing(sets, tmp_path):
    phase, _ = sets["bids"]
    command = [sys.executable, "-m", "qsmdip", *[str(a) for a in field_args(phase[:1], tmp_path)]]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = proc.stderr.readline()
    assert first.startswith("field: stage 1/7 inputs"), first + proc.communicate()[1]
    proc.send_signal(signal.SIGINT)
    err = first + proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "qsmdip field: interrupted" and "Traceback" not in err
    assert "stage 7/7" not in err
    assert sorted(os.listdir(tmp_path)) == []


# -- qsmdip reconstruct --phase ---------------------------------------------------------------------------------
def test_reconstruct_from_the_phase_equals_field_then_reconstruct(sets, tmp_path, capsys):
    phase, magnitude = sets["4d"]
    qsm, kept_field, kept_mask = tmp_path / "qsm.nii.gz", tmp_path / "kf.nii.gz", tmp_path / "km.nii.gz"
    code, out, lines = run(["reconstruct", "--phase", *phase, "--magnitude", *magnitude, "--out", qsm,
                            "--out-field", kept_field, "--out-mask", kept_mask, "--method", "tkd", "--no-progress"],
                           capsys)
    assert code == 0, lines
    assert len(stage_lines(lines, "reconstruct")) == 7 and f"reconstruct: {B0_LINE}" in lines
    # a method that inverts the local field is warned about once the field is made, before it runs
    last_stage = lines.index(stage_lines(lines, "reconstruct")[-1])
    assert lines[last_stage + 1].startswith("warning: tkd inverts the pipeline's local field"), lines
    assert "single-step-tv measured best" in lines[last_stage + 1]
    assert f"tkd: {B0_LINE}" in lines
    assert f"reconstruct: kept the local field: {kept_field}" in lines
    _, grid = gre_data.acquisition()
    assert qio.read_volume(qsm).same_geometry(grid)
    again = tmp_path / "again.nii.gz"
    code, _, _ = run(["reconstruct", "--field", kept_field, "--mask", kept_mask, "--out", again, "--method", "tkd",
                      "--no-progress"], capsys)
    assert code == 0
    np.testing.assert_array_equal(qio.read_volume(qsm).array, qio.read_volume(again).array)


def test_single_step_tv_from_the_phase_inverts_the_total_field(sets, tmp_path, capsys):
    """From the phase the default method is single-step TV, and it is handed the pipeline's total field, not the
    local one: the same map comes from the kept total field and mask given as --field; and it is closer to the
    truth than TV on the local field."""
    from qsmdip.metrics import nrmse

    phase, magnitude = sets["4d"]
    qsm, total, kept_mask = tmp_path / "qsm.nii.gz", tmp_path / "total.nii.gz", tmp_path / "km.nii.gz"
    code, out, lines = run(["reconstruct", "--phase", *phase, "--magnitude", *magnitude, "--out", qsm,
                            "--total-field", total, "--out-mask", kept_mask, "--no-progress"], capsys)
    assert code == 0, lines
    assert any(line.startswith("single-step-tv: ") for line in out.splitlines() + lines), (out, lines)  # the default
    assert not any("inverts the pipeline's local field" in line for line in lines), lines  # nothing to warn about
    again = tmp_path / "again.nii.gz"
    code, _, lines = run(["reconstruct", "--field", total, "--mask", kept_mask, "--out", again,
                          "--method", "single-step-tv", "--no-progress"], capsys)
    assert code == 0, lines
    chi = qio.read_volume(qsm).array
    np.testing.assert_array_equal(chi, qio.read_volume(again).array)
    tv_map = tmp_path / "tv.nii.gz"
    code, _, lines = run(["reconstruct", "--phase", *phase, "--magnitude", *magnitude, "--out", tv_map,
                          "--method", "tv", "--no-progress"], capsys)
    assert code == 0, lines
    acq, _ = gre_data.acquisition()
    mask = qio.read_volume(kept_mask).array > 0.5
    ours, tv_error = nrmse(chi, acq.chi_ppm, mask), nrmse(qio.read_volume(tv_map).array, acq.chi_ppm, mask)
    assert np.count_nonzero(chi[mask]) > 0.99 * mask.sum()  # chi on the whole mask, the rim included
    # measured 45.5 against 55.2 % (4 mm, SNR 100; radii 6 and 12 mm. One 6 mm radius: 47.0)
    assert ours < 0.9 * tv_error, (ours, tv_error)


def test_reconstruct_from_the_phase_gives_the_root_sum_of_squares_as_the_prior(sets, tmp_path, capsys):
    from qsmdip.cli_field import reconstruct_from_phase
    from qsmdip.runner import ReconstructionRequest, run_reconstruction

    phase, magnitude = sets["bids"]
    args = build_parser().parse_args(["reconstruct", "--phase", str(phase[0]), "--out", str(tmp_path / "q.nii.gz"),
                                      "--method", "tkd"])
    request = ReconstructionRequest(field_path="", mask_path="", output_path=args.out, method="tkd")
    seen = {}

    def run_and_look(req):
        seen["magnitude"] = qio.read_volume(req.magnitude_path)
        seen["field"] = qio.read_volume(req.field_path)
        return run_reconstruction(req)

    result = reconstruct_from_phase(args, request, run_and_look)
    acq, grid = gre_data.acquisition()
    assert result.output_path == args.out and os.path.exists(args.out)
    assert seen["magnitude"].same_geometry(grid) and seen["field"].same_geometry(grid)
    rss = np.sqrt(np.sum(acq.magnitude.astype(np.float32) ** 2, axis=0))
    np.testing.assert_allclose(seen["magnitude"].array, rss, rtol=1e-5)
    capsys.readouterr()


@pytest.mark.parametrize("extra, needle", [
    (["--set", "threshold=abc"], "tkd setting threshold='abc' is invalid"),
    (["--out-field", "{qsm}"], "the local field and QSM outputs are both"),
    (["--out-mask", "{phase}"], "is the input file"),
])
def test_reconstruct_from_the_phase_refuses_before_any_stage(sets, tmp_path, capsys, extra, needle):
    phase, magnitude = sets["4d"]
    qsm = tmp_path / "qsm.nii.gz"
    extra = [e.format(qsm=qsm, phase=phase[0]) for e in extra]
    code, _, lines = run(["reconstruct", "--phase", *phase, "--magnitude", *magnitude, "--out", qsm, "--method", "tkd",
                          "--no-progress", *extra], capsys)
    assert code == 2 and len(lines) == 1 and needle in lines[0], lines
    assert not qsm.exists()


@pytest.mark.parametrize("args, needle", [
    (["reconstruct", "--phase", "p.nii.gz"], "the following arguments are required: --out"),
    (["reconstruct", "--field", "f", "--phase", "p"], "argument --phase: not allowed with argument --field"),
    (["reconstruct", "--phase", "p", "--out", "q.nii.gz", "--units", "hz"], "argument --units: does not apply"),
    (["reconstruct", "--field", "f", "--mask", "m", "--out", "q.nii.gz", "--out-field", "x.nii.gz"],
     "argument --out-field: only with --phase"),
    (["reconstruct", "--field", "f", "--mask", "m", "--out", "q.nii.gz", "--magnitude", "a", "b"],
     "argument --magnitude: give one file with --field"),
    (["field", "--phase", "p", "--out-field", "f.nii.gz", "--out-mask", "m.nii.gz", "--echo-times", "0.004,x"],
     "--echo-times must be seconds separated by commas"),
    (["field", "--phase", "p", "--out-field", "f.nii.gz"], "the following arguments are required: --out-mask"),
])
def test_usage_errors_are_one_line(capsys, args, needle):
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and lines[0].endswith("--help)"), lines


def test_ctrl_c_during_the_reconstruction_leaves_no_output_at_all(sets, tmp_path):
    phase, magnitude = sets["4d"]
    outputs = [tmp_path / "qsm.nii.gz", tmp_path / "kf.nii.gz", tmp_path / "km.nii.gz"]
    command = [sys.executable, "-m", "qsmdip", "reconstruct", "--phase", *map(str, phase), "--magnitude",
               *map(str, magnitude), "--out", str(outputs[0]), "--out-field", str(outputs[1]), "--out-mask",
               str(outputs[2]), "--method", "tv", "--set", "alpha=0.03", "--set", "tolerance=0", "--iterations",
               "100000", "--no-progress"]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stderr.readline()
        seen.append(line)
        if not line or line.startswith("tv: B0 direction"):
            break
    assert proc.poll() is None, "".join(seen) + proc.communicate()[1]
    time.sleep(0.5)  # well inside the TV iterations
    proc.send_signal(signal.SIGINT)
    err = "".join(seen) + proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "qsmdip reconstruct: interrupted" and "Traceback" not in err
    assert [p for p in outputs if p.exists()] == []
