"""The background worker process: start, read its JSON lines, cancel the whole process tree, exit status.

The worker is ``<python> -m qsmdip.worker JOB.json`` (docs/WORKER_PROTOCOL.md). Inside Slicer
``<python>`` is the ``PythonSlicer`` launcher, which starts the real interpreter as a child, so cancel
must end a process tree, not one process: on POSIX the worker gets a session (process group) of its
own and cancel signals the group; on Windows ``taskkill /T /F`` ends the tree.

Two reader threads turn stdout into protocol messages (a queue) and keep the last lines of log text;
the GUI calls :meth:`WorkerProcess.poll` from a timer and never blocks.
"""
from __future__ import annotations

import collections
import json
import os
import queue
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Deque, Dict, List, Mapping, Optional, Sequence

PROTOCOL_VERSION = 1

#: worker exit status -> outcome (docs/WORKER_PROTOCOL.md)
EXIT_KINDS = {0: "done", 1: "internal", 2: "input", 3: "out_of_memory", 4: "missing_dependency", 5: "cancelled"}

_GENERIC_MESSAGES = {
    "internal": "the reconstruction failed",
    "input": "the worker refused the input",
    "out_of_memory": "the reconstruction ran out of memory",
    "missing_dependency": "the worker's Python lacks a package it needs (PyTorch?)",
    "cancelled": "cancelled",
}


@dataclass
class WorkerExit:
    """How the worker ended: ``kind`` is 'done', 'cancelled', 'input', 'out_of_memory',
    'missing_dependency', 'internal' or 'crashed'; ``message`` is the worker's own words when it
    said anything."""

    returncode: int
    kind: str
    message: str


def worker_command(python_command: Sequence[str], job_path: str) -> List[str]:
    """The command line of a worker run: the Python (or launcher + Python) then ``-m qsmdip.worker``."""
    return [*python_command, "-m", "qsmdip.worker", os.fspath(job_path)]


def worker_environment(module_dir: str, base_env: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """Environment with ``module_dir`` (the folder holding the ``qsmdip`` package) first on PYTHONPATH."""
    env = dict(os.environ if base_env is None else base_env)
    parts = [module_dir] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def describe_exit(returncode: int, error: Optional[dict], cancel_requested: bool, log_tail: List[str]) -> WorkerExit:
    """Turn an exit status plus the worker's last ``error`` message into an outcome for the panel.

    The worker's own message wins; without one (a hard crash, a kill by the system) the exit status
    or signal is explained and the last line of its log text is added.
    """
    last_log = next((line for line in reversed(log_tail) if line.strip()), "")
    if returncode == 0:
        return WorkerExit(0, "done", "done")
    if error is not None and error.get("kind") in _GENERIC_MESSAGES:
        kind = str(error["kind"])
        return WorkerExit(returncode, kind, str(error.get("message") or _GENERIC_MESSAGES[kind]))
    if cancel_requested:
        return WorkerExit(returncode, "cancelled", "cancelled")
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        text = f"the worker was killed by {name}"
        if -returncode == getattr(signal, "SIGKILL", 9):
            text += " (the system may have run out of memory)"
        return WorkerExit(returncode, "crashed", text + (f"; last output: {last_log}" if last_log else ""))
    kind = EXIT_KINDS.get(returncode, "crashed")
    if kind == "done":
        kind = "crashed"
    text = last_log or _GENERIC_MESSAGES.get(kind, f"the worker stopped with exit status {returncode}")
    return WorkerExit(returncode, kind, text)


class WorkerProcess:
    """One run of the background worker.

    Args:
        job_path: the job file (see :mod:`.job`).
        python_command: the interpreter, possibly behind a launcher, e.g. ``["PythonSlicer"]``.
        module_dir: folder holding the ``qsmdip`` package; put first on the worker's PYTHONPATH.
        env: base environment (default: this process's); inside Slicer pass the startup environment.
        grace_s: after a cancel, seconds the worker gets to stop by itself before the tree is killed.
    """

    def __init__(self, job_path: str, python_command: Sequence[str], module_dir: str, *,
                 env: Optional[Mapping[str, str]] = None, grace_s: float = 3.0):
        self.command = worker_command(python_command, job_path)
        self.env = worker_environment(module_dir, env)
        self.grace_s = float(grace_s)
        self._popen: Optional[subprocess.Popen] = None
        self._messages: "queue.Queue[dict]" = queue.Queue()
        self._log: Deque[str] = collections.deque(maxlen=200)
        self._readers: List[threading.Thread] = []
        self._last_error: Optional[dict] = None
        self._cancel_requested = False
        self._kill_deadline: Optional[float] = None
        self._exit: Optional[WorkerExit] = None

    # -- life cycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Launch the worker; raise OSError when the Python executable cannot be started."""
        if self._popen is not None:
            raise RuntimeError("this worker was already started")
        options: dict = {}
        if os.name == "nt":
            options["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            options["start_new_session"] = True
        self._popen = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, env=self.env, **options)
        for stream, parse in ((self._popen.stdout, True), (self._popen.stderr, False)):
            reader = threading.Thread(target=self._read, args=(stream, parse), daemon=True)
            reader.start()
            self._readers.append(reader)

    @property
    def pid(self) -> Optional[int]:
        return None if self._popen is None else self._popen.pid

    @property
    def started(self) -> bool:
        return self._popen is not None

    @property
    def finished(self) -> bool:
        """True once the process has exited and both of its output streams are drained."""
        return self._exit is not None

    @property
    def exit(self) -> Optional[WorkerExit]:
        return self._exit

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested

    def log_tail(self, lines: int = 20) -> List[str]:
        """The last lines of the worker's free text (stderr, and stdout lines that are not messages)."""
        return list(self._log)[-lines:]

    # -- messages ---------------------------------------------------------------------------------
    def _read(self, stream, parse: bool) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            message = _parse_message(line) if parse else None
            if message is None:
                self._log.append(line)
            else:
                self._messages.put(message)
        stream.close()

    def poll(self) -> List[dict]:
        """Protocol messages that arrived since the last call (never blocks).

        Also escalates a pending cancel to a kill once the grace period is over, and records the exit
        once the process has ended and its output is fully read.
        """
        out = self._drain()
        if self._popen is None or self._exit is not None:
            return out
        if self._kill_deadline is not None and time.monotonic() >= self._kill_deadline:
            self._kill_deadline = None
            self._kill_tree(force=True)
        readers_alive = any(r.is_alive() for r in self._readers)
        if self._popen.poll() is not None and readers_alive and self._kill_deadline is None:
            # The launcher is gone but a child still holds its output open: give it the grace period
            # to finish, then end it, so that nothing outlives the run.
            self._kill_deadline = time.monotonic() + self.grace_s
        if self._popen.poll() is not None and not readers_alive:
            out += self._drain()
            if self._cancel_requested or self._popen.returncode < 0:
                self._kill_tree(force=True, quiet=True)  # sweep anything left in the worker's group
            self._exit = describe_exit(self._popen.returncode, self._last_error, self._cancel_requested,
                                       list(self._log))
        return out

    def _drain(self) -> List[dict]:
        out = []
        while True:
            try:
                message = self._messages.get_nowait()
            except queue.Empty:
                return out
            if message.get("event") == "error":
                self._last_error = message
            out.append(message)

    def wait(self, timeout_s: float, interval_s: float = 0.05) -> List[dict]:
        """Block until the worker has finished or ``timeout_s`` passed; return the messages seen."""
        deadline = time.monotonic() + timeout_s
        out: List[dict] = []
        while not self.finished and time.monotonic() < deadline:
            out += self.poll()
            if not self.finished:
                time.sleep(interval_s)
        return out

    # -- cancel -----------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop the worker and everything it started.

        POSIX: SIGTERM to the worker's process group (the worker stops at its next iteration and exits
        with status 5), then SIGKILL to the group if it is still there after ``grace_s``. Windows: the
        tree is ended at once with ``taskkill /T /F``.
        """
        self._cancel_requested = True
        if self._popen is None or self._popen.poll() is not None and not any(r.is_alive() for r in self._readers):
            return
        if os.name == "nt":
            self._kill_tree(force=True)
            return
        self._kill_tree(force=False)
        self._kill_deadline = time.monotonic() + self.grace_s

    def _kill_tree(self, force: bool, quiet: bool = False) -> None:
        if self._popen is None:
            return
        if os.name == "nt":
            if self._popen.poll() is None:
                subprocess.run(["taskkill", "/PID", str(self._popen.pid), "/T", "/F"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
            return
        try:
            os.killpg(self._popen.pid, signal.SIGKILL if force else signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass  # the group is already gone
        except OSError:
            if not quiet:
                raise


def _parse_message(line: str) -> Optional[dict]:
    """A protocol message from one stdout line, or None for free text."""
    text = line.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return None
    try:
        message = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(message, dict) or "event" not in message:
        return None
    if message.get("protocol") != PROTOCOL_VERSION:
        return {"protocol": PROTOCOL_VERSION, "event": "error", "kind": "internal",
                "message": f"the worker speaks protocol {message.get('protocol')!r}, this module {PROTOCOL_VERSION}:"
                           " update the extension"}
    return message
