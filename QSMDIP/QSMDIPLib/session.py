"""One reconstruction from Apply to the end: job files, worker, snapshot streaming, outcome.

The panel creates a :class:`ReconstructionSession`, calls :meth:`~ReconstructionSession.start`, then
:meth:`~ReconstructionSession.poll` from a timer and renders the returned :class:`SessionState`. The
session owns the temporary folder and removes it when the worker has ended, whatever the outcome.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

from qsmdip.errors import QSMInputError

from .i18n import _
from .job import JobOptions, PreparedJob, prepare_job
from .process import WorkerProcess
from .streaming import ensure_output_node, update_node_from_file

FINISHED_PHASES = ("done", "cancelled", "failed")
#: Share of the progress bar given to the stages before the inversion in a job from the phase (they take
#: seconds to a minute, the inversion minutes).
STAGES_SHARE = 0.2


@dataclass
class SessionState:
    """What the panel shows. ``phase``: 'idle', 'running', 'cancelling', 'done', 'cancelled', 'failed'."""

    phase: str = "idle"
    method: str = ""
    device: str = ""
    iteration: int = 0
    max_iterations: int = 0
    loss: Optional[float] = None
    elapsed_s: float = 0.0
    remaining_s: Optional[float] = None
    metrics: Optional[Dict[str, float]] = None
    warnings: List[str] = field(default_factory=list)
    snapshots_loaded: int = 0
    snapshot_iteration: Optional[int] = None
    message: str = ""
    error_kind: Optional[str] = None   #: 'input', 'out_of_memory', 'missing_dependency', 'internal', 'crashed'
    #: jobs from the phase: the last finished stage (name, 0-based index, how many there are) and every note
    stage: str = ""
    stage_index: int = -1
    stage_count: int = 0
    stage_notes: List[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED_PHASES

    def progress_percent(self) -> int:
        """0-100 for the progress bar; a job from the phase gives its stages the first :data:`STAGES_SHARE`."""
        if self.phase == "done":
            return 100
        solver = min(self.iteration, self.max_iterations) / self.max_iterations if self.max_iterations > 0 else 0.0
        if self.stage_count > 0:
            stages = (self.stage_index + 1) / self.stage_count
            return int(round(100.0 * (STAGES_SHARE * stages + (1.0 - STAGES_SHARE) * solver)))
        return int(round(100.0 * solver))

    def progress_text(self) -> str:
        """E.g. 'iteration 40/300 | loss 0.0123 | 0:12 elapsed | 1:20 left', or 'stage 3/7: offsets | ...'."""
        parts = []
        if self.stage_count > 0 and self.iteration == 0 and self.stage_index + 1 <= self.stage_count:
            parts.append(_("stage {index}/{count}: {name}").format(index=self.stage_index + 1, count=self.stage_count,
                                                                   name=self.stage))
        if self.max_iterations > 0:
            parts.append(_("iteration {iteration}/{total}").format(iteration=self.iteration, total=self.max_iterations))
        if self.loss is not None:
            parts.append(_("loss {loss}").format(loss=f"{self.loss:.4g}"))
        parts.append(_("{clock} elapsed").format(clock=_clock(self.elapsed_s)))
        if self.remaining_s is not None and not self.finished:
            parts.append(_("{clock} left").format(clock=_clock(self.remaining_s)))
        return " | ".join(parts)


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class ReconstructionSession:
    """Run one reconstruction of ``field_node`` inside ``mask_node`` into an output volume node.

    Args:
        scene: the MRML scene (the output node is added there when none is given).
        field_node, mask_node: input volumes (never modified).
        options: method, units, device and settings (:class:`~QSMDIPLib.job.JobOptions`).
        python_command: the worker's Python, e.g. ``["PythonSlicer"]`` or ``[sys.executable]``.
        module_dir: the folder holding the ``qsmdip`` package.
        reference_node: optional gold standard; the worker then reports metrics with each snapshot.
        magnitude_node: optional GRE magnitude on the field's grid (DIP uses it as an anatomical prior).
        output_node: volume to fill in place; None creates '<field name>_QSM'.
        env: base environment of the worker; temp_root: where the temporary folder goes.
    """

    def __init__(self, scene, field_node, mask_node, options: JobOptions, *, python_command: Sequence[str],
                 module_dir: str, reference_node=None, magnitude_node=None, output_node=None,
                 env: Optional[Mapping[str, str]] = None, temp_root: Optional[str] = None, grace_s: float = 3.0):
        self.scene = scene
        self.field_node = field_node
        self.mask_node = mask_node
        self.reference_node = reference_node
        self.magnitude_node = magnitude_node
        self.output_node = output_node
        self.options = options
        self.python_command = list(python_command)
        self.module_dir = module_dir
        self.env = env
        self.temp_root = temp_root
        self.grace_s = grace_s
        self.job: Optional[PreparedJob] = None
        self.worker: Optional[WorkerProcess] = None
        self.state = SessionState()
        self._started_at = 0.0
        self._done_message: Optional[dict] = None
        self._taken_names: set = set()

    @property
    def finished(self) -> bool:
        return self.state.finished

    def start(self) -> SessionState:
        """Check the inputs, write the job and launch the worker.

        Input problems the panel can see (no image data, different grids, output = an input) raise
        :class:`~qsmdip.errors.QSMInputError` before anything is written or created. A worker that
        cannot be launched ends the session as 'failed' with the reason.
        """
        if self.worker is not None:
            raise RuntimeError("this session was already started")
        self.job = self._prepare_job()
        try:
            self.output_node = ensure_output_node(self.scene, self.field_node, self.output_node,
                                                  name=self._output_name())
        except BaseException:
            self.job.cleanup()
            raise
        self.worker = WorkerProcess(self.job.job_path, self.python_command, self.module_dir, env=self.env,
                                    grace_s=self.grace_s)
        self._started_at = time.monotonic()
        self.state = SessionState(phase="running", method=self.options.method,
                                  message=_("starting the {method} worker").format(method=self.options.method.upper()))
        try:
            self.worker.start()
        except OSError as error:
            self.job.cleanup()
            self.state.phase, self.state.error_kind = "failed", "missing_dependency"
            self.state.message = _("could not start {command}: {error}").format(
                command=" ".join(self.python_command), error=error)
        return self.state

    def _prepare_job(self) -> PreparedJob:
        """Write the inputs and the job file (a session from the phase writes others)."""
        return prepare_job(self.field_node, self.mask_node, self.options, reference_node=self.reference_node,
                           magnitude_node=self.magnitude_node, output_node=self.output_node, temp_root=self.temp_root)

    def _output_name(self) -> Optional[str]:
        """Name of a new output node (None: after the field)."""
        return None

    def poll(self) -> SessionState:
        """Apply the worker's new messages (snapshots go into the output node); finish when it has ended."""
        if self.worker is None or self.state.finished:
            return self.state
        announced: List[dict] = []
        for message in self.worker.poll():
            self._handle(message)
            if message.get("event") == "snapshot" and message.get("path"):
                announced.append(message)
        if announced:  # only the newest snapshot of a batch is worth reading; the older ones just go
            self._load_snapshot(announced[-1])
            for message in announced[:-1]:
                self._discard_snapshot(message["path"], keep=announced[-1]["path"])
        if not self.state.finished:
            self.state.elapsed_s = max(self.state.elapsed_s, time.monotonic() - self._started_at)
        if self.worker.finished:
            self._finish()
        return self.state

    def wait(self, timeout_s: float, interval_s: float = 0.05) -> SessionState:
        """Poll until the session has finished or ``timeout_s`` passed (tests and scripts)."""
        deadline = time.monotonic() + timeout_s
        while not self.poll().finished and time.monotonic() < deadline:
            time.sleep(interval_s)
        return self.state

    def cancel(self) -> SessionState:
        """Ask the worker tree to stop; the output keeps the last snapshot. Poll to see it end."""
        if self.worker is not None and not self.state.finished:
            self.worker.cancel()
            self.state.phase = "cancelling"
            self.state.message = _("cancelling...")
        return self.state

    def close(self, timeout_s: float = 2.0) -> None:
        """End the worker tree at once and remove the temporary folder (scene close, module cleanup).

        Unlike :meth:`cancel` there is no grace period: nothing of the run is kept, so the worker is
        killed and the GUI waits only for the kill to take effect (milliseconds; at most ``timeout_s``).
        """
        if self.worker is not None and not self.state.finished:
            self.worker.kill()
            self.state.phase = "cancelling"
            self.wait(timeout_s)
        if self.job is not None and not self.state.finished:
            self.job.cleanup()

    # -- messages ---------------------------------------------------------------------------------
    def _handle(self, message: dict) -> None:
        event = message.get("event")
        state = self.state
        if event == "started":
            state.device = str(message.get("device") or "")
            state.method = str(message.get("method") or state.method)
            state.max_iterations = int(message.get("max_iterations") or 0)
            state.warnings += [str(w) for w in message.get("warnings") or []]
            if state.phase == "running":
                state.message = _("{method} running on {device}").format(method=state.method.upper(),
                                                                        device=state.device)
        elif event == "progress":
            state.iteration = int(message.get("iteration") or 0)
            state.max_iterations = int(message.get("max_iterations") or state.max_iterations)
            state.loss = message.get("loss")
            state.elapsed_s = float(message.get("elapsed_s") or state.elapsed_s)
            state.remaining_s = message.get("remaining_s")
        elif event == "snapshot":
            if message.get("metrics"):
                state.metrics = dict(message["metrics"])
        elif event == "stage":
            self._stage(message)
        elif event == "done":
            self._done_message = message
            if message.get("metrics"):
                state.metrics = dict(message["metrics"])

    def _stage(self, message: dict) -> None:
        """A stage of a job from the phase has finished: progress and notes (volumes: see QSMDIPLib.gre)."""
        state = self.state
        state.stage = str(message.get("name") or "")
        state.stage_index = int(message.get("index") or 0)
        state.stage_count = int(message.get("count") or 0)
        state.stage_notes += [str(n) for n in message.get("notes") or []]
        if state.phase == "running":
            state.message = _("{stage} done ({seconds} s)").format(stage=state.stage,
                                                                   seconds=f"{float(message.get('seconds') or 0):.1f}")

    def _load(self, path: str) -> None:
        try:
            update_node_from_file(path, self.output_node, self.field_node)
        except QSMInputError as error:
            self.state.warnings.append(str(error))

    def _load_snapshot(self, message: dict) -> None:
        """Load an announced snapshot into the output node.

        A numbered snapshot is first moved to a name of its own, read there and deleted: the worker never
        touches it again, the folder does not fill up, and a name the worker writes anew (iteration 0 can
        repeat while DIP builds its starting estimate) is a new file, not the one being read. A snapshot
        already taken under an earlier announcement of the same name is not read twice.
        """
        path = message["path"]
        if not self._numbered(path):
            self._load(path)
        else:
            name = os.path.basename(path)
            taken = os.path.join(os.path.dirname(path), f"taken-{name}")
            try:
                os.replace(path, taken)
            except FileNotFoundError:
                if name not in self._taken_names:
                    self.state.warnings.append(_("the snapshot {path} is missing").format(path=path))
                return
            self._taken_names.add(name)
            try:
                self._load(taken)
            finally:
                self._remove(taken)
        self.state.snapshots_loaded += 1
        self.state.snapshot_iteration = int(message.get("iteration") or 0)

    def _discard_snapshot(self, path: str, keep: str) -> None:
        """Delete an announced numbered snapshot that a newer one made unnecessary."""
        if self._numbered(path) and os.path.basename(path) != os.path.basename(keep):
            self._taken_names.add(os.path.basename(path))
            self._remove(path)

    def _numbered(self, path: str) -> bool:
        folder = self.job.snapshot_dir if self.job is not None else None
        return bool(folder) and os.path.dirname(os.path.abspath(path)) == os.path.abspath(folder)

    @staticmethod
    def _remove(path: str) -> None:
        try:
            os.remove(path)
        except OSError:
            pass  # already gone, or still open elsewhere (Windows): the folder goes with the job anyway

    def _finish(self) -> None:
        state = self.state
        outcome = self.worker.exit
        try:
            if outcome.kind == "done" and self._done_message is not None:
                path = self._done_message.get("path")
                if path:
                    self._load(path)
                state.phase, state.error_kind = "done", None
                stop = self._done_message.get("stop_reason") or "completed"
                iterations = int(self._done_message.get("iterations") or 0)
                state.elapsed_s = float(self._done_message.get("elapsed_s") or state.elapsed_s)
                values = dict(method=state.method.upper(), stop=stop, iterations=iterations,
                              clock=_clock(state.elapsed_s), device=state.device)
                state.message = (_("{method} {stop} after {iterations} iterations in {clock} on {device}") if iterations
                                 else _("{method} {stop} in {clock} on {device}")).format(**values)
            elif outcome.kind == "done":
                state.phase, state.error_kind = "failed", "internal"
                state.message = _("the worker ended without reporting a result")
            elif outcome.kind == "cancelled":
                state.phase, state.error_kind = "cancelled", None
                if state.snapshots_loaded:
                    state.message = _("cancelled; the output keeps the snapshot of iteration {iteration}").format(
                        iteration=state.snapshot_iteration)
                elif state.stage and state.stage_index + 1 < state.stage_count:
                    state.message = _("cancelled after the {stage} stage").format(stage=state.stage)
                else:
                    state.message = _("cancelled; no snapshot had arrived")
            else:
                state.phase, state.error_kind = "failed", outcome.kind
                state.message = outcome.message
        finally:
            self.job.cleanup()
