"""Benchmark: multi-echo phase -> local field -> QSM on the simulated whole-head acquisition.

For each voxel size and B0 tilt it simulates the acquisition (``qsmdip.realistic_acquisition``), runs the
textbook chain (Laplacian unwrapping, linear fit with intercept, V-SHARP, on the magnitude mask) and our
chain with each background method, and reports per stage the seconds, and at the end:

- the local field's NRMSE in the returned mask, against the field of the sources inside that mask
  (``true_local_field``);
- the share of the true brain the returned mask keeps;
- optionally (``--qsm``) the TV map from that local field and TV on the true local field in the same mask,
  and single-step TV (its default data term, Huber since 2026-12-05; ``--single-step-radii``) from the chain's total field, chi on its whole mask,
  each scored against the true chi in that mask.

    python benchmarks/phase_pipeline.py --voxels 2 --tilts 0,20 --qsm --out docs/results/phase-pipeline-2mm

Run it alone on the machine: the seconds are meant to be compared.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "QSMDIP"))

from qsmdip.metrics import all_metrics, nrmse  # noqa: E402
from qsmdip.phase.pipeline import TEXTBOOK, PipelineSettings  # noqa: E402
from qsmdip.phase.single_step import single_step_tv  # noqa: E402
from qsmdip.realistic_acquisition import make_realistic_acquisition, true_local_field  # noqa: E402
from qsmdip.solvers import get_solver  # noqa: E402
from acquisition_args import run_pipeline  # noqa: E402

CHAINS = {
    "textbook (Laplacian, linear fit, V-SHARP)": dict(**TEXTBOOK, refine_mask=False, mask_erosion_voxels=0),
    "textbook stages on our mask": dict(**TEXTBOOK),
    "ours, PDF": dict(background="pdf"),
    "ours, V-SHARP": dict(background="vsharp"),
}


def tilted(degrees: float):
    t = math.radians(degrees)
    return (0.0, math.sin(t), math.cos(t))


def run_case(voxel: float, tilt: float, snr: float, with_qsm: bool, single_step_radii=None) -> dict:
    started = time.perf_counter()
    acq = make_realistic_acquisition(voxel_size_mm=(voxel,) * 3, b0_dir=tilted(tilt), snr=snr)
    case = {"voxel_mm": voxel, "tilt_deg": tilt, "snr": snr, "shape": list(acq.shape),
            "simulation_s": round(time.perf_counter() - started, 1), "chains": {}}
    print(f"\n## {voxel:g} mm, B0 tilt {tilt:g} deg, SNR {snr:g}: {acq.shape}, simulated in {case['simulation_s']} s",
          flush=True)
    tv = get_solver("tv")
    for name, settings in CHAINS.items():
        started = time.perf_counter()
        result = run_pipeline(acq, PipelineSettings(**settings))
        seconds = time.perf_counter() - started
        truth = true_local_field(acq, result.mask)
        row = {
            "stage_seconds": {k: round(v, 2) for k, v in result.seconds.items()},
            "seconds": round(seconds, 1),
            "local_field_nrmse": round(nrmse(result.local_field_ppm, truth, result.mask), 1),
            "brain_kept": round(float((result.mask & acq.brain_mask).sum() / acq.brain_mask.sum()), 3),
            "mask_outside_brain": round(float((result.mask & ~acq.brain_mask).sum() / result.mask.sum()), 3),
        }
        if with_qsm:
            evaluate = result.mask
            started = time.perf_counter()
            from_phase = tv(result.local_field_ppm, result.mask, acq.voxel_size_mm, b0_dir=acq.b0_dir).chi_ppm
            row["tv_s"] = round(time.perf_counter() - started, 1)
            on_truth = tv(truth, result.mask, acq.voxel_size_mm, b0_dir=acq.b0_dir).chi_ppm
            pick = ("nrmse", "hfen", "xsim")
            row["qsm_from_phase"] = {k: round(v, 3) for k, v in all_metrics(from_phase, acq.chi_ppm, evaluate).items() if k in pick}
            row["qsm_on_true_local"] = {k: round(v, 3) for k, v in all_metrics(on_truth, acq.chi_ppm, evaluate).items() if k in pick}
            row["qsm_ratio"] = round(row["qsm_from_phase"]["nrmse"] / row["qsm_on_true_local"]["nrmse"], 2)
            # single-step TV (default data term) from the same total field and mask, chi kept on the whole mask
            started = time.perf_counter()
            single = single_step_tv(result.total_field_ppm, result.field_mask, acq.voxel_size_mm, b0_dir=acq.b0_dir,
                                    radii_mm=single_step_radii, output_radius_mm=0.0).chi_ppm
            row["single_step_s"] = round(time.perf_counter() - started, 1)
            row["qsm_single_step"] = {k: round(v, 3) for k, v in all_metrics(single, acq.chi_ppm, evaluate).items() if k in pick}
            row["qsm_single_step_ratio"] = round(row["qsm_single_step"]["nrmse"] / row["qsm_on_true_local"]["nrmse"], 2)
        case["chains"][name] = row
        print(f"- {name}: {json.dumps(row)}", flush=True)
    textbook = case["chains"][next(iter(CHAINS))]["local_field_nrmse"]
    for name, row in case["chains"].items():
        row["local_vs_textbook"] = round(row["local_field_nrmse"] / textbook, 2)
    return case


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--voxels", default="2", help="voxel sizes in mm, comma-separated")
    parser.add_argument("--tilts", default="0,20", help="B0 tilts in degrees, comma-separated")
    parser.add_argument("--snr", type=float, default=100.0)
    parser.add_argument("--qsm", action="store_true", help="also invert with TV (slow at 1 mm)")
    parser.add_argument("--single-step-radii", default=None,
                        help="SMV radii (mm, comma-separated) of the single-step TV rows that --qsm adds; "
                             "default: the solver's")
    parser.add_argument("--out", default=None, help="write OUT.json")
    args = parser.parse_args()
    radii = None if args.single_step_radii is None else tuple(float(r) for r in args.single_step_radii.split(","))
    cases = [run_case(float(v), float(t), args.snr, args.qsm, radii)
             for v in args.voxels.split(",") for t in args.tilts.split(",")]
    if args.out:
        Path(args.out).with_suffix(".json").write_text(json.dumps(cases, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
