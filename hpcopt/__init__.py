"""hpcopt: MPI-native distributed trust-region and second-order optimizers for neural networks."""

__version__ = "0.1.0"
