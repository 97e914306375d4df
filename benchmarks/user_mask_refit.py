"""The phase pipeline given the user's mask (here the simulation's true brain mask), with and without the early-echo
refit: PDF's local field and single-step TV from the phase, against single-step TV on the true local field.

The record behind docs/phase-pipeline.md ("A user's mask: the poor edge is not refitted"):

    python benchmarks/user_mask_refit.py [--voxel-size 2] [--snr 100]

With a user's mask nothing is peeled, so edge voxels whose phase is poor stay in it; since 2026-12-06 the refit
leaves them alone. About 2 minutes at 2 mm on 2 CPU cores; run it alone.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "QSMDIP"))

from qsmdip.metrics import hfen, nrmse, xsim  # noqa: E402
from qsmdip.phase.pipeline import PipelineSettings  # noqa: E402
from qsmdip.realistic_acquisition import true_local_field  # noqa: E402
from qsmdip.solvers import get_solver  # noqa: E402
from acquisition_args import acquisition_from_args, add_acquisition_arguments, run_pipeline  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_acquisition_arguments(parser)
    args = parser.parse_args(argv)
    acq = acquisition_from_args(args)
    vs, b0, mask = acq.voxel_size_mm, acq.b0_dir, acq.brain_mask
    single_step = get_solver("single-step-tv")
    print(f"# {vs} mm, B0 {tuple(round(float(b), 3) for b in b0)}, the true brain mask given as the user's; "
          f"NRMSE % / HFEN % / XSIM in it")
    for refit in (False, True):
        pipe = run_pipeline(acq, PipelineSettings(early_echo_refit=refit), mask=mask)
        for note in pipe.notes:
            if "refitted" in note:
                print(f"# {note}")
        chi = single_step(pipe.total_field_ppm, pipe.field_mask, vs, b0_dir=b0).chi_ppm
        local = nrmse(pipe.local_field_ppm, true_local_field(acq, pipe.mask), pipe.mask)
        print(f"early-echo refit {'on' if refit else 'off'}: local field (PDF) {local:.1f}; single-step TV from phase "
              f"{nrmse(chi, acq.chi_ppm, mask):.2f} / {hfen(chi, acq.chi_ppm, mask):.2f} / "
              f"{xsim(chi, acq.chi_ppm, mask):.3f}", flush=True)
    reference = single_step(true_local_field(acq, mask), mask, vs, b0_dir=b0).chi_ppm
    print(f"single-step TV on the noise-free true local field: {nrmse(reference, acq.chi_ppm, mask):.2f} / "
          f"{hfen(reference, acq.chi_ppm, mask):.2f} / {xsim(reference, acq.chi_ppm, mask):.3f}")


if __name__ == "__main__":
    main()
