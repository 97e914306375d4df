"""What a batch output records about how it was made, and whether an earlier output can be kept.

Every output image gets a JSON sidecar holding :func:`configuration` (method, preset, every solver and
pipeline setting, resolved), its hash, the weights the solver chose, the device, stop reason, iterations,
seconds, the input files' SHA-256 and the software versions. The Chimap's sidecar is written last, so
its presence means the acquisition's outputs are complete.

An output is *current* when all images and sidecars exist, the configuration hash matches, and every
input still has the recorded checksum. Size and modification time are compared first, and a file is
re-hashed only when they differ, so a resumed cohort does not re-read every input.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

from .. import __version__
from ..phase.files import sidecar_path
from .discovery import Acquisition

#: the packages whose versions a sidecar records (those installed)
_PACKAGES = ("numpy", "scipy", "torch", "SimpleITK", "nibabel", "dask", "distributed")

DONE, ABSENT, INCOMPLETE, OTHER_SETTINGS, INPUTS_CHANGED = "done", "absent", "incomplete", "other-settings", "inputs-changed"


def configuration(method: str, preset: Optional[str], settings: Dict[str, Any], pipeline: Dict[str, Any],
                  kind: str) -> Dict[str, Any]:
    """The resolved settings that decide an output (the device and the software version do not).

    Raises :class:`~qsmdip.errors.QSMInputError` for an unknown method, preset or setting, so a bad
    ``--set`` fails before any subject starts.
    """
    from ..field_runner import _pipeline_settings
    from ..runner import ReconstructionRequest, _make_settings

    solver = _make_settings(ReconstructionRequest("", "", "", method=method, preset=preset, settings=settings))
    config: Dict[str, Any] = {"Input": kind, "Method": str(method).strip().lower(), "Preset": preset or "default",
                              "Settings": plain(dataclasses.asdict(solver))}
    if kind == "bids":
        config["PhasePipeline"] = plain(dataclasses.asdict(_pipeline_settings(pipeline)))
    return config


def configuration_hash(config: Dict[str, Any]) -> str:
    """A short stable hash of a configuration (sorted-key JSON)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint(path: str) -> Dict[str, Any]:
    """SHA-256, size and modification time of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    stat = os.stat(path)
    return {"sha256": digest.hexdigest(), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def fingerprints(paths: Iterable[str], root: Optional[Path] = None) -> Dict[str, Dict[str, Any]]:
    """File name (relative to ``root`` when it lies below it) -> :func:`fingerprint`."""
    return {_relative(p, root): fingerprint(p) for p in paths}


def software_versions() -> Dict[str, str]:
    versions = {"qsmdip": __version__, "python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def write_json(path: Path, data: Dict[str, Any]) -> None:
    """Write JSON atomically: a hidden file in the same folder, then renamed."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}.json")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def output_state(acquisition: Acquisition, root: Path, config_hash: str, input_root: Optional[Path] = None) -> str:
    """:data:`DONE` when the outputs are current (see the module docstring); else why not."""
    images = acquisition.outputs(root)
    files = list(images.values()) + [sidecar_path(p) for p in images.values()]
    present = [f.is_file() for f in files]
    if not any(present):
        return ABSENT
    if not all(present):
        return INCOMPLETE
    try:
        recorded = json.loads(sidecar_path(images["chimap"]).read_text())["QSMDIP"]
        old_hash, old_inputs = recorded["ConfigurationHash"], recorded["InputChecksums"]
    except (OSError, ValueError, KeyError, TypeError):
        return INCOMPLETE
    if old_hash != config_hash:
        return OTHER_SETTINGS
    current = {_relative(p, input_root): p for p in acquisition.input_files()}
    if set(current) != set(old_inputs):
        return INPUTS_CHANGED
    for name, path in current.items():
        if not _unchanged(path, old_inputs[name]):
            return INPUTS_CHANGED
    return DONE


def _unchanged(path: str, recorded: Dict[str, Any]) -> bool:
    try:
        stat = os.stat(path)
    except OSError:
        return False
    if stat.st_size == recorded.get("size") and stat.st_mtime_ns == recorded.get("mtime_ns"):
        return True
    return stat.st_size == recorded.get("size") and fingerprint(path)["sha256"] == recorded.get("sha256")


def _relative(path: str, root: Optional[Path]) -> str:
    absolute = os.path.abspath(path)
    if root is not None:
        base = os.path.abspath(root)
        if absolute.startswith(base + os.sep):
            return os.path.relpath(absolute, base)
    return absolute


def plain(value: Any) -> Any:
    """JSON-ready: tuples to lists (so a configuration compares equal after a round trip), NumPy scalars to numbers."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


def host() -> str:
    return platform.node() or "unknown"

