"""The one-click example: a small head phantom made in the background, loaded and selected in the panel.

The phantom is written by the library's own command line (``python -m qsmdip phantom``) in the worker's
Python, never in Slicer's process: the realistic phantom (MNI152 tissue maps shipped inside nilearn;
nothing is downloaded) when nilearn is importable there, else the simple block phantom. At 4 mm
(42 x 50 x 43 voxels) it is made in about 10 s and TKD, Tikhonov and TV run on it in seconds. The example
selects DIP with :data:`EXAMPLE_DIP_ITERATIONS` iterations: on 2 CPU cores, alone, in fp32, that run took 46 s (NRMSE
31.2 % with the magnitude; 30.5 % with the full default run; TV 32.4 %), so the whole flow, phantom included,
takes under a minute.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence

from qsmdip.errors import QSMInputError

from .i18n import _
from .process import BackgroundProcess, worker_environment
from .streaming import read_volume_file, set_default_display

#: Voxel size of the example in mm: small enough for a CPU, large enough to look like a head.
EXAMPLE_VOXEL_MM = 4
#: DIP iterations the example selects (a short run that already beats TV on it; see the docstring).
EXAMPLE_DIP_ITERATIONS = 40
#: Node names of the loaded example (made unique in the scene when already taken).
EXAMPLE_NAMES = {"field": "Example local field (ppm)", "mask": "Example brain mask",
                 "magnitude": "Example GRE magnitude", "chi": "Example gold standard (ppm)"}


def nilearn_probe_command(python_command: Sequence[str]) -> list:
    """Exits 0 exactly when nilearn (the realistic phantom's tissue maps) is importable."""
    return [*python_command, "-c", "import nilearn"]


def phantom_command(python_command: Sequence[str], folder: str, realistic: bool) -> list:
    """The library's phantom command for the example, written as NRRD into ``folder`` (which must not exist)."""
    return [*python_command, "-m", "qsmdip", "phantom", folder, "--kind", "realistic" if realistic else "simple",
            "--voxel", str(EXAMPLE_VOXEL_MM), "--format", "nrrd"]


@dataclass
class ExampleFiles:
    """The phantom's files (``magnitude`` only for the realistic kind)."""

    folder: str
    kind: str
    field: str
    mask: str
    chi: str
    magnitude: Optional[str] = None

    @classmethod
    def in_folder(cls, folder: str, kind: str) -> "ExampleFiles":
        path = lambda name: os.path.join(folder, f"{name}.nrrd")  # noqa: E731
        magnitude = path("magnitude")
        return cls(folder, kind, path("field"), path("mask"), path("chi"),
                   magnitude if os.path.exists(magnitude) else None)


class ExampleDataJob:
    """Make the example phantom in the background: probe nilearn, then run the phantom command.

    :meth:`poll` never blocks; it returns the :class:`ExampleFiles` once they are written, and None
    before that or after a failure (``failed`` and ``message`` say why). :meth:`cleanup` removes the
    temporary folder once the files are loaded.
    """

    def __init__(self, python_command: Sequence[str], module_dir: str, *, env: Optional[Mapping[str, str]] = None,
                 temp_root: Optional[str] = None):
        self.python_command = list(python_command)
        self.env = worker_environment(module_dir, env)
        self.work_dir = tempfile.mkdtemp(prefix="qsmdip-example-", dir=temp_root)
        self.folder = os.path.join(self.work_dir, "phantom")
        self.kind: Optional[str] = None
        self.files: Optional[ExampleFiles] = None
        self.failed = False
        self.message = _("checking whether nilearn is available for the realistic phantom")
        self.process: Optional[BackgroundProcess] = None

    @property
    def finished(self) -> bool:
        return self.failed or self.files is not None

    def start(self) -> "ExampleDataJob":
        self._launch(nilearn_probe_command(self.python_command))
        return self

    def poll(self) -> Optional[ExampleFiles]:
        if self.finished or self.process is None:
            return self.files
        self.process.poll()
        if not self.process.finished:
            return None
        if self.kind is None:  # the probe has ended: its exit status says which phantom to make
            self.kind = "realistic" if self.process.returncode == 0 else "simple"
            self.message = _("making the {kind} phantom at {voxel} mm").format(kind=self.kind, voxel=EXAMPLE_VOXEL_MM)
            self._launch(phantom_command(self.python_command, self.folder, self.kind == "realistic"))
        elif self.process.returncode == 0:
            self.files = ExampleFiles.in_folder(self.folder, self.kind)
            self.message = _("example data ready ({kind} phantom)").format(kind=self.kind)
        else:
            last = next((ln for ln in reversed(self.process.log_tail(40)) if ln.strip()), "")
            self._fail(_("the phantom command failed (exit status {status}): {last}").format(
                status=self.process.returncode, last=last or _("no output")))
        return self.files

    def wait(self, timeout_s: float) -> Optional[ExampleFiles]:
        """Block until done or ``timeout_s`` passed (tests, the self-test)."""
        import time

        deadline = time.monotonic() + timeout_s
        while not self.finished and time.monotonic() < deadline:
            self.poll()
            time.sleep(0.05)
        return self.files

    def cancel(self) -> None:
        if self.process is not None and not self.finished:
            self.process.kill()
            self.process.wait(5)
            self._fail(_("cancelled"))

    def cleanup(self) -> None:
        shutil.rmtree(self.work_dir, ignore_errors=True)

    def _launch(self, command: list) -> None:
        self.process = BackgroundProcess(command, env=self.env)
        try:
            self.process.start()
        except OSError as error:
            self._fail(_("could not start {command}: {error}").format(command=" ".join(command), error=error))

    def _fail(self, message: str) -> None:
        self.failed, self.message = True, message
        self.cleanup()


@dataclass
class ExampleNodes:
    """The example's volume nodes in the scene (``magnitude`` None for the simple phantom)."""

    field: object
    mask: object
    chi: object
    magnitude: Optional[object] = None


def load_example(scene, files: ExampleFiles) -> ExampleNodes:
    """Add the example's volumes to ``scene``: field, mask (as a label map), gold standard, magnitude.

    The nodes get no storage node pointing at the temporary files, so saving the scene writes them
    anew. On a failure no node is left behind.
    """
    import vtk

    added = []

    def add(path: str, name: str, labelmap: bool = False):
        loaded = read_volume_file(path)
        cls = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
        node = scene.AddNewNodeByClass(cls, scene.GenerateUniqueName(EXAMPLE_NAMES[name]))
        added.append(node)
        image = loaded.GetImageData()
        if labelmap:  # the phantom writes a float 0/1 mask; a label map holds integers
            cast = vtk.vtkImageCast()
            cast.SetInputData(image)
            cast.SetOutputScalarTypeToUnsignedChar()
            cast.Update()
            image = cast.GetOutput()
        node.SetAndObserveImageData(image)
        ijk_to_ras = vtk.vtkMatrix4x4()
        loaded.GetIJKToRASMatrix(ijk_to_ras)
        node.SetIJKToRASMatrix(ijk_to_ras)
        node.CreateDefaultDisplayNodes()
        return node

    try:
        field = add(files.field, "field")
        mask = add(files.mask, "mask", labelmap=True)
        chi = add(files.chi, "chi")
        set_default_display(chi)
        magnitude = add(files.magnitude, "magnitude") if files.magnitude else None
    except BaseException:
        for node in added:
            scene.RemoveNode(node)
        raise
    return ExampleNodes(field, mask, chi, magnitude)


def panel_selection(nodes: ExampleNodes) -> Dict[str, object]:
    """Parameter-node values that select the example in the panel: inputs, a new output, ppm, and DIP with
    a short run (:data:`EXAMPLE_DIP_ITERATIONS`), so the first reconstruction a new user sees is under a minute."""
    if nodes.field is None or nodes.mask is None:
        raise QSMInputError("the example has no field or mask")
    return {"fieldVolume": nodes.field, "maskVolume": nodes.mask, "referenceVolume": nodes.chi,
            "magnitudeVolume": nodes.magnitude, "outputVolume": None, "fieldUnits": "ppm",
            "method": "DIP", "iterations": EXAMPLE_DIP_ITERATIONS}
