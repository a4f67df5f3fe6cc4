"""Meshes: grid arithmetic (cells, IC grid points), painting (NGP/CIC) with ghost planes, power spectra."""
