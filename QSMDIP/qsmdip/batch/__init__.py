"""Cohorts: ``qsmdip batch`` over a BIDS dataset (or a CSV of local fields), on a Dask cluster.

- :mod:`.discovery` finds the acquisitions (subject, session, run) and names their outputs;
- :mod:`.provenance` checksums inputs, writes the JSON sidecars and decides what is already done;
- :mod:`.task` reconstructs one acquisition in the process it runs in (no Dask there);
- :mod:`.cluster` starts or joins the Dask cluster (local, an existing scheduler, or SLURM/PBS/SGE);
- :mod:`.engine` plans, submits, follows and summarises the run.

Only :mod:`.cluster` and :mod:`.engine` import Dask (the optional extra ``qsmdip[batch]``), and only
inside functions: the command line's parser imports :mod:`.cluster` for the ``batch`` flags, so no module
here may import Dask at the top, or every command would.
"""
