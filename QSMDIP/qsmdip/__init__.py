"""QSMDIP: quantitative susceptibility mapping by Deep Image Prior, with classical baselines.

A plain Python library (NumPy, SciPy, SimpleITK, PyTorch); it never imports ``slicer``, ``qt`` or
``vtk``, so it runs from the command line, in a background worker, and in tests.
"""
__version__ = "0.1.0"
