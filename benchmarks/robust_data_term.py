"""What the measured field's own errors cost the QSM from phase, and what an l1 data term wins back.

Three parts, on one simulated 3 T acquisition of the realistic head (as phase_pipeline.py makes it):

1. the noise floor: TV on the true local field, and on the true local field plus the pipeline's own field
   error (what V-SHARP keeps of pipeline total field - exact total field), both in the same mask. The second
   is what a perfect background removal would give on this measurement;
2. where that error is: the share of its energy (after a 4 mm SMV high-pass, which removes its harmonic part)
   held by the voxels where it exceeds 4 ppb;
3. single-step TV (SMV radius 4 and 8 mm) with the least-squares and the l1 data term, weights chosen by the
   hold-out rule, on the pipeline's total field and on the exact (noise-free) one, against TV on the true
   local field in the same eroded mask.

The record behind docs/results/background-removal.md ("The measured field's errors, and an l1 data term"):

    python benchmarks/robust_data_term.py --voxel-size 2 [--acquisition acq.pkl]

About 10 minutes at 2 mm on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "QSMDIP"))

from qsmdip.metrics import nrmse, xsim  # noqa: E402
from qsmdip.phase.background import remove_background_smv, remove_background_vsharp  # noqa: E402
from qsmdip.phase.single_step import single_step_tv  # noqa: E402
from qsmdip.realistic_acquisition import true_local_field  # noqa: E402
from acquisition_args import acquisition_from_args, add_acquisition_arguments, run_pipeline  # noqa: E402
from qsmdip.solvers import get_solver  # noqa: E402


def _rms(values: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(values, dtype=np.float64))))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_acquisition_arguments(parser)
    args = parser.parse_args(argv)
    acq = acquisition_from_args(args)
    vs, b0 = acq.voxel_size_mm, acq.b0_dir
    tv = get_solver("tv")
    pipe = run_pipeline(acq)
    field_mask = pipe.field_mask
    exact_total = np.where(field_mask, acq.total_field_ppm, 0.0)
    print(f"# voxel {vs} mm, B0 {tuple(round(float(b), 3) for b in b0)}, SNR {acq.snr}", flush=True)

    # 1. the noise floor
    measured = remove_background_vsharp(pipe.total_field_ppm, field_mask, vs, b0_dir=b0)
    exact = remove_background_vsharp(exact_total, field_mask, vs, b0_dir=b0)
    mask = measured.mask & exact.mask
    error = np.where(mask, measured.local_field_ppm - exact.local_field_ppm, 0.0)
    local = true_local_field(acq, mask)
    clean = tv(local, mask, vs, b0_dir=b0).chi_ppm
    noisy = tv(np.where(mask, local + error, 0.0), mask, vs, b0_dir=b0).chi_ppm
    a, b = nrmse(clean, acq.chi_ppm, mask), nrmse(noisy, acq.chi_ppm, mask)
    print(f"noise floor: field error kept by V-SHARP {1000 * _rms(error[mask]):.2f} ppb RMS against a local field "
          f"of {1000 * _rms(local[mask]):.2f} ppb; TV on the true local field {a:.2f} %, on it plus that error "
          f"{b:.2f} % (= {b / a:.2f}x), XSIM {xsim(clean, acq.chi_ppm, mask):.3f} / {xsim(noisy, acq.chi_ppm, mask):.3f}",
          flush=True)

    # 2. where the error is
    high = remove_background_smv(np.where(field_mask, pipe.total_field_ppm - acq.total_field_ppm, 0.0),
                                 field_mask, vs, b0_dir=b0, radius_mm=4.0)
    inner = high.local_field_ppm[high.mask]
    big = np.abs(inner) > 0.004
    print(f"error after a 4 mm high-pass: {1000 * _rms(inner):.2f} ppb RMS; {int(big.sum())} voxels "
          f"({100 * big.mean():.2f} % of the valid mask) above 4 ppb hold {100 * np.sum(inner[big] ** 2) / np.sum(inner ** 2):.0f} % "
          f"of its energy; median chi there {float(np.median(acq.chi_ppm[high.mask][big])):.3f} ppm", flush=True)

    # 3. single-step TV, l2 against l1
    print("| SMV radius | field | data term | NRMSE % | / TV on true local | ratio | XSIM | weight | mask kept | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for radius in (4.0, 8.0):
        reference = None
        for name, total in (("pipeline", pipe.total_field_ppm), ("exact", exact_total)):
            for term in ("l2", "l1"):
                start = time.perf_counter()
                result = single_step_tv(total, field_mask, vs, b0_dir=b0, radii_mm=(radius,), data_term=term)
                seconds = time.perf_counter() - start
                if reference is None:
                    reference = nrmse(tv(true_local_field(acq, result.mask), result.mask, vs, b0_dir=b0).chi_ppm,
                                      acq.chi_ppm, result.mask)
                ours = nrmse(result.chi_ppm, acq.chi_ppm, result.mask)
                print(f"| {radius:g} mm | {name} | {term} | {ours:.2f} | {reference:.2f} | {ours / reference:.2f} | "
                      f"{xsim(result.chi_ppm, acq.chi_ppm, result.mask):.3f} | {result.alpha:.3g} | "
                      f"{result.mask.sum() / field_mask.sum():.3f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
