"""The background worker process (docs/WORKER_PROTOCOL.md), run for real as a subprocess."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from qsmdip import io as qio
from qsmdip.phantom import make_head_phantom

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "QSMDIP"), PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("worker")
    ph = make_head_phantom(None, (5.0, 5.0, 5.0), snr=200, seed=0)
    geometry = dict(spacing_mm=(5.0, 5.0, 5.0), origin=(1.0, -2.0, 3.0))
    paths = {}
    magnitude = (200.0 + 300.0 * ph.mask - 500.0 * ph.chi_ppm).clip(min=0)   # brighter brain, darker iron
    for name, array in (("field", ph.field_ppm), ("mask", ph.mask.astype(np.float32)), ("chi", ph.chi_ppm),
                        ("magnitude", magnitude)):
        paths[name] = str(d / f"{name}.nrrd")
        qio.write_volume(paths[name], array, **geometry)
    return d, paths


def job_file(tmp_path, paths, **overrides):
    job = {"protocol": 1, "field": paths["field"], "mask": paths["mask"], "reference": paths["chi"],
           "output": str(tmp_path / "qsm.nrrd"), "snapshot": str(tmp_path / "snapshot.nrrd"),
           "snapshot_every": 2, "method": "tkd", "device": "cpu"}
    job.update(overrides)
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job))
    return str(path)


def messages(stdout):
    out = []
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def run_worker(job, python=sys.executable, timeout=300):
    proc = subprocess.run([python, "-m", "qsmdip.worker", job], capture_output=True, text=True, env=ENV,
                          timeout=timeout)
    return proc.returncode, messages(proc.stdout), proc.stderr


def test_tv_job_streams_progress_snapshots_and_done(inputs, tmp_path):
    _, paths = inputs
    code, msgs, err = run_worker(job_file(tmp_path, paths, method="tv", settings={"iterations": 4, "alpha": 0.03}))
    assert code == 0, err
    events = [m["event"] for m in msgs]
    assert events[0] == "started" and events[-1] == "done"
    assert all(m["protocol"] == 2 for m in msgs)   # version 1 jobs are still accepted; messages speak 2
    assert [m["iteration"] for m in msgs if m["event"] == "progress"] == [2, 4]
    snaps = [m for m in msgs if m["event"] == "snapshot"]
    assert [s["iteration"] for s in snaps] == [2, 4]
    assert set(snaps[-1]["metrics"]) >= {"nrmse", "hfen", "ssim", "xsim", "psnr"}
    done = msgs[-1]
    out = qio.read_volume(done["path"])
    assert out.same_geometry(qio.read_volume(paths["field"]))
    assert done["metrics"]["nrmse"] == pytest.approx(snaps[-1]["metrics"]["nrmse"], rel=1e-6)
    assert "CPU" in msgs[0]["device"]


def test_job_with_a_magnitude_runs(inputs, tmp_path):
    _, paths = inputs
    code, msgs, err = run_worker(job_file(tmp_path, paths, method="tv", magnitude=paths["magnitude"],
                                          settings={"iterations": 4}))
    assert code == 0, err
    assert [m["event"] for m in msgs][0] == "started" and msgs[-1]["event"] == "done"
    assert msgs[0]["warnings"] == []
    out = qio.read_volume(msgs[-1]["path"])
    assert out.same_geometry(qio.read_volume(paths["field"])) and np.any(out.array != 0)
    assert msgs[-1]["metrics"]["nrmse"] < 100


def test_bad_magnitude_is_an_input_error(inputs, tmp_path):
    _, paths = inputs
    negative = str(tmp_path / "negative.nrrd")
    field = qio.read_volume(paths["field"])
    qio.write_volume(negative, field.array, like=field)   # a field map given as the magnitude
    code, msgs, _ = run_worker(job_file(tmp_path, paths, magnitude=negative))
    assert code == 2
    assert [m["event"] for m in msgs] == ["error"] and msgs[-1]["kind"] == "input"
    assert "magnitude has negative values" in msgs[-1]["message"]
    assert not os.path.exists(tmp_path / "qsm.nrrd")


def test_input_error_is_reported_with_exit_2(inputs, tmp_path):
    _, paths = inputs
    code, msgs, _ = run_worker(job_file(tmp_path, dict(paths, mask=str(tmp_path / "missing.nrrd"))))
    assert code == 2
    assert msgs[-1]["event"] == "error" and msgs[-1]["kind"] == "input"
    assert "missing.nrrd" in msgs[-1]["message"]
    code, msgs, _ = run_worker(job_file(tmp_path, paths, settings={"no_such_setting": 1}))
    assert code == 2 and "no_such_setting" in msgs[-1]["message"]
    code, msgs, _ = run_worker(job_file(tmp_path, paths, protocol=99))
    assert code == 2 and "protocol" in msgs[-1]["message"]


def test_missing_torch_is_reported_with_exit_4(inputs, tmp_path):
    """A Python without torch (the machine's base interpreter, when it has none) gets a clear message."""
    candidates = [os.path.join(sys.base_prefix, "bin", "python3")]
    python = next((p for p in candidates if os.path.exists(p)), None)
    probe = subprocess.run([python, "-c", "import torch"], capture_output=True) if python else None
    if python is None or probe.returncode == 0:
        pytest.skip("no Python without torch on this machine")
    _, paths = inputs
    code, msgs, _ = run_worker(job_file(tmp_path, paths), python=python)
    assert code == 4
    assert msgs[-1]["kind"] == "missing_dependency" and "PyTorch" in msgs[-1]["message"]


def test_out_of_memory_is_reported_with_exit_3(inputs, tmp_path):
    """A network far too wide to allocate: torch's own allocator error becomes an out_of_memory report."""
    _, paths = inputs
    code, msgs, err = run_worker(job_file(tmp_path, paths, method="dip", settings={"iterations": 2, "width": 200000}))
    assert code == 3, (msgs, err[-2000:])
    assert msgs[-1]["kind"] == "out_of_memory"
    assert "alloc" in msgs[-1]["message"].lower() or "memory" in msgs[-1]["message"].lower()


def test_sigterm_cancels_and_keeps_the_last_snapshot(inputs, tmp_path):
    _, paths = inputs
    job = job_file(tmp_path, paths, method="dip", reference=None, snapshot_every=1,
                   settings={"iterations": 5000})
    proc = subprocess.Popen([sys.executable, "-m", "qsmdip.worker", job], stdout=subprocess.PIPE, text=True, env=ENV)
    seen = []
    deadline = time.time() + 240
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.extend(messages(line))
        if any(m["event"] == "snapshot" for m in seen):
            break
    assert any(m["event"] == "snapshot" for m in seen), seen
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 5
    final = messages(rest)[-1]
    assert final["event"] == "error" and final["kind"] == "cancelled"
    assert os.path.exists(tmp_path / "snapshot.nrrd")
    assert not os.path.exists(tmp_path / "qsm.nrrd")


def test_snapshot_dir_gets_numbered_files_each_announced(inputs, tmp_path):
    """Numbered snapshots (job key snapshot_dir): a GUI can load and delete each while the next is written."""
    _, paths = inputs
    snapshots = tmp_path / "snapshots"
    code, msgs, err = run_worker(job_file(tmp_path, paths, method="tv", snapshot=None, snapshot_dir=str(snapshots),
                                          snapshot_every=2, settings={"iterations": 4, "alpha": 0.03}))
    assert code == 0, (msgs, err[-2000:])
    announced = [m["path"] for m in msgs if m["event"] == "snapshot"]
    assert [os.path.basename(p) for p in announced] == ["snapshot_00002.nrrd", "snapshot_00004.nrrd"]
    assert sorted(os.listdir(snapshots)) == sorted(os.path.basename(p) for p in announced)
    assert not os.path.exists(tmp_path / "snapshot.nrrd")


# -- jobs from the phase (protocol 2) ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gre(tmp_path_factory):
    import gre_data

    d = tmp_path_factory.mktemp("gre")
    phase, magnitude = gre_data.write_set(d / "bids")
    return {"phase": [str(p) for p in phase], "magnitude": [str(p) for p in magnitude],
            "grid": gre_data.acquisition()[1]}


def phase_job(tmp_path, gre, **overrides):
    job = {"protocol": 2, "phase": gre["phase"][:1], "out_field": str(tmp_path / "field.nrrd"),
           "out_mask": str(tmp_path / "mask.nrrd"), "stage_dir": str(tmp_path / "stages"), "device": None}
    job.update(overrides)
    job = {k: v for k, v in job.items() if v is not None}
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job))
    return str(path)


def test_phase_job_reports_every_stage_with_its_display_volumes(gre, tmp_path):
    code, msgs, err = run_worker(phase_job(tmp_path, gre, magnitude=gre["magnitude"],
                                           out_total_field=str(tmp_path / "total.nrrd")))
    assert code == 0, (msgs, err[-2000:])
    stages = [m for m in msgs if m["event"] == "stage"]
    assert [s["name"] for s in stages] == ["inputs", "mask", "offsets", "unwrap", "echo fit", "mask refinement",
                                           "background"]
    assert [s["index"] for s in stages] == list(range(7)) and {s["count"] for s in stages} == {7}
    assert all(s["seconds"] >= 0 and isinstance(s["notes"], list) for s in stages)
    assert "echo times from the sidecars: 0.004, 0.012, 0.02, 0.028 s" in stages[0]["notes"]
    shown = {s["name"]: sorted(s["volumes"]) for s in stages}
    assert shown == {"inputs": [], "mask": ["mask"], "offsets": [], "unwrap": [], "echo fit": ["total_field"],
                     "mask refinement": ["mask"], "background": ["local_field", "mask"]}
    for s in stages:
        for path in s["volumes"].values():
            assert os.path.dirname(path) == str(tmp_path / "stages")
            assert qio.read_volume(path).same_geometry(gre["grid"])
    done = msgs[-1]
    assert done["event"] == "done" and done["path"] == str(tmp_path / "field.nrrd") and done["iterations"] == 0
    assert done["field_outputs"] == {"local_field": str(tmp_path / "field.nrrd"), "mask": str(tmp_path / "mask.nrrd"),
                                     "total_field": str(tmp_path / "total.nrrd")}
    shown_local = qio.read_volume(stages[-1]["volumes"]["local_field"]).array
    np.testing.assert_array_equal(qio.read_volume(done["path"]).array, shown_local)
    np.testing.assert_array_equal(qio.read_volume(done["field_outputs"]["mask"]).array,
                                  qio.read_volume(stages[-1]["volumes"]["mask"]).array)


def test_phase_job_goes_on_into_the_reconstruction(gre, tmp_path):
    code, msgs, err = run_worker(phase_job(tmp_path, gre, output=str(tmp_path / "qsm.nrrd"), method="tkd",
                                           device="cpu", stage_dir=None, out_mask=None))
    assert code == 0, (msgs, err[-2000:])
    events = [m["event"] for m in msgs]
    assert events[:8] == ["stage"] * 7 + ["started"] and events[-1] == "done"
    assert all(m["volumes"] == {} for m in msgs[:7])   # no stage_dir: nothing written for display
    # tkd inverts the local field: the panel is told that single-step TV measured best from the phase
    assert any(w.startswith("tkd inverts the pipeline's local field") for w in msgs[7]["warnings"]), msgs[7]
    done = msgs[-1]
    assert done["path"] == str(tmp_path / "qsm.nrrd") and qio.read_volume(done["path"]).same_geometry(gre["grid"])
    assert done["field_outputs"] == {"local_field": str(tmp_path / "field.nrrd")}
    assert not (tmp_path / "mask.nrrd").exists()


def test_cancel_between_stages_writes_no_output(gre, tmp_path):
    job = phase_job(tmp_path, gre)
    proc = subprocess.Popen([sys.executable, "-m", "qsmdip.worker", job], stdout=subprocess.PIPE, text=True, env=ENV)
    first = messages(proc.stdout.readline())
    assert first and first[0]["event"] == "stage" and first[0]["name"] == "inputs", first
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    final = messages(rest)[-1]
    assert proc.returncode == 5, rest
    assert final["kind"] == "cancelled" and final["message"].startswith("cancelled after the ")
    assert len([m for m in messages(rest) if m["event"] == "stage"]) < 6
    assert not (tmp_path / "field.nrrd").exists() and not (tmp_path / "mask.nrrd").exists()


@pytest.mark.parametrize("change, needle", [
    ({"phase": 3}, "job key phase=3 is invalid: it must be a path or a list of paths"),
    ({"magnitude": ["a", 2]}, 'job key magnitude=["a", 2] is invalid'),
    ({"echo_times_s": "0.004"}, "job key echo_times_s='0.004' is invalid"),
    ({"b0_tesla": "3"}, "job key b0_tesla='3' is invalid: it must be a finite number"),
    ({"pipeline": {"unwrap": "romeo"}}, "unknown unwrapping method 'romeo'"),
    ({"pipeline": {"nope": 1}}, "unknown pipeline settings: nope"),
    ({"pipeline": {"refine_mask": "yes"}}, "pipeline setting refine_mask='yes' is invalid"),
    ({"protocol": 1}, "a job with phase needs protocol 2"),
    ({"units": "hz"}, "job keys units do not apply to a job with phase"),
    ({"field": "f.nrrd"}, "job keys field do not apply to a job with phase"),
    ({"method": "tv"}, "job keys method configure a reconstruction: give output too"),
    ({"out_field": None}, "the job has no out_field"),
])
def test_bad_phase_jobs_are_input_errors(gre, tmp_path, change, needle):
    from qsmdip.errors import QSMInputError
    from qsmdip.field_runner import run_field
    from qsmdip.worker import parse_job

    job = json.loads(open(phase_job(tmp_path, gre)).read())
    job.update(change)
    job = {k: v for k, v in job.items() if v is not None}
    with pytest.raises(QSMInputError) as error:
        parsed = parse_job(job)
        run_field(parsed.field_request)   # settings are checked before any file is read
    assert needle in str(error.value)
    assert not (tmp_path / "field.nrrd").exists()


def test_bad_phase_job_ends_with_exit_2(gre, tmp_path):
    code, msgs, _ = run_worker(phase_job(tmp_path, gre, phase=[str(tmp_path / "nope.nii.gz")]))
    assert code == 2 and msgs[-1]["kind"] == "input" and "nope.nii.gz does not exist" in msgs[-1]["message"], msgs
    assert [m["event"] for m in msgs] == ["error"]
    assert not (tmp_path / "field.nrrd").exists()
