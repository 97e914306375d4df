"""Qt-free logic of the QSMDIP Slicer module.

Everything the panel decides lives here, so that it runs and is tested without the Slicer application:
it needs only MRML (``slicer`` from slicer-core or from Slicer itself), NumPy and the standard library.
Every function takes the MRML scene or the nodes it works on as arguments; nothing here touches
``slicer.mrmlScene``, ``slicer.app`` or ``qt``. Torch is never imported: reconstructions run in a
separate worker process (``python -m qsmdip.worker``, see docs/WORKER_PROTOCOL.md).

- :mod:`.job`: volume nodes -> temporary files + job file.
- :mod:`.process`: the worker process, its JSON-line messages, cancel and exit statuses.
- :mod:`.streaming`: the output volume node, updated in place from snapshot files.
- :mod:`.compare`: metrics and a difference volume against a reference node.
- :mod:`.session`: one reconstruction from Apply to the end, polled by the panel's timer.
- :mod:`.torch_check`: whether the worker's Python has torch, which version, and a GPU.
"""
