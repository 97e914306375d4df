"""Benchmark: every method on the realistic and the simple head phantom, and DIP's quality against wall time.

Not a test. Runs in one process so that ratios between methods are fair on a noisy machine, and needs no
files (phantoms are made in memory), so it runs as is on a lent GPU machine.

    python benchmarks/benchmark.py                     # both phantoms, 2 mm and 1 mm, axial and oblique
    python benchmarks/benchmark.py --phantoms realistic --voxels 2 --tilts 0 --device cpu
    python benchmarks/benchmark.py --json results.json # also write every figure as JSON

For each phantom it prints each method's NRMSE %, HFEN %, XSIM, seconds and peak memory: TKD, Tikhonov and
TV-ADMM (least squares, and with a Huber data term) with their truth-free automatic weights and at the best weight
of a sweep (chosen against the truth:
an oracle that flatters the baselines), then each DIP preset as shipped, with and without the GRE magnitude
(realistic phantom), with its NRMSE and XSIM at fixed wall times and the oracle-best iterate beside the one
it returned. The truth scores results only; no setting, weight choice or stopping rule reads it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "QSMDIP"))

import torch  # noqa: E402

from qsmdip.device import resolve_device  # noqa: E402
from qsmdip.geometry import b0_tilted_about_i  # noqa: E402
from qsmdip.metrics import all_metrics, nrmse, xsim  # noqa: E402
from qsmdip.phantom import make_head_phantom  # noqa: E402
from qsmdip.realistic_phantom import PHANTOM_SUPERSAMPLING, make_realistic_phantom  # noqa: E402
from qsmdip.solvers import get_solver, make_settings, settings_class  # noqa: E402

CHECKPOINTS_S = (10, 30, 60, 120, 300, 600, 1200)


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak on a GPU, sampled resident set size on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb = float("nan")

    @staticmethod
    def _rss_mb() -> float:
        try:
            with open("/proc/self/statm") as handle:
                return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
        except OSError:
            return float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self._rss_mb()
            self.max_rss = self.base
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.max_rss = max(self.max_rss, self._rss_mb())
            time.sleep(0.02)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self.base) / 2 ** 20
        else:
            self.running = False
            self.thread.join()
            self.peak_mb = self.max_rss - self.base
        return False


def run_method(method, phantom, device, overrides=None, *, preset=None, trace=False, every=5, label=None,
               magnitude=None):
    """Solve once; with ``trace``, score snapshots against the truth (timer paused while scoring)."""
    settings = make_settings(method, preset, dict(overrides or {}))
    curve, state = [], {"scoring_s": 0.0}

    def callback(p):
        if not trace:
            return None
        t0 = time.perf_counter()
        solver_s = p.elapsed_s - state["scoring_s"]
        curve.append((p.iteration, solver_s, nrmse(p.chi_ppm, phantom.chi_ppm, phantom.mask),
                      xsim(p.chi_ppm, phantom.chi_ppm, phantom.mask)))
        state["scoring_s"] += time.perf_counter() - t0
        return None

    with PeakMemory(device) as mem:
        start = time.perf_counter()
        result = get_solver(method)(phantom.field_ppm, phantom.mask, phantom.voxel_size_mm, b0_dir=phantom.b0_dir,
                                    settings=settings, callback=callback, callback_every=every, device=str(device),
                                    magnitude=magnitude)
        seconds = time.perf_counter() - start - state["scoring_s"]
    metrics = all_metrics(result.chi_ppm, phantom.chi_ppm, phantom.mask)
    return dict(method=label or method, seconds=seconds, peak_mb=mem.peak_mb, iterations=result.iterations,
                stop_reason=result.stop_reason, metrics=metrics, curve=curve, device=result.device,
                settings=dict(overrides or {}, **{k: v for k, v in result.chosen.items() if k in ("alpha", "lambda_")}))


def sweep(method, name, values, phantom, device, fixed=None, label=None):
    """Run ``method`` once per weight (its default weight included); return (default run, best run).

    The best is chosen by NRMSE against the truth, an oracle no user has: it flatters the baselines,
    which is the fair direction for a comparison that DIP must win.
    """
    default_value = getattr(settings_class(method)(), name)  # None: the method chooses it from the data
    runs = {v: run_method(method, phantom, device, dict(fixed or {}, **{name: v}))
            for v in sorted(set(values) | {default_value}, key=lambda v: (v is not None, v or 0.0))}
    best = min(runs.values(), key=lambda r: r["metrics"]["nrmse"])
    label = label or method
    return dict(runs[default_value], method=label), dict(best, method=f"{label} best")


def quality_at(curve, seconds):
    """NRMSE and XSIM of the last snapshot taken within ``seconds`` of solver time (None if none)."""
    within = [c for c in curve if c[1] <= seconds]
    return (within[-1][2], within[-1][3], within[-1][0]) if within else None


TIKHONOV_LAMBDAS = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
TV_ALPHAS = (0.00625, 0.0125, 0.0177, 0.025, 0.035, 0.05)   # relative to the field RMS (scale-free)
#: TV with a Huber data term weighs TV against r^2 / (2 delta), about 1 / delta (10x) least squares' weights
HUBER_TV_ALPHAS = (0.035, 0.05, 0.071, 0.1, 0.14, 0.2)
DEFAULT_SNR = {"realistic": 100.0, "simple": 200.0}        # realistic: GRE magnitude SNR; simple: field SNR


def print_rows(rows):
    print(f"{'method':<16}{'NRMSE %':>9}{'HFEN %':>9}{'XSIM':>8}{'seconds':>10}{'peak MB':>10}{'iters':>7}  settings")
    for r in rows:
        m = r["metrics"]
        print(f"{r['method']:<16}{m['nrmse']:>9.2f}{m['hfen']:>9.2f}{m['xsim']:>8.3f}{r['seconds']:>10.1f}"
              f"{r['peak_mb']:>10.0f}{r['iterations']:>7}  {r['settings'] or ''}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--voxels", type=float, nargs="+", default=[2.0, 1.0], help="phantom voxel sizes in mm")
    parser.add_argument("--tilts", type=float, nargs="+", default=[0.0, 20.0],
                        help="B0 tilts about the i axis in degrees (0 = axial)")
    parser.add_argument("--phantoms", default="realistic,simple", help="realistic, simple or both (comma-separated)")
    parser.add_argument("--snr", type=float, default=None,
                        help="noise; default 100 for the realistic phantom (GRE magnitude SNR, typical of 3 T) "
                             "and 200 for the simple one (field SNR)")
    parser.add_argument("--supersample", type=int, default=PHANTOM_SUPERSAMPLING,
                        help="realistic phantom: simulation voxels per voxel and axis (default %(default)s; 1 "
                             "point-samples, as the phantom did below 2 mm before 2026-12-04)")
    parser.add_argument("--no-sweeps", action="store_true", help="skip the oracle weight sweeps")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--presets", default="default",
                        help="DIP presets to run, comma-separated; 'none' runs the classical methods only")
    parser.add_argument("--tv-iterations", type=int, default=None, help="TV-ADMM iteration cap (default: its own)")
    parser.add_argument("--tv-alphas", type=float, nargs="+", default=list(TV_ALPHAS),
                        help="relative TV weights of the oracle sweep (fewer at 1 mm, where each takes minutes)")
    parser.add_argument("--every", type=int, default=10, help="DIP scoring interval in iterations")
    parser.add_argument("--json", default=None, help="write all figures to this JSON file")
    args = parser.parse_args(argv)

    device, note = resolve_device(args.device)
    print(f"device: {note}; torch {torch.__version__}; threads {torch.get_num_threads()}", flush=True)
    report = []
    for kind, voxel in [(k, v) for k in args.phantoms.split(",") for v in args.voxels]:
        for tilt in args.tilts:
            b0 = b0_tilted_about_i(tilt)
            snr = args.snr if args.snr is not None else DEFAULT_SNR[kind]
            if kind == "realistic":
                phantom = make_realistic_phantom(None, (voxel,) * 3, b0_dir=b0, snr=snr, seed=0,
                                                 supersampling=args.supersample)
            else:
                phantom = make_head_phantom(None, (voxel,) * 3, b0_dir=b0, snr=snr, seed=0)
            title = (f"{kind} phantom {voxel:g} mm {phantom.chi_ppm.shape}, B0 tilt {tilt:g} deg, SNR {snr:g} "
                     f"(field noise {phantom.noise_std_ppm * 1000:.2f} ppb"
                     + (f", simulated {args.supersample}x finer)" if kind == "realistic" else ")"))
            print(f"\n== {title}", flush=True)
            tv_fixed = {"iterations": args.tv_iterations} if args.tv_iterations else {}
            rows = [run_method("tkd", phantom, device)]
            if args.no_sweeps:
                rows += [run_method("tikhonov", phantom, device), run_method("tv", phantom, device, tv_fixed),
                         run_method("tv", phantom, device, dict(tv_fixed, data_term="huber"), label="tv huber")]
            else:
                rows += sweep("tikhonov", "lambda_", TIKHONOV_LAMBDAS, phantom, device)
                rows += sweep("tv", "alpha", args.tv_alphas, phantom, device, tv_fixed)
                rows += sweep("tv", "alpha", HUBER_TV_ALPHAS, phantom, device, dict(tv_fixed, data_term="huber"),
                              label="tv huber")
            magnitudes = [None] + ([phantom.magnitude] if getattr(phantom, "magnitude", None) is not None else [])
            dips = [run_method("dip", phantom, device, preset=preset, trace=True, every=args.every, magnitude=mag,
                               label=f"dip {preset}" + (" +mag" if mag is not None else ""))
                    for preset in args.presets.split(",") if preset != "none" for mag in magnitudes]
            rows += dips
            print_rows(rows)
            for dip in dips:
                print(f"{dip['method']}: quality against wall time (solver seconds; scoring excluded):")
                for t in CHECKPOINTS_S:
                    if t > dip["seconds"] * 1.05 and t != CHECKPOINTS_S[0]:
                        break
                    q = quality_at(dip["curve"], t)
                    print(f"  {t:>5d} s: " + ("no snapshot yet" if q is None else
                                             f"NRMSE {q[0]:6.2f} %  XSIM {q[1]:.3f}  (iteration {q[2]})"))
                m = dip["metrics"]
                print(f"  final  : NRMSE {m['nrmse']:6.2f} %  XSIM {m['xsim']:.3f}  ({dip['iterations']} iterations, "
                      f"{dip['seconds']:.1f} s, {dip['stop_reason']})")
                if dip["curve"]:
                    best = min(dip["curve"], key=lambda c: c[2])
                    print(f"  best   : NRMSE {best[2]:6.2f} %  XSIM {best[3]:.3f}  (iteration {best[0]}, "
                          f"{best[1]:.0f} s; oracle, for reference only); returned - best: "
                          f"{m['nrmse'] - best[2]:+.2f} points")
            sys.stdout.flush()
            report.append(dict(title=title, kind=kind, voxel=voxel, tilt=tilt, device=note, rows=rows,
                               supersample=args.supersample if kind == "realistic" else None))
            if args.json:  # rewrite after each phantom so a cut-off run keeps what it measured
                with open(args.json, "w") as handle:
                    json.dump(report, handle, indent=1, default=float)


if __name__ == "__main__":
    main()
