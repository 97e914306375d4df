"""The background worker process: start, read its JSON lines, cancel the whole process tree, exit status.

The worker is ``<python> -m qsmdip.worker JOB.json`` (docs/WORKER_PROTOCOL.md); other short jobs
(the torch check, installing torch, making the example data) run through the same
:class:`BackgroundProcess`. Inside Slicer
``<python>`` is the ``PythonSlicer`` launcher, which starts the real interpreter as a child, so cancel
must end a process tree, not one process: on POSIX the worker gets a session (process group) of its
own and cancel signals the group; on Windows ``taskkill /T /F`` ends the tree. No console window
ever appears on Windows (:func:`popen_options`).

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

from .i18n import _

PROTOCOL_VERSION = 2

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


#: Windows process-creation flags (the constants exist in ``subprocess`` only on Windows).
CREATE_NEW_PROCESS_GROUP = 0x00000200
CREATE_NO_WINDOW = 0x08000000


def popen_options(new_group: bool = True, windows: Optional[bool] = None) -> Dict[str, object]:
    """Keyword arguments for every ``subprocess`` call made from the GUI.

    On Windows a child of a GUI program gets no console window (no window flashes up); with
    ``new_group`` it also gets a process group / session of its own, so that cancel can end the whole
    tree (POSIX: ``start_new_session``). ``windows`` overrides the platform test (for tests).
    """
    windows = os.name == "nt" if windows is None else windows
    if windows:
        return {"creationflags": CREATE_NO_WINDOW | (CREATE_NEW_PROCESS_GROUP if new_group else 0)}
    return {"start_new_session": True} if new_group else {}


class BackgroundProcess:
    """A command run in the background without ever blocking the GUI.

    Two reader threads collect stdout and stderr; :meth:`poll` (called from a GUI timer) returns what
    arrived, never waits, escalates a pending cancel and records the end once the process has exited
    and its output is drained. Cancel and kill end the whole process tree (a launcher such as
    PythonSlicer starts the real interpreter as its child). Subclasses turn stdout lines into
    messages with :meth:`_parse_line`; here every line is log text.

    Args:
        command: the command line. env: its environment (default: this process's).
        grace_s: after a cancel, seconds the process gets to stop by itself before the tree is killed.
    """

    def __init__(self, command: Sequence[str], *, env: Optional[Mapping[str, str]] = None, grace_s: float = 3.0):
        self.command = list(command)
        self.env = None if env is None else dict(env)
        self.grace_s = float(grace_s)
        self._popen: Optional[subprocess.Popen] = None
        self._messages: "queue.Queue[dict]" = queue.Queue()
        self._log: Deque[str] = collections.deque(maxlen=200)
        self._readers: List[threading.Thread] = []
        self._cancel_requested = False
        self._kill_deadline: Optional[float] = None
        self._returncode: Optional[int] = None

    # -- life cycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Launch the command; raise OSError when its executable cannot be started."""
        if self._popen is not None:
            raise RuntimeError("this process was already started")
        self._popen = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, env=self.env, **popen_options())
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
        return self._returncode is not None

    @property
    def returncode(self) -> Optional[int]:
        """The exit status once :attr:`finished` (negative: killed by that signal on POSIX)."""
        return self._returncode

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested

    def log_tail(self, lines: int = 20) -> List[str]:
        """The last lines of free text (stderr, and stdout lines that are not messages)."""
        return list(self._log)[-lines:]

    # -- output -----------------------------------------------------------------------------------
    def _parse_line(self, line: str) -> Optional[dict]:
        return None

    def _read(self, stream, parse: bool) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            message = self._parse_line(line) if parse else None
            if message is None:
                self._log.append(line)
            else:
                self._messages.put(message)
        stream.close()

    def poll(self) -> List[dict]:
        """Messages that arrived since the last call (never blocks).

        Also escalates a pending cancel to a kill once the grace period is over, and records the exit
        once the process has ended and its output is fully read.
        """
        out = self._drain()
        if self._popen is None or self._returncode is not None:
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
                self._kill_tree(force=True, quiet=True)  # sweep anything left in the group
            self._returncode = self._popen.returncode
            self._on_exit()
        return out

    def _on_exit(self) -> None:
        """Hook: the process has ended and :attr:`returncode` is set."""

    def _drain(self) -> List[dict]:
        out = []
        while True:
            try:
                out.append(self._messages.get_nowait())
            except queue.Empty:
                return out

    def wait(self, timeout_s: float, interval_s: float = 0.05) -> List[dict]:
        """Block until the process has finished or ``timeout_s`` passed; return the messages seen."""
        deadline = time.monotonic() + timeout_s
        out: List[dict] = []
        while not self.finished and time.monotonic() < deadline:
            out += self.poll()
            if not self.finished:
                time.sleep(interval_s)
        return out

    # -- cancel -----------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop the process and everything it started.

        POSIX: SIGTERM to the process group (the worker stops at its next iteration and exits with
        status 5), then SIGKILL to the group if it is still there after ``grace_s``. Windows: the tree
        is ended at once with ``taskkill /T /F``.
        """
        self._cancel_requested = True
        if not self._running():
            return
        if os.name == "nt":
            self._kill_tree(force=True)
            return
        self._kill_tree(force=False)
        self._kill_deadline = time.monotonic() + self.grace_s

    def kill(self) -> None:
        """End the whole tree at once, without a grace period (scene close, module cleanup)."""
        self._cancel_requested = True
        if self._running():
            self._kill_tree(force=True)

    def _running(self) -> bool:
        return self._popen is not None and (self._popen.poll() is None or any(r.is_alive() for r in self._readers))

    def _kill_tree(self, force: bool, quiet: bool = False) -> None:
        if self._popen is None:
            return
        if os.name == "nt":
            if self._popen.poll() is None:
                subprocess.run(["taskkill", "/PID", str(self._popen.pid), "/T", "/F"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
                               **popen_options(new_group=False))
            return
        try:
            os.killpg(self._popen.pid, signal.SIGKILL if force else signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass  # the group is already gone
        except OSError:
            if not quiet:
                raise


class WorkerProcess(BackgroundProcess):
    """One run of the background worker: stdout lines are protocol messages, the end a :class:`WorkerExit`.

    Args:
        job_path: the job file (see :mod:`.job`).
        python_command: the interpreter, possibly behind a launcher, e.g. ``["PythonSlicer"]``.
        module_dir: folder holding the ``qsmdip`` package; put first on the worker's PYTHONPATH.
        env: base environment (default: this process's); inside Slicer pass the startup environment.
        grace_s: after a cancel, seconds the worker gets to stop by itself before the tree is killed.
    """

    def __init__(self, job_path: str, python_command: Sequence[str], module_dir: str, *,
                 env: Optional[Mapping[str, str]] = None, grace_s: float = 3.0):
        super().__init__(worker_command(python_command, job_path), env=worker_environment(module_dir, env),
                         grace_s=grace_s)
        self._last_error: Optional[dict] = None
        self._exit: Optional[WorkerExit] = None

    @property
    def exit(self) -> Optional[WorkerExit]:
        return self._exit

    def _parse_line(self, line: str) -> Optional[dict]:
        return _parse_message(line)

    def _drain(self) -> List[dict]:
        out = super()._drain()
        for message in out:
            if message.get("event") == "error":
                self._last_error = message
        return out

    def _on_exit(self) -> None:
        self._exit = describe_exit(self._returncode, self._last_error, self._cancel_requested, list(self._log))


class CommandSequence:
    """Commands run one after another in the background; stops at the first that fails.

    :meth:`poll` returns None while running, then True (all succeeded) or False; ``message`` says
    which command failed and its last line of output.
    """

    def __init__(self, commands: Sequence[Sequence[str]], *, env: Optional[Mapping[str, str]] = None):
        self.commands = [list(c) for c in commands]
        self.env = env
        self.current: Optional[BackgroundProcess] = None
        self.index = -1
        self.succeeded: Optional[bool] = None
        self.message = ""

    def start(self) -> "CommandSequence":
        self._next()
        return self

    def poll(self) -> Optional[bool]:
        while self.succeeded is None and self.current is not None:
            self.current.poll()
            if not self.current.finished:
                break
            if self.current.returncode != 0:
                self._fail(_("exit status {status}").format(status=self.current.returncode))
            else:
                self._next()
        return self.succeeded

    def last_line(self) -> str:
        """The last line of output of the running (or last) command, for a progress label."""
        if self.current is None:
            return ""
        return next((ln for ln in reversed(self.current.log_tail(20)) if ln.strip()), "")

    def cancel(self) -> None:
        if self.current is not None and self.succeeded is None:
            self.current.cancel()
            self.current.wait(10)
            self._fail(_("cancelled"))

    def wait(self, timeout_s: float) -> Optional[bool]:
        deadline = time.monotonic() + timeout_s
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.succeeded

    def _next(self) -> None:
        self.index += 1
        if self.index >= len(self.commands):
            self.succeeded, self.message = True, ""
            return
        self.current = BackgroundProcess(self.commands[self.index], env=self.env)
        try:
            self.current.start()
        except OSError as error:
            self._fail(str(error))

    def _fail(self, reason: str) -> None:
        command = " ".join(self.commands[self.index])
        last = self.last_line() if self.current is not None and self.current.started else ""
        self.succeeded = False
        self.message = _("{command} failed ({reason})").format(command=command, reason=reason) + (
            f": {last}" if last else "")


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
