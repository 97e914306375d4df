"""The Slicer module's Qt-free logic against a real MRML scene (slicer-core) and the real worker process.

No mocks: volumes are real vtkMRML*VolumeNodes, files go through real storage nodes, and every
reconstruction is a real ``python -m qsmdip.worker`` process. Failures are provoked for real: a
Python without torch, an address-space limit, a process killed from outside, an unwritable path.
"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import venv

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from qsmdip import io as qio  # noqa: E402
from qsmdip.errors import QSMInputError  # noqa: E402
from qsmdip.metrics import all_metrics  # noqa: E402
from qsmdip.phantom import make_head_phantom  # noqa: E402
from qsmdip.worker import parse_job  # noqa: E402

from QSMDIPLib.compare import compare_nodes, metric_table_rows, metrics_for_nodes, update_difference_node  # noqa: E402
from QSMDIPLib.job import (  # noqa: E402
    JobOptions, default_method_label, method_after_input_mode_change, options_from_panel, prepare_job,
    worker_takes_snapshot_dir)
from QSMDIPLib.process import (  # noqa: E402
    CREATE_NEW_PROCESS_GROUP, CREATE_NO_WINDOW, CommandSequence, WorkerProcess, describe_exit,
    popen_options,
)
from QSMDIPLib.session import ReconstructionSession  # noqa: E402
from QSMDIPLib.streaming import DEFAULT_WINDOW_PPM  # noqa: E402
from QSMDIPLib.torch_check import (  # noqa: E402
    TORCH_REQUIREMENT, TorchProbe, check_torch, meets_requirement, status_from_probe, torch_install_commands,
)

MODULE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "QSMDIP")
SPACING = (4.0, 4.4, 4.8)
SHAPE = (24, 26, 22)
LPS = np.diag([-1.0, -1.0, 1.0])
POSIX_ONLY = pytest.mark.skipif(os.name != "posix", reason="process groups and signals are POSIX")
#: One thread per worker: on a busy 2-core machine OpenMP's spinning threads slow small runs a lot.
WORKER_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
#: A DIP small enough for a test: few channels, two resolution levels.
TINY_DIP = {"width": 4, "depth": 2, "seed": 0}


def rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    a, b = [i for i in range(3) if i != axis]
    r = np.eye(3)
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


#: Oblique RAS direction (columns = world directions of i, j, k), like a tilted DICOM series.
DIRECTION_RAS = rotation(0, 20.0) @ rotation(2, 10.0) @ LPS
ORIGIN_RAS = np.array([40.0, -55.0, 12.5])


def ijk_to_ras_matrix(direction=DIRECTION_RAS, spacing=SPACING, origin=ORIGIN_RAS) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = direction @ np.diag(spacing)
    m[:3, 3] = origin
    return m


def node_matrix(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def add_volume(scene, cls, name, array_ijk, matrix=None):
    node = scene.AddNewNodeByClass(cls, name)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(np.asarray(array_ijk).transpose(2, 1, 0)))
    vm = vtk.vtkMatrix4x4()
    for r, row in enumerate(ijk_to_ras_matrix() if matrix is None else matrix):
        for c, value in enumerate(row):
            vm.SetElement(r, c, value)
    node.SetIJKToRASMatrix(vm)
    node.CreateDefaultDisplayNodes()
    return node


def node_ijk(node) -> np.ndarray:
    return np.array(slicer.util.arrayFromVolume(node)).transpose(2, 1, 0).copy()


def fingerprint(node):
    """Everything that would change if an input node were modified: voxels (and their modified time),
    grid, name, storage and parent transform. (The node's own modified time is left out: MRML bumps it
    when another node starts observing the same parent transform.)"""
    return (node.GetName(), node.GetStorageNodeID(), node.GetTransformNodeID(), node.GetImageData().GetMTime(),
            node_ijk(node).tobytes(), node_matrix(node).tobytes())


def group_members(pgid: int):
    """Live (non-zombie) processes in a process group, from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


@pytest.fixture(scope="module")
def phantom():
    """Head phantom on the oblique grid: B0 (scanner superior) expressed in the voxel frame."""
    b0_voxel = DIRECTION_RAS.T @ np.array([0.0, 0.0, 1.0])
    return make_head_phantom(SHAPE, SPACING, b0_dir=b0_voxel)


@pytest.fixture()
def scene():
    scene = slicer.vtkMRMLScene()
    slicer.vtkMRMLColorLogic().SetMRMLScene(scene)  # the default colour tables, as in the application
    return scene


@pytest.fixture()
def volumes(scene, phantom):
    field = add_volume(scene, "vtkMRMLScalarVolumeNode", "field", phantom.field_ppm)
    mask = add_volume(scene, "vtkMRMLLabelMapVolumeNode", "brain", phantom.mask.astype(np.uint8))
    chi = add_volume(scene, "vtkMRMLScalarVolumeNode", "chi", phantom.chi_ppm)
    return field, mask, chi


@pytest.fixture()
def temp_root(tmp_path):
    root = tmp_path / "slicer-temp"
    root.mkdir()
    return str(root)


def session_for(scene, volumes, options, temp_root, **kwargs):
    field, mask, chi = volumes
    kwargs.setdefault("reference_node", chi)
    kwargs.setdefault("python_command", [sys.executable])
    kwargs.setdefault("env", WORKER_ENV)
    return ReconstructionSession(scene, field, mask, options, module_dir=MODULE_DIR, temp_root=temp_root, **kwargs)


# -- job preparation ------------------------------------------------------------------------------
def test_job_files_keep_values_and_oblique_geometry_in_lps(scene, volumes, temp_root, phantom):
    field, mask, chi = volumes
    before = [fingerprint(n) for n in volumes]
    nodes_before = scene.GetNumberOfNodes()
    job = prepare_job(field, mask, JobOptions(b0_direction_ras=(1.0, 0.0, 0.0)), reference_node=chi,
                      temp_root=temp_root)
    try:
        for node, key in ((field, "field"), (mask, "mask"), (chi, "reference")):
            volume = qio.read_volume(job.job[key])
            np.testing.assert_array_equal(volume.array, node_ijk(node))  # same value at the same (i, j, k)
            assert volume.spacing_mm == pytest.approx(SPACING)
            assert volume.origin == pytest.approx(LPS @ ORIGIN_RAS)
            np.testing.assert_allclose(volume.direction, LPS @ DIRECTION_RAS, atol=1e-6)
        assert qio.read_volume(job.job["mask"]).array.dtype == np.uint8
        # the library derives the same voxel-frame B0 that made the phantom
        assert qio.read_volume(job.job["field"]).b0_dir() == pytest.approx(phantom.b0_dir, abs=1e-6)
        with open(job.job_path) as handle:
            on_disk = json.load(handle)
        assert on_disk == job.job
        snapshot_key = "snapshot_dir" if worker_takes_snapshot_dir() else "snapshot"
        assert set(on_disk) == {"protocol", "field", "mask", "reference", "magnitude", "output", snapshot_key,
                                "snapshot_every", "method", "preset", "units", "b0_tesla", "te_s",
                                "b0_direction_world", "device", "settings"}
        assert on_disk["magnitude"] is None   # optional, not given
        assert sorted(os.listdir(job.work_dir)) == ["field.nrrd", "job.json", "mask.nrrd", "reference.nrrd"]
        assert all(os.path.isabs(on_disk[k]) for k in ("field", "mask", "reference", "output", snapshot_key))
        assert on_disk["b0_direction_world"] == [-1.0, 0.0, 0.0]   # RAS right = LPS -x
        request = parse_job(on_disk)   # the worker's own parser accepts the job
        assert request.field_path == job.job["field"] and request.reference_path == job.job["reference"]
    finally:
        job.cleanup()
    assert os.listdir(temp_root) == []
    assert [fingerprint(n) for n in volumes] == before
    assert scene.GetNumberOfNodes() == nodes_before


def test_job_refuses_mismatched_grid_and_output_that_is_an_input(scene, volumes, temp_root, phantom):
    field, mask, chi = volumes
    shifted = ijk_to_ras_matrix(origin=ORIGIN_RAS + np.array([2.0, 0.0, 0.0]))
    other = add_volume(scene, "vtkMRMLLabelMapVolumeNode", "other", phantom.mask.astype(np.uint8), shifted)
    with pytest.raises(QSMInputError, match="'other' is not on the field's voxel grid"):
        prepare_job(field, other, JobOptions(), temp_root=temp_root)
    small = add_volume(scene, "vtkMRMLLabelMapVolumeNode", "small", phantom.mask[:-1].astype(np.uint8))
    with pytest.raises(QSMInputError, match="'small' has"):
        prepare_job(field, small, JobOptions(), temp_root=temp_root)
    with pytest.raises(QSMInputError, match="is one of the inputs"):
        prepare_job(field, mask, JobOptions(), output_node=field, temp_root=temp_root)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(QSMInputError, match="'empty' holds no image data"):
        prepare_job(empty, mask, JobOptions(), temp_root=temp_root)
    assert os.listdir(temp_root) == []


def magnitude_of(phantom) -> np.ndarray:
    """A GRE-magnitude-like image of the phantom: brighter brain, darker where susceptibility is high."""
    return np.clip(200.0 + 300.0 * phantom.mask - 500.0 * phantom.chi_ppm, 0.0, None).astype(np.float32)


def test_job_with_a_magnitude_writes_it_on_the_field_grid(scene, volumes, temp_root, phantom):
    field, mask, chi = volumes
    magnitude = add_volume(scene, "vtkMRMLScalarVolumeNode", "magnitude", magnitude_of(phantom))
    before = fingerprint(magnitude)
    job = prepare_job(field, mask, JobOptions(), magnitude_node=magnitude, temp_root=temp_root)
    try:
        assert job.job["magnitude"] == os.path.join(job.work_dir, "magnitude.nrrd") and job.job["reference"] is None
        volume = qio.read_volume(job.job["magnitude"])
        np.testing.assert_array_equal(volume.array, magnitude_of(phantom))
        assert volume.same_geometry(qio.read_volume(job.job["field"]), tol=1e-9)
        with open(job.job_path) as handle:
            request = parse_job(json.load(handle))
        assert request.magnitude_path == job.job["magnitude"]
    finally:
        job.cleanup()
    assert fingerprint(magnitude) == before and os.listdir(temp_root) == []


def test_job_refuses_a_magnitude_off_the_field_grid_or_as_output(scene, volumes, temp_root, phantom):
    field, mask, chi = volumes
    shifted = add_volume(scene, "vtkMRMLScalarVolumeNode", "shifted magnitude", magnitude_of(phantom),
                         ijk_to_ras_matrix(spacing=(4.0, 4.4, 5.0)))
    with pytest.raises(QSMInputError, match="'shifted magnitude' is not on the field's voxel grid"):
        prepare_job(field, mask, JobOptions(), magnitude_node=shifted, temp_root=temp_root)
    small = add_volume(scene, "vtkMRMLScalarVolumeNode", "small magnitude", magnitude_of(phantom)[:, :-1])
    with pytest.raises(QSMInputError, match="the magnitude 'small magnitude' has"):
        prepare_job(field, mask, JobOptions(), magnitude_node=small, temp_root=temp_root)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "no data")
    with pytest.raises(QSMInputError, match="the magnitude volume 'no data' holds no image data"):
        prepare_job(field, mask, JobOptions(), magnitude_node=empty, temp_root=temp_root)
    magnitude = add_volume(scene, "vtkMRMLScalarVolumeNode", "magnitude", magnitude_of(phantom))
    with pytest.raises(QSMInputError, match="is one of the inputs"):
        prepare_job(field, mask, JobOptions(), magnitude_node=magnitude, output_node=magnitude, temp_root=temp_root)
    assert os.listdir(temp_root) == []


def test_session_hands_the_magnitude_to_the_worker(scene, volumes, temp_root, phantom):
    good = add_volume(scene, "vtkMRMLScalarVolumeNode", "magnitude", magnitude_of(phantom))
    session = session_for(scene, volumes, JobOptions(method="tkd", device="cpu"), temp_root, magnitude_node=good)
    session.start()
    state = session.wait(120)
    assert state.phase == "done", state.message
    assert np.any(node_ijk(session.output_node)[phantom.mask] != 0)
    # a signed image in its place: the worker reads the magnitude file and refuses it
    signed = add_volume(scene, "vtkMRMLScalarVolumeNode", "signed", magnitude_of(phantom) - 250.0)
    session = session_for(scene, volumes, JobOptions(method="tkd", device="cpu"), temp_root, magnitude_node=signed)
    session.start()
    state = session.wait(120)
    assert state.phase == "failed" and state.error_kind == "input"
    assert "magnitude has negative values" in state.message and session.worker.exit.returncode == 2
    assert os.listdir(temp_root) == []


def test_panel_options_map_to_the_worker_vocabulary():
    dip = options_from_panel("DIP", "rad", 7.0, 0.025, "GPU", 5, 300, 0.002, 8, 3)
    assert (dip.method, dip.units, dip.b0_tesla, dip.te_s, dip.device, dip.snapshot_every) == \
        ("dip", "rad", 7.0, 0.025, "cuda", 5)
    assert dip.settings == {"iterations": 300, "learning_rate": 0.002, "width": 8, "seed": 3}
    tkd = options_from_panel("TKD", "Hz", 3.0, 0.02, "CPU", 10, 300, 0.002, 8, 3)
    assert (tkd.method, tkd.units, tkd.b0_tesla, tkd.te_s, tkd.device, tkd.settings) == ("tkd", "hz", 3.0, None, "cpu", {})
    ppm = options_from_panel("Tikhonov", "ppm", 3.0, 0.02, "auto", 10, 1, 0.1, 1, 0)
    assert (ppm.b0_tesla, ppm.te_s) == (None, None)
    with pytest.raises(QSMInputError, match="unknown method 'MEDI'"):
        options_from_panel("MEDI", "ppm", 3.0, 0.02, "auto", 10, 1, 0.1, 1, 0)


def test_panel_method_follows_the_input_modes_default_unless_the_user_picked_one():
    # the same defaults as the command line: DIP for a local field, single-step TV from the phase
    assert (default_method_label(False), default_method_label(True)) == ("DIP", "Single-step TV")
    assert options_from_panel(default_method_label(True), "ppm", 3.0, 0.02, "auto", 10, 1, 0.1, 1, 0).method == \
        "single-step-tv"
    assert method_after_input_mode_change("DIP", False, True) == "Single-step TV"
    assert method_after_input_mode_change("Single-step TV", True, False) == "DIP"
    assert method_after_input_mode_change("TV", False, True) == "TV"  # picked by the user: kept
    assert method_after_input_mode_change("DIP", True, False) == "DIP"  # picked in the GRE mode: kept
    assert method_after_input_mode_change("DIP", False, False) == "DIP"  # the mode did not change


# -- reconstructions through the real worker -------------------------------------------------------
def test_tkd_on_an_oblique_volume_matches_the_library_and_fills_a_new_output(scene, volumes, temp_root, phantom):
    from qsmdip.solvers.tkd import solve_tkd

    field, mask, chi = volumes
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    field.SetAndObserveTransformNodeID(transform.GetID())
    before = [fingerprint(n) for n in volumes]
    session = session_for(scene, volumes, JobOptions(method="tkd", device="cpu"), temp_root)
    session.start()
    state = session.wait(120)
    assert state.phase == "done", state.message
    assert state.device.startswith("CPU") and state.device in state.message

    output = session.output_node
    assert output.GetName() == "field_QSM" and scene.GetNodeByID(output.GetID()) is output
    np.testing.assert_allclose(node_matrix(output), node_matrix(field), atol=1e-6)
    assert output.GetTransformNodeID() == transform.GetID()
    display = output.GetDisplayNode()
    assert display.GetColorNodeID() == "vtkMRMLColorTableNodeGrey"
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == pytest.approx(DEFAULT_WINDOW_PPM)

    # the worker's map is the library's TKD with B0 along the scanner axis, not along the slices
    expected = solve_tkd(phantom.field_ppm, phantom.mask, SPACING, b0_dir=phantom.b0_dir, device="cpu").chi_ppm
    along_slices = solve_tkd(phantom.field_ppm, phantom.mask, SPACING, b0_dir=(0, 0, 1), device="cpu").chi_ppm
    result = node_ijk(output)
    np.testing.assert_allclose(result, expected, atol=1e-5)
    assert np.abs(result - along_slices).max() > 100 * 1e-5

    ours = metrics_for_nodes(output, chi, mask)
    assert ours == pytest.approx(state.metrics, rel=1e-6, abs=1e-9)   # the worker scored the same map
    assert ours["nrmse"] == pytest.approx(all_metrics(expected, phantom.chi_ppm, phantom.mask)["nrmse"], rel=1e-4)
    assert not os.path.exists(session.job.work_dir) and os.listdir(temp_root) == []
    assert [fingerprint(n) for n in volumes] == before


def test_dip_snapshots_stream_into_the_chosen_output_in_place(scene, volumes, temp_root):
    output = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my QSM")
    output.CreateDefaultDisplayNodes()
    output.GetDisplayNode().AutoWindowLevelOff()
    output.GetDisplayNode().SetWindowLevelMinMax(-0.3, 0.25)
    options = JobOptions(method="dip", device="cpu", snapshot_every=1, settings={**TINY_DIP, "iterations": 4})
    session = session_for(scene, volumes, options, temp_root, output_node=output)
    session.start()
    seen, image_ids, progress = [], set(), []
    deadline = time.monotonic() + 120
    while not session.finished and time.monotonic() < deadline:
        loaded = session.state.snapshots_loaded
        state = session.poll()
        progress.append(state.progress_percent())
        if state.snapshots_loaded > loaded and not state.finished:
            seen.append((state.snapshot_iteration, node_ijk(output), dict(state.metrics)))
            image_ids.add(output.GetImageData().GetAddressAsString("vtkImageData"))
        time.sleep(0.02)
    assert state.phase == "done", state.message
    assert session.output_node is output and output.GetName() == "my QSM"
    assert [it for it, _, _ in seen] == sorted(it for it, _, _ in seen) and len(seen) >= 2
    assert not np.array_equal(seen[0][1], seen[-1][1])         # the estimate changed between snapshots
    image_ids.add(output.GetImageData().GetAddressAsString("vtkImageData"))
    assert len(image_ids) == 1                                  # same vtkImageData, updated in place
    assert (output.GetDisplayNode().GetWindowLevelMin(), output.GetDisplayNode().GetWindowLevelMax()) == \
        pytest.approx((-0.3, 0.25))
    assert state.iteration == state.max_iterations == 4 and progress == sorted(progress) and progress[-1] == 100
    assert "iteration 4/4" in state.progress_text()
    assert set(state.metrics) >= {"nrmse", "hfen", "ssim", "xsim", "psnr"}
    assert all(math.isfinite(v) for v in state.metrics.values())
    assert os.listdir(temp_root) == []


@POSIX_ONLY
def test_cancel_ends_the_process_tree_behind_a_launcher_and_keeps_the_last_snapshot(scene, volumes, temp_root):
    # A shell that runs Python as its child, as the PythonSlicer launcher does.
    launcher = ["/bin/sh", "-c", '"$@"; exit $?', "qsmdip-launcher", sys.executable]
    options = JobOptions(method="dip", device="cpu", snapshot_every=1, settings={**TINY_DIP, "iterations": 500})
    session = session_for(scene, volumes, options, temp_root, python_command=launcher)
    session.start()
    pgid = session.worker.pid
    state = session.state
    deadline = time.monotonic() + 120
    while state.snapshots_loaded == 0 and not state.finished and time.monotonic() < deadline:
        state = session.poll()
        time.sleep(0.02)
    assert state.snapshots_loaded >= 1 and not state.finished, state.message
    assert len(group_members(pgid)) >= 2          # the launcher and the Python worker
    session.cancel()
    last = node_ijk(session.output_node)
    while not state.finished and time.monotonic() < deadline:
        loaded = state.snapshots_loaded
        state = session.poll()
        if state.snapshots_loaded > loaded:
            last = node_ijk(session.output_node)
        time.sleep(0.02)
    assert state.phase == "cancelled", state.message
    assert f"snapshot of iteration {state.snapshot_iteration}" in state.message
    assert state.snapshot_iteration < 500
    assert group_members(pgid) == []
    np.testing.assert_array_equal(node_ijk(session.output_node), last)
    mask = node_ijk(volumes[1]) > 0
    assert np.any(last[mask] != 0) and not np.any(last[~mask])
    assert os.listdir(temp_root) == []


@POSIX_ONLY
def test_cancel_kills_a_worker_that_does_not_stop_in_time(scene, volumes, temp_root):
    options = JobOptions(method="dip", device="cpu", snapshot_every=1000, settings={**TINY_DIP, "iterations": 2000})
    session = session_for(scene, volumes, options, temp_root, grace_s=0.2)
    session.start()
    deadline = time.monotonic() + 120
    while not session.state.device and time.monotonic() < deadline:
        session.poll()
        time.sleep(0.02)
    session.cancel()
    cancelled_at = time.monotonic()
    state = session.wait(30)
    assert state.phase == "cancelled" and "no snapshot had arrived" in state.message
    assert session.worker.exit.returncode == -signal.SIGKILL   # escalated after the grace period
    assert time.monotonic() - cancelled_at < 10
    assert group_members(session.worker.pid) == [] and os.listdir(temp_root) == []


@POSIX_ONLY
def test_worker_killed_from_outside_is_reported_as_a_crash(scene, volumes, temp_root):
    options = JobOptions(method="dip", device="cpu", snapshot_every=1000, settings={**TINY_DIP, "iterations": 2000})
    session = session_for(scene, volumes, options, temp_root)
    session.start()
    deadline = time.monotonic() + 120
    while not session.state.device and time.monotonic() < deadline:
        session.poll()
        time.sleep(0.02)
    os.kill(session.worker.pid, signal.SIGKILL)   # what the system's out-of-memory killer does
    state = session.wait(30)
    assert state.phase == "failed" and state.error_kind == "crashed"
    assert "SIGKILL" in state.message and "out of memory" in state.message
    assert os.listdir(temp_root) == []


@pytest.mark.skipif(not (sys.platform.startswith("linux") and shutil.which("prlimit")), reason="needs prlimit")
def test_out_of_memory_is_reported_with_the_workers_message(scene, volumes, temp_root):
    # A 3 GiB address-space limit (a small machine) and a network far too wide for it: the first large
    # weight tensor cannot be allocated (the limit keeps the test from really filling this machine's RAM).
    limited = ["prlimit", f"--as={3 * 1024 ** 3}", sys.executable]
    options = JobOptions(method="dip", device="cpu", settings={"width": 8192, "depth": 2, "iterations": 2})
    session = session_for(scene, volumes, options, temp_root, python_command=limited)
    session.start()
    state = session.wait(120)
    assert state.phase == "failed" and state.error_kind == "out_of_memory", state.message
    assert "allocate" in state.message and session.worker.exit.returncode == 3
    assert os.listdir(temp_root) == []


def python_without(tmp_path_factory, prefixes):
    """A real virtual environment with this one's packages except those whose names start with ``prefixes``."""
    import numpy

    root = tmp_path_factory.mktemp("without-" + prefixes[0]) / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(root)
    python = str(root / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))
    target = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            capture_output=True, text=True, check=True).stdout.strip()
    source = os.path.dirname(os.path.dirname(numpy.__file__))
    for name in os.listdir(source):
        if not name.lower().startswith(tuple(prefixes)):
            os.symlink(os.path.join(source, name), os.path.join(target, name))
    return python


@pytest.fixture(scope="module")
def python_without_torch(tmp_path_factory):
    """A real virtual environment with this one's packages (NumPy, SciPy, SimpleITK...) except torch."""
    python = python_without(tmp_path_factory, ("torch", "functorch", "nvidia", "triton"))
    probe = subprocess.run([python, "-c", "import numpy, SimpleITK; import torch"], capture_output=True, text=True)
    assert "No module named 'torch'" in probe.stderr
    return python


@pytest.fixture(scope="module")
def python_without_nilearn(tmp_path_factory):
    """This environment less nilearn (the realistic phantom's tissue maps): torch and the rest are there."""
    python = python_without(tmp_path_factory, ("nilearn",))
    probe = subprocess.run([python, "-c", "import torch; import nilearn"], capture_output=True, text=True)
    assert "No module named 'nilearn'" in probe.stderr
    return python


def test_missing_torch_is_reported_by_the_check_and_by_the_worker(scene, volumes, temp_root, python_without_torch):
    import torch

    status = check_torch([python_without_torch], MODULE_DIR)
    assert not status.available and status.torch_version is None
    assert "PyTorch is not installed" in status.message and "No module named 'torch'" in status.message
    assert status.python_version == "{}.{}.{}".format(*sys.version_info[:3])
    here = check_torch([sys.executable], MODULE_DIR)
    assert here.available and here.torch_version == torch.__version__
    assert here.cuda_available == torch.cuda.is_available() and torch.__version__ in here.message

    session = session_for(scene, volumes, JobOptions(method="tkd"), temp_root, python_command=[python_without_torch])
    session.start()
    state = session.wait(60)
    assert state.phase == "failed" and state.error_kind == "missing_dependency"
    assert "PyTorch is not installed" in state.message and python_without_torch in state.message
    assert session.worker.exit.returncode == 4 and os.listdir(temp_root) == []


def test_input_error_is_reported_with_the_workers_message(scene, volumes, temp_root):
    session = session_for(scene, volumes, JobOptions(method="tkd", units="hz"), temp_root)
    session.start()
    state = session.wait(60)
    assert state.phase == "failed" and state.error_kind == "input"
    assert "B0 field strength" in state.message and session.worker.exit.returncode == 2
    assert os.listdir(temp_root) == []


def test_worker_failure_while_writing_is_reported_and_cleaned_up(scene, volumes, temp_root):
    field, mask, chi = volumes
    job = prepare_job(field, mask, JobOptions(method="tkd", device="cpu"), temp_root=temp_root)
    blocker = os.path.join(job.work_dir, "blocker")
    open(blocker, "w").close()
    job.job["snapshot"] = os.path.join(blocker, "snapshot.nrrd")   # a folder that is a file
    with open(job.job_path, "w") as handle:
        json.dump(job.job, handle)
    worker = WorkerProcess(job.job_path, [sys.executable], MODULE_DIR, env=WORKER_ENV)
    worker.start()
    messages = worker.wait(60)
    job.cleanup()
    error = next(m for m in messages if m["event"] == "error")   # before or after 'started', as the worker checks
    # the worker's own classification and words reach the caller unchanged
    assert (worker.exit.kind, worker.exit.message) == (error["kind"], error["message"])
    assert {"internal": 1, "input": 2}[worker.exit.kind] == worker.exit.returncode
    assert "blocker" in worker.exit.message
    assert os.listdir(temp_root) == []


def test_a_python_that_cannot_start_fails_cleanly(scene, volumes, temp_root, tmp_path):
    missing = str(tmp_path / "no-such-python")
    session = session_for(scene, volumes, JobOptions(method="tkd"), temp_root, python_command=[missing])
    state = session.start()
    assert state.phase == "failed" and missing in state.message
    assert os.listdir(temp_root) == []
    status = check_torch([missing])
    assert not status.available and missing in status.message


# -- exit statuses, metrics, difference volume -------------------------------------------------------
def test_exit_statuses_map_to_outcomes():
    said = {"event": "error", "kind": "out_of_memory", "message": "CUDA out of memory. Tried to allocate 2 GiB"}
    assert describe_exit(3, said, False, []).message == said["message"]
    assert describe_exit(0, None, False, []).kind == "done"
    assert describe_exit(5, None, True, []).kind == "cancelled"
    assert describe_exit(-15, None, True, []).kind == "cancelled"
    crash = describe_exit(-11, None, False, ["Fatal Python error: Segmentation fault", ""])
    assert crash.kind == "crashed" and "SIGSEGV" in crash.message and "Segmentation fault" in crash.message
    assert describe_exit(4, None, False, []).kind == "missing_dependency"
    assert describe_exit(3, None, False, ["Killed"]).kind == "out_of_memory"
    assert describe_exit(77, None, False, ["boom"]).kind == "crashed"


def test_metrics_and_difference_volume_from_nodes(scene, volumes, phantom):
    field, mask, chi = volumes
    rng = np.random.default_rng(0)
    estimate = (phantom.chi_ppm * 0.8 + rng.normal(0, 0.01, SHAPE) * phantom.mask).astype(np.float32)
    qsm = add_volume(scene, "vtkMRMLScalarVolumeNode", "estimate", estimate)
    metrics = metrics_for_nodes(qsm, chi, mask)
    assert metrics == pytest.approx(all_metrics(estimate, phantom.chi_ppm, phantom.mask))
    rows = dict(metric_table_rows(metrics))
    assert list(rows) == ["NRMSE", "HFEN", "SSIM", "XSIM", "PSNR"]
    assert rows["NRMSE"] == f"{metrics['nrmse']:.2f} %" and rows["PSNR"].endswith(" dB")
    assert dict(metric_table_rows(None))["SSIM"] == "-"

    difference = update_difference_node(scene, qsm, chi, mask)
    assert difference.GetName() == "estimate_minus_reference"
    np.testing.assert_allclose(node_matrix(difference), node_matrix(qsm))
    inside = phantom.mask
    expected = (estimate - estimate[inside].mean()) - (phantom.chi_ppm - phantom.chi_ppm[inside].mean())
    np.testing.assert_allclose(node_ijk(difference)[inside], expected[inside], atol=1e-6)
    assert not np.any(node_ijk(difference)[~inside])
    again = update_difference_node(scene, qsm, chi, mask, difference)
    assert again is difference
    shifted = add_volume(scene, "vtkMRMLScalarVolumeNode", "shifted", estimate,
                         ijk_to_ras_matrix(origin=ORIGIN_RAS + 5.0))
    with pytest.raises(QSMInputError, match="not on the reference's voxel grid"):
        metrics_for_nodes(shifted, chi, mask)


# -- comparison: checks first, never a stale difference node -------------------------------------------
def test_compare_after_a_failed_run_refuses_the_empty_output_in_one_line(scene, volumes):
    field, mask, chi = volumes
    empty_output = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "field_QSM")  # a run that failed early
    nodes_before = scene.GetNumberOfNodes()
    with pytest.raises(QSMInputError, match="the reconstruction volume 'field_QSM' holds no image data"):
        compare_nodes(scene, empty_output, chi, mask)
    with pytest.raises(QSMInputError, match="no reference volume selected"):
        compare_nodes(scene, field, None, mask)
    assert scene.GetNumberOfNodes() == nodes_before   # no half-made difference node


def test_difference_node_is_made_anew_after_deletion_or_scene_clear(scene, volumes, phantom):
    field, mask, chi = volumes
    qsm = add_volume(scene, "vtkMRMLScalarVolumeNode", "estimate", phantom.chi_ppm * 0.5)
    metrics, difference = compare_nodes(scene, qsm, chi, mask)
    assert metrics == pytest.approx(metrics_for_nodes(qsm, chi, mask))
    assert compare_nodes(scene, qsm, chi, mask, difference)[1] is difference   # reused while it is in the scene

    scene.RemoveNode(difference)                       # the user deleted it
    _, remade = compare_nodes(scene, qsm, chi, mask, difference)
    assert remade is not difference and scene.IsNodePresent(remade)

    stale_id = remade.GetID()
    scene.Clear(0)                                     # a closed scene: IDs are handed out again
    mask = add_volume(scene, "vtkMRMLLabelMapVolumeNode", "brain", phantom.mask.astype(np.uint8))
    chi = add_volume(scene, "vtkMRMLScalarVolumeNode", "chi", phantom.chi_ppm)
    qsm = add_volume(scene, "vtkMRMLScalarVolumeNode", "estimate", phantom.chi_ppm * 0.5)
    while scene.GetNodeByID(stale_id) is None:         # until another node holds the old difference node's ID
        scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "other")
    assert scene.GetNodeByID(stale_id) is not remade
    _, after_clear = compare_nodes(scene, qsm, chi, mask, remade)
    assert after_clear is not remade and scene.IsNodePresent(after_clear)
    assert after_clear.GetName() == "estimate_minus_reference"


# -- worker life cycle: numbered snapshots, closing without waiting ------------------------------------
@pytest.mark.skipif(not worker_takes_snapshot_dir(), reason="the worker does not accept the 'snapshot_dir' job key yet")
def test_numbered_snapshots_are_loaded_then_deleted(scene, volumes, temp_root):
    options = JobOptions(method="dip", device="cpu", snapshot_every=1, settings={**TINY_DIP, "iterations": 4})
    session = session_for(scene, volumes, options, temp_root)
    session.start()
    folder = session.job.snapshot_dir
    assert folder.startswith(session.job.work_dir) and session.job.snapshot_path is None

    def files():
        """Each snapshot file with its identity, so a name the worker writes again counts as a new file."""
        found = set()
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            try:
                info = os.stat(os.path.join(folder, name))
            except FileNotFoundError:
                continue
            found.add((name, info.st_ino, info.st_mtime_ns))
        return found

    history, leftovers = [], set()
    deadline = time.monotonic() + 120
    while not session.finished and time.monotonic() < deadline:
        loaded = session.state.snapshots_loaded
        state = session.poll()
        if state.snapshots_loaded > loaded:
            history.append(files())
            if len(history) >= 3:   # a file announced before the last load but still there two loads later
                leftovers |= history[-3] & history[-1]
        time.sleep(0.02)
    assert state.phase == "done" and state.snapshots_loaded >= 2, state.message
    assert state.warnings == [] and leftovers == set()
    assert os.listdir(temp_root) == []


@POSIX_ONLY
def test_closing_a_session_ends_the_worker_at_once(scene, volumes, temp_root):
    launcher = ["/bin/sh", "-c", '"$@"; exit $?', "qsmdip-launcher", sys.executable]
    options = JobOptions(method="dip", device="cpu", snapshot_every=1000, settings={**TINY_DIP, "iterations": 2000})
    session = session_for(scene, volumes, options, temp_root, python_command=launcher)
    session.start()
    pgid = session.worker.pid
    deadline = time.monotonic() + 120
    while not session.state.device and time.monotonic() < deadline:
        session.poll()
        time.sleep(0.02)
    assert len(group_members(pgid)) >= 2
    closing = time.monotonic()
    session.close()                                    # what a scene close does: no grace period
    assert time.monotonic() - closing < 1.5
    assert session.state.phase == "cancelled" and group_members(pgid) == []
    assert os.listdir(temp_root) == []


# -- background processes: no console window, sequences ---------------------------------------------------
def test_subprocess_options_hide_console_windows_and_group_the_tree():
    assert popen_options(windows=True) == {"creationflags": CREATE_NO_WINDOW | CREATE_NEW_PROCESS_GROUP}
    assert popen_options(new_group=False, windows=True) == {"creationflags": CREATE_NO_WINDOW}
    assert popen_options(windows=False) == {"start_new_session": True}
    assert popen_options(new_group=False, windows=False) == {}
    if os.name == "nt":   # the constants are the ones Windows defines
        assert (CREATE_NO_WINDOW, CREATE_NEW_PROCESS_GROUP) == (subprocess.CREATE_NO_WINDOW,
                                                                subprocess.CREATE_NEW_PROCESS_GROUP)


def test_command_sequence_runs_in_order_and_stops_at_the_first_failure(tmp_path):
    marker = tmp_path / "ran.txt"
    ok = CommandSequence([[sys.executable, "-c", f"open({str(marker)!r}, 'a').write('1')"],
                          [sys.executable, "-c", f"open({str(marker)!r}, 'a').write('2'); print('step two')"]])
    assert ok.start().wait(60) is True and marker.read_text() == "12" and ok.last_line() == "step two"
    failing = CommandSequence([[sys.executable, "-c", "import sys; sys.exit('no CUDA build for this driver')"],
                               [sys.executable, "-c", f"open({str(marker)!r}, 'a').write('3')"]])
    assert failing.start().wait(60) is False
    assert "exit status 1" in failing.message and "no CUDA build for this driver" in failing.message
    assert marker.read_text() == "12"                  # the second command never ran
    missing = CommandSequence([[str(tmp_path / "no-such-python"), "-m", "pip"]]).start()
    assert missing.poll() is False and "no-such-python" in missing.message


# -- torch: version requirement, background check, install commands --------------------------------------
def test_an_old_torch_does_not_count_as_available():
    assert meets_requirement("2.13.0+cpu", ">=2.0") and meets_requirement("2.0", ">=2.0")
    assert not meets_requirement("1.13.1+cu117", ">=2.0") and not meets_requirement("nightly", ">=2.0")
    info = {"python": "3.9.10", "executable": "/slicer/python", "torch": "1.13.1+cu117", "cuda": True,
            "gpu": "RTX", "cuda_version": "11.7"}
    old = status_from_probe(info, TORCH_REQUIREMENT)
    assert not old.available and old.torch_version == "1.13.1+cu117"
    assert "1.13.1+cu117" in old.message and "too old" in old.message and TORCH_REQUIREMENT in old.message
    recent = status_from_probe({**info, "torch": "2.4.1+cu121"}, TORCH_REQUIREMENT)
    assert recent.available and "GPU RTX" in recent.message


def test_torch_probe_answers_in_the_background_and_gives_up_after_its_timeout():
    import torch

    probe = TorchProbe([sys.executable], MODULE_DIR, env=WORKER_ENV).start()
    assert probe.status is None                       # start() did not wait for the answer
    status = probe.wait()
    assert status.available and status.torch_version == torch.__version__
    assert probe.poll() is status                      # the answer is kept

    stuck = TorchProbe([sys.executable, "-c", "import time; time.sleep(60)"], timeout_s=1.0).start()
    began = time.monotonic()
    status = stuck.wait()
    assert time.monotonic() - began < 10 and not status.available and "no answer within 1 s" in status.message
    assert stuck.process.finished                      # the hung probe was killed


def test_torch_is_installed_by_separate_processes_of_the_workers_python():
    commands = torch_install_commands(["/opt/Slicer/bin/PythonSlicer"], ">=2.0")
    assert commands == [["/opt/Slicer/bin/PythonSlicer", "-m", "pip", "install", "light-the-torch>=0.5"],
                        ["/opt/Slicer/bin/PythonSlicer", "-m", "light_the_torch", "install", "torch>=2.0"]]


# -- the one-click example ---------------------------------------------------------------------------------
def test_example_data_is_made_in_the_background_loaded_and_selected(scene, temp_root):
    from QSMDIPLib.example import EXAMPLE_NAMES, ExampleDataJob, load_example, panel_selection

    job = ExampleDataJob([sys.executable], MODULE_DIR, env=WORKER_ENV, temp_root=temp_root).start()
    assert job.files is None and not job.finished      # start() returned at once
    files = job.wait(120)
    assert files is not None, job.message
    assert files.kind == "realistic" and files.magnitude is not None   # nilearn is installed here
    nodes = load_example(scene, files)
    try:
        expected = {"field": (nodes.field, files.field), "mask": (nodes.mask, files.mask),
                    "chi": (nodes.chi, files.chi), "magnitude": (nodes.magnitude, files.magnitude)}
        for key, (node, path) in expected.items():
            assert node.GetName() == EXAMPLE_NAMES[key] and scene.IsNodePresent(node)
            on_disk = qio.read_volume(path)
            np.testing.assert_allclose(node_ijk(node), on_disk.array, atol=1e-6)
            lps_to_ras = np.diag([-1.0, -1.0, 1.0])
            m = node_matrix(node)
            np.testing.assert_allclose(m[:3, 3], lps_to_ras @ np.array(on_disk.origin), atol=1e-6)
            np.testing.assert_allclose(m[:3, :3], lps_to_ras @ on_disk.direction @ np.diag(on_disk.spacing_mm),
                                       atol=1e-6)
            assert node.GetStorageNode() is None       # nothing points at the temporary files
        assert nodes.mask.IsA("vtkMRMLLabelMapVolumeNode") and node_ijk(nodes.mask).dtype == np.uint8
        assert set(np.unique(node_ijk(nodes.mask))) == {0, 1}
        assert nodes.field.GetImageData().GetDimensions() == (42, 50, 43)   # 4 mm: small enough for a CPU
        selection = panel_selection(nodes)
        assert selection == {"fieldVolume": nodes.field, "maskVolume": nodes.mask, "referenceVolume": nodes.chi,
                             "magnitudeVolume": nodes.magnitude, "outputVolume": None, "fieldUnits": "ppm",
                             "method": "DIP", "iterations": 40}
        job.cleanup()
        assert os.listdir(temp_root) == []
        # and the panel's next step works on it: a quick TKD against the gold standard
        session = ReconstructionSession(scene, nodes.field, nodes.mask, JobOptions(method="tkd", device="cpu"),
                                        python_command=[sys.executable], module_dir=MODULE_DIR, env=WORKER_ENV,
                                        reference_node=nodes.chi, magnitude_node=nodes.magnitude, temp_root=temp_root)
        session.start()
        state = session.wait(120)
        assert state.phase == "done" and state.metrics["nrmse"] < 100, state.message
    finally:
        job.cleanup()


def test_example_without_nilearn_is_the_simple_phantom(scene, temp_root, python_without_nilearn):
    from QSMDIPLib.example import ExampleDataJob, load_example, panel_selection

    job = ExampleDataJob([python_without_nilearn], MODULE_DIR, env=WORKER_ENV, temp_root=temp_root).start()
    files = job.wait(120)
    assert files is not None, job.message
    assert files.kind == "simple" and files.magnitude is None
    nodes = load_example(scene, files)
    job.cleanup()
    assert nodes.magnitude is None and panel_selection(nodes)["magnitudeVolume"] is None
    assert np.any(node_ijk(nodes.chi)[node_ijk(nodes.mask) > 0] != 0)
    assert os.listdir(temp_root) == []


def test_example_failure_shows_the_phantom_commands_error_and_cleans_up(scene, temp_root, python_without_torch):
    from QSMDIPLib.example import ExampleDataJob

    nodes_before = scene.GetNumberOfNodes()
    job = ExampleDataJob([python_without_torch], MODULE_DIR, env=WORKER_ENV, temp_root=temp_root).start()
    assert job.wait(120) is None and job.failed
    assert "phantom command failed" in job.message and "No module named 'torch'" in job.message
    assert os.listdir(temp_root) == [] and scene.GetNumberOfNodes() == nodes_before


# -- DICOM export of a node ----------------------------------------------------------------------------------
def test_node_exports_as_a_dicom_series_on_its_own_grid(scene, volumes, phantom, temp_root, tmp_path):
    pytest.importorskip("pydicom")
    import SimpleITK as sitk

    from QSMDIPLib.dicom import dicom_source_file, export_node_dicom, new_series_folder, volume_from_node

    field, mask, chi = volumes
    # the node's grid in LPS is exactly what Slicer's own writer puts into a file
    job = prepare_job(field, mask, JobOptions(), reference_node=chi, temp_root=temp_root)
    written = qio.read_volume(job.job["reference"])
    job.cleanup()
    volume = volume_from_node(chi)
    assert volume.same_geometry(written, tol=1e-9) and np.array_equal(volume.array, written.array)

    files = export_node_dicom(chi, str(tmp_path))
    folder = tmp_path / "chi DICOM"
    assert len(files) == SHAPE[2] and all(f.parent == folder for f in files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    back = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    assert np.max(np.abs(back - phantom.chi_ppm)) <= 0.0005 + 1e-6
    np.testing.assert_allclose(image.GetOrigin(), written.origin, atol=1e-5)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), written.direction, atol=1e-6)
    np.testing.assert_allclose(image.GetSpacing(), SPACING, atol=1e-6)
    assert new_series_folder(str(tmp_path), "chi") == tmp_path / "chi DICOM 2"   # never into a used folder
    assert new_series_folder(str(tmp_path), "a/b: c") == tmp_path / "a_b_ c DICOM"

    # a field loaded from DICOM names its source instances; the export then joins that study
    source = files[0]
    field.SetAttribute("DICOM.instanceUIDs", "1.2.3 1.2.4")
    lookup = {"1.2.3": "", "1.2.4": str(source)}
    assert dicom_source_file(field, lookup.get) == str(source)
    assert dicom_source_file(mask, lookup.get) is None
    import pydicom

    joined = export_node_dicom(chi, str(tmp_path), like=dicom_source_file(field, lookup.get))
    first, new = pydicom.dcmread(str(source)), pydicom.dcmread(str(joined[0]))
    assert new.StudyInstanceUID == first.StudyInstanceUID and new.SeriesInstanceUID != first.SeriesInstanceUID
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "nothing yet")
    with pytest.raises(QSMInputError, match="'nothing yet' holds no image data"):
        export_node_dicom(empty, str(tmp_path))


# -- multi-echo GRE input (phase + magnitude) ----------------------------------------------------------
# slicer-core has vtkMRMLSequenceNode, so Sequence inputs are tested for real. It has no MultiVolume node
# (that class comes with Slicer's MultiVolumeImporter module): a MultiVolume is a scalar volume node whose
# voxels have one component per frame, so the tests build exactly that on a vtkMRMLScalarVolumeNode with
# the importer's attributes, and the same code path (components -> echoes, attributes -> echo times) runs.
ECHO_TIMES_MS = (4.0, 12.0, 20.0, 28.0)


def gre_matrix() -> np.ndarray:
    """IJKToRAS of the simulated acquisition's grid (tests/gre_data.py, LPS) in Slicer's RAS."""
    import gre_data

    _, grid = gre_data.acquisition()
    m = np.eye(4)
    m[:3, :3] = LPS @ grid.direction @ np.diag(grid.spacing_mm)
    m[:3, 3] = LPS @ np.array(grid.origin)
    return m


def set_matrix(node, matrix) -> None:
    vm = vtk.vtkMatrix4x4()
    for r, row in enumerate(matrix):
        for c, value in enumerate(row):
            vm.SetElement(r, c, value)
    node.SetIJKToRASMatrix(vm)


def loose_volume(array_ijk, matrix, name="echo"):
    """A scalar volume node outside any scene (what a Sequence deep-copies in)."""
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(np.asarray(array_ijk).transpose(2, 1, 0)))
    set_matrix(node, matrix)
    return node


def sequence_node(scene, name, echoes_ijk, matrix, *, index_name="", unit="", values=None, attributes=None):
    """A Sequence of one volume per echo, as Slicer's DICOM module loads a multi-echo series."""
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", name)
    sequence.SetIndexName(index_name)
    sequence.SetIndexUnit(unit)
    for n, echo in enumerate(echoes_ijk):
        sequence.SetDataNodeAtValue(loose_volume(echo, matrix, f"{name} {n}"), values[n] if values else str(n))
    for key, value in (attributes or {}).items():
        sequence.SetAttribute(key, value)
    return sequence


def multivolume_node(scene, name, echoes_ijk, matrix, attributes=None):
    """A MultiVolume as the importer makes it: one component per frame (here on a scalar volume node)."""
    from vtk.util import numpy_support

    stacked = np.stack([np.asarray(e, np.float32).transpose(2, 1, 0) for e in echoes_ijk], axis=-1)  # [k, j, i, echo]
    image = vtk.vtkImageData()
    image.SetDimensions(stacked.shape[2], stacked.shape[1], stacked.shape[0])
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(stacked).reshape(-1, stacked.shape[-1]), deep=True,
                                         array_type=vtk.VTK_FLOAT)
    image.GetPointData().SetScalars(scalars)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetAndObserveImageData(image)
    set_matrix(node, matrix)
    for key, value in (attributes or {}).items():
        node.SetAttribute(key, value)
    return node


def multivolume_fingerprint(node):
    """What would change if a multi-component input node were modified (its voxels, grid, name, image)."""
    from vtk.util import numpy_support

    image = node.GetImageData()
    return (node.GetName(), image.GetMTime(), numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).tobytes(),
            node_matrix(node).tobytes())


def echo_attributes(labels="4,12,20,28", tag="EchoTime", units="ms"):
    return {"MultiVolume.FrameIdentifyingDICOMTagName": tag, "MultiVolume.FrameLabels": labels,
            "MultiVolume.FrameIdentifyingDICOMTagUnits": units, "MultiVolume.NumberOfFrames": "4"}


@pytest.fixture(scope="module")
def gre_arrays():
    import gre_data

    acq, _ = gre_data.acquisition()
    return acq.phase_rad, acq.magnitude


def test_multivolume_attributes_give_the_echoes_and_their_times(scene, gre_arrays):
    from QSMDIPLib.echoes import echo_set

    phase, _ = gre_arrays
    node = multivolume_node(scene, "GRE phase", phase, gre_matrix(), echo_attributes())
    echoes = echo_set([node], "phase")
    assert (echoes.source, echoes.echoes, echoes.name) == ("multivolume", 4, "GRE phase")
    assert echoes.echo_times_s == pytest.approx([t / 1000 for t in ECHO_TIMES_MS])
    assert "echo times 4, 12, 20, 28 ms from the MultiVolume attributes of 'GRE phase'" in echoes.notes
    for n, frame in enumerate(echoes.volumes):
        np.testing.assert_array_equal(node_ijk(frame), phase[n])
        np.testing.assert_allclose(node_matrix(frame), gre_matrix(), atol=1e-9)
    assert echoes.grid_node is node and scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 1
    # frames identified by another tag, or labels that do not fit: no echo times (the panel asks for them)
    other = multivolume_node(scene, "by trigger", phase, gre_matrix(), echo_attributes(tag="TriggerTime"))
    assert echo_set([other], "phase").echo_times_s is None
    short = echo_set([multivolume_node(scene, "short", phase, gre_matrix(), echo_attributes("4,12,20"))], "phase")
    assert short.echo_times_s is None and "list 3 echo times for 4 echoes: not used" in short.notes[0]
    seconds = multivolume_node(scene, "in s", phase, gre_matrix(), echo_attributes("0.004,0.012,0.02,0.028", units="s"))
    assert echo_set([seconds], "phase").echo_times_s == pytest.approx([0.004, 0.012, 0.02, 0.028])


def test_sequence_echo_times_from_attributes_or_an_echo_time_index(scene, gre_arrays):
    from QSMDIPLib.echoes import echo_set, resolve_echo_times

    phase, _ = gre_arrays
    imported = sequence_node(scene, "imported", phase, gre_matrix(), attributes=echo_attributes())
    echoes = echo_set([imported], "phase")
    assert echoes.source == "sequence" and echoes.echoes == 4
    assert echoes.echo_times_s == pytest.approx([0.004, 0.012, 0.02, 0.028])
    for n, volume in enumerate(echoes.volumes):
        np.testing.assert_array_equal(node_ijk(volume), phase[n])
    indexed = sequence_node(scene, "indexed", phase, gre_matrix(), index_name="EchoTime", unit="ms",
                            values=["4", "12", "20", "28"])
    assert echo_set([indexed], "phase").echo_times_s == pytest.approx([0.004, 0.012, 0.02, 0.028])
    # a Sequence's default index (time in s, values 0, 1, ...) is not an echo time
    plain = sequence_node(scene, "plain", phase, gre_matrix(), index_name="time", unit="s")
    unknown = echo_set([plain], "phase")
    assert unknown.echo_times_s is None
    with pytest.raises(QSMInputError, match="the echo times of 'plain' are not in what Slicer kept of the DICOM"):
        resolve_echo_times(None, unknown)
    assert resolve_echo_times((0.004, 0.012, 0.02, 0.028), unknown)[1] == "echo times as typed (ms, converted to s)"
    with pytest.raises(QSMInputError, match=r"typed \(5, 12, 20, 28 ms\) disagree with the DICOM's"):
        resolve_echo_times((0.005, 0.012, 0.02, 0.028), echoes)
    with pytest.raises(QSMInputError, match="the phase has 4 echoes but 3 echo times"):
        resolve_echo_times((0.004, 0.012, 0.02), unknown)


def test_one_volume_per_echo_is_ordered_by_its_dicom_echo_time(scene, gre_arrays):
    from QSMDIPLib.echoes import echo_set

    phase, _ = gre_arrays
    # what Slicer's DICOM database answers for each volume's first instance (tag -> value, as text)
    database = {}
    nodes = []
    for n in (2, 0, 3, 1):   # chosen out of order
        node = add_volume(scene, "vtkMRMLScalarVolumeNode", f"phase echo {n + 1}", phase[n], gre_matrix())
        node.SetAttribute("DICOM.instanceUIDs", f"1.2.3.{n} 1.2.3.{n}.1")
        database[(f"1.2.3.{n}", "0018,0081")] = f"{ECHO_TIMES_MS[n]:g}"
        database[(f"1.2.3.{n}", "0018,0087")] = "2.89"
        nodes.append(node)
    echoes = echo_set(nodes, "phase", lambda uid, tag: database.get((uid, tag), ""))
    assert [v.GetName() for v in echoes.volumes] == [f"phase echo {n}" for n in (1, 2, 3, 4)]
    assert echoes.echo_times_s == pytest.approx([0.004, 0.012, 0.02, 0.028]) and echoes.b0_tesla == 2.89
    assert "phase volumes put in echo order by their DICOM echo times" in echoes.notes
    assert echoes.name == "phase echo"
    # no DICOM database: the order chosen, and no echo times
    plain = echo_set(nodes, "phase")
    assert plain.volumes == nodes and plain.echo_times_s is None and plain.b0_tesla is None
    assert "phase volumes taken in the order chosen (no DICOM echo times)" in plain.notes


def test_echo_selection_and_typed_echo_times_are_checked(scene, gre_arrays):
    from QSMDIPLib.echoes import echo_set, format_ms, parse_echo_times_ms

    phase, _ = gre_arrays
    assert parse_echo_times_ms("4.9, 9.8 14.7") == pytest.approx((0.0049, 0.0098, 0.0147))
    assert parse_echo_times_ms("  ") is None and format_ms((0.0049, 0.0098)) == "4.9, 9.8"
    with pytest.raises(QSMInputError, match="look like seconds: type them in milliseconds"):
        parse_echo_times_ms("0.004, 0.012")
    with pytest.raises(QSMInputError, match="milliseconds separated by commas"):
        parse_echo_times_ms("4.9, nine")
    with pytest.raises(QSMInputError, match="no phase selected"):
        echo_set([], "phase")
    sequence = sequence_node(scene, "seq", phase, gre_matrix())
    volume = add_volume(scene, "vtkMRMLScalarVolumeNode", "vol", phase[0], gre_matrix())
    with pytest.raises(QSMInputError, match="choose one Sequence node for the phase, or volumes only"):
        echo_set([sequence, volume], "phase")
    label = add_volume(scene, "vtkMRMLLabelMapVolumeNode", "labels", (phase[0] > 0).astype(np.uint8), gre_matrix())
    with pytest.raises(QSMInputError, match="'labels' is a label map"):
        echo_set([label], "magnitude")
    multi = multivolume_node(scene, "multi", phase, gre_matrix())
    with pytest.raises(QSMInputError, match="'multi' has 4 components per voxel"):
        echo_set([multi, volume], "phase")


def test_gre_job_writes_every_echo_on_the_phase_grid_and_the_worker_accepts_it(scene, gre_arrays, temp_root):
    import gre_data
    from qsmdip.worker import PhaseJob

    from QSMDIPLib.echoes import echo_set
    from QSMDIPLib.gre import gre_options_from_panel, prepare_gre_job

    phase, magnitude = gre_arrays
    _, grid = gre_data.acquisition()
    phase_node = sequence_node(scene, "phase", phase, gre_matrix(), attributes=echo_attributes())
    magnitude_node = multivolume_node(scene, "magnitude", magnitude, gre_matrix(), echo_attributes())
    mask = add_volume(scene, "vtkMRMLLabelMapVolumeNode", "mask", (magnitude[0] > 0.2).astype(np.uint8), gre_matrix())
    nodes_before = scene.GetNumberOfNodes()
    phase_set, magnitude_set = echo_set([phase_node], "phase"), echo_set([magnitude_node], "magnitude")
    gre = gre_options_from_panel("", 3.0, "laplacian", "vsharp", phase_set, magnitude_set)
    assert gre.notes == ["echo times from the DICOM (ms, converted to s)"]
    job = prepare_gre_job(phase_set, magnitude_set, JobOptions(method="tkd", device="cpu"), gre, mask_node=mask,
                          temp_root=temp_root)
    try:
        on_disk = json.load(open(job.job_path))
        assert on_disk == job.job and on_disk["protocol"] == 2
        assert on_disk["echo_times_s"] == pytest.approx([0.004, 0.012, 0.02, 0.028]) and on_disk["b0_tesla"] == 3.0
        assert on_disk["pipeline"] == {"unwrap": "laplacian", "background": "vsharp"}
        assert on_disk["stage_dir"] == os.path.join(job.work_dir, "stages")
        assert "units" not in on_disk and "field" not in on_disk
        for key, arrays in (("phase", phase), ("magnitude", magnitude)):
            assert [os.path.basename(p) for p in on_disk[key]] == [f"{key}_echo{n}.nrrd" for n in (1, 2, 3, 4)]
            for path, array in zip(on_disk[key], arrays):
                volume = qio.read_volume(path)
                np.testing.assert_array_equal(volume.array, array)
                assert volume.same_geometry(grid, tol=1e-6)   # the library sees the acquisition's own grid
        assert qio.read_volume(on_disk["mask"]).same_geometry(grid, tol=1e-6)
        parsed = parse_job(on_disk)
        assert isinstance(parsed, PhaseJob) and parsed.reconstruction.output_path == on_disk["output"]
        assert parsed.field_request.pipeline == {"unwrap": "laplacian", "background": "vsharp"}
    finally:
        job.cleanup()
    assert os.listdir(temp_root) == [] and scene.GetNumberOfNodes() == nodes_before


def test_gre_job_refuses_mismatched_echoes_grids_and_an_input_as_output(scene, gre_arrays, temp_root):
    from QSMDIPLib.echoes import echo_set
    from QSMDIPLib.gre import GreOptions, gre_options_from_panel, prepare_gre_job

    phase, magnitude = gre_arrays
    phase_set = echo_set([sequence_node(scene, "phase", phase, gre_matrix())], "phase")
    three = echo_set([sequence_node(scene, "three", magnitude[:3], gre_matrix())], "magnitude")
    gre = GreOptions((0.004, 0.012, 0.02, 0.028), 3.0)
    with pytest.raises(QSMInputError, match="the phase 'phase' has 4 echoes but the magnitude 'three' has 3"):
        prepare_gre_job(phase_set, three, JobOptions(), gre, temp_root=temp_root)
    moved = gre_matrix()
    moved[:3, 3] += 3.0
    shifted = echo_set([sequence_node(scene, "shifted", magnitude, moved)], "magnitude")
    with pytest.raises(QSMInputError, match="the magnitude echo 1 'shifted 0' is not on the phase echo 1's voxel grid"):
        prepare_gre_job(phase_set, shifted, JobOptions(), gre, temp_root=temp_root)
    magnitude_node = multivolume_node(scene, "mag", magnitude, gre_matrix())
    magnitude_set = echo_set([magnitude_node], "magnitude")
    with pytest.raises(QSMInputError, match="is one of the inputs"):
        prepare_gre_job(phase_set, magnitude_set, JobOptions(), gre, output_node=magnitude_node, temp_root=temp_root)
    with pytest.raises(QSMInputError, match="unknown unwrapping method 'romeo'"):
        gre_options_from_panel("4, 12, 20, 28", 3.0, "romeo", "pdf", phase_set)
    assert os.listdir(temp_root) == []


def test_gre_session_shows_each_stage_then_the_qsm(scene, gre_arrays, temp_root):
    from QSMDIPLib.echoes import echo_set
    from QSMDIPLib.gre import GreSession, gre_options_from_panel

    phase, magnitude = gre_arrays
    phase_node = sequence_node(scene, "GRE phase", phase, gre_matrix(), attributes=echo_attributes())
    magnitude_node = multivolume_node(scene, "GRE magnitude", magnitude, gre_matrix(), echo_attributes())
    before = multivolume_fingerprint(magnitude_node)
    phase_set, magnitude_set = echo_set([phase_node], "phase"), echo_set([magnitude_node], "magnitude")
    gre = gre_options_from_panel("", 3.0, "region-growing", "pdf", phase_set, magnitude_set)
    session = GreSession(scene, phase_set, magnitude_set, gre, JobOptions(method="tkd", device="cpu"),
                         python_command=[sys.executable], module_dir=MODULE_DIR, env=WORKER_ENV, temp_root=temp_root)
    session.start()
    seen = []   # (stage index, progress %) as the panel's timer would see them
    deadline = time.time() + 180
    while not session.poll().finished and time.time() < deadline:
        seen.append((session.state.stage_index, session.state.progress_percent()))
        time.sleep(0.05)
    state = session.state
    assert state.phase == "done", state.message
    assert state.stage_count == 7 and state.stage == "background" and state.progress_percent() == 100
    assert "echo times from the sidecars" not in " ".join(state.stage_notes)
    assert any("4 echo(es), TE 4, 12, 20, 28 ms, B0 3 T" in n for n in state.stage_notes)
    assert [p for _, p in seen] == sorted(p for _, p in seen)   # the bar never goes back
    nodes = session.stage_nodes
    assert sorted(nodes) == ["local_field", "mask", "total_field"]
    assert [n.GetName() for n in (nodes["total_field"], nodes["local_field"], nodes["mask"])] == \
        ["GRE phase_TotalField", "GRE phase_LocalField", "GRE phase_FieldMask"]
    assert nodes["mask"].IsA("vtkMRMLLabelMapVolumeNode") and node_ijk(nodes["mask"]).dtype == np.uint8
    assert session.shown[-1] in (nodes["local_field"], nodes["mask"])
    inside = node_ijk(nodes["mask"]) > 0
    local = node_ijk(nodes["local_field"])
    assert inside.any() and np.all(local[~inside] == 0) and np.any(local[inside] != 0)
    for node in list(nodes.values()) + [session.output_node]:
        assert scene.GetNodeByID(node.GetID()) is node
        np.testing.assert_allclose(node_matrix(node), gre_matrix(), atol=1e-6)
    assert session.output_node.GetName() == "GRE phase_QSM"
    assert np.any(node_ijk(session.output_node)[inside] != 0)
    assert not os.path.exists(session.job.work_dir) and os.listdir(temp_root) == []
    assert multivolume_fingerprint(magnitude_node) == before


def test_gre_session_cancelled_between_stages_says_after_which(scene, gre_arrays, temp_root):
    from QSMDIPLib.echoes import echo_set
    from QSMDIPLib.gre import GreSession, gre_options_from_panel

    phase, magnitude = gre_arrays
    phase_set = echo_set([sequence_node(scene, "p", phase, gre_matrix())], "phase")
    magnitude_set = echo_set([sequence_node(scene, "m", magnitude, gre_matrix())], "magnitude")
    gre = gre_options_from_panel("4, 12, 20, 28", 3.0, "region-growing", "pdf", phase_set, magnitude_set)
    session = GreSession(scene, phase_set, magnitude_set, gre, JobOptions(method="tkd", device="cpu"),
                         python_command=[sys.executable], module_dir=MODULE_DIR, env=WORKER_ENV, temp_root=temp_root)
    session.start()
    deadline = time.time() + 120
    while session.poll().stage_index < 0 and not session.state.finished and time.time() < deadline:
        time.sleep(0.02)
    # the first poll that sees a stage may see two: reading the inputs, then the magnitude's mask, takes
    # milliseconds on a fast CPU; the expensive stages (unwrapping on) are still to come
    assert session.state.stage in ("inputs", "mask"), session.state.message
    session.cancel()
    state = session.wait(60)
    assert state.phase == "cancelled" and state.message.startswith("cancelled after the "), state.message
    assert state.stage != "background" and session.output_node.GetImageData() is None
    assert os.listdir(temp_root) == []


def test_session_progress_covers_the_stages_then_the_iterations():
    from QSMDIPLib.session import STAGES_SHARE, SessionState

    state = SessionState(phase="running", stage="unwrap", stage_index=3, stage_count=7)
    assert state.progress_percent() == round(100 * STAGES_SHARE * 4 / 7)
    assert state.progress_text().startswith("stage 4/7: unwrap")
    state.stage, state.stage_index, state.iteration, state.max_iterations = "background", 6, 50, 100
    assert state.progress_percent() == round(100 * (STAGES_SHARE + (1 - STAGES_SHARE) * 0.5))
    assert not state.progress_text().startswith("stage")
    assert SessionState(phase="running", iteration=50, max_iterations=100).progress_percent() == 50


def test_panel_pipeline_choices_are_the_librarys_with_its_defaults():
    import ast

    from qsmdip.phase.background import BACKGROUND_REMOVERS
    from qsmdip.phase.pipeline import PipelineSettings
    from qsmdip.phase.unwrap import UNWRAPPERS

    from QSMDIPLib.gre import BACKGROUND_METHODS, UNWRAP_METHODS

    with open(os.path.join(MODULE_DIR, "QSMDIP.py"), encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "QSMDIPParameterNode")
    fields = {}
    for item in cls.body:
        if isinstance(item, ast.AnnAssign) and isinstance(item.annotation, ast.Subscript):
            choice = next((e for e in item.annotation.slice.elts[1:] if getattr(e.func, "id", "") == "Choice"), None)
            if choice is not None:
                fields[item.target.id] = (ast.literal_eval(choice.args[0]), ast.literal_eval(item.value))
    defaults = PipelineSettings()
    assert fields["unwrapMethod"] == (list(UNWRAP_METHODS), defaults.unwrap)
    assert fields["backgroundMethod"] == (list(BACKGROUND_METHODS), defaults.background)
    assert set(UNWRAP_METHODS.values()) == set(UNWRAPPERS)
    assert set(BACKGROUND_METHODS.values()) == set(BACKGROUND_REMOVERS)
    assert fields["inputMode"][0] == ["Local field", "Multi-echo GRE (phase + magnitude)"]
