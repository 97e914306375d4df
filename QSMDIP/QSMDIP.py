"""QSMDIP: quantitative susceptibility mapping by Deep Image Prior, as a 3D Slicer module.

Module, Widget, Logic and Test only. Every decision lives in the Qt-free ``QSMDIPLib`` package; the
reconstruction itself runs in a separate worker process (``PythonSlicer -m qsmdip.worker``), so torch
never runs inside Slicer's process and the GUI never freezes.
"""
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import Choice, Decimals, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from QSMDIPLib.compare import metric_table_rows, metrics_for_nodes, update_difference_node
from QSMDIPLib.job import options_from_panel
from QSMDIPLib.session import ReconstructionSession
from QSMDIPLib.torch_check import check_torch

TORCH_REQUIREMENT = ">=2.0"
COMPARE_LAYOUT_ID = 50731  # arbitrary id for the custom side-by-side layout


class QSMDIP(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "QSM DIP"
        self.parent.categories = ["Quantification"]
        self.parent.dependencies = []
        self.parent.contributors = ["QSMDIP developers"]
        self.parent.helpText = (
            "Reconstruct a quantitative susceptibility map (ppm) from a local field map and a brain mask by"
            " Deep Image Prior, with TKD, Tikhonov and total variation as quick previews. An optional GRE"
            " magnitude on the field's grid serves DIP as an anatomical prior. The solver runs in"
            " a background process; the output volume is updated live. Needs PyTorch (PyTorch extension).")
        self.parent.acknowledgementText = "QSMDIP is BSD-3-Clause licensed open-source software."


@parameterNodeWrapper
class QSMDIPParameterNode:
    fieldVolume: vtkMRMLScalarVolumeNode
    maskVolume: vtkMRMLScalarVolumeNode
    referenceVolume: vtkMRMLScalarVolumeNode
    magnitudeVolume: vtkMRMLScalarVolumeNode
    outputVolume: vtkMRMLScalarVolumeNode
    fieldUnits: Annotated[str, Choice(["ppm", "Hz", "rad"])] = "ppm"
    b0Tesla: Annotated[float, WithinRange(0.1, 21.0), Decimals(2)] = 3.0
    echoTimeS: Annotated[float, WithinRange(0.0001, 1.0), Decimals(4)] = 0.02
    method: Annotated[str, Choice(["DIP", "TKD", "Tikhonov", "TV"])] = "DIP"
    iterations: Annotated[int, WithinRange(1, 100000)] = 250
    learningRate: Annotated[float, WithinRange(0.000001, 1.0), Decimals(6)] = 0.001
    width: Annotated[int, WithinRange(1, 256)] = 16
    updateInterval: Annotated[int, WithinRange(1, 10000)] = 10
    seed: Annotated[int, WithinRange(0, 2147483647)] = 0
    device: Annotated[str, Choice(["auto", "GPU", "CPU"])] = "auto"


class QSMDIPWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.session = None
        self.timer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/QSMDIP.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = QSMDIPLogic()

        self.timer = qt.QTimer()
        self.timer.setInterval(250)
        self.timer.timeout.connect(self.onTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.clicked.connect(self.onApplyButton)
        self.ui.compareButton.clicked.connect(self.onCompareButton)
        self.ui.installTorchButton.clicked.connect(self.onInstallTorchButton)
        self.ui.installTorchButton.visible = False
        self._showMetrics(None)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        self._stopSession()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateEnabledWidgets)

    def onSceneStartClose(self, caller, event) -> None:
        self._stopSession()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.fieldVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.fieldVolume = first

    def setParameterNode(self, inputParameterNode: Optional[QSMDIPParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateEnabledWidgets)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateEnabledWidgets)
            self._updateEnabledWidgets()

    def _running(self) -> bool:
        return self.session is not None and not self.session.finished

    def _updateEnabledWidgets(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        running = self._running()
        self.ui.b0SpinBox.enabled = p.fieldUnits in ("Hz", "rad")
        self.ui.echoTimeSpinBox.enabled = p.fieldUnits == "rad"
        for widget in (self.ui.iterationsSpinBox, self.ui.learningRateSpinBox, self.ui.widthSpinBox, self.ui.seedSpinBox):
            widget.enabled = p.method == "DIP"  # the quick previews run with their own defaults
        for widget in (self.ui.inputsCollapsibleButton, self.ui.methodCollapsibleButton, self.ui.outputVolumeSelector):
            widget.enabled = not running
        self.ui.applyButton.text = "Cancel" if running else "Apply"
        self.ui.applyButton.enabled = running or bool(p.fieldVolume and p.maskVolume)
        self.ui.compareButton.enabled = bool(p.referenceVolume and p.outputVolume and p.maskVolume)

    # -- run --------------------------------------------------------------------------------------
    def onApplyButton(self) -> None:
        if self._running():
            self.session.cancel()
            self.ui.statusLabel.text = "Cancelling..."
            return
        with slicer.util.tryWithErrorDisplay("Failed to start the reconstruction.", waitCursor=True):
            if not self._torchReady():
                return
            self.session = self.logic.startReconstruction(self._parameterNode)
            self._parameterNode.outputVolume = self.session.output_node
            self._showMetrics(None)
            self.timer.start()
            self.onTimer()

    def onTimer(self) -> None:
        if self.session is None:
            self.timer.stop()
            return
        firstSnapshot = self.session.state.snapshots_loaded == 0
        state = self.session.poll()
        if firstSnapshot and state.snapshots_loaded > 0:
            slicer.util.setSliceViewerLayers(background=self.session.output_node, fit=True)
        self.ui.progressBar.value = state.progress_percent()
        self.ui.progressLabel.text = state.progress_text()
        self.ui.statusLabel.text = "\n".join([state.message] + [f"Warning: {w}" for w in state.warnings])
        if state.metrics is not None:
            self._showMetrics(state.metrics)
        if state.finished:
            self.timer.stop()
            self._updateEnabledWidgets()
            if state.phase == "failed":
                slicer.util.errorDisplay(f"Reconstruction failed ({state.error_kind}): {state.message}",
                                         detailedText="\n".join(self.session.worker.log_tail(40)) if self.session.worker else "")
        else:
            self._updateEnabledWidgets()

    def _stopSession(self) -> None:
        if self.timer:
            self.timer.stop()
        if self.session is not None:
            self.session.close()

    def _showMetrics(self, metrics) -> None:
        rows = metric_table_rows(metrics)
        table = self.ui.metricsTable
        table.setRowCount(len(rows))
        for row, (label, value) in enumerate(rows):
            table.setItem(row, 0, qt.QTableWidgetItem(label))
            table.setItem(row, 1, qt.QTableWidgetItem(value))

    # -- torch ------------------------------------------------------------------------------------
    def _torchReady(self) -> bool:
        status = self.logic.torchStatus()
        self.ui.torchStatusLabel.text = status.message
        self.ui.installTorchButton.visible = not status.available
        if status.available:
            return True
        if slicer.util.confirmOkCancelDisplay(f"{status.message}\n\nInstall PyTorch now with the PyTorch extension?"):
            self.onInstallTorchButton()
        return False

    def onInstallTorchButton(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to install PyTorch.", waitCursor=True):
            self.logic.installTorch()
            status = self.logic.torchStatus(refresh=True)
            self.ui.torchStatusLabel.text = status.message
            self.ui.installTorchButton.visible = not status.available

    # -- compare ----------------------------------------------------------------------------------
    def onCompareButton(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Failed to compare with the reference.", waitCursor=True):
            metrics = self.logic.showComparison(p.outputVolume, p.referenceVolume, p.maskVolume)
            self._showMetrics(metrics)


class QSMDIPLogic(ScriptedLoadableModuleLogic):
    """Thin adapter between the panel and QSMDIPLib: where the worker's Python is, and Slicer views."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._torchStatus = None
        self.differenceNode = None

    def getParameterNode(self):
        return QSMDIPParameterNode(super().getParameterNode())

    @staticmethod
    def moduleDir() -> str:
        """The folder that holds QSMDIP.py, QSMDIPLib/ and the qsmdip library package."""
        return os.path.dirname(os.path.abspath(__file__))

    @staticmethod
    def pythonCommand() -> list:
        """Slicer's own Python for the worker (PythonSlicer launcher), else this interpreter."""
        launcher = shutil.which("PythonSlicer")
        return [launcher] if launcher else [sys.executable]

    @staticmethod
    def workerEnvironment() -> dict:
        return slicer.util.startupEnvironment()

    def torchStatus(self, refresh: bool = False):
        if self._torchStatus is None or refresh or not self._torchStatus.available:
            self._torchStatus = check_torch(self.pythonCommand(), self.moduleDir(), env=self.workerEnvironment())
        return self._torchStatus

    def installTorch(self) -> None:
        """Install torch into Slicer's Python with the PyTorch extension's PyTorchUtils."""
        try:
            import PyTorchUtils
        except ImportError as error:
            raise RuntimeError("The PyTorch extension is not installed: install 'PyTorch' from the Extensions"
                               " Manager, restart Slicer, and try again.") from error
        PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT)

    def startReconstruction(self, p: QSMDIPParameterNode) -> ReconstructionSession:
        """Start a reconstruction with the panel's settings; poll the returned session."""
        options = options_from_panel(p.method, p.fieldUnits, p.b0Tesla, p.echoTimeS, p.device, p.updateInterval,
                                     p.iterations, p.learningRate, p.width, p.seed)
        session = ReconstructionSession(
            slicer.mrmlScene, p.fieldVolume, p.maskVolume, options, python_command=self.pythonCommand(),
            module_dir=self.moduleDir(), reference_node=p.referenceVolume, magnitude_node=p.magnitudeVolume,
            output_node=p.outputVolume,
            env=self.workerEnvironment(), temp_root=slicer.app.temporaryPath)
        session.start()
        logging.info(f"QSMDIP worker: {' '.join(session.worker.command) if session.worker else 'not started'}")
        return session

    def showComparison(self, qsmNode, referenceNode, maskNode) -> dict:
        """Reconstruction | gold standard | difference side by side with linked slices; return the metrics."""
        self.differenceNode = update_difference_node(slicer.mrmlScene, qsmNode, referenceNode, maskNode,
                                                     self.differenceNode)
        layoutManager = slicer.app.layoutManager()
        layoutNode = layoutManager.layoutLogic().GetLayoutNode()
        if not layoutNode.IsLayoutDescription(COMPARE_LAYOUT_ID):
            layoutNode.AddLayoutDescription(COMPARE_LAYOUT_ID, _compareLayoutXml())
        layoutManager.setLayout(COMPARE_LAYOUT_ID)
        for viewName, node in (("Red", qsmNode), ("Yellow", referenceNode), ("Green", self.differenceNode)):
            sliceLogic = layoutManager.sliceWidget(viewName).sliceLogic()
            composite = sliceLogic.GetSliceCompositeNode()
            composite.SetBackgroundVolumeID(node.GetID())
            composite.SetForegroundVolumeID(None)
            composite.SetLabelVolumeID(None)
            composite.SetLinkedControl(True)
            sliceLogic.GetSliceNode().SetOrientation("Axial")
            sliceLogic.FitSliceToAll()
        return metrics_for_nodes(qsmNode, referenceNode, maskNode)


def _compareLayoutXml() -> str:
    views = "".join(
        f'<item><view class="vtkMRMLSliceNode" singletontag="{tag}">'
        f'<property name="orientation" action="default">Axial</property>'
        f'<property name="viewlabel" action="default">{label}</property>'
        f'<property name="viewcolor" action="default">{color}</property></view></item>'
        for tag, label, color in (("Red", "R", "#F34A33"), ("Yellow", "Y", "#EDD54C"), ("Green", "G", "#6EB04B")))
    return f'<layout type="horizontal">{views}</layout>'


class QSMDIPTest(ScriptedLoadableModuleTest):
    """Inside Slicer: a small phantom, a short TKD and a short DIP through the logic, output and metrics checked."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_reconstructions()

    def _loadPhantom(self, folder: str):
        # The phantom is made by the library's command line in PythonSlicer, so torch stays out of this process.
        logic = QSMDIPLogic()
        command = [*logic.pythonCommand(), "-m", "qsmdip", "phantom", folder, "--voxel", "4", "--size", "24,28,24",
                   "--format", "nrrd"]
        env = dict(logic.workerEnvironment())
        env["PYTHONPATH"] = os.pathsep.join([logic.moduleDir(), env.get("PYTHONPATH", "")])
        subprocess.run(command, check=True, env=env, capture_output=True)
        field = slicer.util.loadVolume(os.path.join(folder, "field.nrrd"))
        mask = slicer.util.loadVolume(os.path.join(folder, "mask.nrrd"), {"labelmap": True})
        reference = slicer.util.loadVolume(os.path.join(folder, "chi.nrrd"))
        return field, mask, reference

    def test_reconstructions(self):
        self.delayDisplay("Starting the QSMDIP test")
        logic = QSMDIPLogic()
        status = logic.torchStatus()
        if not status.available:
            logic.installTorch()  # no confirmation dialog in testing mode
            status = logic.torchStatus(refresh=True)
        self.assertTrue(status.available, status.message)
        with tempfile.TemporaryDirectory() as folder:
            field, mask, reference = self._loadPhantom(folder)
        fieldBefore = slicer.util.arrayFromVolume(field).copy()
        p = logic.getParameterNode()
        p.fieldVolume, p.maskVolume, p.referenceVolume = field, mask, reference
        p.device, p.updateInterval = "CPU", 2

        for method, iterations, maxNrmse in (("TKD", 1, 60.0), ("DIP", 6, 150.0)):
            p.method, p.iterations, p.width, p.outputVolume = method, iterations, 4, None
            session = logic.startReconstruction(p)
            state = session.wait(timeout_s=300)
            slicer.app.processEvents()
            self.assertEqual(state.phase, "done", state.message)
            output = session.output_node
            self.assertEqual(output.GetName()[:len("field_QSM")], "field_QSM")
            self.assertEqual(output.GetImageData().GetDimensions(), field.GetImageData().GetDimensions())
            a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
            output.GetIJKToRASMatrix(a)
            field.GetIJKToRASMatrix(b)
            for r in range(4):
                for c in range(4):
                    self.assertAlmostEqual(a.GetElement(r, c), b.GetElement(r, c), places=4)
            self.assertGreaterEqual(state.snapshots_loaded, 1)
            self.assertIsNotNone(state.metrics)
            metrics = metrics_for_nodes(output, reference, mask)
            self.assertAlmostEqual(metrics["nrmse"], state.metrics["nrmse"], places=2)
            self.assertLess(metrics["nrmse"], maxNrmse)
            self.assertFalse(os.path.exists(session.job.work_dir))
        self.assertTrue((slicer.util.arrayFromVolume(field) == fieldBefore).all())
        self.delayDisplay("Test passed")
