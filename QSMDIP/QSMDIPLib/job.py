"""Job preparation: MRML volume nodes -> temporary NRRD files + a job file for the worker.

The worker (``python -m qsmdip.worker JOB.json``, docs/WORKER_PROTOCOL.md) only sees files. Volumes are
written through Slicer's own storage node, which converts the node's RAS geometry (IJKToRAS) into the
LPS header that ITK/SimpleITK read, so oblique and flipped grids survive the trip. Input nodes are only
read, never modified, and no node is added to the scene.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence

import numpy as np

from qsmdip.errors import QSMInputError

PROTOCOL_VERSION = 2

#: panel label -> job value
METHODS = {"DIP": "dip", "TKD": "tkd", "Tikhonov": "tikhonov", "TV": "tv", "Single-step TV": "single-step-tv"}
UNITS = {"ppm": "ppm", "Hz": "hz", "rad": "rad"}
DEVICES = {"auto": "auto", "GPU": "cuda", "CPU": "cpu"}

#: Relative tolerance on the IJKToRAS entries when checking that two nodes share one voxel grid.
GRID_TOLERANCE = 1e-4


@dataclass
class JobOptions:
    """What the panel asks for, in the worker's vocabulary (lower-case method, units and device)."""

    method: str = "dip"
    units: str = "ppm"
    b0_tesla: Optional[float] = None
    te_s: Optional[float] = None
    #: B0 direction in the field node's RAS frame; None means the scanner's superior axis.
    b0_direction_ras: Optional[Sequence[float]] = None
    device: str = "auto"
    snapshot_every: int = 10
    preset: Optional[str] = None
    #: overrides of the method's settings dataclass fields (e.g. iterations, learning_rate, width, seed)
    settings: Dict[str, Any] = field(default_factory=dict)


def options_from_panel(method: str, units: str, b0_tesla: float, te_s: float, device: str,
                       update_interval: int, iterations: int, learning_rate: float, width: int,
                       seed: int) -> JobOptions:
    """Map the panel's labels and numbers onto :class:`JobOptions`.

    B0 and TE are passed only when the unit needs them; the DIP settings only for DIP (the quick
    previews run with their own defaults).
    """
    if method not in METHODS:
        raise QSMInputError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if units not in UNITS:
        raise QSMInputError(f"unknown field unit {units!r}: use one of {', '.join(UNITS)}")
    if device not in DEVICES:
        raise QSMInputError(f"unknown device {device!r}: use one of {', '.join(DEVICES)}")
    unit = UNITS[units]
    settings: Dict[str, Any] = {}
    if METHODS[method] == "dip":
        settings = {"iterations": int(iterations), "learning_rate": float(learning_rate),
                    "width": int(width), "seed": int(seed)}
    return JobOptions(
        method=METHODS[method], units=unit,
        b0_tesla=float(b0_tesla) if unit in ("hz", "rad") else None,
        te_s=float(te_s) if unit == "rad" else None,
        device=DEVICES[device], snapshot_every=int(update_interval), settings=settings)


def default_method_label(from_phase: bool) -> str:
    """The panel label of the library's default method: for a local field, or from multi-echo phase.

    Taken from ``qsmdip.solvers`` so the panel, the command line and ``qsmdip batch`` agree.
    """
    from qsmdip.solvers import default_method

    value = default_method(from_phase)
    return next(label for label, job_value in METHODS.items() if job_value == value)


def method_after_input_mode_change(method: str, was_from_phase: bool, now_from_phase: bool) -> str:
    """The method the panel shows after its input mode changes.

    It follows the new mode's default only while it still shows the old mode's default, so a method the user
    picked stays picked.
    """
    if was_from_phase != now_from_phase and method == default_method_label(was_from_phase):
        return default_method_label(now_from_phase)
    return method


@dataclass
class PreparedJob:
    """The files of one job, all inside ``work_dir`` (removed by :meth:`cleanup`)."""

    work_dir: str
    job_path: str
    job: Dict[str, Any]

    @property
    def output_path(self) -> str:
        return self.job["output"]

    @property
    def snapshot_path(self) -> Optional[str]:
        """The one snapshot file the worker replaces (only with a worker that lacks numbered snapshots)."""
        return self.job.get("snapshot")

    @property
    def snapshot_dir(self) -> Optional[str]:
        """The folder of numbered snapshot files, each deleted by the session once loaded."""
        return self.job.get("snapshot_dir")

    def cleanup(self) -> None:
        """Remove the temporary folder and everything in it (inputs, snapshots, output, job file)."""
        shutil.rmtree(self.work_dir, ignore_errors=True)


def ijk_to_ras(node) -> np.ndarray:
    """The node's 4x4 IJKToRAS matrix as a NumPy array (its own grid, parent transforms ignored)."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def check_volume_node(node, role: str) -> None:
    """Refuse a missing node, one without voxels, or one with more than one value per voxel."""
    if node is None:
        raise QSMInputError(f"no {role} volume selected")
    image = node.GetImageData()
    if image is None or min(image.GetDimensions()) < 1 or image.GetNumberOfPoints() == 0:
        raise QSMInputError(f"the {role} volume '{node.GetName()}' holds no image data")
    if image.GetNumberOfScalarComponents() != 1:
        raise QSMInputError(f"the {role} volume '{node.GetName()}' has {image.GetNumberOfScalarComponents()}"
                            " components per voxel: a scalar volume is needed")


def check_same_grid(node, other, role: str, other_role: str) -> None:
    """Refuse two nodes that do not share one voxel grid (dimensions and IJKToRAS), naming the difference."""
    dims, other_dims = node.GetImageData().GetDimensions(), other.GetImageData().GetDimensions()
    if tuple(dims) != tuple(other_dims):
        raise QSMInputError(f"the {other_role} '{other.GetName()}' has {tuple(other_dims)} voxels but the {role}"
                            f" '{node.GetName()}' has {tuple(dims)}: resample the {other_role} onto the {role}")
    a, b = ijk_to_ras(node), ijk_to_ras(other)
    scale = max(1.0, float(np.abs(a).max()))
    if not np.allclose(a, b, rtol=0.0, atol=GRID_TOLERANCE * scale):
        raise QSMInputError(f"the {other_role} '{other.GetName()}' is not on the {role}'s voxel grid (different"
                            f" origin, spacing or orientation): resample it onto '{node.GetName()}'")


def write_volume_node(node, path: str) -> None:
    """Write a volume node to ``path`` with its geometry, through a storage node outside the scene.

    The node is not modified: no storage node is attached to it and its name, data and modified
    state stay as they were.
    """
    import slicer

    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(path)
    storage.SetUseCompression(0)
    if not storage.WriteData(node):
        raise QSMInputError(f"could not write volume '{node.GetName()}' to {path}")


def ras_to_lps(vector: Sequence[float]) -> list:
    """A direction in RAS as the same direction in LPS (x and y change sign)."""
    v = [float(x) for x in vector]
    if len(v) != 3:
        raise QSMInputError(f"a direction needs three components, got {list(vector)}")
    return [-v[0], -v[1], v[2]]


def worker_takes_snapshot_dir() -> bool:
    """Whether the bundled worker accepts the job key 'snapshot_dir' (numbered snapshot files)."""
    from qsmdip import worker

    return "snapshot_dir" in getattr(worker, "_JOB_KEYS", {})


def _snapshot_keys(work_dir: str) -> Dict[str, str]:
    """Numbered snapshot files in their own folder, so the GUI never reads a file the worker is
    replacing (on Windows the replace fails while ITK holds the file open). A worker without that key
    gets the single replaced file it knows."""
    if worker_takes_snapshot_dir():
        return {"snapshot_dir": os.path.join(work_dir, "snapshots")}
    return {"snapshot": os.path.join(work_dir, "snapshot.nrrd")}


def check_output_and_interval(output_node, input_nodes, options: JobOptions) -> None:
    """The output must not be one of the inputs (inputs are never overwritten), and the update interval is
    at least one iteration."""
    inputs = [n for n in input_nodes if n is not None]
    if output_node is not None and any(output_node is n or output_node.GetID() == n.GetID() for n in inputs):
        raise QSMInputError(f"the output volume '{output_node.GetName()}' is one of the inputs:"
                            " choose another output (inputs are never overwritten)")
    if options.snapshot_every < 1:
        raise QSMInputError(f"the update interval must be at least 1 iteration, got {options.snapshot_every}")


def solver_job_keys(options: JobOptions, work_dir: str) -> Dict[str, object]:
    """The job keys of the reconstruction itself (output, snapshots, method and settings), shared by every
    kind of job the panel sends."""
    return {
        "output": os.path.join(work_dir, "qsm.nrrd"),
        **_snapshot_keys(work_dir),
        "snapshot_every": int(options.snapshot_every),
        "method": options.method,
        "preset": options.preset,
        "b0_direction_world": (ras_to_lps(options.b0_direction_ras)
                               if options.b0_direction_ras is not None else None),
        "device": options.device,
        "settings": dict(options.settings),
    }


def write_job_file(work_dir: str, job: Dict[str, object]) -> str:
    """Write ``job`` as ``<work_dir>/job.json`` and return its path."""
    job_path = os.path.join(work_dir, "job.json")
    with open(job_path, "w", encoding="utf-8") as handle:
        json.dump(job, handle, indent=2)
    return job_path


def prepare_job(field_node, mask_node, options: JobOptions, *, reference_node=None, magnitude_node=None,
                output_node=None, temp_root: Optional[str] = None) -> PreparedJob:
    """Write the inputs into a new temporary folder and the job file next to them.

    ``reference_node`` (gold standard) and ``magnitude_node`` (GRE magnitude, an anatomical prior for
    DIP) are optional and, like the mask, must be on the field's voxel grid. ``output_node`` is only
    checked (it must not be an input: inputs are never modified). On any failure the temporary folder
    is removed before the error propagates.
    """
    check_volume_node(field_node, "field")
    check_volume_node(mask_node, "mask")
    check_same_grid(field_node, mask_node, "field", "mask")
    for node, role in ((reference_node, "reference"), (magnitude_node, "magnitude")):
        if node is not None:
            check_volume_node(node, role)
            check_same_grid(field_node, node, "field", role)
    check_output_and_interval(output_node, (field_node, mask_node, reference_node, magnitude_node), options)

    work_dir = tempfile.mkdtemp(prefix="qsmdip-", dir=temp_root)
    try:
        nodes = {"field": field_node, "mask": mask_node, "reference": reference_node, "magnitude": magnitude_node}
        paths = {name: os.path.join(work_dir, f"{name}.nrrd") for name in nodes}
        for name, node in nodes.items():
            if node is not None:
                write_volume_node(node, paths[name])
        job = {
            "protocol": PROTOCOL_VERSION,
            "field": paths["field"],
            "mask": paths["mask"],
            "reference": paths["reference"] if reference_node is not None else None,
            "magnitude": paths["magnitude"] if magnitude_node is not None else None,
            "units": options.units,
            "b0_tesla": options.b0_tesla,
            "te_s": options.te_s,
            **solver_job_keys(options, work_dir),
        }
        job_path = write_job_file(work_dir, job)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    return PreparedJob(work_dir, job_path, job)
