"""Multi-echo GRE inputs as Slicer's DICOM module loads them: echoes, echo times, B0, files for the worker.

A multi-echo series reaches the scene in one of three shapes:

- a **Sequence** node (``vtkMRMLSequenceNode``) of scalar volumes, one per echo ("Volume Sequence" loading);
- a **MultiVolume** node: one scalar volume node whose voxels have one component per echo;
- **one scalar volume per echo** (e.g. a series split by echo, or files loaded one by one).

Echo times come from what Slicer kept of the DICOM: the MultiVolume attributes
``MultiVolume.FrameLabels`` when ``MultiVolume.FrameIdentifyingDICOMTagName`` is ``EchoTime`` (the importer
copies them onto a Sequence node too), a Sequence index named like an echo time, or each volume's DICOM
instances (``DICOM.instanceUIDs`` looked up in the DICOM database). DICOM gives echo times in
milliseconds; the library wants seconds, and every value here is converted and says so. Nothing is
guessed: when no echo time is known, the panel asks for them.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Tuple

from qsmdip.errors import QSMInputError

from .job import check_same_grid, check_volume_node, write_volume_node

#: DICOM tags (group,element) read through the DICOM database.
ECHO_TIME_TAG = "0018,0081"            # ms
FIELD_STRENGTH_TAG = "0018,0087"       # tesla
#: ``instance_value(sop_instance_uid, tag) -> str`` (``slicer.dicomDatabase.instanceValue``)
InstanceValue = Callable[[str, str], str]


@dataclass
class EchoSet:
    """The echoes of one input (phase or magnitude), one scalar volume node each, in echo order."""

    role: str                                 #: "phase" or "magnitude"
    name: str                                 #: the selection's name (output nodes are named after it)
    source: str                               #: "sequence", "multivolume" or "volumes"
    volumes: List[Any]                        #: a scalar volume node per echo (MultiVolume frames: outside any scene)
    grid_node: Any                            #: the node whose grid (IJKToRAS) and transform the echoes share
    echo_times_s: Optional[Tuple[float, ...]] = None
    #: where the echo times (and the order) came from, for the panel
    notes: List[str] = field(default_factory=list)
    b0_tesla: Optional[float] = None          #: from the DICOM, when Slicer kept the instances

    @property
    def echoes(self) -> int:
        return len(self.volumes)


def echo_set(nodes: Sequence[Any], role: str, instance_value: Optional[InstanceValue] = None) -> EchoSet:
    """The echoes of the nodes chosen for ``role``: one Sequence or MultiVolume node, or one volume per echo."""
    nodes = [n for n in nodes if n is not None]
    if not nodes:
        raise QSMInputError(f"no {role} selected: choose a Sequence or MultiVolume node, or one volume per echo")
    if any(n.IsA("vtkMRMLSequenceNode") for n in nodes):
        if len(nodes) > 1:
            raise QSMInputError(f"choose one Sequence node for the {role}, or volumes only, not both")
        return _from_sequence(nodes[0], role, instance_value)
    for node in nodes:
        if not node.IsA("vtkMRMLScalarVolumeNode"):
            raise QSMInputError(f"the {role} '{node.GetName()}' is a {node.GetClassName()}: choose volumes")
        if node.IsA("vtkMRMLLabelMapVolumeNode"):
            raise QSMInputError(f"the {role} '{node.GetName()}' is a label map, not an image")
    if len(nodes) == 1 and _frames(nodes[0]) > 1:
        return _from_multivolume(nodes[0], role, instance_value)
    return _from_volumes(nodes, role, instance_value)


def echo_times_from_attributes(node: Any) -> Optional[Tuple[float, ...]]:
    """Echo times (s) from the MultiVolume attributes, when its frames are identified by EchoTime."""
    tag = (node.GetAttribute("MultiVolume.FrameIdentifyingDICOMTagName") or "").strip()
    labels = node.GetAttribute("MultiVolume.FrameLabels")
    if _normalise(tag) != "echotime" or not labels:
        return None
    unit = (node.GetAttribute("MultiVolume.FrameIdentifyingDICOMTagUnits") or "ms").strip().lower()
    return _to_seconds(labels.split(","), unit, f"MultiVolume.FrameLabels of '{node.GetName()}'")


def echo_times_from_sequence_index(sequence: Any) -> Optional[Tuple[float, ...]]:
    """Echo times (s) from a Sequence's index values, when its index is named like an echo time."""
    if _normalise(sequence.GetIndexName() or "") not in ("echotime", "te"):
        return None
    unit = (sequence.GetIndexUnit() or "ms").strip().lower()
    values = [sequence.GetNthIndexValue(i) for i in range(sequence.GetNumberOfDataNodes())]
    return _to_seconds(values, unit, f"the index of '{sequence.GetName()}'")


def dicom_value(node: Any, tag: str, instance_value: Optional[InstanceValue]) -> Optional[float]:
    """A number from the node's first DICOM instance, or None when Slicer kept no instance or no value."""
    if instance_value is None:
        return None
    uids = (node.GetAttribute("DICOM.instanceUIDs") or "").split()
    if not uids:
        return None
    try:
        text = instance_value(uids[0], tag)
        value = float(str(text).split("\\")[0])
    except (ValueError, TypeError, RuntimeError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def parse_echo_times_ms(text: str) -> Optional[Tuple[float, ...]]:
    """The panel's echo times, typed in milliseconds (``4.9, 9.8``), in seconds; None when left empty."""
    parts = [p for p in re.split(r"[,;\s]+", str(text or "").strip()) if p]
    if not parts:
        return None
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise QSMInputError(f"echo times must be milliseconds separated by commas (e.g. 4.9, 9.8), got {text!r}")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise QSMInputError(f"echo times must be positive numbers of milliseconds, got {text!r}")
    if max(values) < 1.0:
        raise QSMInputError(f"echo times {text!r} look like seconds: type them in milliseconds (e.g. 4.9, 9.8)")
    return tuple(v / 1000.0 for v in values)


def format_ms(echo_times_s: Sequence[float]) -> str:
    """Seconds -> the panel's text in milliseconds (``4.92, 9.84``)."""
    return ", ".join(f"{t * 1000.0:.6g}" for t in echo_times_s)


def resolve_echo_times(typed_s: Optional[Sequence[float]], phase: EchoSet,
                       magnitude: Optional[EchoSet] = None) -> Tuple[Tuple[float, ...], str]:
    """The echo times to use (s) and a note saying where they came from: typed values win, and must agree
    with the DICOM's when both are known."""
    found = phase.echo_times_s or (magnitude.echo_times_s if magnitude is not None else None)
    if typed_s:
        typed = tuple(float(t) for t in typed_s)
        if found and (len(found) != len(typed) or any(abs(a - b) > 0.01 * b for a, b in zip(typed, found))):
            raise QSMInputError(f"the echo times typed ({format_ms(typed)} ms) disagree with the DICOM's"
                                f" ({format_ms(found)} ms)")
        tes, note = typed, "echo times as typed (ms, converted to s)"
    elif found:
        tes, note = found, "echo times from the DICOM (ms, converted to s)"
    else:
        raise QSMInputError(f"the echo times of '{phase.name}' are not in what Slicer kept of the DICOM: type them"
                            " in milliseconds")
    if len(tes) != phase.echoes:
        raise QSMInputError(f"the phase has {phase.echoes} echoes but {len(tes)} echo times ({format_ms(tes)} ms)")
    return tes, note


def check_echo_sets(phase: EchoSet, magnitude: EchoSet, *others: Tuple[Any, str]) -> None:
    """Every echo (and each other node, e.g. a mask) on the phase's first echo's voxel grid."""
    reference = phase.volumes[0]
    if phase.echoes != magnitude.echoes:
        raise QSMInputError(f"the phase '{phase.name}' has {phase.echoes} echoes but the magnitude '{magnitude.name}'"
                            f" has {magnitude.echoes}")
    for echo_set_ in (phase, magnitude):
        for n, node in enumerate(echo_set_.volumes, start=1):
            check_volume_node(node, f"{echo_set_.role} echo {n}")
            if node is not reference:
                check_same_grid(reference, node, "phase echo 1", f"{echo_set_.role} echo {n}")
    for node, role in others:
        if node is not None:
            check_volume_node(node, role)
            check_same_grid(reference, node, "phase", role)


def export_echoes(echoes: EchoSet, folder: str, prefix: str) -> List[str]:
    """Write each echo as ``<prefix>_echo<N>.nrrd`` in ``folder`` (one 3D file per echo, in echo order)."""
    paths = []
    for n, node in enumerate(echoes.volumes, start=1):
        path = os.path.join(folder, f"{prefix}_echo{n}.nrrd")
        write_volume_node(node, path)
        paths.append(path)
    return paths


# -- the three shapes ------------------------------------------------------------------------------------
def _from_sequence(sequence: Any, role: str, instance_value: Optional[InstanceValue]) -> EchoSet:
    count = sequence.GetNumberOfDataNodes()
    if count < 1:
        raise QSMInputError(f"the {role} sequence '{sequence.GetName()}' is empty")
    volumes = [sequence.GetNthDataNode(i) for i in range(count)]
    for node in volumes:
        if node is None or not node.IsA("vtkMRMLScalarVolumeNode"):
            kind = node.GetClassName() if node is not None else "nothing"
            raise QSMInputError(f"the {role} sequence '{sequence.GetName()}' holds {kind}, not scalar volumes")
    result = EchoSet(role, sequence.GetName(), "sequence", volumes, volumes[0])
    for source, tes in ((f"the MultiVolume attributes of '{sequence.GetName()}'", echo_times_from_attributes(sequence)),
                        (f"the index of '{sequence.GetName()}'", echo_times_from_sequence_index(sequence)),
                        ("the DICOM instances of its volumes", _dicom_echo_times(volumes, instance_value))):
        if tes is not None and _set_echo_times(result, tes, source):
            break
    result.b0_tesla = _dicom_b0([sequence] + volumes, instance_value)
    return result


def _from_multivolume(node: Any, role: str, instance_value: Optional[InstanceValue]) -> EchoSet:
    import slicer
    import vtk

    frames = []
    for index in range(_frames(node)):
        extract = vtk.vtkImageExtractComponents()
        extract.SetInputData(node.GetImageData())
        extract.SetComponents(index)
        extract.Update()
        frame = slicer.vtkMRMLScalarVolumeNode()
        frame.SetName(f"{node.GetName()} frame {index + 1}")
        frame.SetAndObserveImageData(extract.GetOutput())
        matrix = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(matrix)
        frame.SetIJKToRASMatrix(matrix)
        frames.append(frame)
    result = EchoSet(role, node.GetName(), "multivolume", frames, node)
    tes = echo_times_from_attributes(node)
    if tes is not None:
        _set_echo_times(result, tes, f"the MultiVolume attributes of '{node.GetName()}'")
    result.b0_tesla = _dicom_b0([node], instance_value)
    return result


def _from_volumes(nodes: List[Any], role: str, instance_value: Optional[InstanceValue]) -> EchoSet:
    for node in nodes:
        if _frames(node) != 1:
            raise QSMInputError(f"the {role} '{node.GetName()}' has {_frames(node)} components per voxel: choose it"
                                " alone (a MultiVolume) or volumes of one echo each")
    tes = _dicom_echo_times(nodes, instance_value)
    order = list(range(len(nodes)))
    notes = []
    if tes is not None and len(nodes) > 1:
        order = sorted(order, key=lambda i: tes[i])
        if order != list(range(len(nodes))):
            notes.append(f"{role} volumes put in echo order by their DICOM echo times")
        tes = tuple(tes[i] for i in order)
    elif len(nodes) > 1:
        notes.append(f"{role} volumes taken in the order chosen (no DICOM echo times)")
    volumes = [nodes[i] for i in order]
    name = volumes[0].GetName() if len(volumes) == 1 else _common_name([v.GetName() for v in volumes])
    result = EchoSet(role, name, "volumes", volumes, volumes[0], notes=notes)
    if tes is not None:
        _set_echo_times(result, tes, "the DICOM instances of the volumes")
    result.b0_tesla = _dicom_b0(volumes, instance_value)
    return result


# -- helpers ---------------------------------------------------------------------------------------------
def _frames(node: Any) -> int:
    image = node.GetImageData()
    return int(image.GetNumberOfScalarComponents()) if image is not None else 1


def _set_echo_times(result: EchoSet, tes: Tuple[float, ...], source: str) -> bool:
    if len(tes) != result.echoes:
        result.notes.append(f"{source} list {len(tes)} echo times for {result.echoes} echoes: not used")
        return False
    if any(b <= a for a, b in zip(tes, tes[1:])):
        result.notes.append(f"{source} list echo times that do not increase ({format_ms(tes)} ms): not used")
        return False
    result.echo_times_s = tes
    result.notes.append(f"echo times {format_ms(tes)} ms from {source}")
    return True


def _dicom_echo_times(volumes: Sequence[Any], instance_value: Optional[InstanceValue]) -> Optional[Tuple[float, ...]]:
    values = [dicom_value(v, ECHO_TIME_TAG, instance_value) for v in volumes]
    if any(v is None for v in values):
        return None
    return tuple(v / 1000.0 for v in values)  # DICOM EchoTime is in ms


def _dicom_b0(nodes: Sequence[Any], instance_value: Optional[InstanceValue]) -> Optional[float]:
    for node in nodes:
        value = dicom_value(node, FIELD_STRENGTH_TAG, instance_value)
        if value is not None:
            return value
    return None


def _to_seconds(values: Sequence[str], unit: str, source: str) -> Tuple[float, ...]:
    scale = {"ms": 1e-3, "msec": 1e-3, "millisecond": 1e-3, "milliseconds": 1e-3, "s": 1.0, "sec": 1.0,
             "second": 1.0, "seconds": 1.0}.get(unit)
    if scale is None:
        raise QSMInputError(f"{source} gives echo times in {unit!r}: only ms or s are understood")
    try:
        numbers = tuple(float(v) * scale for v in values)
    except ValueError:
        raise QSMInputError(f"{source} holds echo times that are not numbers: {', '.join(values)}")
    if not all(math.isfinite(t) and t > 0 for t in numbers):
        raise QSMInputError(f"{source} holds echo times that are not positive: {', '.join(values)}")
    return numbers


def _normalise(text: str) -> str:
    return re.sub(r"[\s_\-]", "", text).lower()


def _common_name(names: Sequence[str]) -> str:
    prefix = os.path.commonprefix(list(names)).rstrip(" _-:")
    return prefix or names[0]


__all__ = ["EchoSet", "echo_set", "echo_times_from_attributes", "echo_times_from_sequence_index", "dicom_value",
           "parse_echo_times_ms", "format_ms", "resolve_echo_times", "check_echo_sets", "export_echoes",
]
