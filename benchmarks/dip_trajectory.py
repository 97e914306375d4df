"""One DIP run, scored along the way: the returned map's NRMSE every few iterations, moving averages of the
snapshots, and the hold-out rule's smoothed misfit. The record behind docs/dip-experiments.md ("Learning rate
2e-3 with an averaged estimate"); the truth scores snapshots only and never reaches the solver.

    python benchmarks/dip_trajectory.py --kind realistic --voxel 2 --magnitude 1 --every 10 --tag new2-mag
    python benchmarks/dip_trajectory.py --kind simple --voxel 3 --set '{"holdout_rise": 100}' --tag no-stop

Each run appends one JSON line to --out (default dip-trajectory.jsonl; the committed record is
docs/results/cpu-dip-lr2e-3-ema.jsonl). Run it alone: the seconds are wall time on this machine.
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
from qsmdip.geometry import b0_tilted_about_i  # noqa: E402
from qsmdip.metrics import all_metrics, nrmse  # noqa: E402
from qsmdip.phantom import make_head_phantom  # noqa: E402

#: decays of the moving averages of the snapshots scored beside the returned map
EMA_DECAYS = (0.9, 0.95, 0.98)
#: the plain mean of the snapshots is taken from this iteration on
TAIL_START = 100


def _three(metrics: dict) -> dict:
    return {k: round(metrics[k], 3) for k in ("nrmse", "hfen", "xsim")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=("realistic", "simple"), default="realistic")
    parser.add_argument("--voxel", type=float, default=3.0, help="isotropic voxel size (mm)")
    parser.add_argument("--magnitude", type=int, choices=(0, 1), default=1, help="give DIP the magnitude (realistic)")
    parser.add_argument("--tilt", type=float, default=0.0, help="B0 tilt about the i axis (degrees)")
    parser.add_argument("--set", default="{}", help="JSON overrides of the default DIP preset")
    parser.add_argument("--every", type=int, default=1, help="score every N iterations")
    parser.add_argument("--supersample", type=int, default=None,
                        help="realistic phantom: simulation voxels per voxel and axis (default 2; 1 point-samples, "
                             "as below 2 mm before 2026-12-04)")
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", default="dip-trajectory.jsonl")
    args = parser.parse_args()

    b0 = b0_tilted_about_i(args.tilt)
    voxel = (args.voxel,) * 3
    if args.kind == "realistic":
        from qsmdip.realistic_phantom import make_realistic_phantom
        phantom = make_realistic_phantom(None, voxel, snr=100, seed=0, b0_dir=b0, supersampling=args.supersample)
    else:
        phantom = make_head_phantom(None, voxel, snr=200, b0_dir=b0)
    magnitude = phantom.magnitude if args.kind == "realistic" and args.magnitude else None
    overrides = json.loads(args.set)
    settings = dip.dip_settings("default", **overrides)

    held_out = []  # the rule's (smoothed misfit, minimum) per iteration, read off its private state for the log
    update = dip._HoldoutStop.update

    def logged_update(self, residual, estimate):
        risen = update(self, residual, estimate)
        held_out.append((round(self.smoothed, 6), round(self.best, 6)))
        return risen

    dip._HoldoutStop.update = logged_update

    averages = {decay: None for decay in EMA_DECAYS}
    tail = {"sum": None, "n": 0}
    rows = []
    start = time.time()

    def score(progress) -> bool:
        if progress.iteration == 0:  # the TV base's progress
            return False
        x = progress.chi_ppm.astype(np.float64)
        row = {"it": progress.iteration, "t": round(time.time() - start, 1),
               "returned": round(nrmse(x, phantom.chi_ppm, phantom.mask), 2),
               "held_out": held_out[-1] if held_out else None}
        for decay in EMA_DECAYS:
            a = averages[decay]
            averages[decay] = x.copy() if a is None else decay * a + (1 - decay) * x
            row[f"ema{decay}"] = round(nrmse(averages[decay], phantom.chi_ppm, phantom.mask), 2)
        if progress.iteration >= TAIL_START:
            tail["sum"] = x.copy() if tail["sum"] is None else tail["sum"] + x
            tail["n"] += 1
            row["tail_mean"] = round(nrmse(tail["sum"] / tail["n"], phantom.chi_ppm, phantom.mask), 2)
        rows.append(row)
        print(row, flush=True)
        return False

    result = dip.solve_dip(phantom.field_ppm, phantom.mask, voxel, b0_dir=b0, settings=settings, callback=score,
                           callback_every=args.every, magnitude=magnitude)
    record = {"tag": args.tag, "kind": args.kind, "voxel": args.voxel, "magnitude": magnitude is not None,
              "tilt": args.tilt, "set": overrides,
              "returned": _three(all_metrics(result.chi_ppm, phantom.chi_ppm, phantom.mask)),
              "stop": result.stop_reason, "iterations": result.iterations, "seconds": round(result.elapsed_s, 1),
              "device": result.device, "chosen": result.chosen, "rows": rows}
    for decay in EMA_DECAYS:
        if averages[decay] is not None:
            record[f"ema{decay}_of_snapshots"] = _three(all_metrics(averages[decay], phantom.chi_ppm, phantom.mask))
    print(json.dumps({k: v for k, v in record.items() if k != "rows"}), flush=True)
    with open(args.out, "a") as stream:
        stream.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
