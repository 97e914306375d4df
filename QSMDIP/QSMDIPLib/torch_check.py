"""Is torch importable in the worker's Python, which version, and is there a CUDA GPU?

Asked in a short subprocess of the same interpreter the worker will use, so the answer holds for the
worker and Slicer's own process never imports torch.
"""
from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from .process import worker_environment

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


def check_torch(python_command: Sequence[str], module_dir: Optional[str] = None, *,
                env: Optional[Mapping[str, str]] = None, timeout_s: float = 120.0) -> TorchStatus:
    """Run a probe in ``python_command`` and report torch's presence, version and GPU."""
    run_env = worker_environment(module_dir, env) if module_dir else (dict(env) if env is not None else None)
    try:
        completed = subprocess.run([*python_command, "-c", _PROBE], capture_output=True, text=True,
                                   timeout=timeout_s, env=run_env, stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return TorchStatus(False, None, False, None, None,
                           f"could not run {' '.join(python_command)}: {error}")
    line = next((ln for ln in completed.stdout.splitlines() if ln.startswith(_MARKER)), None)
    if line is None:
        tail = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        return TorchStatus(False, None, False, None, None,
                           f"{' '.join(python_command)} failed (exit status {completed.returncode}): {tail}")
    info = json.loads(line[len(_MARKER):])
    python = info.get("python")
    if "torch" not in info:
        return TorchStatus(False, None, False, None, python,
                           f"PyTorch is not installed in Python {python} ({info.get('executable')}): {info.get('error')}")
    if info.get("cuda"):
        where = f"GPU {info.get('gpu')} (CUDA {info.get('cuda_version')})"
    else:
        where = "CPU only (no CUDA GPU visible to torch)"
    return TorchStatus(True, info["torch"], bool(info.get("cuda")), info.get("gpu"), python,
                       f"PyTorch {info['torch']} in Python {python}: {where}")
