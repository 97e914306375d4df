"""QSMDIP: quantitative susceptibility mapping by Deep Image Prior, as a 3D Slicer module.

Module, Widget, Logic and Test only. Every decision lives in the Qt-free ``QSMDIPLib`` package. Torch is
never imported into Slicer's own process: the reconstruction (``PythonSlicer -m qsmdip.worker``), the
PyTorch check, the PyTorch installation and the example phantom all run as separate processes of
Slicer's Python, polled from a timer, so the panel never freezes while they work.
"""
import logging
import os
import shutil
import sys
import tempfile
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

try:
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:  # Slicer before 5.6 has no translation functions: keep the English texts
    def _(text):
        return text

    def translate(context, text):
        return text

from QSMDIPLib.compare import compare_nodes, metric_table_rows, metrics_for_nodes
from QSMDIPLib.dicom import dicom_source_file, export_node_dicom
from QSMDIPLib.echoes import echo_set, format_ms
from QSMDIPLib.example import EXAMPLE_DIP_ITERATIONS, ExampleDataJob, load_example, panel_selection
from QSMDIPLib.gre import GreSession, gre_options_from_panel
from QSMDIPLib.job import method_after_input_mode_change, options_from_panel
from QSMDIPLib.session import ReconstructionSession
from QSMDIPLib.torch_check import TorchProbe, torch_install_job
from qsmdip.errors import QSMInputError

DOCUMENTATION_URL = "https://github.com/qsmdip/SlicerQSMDIP#readme"
COMPARE_LAYOUT_ID = 50731  # arbitrary id for the custom side-by-side layout
GRE_MODE = "Multi-echo GRE (phase + magnitude)"


class QSMDIP(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("QSM DIP")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Quantification")]
        self.parent.dependencies = []
        self.parent.contributors = ["QSMDIP developers"]
        self.parent.helpText = _(
            "Reconstruct a quantitative susceptibility map (ppm) from a local field map and a brain mask by"
            " Deep Image Prior, with TKD, Tikhonov and total variation as quick previews. An optional GRE"
            " magnitude on the field's grid serves DIP as an anatomical prior. Or start from the scanner's"
            " multi-echo GRE phase and magnitude (a Sequence or MultiVolume node, or one volume per echo, as the"
            " DICOM module loads them): the total field, the mask and the local field appear as each stage"
            " finishes, then the QSM. The solver runs in"
            " a background process; the output volume is updated live. 'Load example data' makes a small"
            " head phantom to try it on; 'Export DICOM' writes the result for PACS. Needs PyTorch, which the"
            " panel can install.<br>See the <a href=\"{url}\">documentation</a>.").format(url=DOCUMENTATION_URL)
        self.parent.acknowledgementText = _("QSMDIP is BSD-3-Clause licensed open-source software.")


@parameterNodeWrapper
class QSMDIPParameterNode:
    fieldVolume: vtkMRMLScalarVolumeNode
    maskVolume: vtkMRMLScalarVolumeNode
    referenceVolume: vtkMRMLScalarVolumeNode
    magnitudeVolume: vtkMRMLScalarVolumeNode
    outputVolume: vtkMRMLScalarVolumeNode
    inputMode: Annotated[str, Choice(["Local field", "Multi-echo GRE (phase + magnitude)"])] = "Local field"
    fieldUnits: Annotated[str, Choice(["ppm", "Hz", "rad"])] = "ppm"
    # The spin boxes' decimals are set in the .ui (a Decimals annotation would only log "Unused annotations").
    b0Tesla: Annotated[float, WithinRange(0.1, 21.0)] = 3.0
    echoTimeS: Annotated[float, WithinRange(0.0001, 1.0)] = 0.02
    method: Annotated[str, Choice(["DIP", "TKD", "Tikhonov", "TV", "Single-step TV"])] = "DIP"
    iterations: Annotated[int, WithinRange(1, 100000)] = 300
    learningRate: Annotated[float, WithinRange(0.000001, 1.0)] = 0.002
    width: Annotated[int, WithinRange(1, 256)] = 16
    updateInterval: Annotated[int, WithinRange(1, 10000)] = 10
    seed: Annotated[int, WithinRange(0, 2147483647)] = 0
    device: Annotated[str, Choice(["auto", "GPU", "CPU"])] = "auto"
    unwrapMethod: Annotated[str, Choice(["region-growing", "laplacian"])] = "region-growing"
    backgroundMethod: Annotated[str, Choice(["pdf", "vsharp"])] = "pdf"


class QSMDIPWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.session = None
        self._sessionReported = False
        self.exampleJob = None
        self.torchInstall = None
        self._afterTorchCheck = None  # what to do once the running torch check has answered
        self.timer = None
        self._stageVolumesShown = 0
        self._filledEchoTimes = ""  # the echo times last filled in from the DICOM (replaced when the echoes change)
        self._inputMode = None  # the input mode last seen, so the method can follow the mode's default

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
        self.ui.exampleButton.clicked.connect(self.onExampleButton)
        self.ui.exportDicomButton.clicked.connect(self.onExportDicomButton)
        # The echo selectors are checkable combo boxes (one node, or one volume per echo): given the scene here.
        for selector in (self.ui.phaseEchoesSelector, self.ui.magnitudeEchoesSelector):
            selector.setMRMLScene(slicer.mrmlScene)
            selector.connect("checkedNodesChanged()", self.onEchoesChanged)
        self.ui.installTorchButton.visible = False
        self._showMetrics(None)
        self.initializeParameterNode()
        self.logic.startTorchCheck()  # in the background: the answer shows up in the panel when ready
        self.timer.start()

    def cleanup(self) -> None:
        self.removeObservers()
        self._stopSession()
        if self.exampleJob is not None:
            self.exampleJob.cancel()
        if self.torchInstall is not None:
            self.torchInstall.cancel()
        self.logic.stopTorchCheck()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateEnabledWidgets)

    def onSceneStartClose(self, caller, event) -> None:
        self._stopSession()
        if self.exampleJob is not None:
            self.exampleJob.cancel()
            self.exampleJob = None
        self.logic.differenceNode = None
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
        self._inputMode = None  # a new node keeps its own method
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
        gre = p.inputMode == GRE_MODE
        if self._inputMode is not None and self._inputMode != p.inputMode:
            # From the phase the default is single-step TV, for a local field DIP; a picked method stays.
            method = method_after_input_mode_change(p.method, self._inputMode == GRE_MODE, gre)
            self._inputMode = p.inputMode
            if method != p.method:
                p.method = method  # triggers this function again, with the mode already recorded
                return
        self._inputMode = p.inputMode
        for widget in (self.ui.fieldLabel, self.ui.fieldVolumeSelector, self.ui.magnitudeLabel,
                       self.ui.magnitudeVolumeSelector, self.ui.fieldUnitsLabel, self.ui.fieldUnitsComboBox,
                       self.ui.echoTimeLabel, self.ui.echoTimeSpinBox):
            widget.visible = not gre
        for widget in (self.ui.phaseEchoesLabel, self.ui.phaseEchoesSelector, self.ui.magnitudeEchoesLabel,
                       self.ui.magnitudeEchoesSelector, self.ui.echoTimesLabel, self.ui.echoTimesLineEdit,
                       self.ui.echoInfoLabel, self.ui.unwrapLabel, self.ui.unwrapComboBox, self.ui.backgroundLabel,
                       self.ui.backgroundComboBox):
            widget.visible = gre
        self.ui.maskLabel.text = _("Mask (optional):") if gre else _("Mask:")
        self.ui.b0SpinBox.enabled = gre or p.fieldUnits in ("Hz", "rad")
        self.ui.echoTimeSpinBox.enabled = p.fieldUnits == "rad"
        for widget in (self.ui.iterationsSpinBox, self.ui.learningRateSpinBox, self.ui.widthSpinBox, self.ui.seedSpinBox):
            widget.enabled = p.method == "DIP"  # the quick previews run with their own defaults
        for widget in (self.ui.inputsCollapsibleButton, self.ui.methodCollapsibleButton, self.ui.outputVolumeSelector):
            widget.enabled = not running
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        if gre:
            ready = bool(self.ui.phaseEchoesSelector.checkedNodes() and self.ui.magnitudeEchoesSelector.checkedNodes())
        else:
            ready = bool(p.fieldVolume and p.maskVolume)
        self.ui.applyButton.enabled = running or ready
        self.ui.compareButton.enabled = bool(p.referenceVolume and p.outputVolume and p.maskVolume)
        self.ui.exampleButton.enabled = not running and self.exampleJob is None
        self.ui.exportDicomButton.enabled = not running and bool(p.outputVolume and p.outputVolume.GetImageData())

    # -- timer: everything that runs in the background ---------------------------------------------
    def onTimer(self) -> None:
        busy = [self._pollTorchCheck(), self._pollTorchInstall(), self._pollExample(), self._pollSession()]
        if not any(busy):
            self.timer.stop()
        self._updateEnabledWidgets()

    def _startTimer(self) -> None:
        if not self.timer.isActive():
            self.timer.start()

    def _pollTorchCheck(self) -> bool:
        status = self.logic.torchStatus()
        if status is None:
            if self.logic.torchCheckRunning():
                self.ui.torchStatusLabel.text = _("Checking PyTorch in Slicer's Python...")
                return True
            return False
        self.ui.torchStatusLabel.text = status.message
        self.ui.installTorchButton.visible = not status.available and self.torchInstall is None
        action, self._afterTorchCheck = self._afterTorchCheck, None
        if action is not None:
            action()
        return False

    def _whenTorchReady(self, action) -> None:
        """Run ``action`` now if PyTorch is ready, once the running check answers, or offer to install it."""
        status = self.logic.torchStatus()
        if status is None:
            self._afterTorchCheck = lambda: self._whenTorchReady(action)
            self.logic.startTorchCheck()
            self.ui.statusLabel.text = _("Checking PyTorch first; this starts by itself when the check is done.")
            self._startTimer()
            return
        if status.available:
            action()
            return
        self.ui.installTorchButton.visible = self.torchInstall is None
        if self.torchInstall is None and slicer.util.confirmOkCancelDisplay(
                status.message + "\n\n" + _("Install PyTorch now? It is downloaded into Slicer's Python in the"
                                            " background; this can take several minutes.")):
            self._startTorchInstall()

    # -- run --------------------------------------------------------------------------------------
    def onApplyButton(self) -> None:
        if self._running():
            self.session.cancel()
            self.ui.statusLabel.text = _("Cancelling...")
            return
        self._whenTorchReady(self._startReconstruction)

    def onEchoesChanged(self) -> None:
        """Show what the chosen echoes hold; fill in the echo times and B0 that the DICOM gives."""
        p = self._parameterNode
        if p is None:
            return
        phaseNodes = self.ui.phaseEchoesSelector.checkedNodes()
        self.ui.echoInfoLabel.text = ""
        if phaseNodes:
            try:
                echoes = self.logic.describeEchoes(phaseNodes, "phase")
            except QSMInputError as error:  # the selection cannot be used: say why
                self.ui.echoInfoLabel.text = str(error)
            else:
                if echoes.echo_times_s and self.ui.echoTimesLineEdit.text in ("", self._filledEchoTimes):
                    self._filledEchoTimes = format_ms(echoes.echo_times_s)
                    self.ui.echoTimesLineEdit.text = self._filledEchoTimes
                if echoes.b0_tesla:
                    p.b0Tesla = echoes.b0_tesla
                lines = [_("{count} echoes ({source})").format(count=echoes.echoes, source=echoes.source)]
                lines += echoes.notes
                if echoes.b0_tesla:
                    lines.append(_("B0 {b0} T from the DICOM").format(b0=f"{echoes.b0_tesla:g}"))
                elif not echoes.echo_times_s:
                    lines.append(_("Type the echo times in ms and check B0."))
                self.ui.echoInfoLabel.text = "\n".join(lines)
        self._updateEnabledWidgets()

    def _startReconstruction(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to start the reconstruction."), waitCursor=True):
            p = self._parameterNode
            if p.inputMode == GRE_MODE:
                self.session = self.logic.startGreReconstruction(
                    p, self.ui.phaseEchoesSelector.checkedNodes(), self.ui.magnitudeEchoesSelector.checkedNodes(),
                    self.ui.echoTimesLineEdit.text)
            else:
                self.session = self.logic.startReconstruction(p)
            self._stageVolumesShown = 0
            self._sessionReported = False
            self._parameterNode.outputVolume = self.session.output_node
            self._showMetrics(None)
            self._startTimer()
            self._pollSession()

    def _pollSession(self) -> bool:
        if self.session is None or self._sessionReported:
            return False
        firstSnapshot = self.session.state.snapshots_loaded == 0
        state = self.session.poll()
        self._showStageVolumes()
        if firstSnapshot and state.snapshots_loaded > 0:
            slicer.util.setSliceViewerLayers(background=self.session.output_node, fit=True)
        self.ui.progressBar.value = state.progress_percent()
        self.ui.progressLabel.text = state.progress_text()
        warnings = [_("Warning: {warning}").format(warning=w) for w in state.warnings]
        self.ui.statusLabel.text = "\n".join([state.message] + warnings)
        if state.metrics is not None:
            self._showMetrics(state.metrics)
        self._sessionReported = state.finished
        if state.finished and state.phase == "failed":
            worker = self.session.worker
            slicer.util.errorDisplay(
                _("Reconstruction failed ({kind}): {message}").format(kind=state.error_kind, message=state.message),
                detailedText="\n".join(worker.log_tail(40)) if worker else "")
        return not state.finished

    def _showStageVolumes(self) -> None:
        """Show the newest field of a run from the phase, with its mask as the label layer."""
        shown = getattr(self.session, "shown", [])
        if len(shown) == self._stageVolumesShown or self.session.state.snapshots_loaded:
            return
        fields = [node for node in shown if not node.IsA("vtkMRMLLabelMapVolumeNode")]
        mask = self.session.stage_nodes.get("mask")
        slicer.util.setSliceViewerLayers(background=fields[-1] if fields else None, label=mask,
                                         fit=self._stageVolumesShown == 0)
        self._stageVolumesShown = len(shown)

    def _stopSession(self) -> None:
        if self.session is not None:
            self.session.close()  # kills the worker tree at once; no waiting on the GUI thread

    def _showMetrics(self, metrics) -> None:
        rows = metric_table_rows(metrics)
        table = self.ui.metricsTable
        table.setRowCount(len(rows))
        for row, (label, value) in enumerate(rows):
            table.setItem(row, 0, qt.QTableWidgetItem(label))
            table.setItem(row, 1, qt.QTableWidgetItem(value))

    # -- torch ------------------------------------------------------------------------------------
    def onInstallTorchButton(self) -> None:
        if self.torchInstall is None and slicer.util.confirmOkCancelDisplay(
                _("Install PyTorch into Slicer's Python? It is downloaded in the background (light-the-torch picks"
                  " the CPU or CUDA build); this can take several minutes.")):
            self._startTorchInstall()

    def _startTorchInstall(self) -> None:
        self.torchInstall = self.logic.startTorchInstall()
        self.ui.installTorchButton.visible = False
        self.ui.torchStatusLabel.text = _("Installing PyTorch...")
        self._startTimer()

    def _pollTorchInstall(self) -> bool:
        if self.torchInstall is None:
            return False
        succeeded = self.torchInstall.poll()
        if succeeded is None:
            self.ui.torchStatusLabel.text = _("Installing PyTorch: {line}").format(line=self.torchInstall.last_line())
            return True
        install, self.torchInstall = self.torchInstall, None
        if succeeded:
            self.logic.startTorchCheck(refresh=True)
            return True
        self.ui.installTorchButton.visible = True
        self.ui.torchStatusLabel.text = _("PyTorch was not installed.")
        slicer.util.errorDisplay(_("Failed to install PyTorch: {reason}").format(reason=install.message),
                                 detailedText="\n".join(install.current.log_tail(40)) if install.current else "")
        return False

    # -- example ----------------------------------------------------------------------------------
    def onExampleButton(self) -> None:
        self._whenTorchReady(self._startExample)

    def _startExample(self) -> None:
        self.exampleJob = self.logic.startExampleData()
        self.ui.statusLabel.text = self.exampleJob.message
        self._startTimer()

    def _pollExample(self) -> bool:
        job = self.exampleJob
        if job is None:
            return False
        files = job.poll()
        if not job.finished:
            self.ui.statusLabel.text = job.message
            return True
        self.exampleJob = None
        if files is None:
            self.ui.statusLabel.text = job.message
            slicer.util.errorDisplay(_("Could not make the example data: {reason}").format(reason=job.message),
                                     detailedText="\n".join(job.process.log_tail(40)) if job.process else "")
            return False
        with slicer.util.tryWithErrorDisplay(_("Failed to load the example data."), waitCursor=True):
            nodes = self.logic.loadExample(job)
            for name, value in panel_selection(nodes).items():
                setattr(self._parameterNode, name, value)
            slicer.util.setSliceViewerLayers(background=nodes.field, fit=True)
            self.ui.statusLabel.text = _("Example loaded ({kind} phantom). DIP is set to {n} iterations for a"
                                         " quick first look (under a minute on a laptop CPU). Press Apply, then"
                                         " 'Compare with gold standard'.").format(kind=files.kind,
                                                                                  n=EXAMPLE_DIP_ITERATIONS)
        return False

    # -- compare and export -----------------------------------------------------------------------
    def onCompareButton(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to compare with the reference."), waitCursor=True):
            metrics = self.logic.showComparison(p.outputVolume, p.referenceVolume, p.maskVolume)
            self._showMetrics(metrics)

    def onExportDicomButton(self) -> None:
        p = self._parameterNode
        folder = qt.QFileDialog.getExistingDirectory(
            slicer.util.mainWindow(), _("Folder in which to create the DICOM series"), qt.QDir.homePath())
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to export the DICOM series."), waitCursor=True):
            files = self.logic.exportDicom(p.outputVolume, p.fieldVolume, folder)
            slicer.util.infoDisplay(_("Wrote {count} DICOM files to {folder}").format(
                count=len(files), folder=os.path.dirname(files[0])))


class QSMDIPLogic(ScriptedLoadableModuleLogic):
    """Thin adapter between the panel and QSMDIPLib: where the worker's Python is, and Slicer views."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._torchStatus = None  # cached, negative answers too, until a refresh is asked for
        self._torchProbe = None
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

    # -- torch ------------------------------------------------------------------------------------
    def startTorchCheck(self, refresh: bool = False) -> None:
        """Ask in the background whether PyTorch is ready (nothing happens while a check runs or an answer
        is cached, unless ``refresh``)."""
        if refresh:
            self.stopTorchCheck()
            self._torchStatus = None
        if self._torchStatus is None and self._torchProbe is None:
            self._torchProbe = TorchProbe(self.pythonCommand(), self.moduleDir(), env=self.workerEnvironment()).start()

    def stopTorchCheck(self) -> None:
        if self._torchProbe is not None:
            self._torchProbe.process.kill()
            self._torchProbe = None

    def torchCheckRunning(self) -> bool:
        return self._torchProbe is not None

    def torchStatus(self):
        """The cached answer, or None while the check is running or has not been started (never blocks)."""
        if self._torchStatus is None and self._torchProbe is not None:
            self._torchStatus = self._torchProbe.poll()
            if self._torchStatus is not None:
                self._torchProbe = None
        return self._torchStatus

    def waitForTorchStatus(self, refresh: bool = False):
        """Block until the answer is known (the self-test)."""
        self.startTorchCheck(refresh=refresh)
        if self._torchProbe is not None:
            self._torchStatus = self._torchProbe.wait()
            self._torchProbe = None
        return self._torchStatus

    def startTorchInstall(self):
        """Install PyTorch into Slicer's Python in the background; poll the returned job."""
        return torch_install_job(self.pythonCommand(), env=self.workerEnvironment())

    # -- example, reconstruction, comparison, export ----------------------------------------------
    def startExampleData(self) -> ExampleDataJob:
        """Make the example phantom in the background (worker's Python); poll the returned job."""
        return ExampleDataJob(self.pythonCommand(), self.moduleDir(), env=self.workerEnvironment(),
                              temp_root=slicer.app.temporaryPath).start()

    def loadExample(self, job: ExampleDataJob):
        """Load a finished example job's volumes into the scene, then remove its temporary files."""
        try:
            return load_example(slicer.mrmlScene, job.files)
        finally:
            job.cleanup()

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

    @staticmethod
    def dicomInstanceValue():
        """``instanceValue(uid, tag)`` of Slicer's DICOM database, or None without one."""
        database = getattr(slicer, "dicomDatabase", None)
        return database.instanceValue if database is not None else None

    def describeEchoes(self, nodes, role: str):
        """The echoes (and the echo times and B0 that the DICOM gives) of the chosen nodes."""
        return echo_set(list(nodes), role, self.dicomInstanceValue())

    def startGreReconstruction(self, p: QSMDIPParameterNode, phaseNodes, magnitudeNodes,
                               echoTimesMs: str) -> GreSession:
        """Start phase -> local field -> QSM in the background; poll the returned session."""
        phase = self.describeEchoes(phaseNodes, "phase")
        magnitude = self.describeEchoes(magnitudeNodes, "magnitude")
        gre = gre_options_from_panel(echoTimesMs, p.b0Tesla, p.unwrapMethod, p.backgroundMethod, phase, magnitude)
        options = options_from_panel(p.method, "ppm", p.b0Tesla, p.echoTimeS, p.device, p.updateInterval,
                                     p.iterations, p.learningRate, p.width, p.seed)
        session = GreSession(
            slicer.mrmlScene, phase, magnitude, gre, options, python_command=self.pythonCommand(),
            module_dir=self.moduleDir(), mask_node=p.maskVolume, reference_node=p.referenceVolume,
            output_node=p.outputVolume, env=self.workerEnvironment(), temp_root=slicer.app.temporaryPath)
        session.start()
        logging.info(f"QSMDIP worker: {' '.join(session.worker.command) if session.worker else 'not started'}")
        return session

    def showComparison(self, qsmNode, referenceNode, maskNode) -> dict:
        """Reconstruction | gold standard | difference side by side with linked slices; return the metrics."""
        metrics, self.differenceNode = compare_nodes(slicer.mrmlScene, qsmNode, referenceNode, maskNode,
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
        return metrics

    def exportDicom(self, qsmNode, fieldNode, parentFolder: str) -> list:
        """Write ``qsmNode`` as a new DICOM series in a new folder; the field's DICOM source gives patient/study."""
        database = getattr(slicer, "dicomDatabase", None)
        like = dicom_source_file(fieldNode, database.fileForInstance) if database is not None else None
        return export_node_dicom(qsmNode, parentFolder, like=like)


def _compareLayoutXml() -> str:
    views = "".join(
        f'<item><view class="vtkMRMLSliceNode" singletontag="{tag}">'
        f'<property name="orientation" action="default">Axial</property>'
        f'<property name="viewlabel" action="default">{label}</property>'
        f'<property name="viewcolor" action="default">{color}</property></view></item>'
        for tag, label, color in (("Red", "R", "#F34A33"), ("Yellow", "Y", "#EDD54C"), ("Green", "G", "#6EB04B")))
    return f'<layout type="horizontal">{views}</layout>'


class QSMDIPTest(ScriptedLoadableModuleTest):
    """Inside Slicer: the example phantom, a short TKD and a short DIP through the logic, output and metrics checked."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_reconstructions()

    def test_reconstructions(self):
        self.delayDisplay("Starting the QSMDIP test")
        logic = QSMDIPLogic()
        status = logic.waitForTorchStatus()
        if not status.available:
            install = logic.startTorchInstall()
            self.assertTrue(install.wait(3600), install.message)
            status = logic.waitForTorchStatus(refresh=True)
        self.assertTrue(status.available, status.message)

        job = logic.startExampleData()
        self.assertIsNotNone(job.wait(600), job.message)  # the message carries the phantom command's error output
        nodes = logic.loadExample(job)
        field, mask, reference = nodes.field, nodes.mask, nodes.chi
        fieldBefore = slicer.util.arrayFromVolume(field).copy()
        p = logic.getParameterNode()
        for name, value in panel_selection(nodes).items():
            setattr(p, name, value)
        p.device, p.updateInterval = "CPU", 2

        for method, iterations, maxNrmse in (("TKD", 1, 100.0), ("DIP", 6, 150.0)):
            p.method, p.iterations, p.width, p.outputVolume = method, iterations, 4, None
            session = logic.startReconstruction(p)
            try:
                state = session.wait(timeout_s=600)
                slicer.app.processEvents()
                self.assertEqual(state.phase, "done", state.message)
                output = session.output_node
                self.assertTrue(output.GetName().startswith(field.GetName() + "_QSM"))
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
            finally:
                session.close()  # never leave a worker running, whatever failed above
        self.assertTrue((slicer.util.arrayFromVolume(field) == fieldBefore).all())

        with tempfile.TemporaryDirectory() as folder:
            files = logic.exportDicom(output, field, folder)
            self.assertEqual(len(files), field.GetImageData().GetDimensions()[2])
        self.delayDisplay("Test passed")
