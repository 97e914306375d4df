"""``qsmdip batch``: a cohort from a BIDS dataset (or a CSV of local fields) on a Dask cluster.

A thin layer over :mod:`qsmdip.batch.engine`: flags map onto :class:`BatchRequest`, each finished subject
is one line on stderr under a progress bar, and the exit status is 0 (all done or skipped), 1 (some
subject failed or was refused; see ``qsmdip_batch.tsv``), 2 (bad input) or 130 (Ctrl-C).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Optional


def add_batch_parser(sub: Any) -> None:
    """The ``batch`` subcommand's flags."""
    from .batch.cluster import JOBQUEUE_KINDS
    from .cli_field import PIPELINE_FLAGS
    from .phase.background import BACKGROUND_REMOVERS
    from .phase.offsets import OFFSET_METHODS
    from .phase.unwrap import UNWRAPPERS
    from .solvers import METHODS

    bt = sub.add_parser(
        "batch", help="reconstruct a cohort: a BIDS dataset of multi-echo GRE, on a Dask cluster",
        description="Reconstruct every subject, session and run of a BIDS dataset (*_echo-N_part-phase_MEGRE and "
                    "part-mag, with EchoTime and MagneticFieldStrength in the JSON sidecars): phase to local field, "
                    "then the inversion. Outputs are BIDS derivatives (sub-X[/ses-Y]/anat/*_Chimap.nii.gz in ppm, "
                    "the local field and the mask), each with a JSON sidecar of the settings, chosen weights, "
                    "device, seconds, input checksums and software versions, and qsmdip_batch.tsv with one row per "
                    "acquisition. Subjects whose outputs are current are skipped, so a rerun resumes. Needs "
                    "pip install 'qsmdip[batch]'.")
    bt.add_argument("input", help="the BIDS dataset's root (or, with --input localfield, a CSV manifest with the "
                                  "columns subject,field,mask[,session][,magnitude]; fields in ppm)")
    bt.add_argument("--out", required=True, help="the derivatives folder to write (e.g. BIDS/derivatives/qsmdip)")
    bt.add_argument("--input", dest="kind", choices=("bids", "localfield"), default="bids",
                    help="bids: raw multi-echo GRE (default); localfield: a CSV manifest of local fields")
    bt.add_argument("--participant-label", nargs="+", default=[], metavar="LABEL",
                    help="only these subjects (with or without sub-)")
    bt.add_argument("--method", choices=METHODS, default=None,
                    help="single-step-tv (default with --input bids: it inverts the total field), dip (default with "
                         "--input localfield), tkd, tikhonov, tv")
    bt.add_argument("--preset", default=None, help="settings preset (see qsmdip reconstruct --help)")
    bt.add_argument("--iterations", type=int, default=None, help="iterations (iterative methods)")
    bt.add_argument("--seed", type=int, default=None, help="random seed (dip, tv)")
    bt.add_argument("--max-seconds", type=float, default=None, help="wall-time limit per subject's inversion")
    bt.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="override any setting of the method (repeatable)")
    bt.add_argument("--unwrap", choices=sorted(UNWRAPPERS), default=None, help="phase unwrapping")
    bt.add_argument("--bfr", choices=sorted(BACKGROUND_REMOVERS), default=None, help="background-field removal")
    bt.add_argument("--offsets", choices=list(OFFSET_METHODS), default=None, help="phase offsets shared by the echoes")
    bt.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: the GPU workers when there are any, else the CPU")
    bt.add_argument("--workers", type=int, default=None,
                    help="local: CPU worker processes (default: as many as cores and memory allow); "
                         "--cluster: jobs to submit (default 1)")
    bt.add_argument("--threads", type=int, default=1, help="torch threads per subject (default 1)")
    bt.add_argument("--gpus", type=int, default=None,
                    help="local: GPU workers, one per GPU (default: every GPU torch sees, unless --device cpu); "
                         "--cluster: GPUs per job, 0 or 1")
    bt.add_argument("--scheduler", default=None, metavar="ADDRESS",
                    help="use an existing Dask cluster, e.g. tcp://host:8786")
    bt.add_argument("--cluster", choices=JOBQUEUE_KINDS, default=None,
                    help="submit workers as HPC jobs through dask-jobqueue")
    bt.add_argument("--cores", type=int, default=None, help="--cluster: cores per job")
    bt.add_argument("--memory", default=None, help="--cluster: memory per job, e.g. 16GB")
    bt.add_argument("--walltime", default=None, help="--cluster: wall time per job, e.g. 02:00:00")
    bt.add_argument("--queue", default=None, help="--cluster: queue or partition")
    bt.add_argument("--job-directive", action="append", default=[], metavar="LINE",
                    help="--cluster: an extra scheduler directive, e.g. --account=abc (repeatable)")
    bt.add_argument("--retries", type=int, default=2,
                    help="times a subject is retried when its worker dies (killed, out of memory); default 2 "
                         "(with --scheduler, that scheduler's allowed-failures applies)")
    bt.add_argument("--overwrite", action="store_true",
                    help="replace outputs made with other settings (default: refuse them in the summary)")
    bt.add_argument("--dry-run", action="store_true", help="list what would run and what would be skipped; run nothing")
    bt.add_argument("--no-progress", action="store_true", help="no progress bar")
    bt.set_defaults(pipeline_flags=PIPELINE_FLAGS)


def batch_request(args: argparse.Namespace):
    from .batch.cluster import ClusterOptions
    from .batch.engine import BatchRequest
    from .cli import solver_overrides
    from .errors import QSMInputError
    from .solvers import default_method

    if args.scheduler and args.cluster:
        raise QSMInputError("give --scheduler or --cluster, not both")
    jobqueue_only = [f"--{name}" for name in ("cores", "memory", "walltime", "queue")
                     if getattr(args, name) is not None] + (["--job-directive"] if args.job_directive else [])
    if jobqueue_only and not args.cluster:
        raise QSMInputError(f"{', '.join(jobqueue_only)} only with --cluster")
    ignored = [f"--{name}" for name in ("workers", "gpus") if getattr(args, name) is not None]
    if args.scheduler and ignored:  # an existing cluster's workers are as they were started
        raise QSMInputError(f"{', '.join(ignored)} do(es) not apply to --scheduler: the cluster's own workers run the"
                            " subjects (start GPU workers with --resources GPU=1)")
    if args.kind == "localfield" and any(getattr(args, flag) for flag in args.pipeline_flags):
        raise QSMInputError("--unwrap, --bfr and --offsets apply to --input bids only")
    gpus = args.gpus
    if gpus is None:
        gpus = _visible_gpus() if args.device != "cpu" and not args.cluster and not args.scheduler else 0
    workers = args.workers
    if workers is None and gpus and args.device != "cpu" and not args.cluster:
        workers = 0  # every subject goes to a GPU: CPU workers would only sit idle
    options = ClusterOptions(scheduler=args.scheduler, kind=args.cluster, workers=workers, threads=args.threads,
                             gpus=gpus, cores=args.cores, memory=args.memory, walltime=args.walltime,
                             queue=args.queue, job_directives=list(args.job_directive))
    pipeline = {field: getattr(args, flag) for flag, field in args.pipeline_flags.items() if getattr(args, flag)}
    if args.method is None:
        args.method = default_method(args.kind == "bids")
    return BatchRequest(input_path=args.input, out_root=args.out, kind=args.kind,
                        participants=list(args.participant_label), method=args.method, preset=args.preset,
                        settings=solver_overrides(args), pipeline=pipeline, device=args.device,
                        retries=args.retries, overwrite=args.overwrite, cluster=options)


def cmd_batch(args: argparse.Namespace) -> int:
    from .batch.engine import exit_code, plan_batch, run_batch

    from .solvers import from_phase_note

    request = batch_request(args)
    plan = plan_batch(request)
    total = len(plan.acquisitions)
    print(f"qsmdip batch: {total} acquisition(s): {len(plan.to_run)} to run, {len(plan.skipped)} skipped (outputs "
          f"current), {len(plan.conflicts)} refused (outputs from other settings); configuration {plan.config_hash}",
          file=sys.stderr)
    note = from_phase_note(request.method) if request.kind == "bids" else None
    if note:
        print(f"qsmdip batch: note: {note}", file=sys.stderr)
    if args.dry_run:
        for acq in plan.acquisitions:
            state = ("run (" + plan.reasons[acq.prefix] + ")" if acq in plan.to_run
                     else "skip" if acq in plan.skipped else "refuse (other settings; --overwrite replaces them)")
            print(f"{acq.prefix}\t{state}")
        return 0
    printer = _Printer(enabled=not args.no_progress, total=len(plan.to_run))
    try:
        outcomes = run_batch(request, plan, printer, verbose=args.verbose)
    finally:
        printer.close()
    counts = {}
    for outcome in outcomes:
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
    print("qsmdip batch: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
          + f"; summary in {args.out}/qsmdip_batch.tsv", file=sys.stderr)
    return exit_code(outcomes)


class _Printer:
    """A tqdm bar over subjects, and one line per finished subject (kept above the bar)."""

    def __init__(self, *, enabled: bool, total: int):
        self.bar: Optional[Any] = None
        self.enabled = enabled
        self.total = total

    def cluster_ready(self, description: str, dashboard: Optional[str]) -> None:
        print(f"qsmdip batch: running on {description}" + (f"; dashboard {dashboard}" if dashboard else ""),
              file=sys.stderr)
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, unit="subject", file=sys.stderr, dynamic_ncols=True)

    def finished(self, outcome: Any, done: int, total: int) -> None:
        text = f"{outcome.prefix}: {outcome.status} in {outcome.seconds:.1f} s"
        if outcome.attempts > 1:
            text += f" (attempt {outcome.attempts})"
        if outcome.error:
            text += f": {outcome.error}"
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
            self.bar.update(1)
        else:
            print(f"[{done}/{total}] {text}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
