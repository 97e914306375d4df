"""DIP design experiments: run named setting variants on the head phantom and print quality against time.

Not a test, and not the benchmark (``benchmark.py`` compares the shipped presets with the baselines).
This is the record of how the default preset was chosen (docs/dip-experiments.md): each variant is a set
of overrides of the 'default' preset; the truth scores snapshots only.

    python benchmarks/dip_experiments.py --voxel 2 --iterations 1500 --variants plain_l2,hybrid,hybrid_beta9
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
from qsmdip.metrics import nrmse, xsim  # noqa: E402
from qsmdip.phantom import make_head_phantom  # noqa: E402
from qsmdip.solvers import get_solver, make_settings  # noqa: E402

#: The 'default' preset as it stood when the logged sweeps ran (docs/results/gpu-variants-*.log): the
#: sweep variants below override this, not today's default, so that they reproduce the logged figures.
SWEEP_BASE = dict(betas=(0.5, 0.999), mixed_precision=False, holdout_fraction=0.0)

#: variant name -> overrides of the 'default' DIP preset
SWEEP_VARIANTS = {
    "original_noise": dict(input="noise", data_loss="l1", regulariser="laplacian", reg_weight=1e-3, base="none"),
    "plain_l2": dict(input="noise", data_loss="l2", regulariser="none", base="none"),
    "l2_tv": dict(input="noise", data_loss="l2", regulariser="tv", reg_weight=0.07, base="none"),
    "l2_tv_half": dict(input="noise", data_loss="l2", regulariser="tv", reg_weight=0.035, base="none"),
    "tikbase_l2_tv": dict(input="noise", data_loss="l2", regulariser="tv", reg_weight=0.07, base="tikhonov"),
    "tvbase_l2_tv": dict(input="noise", data_loss="l2", regulariser="tv", reg_weight=0.07, base="tv"),
    "tvbase_l2_tvhalf": dict(input="noise", data_loss="l2", regulariser="tv", reg_weight=0.035, base="tv"),
    "tvbase_l2": dict(input="noise", data_loss="l2", regulariser="none", base="tv"),
    "tvbase_in_l2_tv": dict(input="base", data_loss="l2", regulariser="tv", reg_weight=0.07, base="tv"),
    "l2_tv_lr3": dict(input="noise", data_loss="l2", regulariser="tv", reg_weight=0.07, base="none",
                      learning_rate=3e-3),
    "l2_tv_jit": dict(input="noise", data_loss="l2", regulariser="tv", reg_weight=0.07, base="none",
                      input_jitter=0.05),
    # the hybrid (TV-ADMM estimate + network correction, L2 data, no penalty) and its neighbours
    "hybrid": dict(input="noise", data_loss="l2", regulariser="none", base="tv"),
    "hybrid_lr3": dict(input="noise", data_loss="l2", regulariser="none", base="tv", learning_rate=3e-3),
    "hybrid_lr3e4": dict(input="noise", data_loss="l2", regulariser="none", base="tv", learning_rate=3e-4),
    "hybrid_w8": dict(input="noise", data_loss="l2", regulariser="none", base="tv", width=8),
    "hybrid_d4": dict(input="noise", data_loss="l2", regulariser="none", base="tv", depth=4),
    "hybrid_ema": dict(input="noise", data_loss="l2", regulariser="none", base="tv", ema=0.95),
    "hybrid_l1": dict(input="noise", data_loss="l1", regulariser="none", base="tv"),
    "hybrid_bf16": dict(input="noise", data_loss="l2", regulariser="none", base="tv", mixed_precision=True),
    "hybrid_beta9": dict(input="noise", data_loss="l2", regulariser="none", base="tv", betas=(0.9, 0.999)),
    "hybrid_field": dict(input="field", data_loss="l2", regulariser="none", base="tv"),
    "hybrid_tik": dict(input="noise", data_loss="l2", regulariser="none", base="tikhonov"),
}
VARIANTS = {name: dict(SWEEP_BASE, **overrides) for name, overrides in SWEEP_VARIANTS.items()}
VARIANTS.update({
    # the shipped presets as they are
    "default": dict(),
    "fast": dict(width=8),
    "fp32": dict(mixed_precision=False),
    "no_holdout": dict(holdout_fraction=0.0),
})


def run(phantom, name, overrides, iterations, every, device):
    settings = make_settings("dip", "default", dict(overrides, iterations=iterations))
    rows, paused = [], [0.0]

    def callback(p):
        t0 = time.perf_counter()
        rows.append(dict(it=p.iteration, t=p.elapsed_s - paused[0], loss=p.loss,
                         nrmse=nrmse(p.chi_ppm, phantom.chi_ppm, phantom.mask),
                         xsim=xsim(p.chi_ppm, phantom.chi_ppm, phantom.mask)))
        paused[0] += time.perf_counter() - t0

    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = get_solver("dip")(phantom.field_ppm, phantom.mask, phantom.voxel_size_mm, b0_dir=phantom.b0_dir,
                               settings=settings, callback=callback, callback_every=every, device=device)
    best = min(rows, key=lambda r: r["nrmse"])
    last = rows[-1]
    final_nrmse, final_xsim = (nrmse(result.chi_ppm, phantom.chi_ppm, phantom.mask),
                               xsim(result.chi_ppm, phantom.chi_ppm, phantom.mask))
    print(f"{name:<20} result {final_nrmse:6.2f} % {final_xsim:.3f} ({result.stop_reason} @{result.iterations}) | "
          f"last {last['nrmse']:6.2f} % {last['xsim']:.3f} @{last['it']} {last['t']:6.1f}s | "
          f"best {best['nrmse']:6.2f} % {best['xsim']:.3f} @{best['it']} {best['t']:6.1f}s | {result.device}"
          + (f" peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if torch.cuda.is_available() else ""),
          flush=True)
    return dict(name=name, overrides=overrides, rows=rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--voxel", type=float, default=2.0)
    parser.add_argument("--tilt", type=float, default=0.0, help="B0 tilt about i, degrees")
    parser.add_argument("--snr", type=float, default=200.0)
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--set", action="append", default=[], help="NAME=JSON applied to every variant")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    common = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    b0 = b0_tilted_about_i(args.tilt)
    phantom = make_head_phantom(None, (args.voxel,) * 3, b0_dir=b0, snr=args.snr, seed=0)
    print(f"phantom {args.voxel} mm {phantom.chi_ppm.shape} tilt {args.tilt}; common {common}", flush=True)
    out = [run(phantom, n, dict(VARIANTS[n], **common), args.iterations, args.every, args.device)
           for n in args.variants.split(",")]
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(out, handle)


if __name__ == "__main__":
    main()
