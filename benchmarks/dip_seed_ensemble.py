"""Does averaging DIP runs over seeds help? Runs the default preset (with overrides) once per seed on the
realistic phantom and scores each returned map and the mean of the first k of them against the truth.

The seed changes the network's initial weights, its noise input and the held-out voxels, so the runs differ
in everything but the data and the TV base. The truth scores the maps only. The record behind
docs/dip-experiments.md ("An ensemble over seeds"):

    python benchmarks/dip_seed_ensemble.py --voxel 3 --magnitude 0 --seeds 0,1,2

Run it alone: the seconds are wall time on this machine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "QSMDIP"))

import qsmdip.solvers.dip as dip  # noqa: E402
from qsmdip.metrics import all_metrics  # noqa: E402
from qsmdip.realistic_phantom import make_realistic_phantom  # noqa: E402


def _three(metrics: dict) -> dict:
    return {k: round(metrics[k], 3) for k in ("nrmse", "hfen", "xsim")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voxel", type=float, default=3.0, help="isotropic voxel size (mm)")
    parser.add_argument("--magnitude", type=int, choices=(0, 1), default=0, help="give DIP the magnitude")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated DIP seeds")
    parser.add_argument("--set", default="{}", help="JSON overrides of the default DIP preset")
    args = parser.parse_args()

    voxel = (args.voxel,) * 3
    phantom = make_realistic_phantom(None, voxel, snr=100, seed=0)
    magnitude = phantom.magnitude if args.magnitude else None
    overrides = json.loads(args.set)
    maps = []
    for seed in (int(s) for s in args.seeds.split(",")):
        settings = dip.dip_settings("default", **{**overrides, "seed": seed})
        start = time.time()
        result = dip.solve_dip(phantom.field_ppm, phantom.mask, voxel, settings=settings, magnitude=magnitude)
        maps.append(result.chi_ppm.astype(np.float64))
        row = {"seed": seed, "returned": _three(all_metrics(result.chi_ppm, phantom.chi_ppm, phantom.mask)),
               "stop": result.stop_reason, "iterations": result.iterations,
               "seconds": round(time.time() - start, 1)}
        if len(maps) > 1:
            row[f"mean_of_{len(maps)}"] = _three(all_metrics(np.mean(maps, axis=0), phantom.chi_ppm, phantom.mask))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
