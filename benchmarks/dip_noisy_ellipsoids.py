"""Does a DIP variant stay near TV on noisy data? The unit tests' ellipsoid phantom (28 x 32 x 26, 1 mm) at
two noise levels, TV with its automatic weight, and the default DIP (width 8, as in the tests) with and
without its penalty and its hold-out rule. The record behind docs/dip-experiments.md ("Half TV's weight,
with the hold-out on"):

    python benchmarks/dip_noisy_ellipsoids.py > docs/results/dip-noisy-ellipsoids.log

(docs/results/dip-noisy-ellipsoids-huber.log: the same with the Huber default of 2026-12-05, thirteenth session)

noise 0.001 ppm is the SNR 7 case of tests/test_dip.py (100 iterations), 0.0002 ppm the low-noise case
(120 iterations). The truth scores the maps only. Seconds are wall time: run it alone.
"""
from __future__ import annotations

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "QSMDIP"))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from qsmdip.metrics import nrmse  # noqa: E402
from qsmdip.solvers.dip import dip_settings, solve_dip  # noqa: E402
from qsmdip.solvers.tv import solve_tv  # noqa: E402
from test_dip import VOXEL_MM, ellipsoid_phantom  # noqa: E402

#: (noise in ppm, DIP iterations): the two cases of tests/test_dip.py
CASES = ((0.001, 100), (0.0002, 120))
#: the variants, as overrides of the default preset (width 8 in all, as in the tests)
VARIANTS = {
    "default": {},
    "no penalty (the default before 2026-12-05)": {"regulariser": "none"},
    "penalty, hold-out off": {"holdout_fraction": 0.0},
    "no penalty, hold-out off": {"regulariser": "none", "holdout_fraction": 0.0},
}


def main() -> None:
    for noise_ppm, iterations in CASES:
        chi, mask, field = ellipsoid_phantom((28, 32, 26), noise_ppm=noise_ppm)
        tv = nrmse(solve_tv(field, mask, VOXEL_MM, device="cpu").chi_ppm, chi, mask)
        print(f"noise {noise_ppm} ppm: TV (automatic weight) {tv:.2f} %", flush=True)
        for name, overrides in VARIANTS.items():
            settings = dip_settings("default", **{"width": 8, "iterations": iterations, **overrides})
            start = time.time()
            result = solve_dip(field, mask, VOXEL_MM, settings=settings, device="cpu")
            print(f"  {name}: {nrmse(result.chi_ppm, chi, mask):.2f} %, stop {result.stop_reason} at "
                  f"{result.iterations}, penalty {result.chosen['regulariser']} {result.chosen['reg_weight']:.4g}, "
                  f"{result.device}, {time.time() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
