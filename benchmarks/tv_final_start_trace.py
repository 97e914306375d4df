"""TV's automatic weight: one search, then the final solve from the search's state ("warm") and from zero
("cold"), both run past the tolerance, with NRMSE and the objective at chosen iterations. Which start gets
nearer TV's minimiser, and which gives the better map?

    python benchmarks/tv_final_start_trace.py --voxel 1 --marks 10,25,50,75,100,127,150,200

Prints one JSON line per mark (the committed record is docs/results/tv-final-start-1mm-trace.jsonl; 2 cores,
alone). It drives the solver's internals (the search and the ADMM loop), so it may need updating with them.
The truth only scores.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "QSMDIP"))

from qsmdip.geometry import b0_tilted_about_i  # noqa: E402
from qsmdip.metrics import nrmse  # noqa: E402
from qsmdip.realistic_phantom import make_realistic_phantom  # noqa: E402
from qsmdip.solvers.base import check_inputs, crop_to_mask  # noqa: E402
from qsmdip.solvers.tv import TVSettings, _final_alpha, _relative_change, _TVProblem, choose_alpha  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voxel", type=float, default=1.0, help="isotropic voxel size (mm)")
    parser.add_argument("--tilt", type=float, default=0.0, help="B0 tilt about the i axis (degrees)")
    parser.add_argument("--supersample", type=int, default=None,
                        help="phantom simulation voxels per voxel and axis (default 2; the 2026-12-04 record used 1, "
                             "then the default below 2 mm)")
    parser.add_argument("--marks", default="10,25,50,75,100,127,150,200", help="iterations to score")
    args = parser.parse_args()
    marks = sorted(int(m) for m in args.marks.split(","))

    phantom = make_realistic_phantom(None, (args.voxel,) * 3, snr=100, seed=0, b0_dir=b0_tilted_about_i(args.tilt),
                                     supersampling=args.supersample)
    field32, mask = check_inputs(phantom.field_ppm, phantom.mask)
    crop = crop_to_mask(field32, mask)
    scale = crop.field_scale()
    settings, device = TVSettings(), torch.device("cpu")
    start = time.time()
    with torch.no_grad():
        problem = _TVProblem(crop.field_ppm / scale, crop.mask, phantom.voxel_size_mm, phantom.b0_dir,
                             settings.pad_factor, device)
        choice, warm_state = choose_alpha(problem, settings, device)
        alpha = _final_alpha(choice.chosen, settings)
        mu1 = settings.gradient_penalty(alpha)
        print(json.dumps(dict(voxel=args.voxel, tilt=args.tilt, alpha=alpha, search_s=round(time.time() - start, 1))),
              flush=True)
        for name, state in (("warm", warm_state), ("cold", problem.initial_state(mu1))):
            last = {"chi": None, "met": None}

            def on_iteration(iteration, loss, chi_box):
                change = None if last["chi"] is None else _relative_change(chi_box, last["chi"])
                last["chi"] = chi_box
                if change is not None and change < settings.tolerance and last["met"] is None:
                    last["met"] = iteration
                if iteration in marks or last["met"] == iteration:
                    error = nrmse(crop.paste((chi_box * scale).cpu().numpy()), phantom.chi_ppm, phantom.mask)
                    print(json.dumps(dict(start=name, it=iteration, nrmse=round(error, 2), loss=float(loss),
                                          change=change, tol_hit=last["met"] == iteration)), flush=True)
                return None

            problem.run(state, alpha, mu1, float(settings.mu2), marks[-1], problem.mask_pad, on_iteration,
                        data_term=settings.data_term)


if __name__ == "__main__":
    main()
