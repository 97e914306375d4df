"""Which use of the GRE magnitude helps DIP: as a network input channel, as the data term's weight, both or
neither. Same phantom, seed and settings otherwise; the truth only scores the returned maps.

    python benchmarks/dip_magnitude_uses.py --voxel 2 --tilt 0
    python benchmarks/dip_magnitude_uses.py --voxel 1 --uses both,weight --out dip-magnitude-uses.jsonl
    python benchmarks/dip_magnitude_uses.py --voxel 1.5 --supersample 1 --uses both,weight   # no dephasing

Appends one JSON line per run to --out (the committed records are docs/results/dip-magnitude-uses.jsonl for
the CPU and docs/results/gpu-2026-12-04/ablate-1mm.jsonl for 1 mm on an H200). Run it alone: the seconds
are wall time. The first run of a process also pays for the device's warm-up.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "QSMDIP"))

import qsmdip.solvers.dip as dip  # noqa: E402
from qsmdip.geometry import b0_tilted_about_i  # noqa: E402
from qsmdip.metrics import all_metrics  # noqa: E402
from qsmdip.realistic_phantom import PHANTOM_SUPERSAMPLING, make_realistic_phantom  # noqa: E402

#: use -> (magnitude given, magnitude_input, magnitude_weighting)
USES = {"none": (False, False, False), "input": (True, True, False), "weight": (True, False, True),
        "both": (True, True, True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voxel", type=float, default=2.0, help="isotropic voxel size (mm)")
    parser.add_argument("--tilt", type=float, default=0.0, help="B0 tilt about the i axis (degrees)")
    parser.add_argument("--uses", default="both,weight,input,none", help=f"comma-separated of {', '.join(USES)}")
    parser.add_argument("--supersample", type=int, default=PHANTOM_SUPERSAMPLING,
                        help="phantom simulation voxels per voxel and axis (default %(default)s at every size; "
                             "rows before 2026-12-04 without 'supersample' had 2 from 2 mm up, else 1)")
    parser.add_argument("--set", default="{}", help="JSON overrides of the default DIP preset")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="dip-magnitude-uses.jsonl")
    args = parser.parse_args()

    b0 = b0_tilted_about_i(args.tilt)
    phantom = make_realistic_phantom(None, (args.voxel,) * 3, snr=100, seed=0, b0_dir=b0,
                                     supersampling=args.supersample)
    overrides = json.loads(args.set)
    for use in args.uses.split(","):
        given, channel, weighting = USES[use]
        settings = dip.dip_settings("default", **dict(overrides, magnitude_input=channel,
                                                      magnitude_weighting=weighting))
        start = time.perf_counter()
        result = dip.solve_dip(phantom.field_ppm, phantom.mask, phantom.voxel_size_mm, b0_dir=b0, settings=settings,
                               magnitude=phantom.magnitude if given else None, device=args.device)
        seconds = time.perf_counter() - start
        metrics = all_metrics(result.chi_ppm, phantom.chi_ppm, phantom.mask)
        row = dict(voxel=args.voxel, tilt=args.tilt, supersample=args.supersample, use=use, set=overrides,
                   **{k: round(metrics[k], 3) for k in ("nrmse", "hfen", "xsim")},
                   iterations=result.iterations, stop=result.stop_reason, seconds=round(seconds, 1),
                   device=result.device)
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as stream:
            stream.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
