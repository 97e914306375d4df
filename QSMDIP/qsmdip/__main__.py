"""``python -m qsmdip`` is the ``qsmdip`` command."""
import sys

from .cli import main

sys.exit(main())
