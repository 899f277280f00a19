"""MNIST: the IDX file reader (:mod:`~hpcopt.problems.mnist.idx`) and the problem (:mod:`.problem`).

Reads the 10 000-image and the full 60 000/10 000 sets from any directory holding the
IDX files (gzipped or not).  Same imports as :mod:`hpcopt.problems`.
"""
