"""QSM dipole-inversion solvers sharing one call shape (see ``base.py``)."""
