"""QSM dipole-inversion solvers sharing one call shape (see ``base.py``).

``METHODS`` names them; :func:`make_settings` builds a method's settings dataclass from a preset and
overrides (command-line flags and the Slicer panel map onto its fields), and :func:`get_solver` returns
the solve function.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Dict, Optional

from ..errors import QSMInputError

#: method name -> (module, solve function, settings class)
_REGISTRY = {
    "dip": ("dip", "solve_dip", "DIPSettings"),
    "tkd": ("tkd", "solve_tkd", "TKDSettings"),
    "tikhonov": ("tikhonov", "solve_tikhonov", "TikhonovSettings"),
    "tv": ("tv", "solve_tv", "TVSettings"),
    "single-step-tv": ("single_step", "solve_single_step_tv", "SingleStepSettings"),
}
METHODS = tuple(_REGISTRY)
#: the default method for a local field, and from the phase: single-step TV inverts the total field, which
#: measured better than any method on PDF's local field (realistic 2 mm head: 28.0 % NRMSE with its default
#: radii and Huber term, against 52.0 % for TV and 71.0 % for DIP with the magnitude; docs/phase-pipeline.md)
DEFAULT_METHOD = "dip"
DEFAULT_METHOD_FROM_PHASE = "single-step-tv"
#: methods that remove the background themselves: from the phase they are handed the total field, not the
#: local one (``field_runner.run_field_and_reconstruction``)
TOTAL_FIELD_METHODS = ("single-step-tv",)


def default_method(from_phase: bool) -> str:
    """The method when none is asked for: single-step TV from the phase, DIP from a local field (the command
    line, ``qsmdip batch`` and the Slicer panel all ask this)."""
    return DEFAULT_METHOD_FROM_PHASE if from_phase else DEFAULT_METHOD


def from_phase_note(method: str) -> Optional[str]:
    """A note for a method picked from the phase that inverts the pipeline's local field: its background-removal
    error is structured, and no method measured near single-step TV on it (docs/phase-pipeline.md). None for
    the methods that take the total field."""
    method = str(method).strip().lower()
    if method in TOTAL_FIELD_METHODS:
        return None
    return (f"{method} inverts the pipeline's local field, whose background-removal error it cannot tell from "
            f"tissue; from the phase {DEFAULT_METHOD_FROM_PHASE} measured best (realistic 2 mm head: 28 % NRMSE "
            f"against 52 % for TV and 71 % for DIP; docs/phase-pipeline.md)")


def _module(method: str):
    key = str(method).strip().lower()
    if key not in _REGISTRY:
        raise QSMInputError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    return key, importlib.import_module(f"{__name__}.{_REGISTRY[key][0]}")


def get_solver(method: str) -> Callable:
    """The ``solve_<method>`` function for a method name."""
    key, mod = _module(method)
    return getattr(mod, _REGISTRY[key][1])


def settings_class(method: str) -> type:
    """The settings dataclass of a method."""
    key, mod = _module(method)
    return getattr(mod, _REGISTRY[key][2])


def presets(method: str) -> Dict[str, Any]:
    """Named presets of a method (only DIP has several; the others have 'default')."""
    key, mod = _module(method)
    return dict(getattr(mod, "PRESETS", {"default": settings_class(key)()}))


def make_settings(method: str, preset: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None):
    """Settings for ``method``: its ``preset`` (default 'default') with ``overrides`` applied by field name."""
    key, _ = _module(method)
    available = presets(key)
    name = preset or "default"
    if name not in available:
        raise QSMInputError(f"unknown preset {name!r} for method {key}: use one of {', '.join(sorted(available))}")
    base = available[name]
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    fields = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise QSMInputError(f"method {key} has no setting {', '.join(unknown)}: its settings are {', '.join(sorted(fields))}")
    return dataclasses.replace(base, **overrides)
