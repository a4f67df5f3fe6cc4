"""MPI foundations: slab layout arithmetic, communicator helpers, the packed Alltoallv exchange, the distributed FFT, the run environment."""
