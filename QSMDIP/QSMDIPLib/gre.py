"""One reconstruction from multi-echo GRE phase and magnitude nodes: the job, and each stage in the scene.

The worker runs the phase pipeline and then the reconstruction (docs/WORKER_PROTOCOL.md, jobs from the
phase). :func:`prepare_gre_job` writes the echoes (:mod:`.echoes`) and the job file; :class:`GreSession`
is a :class:`~QSMDIPLib.session.ReconstructionSession` whose ``stage`` messages also bring volumes: the
total field, the mask and the local field are loaded into scene nodes as each stage finishes, so the
user sees them before the QSM arrives.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from qsmdip.errors import QSMInputError

from .echoes import EchoSet, check_echo_sets, export_echoes, parse_echo_times_ms, resolve_echo_times
from .job import (PROTOCOL_VERSION, JobOptions, PreparedJob, check_output_and_interval, solver_job_keys,
                  write_job_file, write_volume_node)
from .session import ReconstructionSession
from .streaming import OUTPUT_SUFFIX, set_default_display, update_node_from_file

#: panel label -> pipeline setting value (the worker refuses anything else; a test checks these lists
#: against the library's)
UNWRAP_METHODS = {"region-growing": "region-growing", "laplacian": "laplacian"}
BACKGROUND_METHODS = {"pdf": "pdf", "vsharp": "vsharp"}
#: display volume announced by the worker -> (suffix of its node's name, node class)
STAGE_NODES = {"total_field": ("_TotalField", "vtkMRMLScalarVolumeNode"),
               "local_field": ("_LocalField", "vtkMRMLScalarVolumeNode"),
               "mask": ("_FieldMask", "vtkMRMLLabelMapVolumeNode")}


@dataclass
class GreOptions:
    """What the pipeline needs beyond the echoes: echo times (s), B0 (T) and the methods per stage."""

    echo_times_s: Tuple[float, ...]
    b0_tesla: float
    pipeline: Dict[str, Any] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)   #: where the echo times came from, for the panel


def gre_options_from_panel(echo_times_ms_text: str, b0_tesla: float, unwrap: str, background: str,
                           phase: EchoSet, magnitude: Optional[EchoSet] = None) -> GreOptions:
    """The panel's echo times (ms, converted to s; empty: the DICOM's), B0 and method labels as options."""
    if unwrap not in UNWRAP_METHODS:
        raise QSMInputError(f"unknown unwrapping method {unwrap!r}: use one of {', '.join(UNWRAP_METHODS)}")
    if background not in BACKGROUND_METHODS:
        raise QSMInputError(f"unknown background removal {background!r}: use one of {', '.join(BACKGROUND_METHODS)}")
    tes, note = resolve_echo_times(parse_echo_times_ms(echo_times_ms_text), phase, magnitude)
    b0 = float(b0_tesla)
    if not (0.05 <= b0 <= 30.0):
        raise QSMInputError(f"B0 = {b0_tesla} T is not a plausible field strength")
    return GreOptions(tes, b0, {"unwrap": UNWRAP_METHODS[unwrap], "background": BACKGROUND_METHODS[background]},
                      [note])


def prepare_gre_job(phase: EchoSet, magnitude: EchoSet, options: JobOptions, gre: GreOptions, *, mask_node=None,
                    reference_node=None, output_node=None, temp_root: Optional[str] = None) -> PreparedJob:
    """Write every echo, the optional mask and reference, and a protocol-2 job into a new temporary folder.

    All must lie on the phase's first echo's grid; ``output_node`` must not be an input. The pipeline's
    display volumes go to ``<folder>/stages``. On any failure the folder is removed before the error
    propagates.
    """
    check_echo_sets(phase, magnitude, (mask_node, "mask"), (reference_node, "reference"))
    inputs = list(phase.volumes) + list(magnitude.volumes) + [phase.grid_node, magnitude.grid_node, mask_node,
                                                              reference_node]
    check_output_and_interval(output_node, inputs, options)
    if len(gre.echo_times_s) != phase.echoes:
        raise QSMInputError(f"the phase has {phase.echoes} echoes but {len(gre.echo_times_s)} echo times")

    work_dir = tempfile.mkdtemp(prefix="qsmdip-", dir=temp_root)
    try:
        extra = {}
        for name, node in (("mask", mask_node), ("reference", reference_node)):
            extra[name] = os.path.join(work_dir, f"{name}.nrrd") if node is not None else None
            if node is not None:
                write_volume_node(node, extra[name])
        job = {
            "protocol": PROTOCOL_VERSION,
            "phase": export_echoes(phase, work_dir, "phase"),
            "magnitude": export_echoes(magnitude, work_dir, "magnitude"),
            "echo_times_s": [float(t) for t in gre.echo_times_s],
            "b0_tesla": float(gre.b0_tesla),
            "mask": extra["mask"],
            "pipeline": dict(gre.pipeline),
            "stage_dir": os.path.join(work_dir, "stages"),
            "reference": extra["reference"],
            **solver_job_keys(options, work_dir),
        }
        job_path = write_job_file(work_dir, job)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    return PreparedJob(work_dir, job_path, job)


class GreSession(ReconstructionSession):
    """A reconstruction from the phase: the stages' volumes appear in the scene, then the QSM as usual.

    ``stage_nodes`` maps 'total_field', 'local_field' and 'mask' to the scene nodes made for them (named
    after the phase: '<phase>_TotalField', '<phase>_LocalField', '<phase>_FieldMask'); ``shown`` lists
    the nodes in the order they were last updated, so the panel can show the newest.
    """

    def __init__(self, scene, phase: EchoSet, magnitude: EchoSet, gre: GreOptions, options: JobOptions, *,
                 python_command: Sequence[str], module_dir: str, mask_node=None, reference_node=None,
                 output_node=None, env=None, temp_root: Optional[str] = None, grace_s: float = 3.0):
        super().__init__(scene, phase.grid_node, mask_node, options, python_command=python_command,
                         module_dir=module_dir, reference_node=reference_node, output_node=output_node, env=env,
                         temp_root=temp_root, grace_s=grace_s)
        self.phase, self.magnitude, self.gre = phase, magnitude, gre
        self.stage_nodes: Dict[str, Any] = {}
        self.shown: List[Any] = []

    def _prepare_job(self) -> PreparedJob:
        return prepare_gre_job(self.phase, self.magnitude, self.options, self.gre, mask_node=self.mask_node,
                               reference_node=self.reference_node, output_node=self.output_node,
                               temp_root=self.temp_root)

    def _output_name(self) -> Optional[str]:
        return f"{self.phase.name}{OUTPUT_SUFFIX}"

    def _stage(self, message: dict) -> None:
        super()._stage(message)
        volumes = message.get("volumes") or {}
        for name in ("total_field", "mask", "local_field"):
            if volumes.get(name):
                self._load_stage_volume(name, str(volumes[name]))

    def _load_stage_volume(self, name: str, path: str) -> None:
        """Load one announced display volume into its scene node (made on first use), then delete the file."""
        if name not in STAGE_NODES:
            return
        suffix, cls = STAGE_NODES[name]
        node = self.stage_nodes.get(name)
        created = node is None or self.scene.GetNodeByID(node.GetID()) is None
        if created:
            node = self.scene.AddNewNodeByClass(cls, self.scene.GenerateUniqueName(f"{self.phase.name}{suffix}"))
            self.stage_nodes[name] = node
        try:
            update_node_from_file(path, node, self.field_node, dtype=np.uint8 if name == "mask" else np.float32)
        except QSMInputError as error:
            self.state.warnings.append(str(error))
            return
        finally:
            self._remove(path)
        if created:
            if name == "mask":
                node.CreateDefaultDisplayNodes()
            else:
                set_default_display(node, _field_window(node))
        if node in self.shown:
            self.shown.remove(node)
        self.shown.append(node)


def _field_window(node) -> Tuple[float, float]:
    """A symmetric display window (ppm) holding 99 % of the field's non-zero values."""
    import slicer

    values = np.abs(np.asarray(slicer.util.arrayFromVolume(node)))
    values = values[values > 0]
    half = float(np.percentile(values, 99)) if values.size else 0.1
    return (-half, half) if half > 0 else (-0.1, 0.1)
