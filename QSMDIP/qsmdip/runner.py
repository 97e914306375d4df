"""One reconstruction from files to files: load, validate, solve, stream snapshots, write the QSM.

The command line and the background worker are thin layers over :func:`run_reconstruction`; they differ
only in the :class:`RunListener` they pass (a progress bar, or JSON lines on stdout).
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from . import io as qio
from .errors import QSMInputError
from .geometry import SUPERIOR, b0_direction_in_voxel_frame
from .solvers import get_solver, make_settings, settings_class
from .solvers.base import Progress, SolveResult
from .units import ppm_per_unit
from .validation import check_magnitude, check_network_fits, check_reference, check_types, prepare_inputs


@dataclass
class ReconstructionRequest:
    """Everything one reconstruction needs; command-line flags and job-file keys map onto these fields."""

    field_path: str
    mask_path: str
    output_path: str
    method: str = "dip"
    preset: Optional[str] = None
    units: str = "ppm"
    b0_tesla: Optional[float] = None
    te_s: Optional[float] = None
    b0_direction_world: Optional[Sequence[float]] = None   #: None: the scanner's superior axis
    reference_path: Optional[str] = None
    #: GRE magnitude on the field's grid (4D: echoes, combined by root sum of squares); solvers that have
    #: no use for it ignore it
    magnitude_path: Optional[str] = None
    snapshot_path: Optional[str] = None                     #: one file, replaced atomically at each snapshot
    snapshot_dir: Optional[str] = None                      #: numbered files, one per snapshot
    snapshot_every: int = 10
    device: str = "auto"
    settings: Dict[str, Any] = field(default_factory=dict)  #: overrides of the method's settings fields
    #: the caller's notes, reported with the input checks' warnings (``field_runner`` says here that a method
    #: picked from the phase inverts the local field)
    notes: List[str] = field(default_factory=list)


@dataclass
class RunInfo:
    """What is known once the inputs are loaded, before the solver starts."""

    method: str
    device: str
    max_iterations: int
    warnings: List[str]
    b0_dir_voxel: tuple
    shape: tuple


@dataclass
class RunResult:
    """How a reconstruction ended and where its output went (``output_path`` None if nothing written)."""

    output_path: Optional[str]
    stop_reason: str
    iterations: int
    elapsed_s: float
    metrics: Optional[Dict[str, float]]
    warnings: List[str]
    device: str
    chosen: Dict[str, Any] = field(default_factory=dict)  #: settings the solver chose from the data


class RunListener:
    """Hooks a caller overrides to follow a run; the defaults do nothing."""

    def started(self, info: RunInfo) -> None:
        """Inputs validated, device chosen, solver about to start."""

    def progress(self, progress: Progress) -> None:
        """Called every ``snapshot_every`` iterations (and after the last)."""

    def snapshot(self, iteration: int, path: Optional[str], metrics: Optional[Dict[str, float]]) -> None:
        """A snapshot file is complete (path None when no snapshot file was asked for)."""

    def cancel_requested(self) -> bool:
        """Return True to stop the solver at the next callback."""
        return False


@dataclass
class LoadedInputs:
    field_volume: qio.Volume
    field_ppm: np.ndarray
    mask: np.ndarray
    reference_ppm: Optional[np.ndarray]
    b0_dir_voxel: tuple
    warnings: List[str]
    magnitude: Optional[np.ndarray] = None  #: float32 [i, j, k], echoes already combined


def load_inputs(request: ReconstructionRequest) -> LoadedInputs:
    """Read and check the request's files, convert the field to ppm and find B0 in the voxel frame.

    Every file is checked here, before the solver starts, so a bad optional input (reference,
    magnitude) fails in seconds instead of after a long reconstruction.
    """
    field_vol = qio.read_volume(request.field_path)
    mask_vol = qio.read_volume(request.mask_path)
    field_ppm, mask, warnings = prepare_inputs(field_vol, mask_vol, units=request.units,
                                               b0_tesla=request.b0_tesla, te_s=request.te_s)
    reference = None
    if request.reference_path:
        reference, ref_warnings = check_reference(qio.read_volume(request.reference_path), field_vol)
        warnings = list(warnings) + list(ref_warnings)
    magnitude = None
    if request.magnitude_path:
        magnitude, magnitude_warnings = check_magnitude(qio.read_echoes(request.magnitude_path), field_vol)
        warnings = list(warnings) + list(magnitude_warnings)
    b0_world = request.b0_direction_world if request.b0_direction_world is not None else SUPERIOR
    b0_dir = b0_direction_in_voxel_frame(field_vol.direction, b0_world)
    return LoadedInputs(field_vol, field_ppm, mask, reference, b0_dir, list(warnings) + list(request.notes), magnitude)


def _max_iterations(settings: Any) -> int:
    """Planned iterations of an iterative method's settings; 0 for the closed-form ones."""
    return int(getattr(settings, "iterations", 0))


def check_request(request: ReconstructionRequest) -> None:
    """Refuse, before any file is read or any work done, a request that could not end well.

    Types of every field (a job file may hold ``"b0_tesla": "3"``), the snapshot interval, and the files
    the run will write: each must be writable now (suffix, folder), and none may be one of the inputs,
    so a run can never overwrite its own field, mask, reference or magnitude.
    """
    ppm_per_unit(request.units, request.b0_tesla, request.te_s)  # units, B0, TE: messages in their own words
    check_types(ReconstructionRequest, dataclasses.asdict(request), "request field")
    if request.snapshot_every < 1:
        raise QSMInputError(f"snapshot interval must be at least 1 iteration, got {request.snapshot_every}")
    inputs = {"field": request.field_path, "mask": request.mask_path, "reference": request.reference_path,
              "magnitude": request.magnitude_path}
    outputs = {"output": request.output_path, "snapshot": request.snapshot_path}
    for out_name, out_path in outputs.items():
        if not out_path:
            continue
        for in_name, in_path in inputs.items():
            if in_path and _same_file(out_path, in_path):
                raise QSMInputError(f"the {out_name} file {out_path} is the {in_name} file: choose another name,"
                                    f" so the {in_name} is not overwritten")
        qio.check_output_path(out_path)
    if request.snapshot_path and _same_file(request.snapshot_path, request.output_path):
        raise QSMInputError(f"the snapshot file and the output file are both {request.output_path}")
    if request.snapshot_dir:
        folder = request.snapshot_dir
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise QSMInputError(f"the snapshot folder {folder} is a file, not a folder")
        for in_name, in_path in inputs.items():
            if in_path and _same_file(os.path.dirname(os.path.abspath(in_path)), folder) \
                    and re.match(r"snapshot_\d{5}\.", os.path.basename(in_path)):
                raise QSMInputError(f"the {in_name} file {in_path} would be overwritten by a snapshot:"
                                    " choose another snapshot folder")
        qio.check_output_path(_snapshot_file(request, 0))


def _same_file(a: str, b: str) -> bool:
    """Whether two paths name one file (links followed), also when ``a`` does not exist yet."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))


def _snapshot_file(request: ReconstructionRequest, iteration: int) -> str:
    """The numbered snapshot file in ``snapshot_dir``, in the output's format."""
    ext = ".nii.gz"
    for candidate in (".nii.gz", ".nii", ".nrrd"):
        if request.output_path.lower().endswith(candidate):
            ext = candidate
    return os.path.join(str(request.snapshot_dir), f"snapshot_{iteration:05d}{ext}")


def _write_snapshot(request: ReconstructionRequest, like: qio.Volume, chi: np.ndarray, iteration: int) -> Optional[str]:
    path = None
    if request.snapshot_path:
        path = request.snapshot_path
        qio.write_volume(path, chi, like=like)
    if request.snapshot_dir:
        path = _snapshot_file(request, iteration)
        qio.write_volume(path, chi, like=like)
    return path


def _check_finite(chi: np.ndarray, method: str, when: str) -> None:
    """Refuse a map with NaN/Inf: it is never written (extreme input values or settings made it diverge)."""
    bad = int(chi.size - np.count_nonzero(np.isfinite(chi)))
    if bad:
        raise QSMInputError(f"{method} gave {bad} NaN/Inf voxels {when}, so nothing was written: check the field"
                            " for extreme values, or the settings (e.g. a lower learning_rate)")


def _make_settings(request: ReconstructionRequest) -> Any:
    """The method's settings from its preset and the request's overrides, every override type-checked."""
    overrides = check_types(settings_class(request.method), request.settings,
                            f"{str(request.method).strip().lower()} setting")
    try:
        return make_settings(request.method, request.preset, overrides)
    except QSMInputError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:  # a rule a settings class checks without QSMInputError
        raise QSMInputError(f"invalid {request.method} settings {request.settings}: {exc}") from exc


def run_reconstruction(request: ReconstructionRequest, listener: Optional[RunListener] = None,
                       *, write_output_when_cancelled: bool = True) -> RunResult:
    """Run one reconstruction end to end.

    The output is written with the field's geometry. A cancelled run still writes its last estimate
    unless ``write_output_when_cancelled`` is False (the Slicer worker keeps the last snapshot instead).
    """
    from .device import resolve_device
    from .metrics import all_metrics

    listener = listener or RunListener()
    check_request(request)
    settings = _make_settings(request)
    inputs = load_inputs(request)
    if str(request.method).strip().lower() == "dip":
        check_network_fits(inputs.mask, settings.depth)
    device, device_note = resolve_device(request.device)
    listener.started(RunInfo(request.method, device_note, _max_iterations(settings), inputs.warnings,
                             inputs.b0_dir_voxel, inputs.field_ppm.shape))

    def metrics_of(chi: np.ndarray) -> Optional[Dict[str, float]]:
        if inputs.reference_ppm is None:
            return None
        return all_metrics(chi, inputs.reference_ppm, inputs.mask)

    def callback(progress: Progress) -> bool:
        if listener.cancel_requested():  # a cancelled run writes no further snapshot
            return True
        listener.progress(progress)
        _check_finite(progress.chi_ppm, request.method, f"at iteration {progress.iteration}")
        path = _write_snapshot(request, inputs.field_volume, progress.chi_ppm, progress.iteration)
        if path is not None or inputs.reference_ppm is not None:
            listener.snapshot(progress.iteration, path, metrics_of(progress.chi_ppm))
        return listener.cancel_requested()

    solve = get_solver(request.method)
    try:
        result: SolveResult = solve(inputs.field_ppm, inputs.mask, inputs.field_volume.spacing_mm,
                                    b0_dir=inputs.b0_dir_voxel, settings=settings, callback=callback,
                                    callback_every=request.snapshot_every, device=str(device),
                                    magnitude=inputs.magnitude)
    except FloatingPointError as exc:  # a solver's own divergence check (e.g. DIP's loss became NaN)
        raise QSMInputError(f"{request.method} diverged: {exc}") from exc
    _check_finite(result.chi_ppm, request.method, "in the final map")
    output_path: Optional[str] = None
    if result.stop_reason != "cancelled" or write_output_when_cancelled:
        qio.write_volume(request.output_path, result.chi_ppm, like=inputs.field_volume)
        output_path = request.output_path
    return RunResult(output_path, result.stop_reason, result.iterations, result.elapsed_s,
                     metrics_of(result.chi_ppm), inputs.warnings, result.device or device_note,
                     dict(result.chosen))


def request_from_dict(data: Dict[str, Any], names: Optional[Mapping[str, str]] = None) -> ReconstructionRequest:
    """Build a request from a job dictionary (worker job files), refusing unknown keys and wrong types.

    ``names`` maps request fields to the keys the job file used, so that messages name those keys.
    """
    if not isinstance(data, dict):
        raise QSMInputError(f"a job must be an object of key: value pairs, got {type(data).__name__}")
    fields = {f.name for f in dataclasses.fields(ReconstructionRequest)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise QSMInputError(f"unknown job keys: {', '.join(unknown)}")
    for required in ("field_path", "mask_path", "output_path"):
        if not data.get(required):
            raise QSMInputError(f"the job has no {(names or {}).get(required, required)}")
    return ReconstructionRequest(**check_types(ReconstructionRequest, data, "job key", names))
