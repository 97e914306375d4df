"""Issue 9: no silent wrong answers, no lost inputs.

One test (or a few) per case the issue lists, run through the real command line, files and worker: each
bad case ends in one line on stderr and exit status 2 (130 for Ctrl-C), writes nothing at --out, and
leaves every input as it was.
"""
import json
import os
import signal
import subprocess
import sys
import time

import nibabel
import numpy as np
import pytest

from qsmdip import io as qio
from qsmdip.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "QSMDIP"), PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """The 4 mm phantom of the issue's reproductions, and a byte copy of each file to prove it unchanged."""
    d = tmp_path_factory.mktemp("phantom")
    assert main(["phantom", str(d), "--voxel", "4"]) == 0
    paths = {n: str(d / f"{n}.nii.gz") for n in ("field", "mask", "chi")}
    original = {n: open(p, "rb").read() for n, p in paths.items()}
    yield paths
    for name, path in paths.items():
        assert open(path, "rb").read() == original[name], f"the {name} input was changed"


def run(args, capsys):
    """Run the command line; return (exit status, stderr lines), failing on any traceback."""
    code = main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if line.strip()]


def refused(args, capsys, needle, out=None):
    """Exit status 2, one line on stderr holding ``needle``, and no file at ``out``."""
    code, lines = run(args, capsys)
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert needle in lines[0], lines[0]
    if out is not None:
        assert not os.path.exists(out)
    return lines[0]


def reconstruct(phantom, out, *extra, field=None, mask=None, method="tkd"):
    return ["reconstruct", "--field", field or phantom["field"], "--mask", mask or phantom["mask"],
            "--out", str(out), "--method", method, "--no-progress", *extra]


def save_nifti(path, array, like):
    """Write a NIfTI with nibabel itself (the library refuses to write NaN), on the grid of ``like``."""
    header_source = nibabel.load(like)
    nibabel.save(nibabel.Nifti1Image(np.asarray(array, np.float32), header_source.affine), str(path))
    return str(path)


def inside_voxel(phantom):
    mask = nibabel.load(phantom["mask"]).get_fdata() > 0
    return tuple(np.argwhere(mask)[len(np.argwhere(mask)) // 2])


# 1. NaN / Inf in a NIfTI field or mask ------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_in_a_nifti_field_is_refused(phantom, tmp_path, capsys, suffix, bad):
    field = nibabel.load(phantom["field"]).get_fdata()
    field[inside_voxel(phantom)] = bad
    path = save_nifti(tmp_path / f"field{suffix}", field, phantom["field"])
    out = tmp_path / "qsm.nii.gz"
    refused(reconstruct(phantom, out, field=path), capsys, "1 NaN/Inf voxels inside the mask", out)


def test_nan_in_a_nifti_mask_is_refused(phantom, tmp_path, capsys):
    mask = nibabel.load(phantom["mask"]).get_fdata()
    mask[0, 0, 0] = np.nan
    path = save_nifti(tmp_path / "mask.nii.gz", mask, phantom["mask"])
    out = tmp_path / "qsm.nii.gz"
    refused(reconstruct(phantom, out, mask=path), capsys, "the mask has 1 NaN/Inf voxels", out)


# 2. Truncated files --------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd"])
def test_truncated_field_is_refused(phantom, tmp_path, capsys, suffix):
    path = tmp_path / f"field{suffix}"
    qio.write_volume(path, qio.read_volume(phantom["field"]).array, like=qio.read_volume(phantom["field"]))
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.55)])
    out = tmp_path / "qsm.nii.gz"
    line = refused(reconstruct(phantom, out, field=str(path)), capsys, f"cannot read {path}", out)
    assert "truncated" in line or "fread got only" in line or "expected" in line


# 3. One extreme voxel --------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [3e38, 1e30, -1e4])
def test_one_extreme_voxel_is_refused_not_spread_over_the_map(phantom, tmp_path, capsys, value):
    field = nibabel.load(phantom["field"]).get_fdata()
    voxel = inside_voxel(phantom)
    field[voxel] = value
    path = save_nifti(tmp_path / "field.nii.gz", field, phantom["field"])
    out = tmp_path / "qsm.nii.gz"
    line = refused(reconstruct(phantom, out, field=path), capsys, "more than 50 ppm", out)
    assert str(list(int(v) for v in voxel)) in line  # says where


def test_a_map_with_nan_or_inf_is_never_written(tmp_path):
    for bad in (np.nan, np.inf, 1e39):  # 1e39 overflows float32
        array = np.zeros((4, 5, 6))
        array[1, 2, 3] = bad
        with pytest.raises(qio.QSMInputError, match="1 NaN/Inf voxels"):
            qio.write_volume(tmp_path / "map.nii.gz", array)
        assert os.listdir(tmp_path) == []


# 4. --out equal to an input --------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["field", "mask", "reference", "link to the field"])
def test_output_that_is_an_input_is_refused(phantom, tmp_path, capsys, which):
    out = {"field": phantom["field"], "mask": phantom["mask"], "reference": phantom["chi"]}.get(which)
    if which == "link to the field":
        out = str(tmp_path / "qsm.nii.gz")
        os.symlink(phantom["field"], out)
    name = which.split()[-1]
    refused(reconstruct(phantom, out, "--reference", phantom["chi"]), capsys,
            f"is the {name} file: choose another name")
    # the fixture checks, byte for byte, that no input changed


# 5. Ctrl-C ------------------------------------------------------------------------------------------------
def test_ctrl_c_exits_130_at_once_and_leaves_no_output(phantom, tmp_path):
    out, snapshots = tmp_path / "qsm.nii.gz", tmp_path / "snaps"
    command = [sys.executable, "-m", "qsmdip", *reconstruct(phantom, out, "--set", "alpha=0.03", "--set",
                                                            "tolerance=0", "--iterations", "100000", "--every",
                                                            "1", "--snapshots", str(snapshots), method="tv")]
    # SIGINT must not be inherited as ignored (as it is for background jobs of a shell)
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not (snapshots.is_dir() and any(snapshots.iterdir())):
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1]
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, err
    assert time.time() - sent < 20
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1] == "qsmdip reconstruct: interrupted" and "Traceback" not in err
    assert not out.exists()
    assert all(not name.startswith(".tmp-") for name in os.listdir(snapshots))


# 6. The output path is checked before the solve ------------------------------------------------------------
def unusable_outputs(tmp_path):
    folder = tmp_path / "x.nii.gz"
    folder.mkdir()
    a_file = tmp_path / "plain.txt"
    a_file.write_text("not a folder")
    return [(tmp_path / "x.png", "use one of .nii.gz"), (folder, "it is a folder"),
            (a_file / "sub" / "qsm.nii.gz", "is a file, not a folder"),
            (tmp_path / "x.Nii.Gz", "lower case")]


def test_unusable_output_is_refused_before_dip_starts(phantom, tmp_path, capsys):
    for out, needle in unusable_outputs(tmp_path):
        started = time.time()
        # DIP would take minutes: a single line and a quick exit show that nothing was solved
        refused(reconstruct(phantom, out, method="dip"), capsys, needle)
        assert time.time() - started < 10


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write a read-only folder")
def test_read_only_folder_is_refused_before_the_solve(phantom, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        refused(reconstruct(phantom, locked / "sub" / "qsm.nii.gz", method="dip"), capsys, "does not accept new files")
    finally:
        locked.chmod(0o755)


def test_upper_case_suffix_is_written_in_its_format(phantom, tmp_path, capsys):
    out = tmp_path / "QSM.NII.GZ"
    code, _ = run(reconstruct(phantom, out), capsys)
    assert code == 0
    assert out.read_bytes()[:2] == b"\x1f\x8b"  # gzip: NIfTI compressed, under the name asked for
    assert qio.read_volume(out).same_geometry(qio.read_volume(phantom["field"]))
    assert [p.name for p in tmp_path.iterdir()] == ["QSM.NII.GZ"]


# 7. One line instead of a traceback ------------------------------------------------------------------------
@pytest.mark.parametrize("method, setting, needle", [
    ("tv", "alpha=abc", "tv setting alpha='abc' is invalid: it must be a finite number"),
    ("tkd", "threshold=abc", "tkd setting threshold='abc' is invalid"),
    ("tkd", "threshold=[1,2]", "tkd setting threshold=[1, 2] is invalid"),
    ("tkd", "pad_factor=Infinity", "tkd setting pad_factor=inf is invalid"),
    ("dip", "betas=[0.5]", "dip setting betas=[0.5] is invalid: it must be a list of 2 finite numbers"),
    ("tikhonov", "lambda_=NaN", "tikhonov setting lambda_=nan is invalid"),
])
def test_badly_typed_setting_is_one_line(phantom, tmp_path, capsys, method, setting, needle):
    out = tmp_path / "qsm.nii.gz"
    refused(reconstruct(phantom, out, "--set", setting, method=method), capsys, needle, out)


def test_snapshots_naming_an_existing_file_is_one_line(phantom, tmp_path, capsys):
    out = tmp_path / "qsm.nii.gz"
    refused(reconstruct(phantom, out, "--snapshots", phantom["chi"], "--iterations", "3", method="tv"), capsys,
            "is a file, not a folder", out)


def test_phantom_into_an_existing_file_is_one_line(phantom, tmp_path, capsys):
    refused(["phantom", phantom["chi"], "--voxel", "8"], capsys, "is a file, not a folder")


def test_dip_on_a_tiny_volume_is_one_line(tmp_path, capsys):
    rng = np.random.default_rng(0)
    field = qio.write_volume(tmp_path / "field.nii.gz", rng.normal(0, 0.05, (3, 3, 3)), spacing_mm=(4, 4, 4))
    mask = qio.write_volume(tmp_path / "mask.nii.gz", np.ones((3, 3, 3)), spacing_mm=(4, 4, 4))
    out = tmp_path / "qsm.nii.gz"
    refused(["reconstruct", "--field", str(field), "--mask", str(mask), "--out", str(out), "--no-progress"],
            capsys, "too small for DIP's network of depth 3", out)


# 8. A field in Hz or rad passed as ppm ---------------------------------------------------------------------
@pytest.mark.parametrize("units", [["--units", "hz", "--b0", "1.5"], ["--units", "hz", "--b0", "3"],
                                   ["--units", "hz", "--b0", "7"], ["--units", "rad", "--b0", "7", "--te", "0.04"]])
def test_field_in_hz_or_rad_passed_as_ppm_is_refused(tmp_path, capsys, units):
    """Hz from 1.5 T up is refused; radians only when large (long TE, high field): a phase over a short TE
    is as small as a ppm field and cannot be told from one (it gets the 'large' warning at most)."""
    assert main(["phantom", str(tmp_path), "--voxel", "4", *units]) == 0
    capsys.readouterr()
    out = tmp_path / "qsm.nii.gz"
    line = refused(["reconstruct", "--field", str(tmp_path / "field.nii.gz"), "--mask", str(tmp_path / "mask.nii.gz"),
                    "--out", str(out), "--method", "tkd", "--no-progress"], capsys,
                   "implausible for a local field in ppm", out)
    assert "--units hz --b0" in line and "--units rad" in line
    # said in its units, the same file reconstructs
    code, _ = run(["reconstruct", "--field", str(tmp_path / "field.nii.gz"), "--mask", str(tmp_path / "mask.nii.gz"),
                   "--out", str(out), "--method", "tkd", "--no-progress", *units], capsys)
    assert code == 0 and out.exists()


# 9. The worker: badly typed job values are input errors ----------------------------------------------------
def job(phantom, tmp_path, **change):
    return dict({"protocol": 1, "field": phantom["field"], "mask": phantom["mask"],
                 "output": str(tmp_path / "qsm.nrrd"), "method": "tkd", "device": "cpu"}, **change)


@pytest.mark.parametrize("change, needle", [
    ({"b0_tesla": "3", "units": "hz"}, "job key b0_tesla='3' is invalid: it must be a finite number"),
    ({"settings": "x"}, "job key settings='x' is invalid"),
    ({"snapshot_every": "10"}, "job key snapshot_every='10' is invalid: it must be a whole number"),
    ({"b0_direction_world": [0, "z", 1]}, "job key b0_direction_world=[0, 'z', 1] is invalid"),
    ({"field": 3}, "job key field=3 is invalid: it must be a text"),
    ({"protocol": True}, "job protocol True is not supported"),
])
def test_badly_typed_job_values_are_input_errors(phantom, tmp_path, change, needle):
    from qsmdip.errors import QSMInputError
    from qsmdip.worker import parse_job

    with pytest.raises(QSMInputError) as error:  # the worker reports a QSMInputError as kind 'input', exit 2
        parse_job(job(phantom, tmp_path, **change))
    assert needle in str(error.value)


@pytest.mark.parametrize("content, needle", [
    (["a", "top-level", "array"], "the job file must hold one JSON object of key: value pairs, got an array"),
    ({"settings": {"threshold": "abc"}}, "tkd setting threshold='abc' is invalid"),
])
def test_worker_process_reports_bad_jobs_as_input(phantom, tmp_path, content, needle):
    body = content if isinstance(content, list) else job(phantom, tmp_path, **content)
    path = tmp_path / "job.json"
    path.write_text(json.dumps(body))
    proc = subprocess.run([sys.executable, "-m", "qsmdip.worker", str(path)], capture_output=True, text=True,
                          env=ENV, timeout=120)
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert final["event"] == "error" and final["kind"] == "input"
    assert needle in final["message"]
    assert "Traceback" not in proc.stderr and not (tmp_path / "qsm.nrrd").exists()


# 10. evaluate --json is valid JSON -------------------------------------------------------------------------
def test_evaluate_json_of_identical_maps_is_strict_json(phantom, capsys):
    assert main(["evaluate", "--qsm", phantom["chi"], "--reference", phantom["chi"], "--mask", phantom["mask"],
                 "--json"]) == 0

    def refuse_constant(name):
        raise AssertionError(f"{name} is not JSON")

    metrics = json.loads(capsys.readouterr().out, parse_constant=refuse_constant)
    assert metrics["psnr"] is None  # infinite PSNR
    assert metrics["nrmse"] == 0.0 and metrics["pearson"] == pytest.approx(1.0)


# 11. The smaller ones -----------------------------------------------------------------------------------------
def test_b0_that_does_not_apply_warns_and_nan_b0_is_an_error(phantom, tmp_path, capsys):
    out = tmp_path / "qsm.nii.gz"
    code, lines = run(reconstruct(phantom, out, "--b0", "3", "--te", "0.02"), capsys)
    assert code == 0
    assert "warning: B0 3 T is not used: the field is already in ppm" in lines
    assert "warning: the echo time 0.02 s is not used: only a field in rad needs it" in lines
    out.unlink()
    refused(reconstruct(phantom, out, "--b0", "nan"), capsys, "B0 must be a positive number of tesla, got nan", out)


def test_seed_reaches_tv(phantom, tmp_path, capsys):
    """TV has a seed (the voxels held out to choose alpha): --seed sets it instead of being dropped."""
    out = tmp_path / "qsm.nii.gz"
    refused(reconstruct(phantom, out, "--seed", "-1", method="tv"), capsys, "TV seed must be a whole number >= 0", out)


def test_reconstruct_says_the_b0_direction_it_uses(phantom, tmp_path, capsys):
    code, lines = run(reconstruct(phantom, tmp_path / "qsm.nii.gz", "--b0-direction", "0,1,0"), capsys)
    assert code == 0
    assert "tkd: B0 direction in the voxel frame (i, j, k): (0.000, 1.000, 0.000)" in lines  # axial grid


def test_error_text_has_no_numpy_reprs(phantom, tmp_path, capsys):
    line = refused(reconstruct(phantom, tmp_path / "q.nii.gz", "--set", "pad_factor=NaN"), capsys, "pad_factor")
    assert "np." not in line
    with pytest.raises(qio.QSMInputError) as error:
        qio.Volume(np.zeros((2, 2, 2)), origin=(np.float64(1.0), np.nan, 0.0))
    assert "np." not in str(error.value) and "(1, nan, 0)" in str(error.value)


@pytest.mark.parametrize("args, needle", [
    (["phantom", "out", "--voxel", "nan"], "argument --voxel: --voxel must be positive numbers of mm, got 'nan'"),
    (["reconstruct", "--field", "f", "--mask", "m", "--out", "q.nii.gz", "--b0-direction", "0,0,0"],
     "--b0-direction must be a non-zero vector"),
    (["reconstruct", "--field", "f"], "the following arguments are required: --mask, --out"),
])
def test_usage_errors_are_one_line(capsys, args, needle):
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and lines[0].endswith("--help)")
