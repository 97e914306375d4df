"""Plan a cohort, run it on Dask, and keep ``qsmdip_batch.tsv`` up to date as subjects finish.

A plan sorts every acquisition into *run* (no outputs yet, incomplete ones, or inputs changed since),
*skip* (outputs current: same configuration, same inputs) and *conflict* (outputs made with other
settings: refused unless ``overwrite``, so an earlier result is never replaced by mistake).

Exit codes (:func:`exit_code`): 0 when every acquisition is done or skipped, 1 when any failed or was
refused; the command line adds 2 for bad input and 130 for Ctrl-C.
"""
from __future__ import annotations

import csv
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from .. import __version__
from ..errors import QSMInputError
from . import provenance
from .cluster import ClusterHandle, ClusterOptions, start
from .discovery import Acquisition, discover_bids, read_manifest
from .task import STATE_DIR, BatchJob, Outcome, attempts_file, process_acquisition, read_attempts

SUMMARY_NAME = "qsmdip_batch.tsv"
SUMMARY_COLUMNS = ("prefix", "subject", "session", "status", "seconds", "attempts", "error")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class BatchRequest:
    """One ``qsmdip batch`` run; command-line flags map onto these fields."""

    input_path: str                     #: BIDS root, or the CSV manifest with kind "localfield"
    out_root: str                       #: the derivatives folder
    kind: str = "bids"
    participants: List[str] = field(default_factory=list)
    method: str = "dip"
    preset: Optional[str] = None
    settings: Dict[str, Any] = field(default_factory=dict)
    pipeline: Dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    retries: int = 2                    #: extra attempts for a subject whose worker died
    overwrite: bool = False             #: replace outputs made with other settings
    cluster: ClusterOptions = field(default_factory=ClusterOptions)


@dataclass
class Plan:
    acquisitions: List[Acquisition]
    config: Dict[str, Any]
    config_hash: str
    to_run: List[Acquisition]
    skipped: List[Acquisition]
    conflicts: List[Acquisition]
    reasons: Dict[str, str]             #: prefix -> why it runs (absent, incomplete, inputs-changed...)


class BatchListener:
    """Hooks the command line overrides; the defaults do nothing."""

    def cluster_ready(self, description: str, dashboard: Optional[str]) -> None:
        """Workers are up (``dashboard``: the Dask dashboard's address, when there is one)."""

    def finished(self, outcome: Outcome, done: int, total: int) -> None:
        """One acquisition ended (done or failed)."""


def plan_batch(request: BatchRequest) -> Plan:
    """Find the acquisitions and decide, without running anything, what runs, what is skipped, what conflicts."""
    if request.kind not in ("bids", "localfield"):
        raise QSMInputError(f"unknown --input {request.kind!r}: use bids or localfield")
    if request.retries < 0:
        raise QSMInputError(f"--retries must be 0 or more, got {request.retries}")
    if str(request.device).lower() not in DEVICES:
        raise QSMInputError(f"unknown device {request.device!r} for batch: use one of {', '.join(DEVICES)}")
    options = request.cluster
    if str(request.device).lower() == "cuda" and not options.scheduler and not options.gpus:
        raise QSMInputError("--device cuda, but no worker has a GPU (use --gpus N)")
    if request.kind == "bids":
        acquisitions = discover_bids(Path(request.input_path), request.participants)
    else:
        acquisitions = read_manifest(Path(request.input_path), request.participants)
    out = Path(request.out_root)
    _check_out_root(out, Path(request.input_path))
    config = provenance.configuration(request.method, request.preset, request.settings, request.pipeline, request.kind)
    config_hash = provenance.configuration_hash(config)
    to_run, skipped, conflicts, reasons = [], [], [], {}
    for acq in acquisitions:
        state = provenance.output_state(acq, out, config_hash, _input_root(request))
        if state == provenance.DONE:
            skipped.append(acq)
        elif state == provenance.OTHER_SETTINGS and not request.overwrite:
            conflicts.append(acq)
        else:
            to_run.append(acq)
            reasons[acq.prefix] = state
    return Plan(acquisitions, config, config_hash, to_run, skipped, conflicts, reasons)


def run_batch(request: BatchRequest, plan: Plan, listener: Optional[BatchListener] = None, *,
              verbose: bool = False) -> List[Outcome]:
    """Run ``plan.to_run`` on the cluster; return one outcome per acquisition (skipped and refused included).

    The summary is rewritten after every subject. Ctrl-C cancels the remaining subjects, records them as
    cancelled, closes the cluster and re-raises :class:`KeyboardInterrupt`.
    """
    listener = listener or BatchListener()
    out = Path(request.out_root)
    outcomes: Dict[str, Outcome] = {}
    for acq in plan.skipped:
        outcomes[acq.prefix] = Outcome(acq.prefix, acq.subject, acq.session, "skipped")
    for acq in plan.conflicts:
        outcomes[acq.prefix] = Outcome(acq.prefix, acq.subject, acq.session, "conflict",
                                       error="outputs exist from other settings: use another --out, or --overwrite")
    for acq in plan.to_run:
        outcomes[acq.prefix] = Outcome(acq.prefix, acq.subject, acq.session, "pending")
    out.mkdir(parents=True, exist_ok=True)
    with _Lock(out):
        if not plan.to_run:
            write_summary(out, list(outcomes.values()))
            return list(outcomes.values())
        handle = start(request.cluster, allowed_failures=request.retries, verbose=verbose)
        try:
            device = _device(request.device, handle)
            _write_dataset_description(out, _input_root(request))
            write_summary(out, list(outcomes.values()))
            _prepare_state(out, plan.to_run)
            job = BatchJob(out_root=str(out.resolve()), method=request.method, preset=request.preset,
                           settings=dict(request.settings), pipeline=dict(request.pipeline), device=device,
                           threads=handle.threads, input_root=_input_root(request), config=plan.config,
                           config_hash=plan.config_hash)
            listener.cluster_ready(handle.description, handle.dashboard_link)
            _run_on(handle, job, plan.to_run, outcomes, listener, out)
        finally:
            handle.close()
            shutil.rmtree(out / STATE_DIR / "staging", ignore_errors=True)
    return list(outcomes.values())


def _run_on(handle: ClusterHandle, job: BatchJob, acquisitions: List[Acquisition], outcomes: Dict[str, Outcome],
            listener: BatchListener, out: Path) -> None:
    from distributed import as_completed

    resources = handle.resources(job.device)
    # a key of this run only: a scheduler that already holds a key (another --out's sub-01, or a cancelled run's
    # task still running) keeps its task and hands that task's result to the new future
    run = uuid.uuid4().hex[:8]
    futures = {}
    for acq in acquisitions:
        future = handle.client.submit(process_acquisition, acq, job, key=f"qsmdip-{acq.prefix}-{run}",
                                      pure=False, resources=resources)
        futures[future] = acq
    done = 0
    try:
        for future in as_completed(list(futures)):
            acq = futures[future]
            outcome = _outcome_of(future, acq, out, job)
            outcomes[acq.prefix] = outcome
            done += 1
            write_summary(out, list(outcomes.values()))
            listener.finished(outcome, done, len(acquisitions))
    except KeyboardInterrupt:
        handle.client.cancel(list(futures))
        for acq in acquisitions:
            if outcomes[acq.prefix].status == "pending":
                outcomes[acq.prefix] = Outcome(acq.prefix, acq.subject, acq.session, "cancelled",
                                               error="interrupted (Ctrl-C)",
                                               attempts=read_attempts(out, acq.prefix))
        write_summary(out, list(outcomes.values()))
        raise


def _outcome_of(future: Any, acq: Acquisition, out: Path, job: BatchJob) -> Outcome:
    """A finished future's outcome; a task that never returned (its workers kept dying) becomes a failure."""
    try:
        return future.result()
    except Exception as error:  # noqa: BLE001 - KilledWorker, or a task that could not even start
        attempts = read_attempts(out, acq.prefix)
        if type(error).__name__ == "KilledWorker":
            message = (f"its worker died {attempts} time(s) (killed, or out of memory): gave up after"
                       f" {attempts} attempt(s)")
        else:
            message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        return Outcome(acq.prefix, acq.subject, acq.session, "failed", error=message, attempts=attempts)


def exit_code(outcomes: List[Outcome]) -> int:
    return 0 if all(o.status in ("done", "skipped") for o in outcomes) else 1


def write_summary(out: Path, outcomes: List[Outcome]) -> Path:
    """``qsmdip_batch.tsv``: this run's rows, plus earlier rows of acquisitions this run did not touch."""
    path = Path(out) / SUMMARY_NAME
    rows: Dict[str, Dict[str, str]] = {}
    if path.is_file():
        try:
            with open(path, newline="") as handle:
                for row in csv.DictReader(handle, delimiter="\t"):
                    if row.get("prefix"):
                        rows[row["prefix"]] = row
        except (OSError, csv.Error):
            rows = {}
    for o in outcomes:
        rows[o.prefix] = {"prefix": o.prefix, "subject": o.subject, "session": o.session or "n/a",
                          "status": o.status, "seconds": f"{o.seconds:.1f}", "attempts": str(o.attempts),
                          "error": o.error.replace("\t", " ").replace("\n", " ")}
    tmp = path.with_name(f".tmp-{os.getpid()}-{SUMMARY_NAME}")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=SUMMARY_COLUMNS, delimiter="\t", extrasaction="ignore",
                                lineterminator="\n")
        writer.writeheader()
        for prefix in sorted(rows):
            writer.writerow(rows[prefix])
    os.replace(tmp, path)
    return path


def _device(choice: str, handle: ClusterHandle) -> str:
    choice = str(choice).lower()
    if choice == "cuda" and not handle.gpu_workers:
        raise QSMInputError("--device cuda, but no worker has a GPU (use --gpus N, or start workers with"
                            " --resources GPU=1)")
    if choice == "auto":
        return "cuda" if handle.gpu_workers else "cpu"
    return choice


def _prepare_state(out: Path, acquisitions: List[Acquisition]) -> None:
    """Forget earlier attempt counts of the subjects about to run, and any staging a killed run left."""
    shutil.rmtree(out / STATE_DIR / "staging", ignore_errors=True)
    for acq in acquisitions:
        try:
            attempts_file(out, acq.prefix).unlink()
        except FileNotFoundError:
            pass


def _input_root(request: BatchRequest) -> str:
    """The folder inputs are named relative to: absolute like discovery's paths, symbolic links kept (a
    resolved root would not be a prefix of the inputs' paths under a linked folder)."""
    path = Path(os.path.abspath(request.input_path))
    return str(path if request.kind == "bids" else path.parent)


def _check_out_root(out: Path, input_path: Path) -> None:
    if out.exists() and not out.is_dir():
        raise QSMInputError(f"--out {out} is a file, not a folder")
    if out.resolve() == input_path.resolve():
        raise QSMInputError(f"--out {out} is the input dataset: give a derivatives folder (e.g. {input_path}/derivatives/qsmdip)")
    for parent in [out.resolve()] + list(out.resolve().parents):
        if parent.exists():
            if not os.access(parent, os.W_OK):
                raise QSMInputError(f"cannot write {out}: {parent} is not writable")
            break


def _write_dataset_description(out: Path, input_root: str) -> None:
    """BIDS derivative's description (kept when one exists); ``raw`` links the sidecars' ``bids:raw:`` sources."""
    path = out / "dataset_description.json"
    if path.exists():
        return
    provenance.write_json(path, {
        "Name": "QSMDIP susceptibility maps", "BIDSVersion": "1.10.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "QSMDIP", "Version": __version__,
                         "Description": "QSM by Deep Image Prior, with TKD, Tikhonov and TV baselines"}],
        "DatasetLinks": {"raw": Path(input_root).as_uri()}})


class _Lock:
    """``OUT/.qsmdip-batch/lock``: refuses a second batch writing into the same folder at once."""

    def __init__(self, out: Path):
        self.path = out / STATE_DIR / "lock"

    def __enter__(self) -> "_Lock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if not self._stale():
                    holder = self.path.read_text().strip()
                    raise QSMInputError(f"another qsmdip batch ({holder}) is writing into {self.path.parent.parent};"
                                        f" wait for it, or delete {self.path} if it is gone") from None
                self.path.unlink()
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
            return self
        raise QSMInputError(f"cannot take the lock {self.path}")

    def _stale(self) -> bool:
        """A lock left by a process of this host that no longer runs."""
        try:
            words = self.path.read_text().split()
            pid, host = int(words[1]), words[3]
        except (OSError, ValueError, IndexError):
            return False
        if host != socket.gethostname():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def __exit__(self, *exc: Any) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
