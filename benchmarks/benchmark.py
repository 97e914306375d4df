"""Benchmark: every method on the head phantom, and DIP's quality against wall time.

Not a test. Runs in one process so that ratios between methods are fair on a noisy machine, and needs no
files (phantoms are made in memory), so it runs as is on a lent GPU machine.

    python benchmarks/benchmark.py                       # 2 mm and 1 mm, CPU or the GPU if present
    python benchmarks/benchmark.py --voxels 2 --dip-seconds 600 --device cpu
    python benchmarks/benchmark.py --json results.json   # also write every figure as JSON

For each phantom it prints each method's NRMSE %, HFEN %, XSIM, seconds and peak memory, then DIP's NRMSE and
XSIM at fixed wall times and at its best snapshot. The truth is used only to score; no setting reads it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "QSMDIP"))

import torch  # noqa: E402

from qsmdip.device import resolve_device  # noqa: E402
from qsmdip.metrics import all_metrics, nrmse, xsim  # noqa: E402
from qsmdip.phantom import make_head_phantom  # noqa: E402
from qsmdip.solvers import get_solver, make_settings  # noqa: E402

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


def run_method(method, phantom, device, overrides=None, *, trace=False, every=5, max_seconds=None):
    """Solve once; with ``trace``, score snapshots against the truth at wall-time checkpoints (timer paused)."""
    settings = make_settings(method, None, dict(overrides or {}, **({"max_seconds": max_seconds} if max_seconds else {})))
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
                                    settings=settings, callback=callback, callback_every=every, device=str(device))
        seconds = time.perf_counter() - start - state["scoring_s"]
    metrics = all_metrics(result.chi_ppm, phantom.chi_ppm, phantom.mask)
    return dict(method=method, seconds=seconds, peak_mb=mem.peak_mb, iterations=result.iterations,
                stop_reason=result.stop_reason, metrics=metrics, curve=curve, device=result.device)


def quality_at(curve, seconds):
    """NRMSE and XSIM of the last snapshot taken within ``seconds`` of solver time (None if none)."""
    within = [c for c in curve if c[1] <= seconds]
    return (within[-1][2], within[-1][3], within[-1][0]) if within else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--voxels", type=float, nargs="+", default=[2.0, 1.0], help="phantom voxel sizes in mm")
    parser.add_argument("--oblique", action="store_true", help="also run an oblique-B0 phantom (20 deg)")
    parser.add_argument("--snr", type=float, default=200.0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dip-seconds", type=float, default=300.0, help="wall-time budget of DIP per phantom")
    parser.add_argument("--dip-preset", default="default")
    parser.add_argument("--every", type=int, default=5, help="DIP scoring interval in iterations")
    parser.add_argument("--json", default=None, help="write all figures to this JSON file")
    args = parser.parse_args(argv)

    device, note = resolve_device(args.device)
    print(f"device: {note}; torch {torch.__version__}; threads {torch.get_num_threads()}")
    cases = [(v, 0.0) for v in args.voxels] + ([(v, 20.0) for v in args.voxels] if args.oblique else [])
    report = []
    for voxel, tilt in cases:
        b0 = (0.0, float(np.sin(np.radians(tilt))), float(np.cos(np.radians(tilt))))
        phantom = make_head_phantom(None, (voxel,) * 3, b0_dir=b0, snr=args.snr, seed=0)
        title = f"phantom {voxel:g} mm {phantom.chi_ppm.shape}, B0 tilt {tilt:g} deg, SNR {args.snr:g}"
        print(f"\n== {title}")
        rows = [run_method(m, phantom, device) for m in ("tkd", "tikhonov", "tv")]
        dip = run_method("dip", phantom, device, trace=True, every=args.every, max_seconds=args.dip_seconds,
                         overrides={"iterations": 100000} if args.dip_seconds else None)
        rows.append(dip)
        print(f"{'method':<10}{'NRMSE %':>9}{'HFEN %':>9}{'XSIM':>8}{'seconds':>10}{'peak MB':>10}{'iters':>7}")
        for r in rows:
            m = r["metrics"]
            print(f"{r['method']:<10}{m['nrmse']:>9.2f}{m['hfen']:>9.2f}{m['xsim']:>8.3f}{r['seconds']:>10.1f}"
                  f"{r['peak_mb']:>10.0f}{r['iterations']:>7}")
        print("DIP quality against wall time (solver seconds; scoring excluded):")
        for t in CHECKPOINTS_S:
            if t > dip["seconds"] * 1.05 and t != CHECKPOINTS_S[0]:
                break
            q = quality_at(dip["curve"], t)
            print(f"  {t:>5d} s: " + ("no snapshot yet" if q is None else f"NRMSE {q[0]:6.2f} %  XSIM {q[1]:.3f}  (iteration {q[2]})"))
        if dip["curve"]:
            best = min(dip["curve"], key=lambda c: c[2])
            print(f"   best  : NRMSE {best[2]:6.2f} %  XSIM {best[3]:.3f}  (iteration {best[0]}, {best[1]:.0f} s; oracle, for reference only)")
        report.append(dict(title=title, voxel=voxel, tilt=tilt, rows=rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1, default=float)


if __name__ == "__main__":
    main()
