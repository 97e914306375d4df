"""The phase benchmarks' shared input: one simulated realistic acquisition, or a pickled one to reuse.

    parser = argparse.ArgumentParser()
    add_acquisition_arguments(parser)
    acq = acquisition_from_args(parser.parse_args())
"""
from __future__ import annotations

import argparse
import pickle

from typing import List, Optional

import numpy as np

from qsmdip.geometry import b0_tilted_about_i
from qsmdip.phase.pipeline import FieldResult, PipelineSettings, phase_to_local_field
from qsmdip.realistic_acquisition import RealisticAcquisition, make_realistic_acquisition


def add_acquisition_arguments(parser: argparse.ArgumentParser) -> None:
    """--voxel-size, --b0-tilt-deg, --snr and --acquisition."""
    parser.add_argument("--voxel-size", type=float, default=2.0)
    parser.add_argument("--b0-tilt-deg", type=float, default=0.0, help="B0 tilted from k towards j")
    parser.add_argument("--snr", type=_snr, default=100.0,
                        help="first-echo SNR of the complex signal (default 100), or 'none' for noise-free data; "
                             "a pickled --acquisition keeps its own")
    parser.add_argument("--acquisition", help="a pickled RealisticAcquisition (instead of simulating one)")


def _snr(text: str):
    """A positive SNR, or None for 'none' (no noise)."""
    if text.strip().lower() == "none":
        return None
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"SNR must be positive or 'none', got {text!r}")
    return value


def acquisition_from_args(args: argparse.Namespace) -> RealisticAcquisition:
    """The pickled acquisition if one is named, else a fresh simulation (seeded: the same data every run)."""
    if args.acquisition:
        with open(args.acquisition, "rb") as handle:
            return pickle.load(handle)
    return make_realistic_acquisition(voxel_size_mm=(args.voxel_size,) * 3,
                                      b0_dir=b0_tilted_about_i(args.b0_tilt_deg), snr=args.snr)


def chosen_runs(parser: argparse.ArgumentParser, text: str, runs) -> List[str]:
    """The run keys named in ``text`` (comma-separated), in its order; a parser error for one not in ``runs``."""
    chosen = [key.strip() for key in text.split(",") if key.strip()]
    unknown = sorted(set(chosen) - set(runs))
    if unknown:
        parser.error(f"unknown run(s) {', '.join(unknown)}: use {', '.join(runs)}")
    return chosen


def run_pipeline(acq: RealisticAcquisition, settings: Optional[PipelineSettings] = None,
                 mask: Optional[np.ndarray] = None) -> FieldResult:
    """The phase pipeline on the acquisition's own echoes, echo times, B0 and geometry (default settings unless
    given; ``mask``: a user's mask, used as given)."""
    return phase_to_local_field(acq.phase_rad, acq.magnitude, acq.echo_times_s, acq.b0_tesla, acq.voxel_size_mm,
                                b0_dir=acq.b0_dir, mask=mask, settings=settings)
