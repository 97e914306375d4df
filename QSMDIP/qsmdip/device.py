"""Choosing the torch device, and saying in words what was chosen and why."""
from __future__ import annotations

import functools
import sys
from typing import Tuple

import torch

from .errors import QSMInputError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(choice: str = "auto") -> Tuple[torch.device, str]:
    """Return the torch device for ``choice`` and a one-line description for the user.

    'auto' takes CUDA when available, else the CPU (Apple MPS only when asked for: some 3D ops are
    missing or slow there). An explicit 'cuda' or 'mps' that is not available is an error, not a
    silent fallback.
    """
    key = str(choice).strip().lower()
    if key.startswith("gpu"):
        key = "cuda" + key[3:]
    if key == "auto":
        if torch.cuda.is_available():
            dev = torch.device("cuda")
            return dev, f"GPU: {torch.cuda.get_device_name(dev)}"
        return torch.device("cpu"), f"CPU ({torch.get_num_threads()} threads): no CUDA GPU found"
    if key == "cpu":
        return torch.device("cpu"), f"CPU ({torch.get_num_threads()} threads), as requested"
    if key.startswith("cuda"):
        if not torch.cuda.is_available():
            raise QSMInputError("device 'cuda' requested but no CUDA GPU is available to torch "
                                f"(torch {torch.__version__}); use --device auto or cpu")
        dev = torch.device(key)
        return dev, f"GPU: {torch.cuda.get_device_name(dev)}"
    if key == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise QSMInputError("device 'mps' requested but Apple MPS is not available")
        return torch.device("mps"), "Apple GPU (MPS), as requested"
    raise QSMInputError(f"unknown device {choice!r}: use one of {', '.join(DEVICE_CHOICES)}")


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (Intel AMX or AVX512-BF16, as Linux reports them).

    On such CPUs oneDNN runs bf16 3D convolutions about 3x faster than fp32; elsewhere bf16 is emulated and
    slower, so it is used only where the flag is seen. Other systems than Linux answer False.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        return False
    return False
