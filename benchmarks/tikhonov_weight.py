"""How close the automatic Tikhonov weight comes to the best weight in hindsight.

Not a test. For each phantom it solves closed-form Tikhonov once per weight of a fine log sweep and keeps
the weight with the lowest NRMSE against the truth (the oracle, which no user has), then solves once per
automatic rule (``TikhonovSettings(lambda_=None, weight_rule=...)``, which sees only the field, mask,
voxel size and B0 direction) and reports the weight it chose, its NRMSE and the ratio to the oracle's.
The fixed weight 0.01 (the default before the automatic choice) is shown for reference.

    python benchmarks/tikhonov_weight.py                  # the table of docs/results/tikhonov-weight.md
    python benchmarks/tikhonov_weight.py --phantoms simple3 realistic3 --sweep-per-decade 8

NRMSE is ``qsmdip.metrics.nrmse`` (the 'nrmse' of ``all_metrics``; the script checks they agree on the
chosen maps). The realistic phantom takes ~20 s to build at 2 mm; its arrays are cached in ``--cache``.
Runs on one CPU thread by default (``--threads``) so that it can share a machine.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "QSMDIP"))

import torch  # noqa: E402

from qsmdip.metrics import all_metrics, nrmse  # noqa: E402
from qsmdip.solvers.tikhonov import WEIGHT_RULES, TikhonovSettings, solve_tikhonov  # noqa: E402

TILT_20 = (0.0, math.sin(math.radians(20.0)), math.cos(math.radians(20.0)))
AXIAL = (0.0, 0.0, 1.0)
#: name -> (kind, voxel mm, B0 direction, label)
PHANTOMS = {
    "simple2": ("simple", 2.0, AXIAL, "simple 2 mm, axial B0, SNR 200"),
    "simple2t": ("simple", 2.0, TILT_20, "simple 2 mm, B0 tilted 20 deg, SNR 200"),
    "simple3": ("simple", 3.0, AXIAL, "simple 3 mm, axial B0, SNR 200"),
    "simple3t": ("simple", 3.0, TILT_20, "simple 3 mm, B0 tilted 20 deg, SNR 200"),
    "realistic2": ("realistic", 2.0, AXIAL, "realistic 2 mm, axial B0, SNR 100"),
    "realistic2t": ("realistic", 2.0, TILT_20, "realistic 2 mm, B0 tilted 20 deg, SNR 100"),
    "realistic3": ("realistic", 3.0, AXIAL, "realistic 3 mm, axial B0, SNR 100"),
    "realistic3t": ("realistic", 3.0, TILT_20, "realistic 3 mm, B0 tilted 20 deg, SNR 100"),
}
FIXED = 0.01


def load_phantom(name: str, cache: str) -> dict:
    """chi, mask, field, voxel size and B0 of a phantom, built once and cached as .npz in ``cache``."""
    kind, voxel, b0, _ = PHANTOMS[name]
    path = os.path.join(cache, f"tikhonov-weight-{name}.npz")
    if not os.path.exists(path):
        if kind == "simple":
            from qsmdip.phantom import make_head_phantom
            ph = make_head_phantom(voxel_size_mm=(voxel,) * 3, snr=200, b0_dir=b0)
        else:
            from qsmdip.realistic_phantom import make_realistic_phantom
            ph = make_realistic_phantom(voxel_size_mm=(voxel,) * 3, snr=100, b0_dir=b0)
        os.makedirs(cache, exist_ok=True)
        np.savez(path, chi=ph.chi_ppm, mask=ph.mask, field=ph.field_ppm, voxel=np.array(ph.voxel_size_mm),
                 b0=np.array(ph.b0_dir))
    z = np.load(path)
    return dict(chi=z["chi"], mask=z["mask"], field=z["field"], voxel=tuple(float(v) for v in z["voxel"]),
                b0=tuple(float(v) for v in z["b0"]))


def solve(ph: dict, settings: TikhonovSettings):
    return solve_tikhonov(ph["field"], ph["mask"], ph["voxel"], b0_dir=ph["b0"], settings=settings, device="cpu")


def oracle(ph: dict, per_decade: int, low: float, high: float):
    """(best weight, its NRMSE) over a log grid of weights, scored against the truth."""
    count = int(round(per_decade * math.log10(high / low))) + 1
    sweep = []
    for lam in np.logspace(math.log10(low), math.log10(high), count):
        chi = solve(ph, TikhonovSettings(lambda_=float(lam))).chi_ppm
        sweep.append((float(lam), nrmse(chi, ph["chi"], ph["mask"])))
    return min(sweep, key=lambda s: s[1])


def cone_report(ph: dict, lam: float, top: int = 4) -> str:
    """Share of the squared error (full padded grid, k-space) carried by the ``top`` worst frequencies.

    A diagnostic that reads the truth: it shows whether a few low frequencies close to the dipole cone,
    where the masked field holds more than the model can explain, dominate the error at weight ``lam``.
    """
    from qsmdip.kernel import laplacian_kernel
    from qsmdip.operator import DipoleOperator
    from qsmdip.solvers.base import check_inputs, crop_to_mask

    field, mask = check_inputs(ph["field"], ph["mask"])
    crop = crop_to_mask(field, mask)
    op = DipoleOperator(crop.field_ppm.shape, ph["voxel"], ph["b0"], dtype=torch.float64)
    size = op.fft_shape
    d = op.kernel.numpy()
    den = d ** 2 + lam * laplacian_kernel(size, ph["voxel"], half=True)
    den[0, 0, 0] = 1.0
    spec = np.fft.rfftn(crop.field_ppm.astype(np.float64), s=size, axes=(0, 1, 2))
    truth = np.fft.rfftn(np.where(crop.mask, ph["chi"][crop.box], 0.0), s=size, axes=(0, 1, 2))
    weight = np.full(spec.shape[2], 2.0)
    weight[0] = 1.0
    if size[2] % 2 == 0:
        weight[-1] = 1.0
    err = weight * np.abs(d * spec / den - truth) ** 2
    err[0, 0, 0] = 0.0
    worst = np.argsort(err.ravel())[::-1][:top]
    cells = []
    for flat in worst:
        idx = np.unravel_index(flat, err.shape)
        signed = tuple(int(i if i <= n // 2 else i - n) for i, n in zip(idx, size))
        excess = abs(spec[idx]) / max(abs(d[idx] * truth[idx]), 1e-30)  # masked field / the truth's field
        cells.append(f"k={signed} D={d[idx]:+.4f} |F|/|D X|={excess:.0f}")
    share = err.ravel()[worst].sum() / err.sum()
    return f"{share:.0%} of the error in {top} frequencies: " + "; ".join(cells)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phantoms", nargs="+", default=list(PHANTOMS), choices=list(PHANTOMS))
    parser.add_argument("--rules", nargs="+", default=list(WEIGHT_RULES), choices=list(WEIGHT_RULES))
    parser.add_argument("--sweep-per-decade", type=int, default=16, help="oracle sweep density")
    parser.add_argument("--sweep-range", type=float, nargs=2, default=(1e-5, 1.0), help="oracle sweep bounds")
    parser.add_argument("--cache", default="/tmp/qsmdip-phantoms", help="folder for the phantom arrays")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--cone-report", action="store_true",
                        help="also show how much of the error at the first rule's weight sits in a few frequencies")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    header = (["phantom", "oracle lambda", "oracle NRMSE %", f"fixed {FIXED:g}: NRMSE % (ratio)"]
              + [f"{rule}: lambda, NRMSE % (ratio)" for rule in args.rules])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = []
    for name in args.phantoms:
        ph = load_phantom(name, args.cache)
        t0 = time.perf_counter()
        best_lam, best_err = oracle(ph, args.sweep_per_decade, *args.sweep_range)
        start = time.perf_counter()
        fixed_chi = solve(ph, TikhonovSettings(lambda_=FIXED)).chi_ppm
        times = [f"fixed weight {time.perf_counter() - start:.2f}"]
        fixed_err = nrmse(fixed_chi, ph["chi"], ph["mask"])
        cells = [PHANTOMS[name][3], f"{best_lam:.3g}", f"{best_err:.2f}",
                 f"{fixed_err:.2f} ({fixed_err / best_err:.3f})"]
        chosen = {}
        for rule in args.rules:
            start = time.perf_counter()
            result = solve(ph, TikhonovSettings(weight_rule=rule))
            seconds = time.perf_counter() - start
            err = all_metrics(result.chi_ppm, ph["chi"], ph["mask"])["nrmse"]
            assert abs(err - nrmse(result.chi_ppm, ph["chi"], ph["mask"])) < 1e-9
            lam = chosen[rule] = result.chosen["lambda_"]
            cells.append(f"{lam:.3g}, {err:.2f} ({err / best_err:.3f})")
            times.append(f"{rule} {seconds:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
        notes.append(f"{name}: " + ", ".join(times))
        if args.cone_report:
            rule = args.rules[0]
            notes.append(f"{name}, {rule} weight {chosen[rule]:.3g}: {cone_report(ph, chosen[rule])}")
            notes.append(f"{name}, oracle weight {best_lam:.3g}: {cone_report(ph, best_lam)}")
        print(lines[-1] + f"   [{time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
    print("\n".join(lines))
    extra = " and diagnostics" if args.cone_report else ""
    print(f"\nSeconds per solve, the choice included (CPU, {args.threads} thread(s)){extra}:")
    print("\n".join("- " + n for n in notes))


if __name__ == "__main__":
    main()
