"""Background worker: ``python -m qsmdip.worker JOB.json`` (protocol in docs/WORKER_PROTOCOL.md).

Runs one reconstruction for a GUI in another process and reports on stdout as versioned JSON lines.
It never lets a traceback be the only message: every failure ends in an ``error`` line with the
worker's own words and a distinct exit status.
"""
from __future__ import annotations

import json
import math
import signal
import sys
import traceback
from typing import Any, Dict, Optional, TextIO

from .errors import is_out_of_memory

PROTOCOL_VERSION = 1

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
    """Turn a job dictionary (protocol 1) into a ReconstructionRequest; a badly typed value is an input error."""
    from .errors import QSMInputError
    from .runner import request_from_dict

    if not isinstance(job, dict):
        raise QSMInputError(f"the job file must hold one JSON object of key: value pairs, got {_json_type(job)}")
    version = job.get("protocol")
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise QSMInputError(f"job protocol {version!r} is not supported (this worker speaks {PROTOCOL_VERSION})")
    unknown = sorted(set(job) - set(_JOB_KEYS) - {"protocol"})
    if unknown:
        raise QSMInputError(f"unknown job keys: {', '.join(unknown)}")
    data = {_JOB_KEYS[k]: v for k, v in job.items() if k in _JOB_KEYS and v is not None}
    return request_from_dict(data, names={field: key for key, field in _JOB_KEYS.items()})


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

    try:
        with open(job_path, "r", encoding="utf-8") as handle:
            job = json.load(handle)
        request = parse_job(job)
        result = run_reconstruction(request, JsonListener(), write_output_when_cancelled=False)
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
    emitter.emit("done", path=result.output_path, stop_reason=result.stop_reason, iterations=result.iterations,
                 elapsed_s=result.elapsed_s, metrics=result.metrics)
    return EXIT_OK


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
