"""Background worker: ``python -m qsmdip.worker JOB.json`` (protocol in docs/WORKER_PROTOCOL.md).

Runs one job for a GUI in another process and reports on stdout as versioned JSON lines: a reconstruction
from a local field, or (protocol 2) the phase pipeline from multi-echo phase and magnitude, one ``stage``
line per finished stage, optionally followed by the reconstruction. It never lets a traceback be the only
message: every failure ends in an ``error`` line with the worker's own words and a distinct exit status.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, TextIO

from .errors import is_out_of_memory

#: The protocol this worker speaks (every message carries it). Version 2 added the phase jobs and the
#: ``stage`` event; jobs written for version 1 (a local field only) are still accepted.
PROTOCOL_VERSION = 2
JOB_PROTOCOLS = (1, 2)

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_INPUT = 2
EXIT_OUT_OF_MEMORY = 3
EXIT_MISSING_DEPENDENCY = 4
EXIT_CANCELLED = 5

#: job-file key -> ReconstructionRequest field
_JOB_KEYS = {
    "field": "field_path", "mask": "mask_path", "output": "output_path", "reference": "reference_path",
    "magnitude": "magnitude_path", "snapshot": "snapshot_path", "snapshot_dir": "snapshot_dir",
    "snapshot_every": "snapshot_every",
    "method": "method", "preset": "preset",
    "units": "units", "b0_tesla": "b0_tesla", "te_s": "te_s", "b0_direction_world": "b0_direction_world",
    "device": "device", "settings": "settings",
}


#: phase-job key -> FieldRequest field (protocol 2)
_PHASE_KEYS = {
    "phase": "phase_paths", "magnitude": "magnitude_paths", "echo_times_s": "echo_times_s", "b0_tesla": "b0_tesla",
    "mask": "mask_path", "out_field": "field_output_path", "out_mask": "mask_output_path",
    "out_total_field": "total_field_output_path", "b0_direction_world": "b0_direction_world",
    "pipeline": "pipeline", "stage_dir": "stage_dir",
}
#: keys of a phase job that configure its reconstruction (they need ``output``)
_RECONSTRUCTION_KEYS = ("output", "reference", "snapshot", "snapshot_dir", "snapshot_every", "method", "preset",
                        "device", "settings")
#: FieldRequest output field -> the role run_field_and_reconstruction keeps it under
_KEEP = {"field_output_path": "local field", "mask_output_path": "mask", "total_field_output_path": "total field"}


@dataclass
class PhaseJob:
    """A protocol-2 job from the phase: the field stage, and a reconstruction when ``output`` is given."""

    field_request: Any                      #: :class:`qsmdip.field_runner.FieldRequest`
    reconstruction: Optional[Any] = None    #: :class:`qsmdip.runner.ReconstructionRequest` or None
    keep: Dict[str, str] = field(default_factory=dict)   #: role -> path, written after the QSM


class JsonLineEmitter:
    """Writes one JSON object per line, flushed at once so the reader sees it live."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def emit(self, event: str, **fields: Any) -> None:
        message = {"protocol": PROTOCOL_VERSION, "event": event}
        message.update({k: _jsonable(v) for k, v in fields.items()})
        self.stream.write(json.dumps(message) + "\n")
        self.stream.flush()


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):
        return _jsonable(value.item())
    return value


def parse_job(job: Dict[str, Any]):
    """Turn a job dictionary into a ReconstructionRequest (a local-field job) or a :class:`PhaseJob` (a job
    with ``phase``, protocol 2); a badly typed value is an input error naming its key."""
    from .errors import QSMInputError
    from .runner import request_from_dict

    if not isinstance(job, dict):
        raise QSMInputError(f"the job file must hold one JSON object of key: value pairs, got {_json_type(job)}")
    version = job.get("protocol")
    if version not in JOB_PROTOCOLS or isinstance(version, bool):
        raise QSMInputError(f"job protocol {version!r} is not supported (this worker speaks "
                            f"{' and '.join(map(str, JOB_PROTOCOLS))})")
    if "phase" in job:
        if version < 2:
            raise QSMInputError("a job with phase needs protocol 2")
        return _parse_phase_job(job)
    unknown = sorted(set(job) - set(_JOB_KEYS) - {"protocol"})
    if unknown:
        raise QSMInputError(f"unknown job keys: {', '.join(unknown)}")
    data = {_JOB_KEYS[k]: v for k, v in job.items() if k in _JOB_KEYS and v is not None}
    return request_from_dict(data, names={field: key for key, field in _JOB_KEYS.items()})


def _parse_phase_job(job: Dict[str, Any]) -> PhaseJob:
    from .errors import QSMInputError
    from .field_runner import FieldRequest
    from .runner import ReconstructionRequest
    from .validation import check_types

    given = {k: v for k, v in job.items() if k != "protocol" and v is not None}
    unknown = sorted(set(given) - set(_PHASE_KEYS) - set(_RECONSTRUCTION_KEYS))
    if unknown:
        allowed_elsewhere = [k for k in unknown if k in _JOB_KEYS]
        raise QSMInputError(f"job keys {', '.join(unknown)} do not apply to a job with phase"
                            + (" (it makes the field in ppm itself)" if allowed_elsewhere else ""))
    names = {f: k for k, f in _PHASE_KEYS.items()}
    data = {_PHASE_KEYS[k]: v for k, v in given.items() if k in _PHASE_KEYS and k not in ("phase", "magnitude")}
    data = check_types(FieldRequest, data, "job key", names)
    for key in ("phase", "magnitude"):
        if key in given:
            data[_PHASE_KEYS[key]] = _paths(given[key], key)
    reconstructs = "output" in given
    if not reconstructs:
        extra = [k for k in _RECONSTRUCTION_KEYS if k in given]
        if extra:
            raise QSMInputError(f"job keys {', '.join(extra)} configure a reconstruction: give output too, or leave "
                                "them out")
        for key in ("out_field", "out_mask"):
            if not given.get(key):
                raise QSMInputError(f"the job has no {key}: a job with phase writes the local field and its mask "
                                    "there, or reconstructs into output")
        return PhaseJob(FieldRequest(**data))
    keep = {_KEEP[f]: data.pop(f) for f in list(_KEEP) if data.get(f)}
    field_request = FieldRequest(field_output_path="", mask_output_path="", **data)
    recon = {_JOB_KEYS[k]: given[k] for k in _RECONSTRUCTION_KEYS if k in given}
    recon["b0_direction_world"] = given.get("b0_direction_world")
    names = {f: k for k, f in _JOB_KEYS.items()}
    request = ReconstructionRequest(field_path="", mask_path="",
                                    **check_types(ReconstructionRequest, recon, "job key", names))
    return PhaseJob(field_request, request, keep)


def _paths(value: Any, key: str) -> List[str]:
    """A path or a list of paths -> a list of paths."""
    from .errors import QSMInputError

    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v for v in values):
        raise QSMInputError(f"job key {key}={json.dumps(value)} is invalid: it must be a path or a list of paths")
    return list(values)


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type (array, string, number...)."""
    names = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
             type(None): "null"}
    return names.get(type(value), type(value).__name__)


def run(job_path: str, out: TextIO = sys.stdout) -> int:
    """Run the job in ``job_path``; report on ``out``; return the exit status."""
    emitter = JsonLineEmitter(out)
    cancel = {"requested": False}

    def request_cancel(signum, frame):  # noqa: ARG001 - signal handler signature
        cancel["requested"] = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_cancel)

    try:
        import torch  # noqa: F401 - only to report its absence clearly
    except ImportError as error:
        emitter.emit("error", kind="missing_dependency",
                     message=f"PyTorch is not installed in this Python ({sys.executable}): {error}")
        return EXIT_MISSING_DEPENDENCY

    from .errors import MissingDependencyError, QSMInputError
    from .field_runner import FieldListener, PipelineCancelled, run_field, run_field_and_reconstruction
    from .runner import RunListener, run_reconstruction

    class JsonListener(RunListener):
        def started(self, info):
            emitter.emit("started", device=info.device, method=info.method,
                         max_iterations=info.max_iterations, warnings=info.warnings)

        def progress(self, progress):
            emitter.emit("progress", iteration=progress.iteration, max_iterations=progress.max_iterations,
                         loss=float(progress.loss), elapsed_s=progress.elapsed_s, remaining_s=progress.remaining_s)

        def snapshot(self, iteration, path, metrics):
            emitter.emit("snapshot", iteration=iteration, path=path, metrics=metrics)

        def cancel_requested(self):
            return cancel["requested"]

    class StageListener(FieldListener):
        def stage(self, report, count, volumes):
            emitter.emit("stage", name=report.name, index=report.index, count=count, seconds=report.seconds,
                         notes=list(report.notes), volumes=volumes)

        def cancel_requested(self):
            return cancel["requested"]

    def reconstruct(request):
        return run_reconstruction(request, JsonListener(), write_output_when_cancelled=False)

    started = time.perf_counter()
    try:
        with open(job_path, "r", encoding="utf-8") as handle:
            job = json.load(handle)
        request = parse_job(job)
        kept: Dict[str, str] = {}
        if not isinstance(request, PhaseJob):
            result = reconstruct(request)
        elif request.reconstruction is None:
            field_run = run_field(request.field_request, StageListener())
            emitter.emit("done", path=field_run.written.get("local field"), stop_reason="completed", iterations=0,
                         elapsed_s=time.perf_counter() - started, metrics=None, field_outputs=_named(field_run.written))
            return EXIT_OK
        else:
            field_run, result = run_field_and_reconstruction(
                request.field_request, request.reconstruction, request.keep, listener=StageListener(), run=reconstruct)
            kept = _named(field_run.written)
    except PipelineCancelled as error:
        emitter.emit("error", kind="cancelled", message=str(error))
        return EXIT_CANCELLED
    except QSMInputError as error:
        emitter.emit("error", kind="input", message=str(error))
        return EXIT_INPUT
    except (OSError, ValueError) as error:
        if is_out_of_memory(error):
            emitter.emit("error", kind="out_of_memory", message=_one_line(error))
            return EXIT_OUT_OF_MEMORY
        kind = "input" if isinstance(error, (FileNotFoundError, json.JSONDecodeError)) else "internal"
        emitter.emit("error", kind=kind, message=f"{type(error).__name__}: {_one_line(error)}")
        return EXIT_INPUT if kind == "input" else EXIT_INTERNAL
    except MissingDependencyError as error:
        emitter.emit("error", kind="missing_dependency", message=str(error))
        return EXIT_MISSING_DEPENDENCY
    except BaseException as error:  # the worker must always report, whatever broke
        if isinstance(error, KeyboardInterrupt):
            emitter.emit("error", kind="cancelled", message="cancelled")
            return EXIT_CANCELLED
        if is_out_of_memory(error):
            emitter.emit("error", kind="out_of_memory", message=_one_line(error))
            return EXIT_OUT_OF_MEMORY
        traceback.print_exc(file=sys.stderr)
        emitter.emit("error", kind="internal", message=f"{type(error).__name__}: {_one_line(error)}")
        return EXIT_INTERNAL
    if result.stop_reason == "cancelled":
        emitter.emit("error", kind="cancelled", message=f"cancelled after {result.iterations} iterations")
        return EXIT_CANCELLED
    extra = {"field_outputs": kept} if isinstance(request, PhaseJob) else {}
    emitter.emit("done", path=result.output_path, stop_reason=result.stop_reason, iterations=result.iterations,
                 elapsed_s=result.elapsed_s, metrics=result.metrics, **extra)
    return EXIT_OK


def _named(written: Dict[str, str]) -> Dict[str, str]:
    """Output roles as the protocol names them ("local field" -> "local_field")."""
    return {role.replace(" ", "_"): os.fspath(path) for role, path in written.items()}


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def main(argv: Optional[list] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        sys.stderr.write("usage: python -m qsmdip.worker JOB.json   (see docs/WORKER_PROTOCOL.md)\n")
        return EXIT_INPUT
    return run(args[0])


if __name__ == "__main__":
    sys.exit(main())
