"""The built-in N-body simulation: cosmology, mass function, Gaussian ICs, 2LPT, particle mesh, FoF, planted truth."""
