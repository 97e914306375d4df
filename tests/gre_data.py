"""One simulated multi-echo GRE acquisition (the realistic 4 mm head) shared by the front-end tests.

Simulating it takes seconds, so it is made once per test process (``lru_cache``) and each test module
writes it as files where it needs them. The grid is oblique (slices tilted 15 degrees about i), and the
acquisition was simulated with B0 along the scanner's superior axis seen from that grid, so a front end
that reads B0's direction from the files' direction matrix gets the simulated one.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import List, Tuple

import numpy as np

from qsmdip import io as qio
from qsmdip.geometry import b0_direction_in_voxel_frame

VOXEL_MM = (4.0, 4.0, 4.0)
TILT_DEG = 15.0


def direction() -> np.ndarray:
    c, s = math.cos(math.radians(TILT_DEG)), math.sin(math.radians(TILT_DEG))
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


@functools.lru_cache(maxsize=1)
def acquisition():
    """(the RealisticAcquisition, its grid as an io.Volume)."""
    from qsmdip.realistic_acquisition import make_realistic_acquisition

    b0 = b0_direction_in_voxel_frame(direction())
    acq = make_realistic_acquisition(voxel_size_mm=VOXEL_MM, b0_dir=b0, snr=100.0, seed=0)
    grid = qio.Volume(np.zeros(acq.shape, np.float32), VOXEL_MM, (-100.0, -120.0, -80.0), direction())
    return acq, grid


def write_set(folder: Path, *, layout: str = "bids", phase_scale: str = "radians",
              echoes: int = 0) -> Tuple[List[Path], List[Path]]:
    """Write the acquisition (or its first ``echoes`` echoes) as files; return (phase paths, magnitude paths)."""
    from qsmdip.phase.files import write_multi_echo

    acq, grid = acquisition()
    n = echoes or len(acq.echo_times_s)
    return write_multi_echo(Path(folder), acq.phase_rad[:n], acq.magnitude[:n], grid, acq.echo_times_s[:n],
                            acq.b0_tesla, layout=layout, phase_scale=phase_scale)


def per_echo_files(folder: Path, *, sidecars: bool = False) -> Tuple[List[Path], List[Path]]:
    """One plain 3D NIfTI per echo (no BIDS names, no sidecars unless asked)."""
    acq, grid = acquisition()
    folder = Path(folder)
    phases, mags = [], []
    for n in range(len(acq.echo_times_s)):
        phases.append(qio.write_volume(folder / f"phase{n + 1}.nii.gz", acq.phase_rad[n], like=grid))
        mags.append(qio.write_volume(folder / f"mag{n + 1}.nii.gz", acq.magnitude[n], like=grid))
    return phases, mags


def write_bids_dataset(root: Path, subjects=(("01", None), ("02", None), ("03", "pre"))) -> List[Path]:
    """A small BIDS dataset: the acquisition written once per (subject, session), with sidecars and a
    dataset_description.json. Returns the subjects' anat folders."""
    import json

    from qsmdip.phase.files import write_multi_echo

    acq, grid = acquisition()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "test", "BIDSVersion": "1.10.0"}))
    folders = []
    for subject, session in subjects:
        phases, _ = write_multi_echo(root, acq.phase_rad, acq.magnitude, grid, acq.echo_times_s, acq.b0_tesla,
                                     subject=subject, session=session)
        folders.append(phases[0].parent)
    return folders
