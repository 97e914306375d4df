"""Make the library importable from a source checkout even when it is not pip-installed."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE_DIR = os.path.join(ROOT, "QSMDIP")
if MODULE_DIR not in sys.path:
    sys.path.insert(0, MODULE_DIR)

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of small solves: on a busy machine OpenMP's waiting threads make them
    ~30x slower. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
