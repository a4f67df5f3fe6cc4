"""Simulation inputs and run outputs: our HDF5 simulation files, AbacusSummit through abacusutils, sources, spectra files."""
