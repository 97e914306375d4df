"""Is a recent enough torch importable in the worker's Python, which version, and is there a CUDA GPU?

Asked in a short background process of the same interpreter the worker will use, so the answer holds
for the worker and Slicer's own process never imports torch. :class:`TorchProbe` runs the question
without blocking (the panel polls it from its timer; a first import of torch can take a minute);
:func:`check_torch` waits for the answer (tests, scripts, the self-test). Installing torch is a
background job too (:func:`torch_install_job`), so it neither freezes the panel nor imports torch
into Slicer.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence, Tuple

from .i18n import _
from .process import BackgroundProcess, CommandSequence, worker_environment

#: The torch the library needs (pyproject.toml: torch>=2.4; the network asks torch.is_autocast_enabled("cpu")).
TORCH_REQUIREMENT = ">=2.4"
#: light-the-torch picks the torch build for the computer's CUDA driver, as the PyTorch extension does.
LIGHT_THE_TORCH = "light-the-torch>=0.5"

_PROBE = r"""
import json, platform, sys
info = {"python": platform.python_version(), "executable": sys.executable}
try:
    import torch
except Exception as error:
    info["error"] = f"{type(error).__name__}: {error}"
else:
    info["torch"] = torch.__version__
    info["cuda"] = bool(torch.cuda.is_available())
    info["gpu"] = torch.cuda.get_device_name(0) if info["cuda"] else None
    info["cuda_version"] = torch.version.cuda
print("QSMDIP-TORCH-CHECK " + json.dumps(info))
"""

_MARKER = "QSMDIP-TORCH-CHECK "


@dataclass
class TorchStatus:
    """What the worker's Python offers; ``message`` is one line for the panel."""

    available: bool
    torch_version: Optional[str]
    cuda_available: bool
    gpu_name: Optional[str]
    python_version: Optional[str]
    message: str


def version_tuple(version: str) -> Tuple[int, ...]:
    """The leading release numbers of a version: '2.13.0+cpu' -> (2, 13, 0), '2.1.0a0' -> (2, 1, 0)."""
    numbers = []
    for part in str(version).split("+")[0].split("."):
        match = re.match(r"\d+", part)
        if match is None:
            break
        numbers.append(int(match.group()))
        if match.end() != len(part):
            break
    return tuple(numbers)


def meets_requirement(version: str, requirement: str = TORCH_REQUIREMENT) -> bool:
    """True when ``version`` satisfies a minimum requirement written as '>=X.Y[.Z]'."""
    match = re.fullmatch(r"\s*>=\s*(\d+(?:\.\d+)*)\s*", requirement)
    if match is None:
        raise ValueError(f"only '>=X.Y' requirements are supported, got {requirement!r}")
    have, need = version_tuple(version), version_tuple(match.group(1))
    if not have:
        return False
    width = max(len(have), len(need))
    return have + (0,) * (width - len(have)) >= need + (0,) * (width - len(need))


def status_from_probe(info: dict, requirement: str = TORCH_REQUIREMENT) -> TorchStatus:
    """Turn the probe's report into a status: torch missing, too old, or ready (CPU or GPU)."""
    python = info.get("python")
    if "torch" not in info:
        return TorchStatus(False, None, False, None, python,
                           _("PyTorch is not installed in Python {python} ({executable}): {error}").format(
                               python=python, executable=info.get("executable"), error=info.get("error")))
    version = str(info["torch"])
    cuda, gpu = bool(info.get("cuda")), info.get("gpu")
    if not meets_requirement(version, requirement):
        return TorchStatus(False, version, cuda, gpu, python,
                           _("PyTorch {version} in Python {python} is too old: QSMDIP needs torch{requirement}").format(
                               version=version, python=python, requirement=requirement))
    if cuda:
        where = _("GPU {gpu} (CUDA {cuda})").format(gpu=gpu, cuda=info.get("cuda_version"))
    else:
        where = _("CPU only (no CUDA GPU visible to torch)")
    return TorchStatus(True, version, cuda, gpu, python,
                       _("PyTorch {version} in Python {python}: {where}").format(version=version, python=python,
                                                                                where=where))


class TorchProbe:
    """The torch question as a background job: :meth:`poll` returns None until the answer is known.

    Args:
        python_command: the worker's Python, e.g. ``["PythonSlicer"]``.
        module_dir: put first on PYTHONPATH, as for the worker. env: base environment.
        timeout_s: the probe is killed and reported as failed after this long.
        requirement: the torch version needed ('>=X.Y').
    """

    def __init__(self, python_command: Sequence[str], module_dir: Optional[str] = None, *,
                 env: Optional[Mapping[str, str]] = None, timeout_s: float = 120.0,
                 requirement: str = TORCH_REQUIREMENT):
        self.python_command = list(python_command)
        run_env = worker_environment(module_dir, env) if module_dir else (dict(env) if env is not None else None)
        self.process = BackgroundProcess([*self.python_command, "-c", _PROBE], env=run_env, grace_s=0.5)
        self.timeout_s = float(timeout_s)
        self.requirement = requirement
        self.status: Optional[TorchStatus] = None
        self._deadline = 0.0

    def start(self) -> "TorchProbe":
        self._deadline = time.monotonic() + self.timeout_s
        try:
            self.process.start()
        except OSError as error:
            self.status = self._failed(str(error))
        return self

    def poll(self) -> Optional[TorchStatus]:
        """The status once known (never blocks)."""
        if self.status is not None or not self.process.started:
            return self.status
        self.process.poll()
        if not self.process.finished and time.monotonic() > self._deadline:
            self.process.kill()
            self.process.wait(5)
            self.status = self._failed(_("no answer within {seconds:.0f} s").format(seconds=self.timeout_s))
        elif self.process.finished:
            self.status = self._from_output()
        return self.status

    def wait(self) -> TorchStatus:
        """Block until the status is known (at most the timeout)."""
        while self.poll() is None:
            time.sleep(0.05)
        return self.status

    def _from_output(self) -> TorchStatus:
        lines = self.process.log_tail(200)
        line = next((ln for ln in lines if ln.startswith(_MARKER)), None)
        if line is None:
            tail = next((ln for ln in reversed(lines) if ln.strip()), _("no output"))
            return self._failed(_("exit status {status}: {tail}").format(status=self.process.returncode, tail=tail))
        return status_from_probe(json.loads(line[len(_MARKER):]), self.requirement)

    def _failed(self, reason: str) -> TorchStatus:
        return TorchStatus(False, None, False, None, None,
                           _("could not run {command}: {reason}").format(command=" ".join(self.python_command),
                                                                         reason=reason))


def check_torch(python_command: Sequence[str], module_dir: Optional[str] = None, *,
                env: Optional[Mapping[str, str]] = None, timeout_s: float = 120.0,
                requirement: str = TORCH_REQUIREMENT) -> TorchStatus:
    """Run the probe in ``python_command`` and wait for torch's presence, version and GPU."""
    return TorchProbe(python_command, module_dir, env=env, timeout_s=timeout_s, requirement=requirement).start().wait()


def torch_install_commands(python_command: Sequence[str], requirement: str = TORCH_REQUIREMENT) -> List[List[str]]:
    """The commands that install torch into the worker's Python, one after another.

    light-the-torch (what the PyTorch extension uses) chooses the CPU or CUDA build that fits the
    computer. Run as separate processes, so torch is never imported into Slicer's own process.
    """
    python = list(python_command)
    return [[*python, "-m", "pip", "install", LIGHT_THE_TORCH],
            [*python, "-m", "light_the_torch", "install", f"torch{requirement}"]]


def torch_install_job(python_command: Sequence[str], *, env: Optional[Mapping[str, str]] = None,
                      requirement: str = TORCH_REQUIREMENT) -> CommandSequence:
    """A started background installation of torch into ``python_command``'s Python."""
    return CommandSequence(torch_install_commands(python_command, requirement), env=env).start()
