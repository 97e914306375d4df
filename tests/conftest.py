"""Make the library importable from a source checkout even when it is not pip-installed."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE_DIR = os.path.join(ROOT, "QSMDIP")
if MODULE_DIR not in sys.path:
    sys.path.insert(0, MODULE_DIR)
