"""Comparison with a gold-standard volume node: challenge metrics and a difference volume.

The worker already reports metrics with every snapshot when it was given the reference; these
functions compute them from the nodes in the scene (e.g. for a volume reconstructed earlier) with the
same definitions (:func:`qsmdip.metrics.all_metrics`, NumPy/SciPy only, no torch in this process).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np

from .job import check_same_grid, check_volume_node
from .streaming import array_ijk, copy_geometry, set_default_display, update_node_from_array

#: Metrics shown in the panel's table: key, label, unit, and whether higher is better.
METRIC_ROWS: Tuple[Tuple[str, str, str, bool], ...] = (
    ("nrmse", "NRMSE", "%", False),
    ("hfen", "HFEN", "%", False),
    ("ssim", "SSIM", "", True),
    ("xsim", "XSIM", "", True),
    ("psnr", "PSNR", "dB", True),
)


def check_comparison_nodes(qsm_node, reference_node, mask_node) -> None:
    """Refuse, in one line, a missing or empty node (e.g. the output of a run that failed before its
    first snapshot) or nodes on different grids, before anything is computed or created."""
    for node, role in ((qsm_node, "reconstruction"), (reference_node, "reference"), (mask_node, "mask")):
        check_volume_node(node, role)
    check_same_grid(reference_node, qsm_node, "reference", "reconstruction")
    check_same_grid(reference_node, mask_node, "reference", "mask")


def metrics_for_nodes(qsm_node, reference_node, mask_node) -> Dict[str, float]:
    """NRMSE, HFEN, SSIM, XSIM, PSNR and Pearson of ``qsm_node`` against ``reference_node`` in the mask."""
    from qsmdip.metrics import all_metrics

    check_comparison_nodes(qsm_node, reference_node, mask_node)
    return all_metrics(array_ijk(qsm_node), array_ijk(reference_node), array_ijk(mask_node) > 0)


def compare_nodes(scene, qsm_node, reference_node, mask_node, difference_node=None):
    """Metrics and the refreshed difference volume, after checking every node: ``(metrics, difference_node)``."""
    check_comparison_nodes(qsm_node, reference_node, mask_node)
    difference_node = update_difference_node(scene, qsm_node, reference_node, mask_node, difference_node)
    return metrics_for_nodes(qsm_node, reference_node, mask_node), difference_node


def metric_table_rows(metrics: Optional[Dict[str, float]]) -> List[Tuple[str, str]]:
    """(label, formatted value) for the panel's metrics table; '-' where a value is missing."""
    rows = []
    for key, label, unit, _ in METRIC_ROWS:
        value = None if not metrics else metrics.get(key)
        if value is None or not np.isfinite(value):
            text = "-"
        else:
            text = f"{value:.2f}" if unit else f"{value:.4f}"
            text = f"{text} {unit}".strip()
        rows.append((label, text))
    return rows


def difference_kji(qsm_kji: np.ndarray, reference_kji: np.ndarray, mask_kji: np.ndarray) -> np.ndarray:
    """Reconstruction minus reference, each demeaned inside the mask (as the metrics see them), 0 outside."""
    inside = mask_kji > 0
    x = np.asarray(qsm_kji, dtype=np.float64)
    r = np.asarray(reference_kji, dtype=np.float64)
    diff = (x - x[inside].mean()) - (r - r[inside].mean())
    return np.where(inside, diff, 0.0).astype(np.float32)


def update_difference_node(scene, qsm_node, reference_node, mask_node, difference_node=None):
    """Create or refresh the difference volume '<reconstruction>_minus_reference'; return it.

    ``difference_node`` is the one made last time. It is reused only while it is still in ``scene``:
    after the user deleted it or the scene was closed, a Python reference to it is stale (and node IDs
    are handed out again after a scene clear), so a new node is made instead.
    """
    import slicer

    check_comparison_nodes(qsm_node, reference_node, mask_node)
    if difference_node is not None and not scene.IsNodePresent(difference_node):
        difference_node = None
    if difference_node is None:
        name = scene.GenerateUniqueName(f"{qsm_node.GetName()}_minus_reference")
        difference_node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        copy_geometry(qsm_node, difference_node)
        set_default_display(difference_node)
    diff = difference_kji(slicer.util.arrayFromVolume(qsm_node), slicer.util.arrayFromVolume(reference_node),
                          slicer.util.arrayFromVolume(mask_node))
    update_node_from_array(difference_node, diff, qsm_node)
    return difference_node
