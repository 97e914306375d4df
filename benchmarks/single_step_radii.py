"""Single-step TV from phase with different SMV radii: the screen behind ``SingleStepSettings.radii_mm``.

    python benchmarks/single_step_radii.py --voxel-size 3 --radii "4.5;6;12;4.5,6,12" [--alpha 0.071]
    python benchmarks/single_step_radii.py --voxel-size 4 --radii "6;6,12;4,8,12"

Each set of radii (";" between sets, "," within one; "default" for the solver's) inverts the default phase
pipeline's total field of a simulated realistic acquisition (SNR 100, seed 2), with the weight chosen by the
hold-out rule unless ``--alpha`` fixes it, and is scored against the true chi in the pipeline's mask. Seconds at
3 and 4 mm; run the 2 mm case (``docs/results/single-step-radii-2mm.log``) with dip_from_phase.py.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "QSMDIP"))

from qsmdip.metrics import hfen, nrmse, xsim  # noqa: E402
from qsmdip.phase.single_step import single_step_tv  # noqa: E402
from qsmdip.realistic_acquisition import make_realistic_acquisition  # noqa: E402
from acquisition_args import run_pipeline  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voxel-size", type=float, default=3.0)
    parser.add_argument("--radii", default="default", help='sets of radii in mm: "4.5;6;4.5,6,12" or "default"')
    parser.add_argument("--alpha", type=float, default=None, help="fixed TV weight (default: the hold-out rule)")
    args = parser.parse_args(argv)
    acq = make_realistic_acquisition(voxel_size_mm=(args.voxel_size,) * 3, snr=100.0, seed=2)
    pipe = run_pipeline(acq)
    print(f"# {args.voxel_size:g} mm, SNR 100, seed 2; weight {args.alpha or 'by hold-out'}; "
          "NRMSE % / HFEN % / XSIM in the pipeline's mask")
    for text in args.radii.split(";"):
        radii = None if text.strip() == "default" else tuple(float(r) for r in text.split(","))
        started = time.perf_counter()
        result = single_step_tv(pipe.total_field_ppm, pipe.field_mask, acq.voxel_size_mm, b0_dir=acq.b0_dir,
                                radii_mm=radii, alpha=args.alpha, output_radius_mm=0.0)
        chi = result.chi_ppm
        used = result.notes[0].split(" mm")[0].replace("SMV high-pass of radii ", "")
        print(f"radii {used} mm: {nrmse(chi, acq.chi_ppm, pipe.mask):.2f} / {hfen(chi, acq.chi_ppm, pipe.mask):.2f} / "
              f"{xsim(chi, acq.chi_ppm, pipe.mask):.3f}, weight {result.alpha:.3g}, "
              f"{time.perf_counter() - started:.1f} s", flush=True)


if __name__ == "__main__":
    main()
