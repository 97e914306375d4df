"""Where in the brain does background removal cost the final QSM its accuracy? The TV QSM after V-SHARP and
after PDF, and the same TV on the true local field, scored in the returned mask and in the parts of it deeper
than 4, 8, 12 and 16 mm from its edge.

If the loss were an edge effect, the ratio (QSM from the removal's field / QSM from the true local field) would
fall towards 1 with depth. The record behind docs/results/background-removal.md ("Where the error is"):

    python benchmarks/background_error_depth.py --voxel-size 2 [--acquisition acq.pkl]

Field sources: "local only" (the true local field itself, with no background at all: what a removal takes
from it is local field lost, not background left), "true" (the noise-free total field in the brain mask eroded
by one voxel, as in background_removal.py) and "pipeline" (the total field and mask of phase_to_local_field).
A few minutes at 2 mm.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import scipy.ndimage

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "QSMDIP"))

from qsmdip.metrics import nrmse  # noqa: E402
from qsmdip.phase.background import remove_background_pdf, remove_background_vsharp  # noqa: E402
from qsmdip.realistic_acquisition import true_local_field  # noqa: E402
from acquisition_args import acquisition_from_args, add_acquisition_arguments, run_pipeline  # noqa: E402
from qsmdip.solvers import get_solver  # noqa: E402

DEPTHS_MM = (0, 4, 8, 12, 16)
REMOVALS = {"vsharp": remove_background_vsharp, "pdf": remove_background_pdf}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_acquisition_arguments(parser)
    args = parser.parse_args(argv)
    acq = acquisition_from_args(args)
    vs, b0 = acq.voxel_size_mm, acq.b0_dir

    def tv(field, mask):
        return get_solver("tv")(field, mask, vs, b0_dir=b0).chi_ppm

    pipeline = run_pipeline(acq)
    eroded = scipy.ndimage.binary_erosion(acq.brain_mask)
    sources = {"local only": (eroded, true_local_field(acq, eroded)),
               "true": (eroded, None),
               "pipeline": (pipeline.field_mask, pipeline.total_field_ppm)}
    print(f"# voxel {vs} mm, B0 {tuple(round(float(b), 3) for b in b0)}; cells: QSM from the removal's field / "
          "TV on the true local field = ratio (NRMSE %), in the returned mask deeper than the depth")
    print("| source | removal | " + " | ".join(f"deeper than {d} mm" for d in DEPTHS_MM) + " |")
    print("|---|---|" + "---|" * len(DEPTHS_MM))
    for source, (mask, total) in sources.items():
        if total is None:
            total = np.where(mask, acq.total_field_ppm, 0.0)
        for name, remove in REMOVALS.items():
            result = remove(total, mask, vs, b0_dir=b0)
            returned = result.mask
            chi = tv(result.local_field_ppm, returned)
            reference = tv(true_local_field(acq, returned), returned)
            depth = scipy.ndimage.distance_transform_edt(returned, sampling=vs)
            cells = []
            for d in DEPTHS_MM:
                inner = returned & (depth > d)
                a, b = nrmse(chi, acq.chi_ppm, inner), nrmse(reference, acq.chi_ppm, inner)
                cells.append(f"{a:.1f} / {b:.1f} = **{a / b:.2f}** ({inner.sum() / returned.sum():.0%})")
            print(f"| {source} | {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
