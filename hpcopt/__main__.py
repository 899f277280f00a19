"""``python -m hpcopt`` (under MPI: ``mpiexec -n P python -m mpi4py -m hpcopt train …``)."""

from hpcopt.cli.main import entry_point

entry_point()
