"""``qsmdip batch``: discovery, provenance, resumption and failures on a real Dask LocalCluster.

The dataset is the 4 mm simulated acquisition of ``gre_data`` written as BIDS for several subjects (one
with a session). Runs use TKD, so the seconds go into the cluster, the pipeline and the bookkeeping.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("distributed")
pytest.importorskip("nilearn")

from qsmdip import cli  # noqa: E402
from qsmdip import io as qio  # noqa: E402
from qsmdip.batch import cluster, discovery, provenance  # noqa: E402
from qsmdip.batch.engine import BatchRequest, _input_root, plan_batch  # noqa: E402
from qsmdip.errors import QSMInputError  # noqa: E402

import gre_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT / "QSMDIP"), PYTHONUNBUFFERED="1")
PREFIXES = ["sub-01", "sub-02", "sub-03_ses-pre"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bids")
    gre_data.write_bids_dataset(root)
    return root


def summary(out: Path) -> dict:
    with open(out / "qsmdip_batch.tsv", newline="") as handle:
        return {row["prefix"]: row for row in csv.DictReader(handle, delimiter="\t")}


def batch_command(*args: str) -> list:
    return [sys.executable, "-m", "qsmdip", "batch", *args]


# ---------------------------------------------------------------- discovery (no Dask)

def test_discovery_finds_subjects_sessions_and_runs_and_ignores_derivatives(dataset, tmp_path):
    found = discovery.discover_bids(dataset)
    assert [a.prefix for a in found] == PREFIXES
    assert [(a.subject, a.session) for a in found] == [("01", None), ("02", None), ("03", "pre")]
    first = found[0]
    assert [Path(p).name for p in first.phase] == [f"sub-01_echo-{n}_part-phase_MEGRE.nii.gz" for n in (1, 2, 3, 4)]
    assert [Path(p).name for p in first.magnitude] == [f"sub-01_echo-{n}_part-mag_MEGRE.nii.gz" for n in (1, 2, 3, 4)]
    assert len(first.input_files()) == 16  # 8 images and their sidecars
    outputs = found[2].outputs(tmp_path)
    assert outputs["chimap"] == tmp_path / "sub-03" / "ses-pre" / "anat" / "sub-03_ses-pre_Chimap.nii.gz"
    assert outputs["local_field"].name == "sub-03_ses-pre_desc-local_fieldmap.nii.gz"

    # two runs of one subject are two acquisitions; a derivatives tree inside the dataset is not input
    copy = tmp_path / "bids"
    anat = copy / "sub-07" / "anat"
    anat.mkdir(parents=True)
    derived = copy / "derivatives" / "qsmdip" / "sub-07" / "anat"
    derived.mkdir(parents=True)
    for name in sorted(os.listdir(dataset / "sub-01" / "anat")):
        data = (dataset / "sub-01" / "anat" / name).read_bytes()
        for run in (1, 2):
            (anat / name.replace("sub-01_", f"sub-07_run-{run}_")).write_bytes(data)
        (derived / name.replace("sub-01_", "sub-07_")).write_bytes(data)
    runs = discovery.discover_bids(copy)
    assert [a.prefix for a in runs] == ["sub-07_run-1", "sub-07_run-2"]
    assert discovery.discover_bids(copy, ["sub-07"]) == runs
    with pytest.raises(QSMInputError, match="participant.*08"):
        discovery.discover_bids(copy, ["08"])
    with pytest.raises(QSMInputError, match="no BIDS multi-echo GRE"):
        discovery.discover_bids(tmp_path / "bids" / "derivatives")


def test_discovery_of_entities_mixed_extensions_relative_and_linked_roots(tmp_path, monkeypatch):
    anat = tmp_path / "data" / "sub-05" / "ses-1" / "anat"
    anat.mkdir(parents=True)
    prefix = "sub-05_ses-1_acq-fast_run-2"
    for n in (1, 2):  # phase as .nii.gz, magnitude as .nii: both are BIDS
        (anat / f"{prefix}_echo-{n}_part-phase_MEGRE.nii.gz").write_bytes(b"")
        (anat / f"{prefix}_echo-{n}_part-mag_MEGRE.nii").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    [acq] = discovery.discover_bids(Path("data"))  # relative: a worker in another folder must still find it
    assert (acq.prefix, acq.subject, acq.session) == (prefix, "05", "1")
    assert [Path(p).name for p in acq.magnitude] == [f"{prefix}_echo-{n}_part-mag_MEGRE.nii" for n in (1, 2)]
    assert all(os.path.isabs(p) for p in acq.phase + acq.magnitude)
    # through a linked folder, inputs are still named relative to the dataset (sidecars' bids:raw: sources)
    (tmp_path / "link").symlink_to(tmp_path / "data")
    [linked] = discovery.discover_bids(tmp_path / "link")
    root = _input_root(BatchRequest(str(tmp_path / "link"), str(tmp_path / "out")))
    assert provenance._relative(linked.phase[0], root) == f"sub-05/ses-1/anat/{prefix}_echo-1_part-phase_MEGRE.nii.gz"
    (anat / f"{prefix}_echo-2_part-mag_MEGRE.nii").unlink()  # a magnitude echo missing: none at all
    assert discovery.discover_bids(Path("data"))[0].magnitude == ()


def test_manifest_of_local_fields(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "m.csv").write_text("subject,session,field,mask,magnitude\n01,,a/f.nii.gz,a/m.nii.gz,\n"
                                    "sub-02,2,/abs/f.nii.gz,/abs/m.nii.gz,/abs/mag.nii.gz\n")
    found = discovery.read_manifest(tmp_path / "m.csv")
    assert [a.prefix for a in found] == ["sub-01", "sub-02_ses-2"]
    assert found[0].field == str(tmp_path / "a" / "f.nii.gz") and found[0].magnitude_3d is None
    assert found[1].magnitude_3d == "/abs/mag.nii.gz"
    for name, text, message in [("bad.csv", "subject,field\n01,f.nii\n", "lacks the column.*mask"),
                                ("dup.csv", "subject,field,mask\n01,f,m\n01,g,n\n", "sub-01 appears twice"),
                                ("label.csv", "subject,field,mask\n0_1,f,m\n", "not a BIDS label"),
                                ("extra.csv", "subject,field,mask\n\n01,f,m,x\n", "extra.csv:3: more values")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(QSMInputError, match=message):
            discovery.read_manifest(tmp_path / name)
    # a spreadsheet's byte-order mark; a manifest named relative to the working folder gives absolute paths
    (tmp_path / "a" / "bom.csv").write_text("\ufeffsubject,field,mask\n01,f.nii,m.nii\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    [acq] = discovery.read_manifest(Path("a/bom.csv"))
    assert acq.field == str(tmp_path / "a" / "f.nii")


# ---------------------------------------------------------------- cluster set-up (no workers started)

def test_gpu_workers_see_one_gpu_each_and_cpu_tasks_never_take_a_gpu_slot(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    specs = cluster.local_worker_specs(2, 3, 2, "1GB")
    assert sorted(specs) == ["cpu-0", "cpu-1", "gpu-0", "gpu-1"]
    assert specs["gpu-1"]["options"]["env"]["CUDA_VISIBLE_DEVICES"] == "1"
    assert specs["gpu-1"]["options"]["resources"] == {"subject": 1, "GPU": 1}
    assert specs["cpu-0"]["options"]["env"]["CUDA_VISIBLE_DEVICES"] == ""
    assert specs["cpu-0"]["options"]["env"]["OMP_NUM_THREADS"] == "3"
    assert all(spec["options"]["nthreads"] == 1 for spec in specs.values())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")  # e.g. a SLURM allocation: GPU 0 is another job's
    assert cluster.local_worker_specs(0, 1, 2, "1GB")["gpu-0"]["options"]["env"]["CUDA_VISIBLE_DEVICES"] == "2"
    with pytest.raises(QSMInputError, match="CUDA_VISIBLE_DEVICES"):
        cluster.local_worker_specs(0, 1, 3, "1GB")
    handle = cluster.ClusterHandle(None, None, "", True, 2, 1)
    assert handle.resources("cuda") == {"subject": 1, "GPU": 1}
    assert handle.resources("cpu") == {"subject": 1}
    assert cluster.ClusterHandle(None, None, "", False, 0, 1).resources("cpu") is None
    assert cluster.local_worker_count(1, cores=16, memory_bytes=24 * cluster.GB) == 6  # memory bound
    assert cluster.local_worker_count(2, cores=16, memory_bytes=256 * cluster.GB) == 8  # cores bound


def test_slurm_job_script_asks_for_the_gpu_and_declares_the_resources():
    pytest.importorskip("dask_jobqueue")
    options = cluster.ClusterOptions(kind="slurm", cores=8, memory="32GB", walltime="02:00:00", queue="gpu",
                                     gpus=1, threads=4, job_directives=["--account=qsm"], dashboard=False)
    slurm = cluster.jobqueue_cluster(options)
    try:
        script = slurm.job_script()
    finally:
        slurm.close()
    for line in ("#SBATCH -p gpu", "#SBATCH --gres=gpu:1", "#SBATCH --account=qsm", "#SBATCH -t 02:00:00",
                 "export OMP_NUM_THREADS=4"):
        assert line in script
    assert "--resources subject=1,GPU=1" in script
    with pytest.raises(QSMInputError, match="needs --memory"):
        cluster.jobqueue_cluster(cluster.ClusterOptions(kind="pbs", cores=4))


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written

@pytest.mark.parametrize("args, message", [
    (["{missing}", "--out", "{out}"], "does not exist or is not a folder"),
    (["{data}", "--out", "{data}"], "is the input dataset"),
    (["{data}", "--out", "{out}", "--method", "tkd", "--set", "nope=1"], "nope"),
    (["{data}", "--out", "{out}", "--cluster", "slurm"], "needs --cores and --memory"),
    (["{data}", "--out", "{out}", "--cores", "4"], "only with --cluster"),
    (["{data}", "--out", "{out}", "--scheduler", "tcp://127.0.0.1:1", "--workers", "3"], "not apply to --scheduler"),
    (["{data}", "--out", "{out}", "--cluster", "pbs", "--cores", "4", "--memory", "8GB", "--gpus", "1"],
     "needs --job-directive"),
    (["{data}", "--out", "{out}", "--participant-label", "99"], "participant"),
    (["{data}", "--out", "{out}", "--device", "cuda", "--gpus", "0", "--method", "tkd"], "no worker has a GPU"),
])
def test_bad_input_is_one_line_and_exit_2(dataset, tmp_path, capsys, args, message):
    values = {"missing": str(tmp_path / "none"), "out": str(tmp_path / "out"), "data": str(dataset)}
    code = cli.main(["batch", *[a.format(**values) for a in args], "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert message in err[-1] and err[-1].startswith("qsmdip batch: error:")
    assert not (tmp_path / "out" / "sub-01").exists()


# ---------------------------------------------------------------- a real cohort on a 2-worker LocalCluster

def test_cohort_outputs_sidecars_failure_and_skip_on_rerun(dataset, tmp_path, capsys):
    data = tmp_path / "bids"
    import shutil

    shutil.copytree(dataset, data)
    bad = data / "sub-04" / "anat"
    bad.mkdir(parents=True)
    for item in sorted((data / "sub-01" / "anat").iterdir()):
        (bad / item.name.replace("sub-01", "sub-04")).write_bytes(item.read_bytes())
    truncated = bad / "sub-04_echo-2_part-phase_MEGRE.nii.gz"
    truncated.write_bytes(truncated.read_bytes()[:5000])
    out = tmp_path / "derivatives"

    code = cli.main(["batch", str(data), "--out", str(out), "--method", "tkd", "--workers", "2", "--no-progress"])
    assert code == 1  # one subject failed; the others are done
    assert "qsmdip batch: note: tkd inverts the pipeline's local field" in capsys.readouterr().err
    rows = summary(out)
    assert [rows[p]["status"] for p in PREFIXES] == ["done"] * 3
    assert rows["sub-04"]["status"] == "failed" and "sub-04_echo-2_part-phase_MEGRE" in rows["sub-04"]["error"]
    assert "\n" not in rows["sub-04"]["error"]
    assert not (out / "sub-04").exists()  # nothing half-made for the failed subject

    # the batch output is what the single-subject path makes from the same files
    from qsmdip.field_runner import FieldRequest, run_field_and_reconstruction
    from qsmdip.runner import ReconstructionRequest

    single = tmp_path / "single.nii.gz"
    run_field_and_reconstruction(
        FieldRequest(phase_paths=[str(data / "sub-02" / "anat" / "sub-02_echo-1_part-phase_MEGRE.nii.gz")],
                     field_output_path=str(tmp_path / "f.nii.gz"), mask_output_path=str(tmp_path / "m.nii.gz")),
        ReconstructionRequest("", "", str(single), method="tkd"), {})
    chimap = out / "sub-02" / "anat" / "sub-02_Chimap.nii.gz"
    # (the worker's one torch thread sums in another order: float32 round-off only)
    np.testing.assert_allclose(qio.read_volume(chimap).array, qio.read_volume(single).array, atol=1e-6)
    grid = qio.read_volume(data / "sub-02" / "anat" / "sub-02_echo-1_part-mag_MEGRE.nii.gz")
    assert not qio.read_volume(chimap).geometry_difference(grid)

    anat = out / "sub-03" / "ses-pre" / "anat"
    assert sorted(p.name for p in anat.iterdir()) == sorted(
        f"sub-03_ses-pre_{s}" for s in ("Chimap.nii.gz", "Chimap.json", "desc-local_fieldmap.nii.gz",
                                        "desc-local_fieldmap.json", "desc-qsm_mask.nii.gz", "desc-qsm_mask.json"))
    side = json.loads((anat / "sub-03_ses-pre_Chimap.json").read_text())
    record = side["QSMDIP"]
    assert side["Units"] == "ppm"
    assert record["Method"] == "tkd" and record["Settings"]["threshold"] > 0
    assert record["PhasePipeline"]["background"] and record["EchoTimes"] == [0.004, 0.012, 0.02, 0.028]
    assert record["MagneticFieldStrength"] == 3.0 and record["Device"] == "cpu"
    assert record["StopReason"] == "completed" and record["Attempts"] == 1
    assert any(n.startswith("tkd inverts the pipeline's local field") for n in record["Notes"]), record["Notes"]
    assert record["Seconds"]["total"] >= record["Seconds"]["field"] > 0
    assert {"qsmdip", "torch", "numpy", "dask", "distributed"} <= set(record["SoftwareVersions"])
    name = "sub-03/ses-pre/anat/sub-03_ses-pre_echo-3_part-phase_MEGRE.nii.gz"
    assert record["InputChecksums"][name]["sha256"] == hashlib.sha256((data / name).read_bytes()).hexdigest()
    assert f"bids:raw:{name}" in side["Sources"]
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["GeneratedBy"][0]["Name"] == "QSMDIP"
    assert not (out / ".qsmdip-batch" / "staging").exists() and not (out / ".qsmdip-batch" / "lock").exists()

    # a rerun skips what is current (no cluster is started) and keeps the earlier failure's row
    stamp = chimap.stat().st_mtime_ns
    capsys.readouterr()
    code = cli.main(["batch", str(data), "--out", str(out), "--method", "tkd", "--participant-label", "01", "02", "03",
                     "--no-progress"])
    assert code == 0 and chimap.stat().st_mtime_ns == stamp
    rows = summary(out)
    assert [rows[p]["status"] for p in PREFIXES] == ["skipped"] * 3 and rows["sub-04"]["status"] == "failed"

    # other settings are refused, not overwritten; a changed input reruns only its subject
    request = BatchRequest(str(data), str(out), method="tkd", settings={"threshold": 0.1})
    plan = plan_batch(request)
    assert [a.prefix for a in plan.conflicts] == PREFIXES
    changed = data / "sub-01" / "anat" / "sub-01_echo-1_part-mag_MEGRE.json"
    changed.write_text(changed.read_text().replace("}", ', "Note": "edited"}'))
    plan = plan_batch(BatchRequest(str(data), str(out), method="tkd"))
    assert {a.prefix: plan.reasons[a.prefix] for a in plan.to_run} == {"sub-01": provenance.INPUTS_CHANGED,
                                                                      "sub-04": provenance.ABSENT}
    capsys.readouterr()
    assert cli.main(["batch", str(data), "--out", str(out), "--method", "tkd", "--set", "threshold=0.1",
                     "--dry-run"]) == 0
    listed = dict(line.split("\t") for line in capsys.readouterr().out.strip().splitlines())
    assert listed["sub-02"].startswith("refuse") and listed["sub-04"] == "run (absent)"


def test_manifest_of_local_fields_on_an_existing_scheduler(dataset, tmp_path):
    from qsmdip.field_runner import FieldRequest, run_field

    run_field(FieldRequest(phase_paths=[str(dataset / "sub-01" / "anat" / "sub-01_echo-1_part-phase_MEGRE.nii.gz")],
                           field_output_path=str(tmp_path / "field.nii.gz"), mask_output_path=str(tmp_path / "mask.nii.gz")))
    (tmp_path / "cohort.csv").write_text("subject,field,mask\nA,field.nii.gz,mask.nii.gz\nB,field.nii.gz,missing.nii.gz\n")
    out = tmp_path / "out"
    # a cluster started as the batch starts its own: workers get the thread count, and not Dask's malloc trim
    # setting that slows torch 2.7x; then the batch joins it through its address
    handle = cluster.start(cluster.ClusterOptions(workers=1, threads=2, dashboard=False), allowed_failures=1)
    try:
        env = handle.client.run(lambda: {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_")})
        assert list(env.values()) == [{"OMP_NUM_THREADS": "2", "MALLOC_TRIM_THRESHOLD_": None}]
        code = cli.main(["batch", str(tmp_path / "cohort.csv"), "--input", "localfield", "--out", str(out), "--method",
                         "tikhonov", "--scheduler", handle.client.scheduler.address, "--no-progress"])
    finally:
        handle.close()
    rows = summary(out)
    assert code == 1 and rows["sub-A"]["status"] == "done" and rows["sub-B"]["status"] == "failed"
    assert "missing.nii.gz" in rows["sub-B"]["error"]
    record = json.loads((out / "sub-A" / "anat" / "sub-A_Chimap.json").read_text())["QSMDIP"]
    assert record["Input"] == "localfield" and "lambda_" in record["ChosenWeights"]
    field = qio.read_volume(out / "sub-A" / "anat" / "sub-A_desc-local_fieldmap.nii.gz").array
    np.testing.assert_array_equal(field, qio.read_volume(tmp_path / "field.nii.gz").array)


# ---------------------------------------------------------------- killed workers and Ctrl-C (subprocesses)

def wait_for(path: Path, timeout: float = 120.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            time.sleep(0.05)
    raise AssertionError(f"{path} did not appear")


def test_a_killed_worker_s_subject_is_retried_and_nothing_is_lost(dataset, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(batch_command(str(dataset), "--out", str(out), "--method", "tkd",
                                          "--workers", "2", "--no-progress"),
                            env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        started = wait_for(out / ".qsmdip-batch" / "attempts" / "sub-01.json")
        os.kill(started["pid"], signal.SIGKILL)  # the worker process running sub-01 dies mid-subject
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    rows = summary(out)
    assert [rows[p]["status"] for p in PREFIXES] == ["done"] * 3
    assert rows["sub-01"]["attempts"] == "2"
    record = json.loads((out / "sub-01" / "anat" / "sub-01_Chimap.json").read_text())["QSMDIP"]
    assert record["Attempts"] == 2 and record["StopReason"]
    leftovers = [p for p in out.rglob("*") if p.is_file() and p.name.startswith(".")]
    assert leftovers == []
    assert not (out / ".qsmdip-batch" / "staging").exists()


def test_ctrl_c_cancels_cleanly_with_exit_130(dataset, tmp_path):
    out = tmp_path / "out"
    # TV without its tolerance, for far more iterations than the Ctrl-C needs: on a fast CPU a converging TV could
    # finish and start publishing before the signal lands, leaving images without the Chimap's sidecar
    proc = subprocess.Popen(batch_command(str(dataset), "--out", str(out), "--method", "tv", "--iterations", "100000",
                                          "--set", "tolerance=0", "--workers", "1", "--no-progress"),
                            env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(out / ".qsmdip-batch" / "attempts" / "sub-01.json")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err.strip().splitlines()[-1]
    rows = summary(out)
    assert {rows[p]["status"] for p in PREFIXES} == {"cancelled"}
    assert not list(out.glob("sub-*/**/*.*"))  # no image nor sidecar of any subject
    assert not (out / ".qsmdip-batch" / "lock").exists()


def test_the_single_subject_path_never_imports_dask():
    code = ("import sys; from qsmdip import cli, runner, field_runner, worker; cli.build_parser();"
            " bad = [m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], env=ENV, check=True)
