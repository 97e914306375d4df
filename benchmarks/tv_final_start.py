"""TV's automatic weight: does the final solve start from the chosen candidate's ADMM state ("warm") or
from zero ("cold")? Same search, same weight; only the start of the last solve differs.

    python benchmarks/tv_final_start.py                       # ellipsoids, simple 3 mm, realistic 3 and 2 mm
    python benchmarks/tv_final_start.py --cases realistic-1 --out tv-final-start.jsonl

Appends one JSON line per case and start to --out (the committed record is
docs/results/tv-final-start.jsonl). Run it alone: the seconds are wall time. The truth only scores.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "QSMDIP"))

from qsmdip.geometry import b0_tilted_about_i  # noqa: E402
from qsmdip.metrics import all_metrics  # noqa: E402
from qsmdip.phantom import make_head_phantom  # noqa: E402
from qsmdip.solvers.tv import FINAL_STARTS, TVSettings, solve_tv  # noqa: E402


def ellipsoids():
    """The noisy piecewise-constant phantom of the TV tests (tests/test_classical_solvers.py), imported so that
    this case stays the one the tests assert on."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from test_classical_solvers import AXIAL, ISO, NOISE_PPM, make_phantom
    chi, mask, field = make_phantom(noise_ppm=NOISE_PPM)
    return chi, mask, field, ISO, AXIAL


def phantom_case(name: str):
    if name == "ellipsoids":
        return ellipsoids()
    kind, voxel, *tilt = name.split("-")
    b0 = b0_tilted_about_i(float(tilt[0]) if tilt else 0.0)
    vs = (float(voxel),) * 3
    if kind == "simple":
        p = make_head_phantom(None, vs, snr=200, b0_dir=b0)
    else:
        from qsmdip.realistic_phantom import make_realistic_phantom
        p = make_realistic_phantom(None, vs, snr=100, seed=0, b0_dir=b0)
    return p.chi_ppm, p.mask, p.field_ppm, vs, b0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="ellipsoids,simple-3,realistic-3,realistic-2,realistic-2-20",
                        help="comma-separated: ellipsoids, simple-V or realistic-V[-TILT] (V: voxel mm)")
    parser.add_argument("--starts", default=",".join(FINAL_STARTS))
    parser.add_argument("--out", default="tv-final-start.jsonl")
    args = parser.parse_args()
    for case in args.cases.split(","):
        chi, mask, field, vs, b0 = phantom_case(case)
        for start in args.starts.split(","):
            t0 = time.perf_counter()
            r = solve_tv(field, mask, vs, b0_dir=b0, settings=TVSettings(final_start=start), device="cpu")
            seconds = time.perf_counter() - t0
            m = all_metrics(r.chi_ppm, chi, mask)
            row = dict(case=case, start=start, nrmse=round(m["nrmse"], 2), hfen=round(m["hfen"], 2),
                       xsim=round(m["xsim"], 3), alpha=round(r.chosen["alpha"], 5), final_iterations=r.iterations,
                       stop=r.stop_reason, seconds=round(seconds, 1))
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as stream:
                stream.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
