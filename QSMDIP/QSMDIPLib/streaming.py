"""The output volume node: created once with the field's geometry, then updated in place.

Snapshots and the final result replace the node's voxels only. The node, its vtkImageData object,
its display node (window/level, colour map) and its parent transform stay, so slice views that show
it simply refresh.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from qsmdip.errors import QSMInputError

from .job import GRID_TOLERANCE, ijk_to_ras

#: Default display window of a new QSM volume, in ppm.
DEFAULT_WINDOW_PPM: Tuple[float, float] = (-0.15, 0.15)
DEFAULT_COLOR_NODE_ID = "vtkMRMLColorTableNodeGrey"
OUTPUT_SUFFIX = "_QSM"


def output_name(field_node) -> str:
    """Name of a new output volume: the field's name plus '_QSM'."""
    return f"{field_node.GetName()}{OUTPUT_SUFFIX}"


def copy_geometry(source_node, target_node) -> None:
    """Give ``target_node`` the IJKToRAS grid and the parent transform of ``source_node``."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    source_node.GetIJKToRASMatrix(matrix)
    target_node.SetIJKToRASMatrix(matrix)
    target_node.SetAndObserveTransformNodeID(source_node.GetTransformNodeID())


def set_default_display(node, window_ppm: Tuple[float, float] = DEFAULT_WINDOW_PPM) -> None:
    """Grey colour map and a fixed window of ``window_ppm`` (QSM values are small and signed)."""
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(DEFAULT_COLOR_NODE_ID)
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(float(window_ppm[0]), float(window_ppm[1]))


def ensure_output_node(scene, field_node, output_node=None, name: Optional[str] = None):
    """Return the node the reconstruction goes into.

    Without ``output_node`` a new scalar volume named after the field (or ``name``) is added to ``scene``
    with the field's geometry and the default display. A chosen node keeps its display settings; it only
    gets the field's geometry (and a default display if it has none).
    """
    if output_node is None:
        output_node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode",
                                              scene.GenerateUniqueName(name or output_name(field_node)))
        copy_geometry(field_node, output_node)
        set_default_display(output_node)
        return output_node
    if output_node.GetID() == field_node.GetID():
        raise QSMInputError(f"the output volume '{output_node.GetName()}' is the field: choose another output")
    copy_geometry(field_node, output_node)
    if output_node.GetDisplayNode() is None:
        set_default_display(output_node)
    return output_node


def read_volume_file(path: str):
    """Read a volume file into a scalar volume node that is not in any scene."""
    import slicer

    node = slicer.vtkMRMLScalarVolumeNode()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(path)
    if not storage.ReadData(node) or node.GetImageData() is None:
        raise QSMInputError(f"could not read the worker's volume file {path}")
    return node


def update_node_from_file(path: str, output_node, field_node, dtype=np.float32) -> None:
    """Replace ``output_node``'s voxels by the file's (as ``dtype``), keeping the node and its display.

    The file must lie on the field's grid (the worker writes every result with the field's geometry);
    anything else means the file does not belong to this reconstruction and is refused.
    """
    loaded = read_volume_file(path)
    field_dims = field_node.GetImageData().GetDimensions()
    if tuple(loaded.GetImageData().GetDimensions()) != tuple(field_dims):
        raise QSMInputError(f"{path} has {loaded.GetImageData().GetDimensions()} voxels, the field {field_dims}")
    a, b = ijk_to_ras(loaded), ijk_to_ras(field_node)
    if not np.allclose(a, b, rtol=0.0, atol=GRID_TOLERANCE * max(1.0, float(np.abs(b).max()))):
        raise QSMInputError(f"{path} is not on the field's voxel grid")
    update_node_from_array(output_node, _array_kji(loaded), field_node, dtype=dtype)


def update_node_from_array(output_node, array_kji: np.ndarray, geometry_node=None, dtype=np.float32) -> None:
    """Write a ``[k, j, i]`` array (Slicer's array order) into the node in place."""
    import slicer

    slicer.util.updateVolumeFromArray(output_node, np.ascontiguousarray(array_kji, dtype=dtype))
    if geometry_node is not None:
        copy_geometry(geometry_node, output_node)


def array_ijk(node) -> np.ndarray:
    """A copy of the node's voxels indexed ``[i, j, k]`` (the library's order)."""
    return np.ascontiguousarray(_array_kji(node).transpose(2, 1, 0)).copy()


def _array_kji(node) -> np.ndarray:
    import slicer

    return np.array(slicer.util.arrayFromVolume(node), copy=True)

