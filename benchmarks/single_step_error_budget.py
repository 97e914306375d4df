"""What single-step TV from the phase loses to noise, and what to the voxel's own phase, on one mask.

    python benchmarks/single_step_error_budget.py --voxel-size 2
    python benchmarks/single_step_error_budget.py --voxel-size 1 --acquisition noisy.pkl \\
        --noise-free-acquisition twin.pkl --runs true-total+noise,pipeline-noise-free

The acquisition (SNR 100 unless --snr) has a noise-free twin: the same seed, so the same anatomy, offsets and
geometry, without the noise. The default pipeline's total field is then split in two parts:

- the voxel's own phase: the twin's pipeline (its own mask) less the true total field (the voxel mean of the
  fine-grid field), less the median of that (the pipeline's reference constant): partial volumes weighted by
  their signal, dephasing, and whatever the stages add without noise. It is taken as 0 in the few voxels of the
  noisy run's field mask that the twin's lacks;
- the noise: the magnitude-weighted fit over the echoes (through the origin, as the pipeline's) of the phase
  noise itself, the wrapped difference of the two acquisitions' phases: what the noise does to each voxel's
  field, without what it changes in the stages' decisions (offsets, unwrapping, refit, mask).

The two parts do not add up to the pipeline's exactly: the last row is the pipeline itself.

Single-step TV (the default inversion from the phase) then runs on each sum, in the same mask, and is scored
against the true chi in the default chain's returned mask, as dip_from_phase.py scores it. ``true-local`` is the
target's reference (dip_from_phase.py's ``single-step-true``). The noise's part is a lower bound on the
pipeline's noise: in the voxels the pipeline refits from their early echoes its noise is larger. ``--alphas``
runs fixed TV weights, to tell what the weight rule costs from what the data cost.
About 3 minutes at 2 mm for all five runs; at 1 mm 4 to 14 minutes a run, plus 4 to simulate each acquisition
(reuse them with --acquisition and --noise-free-acquisition), 2 cores, alone.
"""
from __future__ import annotations

import argparse
import math
import os
import pickle
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "QSMDIP"))

from qsmdip.metrics import hfen, nrmse, xsim  # noqa: E402
from qsmdip.phase.echo_fit import fit_field, hz_to_ppm  # noqa: E402
from qsmdip.realistic_acquisition import make_realistic_acquisition, true_local_field  # noqa: E402
from qsmdip.solvers import get_solver  # noqa: E402
from qsmdip.solvers.single_step import SingleStepSettings  # noqa: E402
from acquisition_args import (acquisition_from_args, add_acquisition_arguments, chosen_runs,  # noqa: E402
                              run_pipeline)

#: run key -> the label of its row
RUNS = {
    "true-local": "the true local field (no background, no noise; the reference)",
    "true-total": "the true total field (background, no noise)",
    "true-total+noise": "the true total field plus the noise's part",
    "pipeline-noise-free": "the true total field plus the voxel's own phase",
    "pipeline": "the pipeline's total field (both parts; the default)",
}


def _alphas(text: str):
    """Positive weights, or None (the hold-out rule) for 'holdout'."""
    values = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        value = None if item.lower() == "holdout" else float(item)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"a TV weight must be a positive number or 'holdout', got {item!r}")
        values.append(value)
    if not values:
        raise argparse.ArgumentTypeError("give at least one weight or 'holdout'")
    return values


def noise_free_twin(acq, path=None):
    """The acquisition without noise, from ``path`` or simulated with the benchmark's seed; refused if its
    noise-free truth is not the acquisition's (another seed, geometry or simulation)."""
    if path:
        with open(path, "rb") as handle:
            twin = pickle.load(handle)
    else:
        twin = make_realistic_acquisition(voxel_size_mm=acq.voxel_size_mm, b0_dir=acq.b0_dir, snr=None,
                                          b0_tesla=acq.b0_tesla, echo_times_s=acq.echo_times_s)
    same = (twin.snr is None and twin.phase_rad.shape == acq.phase_rad.shape
            and tuple(twin.echo_times_s) == tuple(acq.echo_times_s) and twin.b0_tesla == acq.b0_tesla
            and np.array_equal(twin.total_field_ppm, acq.total_field_ppm)
            and np.array_equal(twin.offset_rad, acq.offset_rad))
    if not same:
        raise SystemExit("error: the noise-free acquisition is not the same simulation without noise")
    return twin


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_acquisition_arguments(parser)
    parser.add_argument("--noise-free-acquisition", help="a pickled noise-free twin (else it is simulated)")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {','.join(RUNS)}")
    parser.add_argument("--alphas", type=_alphas, default=[None],
                        help="comma-separated TV weights (relative to the high-passed field's RMS) to run each field "
                             "at, or 'holdout' for the default rule (default: holdout)")
    args = parser.parse_args(argv)
    chosen = chosen_runs(parser, args.runs, RUNS)
    acq = acquisition_from_args(args)
    if acq.snr is None:
        parser.error("the acquisition has no noise: there is nothing to split")
    twin = noise_free_twin(acq, args.noise_free_acquisition)
    vs, b0 = acq.voxel_size_mm, acq.b0_dir
    pipe = run_pipeline(acq)
    field_mask = pipe.field_mask
    twin_pipe = run_pipeline(twin)
    true_total = np.where(field_mask, acq.total_field_ppm, 0.0)
    # the pipeline references its total field to the median in its mask: take that constant out before the
    # voxels the twin's mask lacks are set to 0, or they would stand out by it (about 150 ppb)
    both = field_mask & twin_pipe.field_mask
    own = twin_pipe.total_field_ppm - acq.total_field_ppm.astype(np.float64)
    own_phase = np.where(both, own - np.median(own[both]), 0.0)
    phase_noise = np.angle(np.exp(1j * (acq.phase_rad.astype(np.float64) - twin.phase_rad)))
    noise_hz = fit_field(phase_noise, acq.magnitude, acq.echo_times_s, field_mask).field_hz
    noise = np.where(field_mask, hz_to_ppm(noise_hz, acq.b0_tesla), 0.0)
    fields = {
        "true-local": lambda: true_local_field(acq, field_mask),
        "true-total": lambda: true_total,
        "true-total+noise": lambda: true_total + noise,
        "pipeline-noise-free": lambda: true_total + own_phase,
        "pipeline": lambda: pipe.total_field_ppm,
    }
    mask = pipe.mask
    print(f"# voxel {vs} mm, B0 {tuple(round(float(b), 3) for b in b0)}, SNR {acq.snr:g}; in the field mask "
          f"({int(field_mask.sum())} voxels) the noise's part is {1e3 * np.sqrt(np.mean(noise[field_mask] ** 2)):.2f} "
          f"ppb RMS, the voxel's own phase {1e3 * np.std(own_phase[both]):.2f} ppb RMS about its median; "
          f"{int((field_mask & ~both).sum())} voxels not in the twin's field mask")
    print("# single-step TV on ...: NRMSE % / HFEN % / XSIM in the returned mask")
    for key in chosen:
        field = np.asarray(fields[key](), dtype=np.float32)   # once for all weights (1 mm true-local: a minute)
        for alpha in args.alphas:
            start = time.perf_counter()
            result = get_solver("single-step-tv")(field, field_mask, vs, b0_dir=b0,
                                                  settings=SingleStepSettings(alpha=alpha))
            chi = result.chi_ppm
            print(f"{RUNS[key]}: {nrmse(chi, acq.chi_ppm, mask):.2f} / {hfen(chi, acq.chi_ppm, mask):.2f} / "
                  f"{xsim(chi, acq.chi_ppm, mask):.3f}, weight {result.chosen['alpha']:.3g} "
                  f"({result.chosen['alpha_rule']}), {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
