"""Export a QSM volume node as a DICOM series for PACS (:func:`qsmdip.dicom_export.export_qsm_dicom`).

The node's voxels and its IJKToRAS grid become a :class:`qsmdip.io.Volume` in LPS directly, without a
temporary file. A parent transform is not applied: the series is written on the node's own grid, the
scanner frame the field was acquired in, so it overlays the source series in any viewer. When the
field was loaded from DICOM, its source series supplies the patient and the study.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np

from qsmdip.io import Volume

from .job import check_volume_node, ijk_to_ras
from .streaming import array_ijk

#: Slicer's DICOM plugins record the source instances of a loaded volume in this node attribute.
INSTANCE_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def volume_from_node(node, role: str = "QSM") -> Volume:
    """The node's voxels (``[i, j, k]``) and grid as a library Volume in LPS millimetres."""
    check_volume_node(node, role)
    matrix = ijk_to_ras(node)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    direction_ras = matrix[:3, :3] / spacing
    return Volume(array_ijk(node), tuple(spacing), tuple(RAS_TO_LPS @ matrix[:3, 3]), RAS_TO_LPS @ direction_ras)


def dicom_source_file(node, file_for_instance: Callable[[str], str]) -> Optional[str]:
    """One file of the DICOM series ``node`` was loaded from, or None (not from DICOM, or no longer there).

    ``file_for_instance`` maps a SOP Instance UID to its file (``slicer.dicomDatabase.fileForInstance``).
    """
    if node is None:
        return None
    uids = (node.GetAttribute(INSTANCE_UIDS_ATTRIBUTE) or "").split()
    for uid in uids:
        path = file_for_instance(uid)
        if path and os.path.isfile(path):
            return path
    return None


def new_series_folder(parent: str, node_name: str) -> Path:
    """A folder that does not exist yet inside ``parent``, named after the node: '<name> DICOM', '... 2'."""
    safe = "".join(c if c.isalnum() or c in "-_ ." else "_" for c in node_name).strip(" .") or "QSM"
    base = Path(parent) / f"{safe} DICOM"
    candidate, number = base, 2
    while candidate.exists():
        candidate = base.with_name(f"{base.name} {number}")
        number += 1
    return candidate


def export_node_dicom(node, parent_folder: str, *, like: Optional[str] = None,
                      series_description: Optional[str] = None) -> List[Path]:
    """Write ``node`` (a QSM in ppm) as a new DICOM series in a new folder inside ``parent_folder``.

    ``like`` is the source DICOM series (a file or a folder) whose patient and study the series joins.
    Returns the written files; raises :class:`~qsmdip.errors.QSMInputError` with one line on bad input.
    """
    from qsmdip.dicom_export import export_qsm_dicom

    volume = volume_from_node(node)
    folder = new_series_folder(parent_folder, node.GetName())
    return export_qsm_dicom(volume, folder, like_dicom_dir=like, series_description=series_description)
