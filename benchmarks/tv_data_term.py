"""TV-ADMM's data term on the local-field phantoms: l2 (TV's default), l1 and Huber, each with its weight chosen
by the hold-out rule. The record behind docs/dip-experiments.md ("A Huber data term for TV").

    python benchmarks/tv_data_term.py [--huber-deltas 0.1,0.3]
    python benchmarks/tv_data_term.py --one-mm        # the realistic phantom at 1 mm only (about 20 minutes)
    python benchmarks/tv_data_term.py --one-mm --tilt 20 --terms huber --alphas 0.071,0.1,0.14,0.2
                                                      # fixed weights, cold start: the oracle sweep at 1 mm

Cases: the realistic phantom at 2 mm (axial and B0 at 20 degrees) and 3 mm, SNR 100, and the simple phantom at
3 mm, field SNR 200, as benchmark.py builds them. About 2 minutes on 2 CPU cores; run it alone.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "QSMDIP"))

from qsmdip.geometry import b0_tilted_about_i  # noqa: E402
from qsmdip.metrics import hfen, nrmse, xsim  # noqa: E402
from qsmdip.phantom import make_head_phantom  # noqa: E402
from qsmdip.realistic_phantom import make_realistic_phantom  # noqa: E402
from qsmdip.solvers.tv import TVSettings, solve_tv  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--huber-deltas", default="0.1", help="Huber switch points, relative to the field's RMS")
    parser.add_argument("--one-mm", action="store_true", help="only the realistic phantom at 1 mm, axial")
    parser.add_argument("--terms", default="l2,l1,huber", help="data terms to run (comma-separated)")
    parser.add_argument("--alphas", default="", help="fixed weights to solve at instead of the hold-out choice "
                        "(comma-separated; each solve starts cold, as a given weight does)")
    parser.add_argument("--tilt", type=float, default=0.0, help="B0 tilt in degrees for --one-mm")
    args = parser.parse_args(argv)
    if args.tilt and not args.one_mm:
        parser.error("--tilt applies to --one-mm only (the default cases fix their own B0)")
    wanted = [t.strip() for t in args.terms.split(",") if t.strip()]
    terms = [{"data_term": t} for t in ("l2", "l1") if t in wanted] + [
        {"data_term": "huber", "huber_delta": float(d)} for d in args.huber_deltas.split(",")
        if d.strip() and "huber" in wanted]
    cases = {
        "realistic 2 mm axial": lambda: make_realistic_phantom(None, (2.0,) * 3, snr=100, seed=0),
        "realistic 2 mm, 20 deg": lambda: make_realistic_phantom(None, (2.0,) * 3, snr=100, seed=0,
                                                                 b0_dir=b0_tilted_about_i(20)),
        "realistic 3 mm axial": lambda: make_realistic_phantom(None, (3.0,) * 3, snr=100, seed=0),
        "simple 3 mm axial": lambda: make_head_phantom(None, (3.0,) * 3, snr=200, seed=0),
    }
    if args.one_mm:
        cases = {f"realistic 1 mm, {args.tilt:g} deg": lambda: make_realistic_phantom(
            None, (1.0,) * 3, snr=100, seed=0, b0_dir=b0_tilted_about_i(args.tilt))}
    alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
    if alphas:
        terms = [dict(term, alpha=alpha) for term in terms for alpha in alphas]
    print("# TV-ADMM, weight " + ("fixed, cold start" if alphas else "by hold-out") +
          "; NRMSE % / HFEN % / XSIM in the mask")
    for name, build in cases.items():
        ph = build()
        for term in terms:
            started = time.perf_counter()
            result = solve_tv(ph.field_ppm, ph.mask, ph.voxel_size_mm, b0_dir=ph.b0_dir,
                              settings=TVSettings(**term), device="cpu")
            chi = result.chi_ppm
            label = term["data_term"] + (f" {term['huber_delta']:g}" if "huber_delta" in term else "")
            print(f"{name}, {label}: {nrmse(chi, ph.chi_ppm, ph.mask):.2f} / {hfen(chi, ph.chi_ppm, ph.mask):.2f} / "
                  f"{xsim(chi, ph.chi_ppm, ph.mask):.3f}, alpha {result.chosen['alpha']:.3g}"
                  + (f" (switch {result.chosen['huber_delta']:.3g})" if "huber_delta" in result.chosen else "") + ", "
                  f"{time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
