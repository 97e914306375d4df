"""The command line end to end on a small phantom, and every bad input it must refuse cleanly."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from qsmdip import io as qio
from qsmdip.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    assert main(["phantom", str(out), "--voxel", "4", "--oblique", "20", "--snr", "300"]) == 0
    return out


def files(d):
    return {n: str(d / f"{n}.nii.gz") for n in ("field", "mask", "chi")}


def test_phantom_writes_oblique_geometry(phantom_dir):
    field = qio.read_volume(files(phantom_dir)["field"])
    assert field.spacing_mm == pytest.approx((4, 4, 4))
    b0 = field.b0_dir()
    assert b0 == pytest.approx((0, np.sin(np.radians(20)), np.cos(np.radians(20))), abs=1e-5)
    mask = qio.read_volume(files(phantom_dir)["mask"]).array
    assert set(np.unique(mask)) == {0.0, 1.0}


@pytest.mark.parametrize("method", ["tkd", "tikhonov"])
def test_reconstruct_and_evaluate(phantom_dir, tmp_path, method, capsys):
    f = files(phantom_dir)
    out = tmp_path / f"qsm_{method}.nrrd"
    code = main(["reconstruct", "--field", f["field"], "--mask", f["mask"], "--out", str(out),
                 "--method", method, "--reference", f["chi"], "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert "NRMSE" in text and method in text
    # Tikhonov's weight is chosen from the data and said; TKD has none
    assert ("lambda_" in text and "chosen from the data (gcv_mask)" in text) == (method == "tikhonov")
    qsm = qio.read_volume(str(out))
    field = qio.read_volume(f["field"])
    assert qsm.same_geometry(field)
    assert main(["evaluate", "--qsm", str(out), "--reference", f["chi"], "--mask", f["mask"], "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) >= {"nrmse", "hfen", "ssim", "xsim", "psnr", "pearson"}
    assert 5 < metrics["nrmse"] < 100
    assert metrics["xsim"] > 0.3


def test_oblique_geometry_is_used(phantom_dir, tmp_path, capsys):
    """Ignoring the direction matrix (forcing an axial B0) must give a clearly worse map."""
    f = files(phantom_dir)
    scores = {}
    for label, extra in (("geometry", []), ("forced-axial", ["--b0-direction", "0,-0.34202,0.93969"])):
        out = tmp_path / f"{label}.nii.gz"
        assert main(["reconstruct", "--field", f["field"], "--mask", f["mask"], "--out", str(out),
                     "--method", "tikhonov", "--no-progress", *extra]) == 0
        capsys.readouterr()
        assert main(["evaluate", "--qsm", str(out), "--reference", f["chi"], "--mask", f["mask"], "--json"]) == 0
        scores[label] = json.loads(capsys.readouterr().out)["nrmse"]
    assert scores["forced-axial"] > scores["geometry"] + 10


def test_units_hz_and_rad_give_the_same_map(tmp_path, capsys):
    ppm_dir, hz_dir, rad_dir = tmp_path / "ppm", tmp_path / "hz", tmp_path / "rad"
    assert main(["phantom", str(ppm_dir), "--voxel", "5"]) == 0
    assert main(["phantom", str(hz_dir), "--voxel", "5", "--units", "hz", "--b0", "3"]) == 0
    assert main(["phantom", str(rad_dir), "--voxel", "5", "--units", "rad", "--b0", "7", "--te", "0.01"]) == 0
    capsys.readouterr()
    maps = []
    for d, extra in ((ppm_dir, []), (hz_dir, ["--units", "hz", "--b0", "3"]),
                     (rad_dir, ["--units", "rad", "--b0", "7", "--te", "0.01"])):
        out = d / "qsm.nii.gz"
        assert main(["reconstruct", "--field", str(d / "field.nii.gz"), "--mask", str(d / "mask.nii.gz"),
                     "--out", str(out), "--method", "tkd", "--no-progress", *extra]) == 0
        maps.append(qio.read_volume(str(out)).array)
    assert np.abs(maps[0]).max() > 0.01
    assert np.allclose(maps[1], maps[0], atol=1e-5)
    assert np.allclose(maps[2], maps[0], atol=1e-5)


def test_snapshots_written(phantom_dir, tmp_path):
    f = files(phantom_dir)
    snaps = tmp_path / "snaps"
    assert main(["reconstruct", "--field", f["field"], "--mask", f["mask"], "--out", str(tmp_path / "q.nii.gz"),
                 "--method", "tv", "--iterations", "6", "--every", "3", "--snapshots", str(snaps),
                 "--no-progress"]) == 0
    names = sorted(os.listdir(snaps))
    # iteration 0: the automatic weight's candidates, then every 3 iterations and the last
    assert names == ["snapshot_00000.nii.gz", "snapshot_00003.nii.gz", "snapshot_00006.nii.gz"]


def write(path, array, spacing=(4, 4, 4)):
    qio.write_volume(str(path), np.asarray(array, dtype=np.float32), spacing_mm=spacing)
    return str(path)


def write_raw(path, array, spacing=(4, 4, 4)):
    """Write with SimpleITK itself: for inputs the library refuses to write (NaN, Inf)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array, np.float32).transpose(2, 1, 0)))
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return str(path)


def run_cli(args, capsys):
    code = main(args)
    err = capsys.readouterr().err
    return code, err


@pytest.fixture
def small(tmp_path):
    rng = np.random.default_rng(1)
    field = rng.normal(0, 0.02, (12, 13, 14))
    mask = np.zeros((12, 13, 14))
    mask[3:9, 3:10, 3:11] = 1
    return tmp_path, field, mask


def recon_args(field, mask, out, *extra):
    return ["reconstruct", "--field", field, "--mask", mask, "--out", out, "--method", "tkd", "--no-progress", *extra]


@pytest.mark.parametrize("case, needle", [
    ("missing", "no such file"),
    ("size", "shape"),
    ("geometry", "spacing"),
    ("empty", "empty"),
    ("nan", "NaN"),
    ("hz_without_b0", "B0"),
    ("rad_without_te", "echo time"),
    ("two_d", "2D"),
    ("four_d", "4D"),
    ("garbage", "read"),
])
def test_bad_input_is_one_clear_line(small, case, needle, capsys):
    tmp, field, mask = small
    f = write(tmp / "field.nii.gz", field)
    m = write(tmp / "mask.nii.gz", mask)
    out = str(tmp / "out.nii.gz")
    extra = []
    if case == "missing":
        f = str(tmp / "nope.nii.gz")
    elif case == "size":
        m = write(tmp / "mask2.nii.gz", mask[:-1])
    elif case == "geometry":
        m = write(tmp / "mask2.nii.gz", mask, spacing=(4, 4, 3))
    elif case == "empty":
        m = write(tmp / "mask2.nii.gz", np.zeros_like(mask))
    elif case == "nan":
        bad = field.copy()
        bad[5, 5, 5] = np.nan
        f = write_raw(tmp / "field2.nrrd", bad)
    elif case == "hz_without_b0":
        extra = ["--units", "hz"]
    elif case == "rad_without_te":
        extra = ["--units", "rad", "--b0", "3"]
    elif case == "two_d":
        f = str(tmp / "flat.nii.gz")
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6), np.float32)), f)
    elif case == "four_d":
        f = str(tmp / "multi.nii.gz")
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 5, 6, 7), np.float32), isVector=False), f)
    elif case == "garbage":
        f = str(tmp / "garbage.nii.gz")
        with open(f, "wb") as handle:
            handle.write(b"this is not an image")
    code, err = run_cli(recon_args(f, m, out, *extra), capsys)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    assert needle.lower() in lines[0].lower()
    assert "Traceback" not in err
    assert not os.path.exists(out)


def test_non_binary_mask_warns_and_runs(small, capsys):
    tmp, field, mask = small
    f = write(tmp / "field.nii.gz", field)
    m = write(tmp / "mask.nii.gz", mask * 0.9)
    out = str(tmp / "out.nii.gz")
    code, err = run_cli(recon_args(f, m, out), capsys)
    assert code == 0
    assert "warning" in err.lower() and "mask" in err.lower()
    assert os.path.exists(out)


def write_echoes(path, echoes, like):
    """A 4D file (echoes on the fourth axis) on the grid of the Volume ``like``."""
    frames = []
    for echo in echoes:
        frame = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(echo, np.float32).transpose(2, 1, 0)))
        frame.SetSpacing(like.spacing_mm)
        frame.SetOrigin(like.origin)
        frame.SetDirection(tuple(float(x) for x in like.direction.ravel()))
        frames.append(frame)
    sitk.WriteImage(sitk.JoinSeries(frames), str(path))
    return str(path)


def test_reconstruct_with_a_multi_echo_magnitude(phantom_dir, tmp_path, capsys):
    f = files(phantom_dir)
    field = qio.read_volume(f["field"])
    mask = qio.read_volume(f["mask"]).array > 0
    echoes = [(200.0 + 300.0 * mask) * np.exp(-te / 0.05) for te in (0.005, 0.015, 0.025)]   # T2* decay
    magnitude = write_echoes(tmp_path / "magnitude.nii.gz", echoes, field)
    with_magnitude, without = tmp_path / "with.nii.gz", tmp_path / "without.nii.gz"
    assert main(recon_args(f["field"], f["mask"], str(with_magnitude), "--magnitude", magnitude)) == 0
    err = capsys.readouterr().err
    assert "warning: magnitude has 3 echoes: combined by root sum of squares" in err
    assert main(recon_args(f["field"], f["mask"], str(without))) == 0
    qsm = qio.read_volume(str(with_magnitude))
    assert qsm.same_geometry(field) and np.abs(qsm.array[mask]).max() > 0.01
    # TKD has no use for the magnitude: the map is the one made without it
    np.testing.assert_array_equal(qsm.array, qio.read_volume(str(without)).array)


@pytest.mark.parametrize("case, needle", [
    ("missing", "no such file"),
    ("zero", "magnitude is zero everywhere"),
    ("negative", "magnitude has negative values"),
    ("nan", "magnitude has 1 NaN/Inf values"),
    ("shape", "magnitude shape"),
    ("spacing", "field and magnitude are on different grids: spacing"),
    ("origin", "field and magnitude are on different grids: origin"),
])
def test_bad_magnitude_is_one_clear_line(small, case, needle, capsys):
    tmp, field, mask = small
    f = write(tmp / "field.nii.gz", field)
    m = write(tmp / "mask.nii.gz", mask)
    out = str(tmp / "out.nii.gz")
    good = 100.0 + 50.0 * mask
    if case == "missing":
        magnitude = str(tmp / "no-magnitude.nii.gz")
    elif case == "zero":
        magnitude = write(tmp / "magnitude.nii.gz", np.zeros_like(good))
    elif case == "negative":
        magnitude = write(tmp / "magnitude.nii.gz", good - 120.0)
    elif case == "nan":
        bad = good.copy()
        bad[5, 5, 5] = np.nan
        magnitude = write_raw(tmp / "magnitude.nrrd", bad)
    elif case == "shape":
        magnitude = write(tmp / "magnitude.nii.gz", good[:, :, :-1])
    elif case == "spacing":
        magnitude = write(tmp / "magnitude.nii.gz", good, spacing=(4, 4, 3))
    elif case == "origin":
        magnitude = str(tmp / "magnitude.nii.gz")
        qio.write_volume(magnitude, good, spacing_mm=(4, 4, 4), origin=(0.0, 0.0, 2.0))
    code, err = run_cli(recon_args(f, m, out, "--magnitude", magnitude), capsys)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    assert needle in lines[0] and "Traceback" not in err
    assert not os.path.exists(out)


def test_help_explains_each_command():
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "QSMDIP"))
    for command in ([], ["phantom"], ["reconstruct"], ["evaluate"], ["export-dicom"], ["demo"]):
        proc = subprocess.run([sys.executable, "-m", "qsmdip", *command, "--help"], capture_output=True,
                              text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "usage: qsmdip" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "qsmdip", "reconstruct", "--help"], capture_output=True,
                          text=True, env=env, timeout=120)
    for flag in ("--units", "--b0", "--te", "--reference", "--snapshots", "--every", "--device", "--iterations",
                 "--seed", "--preset", "--method", "--magnitude"):
        assert flag in proc.stdout


def test_export_dicom_reads_back_in_ppm_on_the_same_grid(tmp_path, capsys):
    pytest.importorskip("pydicom")
    rng = np.random.default_rng(3)
    chi = rng.normal(0, 0.1, (6, 5, 4))
    chi[0, 0, 0] = 1.2345
    angle = np.radians(20)
    direction = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    qsm = str(qio.write_volume(tmp_path / "qsm.nrrd", chi, spacing_mm=(1.0, 1.5, 2.0), origin=(5.0, -3.0, 7.0),
                               direction=direction))
    out = tmp_path / "dicom"
    assert main(["export-dicom", "--qsm", qsm, "--out", str(out), "--description", "QSM test"]) == 0
    assert "wrote 4 DICOM files" in capsys.readouterr().out
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(out)))
    image = reader.Execute()
    back = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    assert np.max(np.abs(back - chi)) <= 0.0005 + 1e-7  # within 1 ppb (rounded to whole ppb)
    np.testing.assert_allclose(image.GetSpacing(), (1.0, 1.5, 2.0), atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), (5.0, -3.0, 7.0), atol=1e-6)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), direction, atol=1e-6)


def test_export_dicom_bad_input_is_one_line(tmp_path, capsys):
    pytest.importorskip("pydicom")
    big = np.zeros((4, 4, 3))
    big[1, 1, 1] = 40.0  # beyond the +-32.767 ppm of 16-bit ppb
    qsm = str(qio.write_volume(tmp_path / "big.nii.gz", big))
    used = tmp_path / "used"
    used.mkdir()
    (used / "other.dcm").write_text("another series")
    for args, needle in (
            (["--qsm", qsm, "--out", str(tmp_path / "a")], "beyond the +-32.767 ppm"),
            (["--qsm", qsm, "--out", str(used), "--clip"], "is not empty"),
            (["--qsm", qsm, "--out", str(tmp_path / "b"), "--like", str(tmp_path / "nowhere")],
             "--like " + str(tmp_path / "nowhere") + ": no such DICOM folder or file"),
            (["--qsm", str(tmp_path / "missing.nii.gz"), "--out", str(tmp_path / "c")], "no such file")):
        code, err = run_cli(["export-dicom", *args], capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and needle in lines[0], err
        assert "Traceback" not in err
    assert not (tmp_path / "b").exists()
    assert main(["export-dicom", "--qsm", qsm, "--out", str(tmp_path / "clipped"), "--clip"]) == 0
    assert len(list((tmp_path / "clipped").iterdir())) == 3
