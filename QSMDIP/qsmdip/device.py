"""Choosing the torch device, and saying in words what was chosen and why."""
from __future__ import annotations

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
