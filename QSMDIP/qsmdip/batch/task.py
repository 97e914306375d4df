"""Reconstruct one acquisition of a cohort, in whatever process runs it (a Dask worker, or a plain loop).

Nothing here imports Dask. :func:`process_acquisition` never raises for a bad subject: every failure
(bad input, out of memory, a bug) comes back as an :class:`Outcome` with one error line, so one subject
cannot stop the others. Only the death of the process itself (killed, out of memory at the OS level)
escapes, and the scheduler retries the subject elsewhere.

The outputs are made in a private staging folder under ``OUT/.qsmdip-batch/staging`` and renamed into
``OUT/sub-X/[ses-Y/]anat`` only when all of them exist, sidecars last and the Chimap's sidecar very last,
so a killed worker leaves no half-written or unexplained file among the derivatives.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from ..errors import QSMInputError, is_out_of_memory
from . import provenance
from ..phase.files import sidecar_path
from .discovery import Acquisition

#: the folder under the derivatives root that holds the batch's own bookkeeping
STATE_DIR = ".qsmdip-batch"


@dataclass(frozen=True)
class BatchJob:
    """What every acquisition of one batch run shares (sent to each worker with its acquisition)."""

    out_root: str
    method: str = "dip"
    preset: Optional[str] = None
    settings: Dict[str, Any] = field(default_factory=dict)      #: solver overrides (``--set``)
    pipeline: Dict[str, Any] = field(default_factory=dict)      #: phase-pipeline overrides (--unwrap, --bfr)
    device: str = "cpu"                                         #: "cpu" or "cuda": fixed before submission
    threads: int = 1                                            #: torch threads per task
    input_root: Optional[str] = None                            #: inputs are named relative to it
    config: Dict[str, Any] = field(default_factory=dict)        #: :func:`provenance.configuration`
    config_hash: str = ""


@dataclass
class Outcome:
    """How one acquisition ended; one row of ``qsmdip_batch.tsv``."""

    prefix: str
    subject: str
    session: Optional[str]
    status: str                    #: done, skipped, failed, conflict, cancelled
    seconds: float = 0.0
    error: str = ""
    attempts: int = 0
    details: Dict[str, Any] = field(default_factory=dict)  #: stop reason, iterations, device (for the log)


def attempts_file(out_root: Path, prefix: str) -> Path:
    """Where a task counts its starts (and names its process id, so a test or an operator can find it)."""
    return Path(out_root) / STATE_DIR / "attempts" / f"{prefix}.json"


def process_acquisition(acquisition: Acquisition, job: BatchJob) -> Outcome:
    """Make one acquisition's Chimap, local field and mask with their sidecars; never raises for bad input."""
    start = time.perf_counter()
    attempts = _count_attempt(Path(job.out_root), acquisition.prefix)
    staging = Path(job.out_root) / STATE_DIR / "staging" / f"{acquisition.prefix}-{uuid.uuid4().hex[:8]}"
    outcome = Outcome(acquisition.prefix, acquisition.subject, acquisition.session, "failed", attempts=attempts)
    try:
        import torch

        torch.set_num_threads(max(1, int(job.threads)))
        staging.mkdir(parents=True)
        record = _reconstruct(acquisition, job, staging)
        record["Attempts"] = attempts
        record["Seconds"]["total"] = round(time.perf_counter() - start, 2)
        _publish(acquisition, job, staging, record)
        outcome.status = "done"
        outcome.details = {k: record[k] for k in ("StopReason", "Iterations", "Device")}
    except QSMInputError as error:
        outcome.error = str(error)
    except (MemoryError, RuntimeError) as error:
        if is_out_of_memory(error):
            outcome.error = f"out of memory ({str(error).splitlines()[0] if str(error) else 'MemoryError'})"
        else:
            outcome.error = _bug(error)
    except Exception as error:  # noqa: BLE001 - one subject's bug must not stop the cohort; it is reported
        outcome.error = _bug(error)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    outcome.seconds = round(time.perf_counter() - start, 2)
    return outcome


def _reconstruct(acquisition: Acquisition, job: BatchJob, staging: Path) -> Dict[str, Any]:
    """Run the field stage (BIDS) and the inversion into ``staging``; return the sidecar's QSMDIP record."""
    from ..field_runner import FieldRequest, run_field_and_reconstruction
    from ..runner import ReconstructionRequest, run_reconstruction

    files = {role: staging / Path(path).name for role, path in acquisition.outputs(staging).items()}
    request = ReconstructionRequest(field_path=acquisition.field or "", mask_path=acquisition.mask or "",
                                    output_path=str(files["chimap"]), method=job.method, preset=job.preset,
                                    magnitude_path=acquisition.magnitude_3d, device=job.device,
                                    settings=dict(job.settings))
    record: Dict[str, Any] = {}
    if acquisition.kind == "bids":
        field_request = FieldRequest(phase_paths=list(acquisition.phase),
                                     magnitude_paths=list(acquisition.magnitude) or None,
                                     field_output_path=str(files["local_field"]), mask_output_path=str(files["mask"]),
                                     pipeline=dict(job.pipeline))
        field_run, result = run_field_and_reconstruction(
            field_request, request, {"local field": str(files["local_field"]), "mask": str(files["mask"])})
        record.update(EchoTimes=list(field_run.echo_times_s), MagneticFieldStrength=field_run.b0_tesla,
                      B0DirectionVoxel=[round(float(x), 6) for x in field_run.b0_dir_voxel],
                      Notes=list(field_run.result.notes) + list(result.warnings))
        field_seconds = round(sum(field_run.result.seconds.values()), 2)
    else:
        result = run_reconstruction(request)
        _copy_field_and_mask(acquisition, files)
        record["Notes"] = list(result.warnings)
        field_seconds = 0.0
    if result.output_path is None:
        raise QSMInputError(f"the reconstruction stopped ({result.stop_reason}) and wrote no map")
    record.update(StopReason=result.stop_reason, Iterations=result.iterations, Device=result.device,
                  TorchThreads=int(job.threads),
                  ChosenWeights=provenance.plain(result.chosen),
                  Seconds={"field": field_seconds, "inversion": round(result.elapsed_s, 2)})
    return record


def _copy_field_and_mask(acquisition: Acquisition, files: Dict[str, Path]) -> None:
    """A local-field input's field and (binarised) mask, copied beside the Chimap so the outputs stand alone."""
    from .. import io as qio
    from ..validation import binarise_mask

    field_volume = qio.read_volume(acquisition.field)
    mask, _ = binarise_mask(qio.read_volume(acquisition.mask).array)
    qio.write_volume(files["local_field"], field_volume.array, like=field_volume)
    qio.write_volume(files["mask"], mask.astype("float32"), like=field_volume)


def _publish(acquisition: Acquisition, job: BatchJob, staging: Path, record: Dict[str, Any]) -> None:
    """Write the sidecars into staging, then rename images, sidecars and last the Chimap's sidecar into place."""
    targets = acquisition.outputs(Path(job.out_root))
    targets["chimap"].parent.mkdir(parents=True, exist_ok=True)
    input_root = Path(job.input_root) if job.input_root else None
    versions = provenance.software_versions()
    shared = {"QSMDIPVersion": versions["qsmdip"], **job.config,
              "ConfigurationHash": job.config_hash, **record,
              "InputChecksums": provenance.fingerprints(acquisition.input_files(), input_root),
              "SoftwareVersions": versions, "Host": provenance.host()}
    descriptions = {"chimap": ("ppm", "Susceptibility map (chi) inside the mask, 0 outside"),
                    "local_field": ("ppm", "Local field after background-field removal, in ppm of B0"),
                    "mask": ("", "Mask the local field and the Chimap are valid in (1 inside)")}
    # inputs below the dataset's root as BIDS URIs of the link "raw" (dataset_description.json), others as paths
    sources = sorted(name if os.path.isabs(name) else f"bids:raw:{name}" for name in shared["InputChecksums"])
    for role, path in targets.items():
        units, description = descriptions[role]
        data = {"Description": description, **({"Units": units} if units else {}), "Sources": sources,
                "QSMDIP": shared}
        provenance.write_json(staging / sidecar_path(path).name, data)
    chimap_sidecar = sidecar_path(targets["chimap"])
    if chimap_sidecar.exists():  # an older record must never vouch for the new images, even for a moment
        chimap_sidecar.unlink()
    for role, path in targets.items():
        os.replace(staging / path.name, path)
    for role in ("local_field", "mask", "chimap"):
        side = sidecar_path(targets[role])
        os.replace(staging / side.name, side)


def read_attempts(out_root: Path, prefix: str) -> int:
    """How many times the subject's task has started in this run (0 before the first)."""
    try:
        return int(json.loads(attempts_file(out_root, prefix).read_text())["attempts"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _count_attempt(out_root: Path, prefix: str) -> int:
    path = attempts_file(out_root, prefix)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = read_attempts(out_root, prefix) + 1
    provenance.write_json(path, {"attempts": count, "pid": os.getpid(), "host": provenance.host()})
    return count


def _bug(error: BaseException) -> str:
    """An unexpected error as one line: its type, message and where it was raised."""
    frame = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    where = f" at {Path(frame.filename).name}:{frame.lineno}" if frame else ""
    message = str(error).splitlines()[0] if str(error) else ""
    return f"internal error {type(error).__name__}{where}: {message}"

