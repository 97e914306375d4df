"""Where the phase pipeline's total field errs, by tissue: the error that no background removal can take.

    python benchmarks/field_error_by_tissue.py --voxel-size 2 --snr none   # dephasing and partial volumes only
    python benchmarks/field_error_by_tissue.py --voxel-size 2              # SNR 100

The default phase pipeline's total field is compared, in its returned mask, with the simulation's field (the
voxel mean of the fine-grid field, which the reference local field and the 1.5x target of docs/phase-pipeline.md
are made from), after removing the error's constant and linear part (harmonic: any background removal takes
them). The voxel's signal phase is not that mean: partial volumes with CSF weight the field by each part's
signal, and strong sources (a bleed) dephase. Per dominant tissue: voxels, RMS error (ppb), and that tissue's
share of the squared error of TV on "the true local field plus this error" (``tv-oracle-bfr`` of
dip_from_phase.py) beside TV on the true local field, in percent of the true chi's squared norm.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "QSMDIP"))

from qsmdip.metrics import nrmse  # noqa: E402
from qsmdip.phantom import LABEL  # noqa: E402
from qsmdip.realistic_acquisition import true_local_field  # noqa: E402
from qsmdip.solvers import get_solver  # noqa: E402
from acquisition_args import acquisition_from_args, add_acquisition_arguments, run_pipeline  # noqa: E402
from dip_from_phase import oracle_local_field  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_acquisition_arguments(parser)
    args = parser.parse_args(argv)
    acq = acquisition_from_args(args)
    vs, b0 = acq.voxel_size_mm, acq.b0_dir
    pipe = run_pipeline(acq)
    mask = pipe.mask
    true_local = true_local_field(acq, mask)
    with_error = oracle_local_field(acq, pipe.total_field_ppm, mask)
    error_ppb = 1e3 * (with_error - true_local)
    maps = {name: get_solver("tv")(field, mask, vs, b0_dir=b0, device="cpu").chi_ppm
            for name, field in (("true", true_local), ("with error", with_error))}
    chi = acq.chi_ppm - acq.chi_ppm[mask].mean()
    norm = float(np.sum(chi[mask] ** 2))
    errors = {name: (x - x[mask].mean()) - chi for name, x in maps.items()}
    names = {code: name for name, code in LABEL.items()}
    print(f"# {vs[0]:g} mm, SNR {acq.snr if acq.snr is not None else 'none (noise-free)'}; field error RMS "
          f"{np.sqrt(np.mean(error_ppb[mask] ** 2)):.2f} ppb in the mask")
    print(f"{'tissue':22s} {'voxels':>7s} {'error ppb':>9s} {'TV-true %':>9s} {'TV-with-error %':>15s}")
    for code in np.unique(acq.labels[mask]):
        part = mask & (acq.labels == code)
        shares = [100 * float(np.sum(e[part] ** 2)) / norm for e in errors.values()]
        print(f"{names.get(int(code), str(code)):22s} {int(part.sum()):7d} "
              f"{np.sqrt(np.mean(error_ppb[part] ** 2)):9.2f} {shares[0]:9.2f} {shares[1]:15.2f}")
    print("NRMSE %: " + ", ".join(f"TV {name} {nrmse(x, acq.chi_ppm, mask):.2f}" for name, x in maps.items()))


if __name__ == "__main__":
    main()
