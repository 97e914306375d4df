"""From multi-echo GRE files to a local field file: read, check, run the phase pipeline, write atomically.

The file-to-file layer over :func:`qsmdip.phase.pipeline.phase_to_local_field`, shared by ``qsmdip field``,
``qsmdip reconstruct --phase`` and the worker. Like :mod:`qsmdip.runner` it never prints: a
:class:`FieldListener` hears about each finished stage and is asked whether to stop.

Outputs (the local field in ppm, the mask it is valid in, optionally the total field in ppm) are written
on the phase's grid, and only once every stage has succeeded: each goes to a hidden temporary file in its
folder first, and all are renamed into place at the end, so an error or an interruption leaves none of
them half-made. Display volumes for a GUI (``stage_dir``) are the exception: they are written as each
stage finishes, because showing them then is their purpose.
"""
from __future__ import annotations

import dataclasses
import os
import re
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import io as qio
from .errors import QSMInputError
from .geometry import SUPERIOR
from .phase.files import merge_acquisition_parameters, read_multi_echo
from .phase.pipeline import STAGES, FieldResult, PipelineCancelled, PipelineSettings, StageReport, phase_to_local_field
from .validation import binarise_mask, check_types

if TYPE_CHECKING:
    from .runner import ReconstructionRequest, RunResult

__all__ = ["FieldRequest", "FieldListener", "FieldRunResult", "PipelineCancelled", "check_field_request",
           "run_field", "run_field_and_reconstruction", "write_outputs", "DISPLAY_VOLUMES"]

#: Stage outputs written to ``stage_dir`` for display -> the name they are announced under.
DISPLAY_VOLUMES = {"total_field_ppm": "total_field", "mask": "mask", "local_field_ppm": "local_field"}
_STAGE_FILE = re.compile(r"stage\d+-[a-z_]+\.nrrd")
#: the outputs of a run, by role (messages and ``keep`` use these names)
_ROLES = ("local field", "mask", "total field")


@dataclass
class FieldRequest:
    """Everything one phase-to-field run needs; command-line flags and job keys map onto these fields."""

    phase_paths: List[str]                       #: one 4D file, one 3D file per echo, or one file of a BIDS set
    field_output_path: str                       #: the local field (ppm)
    mask_output_path: str                        #: the mask the local field is valid in (1 inside, 0 outside)
    magnitude_paths: Optional[List[str]] = None  #: same layout as the phase; None: BIDS part-mag files beside it
    echo_times_s: Optional[Sequence[float]] = None  #: None: the JSON sidecars' EchoTime
    b0_tesla: Optional[float] = None             #: None: the sidecars' MagneticFieldStrength
    mask_path: Optional[str] = None              #: the user's brain mask; None: made from the magnitude
    total_field_output_path: Optional[str] = None  #: the total field (ppm) before background removal
    b0_direction_world: Optional[Sequence[float]] = None  #: None: the scanner's superior axis (LPS)
    #: overrides of :class:`~qsmdip.phase.pipeline.PipelineSettings` fields (unwrap, background, offsets...)
    pipeline: Dict[str, Any] = field(default_factory=dict)
    #: folder for the display volumes written as each stage finishes (None: none are written)
    stage_dir: Optional[str] = None


@dataclass
class FieldRunResult:
    """The pipeline's result, the grid it lives on, and the files written (role -> path)."""

    result: FieldResult
    grid: qio.Volume
    written: Dict[str, str]
    b0_dir_voxel: Tuple[float, float, float]
    echo_times_s: Tuple[float, ...]
    b0_tesla: float
    input_files: List[str] = field(default_factory=list)  #: every image read (a BIDS file's siblings included)


class FieldListener:
    """Hooks a caller overrides to follow a run; the defaults do nothing."""

    def stage(self, report: StageReport, count: int, volumes: Dict[str, str]) -> None:
        """A stage finished; ``volumes`` maps display names (:data:`DISPLAY_VOLUMES`) to files in ``stage_dir``."""

    def cancel_requested(self) -> bool:
        """Return True to stop after the current stage (:class:`PipelineCancelled` is raised)."""
        return False


def check_field_request(request: FieldRequest) -> PipelineSettings:
    """Refuse, before any file is read, a request that could not end well; return its pipeline settings.

    Types of every field (a job file may hold ``"b0_tesla": "3"``), the pipeline settings, and the files
    the run will write: each must be writable now, all must differ, and none may be one of the inputs.
    """
    values = dataclasses.asdict(request)
    for name in ("phase_paths", "magnitude_paths"):
        values.pop(name)
        _check_paths(getattr(request, name), name, required=name == "phase_paths")
    check_types(FieldRequest, values, "request field")
    for name in ("field_output_path", "mask_output_path"):
        if not getattr(request, name):
            raise QSMInputError(f"no {name.replace('_', ' ')} given")
    settings = _pipeline_settings(request.pipeline)
    inputs = input_paths(request)
    outputs = _output_paths(request)
    seen: Dict[str, str] = {}
    for role, path in outputs.items():
        refuse_overwrite(role, path, inputs)
        for other_role, other in seen.items():
            if same_file(path, other):
                raise QSMInputError(f"the {role} and {other_role} outputs are both {path}: give each its own file")
        seen[role] = path
        qio.check_output_path(path)
    if request.stage_dir:
        _check_stage_dir(request.stage_dir, inputs)
    return settings


def run_field(request: FieldRequest, listener: Optional[FieldListener] = None) -> FieldRunResult:
    """Read the echoes, run every stage, then write the outputs on the phase's grid.

    Raises :class:`~qsmdip.errors.QSMInputError` (one line) for anything the user can fix, and
    :class:`PipelineCancelled` when the listener asked to stop; in both cases no output is written.
    """
    listener = listener or FieldListener()
    settings = check_field_request(request)
    files = read_multi_echo(request.phase_paths, request.magnitude_paths or None)
    if files.magnitude is None:
        raise QSMInputError("no magnitude images were given, and none lie beside the phase as BIDS part-mag files:"
                            " the pipeline needs the magnitude of every echo")
    outputs = _output_paths(request)
    read = [str(p) for p in files.phase_paths + files.magnitude_paths]
    for role, path in outputs.items():  # a BIDS phase file stands for its siblings, found only now
        refuse_overwrite(role, path, read)
    tes, b0 = merge_acquisition_parameters(files, request.echo_times_s, request.b0_tesla)
    grid = files.grid
    notes = list(files.notes)
    mask = None
    if request.mask_path:
        mask_volume = qio.read_volume(request.mask_path)
        difference = grid.geometry_difference(mask_volume)
        if difference:
            raise QSMInputError(f"the mask {request.mask_path} is not on the phase's grid: {difference}")
        mask, mask_warnings = binarise_mask(mask_volume.array)
        notes += [f"mask: {w}" for w in mask_warnings]
    b0_world = request.b0_direction_world if request.b0_direction_world is not None else SUPERIOR
    b0_dir = grid.b0_dir(b0_world)
    stage_dir = Path(request.stage_dir) if request.stage_dir else None

    def on_stage(report: StageReport) -> bool:
        if report.name == STAGES[0]:
            report.notes[:0] = notes  # what the files said belongs to the inputs stage
        volumes: Dict[str, str] = {}
        if stage_dir is not None:
            for key, name in DISPLAY_VOLUMES.items():
                if key in report.outputs:
                    path = stage_dir / f"stage{report.index}-{name}.nrrd"
                    qio.write_volume(path, np.asarray(report.outputs[key], dtype=np.float32), like=grid)
                    volumes[name] = str(path)
        listener.stage(report, len(STAGES), volumes)
        return listener.cancel_requested()

    result = phase_to_local_field(files.phase, files.magnitude, tes, b0, grid.spacing_mm, b0_dir=b0_dir, mask=mask,
                                  settings=settings, on_stage=on_stage)
    arrays = _arrays(result)
    written = write_outputs({outputs[role]: arrays[role] for role in outputs}, grid)
    return FieldRunResult(result, grid, {role: outputs[role] for role in outputs if outputs[role] in written},
                          b0_dir, tuple(tes), float(b0), read)


def run_field_and_reconstruction(request: FieldRequest, reconstruction: "ReconstructionRequest",
                                 keep: Dict[str, str], *, listener: Optional[FieldListener] = None,
                                 run: Optional[Callable[["ReconstructionRequest"], "RunResult"]] = None,
                                 ) -> Tuple[FieldRunResult, "RunResult"]:
    """The field stage, then a reconstruction of its local field inside its mask, with the echoes'
    root-sum-of-squares magnitude as the prior (``qsmdip reconstruct --phase``, the worker's phase jobs).
    A method in ``solvers.TOTAL_FIELD_METHODS`` (single-step TV) is given the total field instead.

    ``request``'s outputs and ``reconstruction``'s field, mask and magnitude are replaced by files in a
    temporary folder. ``keep`` maps roles ("local field", "mask", "total field") to files the caller wants
    too; they are written only once the reconstruction has written its QSM, so a failure or a cancel
    leaves none of them. Every output (the QSM, snapshots, ``keep``) and every setting of both steps is
    checked before the first stage. ``run`` runs the reconstruction (default :func:`run_reconstruction`).
    """
    from .runner import _make_settings, check_request, run_reconstruction
    from .solvers import TOTAL_FIELD_METHODS, from_phase_note

    unknown = sorted(set(keep) - set(_ROLES))
    if unknown:
        raise QSMInputError(f"unknown outputs to keep: {', '.join(unknown)} (known: {', '.join(_ROLES)})")
    run = run or run_reconstruction
    with tempfile.TemporaryDirectory(prefix="qsmdip-phase-") as work:
        paths = {name: os.path.join(work, f"{name}.nii") for name in ("field", "total", "mask", "magnitude")}
        # a method that removes the background itself (single-step TV) inverts the total field
        total = str(reconstruction.method).strip().lower() in TOTAL_FIELD_METHODS
        field_request = dataclasses.replace(request, field_output_path=paths["field"], mask_output_path=paths["mask"],
                                            total_field_output_path=paths["total"] if total else None)
        # said with the inversion's warnings, which every caller shows
        note = from_phase_note(reconstruction.method)
        reconstruction = dataclasses.replace(reconstruction, field_path=paths["total" if total else "field"],
                                             mask_path=paths["mask"], magnitude_path=paths["magnitude"],
                                             notes=list(reconstruction.notes) + ([note] if note else []))
        outputs = [("QSM", reconstruction.output_path)] + [(role, path) for role, path in keep.items() if path]
        for n, (role, path) in enumerate(outputs):
            for other_role, other in outputs[:n]:
                if same_file(path, other):
                    raise QSMInputError(f"the {role} and {other_role} outputs are both {path}: give each its own file")
            refuse_overwrite(role, path, input_paths(request))
            qio.check_output_path(path)
        check_field_request(field_request)
        check_request(reconstruction)
        _make_settings(reconstruction)  # a bad setting fails now, not after the field stage
        field_run = run_field(field_request, listener)
        for role, path in outputs:
            refuse_overwrite(role, path, field_run.input_files)
        qio.write_volume(paths["magnitude"], field_run.result.magnitude, like=field_run.grid)
        result = run(reconstruction)
        if result.output_path:
            arrays = _arrays(field_run.result)
            written = write_outputs({path: arrays[role] for role, path in keep.items() if path}, field_run.grid)
            field_run.written = {role: path for role, path in keep.items() if path in written}
        else:
            field_run.written = {}
    return field_run, result


def _arrays(result: FieldResult) -> Dict[str, np.ndarray]:
    return {"local field": result.local_field_ppm, "mask": result.mask.astype(np.float32),
            "total field": result.total_field_ppm}


def _pipeline_settings(overrides: Dict[str, Any]) -> PipelineSettings:
    names = {f.name for f in dataclasses.fields(PipelineSettings)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise QSMInputError(f"unknown pipeline settings: {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    return PipelineSettings(**check_types(PipelineSettings, overrides, "pipeline setting"))


def _check_paths(value: Any, name: str, *, required: bool) -> None:
    if value is None and not required:
        return
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, (str, os.PathLike)) for v in value):
        raise QSMInputError(f"request field {name}={value!r} is invalid: it must be a list of file paths")


def refuse_overwrite(role: str, path: str, inputs: Sequence[str]) -> None:
    """Refuse an output that is one of the input files."""
    for in_path in inputs:
        if same_file(path, in_path):
            raise QSMInputError(f"the {role} output {path} is the input file {in_path}: choose another name,"
                                " so the input is not overwritten")


def input_paths(request: FieldRequest) -> List[str]:
    """The input files the request names (before a BIDS file is expanded to its set)."""
    return [str(p) for p in list(request.phase_paths) + list(request.magnitude_paths or []) + [request.mask_path] if p]


def _output_paths(request: FieldRequest) -> Dict[str, str]:
    outputs = dict(zip(_ROLES, (request.field_output_path, request.mask_output_path, request.total_field_output_path)))
    return {role: str(path) for role, path in outputs.items() if path}


def _check_stage_dir(folder: str, inputs: Sequence[str]) -> None:
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise QSMInputError(f"the stage folder {folder} is a file, not a folder")
    for path in inputs:
        if same_file(os.path.dirname(os.path.abspath(path)), folder) and _STAGE_FILE.fullmatch(os.path.basename(path)):
            raise QSMInputError(f"the input {path} would be overwritten by a stage volume: choose another stage folder")
    qio.check_output_path(os.path.join(folder, "stage0-mask.nrrd"))


def same_file(a: str, b: str) -> bool:
    """Whether two paths name one file (links followed), also when ``a`` does not exist yet."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))


def _suffix(path: str) -> str:
    name = os.path.basename(path).lower()
    return next((s for s in qio.WRITE_SUFFIXES if name.endswith(s)), ".nii.gz")


def write_outputs(arrays: Dict[str, np.ndarray], grid: qio.Volume) -> List[str]:
    """Write every array to a hidden file beside its target, then rename them all into place.

    Whatever stops this half-way (a full disk, Ctrl-C), the targets renamed so far are removed again and
    the hidden files deleted, so no mix of new and missing outputs is left behind.
    """
    temporary: Dict[str, str] = {}
    done: List[str] = []
    try:
        for path, array in arrays.items():
            tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                               f".qsmdip-partial-{uuid.uuid4().hex}{_suffix(path)}")
            temporary[path] = tmp
            qio.write_volume(tmp, array, like=grid)
        for path, tmp in temporary.items():
            try:
                os.replace(tmp, path)
            except OSError as exc:
                raise QSMInputError(f"cannot write {path}: {exc.strerror or exc}") from exc
            done.append(path)
    except BaseException:
        for path in done:
            _remove(path)
        for tmp in temporary.values():
            _remove(tmp)
        raise
    return done


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
