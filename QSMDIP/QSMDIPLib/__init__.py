"""Qt-free logic of the QSMDIP Slicer module.

Everything the panel decides lives here, so that it runs and is tested without the Slicer application:
it needs only MRML (``slicer`` from slicer-core or from Slicer itself), NumPy and the standard library.
Every function takes the MRML scene or the nodes it works on as arguments; nothing here touches
``slicer.mrmlScene``, ``slicer.app`` or ``qt``. Torch is never imported: reconstructions, the torch
check and install, and the example phantom run in separate processes (``python -m qsmdip.worker``,
see docs/WORKER_PROTOCOL.md), polled without blocking.

- :mod:`.job`: volume nodes -> temporary files + job file.
- :mod:`.echoes`: multi-echo GRE inputs (Sequence, MultiVolume, one volume per echo), their echo times and B0.
- :mod:`.gre`: a reconstruction from the phase: its job, and each stage's volumes loaded as they arrive.
- :mod:`.process`: background processes (no console window, whole-tree cancel), the worker's JSON
  lines and exit statuses, commands run one after another.
- :mod:`.streaming`: the output volume node, updated in place from snapshot files.
- :mod:`.compare`: metrics and a difference volume against a reference node.
- :mod:`.session`: one reconstruction from Apply to the end, polled by the panel's timer.
- :mod:`.torch_check`: whether the worker's Python has a recent enough torch and a GPU; installing it.
- :mod:`.example`: the one-click example phantom, made in the background, loaded and selected.
- :mod:`.dicom`: a QSM node as a DICOM series for PACS (:mod:`qsmdip.dicom_export`).
- :mod:`.i18n`: the translation function ``_`` (Slicer's, when there is one).
"""
