"""Reading run logs back: tables, scaling sweeps, the α–β performance model, figures.

Owns ``hpcopt analyze``: :mod:`~hpcopt.analysis.tables` (load a log, the summary
table), :mod:`~hpcopt.analysis.perfmodel` (collective cost model, fitted from
``hpcopt calibrate`` samples), :mod:`~hpcopt.analysis.scaling` (strong/weak sweeps and
their efficiency), :mod:`~hpcopt.analysis.plots` (PNG figures, matplotlib imported
lazily), :mod:`~hpcopt.analysis.report` (the command, the only module importing all
of them) and :mod:`~hpcopt.analysis.robustness` (the table and figure of ``hpcopt study
robustness``, from tables and plots).  It reads HDF5 files only: it may import :mod:`hpcopt.errors`, numpy and
h5py, never MPI, torch or the training layers, so analysing runs needs no MPI job.
"""
