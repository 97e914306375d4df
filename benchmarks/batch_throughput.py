"""Cohort throughput: subjects per hour of ``qsmdip batch`` on Dask against a plain loop over the subjects.

A BIDS dataset of ``--subjects`` simulated 4 mm acquisitions (the realistic head, a different seed each) is
made once. Then, each from an empty derivatives folder, timed from start to the last file written:

- ``loop, T thread(s)``: :func:`qsmdip.batch.task.process_acquisition` for one subject after another in
  this process, torch on T threads (what a shell loop over ``qsmdip reconstruct --phase`` does, without
  its per-subject start-up);
- ``dask, W worker(s) x T``: :func:`qsmdip.batch.engine.run_batch` on a fresh LocalCluster (its start
  and shutdown included).

The overhead of Dask is its time over the loop's at the same total threads. Run it alone:

    python benchmarks/batch_throughput.py --subjects 8 --method tv [--json out.json]
    python benchmarks/batch_throughput.py --subjects 4 --method dip --iterations 40 --runs loop1x2,dask1x2,dask2x1
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_dataset(root: Path, subjects: int) -> None:
    from qsmdip import io as qio
    from qsmdip.phase.files import write_multi_echo
    from qsmdip.realistic_acquisition import make_realistic_acquisition

    for n in range(subjects):
        acq = make_realistic_acquisition(voxel_size_mm=(4.0, 4.0, 4.0), snr=100.0, seed=n)
        grid = qio.Volume(np.zeros(acq.shape, np.float32), acq.voxel_size_mm)
        write_multi_echo(root, acq.phase_rad, acq.magnitude, grid, acq.echo_times_s, acq.b0_tesla,
                         subject=f"{n + 1:02d}")


def run_loop(root: Path, out: Path, method: str, settings: dict, threads: int) -> dict:
    import torch

    from qsmdip.batch.engine import BatchRequest, plan_batch
    from qsmdip.batch.task import BatchJob, process_acquisition

    before = torch.get_num_threads()
    start = time.perf_counter()
    plan = plan_batch(BatchRequest(str(root), str(out), method=method, settings=settings))
    job = BatchJob(out_root=str(out.resolve()), method=method, settings=settings, device="cpu", threads=threads,
                   input_root=str(root.resolve()), config=plan.config, config_hash=plan.config_hash)
    outcomes = [process_acquisition(acq, job) for acq in plan.to_run]
    seconds = time.perf_counter() - start
    torch.set_num_threads(before)
    return _row(f"loop, {threads} thread(s)", seconds, outcomes)


def run_dask(root: Path, out: Path, method: str, settings: dict, workers: int, threads: int) -> dict:
    from qsmdip.batch.cluster import ClusterOptions
    from qsmdip.batch.engine import BatchRequest, plan_batch, run_batch

    start = time.perf_counter()
    request = BatchRequest(str(root), str(out), method=method, settings=settings, device="cpu",
                           cluster=ClusterOptions(workers=workers, threads=threads, gpus=0, dashboard=False))
    outcomes = run_batch(request, plan_batch(request))
    seconds = time.perf_counter() - start
    return _row(f"dask, {workers} worker(s) x {threads}", seconds, outcomes)


def _row(name: str, seconds: float, outcomes: list) -> dict:
    failed = [o.prefix for o in outcomes if o.status != "done"]
    if failed:
        raise SystemExit(f"{name}: subjects not done: {failed}")
    per_subject = [o.seconds for o in outcomes]
    return {"run": name, "seconds": round(seconds, 1), "subjects": len(outcomes),
            "subjects_per_hour": round(3600 * len(outcomes) / seconds, 1),
            "median_subject_s": round(statistics.median(per_subject), 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--method", default="tv")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--runs", default="loop1x1,dask1x1,loop1x2,dask1x2,dask2x1",
                        help="which runs, as KINDWORKERSxTHREADS separated by commas")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    settings = {k: json.loads(v) for k, v in (pair.split("=", 1) for pair in args.set)}
    if args.iterations:
        settings["iterations"] = args.iterations
    cores = len(os.sched_getaffinity(0))
    work = Path(tempfile.mkdtemp(prefix="qsmdip-batch-bench-"))
    try:
        t = time.perf_counter()
        make_dataset(work / "bids", args.subjects)
        print(f"dataset: {args.subjects} subjects at 4 mm in {time.perf_counter() - t:.0f} s; {cores} cores;"
              f" method {args.method} {settings or ''}", file=sys.stderr)
        runs = [(r[:4], int(r[4:].split("x")[0]), int(r.split("x")[1])) for r in args.runs.split(",")]
        rows = []
        for n, (kind, workers, threads) in enumerate(runs):
            out = work / f"out{n}"
            row = (run_loop(work / "bids", out, args.method, settings, threads) if kind == "loop"
                   else run_dask(work / "bids", out, args.method, settings, workers, threads))
            row["total_threads"] = workers * threads
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    loops = {r["total_threads"]: r["seconds"] for r in rows if r["run"].startswith("loop")}
    print("| run | seconds | subjects/hour | median s/subject | time / loop at the same threads |")
    print("|---|---|---|---|---|")
    for r in rows:
        ratio = r["seconds"] / loops[r["total_threads"]]
        r["ratio_to_loop"] = round(ratio, 3)
        print(f"| {r['run']} | {r['seconds']} | {r['subjects_per_hour']} | {r['median_subject_s']} | {ratio:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"method": args.method, "settings": settings, "cores": cores,
                                               "subjects": args.subjects, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
