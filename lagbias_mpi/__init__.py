"""lagbias_mpi: MPI-parallel non-parametric Lagrangian halo bias.

Implements Wu, Munoz & Eisenstein, JCAP 05 (2023) 040 (arXiv:2212.08095) as a distributed
pipeline: slab-decomposed FFT features of the initial density, particle routing with packed
Alltoallv, and torch DistributedDataParallel training of f(theta) on a grid-sum loss.
"""

__version__ = "0.1.0"
