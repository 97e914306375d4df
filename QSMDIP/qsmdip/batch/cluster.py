"""Start or join the Dask cluster a batch runs on: local processes, an existing scheduler, or HPC jobs.

- **local** (default): one worker process per subject slot (``--workers``, default: as many as the cores
  and memory allow at ``--threads`` torch threads and 4 GB each), plus one per GPU (``--gpus``): a GPU
  worker sees only its own device (``CUDA_VISIBLE_DEVICES``) and declares the resource ``GPU=1``.
- **scheduler** (``--scheduler tcp://host:8786``): an existing cluster; its workers are as they were
  started (give them ``--resources GPU=1`` for GPU subjects).
- **slurm / pbs / sge** (``--cluster``): dask-jobqueue submits ``--jobs`` jobs of ``--cores`` cores,
  ``--memory``, ``--walltime`` on ``--queue``; extra scheduler directives via ``--job-directive``.

Workers this module starts declare the resource ``subject=1`` (and ``GPU=1`` where they own a GPU); each
task asks for ``subject=1``, so a worker reconstructs one subject at a time with all its threads, and
GPU tasks also ask for ``GPU=1``, so one runs per GPU and CPU tasks never hold a GPU slot.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ..errors import MissingDependencyError, QSMInputError

JOBQUEUE_KINDS = ("slurm", "pbs", "sge")
GB = 1024 ** 3
#: memory each local worker should have for one subject (DIP at 2 mm needs about 2 GB)
LOCAL_MEMORY_PER_WORKER = 4 * GB


@dataclass
class ClusterOptions:
    scheduler: Optional[str] = None        #: address of an existing scheduler
    kind: Optional[str] = None             #: slurm, pbs, sge (dask-jobqueue); None: local
    workers: Optional[int] = None          #: local: worker processes; jobqueue: jobs
    threads: int = 1                       #: torch threads per subject
    gpus: int = 0                          #: local: GPU workers; jobqueue: GPUs per job (0 or 1)
    cores: Optional[int] = None            #: jobqueue: cores per job
    memory: Optional[str] = None           #: jobqueue: memory per job ("16GB")
    walltime: Optional[str] = None         #: jobqueue: "02:00:00"
    queue: Optional[str] = None            #: jobqueue: queue or partition
    job_directives: List[str] = field(default_factory=list)  #: jobqueue: extra #SBATCH/#PBS/#$ lines
    dashboard: bool = True


@dataclass
class ClusterHandle:
    """A connected client and what the submitter needs to know about the workers."""

    client: Any
    cluster: Any                   #: None for an existing scheduler (it is not ours to close)
    description: str
    owns_workers: bool             #: True when the workers declare ``subject=1`` (we started them)
    gpu_workers: int
    threads: int

    @property
    def dashboard_link(self) -> Optional[str]:
        """The dashboard's address; None when the scheduler serves none (bokeh missing, or turned off)."""
        try:
            return self.client.dashboard_link
        except Exception:  # noqa: BLE001 - no dashboard is not an error
            return None

    def resources(self, device: str) -> Optional[Dict[str, float]]:
        """The worker resources one subject's task asks for."""
        wanted: Dict[str, float] = {"subject": 1} if self.owns_workers else {}
        if device == "cuda":
            wanted["GPU"] = 1
        return wanted or None

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            if self.cluster is not None:
                self.cluster.close()


def import_dask() -> Any:
    """``distributed``, or a one-line error naming the extra to install."""
    try:
        import distributed
    except ImportError as exc:
        raise MissingDependencyError("qsmdip batch needs Dask: pip install 'qsmdip[batch]'"
                                     " (dask[distributed], and dask-jobqueue for --cluster)") from exc
    return distributed


def local_worker_count(threads: int, *, cores: Optional[int] = None, memory_bytes: Optional[int] = None) -> int:
    """How many one-subject workers of ``threads`` torch threads this machine holds (cores and memory)."""
    cores = cores or _available_cores()
    if memory_bytes is None:
        import psutil

        memory_bytes = psutil.virtual_memory().total
    return max(1, min(cores // max(1, threads), int(memory_bytes // LOCAL_MEMORY_PER_WORKER)))


def worker_environment(threads: int) -> Dict[str, Any]:
    """Dask settings for the environment of the worker processes a Nanny spawns.

    Dask's default ``MALLOC_TRIM_THRESHOLD_=65536`` makes glibc hand memory back to the system after every
    large free; torch frees and reallocates its tensors each iteration, and a TV inversion ran 2.7 times
    slower in such a worker (4.4 s against 12.0 s at 4 mm). ``None`` unsets it, leaving glibc's default.
    """
    key = "distributed.nanny.pre-spawn-environ"
    return {f"{key}.MALLOC_TRIM_THRESHOLD_": None, f"{key}.OMP_NUM_THREADS": int(threads),
            f"{key}.MKL_NUM_THREADS": int(threads)}


def local_worker_specs(workers: int, threads: int, gpus: int, memory_limit: Any) -> Dict[str, Dict[str, Any]]:
    """Nanny specs for :class:`distributed.SpecCluster`: ``workers`` CPU workers, then one per GPU."""
    from distributed import Nanny

    specs: Dict[str, Dict[str, Any]] = {}
    # GPU g is the g-th device this process may use: under CUDA_VISIBLE_DEVICES=2,3 (a SLURM allocation),
    # worker gpu-0 must get "2", not the physical GPU 0 another job holds
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if "CUDA_VISIBLE_DEVICES" in os.environ and gpus > len(visible):
        raise QSMInputError(f"--gpus {gpus}, but CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r}"
                            f" lets this process use {len(visible)}")
    common_env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    for n in range(workers):
        specs[f"cpu-{n}"] = {"cls": Nanny, "options": {"nthreads": 1, "memory_limit": memory_limit,
                                                        "resources": {"subject": 1},
                                                        "env": {**common_env, "CUDA_VISIBLE_DEVICES": ""}}}
    for g in range(gpus):
        device = visible[g] if visible else str(g)
        specs[f"gpu-{g}"] = {"cls": Nanny, "options": {"nthreads": 1, "memory_limit": memory_limit,
                                                        "resources": {"subject": 1, "GPU": 1},
                                                        "env": {**common_env, "CUDA_VISIBLE_DEVICES": device}}}
    return specs


def start(options: ClusterOptions, *, allowed_failures: int, verbose: bool = False) -> ClusterHandle:
    """Start or join the cluster ``options`` describe and connect a client to it."""
    distributed = import_dask()
    import dask

    if not verbose:  # workers are new processes: they read the level from the environment
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")
        for name in ("distributed", "dask_jobqueue"):
            logging.getLogger(name).setLevel(logging.ERROR)
    if options.threads < 1:
        raise QSMInputError(f"--threads must be at least 1, got {options.threads}")
    dask.config.set({"distributed.scheduler.allowed-failures": int(allowed_failures), **worker_environment(options.threads)})
    if options.scheduler:
        try:
            client = distributed.Client(options.scheduler, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise QSMInputError(f"cannot reach the Dask scheduler {options.scheduler}: {exc}") from exc
        gpus = sum(1 for w in client.scheduler_info()["workers"].values() if w.get("resources", {}).get("GPU"))
        return ClusterHandle(client, None, f"the Dask scheduler {options.scheduler}", False, gpus, options.threads)
    if options.kind:
        return _start_jobqueue(options, distributed)
    return _start_local(options, distributed)


def _start_local(options: ClusterOptions, distributed: Any) -> ClusterHandle:
    import psutil

    if options.gpus < 0:
        raise QSMInputError(f"--gpus must be 0 or more, got {options.gpus}")
    workers = options.workers if options.workers is not None else local_worker_count(options.threads)
    if workers < 0 or workers + options.gpus < 1:
        raise QSMInputError(f"--workers {workers} with --gpus {options.gpus} starts no worker")
    memory_limit = int(psutil.virtual_memory().total // (workers + options.gpus))
    scheduler = {"cls": distributed.Scheduler,
                 "options": {"dashboard_address": ":0" if options.dashboard and _has_bokeh() else None}}
    cluster = distributed.SpecCluster(workers=local_worker_specs(workers, options.threads, options.gpus, memory_limit),
                                      scheduler=scheduler, name="qsmdip-batch")
    client = distributed.Client(cluster)
    text = f"a local Dask cluster: {workers} CPU worker(s) x {options.threads} thread(s)"
    if options.gpus:
        text += f" and {options.gpus} GPU worker(s)"
    return ClusterHandle(client, cluster, text, True, options.gpus, options.threads)


def jobqueue_cluster(options: ClusterOptions) -> Any:
    """The dask-jobqueue cluster for ``options`` (no job submitted until it is scaled)."""
    try:
        import dask_jobqueue
    except ImportError as exc:
        raise MissingDependencyError("--cluster needs dask-jobqueue: pip install 'qsmdip[batch]'") from exc
    kind = options.kind.lower()
    if kind not in JOBQUEUE_KINDS:
        raise QSMInputError(f"unknown --cluster {options.kind!r}: use one of {', '.join(JOBQUEUE_KINDS)}")
    missing = [flag for flag, value in (("--cores", options.cores), ("--memory", options.memory)) if not value]
    if missing:
        raise QSMInputError(f"--cluster {kind} needs {' and '.join(missing)} (per job)")
    if options.gpus not in (0, 1):
        raise QSMInputError("--cluster runs one GPU per job: use --gpus 0 or 1")
    if options.gpus and kind != "slurm" and not options.job_directives:
        # PBS and SGE sites name GPUs differently (-l ngpus=1, -l gpu=1, -q gpu...): we cannot guess it
        raise QSMInputError(f"--cluster {kind} --gpus 1 needs --job-directive with your site's GPU request"
                            f" (e.g. {'-l ngpus=1' if kind == 'pbs' else '-l gpu=1'})")
    threads = min(options.threads, options.cores)
    processes = 1 if options.gpus else max(1, options.cores // threads)
    resources = "subject=1" + (",GPU=1" if options.gpus else "")
    directives = list(options.job_directives)
    if options.gpus and kind == "slurm" and not any("--gres" in d for d in directives):
        directives.append("--gres=gpu:1")
    cls = {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster,
           "sge": dask_jobqueue.SGECluster}[kind]
    return cls(cores=options.cores, processes=processes, memory=options.memory, walltime=options.walltime,
               queue=options.queue, job_extra_directives=directives,
               worker_extra_args=["--resources", resources],
               job_script_prologue=[f"export OMP_NUM_THREADS={threads}",  # see worker_environment
                                    "export DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON__MALLOC_TRIM_THRESHOLD_=None",
                                    f"export DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON__OMP_NUM_THREADS={threads}"],
               scheduler_options={"dashboard_address": ":8787" if options.dashboard and _has_bokeh() else None})


def _start_jobqueue(options: ClusterOptions, distributed: Any) -> ClusterHandle:
    cluster = jobqueue_cluster(options)
    jobs = options.workers or 1
    cluster.scale(jobs=jobs)
    client = distributed.Client(cluster)
    threads = min(options.threads, options.cores)
    return ClusterHandle(client, cluster, f"{jobs} {options.kind} job(s) of {options.cores} cores", True,
                         jobs if options.gpus else 0, threads)


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _has_bokeh() -> bool:
    """Whether the dashboard can be served (it needs bokeh)."""
    import importlib.util

    return importlib.util.find_spec("bokeh") is not None
